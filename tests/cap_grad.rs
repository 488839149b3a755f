//! Finite-difference gradient checks (f64, CPU) of the CAP ops and of CapLayer.

mod cap_common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use cap_common::*;
use r2scp::cap::{
    dissonance_topk, dissonance_topk_reference, gather_inject, gather_inject_reference, CapConfig,
    CapLayer, Context,
};
use rand::Rng;

const FD_EPS: f64 = 1e-6;

fn rand64(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-1.0f64..1.0)).collect()
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Central differences of `f` at `x` for the coordinates in `which`.
fn fd(x: &[f64], which: &[usize], f: &dyn Fn(&[f64]) -> Result<f64>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(which.len());
    let mut y = x.to_vec();
    for &i in which {
        y[i] = x[i] + FD_EPS;
        let fp = f(&y)?;
        y[i] = x[i] - FD_EPS;
        let fm = f(&y)?;
        y[i] = x[i];
        out.push((fp - fm) / (2.0 * FD_EPS));
    }
    Ok(out)
}

fn assert_close(analytic: &[f64], numeric: &[f64], what: &str) {
    assert_eq!(analytic.len(), numeric.len(), "{what}");
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let tol = 1e-6 + 1e-5 * n.abs().max(a.abs());
        assert!(
            (a - n).abs() <= tol,
            "{what}[{i}]: analytic {a} vs finite difference {n}"
        );
    }
}

fn grad_vec(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Vec<f64>> {
    match grads.get(v.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>(),
        None => Ok(vec![0.0; v.elem_count()]),
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
