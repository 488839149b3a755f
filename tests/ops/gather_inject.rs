//! gather_inject: fused CPU path, emulated CUDA kernels (forward and backward) and the op on
//! a CUDA device (`cuda_*`, see `super::executors`) against the candle reference, error
//! paths and the backward against finite differences.

use super::common::*;
use super::executors::{gather_inject_cuda, on_cuda};
use candle_core::{DType, Device, Result, Tensor, Var};
use r2scp::cap::{
    gather_inject, gather_inject_backward_emulated, gather_inject_emulated, gather_inject_reference,
};

type InjOp = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> r2scp::Result<Tensor>;

fn case_name(seed: u64, c: &InjCase, dtype: DType) -> String {
    format!(
        "seed {seed}: B={} L={} Ls={} D={} k={} {dtype:?}",
        c.b, c.l, c.ls, c.d, c.k
    )
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// `cases` random injections (every dtype, repeated salient rows) against the reference,
/// exactly: the injection is a copy.
fn matches_reference(op: InjOp, what: &str, cases: u64) -> Result<()> {
    for seed in 0..cases {
        let dtype = DTYPES[(seed % 3) as usize];
        let c = inj_case(seed, dtype)?;
        let name = format!("{what} {}", case_name(seed, &c, dtype));
        let got = op(&c.h, &c.src, &c.noise, &c.sal)?;
        let want = gather_inject_reference(&c.h, &c.src, &c.noise, &c.sal)?;
        assert_eq!(got.dims(), [c.b, c.l, c.d], "{name}");
        assert_eq!(got.dtype(), dtype, "{name}");
        assert_eq!(
            flat(&got)?,
            flat(&want)?,
            "{name}: injection is a copy and must be exact"
        );
    }
    Ok(())
}

#[test]
fn gather_inject_fused_matches_reference_210_cases() -> Result<()> {
    matches_reference(gather_inject, "fused cpu", 210)
}

#[test]
fn cuda_gather_inject_matches_reference_210_cases() {
    on_cuda("cuda_gather_inject_matches_reference_210_cases", || {
        matches_reference(gather_inject_cuda, "cuda", 210).unwrap()
    });
}

/// Gradients (grad_h, grad_src) of sum(out * grad) through `op`, as f32 values.
fn backward_of(op: InjOp, c: &InjCase, grad: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let hv = Var::from_tensor(&c.h)?;
    let sv = Var::from_tensor(&c.src)?;
    let out = op(hv.as_tensor(), sv.as_tensor(), &c.noise, &c.sal)?;
    let grads = (out.to_dtype(DType::F32)? * grad.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let gh = grads.get(hv.as_tensor()).expect("grad h");
    let gs = grads.get(sv.as_tensor()).expect("grad src");
    Ok((flat(gh)?, flat(gs)?))
}

/// The backward on CUDA against the fused CPU op's backward (held to finite differences
/// below): grad_h is a masked copy and exact; grad_src sums repeated salient rows, whose
/// order of accumulation may differ on the device, so it is held to the dtype's rounding.
#[test]
fn cuda_gather_inject_backward_matches_cpu() {
    on_cuda("cuda_gather_inject_backward_matches_cpu", || {
        for seed in 0..210u64 {
            let dtype = DTYPES[(seed % 3) as usize];
            let c = inj_case(seed, dtype).unwrap();
            let name = format!("cuda {}", case_name(seed, &c, dtype));
            let mut r = rng(9000 + seed);
            let grad = tensor(rand_vec(&mut r, c.b * c.l * c.d), &[c.b, c.l, c.d], dtype).unwrap();
            let (gh, gs) = backward_of(gather_inject_cuda, &c, &grad).unwrap();
            let (wh, ws) = backward_of(gather_inject, &c, &grad).unwrap();
            assert_eq!(gh, wh, "{name}: grad_h");
            let tol = match dtype {
                DType::F32 => 1e-6,
                DType::F16 => 2e-3,
                _ => 1.6e-2,
            };
            for (i, (g, w)) in gs.iter().zip(&ws).enumerate() {
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1.0),
                    "{name}: grad_src[{i}] {g} vs {w}"
                );
            }
        }
    });
}

#[test]
fn emu_gather_inject_kernels_match_reference() -> Result<()> {
    for seed in 0..emu_cases() {
        let dtype = DTYPES[(seed % 3) as usize];
        let c = inj_case(seed, dtype)?;
        let name = format!("emulated {}", case_name(seed, &c, dtype));
        let got = gather_inject_emulated(&c.h, &c.src, &c.noise, &c.sal)?;
        let want = gather_inject_reference(&c.h, &c.src, &c.noise, &c.sal)?;
        assert_eq!(flat(&got)?, flat(&want)?, "{name}: forward");
        // backward: against the fused CPU op's autograd (itself checked against finite
        // differences and the reference's autograd below)
        let mut r = rng(9000 + seed);
        let grad = tensor(rand_vec(&mut r, c.b * c.l * c.d), &[c.b, c.l, c.d], dtype)?;
        let (gh, gs) = gather_inject_backward_emulated(&grad, &c.src, &c.noise, &c.sal)?;
        let (wh, ws) = backward_of(gather_inject, &c, &grad)?;
        assert_eq!(flat(&gh)?, wh, "{name}: grad_h");
        let diff = max_abs_diff(&flat(&gs)?, &ws);
        assert!(diff == 0.0, "{name}: grad_src differs by {diff}");
    }
    Ok(())
}

#[test]
fn gather_inject_errors() {
    error_cases(gather_inject);
    error_cases(gather_inject_reference);
}

#[test]
fn cuda_gather_inject_errors() {
    on_cuda("cuda_gather_inject_errors", || {
        error_cases(gather_inject_cuda)
    });
}

/// Every input error names the offending value or index.
fn error_cases(f: InjOp) {
    let h = zeros(&[2, 5, 4], DType::F32);
    let s = zeros(&[2, 3, 4], DType::F32);
    let ok = u32s(vec![0, 1, 2, 3], (2, 2));
    let sal = u32s(vec![0, 2, 1, 1], (2, 2));
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

#[test]
fn gather_inject_backward_matches_finite_differences() -> Result<()> {
    let mut r = rng(77);
    let (b, l, ls, d) = (2, 6, 4, 5);
    let hv = rand64(&mut r, b * l * d);
    let sv = rand64(&mut r, b * ls * d);
    let w = tensor64(rand64(&mut r, b * l * d), &[b, l, d])?;
    // row 0 injects source row 2 twice (duplicates accumulate)
    let noise = Tensor::from_vec(vec![4u32, 1, 3, 0, 5, 2], (b, 3), &Device::Cpu)?;
    let sal = Tensor::from_vec(vec![2u32, 2, 0, 3, 1, 3], (b, 3), &Device::Cpu)?;
    let loss = |h: &Tensor, s: &Tensor, reference: bool| -> Result<Tensor> {
        let out = if reference {
            gather_inject_reference(h, s, &noise, &sal)?
        } else {
            gather_inject(h, s, &noise, &sal)?
        };
        (out * &w)?.sum_all()
    };
    let h = Var::from_tensor(&tensor64(hv.clone(), &[b, l, d])?)?;
    let s = Var::from_tensor(&tensor64(sv.clone(), &[b, ls, d])?)?;
    let grads = loss(h.as_tensor(), s.as_tensor(), false)?.backward()?;
    let (gh, gs) = (grad_vec(&grads, &h)?, grad_vec(&grads, &s)?);
    let rgrads = loss(h.as_tensor(), s.as_tensor(), true)?.backward()?;
    assert_eq!(gh, grad_vec(&rgrads, &h)?, "dh vs reference autograd");
    assert_close(&gs, &grad_vec(&rgrads, &s)?, "dsrc vs reference autograd");
    let fh = fd(&hv, &(0..hv.len()).collect::<Vec<_>>(), &|x| {
        scalar(&loss(
            &tensor64(x.to_vec(), &[b, l, d])?,
            s.as_tensor(),
            false,
        )?)
    })?;
    assert_close(&gh, &fh, "dh");
    let fs = fd(&sv, &(0..sv.len()).collect::<Vec<_>>(), &|x| {
        scalar(&loss(
            h.as_tensor(),
            &tensor64(x.to_vec(), &[b, ls, d])?,
            false,
        )?)
    })?;
    assert_close(&gs, &fs, "dsrc");
    // explicit contract: noise rows of dh are zero; source row 2 of batch 0 gets rows 4 + 1
    let wv = w.to_vec3::<f64>()?;
    let gh3 = grads.get(h.as_tensor()).expect("dh").to_vec3::<f64>()?;
    let gs3 = grads.get(s.as_tensor()).expect("dsrc").to_vec3::<f64>()?;
    assert!(gh3[0][4]
        .iter()
        .chain(&gh3[0][1])
        .chain(&gh3[1][2])
        .all(|&x| x == 0.0));
    assert_eq!(gh3[0][0], wv[0][0]);
    for c in 0..d {
        assert!((gs3[0][2][c] - (wv[0][4][c] + wv[0][1][c])).abs() < 1e-12);
        assert_eq!(gs3[0][1][c], 0.0);
    }
    Ok(())
}

/// The kernels' 16-byte and element paths: h, src and the output gradient start 0..4 elements
/// into their storage (16-byte aligned and not: both occur, checked), D = 64 (16-byte rows in
/// every dtype; several vectors per lane) and D = 37; forward exact against the reference,
/// backward exact against the fused CPU op.
#[test]
fn emu_gather_inject_vector_paths_and_offsets() -> Result<()> {
    let (b, l, ls, k) = (2, 11, 6, 4);
    let mut r = rng(31);
    let noise = u32s(vec![3, 0, 10, 7, 1, 2, 9, 5], (b, k));
    let sal = u32s(vec![5, 5, 0, 2, 1, 4, 1, 3], (b, k)); // repeats: the scatter sums
    for dtype in DTYPES {
        let mut seen = [false; 2];
        for (d, offsets) in [(64usize, 0..4usize), (37, 1..2)] {
            for off in offsets {
                let c = InjCase {
                    b,
                    l,
                    ls,
                    d,
                    k,
                    h: at_offset(&rand_vec(&mut r, b * l * d), off, &[b, l, d], dtype)?,
                    src: at_offset(&rand_vec(&mut r, b * ls * d), off, &[b, ls, d], dtype)?,
                    noise: noise.clone(),
                    sal: sal.clone(),
                };
                seen[aligned16(&c.h) as usize] = true;
                let name = format!("emulated {dtype:?} D={d} offset {off}");
                let got = gather_inject_emulated(&c.h, &c.src, &c.noise, &c.sal)?;
                let want = gather_inject_reference(&c.h, &c.src, &c.noise, &c.sal)?;
                assert_eq!(flat(&got)?, flat(&want)?, "{name}: forward");
                let grad = at_offset(&rand_vec(&mut r, b * l * d), off, &[b, l, d], dtype)?;
                let (gh, gs) = gather_inject_backward_emulated(&grad, &c.src, &c.noise, &c.sal)?;
                let (wh, ws) = backward_of(gather_inject, &c, &grad)?;
                assert_eq!(flat(&gh)?, wh, "{name}: grad_h");
                assert_eq!(flat(&gs)?, ws, "{name}: grad_src");
            }
        }
        assert_eq!(
            seen,
            [true, true],
            "{dtype:?}: offsets 0..4 gave one alignment only"
        );
    }
    Ok(())
}
