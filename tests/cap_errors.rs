//! Every documented error path of the CAP ops and CapLayer: an error (never a panic) whose
//! message names the offending value.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use r2scp::cap::{
    dissonance_topk, dissonance_topk_reference, gather_inject, gather_inject_reference, topk_rows,
    topk_rows_reference, CapConfig, CapLayer, Context,
};

fn zeros(s: &[usize], dt: DType) -> Tensor {
    Tensor::zeros(s, dt, &Device::Cpu).expect("zeros")
}

fn u32s(v: Vec<u32>, s: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, s, &Device::Cpu).expect("u32 tensor")
}

fn expect_err<T>(r: Result<T>, needle: &str) {
    match r {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not contain {needle:?}"
            );
        }
    }
}

#[test]
fn dissonance_errors() {
    let p = zeros(&[2, 5, 4], DType::F32);
    let h = zeros(&[2, 3, 4], DType::F32);
    let tok = Context::Tokens {
        h_avl: &h,
        mask: None,
    };
    for f in [dissonance_topk, dissonance_topk_reference] {
        expect_err(f(&p, tok, 0), "k = 0");
        expect_err(f(&p, tok, 6), "k = 6 exceeds the L = 5");
        expect_err(f(&zeros(&[5, 4], DType::F32), tok, 1), "rank 3");
        expect_err(f(&zeros(&[2, 5, 0], DType::F32), tok, 1), "D = 0");
        expect_err(f(&zeros(&[2, 5, 4], DType::U32), tok, 1), "dtype U32");
        let h_bad_b = zeros(&[3, 3, 4], DType::F32);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h_bad_b,
                    mask: None,
                },
                1,
            ),
            "[3, 3, 4]",
        );
        let h_bad_d = zeros(&[2, 3, 5], DType::F32);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h_bad_d,
                    mask: None,
                },
                1,
            ),
            "D = 4",
        );
        let h_rank = zeros(&[2, 12], DType::F32);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h_rank,
                    mask: None,
                },
                1,
            ),
            "[2, 12]",
        );
        let h_empty = zeros(&[2, 0, 4], DType::F32);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h_empty,
                    mask: None,
                },
                1,
            ),
            "La = 0",
        );
        let h_f16 = zeros(&[2, 3, 4], DType::F16);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h_f16,
                    mask: None,
                },
                1,
            ),
            "h_avl dtype F16",
        );
        let m_shape = zeros(&[2, 4], DType::F32);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h,
                    mask: Some(&m_shape),
                },
                1,
            ),
            "mask has shape [2, 4]",
        );
        let m_dtype = zeros(&[2, 3], DType::I64);
        expect_err(
            f(
                &p,
                Context::Tokens {
                    h_avl: &h,
                    mask: Some(&m_dtype),
                },
                1,
            ),
            "mask dtype I64",
        );
        let a_shape = zeros(&[2, 5], DType::F32);
        expect_err(
            f(&p, Context::Anchor(&a_shape), 1),
            "anchor has shape [2, 5]",
        );
        let a_dtype = zeros(&[2, 4], DType::BF16);
        expect_err(f(&p, Context::Anchor(&a_dtype), 1), "anchor dtype BF16");
    }
}

#[test]
fn gather_inject_errors() {
    let h = zeros(&[2, 5, 4], DType::F32);
    let s = zeros(&[2, 3, 4], DType::F32);
    let ok = u32s(vec![0, 1, 2, 3], (2, 2));
    let sal = u32s(vec![0, 2, 1, 1], (2, 2));
    for f in [gather_inject, gather_inject_reference] {
        expect_err(
            f(&h, &s, &u32s(vec![0, 1, 3, 3], (2, 2)), &sal),
            "holds index 3 twice",
        );
        expect_err(
            f(&h, &s, &u32s(vec![0, 5, 1, 2], (2, 2)), &sal),
            "noise_idx[0, 1] = 5 is out of range",
        );
        expect_err(
            f(&h, &s, &ok, &u32s(vec![0, 1, 3, 0], (2, 2))),
            "salient_idx[1, 0] = 3 is out of range",
        );
        expect_err(
            f(&h, &s, &u32s(vec![], (2, 0)), &u32s(vec![], (2, 0))),
            "k = 0",
        );
        expect_err(
            f(
                &h,
                &s,
                &u32s((0..12).map(|i| i % 6).collect(), (2, 6)),
                &u32s(vec![0; 12], (2, 6)),
            ),
            "k = 6 noise indices per row exceed the L = 5",
        );
        expect_err(f(&zeros(&[10, 4], DType::F32), &s, &ok, &sal), "rank 3");
        expect_err(
            f(&h, &zeros(&[2, 3, 5], DType::F32), &ok, &sal),
            "src has shape [2, 3, 5]",
        );
        expect_err(
            f(&h, &zeros(&[1, 3, 4], DType::F32), &ok, &sal),
            "src has shape [1, 3, 4]",
        );
        expect_err(
            f(&h, &zeros(&[2, 3, 4], DType::F16), &ok, &sal),
            "src dtype F16",
        );
        expect_err(
            f(
                &zeros(&[2, 5, 4], DType::U8),
                &zeros(&[2, 3, 4], DType::U8),
                &ok,
                &sal,
            ),
            "dtype U8",
        );
        expect_err(
            f(&h, &s, &ok.to_dtype(DType::I64).expect("i64"), &sal),
            "noise_idx has dtype I64",
        );
        expect_err(
            f(&h, &s, &ok, &sal.to_dtype(DType::F32).expect("f32")),
            "salient_idx has dtype F32",
        );
        expect_err(
            f(&h, &s, &u32s(vec![0, 1, 2], (1, 3)), &sal),
            "noise_idx has shape [1, 3]",
        );
        expect_err(
            f(&h, &s, &ok, &u32s(vec![0, 1, 2], (1, 3))),
            "salient_idx has shape [1, 3]",
        );
    }
}

#[test]
fn topk_rows_errors() {
    let s = zeros(&[3, 4], DType::F32);
    for f in [topk_rows, topk_rows_reference] {
        expect_err(f(&s, 0), "k = 0");
        expect_err(f(&s, 5), "k = 5 exceeds the L = 4");
        expect_err(f(&zeros(&[3], DType::F32), 1), "rank 2");
        expect_err(f(&zeros(&[3, 4], DType::U32), 1), "dtype U32");
    }
}

#[test]
fn cap_layer_errors() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    expect_err(
        CapLayer::new(
            &CapConfig {
                dim: 6,
                heads: 4,
                k: 2,
            },
            vb.pp("a"),
        ),
        "heads = 4 must divide dim = 6",
    );
    expect_err(
        CapLayer::new(
            &CapConfig {
                dim: 8,
                heads: 2,
                k: 0,
            },
            vb.pp("b"),
        ),
        "k = 0",
    );
    let layer = CapLayer::new(
        &CapConfig {
            dim: 8,
            heads: 2,
            k: 3,
        },
        vb.pp("c"),
    )?;
    let t = |s: &[usize]| zeros(s, DType::F32);
    let (hm, ha, hc, q) = (t(&[2, 5, 8]), t(&[2, 4, 8]), t(&[2, 6, 8]), t(&[2, 3, 8]));
    expect_err(
        layer.forward(&hm, &ha, None, &t(&[2, 2, 8]), None, &q, None),
        "k = 3 exceeds the Lc = 2",
    );
    expect_err(
        layer.forward(&t(&[2, 2, 8]), &ha, None, &hc, None, &q, None),
        "k = 3 exceeds the L = 2",
    );
    expect_err(
        layer.forward(&hm, &ha, None, &hc, None, &t(&[2, 3, 7]), None),
        "q 7",
    );
    expect_err(
        layer.forward(&hm, &ha, None, &hc, None, &t(&[1, 3, 8]), None),
        "q 1",
    );
    expect_err(
        layer.forward(&hm, &ha, None, &hc, Some(&t(&[2, 5])), &q, None),
        "com_mask has shape [2, 5]",
    );
    expect_err(
        layer.forward(&hm, &ha, None, &hc, None, &q, Some(&t(&[2, 4]))),
        "q_mask has shape [2, 4]",
    );
    expect_err(
        layer.forward(&hm, &ha, Some(&t(&[2, 5])), &hc, None, &q, None),
        "mask has shape [2, 5]",
    );
    Ok(())
}
