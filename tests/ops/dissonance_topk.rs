//! dissonance_topk: fused CPU path and emulated CUDA kernel against the candle reference,
//! error paths and the backward.

use super::common::*;
use candle_core::{DType, Device, Result, Tensor, Var};
use r2scp::cap::{dissonance_topk, dissonance_topk_emulated, dissonance_topk_reference, Context};

#[test]
fn dissonance_fused_matches_reference_210_cases() -> Result<()> {
    for seed in 0..210u64 {
        let c = dis_case(seed)?;
        let name = c.name(seed);
        let out = dissonance_topk(&c.p, c.ctx(), c.k)?;
        check_dissonance(&c, &name, &out.delta, &out.noise_idx, &out.noise_mask)?;
    }
    Ok(())
}

#[test]
fn dissonance_empty_context_row_gives_delta_one() -> Result<()> {
    let mut r = rng(7);
    let (b, l, la, d) = (2, 6, 4, 5);
    let p = tensor(rand_vec(&mut r, b * l * d), &[b, l, d], DType::F32)?;
    let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], DType::F32)?;
    let mask = Tensor::from_vec(
        vec![0f32, 0., 0., 0., 1., 0., 1., 1.],
        (b, la),
        &Device::Cpu,
    )?;
    let out = dissonance_topk(
        &p,
        Context::Tokens {
            h_avl: &h,
            mask: Some(&mask),
        },
        3,
    )?;
    let dv = to_f32_rows(&out.delta)?;
    assert!(dv[0].iter().all(|&x| x == 1.0), "{:?}", dv[0]);
    assert_eq!(to_u32_rows(&out.noise_idx)?[0], vec![0, 1, 2]);
    // the masked mean ignores padded tokens: equal to the mean of the valid ones as anchor
    let valid = Tensor::cat(
        &[h.get(1)?.get(0)?.unsqueeze(0)?, h.get(1)?.narrow(0, 2, 2)?],
        0,
    )?;
    let g1 = valid.mean(0)?;
    let anchor = Tensor::stack(&[g1.clone(), g1], 0)?;
    let via_anchor = dissonance_topk(&p, Context::Anchor(&anchor), 3)?;
    let diff = max_abs_diff(&dv[1], &to_f32_rows(&via_anchor.delta)?[1]);
    assert!(
        diff < 1e-6,
        "masked mean differs from the anchor path by {diff}"
    );
    Ok(())
}

#[test]
fn emu_dissonance_kernel_matches_reference() -> Result<()> {
    for seed in 0..emu_cases() {
        let c = dis_case(seed)?;
        let name = format!("emulated {}", c.name(seed));
        let out = dissonance_topk_emulated(&c.p, c.ctx(), c.k)?;
        check_dissonance(&c, &name, &out.delta, &out.noise_idx, &out.noise_mask)?;
    }
    Ok(())
}

#[test]
fn emu_dissonance_kernel_streams_several_tiles() -> Result<()> {
    // L > MAX_TILE: the running list absorbs several tiles; k > one tile's worth of ties.
    let mut r = rng(99);
    let (b, l, la, d) = (2, 2500, 3, 9);
    let mut pv = rand_vec(&mut r, b * l * d);
    for i in (0..l).step_by(7) {
        let row: Vec<f32> = pv[0..d].to_vec();
        pv[i * d..(i + 1) * d].copy_from_slice(&row); // many exact ties with row 0
    }
    let p = tensor(pv, &[b, l, d], DType::F32)?;
    let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], DType::F32)?;
    for k in [1, 5, 700, 1024] {
        let c = DisCase {
            b,
            l,
            la,
            d,
            k,
            dtype: DType::F32,
            p: p.clone(),
            h: h.clone(),
            anchor: h.get_on_dim(1, 0)?,
            mask: None,
            use_anchor: false,
        };
        let out = dissonance_topk_emulated(
            &c.p,
            Context::Tokens {
                h_avl: &h,
                mask: None,
            },
            k,
        )?;
        check_dissonance(
            &c,
            &format!("tiles k={k}"),
            &out.delta,
            &out.noise_idx,
            &out.noise_mask,
        )?;
    }
    Ok(())
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
fn dissonance_backward_matches_finite_differences() -> Result<()> {
    for (case, mode) in ["tokens", "masked", "masked_u8", "anchor"]
        .iter()
        .enumerate()
    {
        let mut r = rng(40 + case as u64);
        let (b, l, la, d, k) = (2, 5, 4, 7, 2);
        let pv = rand64(&mut r, b * l * d);
        let hv = rand64(&mut r, b * la * d);
        let av = rand64(&mut r, b * d);
        let wv = rand64(&mut r, b * l);
        let mask_f = Tensor::from_vec(
            vec![1f32, 0., 1., 1., 0., 1., 1., 0.],
            (b, la),
            &Device::Cpu,
        )?;
        let mask = match *mode {
            "masked" => Some(mask_f.clone()),
            "masked_u8" => Some(mask_f.to_dtype(DType::U8)?),
            _ => None,
        };
        let w = tensor64(wv, &[b, l])?;
        let anchor_mode = *mode == "anchor";
        let ctx_shape: Vec<usize> = if anchor_mode {
            vec![b, d]
        } else {
            vec![b, la, d]
        };
        let cv = if anchor_mode { av } else { hv };
        let loss = |p: &Tensor, c: &Tensor, reference: bool| -> Result<Tensor> {
            let ctx = if anchor_mode {
                Context::Anchor(c)
            } else {
                Context::Tokens {
                    h_avl: c,
                    mask: mask.as_ref(),
                }
            };
            let out = if reference {
                dissonance_topk_reference(p, ctx, k)?
            } else {
                dissonance_topk(p, ctx, k)?
            };
            assert_eq!(out.delta.dtype(), DType::F64);
            (out.delta * &w)?.sum_all()
        };
        let p = Var::from_tensor(&tensor64(pv.clone(), &[b, l, d])?)?;
        let c = Var::from_tensor(&tensor64(cv.clone(), &ctx_shape)?)?;
        let grads = loss(p.as_tensor(), c.as_tensor(), false)?.backward()?;
        let (gp, gc) = (grad_vec(&grads, &p)?, grad_vec(&grads, &c)?);
        // against candle's autograd through the reference
        let rgrads = loss(p.as_tensor(), c.as_tensor(), true)?.backward()?;
        assert_close(
            &gp,
            &grad_vec(&rgrads, &p)?,
            &format!("{mode}: dP vs reference autograd"),
        );
        assert_close(
            &gc,
            &grad_vec(&rgrads, &c)?,
            &format!("{mode}: dctx vs reference autograd"),
        );
        // against finite differences
        let all_p: Vec<usize> = (0..pv.len()).collect();
        let fp = fd(&pv, &all_p, &|x| {
            scalar(&loss(
                &tensor64(x.to_vec(), &[b, l, d])?,
                c.as_tensor(),
                false,
            )?)
        })?;
        assert_close(&gp, &fp, &format!("{mode}: dP"));
        let all_c: Vec<usize> = (0..cv.len()).collect();
        let fc = fd(&cv, &all_c, &|x| {
            scalar(&loss(
                p.as_tensor(),
                &tensor64(x.to_vec(), &ctx_shape)?,
                false,
            )?)
        })?;
        assert_close(&gc, &fc, &format!("{mode}: dctx"));
        if *mode == "masked" {
            // padded tokens get no gradient
            let g = grads
                .get(c.as_tensor())
                .expect("context gradient")
                .to_vec3::<f64>()?;
            assert!(g[0][1].iter().chain(&g[1][3]).all(|&x| x == 0.0));
        }
    }
    Ok(())
}
