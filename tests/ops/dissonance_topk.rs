//! dissonance_topk: fused CPU path, emulated CUDA kernel and the op on a CUDA device
//! (`cuda_*`, see `super::executors`) against the candle reference, error paths and the
//! backward.

use super::common::*;
use super::executors::{dissonance_topk_cuda, on_cuda};
use candle_core::{DType, Device, Result, Tensor, Var};
use r2scp::cap::{
    dissonance_topk, dissonance_topk_emulated, dissonance_topk_reference, Context, Dissonance,
};

type DisOp = fn(&Tensor, Context, usize) -> r2scp::Result<Dissonance>;

/// `cases` random problems (ragged shapes, every dtype, masks, anchors, ties, zero rows,
/// non-contiguous P) against the reference.
fn matches_reference(op: DisOp, what: &str, cases: u64) -> Result<()> {
    for seed in 0..cases {
        let c = dis_case(seed)?;
        let name = format!("{what} {}", c.name(seed));
        let out = op(&c.p, c.ctx(), c.k)?;
        check_dissonance(&c, &name, &out.delta, &out.noise_idx, &out.noise_mask)?;
    }
    Ok(())
}

#[test]
fn dissonance_fused_matches_reference_210_cases() -> Result<()> {
    matches_reference(dissonance_topk, "fused cpu", 210)
}

#[test]
fn emu_dissonance_kernel_matches_reference() -> Result<()> {
    matches_reference(dissonance_topk_emulated, "emulated", emu_cases())
}

#[test]
fn cuda_dissonance_matches_reference_210_cases() {
    on_cuda("cuda_dissonance_matches_reference_210_cases", || {
        matches_reference(dissonance_topk_cuda, "cuda", 210).unwrap()
    });
}

#[test]
fn dissonance_empty_context_row_gives_delta_one() -> Result<()> {
    empty_context_row_gives_delta_one(dissonance_topk, "fused cpu")
}

#[test]
fn emu_dissonance_empty_context_row_gives_delta_one() -> Result<()> {
    empty_context_row_gives_delta_one(dissonance_topk_emulated, "emulated")
}

#[test]
fn cuda_dissonance_empty_context_row_gives_delta_one() {
    on_cuda("cuda_dissonance_empty_context_row_gives_delta_one", || {
        empty_context_row_gives_delta_one(dissonance_topk_cuda, "cuda").unwrap()
    });
}

/// A row whose mask has no valid token pools to g = 0 and scores delta = 1 everywhere; the
/// masked mean equals the mean of the valid tokens given as an anchor.
fn empty_context_row_gives_delta_one(op: DisOp, what: &str) -> Result<()> {
    let mut r = rng(7);
    let (b, l, la, d) = (2, 6, 4, 5);
    let p = tensor(rand_vec(&mut r, b * l * d), &[b, l, d], DType::F32)?;
    let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], DType::F32)?;
    let mask = Tensor::from_vec(
        vec![0f32, 0., 0., 0., 1., 0., 1., 1.],
        (b, la),
        &Device::Cpu,
    )?;
    let out = op(
        &p,
        Context::Tokens {
            h_avl: &h,
            mask: Some(&mask),
        },
        3,
    )?;
    let dv = to_f32_rows(&out.delta)?;
    assert!(dv[0].iter().all(|&x| x == 1.0), "{what}: {:?}", dv[0]);
    assert_eq!(to_u32_rows(&out.noise_idx)?[0], vec![0, 1, 2], "{what}");
    // the masked mean ignores padded tokens: equal to the mean of the valid ones as anchor
    let valid = Tensor::cat(
        &[h.get(1)?.get(0)?.unsqueeze(0)?, h.get(1)?.narrow(0, 2, 2)?],
        0,
    )?;
    let g1 = valid.mean(0)?;
    let anchor = Tensor::stack(&[g1.clone(), g1], 0)?;
    let via_anchor = op(&p, Context::Anchor(&anchor), 3)?;
    let diff = max_abs_diff(&dv[1], &to_f32_rows(&via_anchor.delta)?[1]);
    assert!(
        diff < 1e-6,
        "{what}: masked mean differs from the anchor path by {diff}"
    );
    Ok(())
}

#[test]
fn dissonance_streams_several_tiles() -> Result<()> {
    streams_several_tiles(dissonance_topk, "fused cpu")
}

#[test]
fn emu_dissonance_kernel_streams_several_tiles() -> Result<()> {
    streams_several_tiles(dissonance_topk_emulated, "emulated")
}

#[test]
fn cuda_dissonance_streams_several_tiles() {
    on_cuda("cuda_dissonance_streams_several_tiles", || {
        streams_several_tiles(dissonance_topk_cuda, "cuda").unwrap()
    });
}

/// L > the kernel's largest tile: the running list absorbs several tiles; k up to 1024,
/// more than one tile's worth of ties.
fn streams_several_tiles(op: DisOp, what: &str) -> Result<()> {
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
        let out = op(
            &c.p,
            Context::Tokens {
                h_avl: &h,
                mask: None,
            },
            k,
        )?;
        check_dissonance(
            &c,
            &format!("{what}: tiles k={k}"),
            &out.delta,
            &out.noise_idx,
            &out.noise_mask,
        )?;
    }
    Ok(())
}

#[test]
fn dissonance_errors() {
    error_cases(dissonance_topk);
    error_cases(dissonance_topk_reference);
}

#[test]
fn cuda_dissonance_errors() {
    on_cuda("cuda_dissonance_errors", || {
        error_cases(dissonance_topk_cuda)
    });
}

/// Every input error names the offending value.
fn error_cases(f: DisOp) {
    let p = zeros(&[2, 5, 4], DType::F32);
    let h = zeros(&[2, 3, 4], DType::F32);
    let tok = Context::Tokens {
        h_avl: &h,
        mask: None,
    };
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

const GRAD_MODES: [&str; 4] = ["tokens", "masked", "masked_u8", "anchor"];

/// One gradient problem of the backward tests: P [2, 5, 7], the context (tokens [2, 4, 7]
/// with or without a mask, or an anchor [2, 7]), k = 2, and the loss sum(delta * w).
struct GradCase {
    dims: (usize, usize, usize, usize, usize),
    pv: Vec<f64>,
    cv: Vec<f64>,
    ctx_shape: Vec<usize>,
    wv: Vec<f64>,
    mask: Option<Tensor>,
    anchor: bool,
}

fn grad_case(case: usize, mode: &str) -> Result<GradCase> {
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
    let mask = match mode {
        "masked" => Some(mask_f.clone()),
        "masked_u8" => Some(mask_f.to_dtype(DType::U8)?),
        _ => None,
    };
    let anchor = mode == "anchor";
    Ok(GradCase {
        dims: (b, l, la, d, k),
        pv,
        cv: if anchor { av } else { hv },
        ctx_shape: if anchor { vec![b, d] } else { vec![b, la, d] },
        wv,
        mask,
        anchor,
    })
}

impl GradCase {
    /// sum(delta * w) of `op` at P = `p`, context = `c` (tensors of dtype `dt`).
    fn loss(&self, op: DisOp, p: &Tensor, c: &Tensor) -> Result<Tensor> {
        let (b, l, _, _, k) = self.dims;
        let ctx = if self.anchor {
            Context::Anchor(c)
        } else {
            Context::Tokens {
                h_avl: c,
                mask: self.mask.as_ref(),
            }
        };
        let out = op(p, ctx, k)?;
        assert_eq!(out.delta.dtype(), p.dtype());
        let w = tensor64(self.wv.clone(), &[b, l])?.to_dtype(p.dtype())?;
        (out.delta * w)?.sum_all()
    }

    fn p_shape(&self) -> [usize; 3] {
        let (b, l, _, d, _) = self.dims;
        [b, l, d]
    }

    /// Gradients (dP, dctx) of the loss through `op` with inputs in `dt`, as f64, and the
    /// context gradient as [B, La, D] rows (tokens modes).
    fn grads(&self, op: DisOp, dt: DType) -> Result<(Vec<f64>, Vec<f64>)> {
        let p = Var::from_tensor(&tensor64(self.pv.clone(), &self.p_shape())?.to_dtype(dt)?)?;
        let c = Var::from_tensor(&tensor64(self.cv.clone(), &self.ctx_shape)?.to_dtype(dt)?)?;
        let grads = self.loss(op, p.as_tensor(), c.as_tensor())?.backward()?;
        let as64 = |v: &Var| -> Result<Vec<f64>> {
            match grads.get(v.as_tensor()) {
                Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>(),
                None => Ok(vec![0.0; v.elem_count()]),
            }
        };
        Ok((as64(&p)?, as64(&c)?))
    }

    /// Padded tokens (mask 0 at [0, 1] and [1, 3]) get no gradient.
    fn check_padded_zero(&self, gc: &[f64], what: &str) {
        let (_, _, la, d, _) = self.dims;
        for (bi, t) in [(0, 1), (1, 3)] {
            let row = &gc[(bi * la + t) * d..(bi * la + t + 1) * d];
            assert!(
                row.iter().all(|&x| x == 0.0),
                "{what}: padded token gradient"
            );
        }
    }
}

#[test]
fn dissonance_backward_matches_finite_differences() -> Result<()> {
    for (case, mode) in GRAD_MODES.iter().enumerate() {
        let g = grad_case(case, mode)?;
        let (gp, gc) = g.grads(dissonance_topk, DType::F64)?;
        // against candle's autograd through the reference
        let (rp, rc) = g.grads(dissonance_topk_reference, DType::F64)?;
        assert_close(&gp, &rp, &format!("{mode}: dP vs reference autograd"));
        assert_close(&gc, &rc, &format!("{mode}: dctx vs reference autograd"));
        // against finite differences
        let at = |pv: &[f64], cv: &[f64]| -> Result<f64> {
            scalar(&g.loss(
                dissonance_topk,
                &tensor64(pv.to_vec(), &g.p_shape())?,
                &tensor64(cv.to_vec(), &g.ctx_shape)?,
            )?)
        };
        let all_p: Vec<usize> = (0..g.pv.len()).collect();
        let fp = fd(&g.pv, &all_p, &|x| at(x, &g.cv))?;
        assert_close(&gp, &fp, &format!("{mode}: dP"));
        let all_c: Vec<usize> = (0..g.cv.len()).collect();
        let fc = fd(&g.cv, &all_c, &|x| at(&g.pv, x))?;
        assert_close(&gc, &fc, &format!("{mode}: dctx"));
        if *mode == "masked" {
            g.check_padded_zero(&gc, mode);
        }
    }
    Ok(())
}

/// The backward on CUDA (f32: the kernels have no f64) against the fused CPU op's f32
/// backward (itself held to finite differences in f64 above) and the reference's autograd.
#[test]
fn cuda_dissonance_backward_matches_cpu() {
    on_cuda("cuda_dissonance_backward_matches_cpu", || {
        for (case, mode) in GRAD_MODES.iter().enumerate() {
            let g = grad_case(case, mode).unwrap();
            let (gp, gc) = g.grads(dissonance_topk_cuda, DType::F32).unwrap();
            let (fp, fc) = g.grads(dissonance_topk, DType::F32).unwrap();
            let (rp, rc) = g.grads(dissonance_topk_reference, DType::F32).unwrap();
            assert_close_f32(&gp, &fp, &format!("{mode}: dP vs fused cpu"));
            assert_close_f32(&gc, &fc, &format!("{mode}: dctx vs fused cpu"));
            assert_close_f32(&gp, &rp, &format!("{mode}: dP vs reference autograd"));
            assert_close_f32(&gc, &rc, &format!("{mode}: dctx vs reference autograd"));
            if *mode == "masked" {
                g.check_padded_zero(&gc, mode);
            }
        }
    });
}

#[test]
fn dissonance_vector_paths_and_offsets() -> Result<()> {
    vector_paths_and_offsets(dissonance_topk, "fused cpu")
}

#[test]
fn emu_dissonance_vector_paths_and_offsets() -> Result<()> {
    vector_paths_and_offsets(dissonance_topk_emulated, "emulated")
}

#[test]
fn cuda_dissonance_vector_paths_and_offsets() {
    on_cuda("cuda_dissonance_vector_paths_and_offsets", || {
        vector_paths_and_offsets(dissonance_topk_cuda, "cuda").unwrap()
    });
}

/// The kernels' two load paths and both selections: P and the context start 0..4 elements
/// into their storage (16-byte aligned and not: both occur, checked), D = 64 (16-byte rows in
/// every dtype) and D = 37 (never), L = 45 (several blocks per batch row), exact duplicate
/// rows (ties) and a zero row, masked tokens and anchors, k = 5 (one-warp selection) and
/// k = 40 (block selection); against the reference.
fn vector_paths_and_offsets(op: DisOp, what: &str) -> Result<()> {
    let (b, l, la) = (3, 45, 7);
    let mut r = rng(4242);
    for dtype in DTYPES {
        let mut seen = [false; 2];
        for (d, offsets) in [(64usize, 0..4usize), (37, 1..2)] {
            for off in offsets {
                let mut pv = rand_vec(&mut r, b * l * d);
                for (src, dst) in [(3, 17), (3, 30), (40, 2)] {
                    let row: Vec<f32> = pv[src * d..(src + 1) * d].to_vec();
                    pv[dst * d..(dst + 1) * d].copy_from_slice(&row);
                }
                pv[(l + 9) * d..(l + 10) * d].fill(0.0);
                let p = at_offset(&pv, off, &[b, l, d], dtype)?;
                let h = at_offset(&rand_vec(&mut r, b * la * d), off, &[b, la, d], dtype)?;
                let anchor = at_offset(&rand_vec(&mut r, b * d), off, &[b, d], dtype)?;
                seen[aligned16(&p) as usize] = true;
                let mask: Vec<f32> = (0..b * la).map(|i| (i % 3 != 1) as u8 as f32).collect();
                let mask = Tensor::from_vec(mask, (b, la), &Device::Cpu)?;
                for (use_anchor, k) in [(false, 5), (true, 40), (false, 40), (true, 5)] {
                    let c = DisCase {
                        b,
                        l,
                        la,
                        d,
                        k,
                        dtype,
                        p: p.clone(),
                        h: h.clone(),
                        anchor: anchor.clone(),
                        mask: Some(mask.clone()),
                        use_anchor,
                    };
                    let out = op(&c.p, c.ctx(), k)?;
                    let name =
                        format!("{what}: {dtype:?} D={d} offset {off} anchor={use_anchor} k={k}");
                    check_dissonance(&c, &name, &out.delta, &out.noise_idx, &out.noise_mask)?;
                }
            }
        }
        assert_eq!(
            seen,
            [true, true],
            "{what}: {dtype:?}: offsets 0..4 gave one alignment only"
        );
    }
    Ok(())
}

/// The op's NaN policy: a NaN delta is an error naming the first (batch row, token).
fn nan_is_an_error(op: DisOp, name: &str) -> Result<()> {
    let (b, l, la, d) = (2, 6, 3, 4);
    let mut r = rng(91);
    let mut pv = rand_vec(&mut r, b * l * d);
    pv[(l + 4) * d + 1] = f32::NAN; // batch row 1, token 4
    pv[(l + 5) * d] = f32::INFINITY; // batch row 1, token 5
    let p = tensor(pv, &[b, l, d], DType::F32)?;
    let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], DType::F32)?;
    let ctx = Context::Tokens {
        h_avl: &h,
        mask: None,
    };
    for k in [1, l] {
        let e = op(&p, ctx, k).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{name}: NaN delta at batch row 1, token 4 (a NaN or infinite value in P or the context); NaN has no rank")
        );
    }
    // an infinite anchor makes every delta of its row NaN
    let mut gv = rand_vec(&mut r, b * d);
    gv[2] = f32::NEG_INFINITY; // batch row 0
    let g = tensor(gv, &[b, d], DType::F32)?;
    let p = tensor(rand_vec(&mut r, b * l * d), &[b, l, d], DType::F32)?;
    let e = op(&p, Context::Anchor(&g), 2).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{name}: NaN delta at batch row 0, token 0 ")),
        "{e}"
    );
    Ok(())
}

#[test]
fn dissonance_nan_is_an_error() -> Result<()> {
    nan_is_an_error(dissonance_topk, "dissonance_topk")?;
    nan_is_an_error(dissonance_topk_reference, "dissonance_topk_reference")
}

#[test]
fn cuda_dissonance_nan_is_an_error() {
    on_cuda("cuda_dissonance_nan_is_an_error", || {
        nan_is_an_error(dissonance_topk_cuda, "dissonance_topk").unwrap()
    });
}

#[test]
fn emu_dissonance_nan_rows_rank_last() -> Result<()> {
    nan_rows_rank_last(dissonance_topk_emulated, "emulated")
}

/// In the kernel (before the op's NaN check), rows of P holding a NaN get delta NaN and rank
/// after every number (RankLast), in both selections (L = 20, k = L: one warp; L = 40, k = L:
/// the block) and across the blocks of a row; the other deltas match the fused CPU path (run
/// with those rows zeroed, so it passes the NaN check) and the order is exact on the kernel's
/// own deltas.
fn nan_rows_rank_last(op: DisOp, what: &str) -> Result<()> {
    let (b, la, d) = (2, 3, 16);
    for l in [20usize, 40] {
        let mut r = rng(77 + l as u64);
        let mut pv = rand_vec(&mut r, b * l * d);
        pv[3 * d + 5] = f32::NAN;
        pv[11 * d] = f32::NAN;
        pv[(l + 1) * d + 2] = f32::NAN;
        let p = tensor(pv, &[b, l, d], DType::F32)?;
        let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], DType::F32)?;
        let ctx = Context::Tokens {
            h_avl: &h,
            mask: None,
        };
        let out = op(&p, ctx, l)?;
        let mut clean = p.flatten_all()?.to_vec1::<f32>()?;
        for row in clean.chunks_mut(d) {
            if row.iter().any(|x| x.is_nan()) {
                row.fill(0.0);
            }
        }
        let p_clean = tensor(clean, &[b, l, d], DType::F32)?;
        let cpu = dissonance_topk(&p_clean, ctx, l)?;
        let (dv, cv) = (to_f32_rows(&out.delta)?, to_f32_rows(&cpu.delta)?);
        let iv = to_u32_rows(&out.noise_idx)?;
        for bi in 0..b {
            for (x, y) in dv[bi].iter().zip(&cv[bi]) {
                assert!(
                    x.is_nan() || (x - y).abs() <= 2e-5,
                    "{what}: L={l} row {bi}: delta {x} vs fused cpu {y}"
                );
            }
            let nan_rows = dv[bi].iter().filter(|x| x.is_nan()).count();
            assert_eq!(
                nan_rows,
                if bi == 0 { 2 } else { 1 },
                "{what}: L={l} row {bi}"
            );
            assert_eq!(iv[bi], nan_last_topk(&dv[bi], l), "{what}: L={l} row {bi}");
        }
        assert_eq!(
            &iv[0][l - 2..],
            &[3, 11],
            "{what}: L={l}: NaN rows last, by index"
        );
        assert_eq!(iv[1][l - 1], 1, "{what}: L={l}: NaN row last");
    }
    Ok(())
}
