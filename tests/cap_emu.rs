//! The CAP CUDA kernels (kernels/dissonance_topk.cu, kernels/gather_inject.cu) run through
//! the CPU emulation of the CUDA execution model, with the shipped launch plans, against the
//! plain-candle references over seeded random cases.

mod cap_common;

use candle_core::{DType, Device, Result, Tensor, Var};
use cap_common::*;
use r2scp::cap::emu::{
    dissonance_topk_emulated, gather_inject_backward_emulated, gather_inject_emulated,
    topk_rows_emulated,
};
use r2scp::cap::{gather_inject, gather_inject_reference, topk_rows_reference, Context};
use rand::Rng;

/// Random cases per test: 210, or `R2SCP_EMU_CASES` (CI trims it for the ThreadSanitizer run;
/// the plain `cargo test` runs the full count).
fn cases() -> u64 {
    std::env::var("R2SCP_EMU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(210)
}

#[test]
fn emu_dissonance_kernel_matches_reference() -> Result<()> {
    for seed in 0..cases() {
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
fn emu_topk_rows_kernel_matches_reference() -> Result<()> {
    for seed in 0..cases() {
        let mut r = rng(7000 + seed);
        let b = r.random_range(1..=6usize);
        let l = if seed % 10 == 0 {
            r.random_range(1000..=2100usize)
        } else {
            r.random_range(1..=200usize)
        };
        let k = r.random_range(1..=l.min(1024));
        let levels = if seed % 2 == 0 { 4.0 } else { 1000.0 };
        let mut v: Vec<f32> = (0..b * l)
            .map(|_| (r.random_range(0.0f32..1.0) * levels).floor() / levels)
            .collect();
        if seed % 5 == 0 {
            v[r.random_range(0..b * l)] = f32::NAN;
            v[r.random_range(0..b * l)] = f32::NEG_INFINITY;
        }
        let s = Tensor::from_vec(v.clone(), (b, l), &Device::Cpu)?;
        let (val, idx) = topk_rows_emulated(&s, k)?;
        let (fval, fidx) = r2scp::cap::topk_rows(&s, k)?;
        let iv = to_u32_rows(&idx)?;
        assert_eq!(iv, to_u32_rows(&fidx)?, "seed {seed}: kernel vs fused CPU");
        let vv = val.to_vec2::<f32>()?;
        let fv = fval.to_vec2::<f32>()?;
        for bi in 0..b {
            for j in 0..k {
                assert!(
                    vv[bi][j] == fv[bi][j] || (vv[bi][j].is_nan() && fv[bi][j].is_nan()),
                    "seed {seed}"
                );
            }
            if seed % 5 != 0 {
                assert_eq!(
                    iv[bi],
                    exact_topk(&v[bi * l..(bi + 1) * l], k),
                    "seed {seed} row {bi}"
                );
            }
        }
        if seed % 5 != 0 {
            let (_, ridx) = topk_rows_reference(&s, k)?;
            assert_eq!(iv, to_u32_rows(&ridx)?, "seed {seed}: kernel vs reference");
        }
    }
    Ok(())
}

#[test]
fn emu_gather_inject_kernels_match_reference() -> Result<()> {
    for seed in 0..cases() {
        let dtype = DTYPES[(seed % 3) as usize];
        let c = inj_case(seed, dtype)?;
        let name = format!(
            "seed {seed}: B={} L={} Ls={} D={} k={} {dtype:?}",
            c.b, c.l, c.ls, c.d, c.k
        );
        let got = gather_inject_emulated(&c.h, &c.src, &c.noise, &c.sal)?;
        let want = gather_inject_reference(&c.h, &c.src, &c.noise, &c.sal)?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        assert_eq!(flat(&got)?, flat(&want)?, "{name}: forward");
        // backward: against the fused CPU op's autograd (itself checked against finite
        // differences and the reference's autograd in tests/cap_grad.rs)
        let mut r = rng(9000 + seed);
        let grad = tensor(rand_vec(&mut r, c.b * c.l * c.d), &[c.b, c.l, c.d], dtype)?;
        let (gh, gs) = gather_inject_backward_emulated(&grad, &c.src, &c.noise, &c.sal)?;
        let hv = Var::from_tensor(&c.h)?;
        let sv = Var::from_tensor(&c.src)?;
        let out = gather_inject(hv.as_tensor(), sv.as_tensor(), &c.noise, &c.sal)?;
        let grads = (out.to_dtype(DType::F32)? * grad.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let wh = grads.get(hv.as_tensor()).expect("grad h");
        let ws = grads.get(sv.as_tensor()).expect("grad src");
        assert_eq!(flat(&gh)?, flat(wh)?, "{name}: grad_h");
        let diff = max_abs_diff(&flat(&gs)?, &flat(ws)?);
        assert!(diff == 0.0, "{name}: grad_src differs by {diff}");
    }
    Ok(())
}
