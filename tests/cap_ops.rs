//! Fused CPU CAP ops against their plain-candle references over seeded random cases.

mod cap_common;

use candle_core::{DType, Device, Result, Tensor};
use cap_common::*;
use r2scp::cap::{
    dissonance_topk, gather_inject, gather_inject_reference, topk_rows, topk_rows_reference,
    Context,
};
use rand::Rng;

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
fn topk_ignores_nan_until_numbers_run_out() -> Result<()> {
    let s = Tensor::from_vec(
        vec![0.5f32, f32::NAN, 0.7, 0.5, f32::NAN],
        (1, 5),
        &Device::Cpu,
    )?;
    let (v, i) = topk_rows(&s, 5)?;
    assert_eq!(to_u32_rows(&i)?[0], vec![2, 0, 3, 1, 4]);
    let v = v.to_vec2::<f32>()?;
    assert_eq!(&v[0][..3], &[0.7, 0.5, 0.5]);
    assert!(v[0][3].is_nan() && v[0][4].is_nan());
    Ok(())
}

#[test]
fn gather_inject_fused_matches_reference_210_cases() -> Result<()> {
    for seed in 0..210u64 {
        let dtype = DTYPES[(seed % 3) as usize];
        let c = inj_case(seed, dtype)?;
        let name = format!(
            "seed {seed}: B={} L={} Ls={} D={} k={} {dtype:?}",
            c.b, c.l, c.ls, c.d, c.k
        );
        let got = gather_inject(&c.h, &c.src, &c.noise, &c.sal)?;
        let want = gather_inject_reference(&c.h, &c.src, &c.noise, &c.sal)?;
        assert_eq!(got.dims(), [c.b, c.l, c.d], "{name}");
        assert_eq!(got.dtype(), dtype, "{name}");
        let (g, w) = (
            got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(g, w, "{name}: injection is a copy and must be exact");
    }
    Ok(())
}

#[test]
fn topk_rows_matches_reference_210_cases() -> Result<()> {
    for seed in 0..210u64 {
        let mut r = rng(5000 + seed);
        let b = r.random_range(1..=70usize);
        let l = r.random_range(1..=200usize);
        let k = r.random_range(1..=l);
        // coarse values so that ties are frequent
        let levels = if seed % 2 == 0 { 4.0 } else { 1000.0 };
        let v: Vec<f32> = (0..b * l)
            .map(|_| (r.random_range(0.0f32..1.0) * levels).floor() / levels)
            .collect();
        let s = Tensor::from_vec(v.clone(), (b, l), &Device::Cpu)?;
        let (val, idx) = topk_rows(&s, k)?;
        let (rval, ridx) = topk_rows_reference(&s, k)?;
        let (iv, riv) = (to_u32_rows(&idx)?, to_u32_rows(&ridx)?);
        let (vv, rvv) = (to_f32_rows(&val)?, to_f32_rows(&rval)?);
        for bi in 0..b {
            let want = exact_topk(&v[bi * l..(bi + 1) * l], k);
            assert_eq!(iv[bi], want, "seed {seed} row {bi}");
            assert_eq!(riv[bi], want, "seed {seed} row {bi}: reference");
            assert_eq!(vv[bi], rvv[bi], "seed {seed} row {bi}: values");
        }
    }
    Ok(())
}
