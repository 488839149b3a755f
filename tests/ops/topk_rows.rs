//! topk_rows: fused CPU path and emulated CUDA kernel against the candle reference and an
//! exact top-k, NaN ordering and error paths.

use super::common::*;
use candle_core::{DType, Device, Result, Tensor};
use r2scp::cap::{topk_rows, topk_rows_emulated, topk_rows_reference};
use rand::Rng;

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

#[test]
fn emu_topk_rows_kernel_matches_reference() -> Result<()> {
    for seed in 0..emu_cases() {
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
fn reference_ranks_nan_last_like_the_fused_op() -> Result<()> {
    let s = Tensor::from_vec(
        vec![0.5f32, f32::NAN, 0.7, f32::NEG_INFINITY, f32::NAN, 0.5],
        (1, 6),
        &Device::Cpu,
    )?;
    let (_, fused) = topk_rows(&s, 6)?;
    let (_, reference) = topk_rows_reference(&s, 6)?;
    assert_eq!(to_u32_rows(&fused)?[0], vec![2, 0, 5, 1, 3, 4]);
    assert_eq!(to_u32_rows(&reference)?, to_u32_rows(&fused)?);
    Ok(())
}
