//! CapLayer behaviour: fused ops vs reference ops give the same layer output, padded tokens
//! are never selected, half-precision layers run; its error paths and NaN policy; its
//! generic face (a sequence against another sequence, a pooled vector or itself, the
//! `Module` form) against the paper's four-input form; its backward against finite
//! differences, the straight-through gate that trains `W_proj`, detached scoring and the
//! residual gate.

#[path = "ops/common.rs"]
#[allow(dead_code)]
mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use common::*;
use r2scp::cap::{
    dissonance_topk, CapConfig, CapContext, CapLayer, CapOutput, Context, PaperInputs,
};

/// The paper form with every input and mask spelled out.
#[allow(clippy::too_many_arguments)]
fn paper(
    layer: &CapLayer,
    h_miss: &Tensor,
    h_avl: &Tensor,
    avl_mask: Option<&Tensor>,
    h_com: &Tensor,
    com_mask: Option<&Tensor>,
    q: &Tensor,
    q_mask: Option<&Tensor>,
) -> Result<CapOutput> {
    layer.forward_paper(&PaperInputs {
        h_miss,
        h_avl,
        avl_mask,
        h_com,
        com_mask,
        q,
        q_mask,
    })
}

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
        let cfg = CapConfig::new(d, 4, 3);
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
            |layer: &CapLayer| paper(layer, &x[0], &x[1], None, &x[2], Some(&cm), &x[3], None);
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
            &CapConfig::new(d, 2, 2),
            VarBuilder::from_varmap(&vm, dt, &Device::Cpu),
        )?;
        let out = paper(&layer, &x[0], &x[1], None, &x[2], None, &x[3], None)?;
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
        CapLayer::new(&CapConfig::new(6, 4, 2), vb.pp("a")),
        "heads = 4 must divide dim = 6",
    );
    expect_err(CapLayer::new(&CapConfig::new(8, 2, 0), vb.pp("b")), "k = 0");
    let layer = CapLayer::new(&CapConfig::new(8, 2, 3), vb.pp("c"))?;
    let t = |s: &[usize]| zeros(s, DType::F32);
    let (hm, ha, hc, q) = (t(&[2, 5, 8]), t(&[2, 4, 8]), t(&[2, 6, 8]), t(&[2, 3, 8]));
    expect_err(
        paper(&layer, &hm, &ha, None, &t(&[2, 2, 8]), None, &q, None),
        "k = 3 exceeds the Lc = 2",
    );
    expect_err(
        paper(&layer, &t(&[2, 2, 8]), &ha, None, &hc, None, &q, None),
        "k = 3 exceeds the L = 2",
    );
    expect_err(
        paper(&layer, &hm, &ha, None, &hc, None, &t(&[2, 3, 7]), None),
        "the question has feature dim 7",
    );
    expect_err(
        paper(&layer, &hm, &ha, None, &hc, None, &t(&[1, 3, 8]), None),
        "the question has batch size 1",
    );
    expect_err(
        paper(&layer, &hm, &ha, None, &hc, Some(&t(&[2, 5])), &q, None),
        "context mask has shape [2, 5]",
    );
    expect_err(
        paper(&layer, &hm, &ha, None, &hc, None, &q, Some(&t(&[2, 4]))),
        "question mask has shape [2, 4]",
    );
    expect_err(
        paper(&layer, &hm, &ha, Some(&t(&[2, 5])), &hc, None, &q, None),
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
    let cfg = CapConfig::new(d, 2, 2);
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
        let out = paper(
            &self.layer,
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
            &CapConfig::new(8, 2, 2),
            VarBuilder::from_varmap(&f.varmap, dtype, &Device::Cpu).pp("cap"),
        )?
        .with_straight_through(false);
        let a = paper(
            &f.layer,
            &f.h_miss,
            &f.h_avl,
            Some(&f.avl_mask),
            &f.h_com,
            Some(&f.com_mask),
            &f.q,
            Some(&f.q_mask),
        )?;
        let bq = paper(
            &plain.layer,
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

/// Runs `f` on a fresh f64 layer (D = 8, 2 heads, k = 2) built from `cfg`.
fn layer64(cfg: CapConfig, vm: &VarMap) -> Result<CapLayer> {
    CapLayer::new(
        &cfg,
        VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu).pp("cap"),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()
}

#[test]
fn generic_face_matches_the_paper_form() -> Result<()> {
    // A sequence against a token context with a question is the paper form with
    // h_avl = h_com = the context.
    let (b, l, lc, lq, d) = (3, 7, 5, 4, 8);
    let x = inputs(21, b, [l, lc, lq, 1], d, DType::F64)?;
    let vm = VarMap::new();
    let layer = layer64(CapConfig::new(d, 2, 2), &vm)?;
    let cm = Tensor::from_vec(
        vec![1f32, 1., 1., 0., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0.],
        (b, lc),
        &Device::Cpu,
    )?;
    let g = layer.purify(
        &x[0],
        None,
        CapContext::Tokens {
            tokens: &x[1],
            mask: Some(&cm),
        },
        Some((&x[2], None)),
    )?;
    let p = paper(
        &layer,
        &x[0],
        &x[1],
        Some(&cm),
        &x[1],
        Some(&cm),
        &x[2],
        None,
    )?;
    assert_eq!(to_u32_rows(&g.noise_idx)?, to_u32_rows(&p.noise_idx)?);
    assert_eq!(to_u32_rows(&g.salient_idx)?, to_u32_rows(&p.salient_idx)?);
    assert_eq!(max_abs_diff(&g.purified, &p.purified)?, 0.0);
    // padded context tokens are never the source of a replacement
    for (bi, row) in to_u32_rows(&g.salient_idx)?.iter().enumerate() {
        assert!(
            !((bi == 0 && row.contains(&3)) || (bi == 2 && row.contains(&4))),
            "row {bi}: {row:?}"
        );
    }
    Ok(())
}

#[test]
fn self_purification_is_the_module_forward_and_never_copies_noise() -> Result<()> {
    let (b, l, d) = (4, 9, 8);
    let x = inputs(22, b, [l, 1, 1, 1], d, DType::F64)?;
    let vm = VarMap::new();
    let layer = layer64(CapConfig::new(d, 2, 3), &vm)?;
    let out = layer.purify(&x[0], None, CapContext::Own, None)?;
    assert_eq!(max_abs_diff(&layer.forward(&x[0])?, &out.purified)?, 0.0);
    // the anchor is the sequence's own mean: W_proj = 0 at init, so P = x
    let own = dissonance_topk(&x[0], Context::Anchor(&x[0].mean(1)?), 3)?;
    assert_eq!(to_u32_rows(&own.noise_idx)?, to_u32_rows(&out.noise_idx)?);
    let noise = to_u32_rows(&out.noise_idx)?;
    let sal = to_u32_rows(&out.salient_idx)?;
    for bi in 0..b {
        assert!(
            sal[bi].iter().all(|s| !noise[bi].contains(s)),
            "row {bi}: salient {:?} among noise {:?}",
            sal[bi],
            noise[bi]
        );
    }
    // a pooled context: noise by that anchor, replacements from the sequence's clean rows
    let g = x[1].mean(1)?;
    let pooled = layer.purify(&x[0], None, CapContext::Pooled(&g), None)?;
    let by_g = dissonance_topk(&x[0], Context::Anchor(&g), 3)?;
    assert_eq!(
        to_u32_rows(&by_g.noise_idx)?,
        to_u32_rows(&pooled.noise_idx)?
    );
    let (pn, ps) = (
        to_u32_rows(&pooled.noise_idx)?,
        to_u32_rows(&pooled.salient_idx)?,
    );
    for bi in 0..b {
        assert!(
            ps[bi].iter().all(|s| !pn[bi].contains(s)),
            "pooled row {bi}"
        );
    }
    // Clone and Debug, as candle-nn layers have
    let copy = layer.clone();
    assert_eq!(max_abs_diff(&copy.forward(&x[0])?, &out.purified)?, 0.0);
    assert!(format!("{copy:?}").contains("CapLayer"));
    Ok(())
}

#[test]
fn padded_sequence_rows_are_never_noise_while_valid_rows_remain() -> Result<()> {
    let (b, l, lc, d) = (2, 6, 4, 8);
    let mut x = inputs(23, b, [l, lc, 1, 1], d, DType::F64)?;
    // make the padded rows (1 and 4 of each sample) the most dissonant
    let far = (x[1].mean_keepdim(1)? * -10.0)?.broadcast_as((b, l, d))?;
    let pad = Tensor::from_vec(
        vec![1f64, 0., 1., 1., 0., 1., 1., 0., 1., 1., 0., 1.],
        (b, l, 1),
        &Device::Cpu,
    )?;
    x[0] = (x[0].broadcast_mul(&pad)? + far.broadcast_mul(&(1.0 - &pad)?)?)?;
    let mask = pad.squeeze(2)?.to_dtype(DType::F32)?;
    let vm = VarMap::new();
    let layer = layer64(CapConfig::new(d, 2, 2), &vm)?;
    let unmasked = layer.purify(&x[0], None, CapContext::tokens(&x[1]), None)?;
    assert_eq!(to_u32_rows(&unmasked.noise_idx)?, vec![vec![1, 4]; 2]);
    let masked = layer.purify(&x[0], Some(&mask), CapContext::tokens(&x[1]), None)?;
    for row in to_u32_rows(&masked.noise_idx)? {
        assert!(row.iter().all(|&i| i != 1 && i != 4), "{row:?}");
    }
    Ok(())
}

#[test]
fn non_finite_inputs_are_errors_naming_the_token() -> Result<()> {
    let (b, l, lc, lq, d) = (2, 5, 4, 3, 8);
    let x = inputs(24, b, [l, lc, lq, 1], d, DType::F32)?;
    let vm = VarMap::new();
    let layer = CapLayer::new(
        &CapConfig::new(d, 2, 2),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    // a NaN in token 3 of row 1 of the sequence
    let poison = |t: &Tensor, row: usize, tok: usize| -> Result<Tensor> {
        let mut v = t.to_vec3::<f32>()?;
        v[row][tok][2] = f32::NAN;
        let dims = t.dims3()?;
        Tensor::from_vec(v.concat().concat(), dims, &Device::Cpu)
    };
    let bad = poison(&x[0], 1, 3)?;
    expect_err(
        paper(&layer, &bad, &x[1], None, &x[1], None, &x[2], None),
        "NaN delta at batch row 1, token 3",
    );
    // in the context: every dissonance of that row is NaN, the first one is named
    let bad = poison(&x[1], 0, 2)?;
    expect_err(
        layer.purify(&x[0], None, CapContext::tokens(&bad), None),
        "NaN delta at batch row 0, token 0",
    );
    // in H_com or the question: the saliency
    expect_err(
        paper(
            &layer,
            &x[0],
            &x[1],
            None,
            &poison(&x[1], 1, 0)?,
            None,
            &x[2],
            None,
        ),
        "saliency of context token",
    );
    expect_err(
        paper(
            &layer,
            &x[0],
            &x[1],
            None,
            &x[1],
            None,
            &poison(&x[2], 0, 1)?,
            None,
        ),
        "saliency of context token",
    );
    // an infinity is caught the same way
    let mut v = x[0].to_vec3::<f32>()?;
    v[0][4][0] = f32::INFINITY;
    let inf = Tensor::from_vec(v.concat().concat(), (b, l, d), &Device::Cpu)?;
    expect_err(
        layer.purify(&inf, None, CapContext::tokens(&x[1]), None),
        "NaN delta at batch row 0, token 4",
    );
    Ok(())
}

#[test]
fn detached_scoring_sends_the_straight_through_gradient_to_w_proj_only() -> Result<()> {
    let f = fixture(12, DType::F64, false)?;
    let grad_of_h_miss = |layer: CapLayer| -> Result<(Vec<f64>, f64)> {
        let hm = Var::from_tensor(&f.h_miss)?;
        let out = paper(
            &layer,
            hm.as_tensor(),
            &f.h_avl,
            Some(&f.avl_mask),
            &f.h_com,
            Some(&f.com_mask),
            &f.q,
            Some(&f.q_mask),
        )?;
        let grads = (out.purified * &f.w)?.sum_all()?.backward()?;
        let w = {
            let data = f.varmap.data().lock().expect("varmap lock");
            data.get("cap.w_proj.weight").expect("w_proj").clone()
        };
        let gw = grads
            .get(w.as_tensor())
            .map(|g| g.abs()?.max_all()?.to_scalar::<f64>())
            .transpose()?
            .unwrap_or(0.0);
        Ok((grad_vec(&grads, &hm)?, gw))
    };
    let build = |cfg: CapConfig| {
        CapLayer::new(
            &cfg,
            VarBuilder::from_varmap(&f.varmap, DType::F64, &Device::Cpu).pp("cap"),
        )
    };
    let base = CapConfig::new(8, 2, 2);
    let (plain, w0) = grad_of_h_miss(build(base.with_straight_through(false))?)?;
    let (detached, w1) = grad_of_h_miss(build(base.with_straight_through(true))?)?;
    let (through, w2) = grad_of_h_miss(build(
        base.with_straight_through(true).with_detach_scoring(false),
    )?)?;
    assert_eq!(w0, 0.0, "no gate, no W_proj gradient");
    assert!(w1 > 0.0 && w2 > 0.0, "the gate trains W_proj: {w1} {w2}");
    assert_eq!(
        plain, detached,
        "detached scoring: h_miss sees no gate gradient"
    );
    let moved = plain
        .iter()
        .zip(&through)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(moved > 0.0, "without detaching, the gate reaches h_miss");
    Ok(())
}

#[test]
fn residual_gate_moves_noise_rows_part_of_the_way() -> Result<()> {
    let (b, l, lc, lq, d) = (2, 6, 5, 3, 8);
    let x = inputs(25, b, [l, lc, lq, 1], d, DType::F64)?;
    let vm = VarMap::new();
    let hard = layer64(CapConfig::new(d, 2, 2), &vm)?;
    let soft = layer64(CapConfig::new(d, 2, 2).with_residual_gate(true), &vm)?;
    assert_eq!(soft.residual_gate()?, Some(0.5));
    assert_eq!(hard.residual_gate()?, None);
    let gate = {
        let data = vm.data().lock().expect("varmap lock");
        data.get("cap.gate").expect("cap.gate").clone()
    };
    gate.set(&Tensor::new(&[1.5f64], &Device::Cpu)?)?;
    let a = 1.0 / (1.0 + (-1.5f64).exp());
    let run = |layer: &CapLayer| paper(layer, &x[0], &x[1], None, &x[1], None, &x[2], None);
    let (h, s) = (run(&hard)?, run(&soft)?);
    assert_eq!(to_u32_rows(&h.noise_idx)?, to_u32_rows(&s.noise_idx)?);
    let want = (&x[0] + ((&h.purified - &x[0])? * a)?)?;
    assert!(max_abs_diff(&s.purified, &want)? < 1e-12);
    // the gate learns: its gradient is <d loss/d out, injected - x> on the noise rows
    let grads = (s.purified * &x[0])?.sum_all()?.backward()?;
    assert!(grads.get(gate.as_tensor()).is_some());
    Ok(())
}
