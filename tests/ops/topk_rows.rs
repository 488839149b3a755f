//! topk_rows: fused CPU path, emulated CUDA kernel and the op on a CUDA device (`cuda_*`,
//! see `super::executors`) against the candle reference and an exact top-k, the NaN policy
//! (the op refuses NaN; the kernel alone ranks it as -inf) and error paths.

use super::common::*;
use super::executors::{on_cuda, topk_rows_cuda};
use candle_core::{DType, Device, Result, Tensor};
use r2scp::cap::{topk_rows, topk_rows_emulated, topk_rows_reference};
use rand::Rng;

type RowsOp = fn(&Tensor, usize) -> r2scp::Result<(Tensor, Tensor)>;

/// The kernel alone ranks NaN as -inf: numbers first (ties to the lower index), then the
/// NaNs by index, so its output is deterministic before the op's NaN check.
fn ignores_nan_until_numbers_run_out(op: RowsOp, what: &str) -> Result<()> {
    let s = Tensor::from_vec(
        vec![0.5f32, f32::NAN, 0.7, 0.5, f32::NAN],
        (1, 5),
        &Device::Cpu,
    )?;
    let (v, i) = op(&s, 5)?;
    assert_eq!(to_u32_rows(&i)?[0], vec![2, 0, 3, 1, 4], "{what}");
    let v = v.to_vec2::<f32>()?;
    assert_eq!(&v[0][..3], &[0.7, 0.5, 0.5], "{what}");
    assert!(v[0][3].is_nan() && v[0][4].is_nan(), "{what}");
    Ok(())
}

#[test]
fn emu_topk_ignores_nan_until_numbers_run_out() -> Result<()> {
    ignores_nan_until_numbers_run_out(topk_rows_emulated, "emulated")
}

/// The op's NaN policy: a NaN score is an error naming the first one (row-major), whatever
/// k, even when k would not reach it; -inf is a number.
fn nan_is_an_error(op: RowsOp, name: &str) -> Result<()> {
    let s = Tensor::from_vec(
        vec![
            0.5f32,
            0.1,
            f32::NEG_INFINITY,
            0.7,
            f32::NAN,
            0.5,
            f32::NAN,
            0.2,
        ],
        (2, 4),
        &Device::Cpu,
    )?;
    for k in [1, 4] {
        let e = op(&s, k).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{name}: NaN score at row 1, column 0; NaN has no rank")
        );
    }
    let (_, i) = op(&s.narrow(0, 0, 1)?, 3)?; // the row with -inf and no NaN
    assert_eq!(to_u32_rows(&i)?[0], vec![3, 0, 1]);
    Ok(())
}

#[test]
fn topk_rows_nan_is_an_error() -> Result<()> {
    nan_is_an_error(topk_rows, "topk_rows")?;
    nan_is_an_error(topk_rows_reference, "topk_rows_reference")
}

#[test]
fn cuda_topk_rows_nan_is_an_error() {
    on_cuda("cuda_topk_rows_nan_is_an_error", || {
        nan_is_an_error(topk_rows_cuda, "topk_rows").unwrap()
    });
}

#[test]
fn topk_rows_matches_reference_210_cases() -> Result<()> {
    matches_reference(topk_rows, "fused cpu")
}

#[test]
fn cuda_topk_rows_matches_reference_210_cases() {
    on_cuda("cuda_topk_rows_matches_reference_210_cases", || {
        matches_reference(topk_rows_cuda, "cuda").unwrap()
    });
}

/// 210 random score matrices with frequent ties: indices exact, values equal to the
/// reference's.
fn matches_reference(op: RowsOp, what: &str) -> Result<()> {
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
        let (val, idx) = op(&s, k)?;
        let (rval, ridx) = topk_rows_reference(&s, k)?;
        let (iv, riv) = (to_u32_rows(&idx)?, to_u32_rows(&ridx)?);
        let (vv, rvv) = (to_f32_rows(&val)?, to_f32_rows(&rval)?);
        for bi in 0..b {
            let want = exact_topk(&v[bi * l..(bi + 1) * l], k);
            assert_eq!(iv[bi], want, "{what}: seed {seed} row {bi}");
            assert_eq!(riv[bi], want, "seed {seed} row {bi}: reference");
            assert_eq!(vv[bi], rvv[bi], "{what}: seed {seed} row {bi}: values");
        }
    }
    Ok(())
}

#[test]
fn emu_topk_rows_kernel_matches_reference() -> Result<()> {
    long_rows_and_nan(topk_rows_emulated, "emulated", emu_cases(), false)
}

#[test]
fn cuda_topk_rows_long_rows_and_nan() {
    on_cuda("cuda_topk_rows_long_rows_and_nan", || {
        long_rows_and_nan(topk_rows_cuda, "cuda", 210, true).unwrap()
    });
}

/// `cases` random rows, every tenth longer than the kernel's largest tile (1000-2100 columns,
/// k up to 1024), every fifth with a NaN and a -inf: against an exact top-k with NaN ranked
/// as -inf (`nan_errors` false: the kernel alone) or the op's NaN error (`nan_errors`
/// true), and where there is no NaN against the fused CPU path and the reference.
fn long_rows_and_nan(op: RowsOp, what: &str, cases: u64, nan_errors: bool) -> Result<()> {
    for seed in 0..cases {
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
        let first_nan = v.iter().position(|x| x.is_nan());
        if let (true, Some(p)) = (nan_errors, first_nan) {
            let e = op(&s, k).unwrap_err().to_string();
            let want = format!(
                "topk_rows: NaN score at row {}, column {}; NaN has no rank",
                p / l,
                p % l
            );
            assert_eq!(e, want, "{what}: seed {seed}");
            continue;
        }
        let (val, idx) = op(&s, k)?;
        let iv = to_u32_rows(&idx)?;
        let vv = val.to_vec2::<f32>()?;
        for bi in 0..b {
            let row = &v[bi * l..(bi + 1) * l];
            assert_eq!(
                iv[bi],
                nan_last_topk(row, k),
                "{what}: seed {seed} row {bi}"
            );
            for (j, &i) in iv[bi].iter().enumerate() {
                assert_eq!(
                    vv[bi][j].to_bits(),
                    row[i as usize].to_bits(),
                    "{what}: seed {seed} row {bi}"
                );
            }
        }
        if first_nan.is_none() {
            let (_, fidx) = topk_rows(&s, k)?;
            assert_eq!(iv, to_u32_rows(&fidx)?, "{what}: seed {seed}: vs fused CPU");
            let (_, ridx) = topk_rows_reference(&s, k)?;
            assert_eq!(iv, to_u32_rows(&ridx)?, "{what}: seed {seed}: vs reference");
        }
    }
    Ok(())
}

#[test]
fn topk_rows_errors() {
    error_cases(topk_rows);
    error_cases(topk_rows_reference);
}

#[test]
fn cuda_topk_rows_errors() {
    on_cuda("cuda_topk_rows_errors", || error_cases(topk_rows_cuda));
}

fn error_cases(f: RowsOp) {
    let s = zeros(&[3, 4], DType::F32);
    expect_err(f(&s, 0), "k = 0");
    expect_err(f(&s, 5), "k = 5 exceeds the L = 4");
    expect_err(f(&zeros(&[3], DType::F32), 1), "rank 2");
    expect_err(f(&zeros(&[3, 4], DType::U32), 1), "dtype U32");
}

#[test]
fn topk_rows_signed_zeros_and_infinities() -> Result<()> {
    signed_zeros_and_infinities(topk_rows, "fused cpu", false)
}

#[test]
fn emu_topk_rows_signed_zeros_and_infinities() -> Result<()> {
    signed_zeros_and_infinities(topk_rows_emulated, "emulated", true)
}

#[test]
fn cuda_topk_rows_signed_zeros_and_infinities() {
    on_cuda("cuda_topk_rows_signed_zeros_and_infinities", || {
        signed_zeros_and_infinities(topk_rows_cuda, "cuda", false).unwrap()
    });
}

/// The kernels' order (`r2_better`): -0 and +0 tie (lower index first), +inf first, -inf
/// before NaN, across several register slots of the one-warp top-k (L = 256, its longest row,
/// and L = 70) and in the block top-k (L = 257); 3 and 5 rows (the last block's second warp
/// idle). The fused CPU path sorts its result with `Scored::rank_cmp`, which must tie them too.
/// `with_nan` false puts -1 where the NaNs were, for the op (which refuses NaN).
fn signed_zeros_and_infinities(op: RowsOp, what: &str, with_nan: bool) -> Result<()> {
    for (l, b) in [(70usize, 3usize), (256, 5), (257, 3)] {
        let mut v = vec![0f32; b * l];
        for (i, x) in v.iter_mut().enumerate() {
            let c = i % l;
            *x = match c % 7 {
                0 => -0.0,
                1 => 0.0,
                2 if with_nan => f32::NAN,
                2 => -1.0,
                3 => f32::NEG_INFINITY,
                4 => (c as f32 * 0.37).sin(),
                5 => -1e-30,
                _ => 1e-30,
            };
        }
        v[l - 1] = f32::INFINITY;
        let s = Tensor::from_vec(v.clone(), (b, l), &Device::Cpu)?;
        for k in [1, 7, 32, l] {
            let (val, idx) = op(&s, k)?;
            let iv = to_u32_rows(&idx)?;
            let vv = val.to_vec2::<f32>()?;
            for bi in 0..b {
                let row = &v[bi * l..(bi + 1) * l];
                assert_eq!(
                    iv[bi],
                    nan_last_topk(row, k),
                    "{what}: L={l} k={k} row {bi}"
                );
                for (j, &i) in iv[bi].iter().enumerate() {
                    let (got, want) = (vv[bi][j], row[i as usize]);
                    assert!(
                        got.to_bits() == want.to_bits(),
                        "{what}: L={l} k={k} row {bi}: value {got} at {i}, score {want}"
                    );
                }
            }
        }
    }
    Ok(())
}
