//! CapLayer behaviour: fused ops vs reference ops give the same layer output, padded tokens
//! are never selected, half-precision layers run; its error paths; its backward against
//! finite differences and the straight-through gate that trains `W_proj`.

#[path = "ops/common.rs"]
#[allow(dead_code)]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use common::*;
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

struct LayerFixture {
    varmap: VarMap,
    layer: CapLayer,
    h_miss: Tensor,
    h_avl: Tensor,
    avl_mask: Tensor,
    h_com: Tensor,
    com_mask: Tensor,
    q: Tensor,
    q_mask: Tensor,
    w: Tensor,
}

fn fixture(seed: u64, dtype: DType, straight_through: bool) -> Result<LayerFixture> {
    let mut r = rng(seed);
    let (b, l, la, lc, lq, d) = (2, 6, 5, 7, 4, 8);
    let cfg = CapConfig {
        dim: d,
        heads: 2,
        k: 2,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let layer = CapLayer::new(&cfg, vb.pp("cap"))?.with_straight_through(straight_through);
    let t = |r: &mut rand_chacha::ChaCha8Rng, s: &[usize]| -> Result<Tensor> {
        tensor64(rand64(r, s.iter().product()), s)?.to_dtype(dtype)
    };
    let mask = |v: Vec<f32>, n: usize| Tensor::from_vec(v, (b, n), &Device::Cpu);
    Ok(LayerFixture {
        h_miss: t(&mut r, &[b, l, d])?,
        h_avl: t(&mut r, &[b, la, d])?,
        avl_mask: mask(vec![1., 1., 0., 1., 1., 1., 0., 1., 1., 1.], la)?,
        h_com: t(&mut r, &[b, lc, d])?,
        com_mask: mask(
            vec![1., 1., 1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 1., 1.],
            lc,
        )?,
        q: t(&mut r, &[b, lq, d])?,
        q_mask: mask(vec![1., 1., 1., 0., 1., 1., 0., 0.], lq)?,
        w: t(&mut r, &[b, l, d])?,
        varmap,
        layer,
    })
}

impl LayerFixture {
    fn loss(&self, h_miss: &Tensor, h_com: &Tensor, q: &Tensor) -> Result<Tensor> {
        let out = self.layer.forward(
            h_miss,
            &self.h_avl,
            Some(&self.avl_mask),
            h_com,
            Some(&self.com_mask),
            q,
            Some(&self.q_mask),
        )?;
        (out.purified * &self.w)?.sum_all()
    }
}

#[test]
fn cap_layer_backward_matches_finite_differences() -> Result<()> {
    let f = fixture(9, DType::F64, false)?;
    let hm = Var::from_tensor(&f.h_miss)?;
    let hc = Var::from_tensor(&f.h_com)?;
    let qv = Var::from_tensor(&f.q)?;
    let grads = f
        .loss(hm.as_tensor(), hc.as_tensor(), qv.as_tensor())?
        .backward()?;
    // inputs
    let shape = |t: &Tensor| t.dims().to_vec();
    for (name, var) in [("h_miss", &hm), ("h_com", &hc), ("q", &qv)] {
        let x = var.flatten_all()?.to_vec1::<f64>()?;
        let which: Vec<usize> = (0..x.len()).step_by(3).collect();
        let s = shape(var.as_tensor());
        let numeric = fd(&x, &which, &|y| {
            let t = tensor64(y.to_vec(), &s)?;
            let (a, b, c) = match name {
                "h_miss" => (t, f.h_com.clone(), f.q.clone()),
                "h_com" => (f.h_miss.clone(), t, f.q.clone()),
                _ => (f.h_miss.clone(), f.h_com.clone(), t),
            };
            scalar(&f.loss(&a, &b, &c)?)
        })?;
        let g = grad_vec(&grads, var)?;
        let analytic: Vec<f64> = which.iter().map(|&i| g[i]).collect();
        assert_close(&analytic, &numeric, name);
        assert!(
            analytic.iter().any(|&v| v != 0.0),
            "{name}: all-zero gradient"
        );
    }
    // parameters: every variable, a few entries each
    let vars: Vec<(String, Var)> = {
        let data = f.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(
        vars.len(),
        1 + 8 * 2 + 4,
        "w_proj + 8 linears (w, b) + 2 norms (w, b)"
    );
    let loss_now = || scalar(&f.loss(&f.h_miss, &f.h_com, &f.q)?);
    let grads = f.loss(&f.h_miss, &f.h_com, &f.q)?.backward()?;
    for (name, var) in &vars {
        let orig = var.as_tensor().copy()?;
        let x = orig.flatten_all()?.to_vec1::<f64>()?;
        let which: Vec<usize> = (0..x.len()).step_by((x.len() / 5).max(1)).collect();
        let s = orig.dims().to_vec();
        let numeric = fd(&x, &which, &|y| {
            var.set(&tensor64(y.to_vec(), &s)?)?;
            loss_now()
        })?;
        var.set(&orig)?;
        let g = grad_vec(&grads, var)?;
        let analytic: Vec<f64> = which.iter().map(|&i| g[i]).collect();
        assert_close(&analytic, &numeric, name);
    }
    Ok(())
}

#[test]
fn straight_through_gate_trains_w_proj() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        let f = fixture(11, dtype, true)?;
        let w_proj = {
            let data = f.varmap.data().lock().expect("varmap lock");
            data.get("cap.w_proj.weight")
                .expect("cap.w_proj.weight")
                .clone()
        };
        // the straight-through term is exactly zero in value (same variables, gate off)
        let mut plain = fixture(11, dtype, false)?;
        plain.layer = CapLayer::new(
            &CapConfig {
                dim: 8,
                heads: 2,
                k: 2,
            },
            VarBuilder::from_varmap(&f.varmap, dtype, &Device::Cpu).pp("cap"),
        )?
        .with_straight_through(false);
        let a = f.layer.forward(
            &f.h_miss,
            &f.h_avl,
            Some(&f.avl_mask),
            &f.h_com,
            Some(&f.com_mask),
            &f.q,
            Some(&f.q_mask),
        )?;
        let bq = plain.layer.forward(
            &f.h_miss,
            &f.h_avl,
            Some(&f.avl_mask),
            &f.h_com,
            Some(&f.com_mask),
            &f.q,
            Some(&f.q_mask),
        )?;
        let diff = (a.purified - bq.purified)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert_eq!(
            diff, 0.0,
            "{dtype:?}: straight-through term changed the forward value"
        );

        let grads = f.loss(&f.h_miss, &f.h_com, &f.q)?.backward()?;
        let g = grads
            .get(w_proj.as_tensor())
            .expect("W_proj has a gradient");
        let gmax = g
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!(gmax > 0.0, "{dtype:?}: W_proj gradient is zero");
        // without the gate, W_proj gets none
        let g_off = plain.loss(&f.h_miss, &f.h_com, &f.q)?.backward()?;
        let off = g_off
            .get(w_proj.as_tensor())
            .map(|g| g.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
            .transpose()?;
        assert!(
            off.unwrap_or(0.0) == 0.0,
            "{dtype:?}: W_proj gradient without the gate: {off:?}"
        );

        let before = w_proj.as_tensor().copy()?;
        let mut opt = SGD::new(f.varmap.all_vars(), 0.1)?;
        for _ in 0..3 {
            let loss = f.loss(&f.h_miss, &f.h_com, &f.q)?;
            opt.backward_step(&loss)?;
        }
        let moved = (w_proj.as_tensor() - before)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!(
            moved > 0.0,
            "{dtype:?}: three SGD steps did not move W_proj"
        );
    }
    Ok(())
}
