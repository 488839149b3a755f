//! CapLayer behaviour: fused ops vs reference ops give the same layer output, padded tokens
//! are never selected, half-precision layers run.

mod cap_common;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cap_common::*;
use r2scp::cap::{CapConfig, CapLayer};

fn inputs(seed: u64, b: usize, dims: [usize; 4], d: usize, dt: DType) -> Result<Vec<Tensor>> {
    let mut r = rng(seed);
    dims.iter()
        .map(|&n| tensor(rand_vec(&mut r, b * n * d), &[b, n, d], dt))
        .collect()
}

#[test]
fn fused_and_reference_layers_agree() -> Result<()> {
    for (seed, dt) in [(1u64, DType::F32), (2, DType::F32), (3, DType::F64)] {
        let (b, l, la, lc, lq, d) = (3, 9, 5, 8, 4, 16);
        let x = inputs(seed, b, [l, la, lc, lq], d, dt)?;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dt, &Device::Cpu);
        let cfg = CapConfig {
            dim: d,
            heads: 4,
            k: 3,
        };
        let fused = CapLayer::new(&cfg, vb.clone())?;
        let reference = CapLayer::new(&cfg, vb)?.with_reference_ops(true);
        let cm = Tensor::from_vec(
            (0..b * lc)
                .map(|i| {
                    if i % lc < lc - 2 || i / lc == 0 {
                        1f32
                    } else {
                        0.0
                    }
                })
                .collect(),
            (b, lc),
            &Device::Cpu,
        )?;
        let run =
            |layer: &CapLayer| layer.forward(&x[0], &x[1], None, &x[2], Some(&cm), &x[3], None);
        let (a, r) = (run(&fused)?, run(&reference)?);
        assert_eq!(
            to_u32_rows(&a.noise_idx)?,
            to_u32_rows(&r.noise_idx)?,
            "seed {seed}"
        );
        assert_eq!(
            to_u32_rows(&a.salient_idx)?,
            to_u32_rows(&r.salient_idx)?,
            "seed {seed}"
        );
        let diff = (a.purified.to_dtype(DType::F64)? - r.purified.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(
            diff < 1e-5,
            "seed {seed} {dt:?}: purified differs by {diff}"
        );
        assert_eq!(a.saliency.dims(), [b, lc]);
        // padded H_com tokens (the last two of rows 1 and 2) are never salient
        let sal = to_u32_rows(&a.salient_idx)?;
        for (bi, row) in sal.iter().enumerate().skip(1) {
            assert!(
                row.iter().all(|&s| (s as usize) < lc - 2),
                "row {bi}: {row:?}"
            );
        }
        let sv = to_f32_rows(&a.saliency)?;
        assert_eq!(&sv[1][lc - 2..], &[0.0, 0.0]);
        assert!(sv[0].iter().all(|&v| v > 0.0));
    }
    Ok(())
}

#[test]
fn purified_rows_are_injected_guided_rows() -> Result<()> {
    // Rows outside the noise set are H_miss unchanged; the layer output has the input dtype.
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (b, l, la, lc, lq, d) = (2, 7, 4, 6, 3, 8);
        let x = inputs(5, b, [l, la, lc, lq], d, dt)?;
        let vm = VarMap::new();
        let layer = CapLayer::new(
            &CapConfig {
                dim: d,
                heads: 2,
                k: 2,
            },
            VarBuilder::from_varmap(&vm, dt, &Device::Cpu),
        )?;
        let out = layer.forward(&x[0], &x[1], None, &x[2], None, &x[3], None)?;
        assert_eq!(out.purified.dtype(), dt);
        assert_eq!(out.delta.dtype(), DType::F32);
        let p = out.purified.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let h = x[0].to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let noise = to_u32_rows(&out.noise_idx)?;
        for bi in 0..b {
            for i in 0..l {
                if noise[bi].contains(&(i as u32)) {
                    assert!(p[bi][i].iter().all(|v| v.is_finite()));
                } else {
                    assert_eq!(p[bi][i], h[bi][i], "{dt:?} row {bi},{i} changed");
                }
            }
        }
    }
    Ok(())
}
