//! Tests of `r2scp::model`: shapes per missing setting, masking, no leakage of a
//! missing modality, retrieval self-exclusion, ablation switches, gradient flow,
//! ranking terms and config handling. Tiny synthetic data and a tiny model.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use r2scp::data::{
    generate, Batch, DataDims, Missing, MissingPolicy, MissingSim, MissingType, Modality, Splits,
    SyntheticConfig,
};
use r2scp::model::recovery::{RecoveryHead, GATE_STATS, ROUTER_STATS};
use r2scp::model::{
    is_expert_var, Aggregate, Banks, CapAnchor, CapSettings, ForwardOptions, ModelConfig, R2scp,
    RecoveryConfig, RetrievalQuery, EXPERT_PREFIX,
};
use r2scp::nn::{key_bias, masked_mean, Mha};

fn splits() -> Splits {
    generate(&SyntheticConfig {
        seed: 7,
        n_train_clips: 24,
        n_val_clips: 4,
        n_test_clips: 8,
        questions_per_clip: 2,
        ..Default::default()
    })
    .expect("synthetic data")
}

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        dim: 16,
        heads: 2,
        expert_layers: 1,
        text_layers: 1,
        ffn_mult: 2,
        dropout: 0.1,
        n_retrieved: 3,
        k_purge: 2,
        use_retrieval: true,
        use_cap: true,
        com_adapter: true,
        seed: 1,
        // The tests written for the paper's plain retrieval; the safe default has its own.
        recovery: RecoveryConfig::paper(),
        // ... and for the paper's CAP (straight-through gate on).
        cap: CapSettings::paper(),
    }
}

/// `tiny_cfg` with the default (safe) retrieval searching by `query`.
fn safe_cfg(query: RetrievalQuery) -> ModelConfig {
    ModelConfig {
        recovery: RecoveryConfig {
            query,
            ..RecoveryConfig::default()
        },
        ..tiny_cfg()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb + 1e-8)
}

fn set_var(s: &Setup, name: &str, value: &Tensor) {
    let data = s.varmap.data().lock().unwrap();
    data.get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .set(value)
        .unwrap();
}

struct Setup {
    splits: Splits,
    dims: DataDims,
    banks: Banks,
    varmap: VarMap,
    dev: Device,
}

fn setup() -> Setup {
    let splits = splits();
    let dims = splits.dims();
    let dev = Device::Cpu;
    let banks = Banks::from_dataset(&splits.train, &dev).expect("banks");
    Setup {
        splits,
        dims,
        banks,
        varmap: VarMap::new(),
        dev,
    }
}

impl Setup {
    /// A model on the shared VarMap (same names -> same weights for every config).
    fn model(&self, cfg: &ModelConfig) -> R2scp {
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &self.dev);
        R2scp::new(cfg, &self.dims, vb).expect("model")
    }

    fn batch(&self, test: bool, rows: &[usize], policy: MissingPolicy) -> Batch {
        let ds = if test {
            &self.splits.test
        } else {
            &self.splits.train
        };
        ds.batch(rows, &policy, &self.dev).expect("batch")
    }
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("to_vec2")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

fn eval(m: &R2scp, b: &Batch, banks: &Banks) -> Tensor {
    m.forward(b, banks, false).expect("forward").logits
}

/// A copy of `b` where the given rows of modality `m` (features and key) hold large
/// random values instead of zeros.
fn perturb(b: &Batch, m: Modality, rows: &[usize], seed: u64) -> Batch {
    let mut out = b.clone();
    let (x, k) = match m {
        Modality::Audio => (&b.audio, &b.audio_key),
        Modality::Visual => (&b.visual, &b.visual_key),
    };
    let mask: Vec<f32> = (0..b.len())
        .map(|i| if rows.contains(&i) { 1.0 } else { 0.0 })
        .collect();
    let dev = x.device();
    let mask = Tensor::from_vec(mask, b.len(), dev).unwrap();
    let noise = |t: &Tensor, s: u64| -> Tensor {
        // Deterministic pseudo-random values in [-50, 50).
        let n = t.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ s) >> 40;
                (h % 10_000) as f32 / 100.0 - 50.0
            })
            .collect();
        Tensor::from_vec(v, t.shape(), dev).unwrap()
    };
    let mix = |t: &Tensor, s: u64| -> Tensor {
        let mut shape = vec![b.len()];
        shape.extend(std::iter::repeat_n(1, t.rank() - 1));
        let m = mask
            .reshape(shape)
            .unwrap()
            .broadcast_as(t.shape())
            .unwrap();
        let keep = (1.0 - &m).unwrap();
        ((t * &keep).unwrap() + (noise(t, s) * &m).unwrap()).unwrap()
    };
    match m {
        Modality::Audio => {
            out.audio = mix(x, seed);
            out.audio_key = mix(k, seed + 1);
        }
        Modality::Visual => {
            out.visual = mix(x, seed);
            out.visual_key = mix(k, seed + 1);
        }
    }
    out
}

#[test]
fn output_shapes_for_every_missing_setting() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let a = s.dims.n_answers;
    let rows: Vec<usize> = (0..10).collect();
    let policies = [
        MissingPolicy::Complete,
        MissingPolicy::All(Modality::Audio),
        MissingPolicy::All(Modality::Visual),
        MissingPolicy::Simulated(MissingSim {
            rate: 0.6,
            kind: MissingType::Mixed,
            seed: 3,
        }),
    ];
    for p in policies {
        let b = s.batch(true, &rows, p);
        let out = m.forward(&b, &s.banks, false).unwrap();
        assert_eq!(out.logits.dims(), &[10, a], "{p:?}");
        assert_eq!(out.router_weights.dims(), &[10, 3], "{p:?}");
        for row in vec2(&out.router_weights) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "router row sums to {sum}");
            assert!(row.iter().all(|x| *x > 0.0));
        }
        assert!(vec2(&out.logits).iter().flatten().all(|x| x.is_finite()));
        let n_missing = b.missing.iter().filter(|x| **x != Missing::None).count();
        let traced: usize = out.retrieval.iter().map(|t| t.rows.len()).sum();
        assert_eq!(traced, n_missing, "{p:?}: one retrieval per missing sample");
        for t in &out.retrieval {
            assert_eq!(t.indices.dims(), &[t.rows.len(), 3]);
            assert_eq!(t.scores.dims(), &[t.rows.len(), 3]);
            assert!(!t.negative);
        }
        let el = m.expert_logits(&b, false).unwrap();
        for l in [&el.audio, &el.visual, &el.text] {
            assert_eq!(l.dims(), &[10, a]);
        }
        let pa = el.audio_present.to_vec1::<f32>().unwrap();
        let la = vec2(&el.audio);
        for (i, miss) in b.missing.iter().enumerate() {
            assert_eq!(pa[i], if *miss == Missing::Audio { 0.0 } else { 1.0 });
            if *miss == Missing::Audio {
                assert!(
                    la[i].iter().all(|x| *x == 0.0),
                    "missing audio row gets zero logits"
                );
            }
        }
    }
}

#[test]
fn missing_modality_never_leaks_into_forward() {
    let s = setup();
    let rows: Vec<usize> = (0..12).collect();
    for (ret, cap) in [(true, true), (true, false), (false, true), (false, false)] {
        let cfg = ModelConfig {
            use_retrieval: ret,
            use_cap: cap,
            ..tiny_cfg()
        };
        let m = s.model(&cfg);
        for miss in Modality::ALL {
            // Batches of the TRAIN split too (the bank holds those clips).
            for test in [true, false] {
                let b = s.batch(test, &rows, MissingPolicy::All(miss));
                let p = perturb(&b, miss, &rows, 11);
                assert!(
                    max_abs_diff(&b.audio, &p.audio) + max_abs_diff(&b.visual, &p.visual) > 1.0
                );
                let l0 = vec2(&eval(&m, &b, &s.banks));
                let l1 = vec2(&eval(&m, &p, &s.banks));
                assert_eq!(l0, l1, "ret {ret} cap {cap} missing {miss}: logits changed");
                let e0 = m.expert_logits(&b, false).unwrap();
                let e1 = m.expert_logits(&p, false).unwrap();
                assert_eq!(vec2(&e0.text), vec2(&e1.text));
                assert_eq!(vec2(&e0.audio), vec2(&e1.audio));
                assert_eq!(vec2(&e0.visual), vec2(&e1.visual));
            }
        }
        // Mixed batch, where the "missing" rows still hold their REAL features:
        // the result must equal the batch where they are zeroed / perturbed.
        let full = s.batch(false, &rows, MissingPolicy::Complete);
        let mut real = full.clone();
        let audio_rows = [1usize, 4, 7];
        let visual_rows = [2usize, 5, 10];
        for &r in &audio_rows {
            real.missing[r] = Missing::Audio;
        }
        for &r in &visual_rows {
            real.missing[r] = Missing::Visual;
        }
        let noisy = perturb(
            &perturb(&real, Modality::Audio, &audio_rows, 5),
            Modality::Visual,
            &visual_rows,
            9,
        );
        let lr = eval(&m, &real, &s.banks);
        let ln = eval(&m, &noisy, &s.banks);
        assert_eq!(
            vec2(&lr),
            vec2(&ln),
            "ret {ret} cap {cap}: mixed batch leaked"
        );
        // ... and the perturbation does matter when those rows are NOT marked missing.
        let lf = eval(&m, &full, &s.banks);
        let mut noisy_full = noisy.clone();
        noisy_full.missing = full.missing.clone();
        assert!(max_abs_diff(&lf, &eval(&m, &noisy_full, &s.banks)) > 0.0);
    }
}

#[test]
fn retrieval_excludes_the_samples_own_clip() {
    let s = setup();
    // n = every bank row but one: if self-exclusion failed the own clip would be in.
    let n = s.banks.audio.len() - 1;
    let cfg = ModelConfig {
        n_retrieved: n,
        ..tiny_cfg()
    };
    let m = s.model(&cfg);
    let rows: Vec<usize> = (0..16).collect();
    for miss in Modality::ALL {
        let b = s.batch(false, &rows, MissingPolicy::All(miss));
        let out = m
            .forward_with(
                &b,
                &s.banks,
                ForwardOptions {
                    train: false,
                    rank_terms: true,
                },
            )
            .unwrap();
        assert_eq!(out.retrieval.len(), 2, "positive and negative retrieval");
        for t in &out.retrieval {
            assert_eq!(t.modality, miss);
            let bank = s.banks.get(miss);
            let idx = t.indices.to_vec2::<u32>().unwrap();
            for (j, &r) in t.rows.iter().enumerate() {
                let own = b.clip_ids[r];
                assert!(
                    bank.row_of(own).is_some(),
                    "train clip {own} is in the bank"
                );
                let ids: Vec<u32> = idx[j].iter().map(|&i| bank.ids()[i as usize]).collect();
                assert!(!ids.contains(&own), "row {r} retrieved its own clip {own}");
                let mut u = ids.clone();
                u.sort();
                u.dedup();
                assert_eq!(u.len(), n, "all other clips retrieved once");
            }
        }
    }
    // Queries use the available modality's key: scores of the missing-audio rows are the
    // cosine of the visual key against the audio bank keys.
    let m = s.model(&tiny_cfg());
    let b = s.batch(false, &rows, MissingPolicy::All(Modality::Audio));
    let out = m.forward(&b, &s.banks, false).unwrap();
    let t = &out.retrieval[0];
    let idx = t.indices.to_vec2::<u32>().unwrap();
    let sc = t.scores.to_vec2::<f32>().unwrap();
    let q = b.visual_key.to_vec2::<f32>().unwrap();
    let keys = s.banks.audio.keys().to_vec2::<f32>().unwrap();
    for (j, &r) in t.rows.iter().enumerate() {
        let k = &keys[idx[j][0] as usize];
        let dot: f32 = q[r].iter().zip(k).map(|(a, b)| a * b).sum();
        let nq: f32 = q[r].iter().map(|a| a * a).sum::<f32>().sqrt();
        let nk: f32 = k.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((dot / (nq * nk) - sc[j][0]).abs() < 1e-4);
    }
}

#[test]
fn ablation_switches_change_the_computation() {
    let s = setup();
    let rows: Vec<usize> = (0..10).collect();
    let combos = [(false, false), (false, true), (true, false), (true, true)];
    let models: Vec<R2scp> = combos
        .iter()
        .map(|&(r, c)| {
            s.model(&ModelConfig {
                use_retrieval: r,
                use_cap: c,
                ..tiny_cfg()
            })
        })
        .collect();
    for miss in Modality::ALL {
        let b = s.batch(true, &rows, MissingPolicy::All(miss));
        let outs: Vec<_> = models
            .iter()
            .map(|m| m.forward(&b, &s.banks, false).unwrap())
            .collect();
        for i in 0..4 {
            for j in (i + 1)..4 {
                let d = max_abs_diff(&outs[i].logits, &outs[j].logits);
                assert!(
                    d > 1e-6,
                    "{:?} vs {:?} give the same logits",
                    combos[i],
                    combos[j]
                );
            }
        }
        // Retrieval happens only when it is on.
        for (o, (r, _)) in outs.iter().zip(combos) {
            assert_eq!(o.retrieval.is_empty(), !r);
        }
    }
    // The H_com adapter switch changes the CAP path (the adapter starts at identity,
    // so move its weights off zero first) and only exists when on.
    let with = s.model(&tiny_cfg());
    let without = s.model(&ModelConfig {
        com_adapter: false,
        ..tiny_cfg()
    });
    let adapter = vars(&s)
        .into_iter()
        .find(|(k, _)| k == "recover.audio.com.weight")
        .expect("adapter var")
        .1;
    // A full-rank, deterministic matrix: an all-ones (rank-1) adapter makes every H_com
    // token a constant vector, which the following LayerNorm reduces to rounding noise.
    let (rows_a, cols_a) = adapter.shape().dims2().unwrap();
    let w: Vec<f32> = (0..rows_a * cols_a)
        .map(|i| ((i * 7 + 3) as f32 * 0.37).sin())
        .collect();
    adapter
        .set(&Tensor::from_vec(w, (rows_a, cols_a), &s.dev).unwrap())
        .unwrap();
    let b = s.batch(true, &rows, MissingPolicy::All(Modality::Audio));
    assert!(max_abs_diff(&eval(&with, &b, &s.banks), &eval(&without, &b, &s.banks)) > 1e-6);
    let fresh = VarMap::new();
    let vb = VarBuilder::from_varmap(&fresh, DType::F32, &s.dev);
    let _m = R2scp::new(
        &ModelConfig {
            com_adapter: false,
            ..tiny_cfg()
        },
        &s.dims,
        vb,
    )
    .unwrap();
    assert!(!fresh
        .data()
        .lock()
        .unwrap()
        .keys()
        .any(|k| k.contains(".com.")));
    // The complete setting uses neither retrieval nor CAP: identical logits.
    let b = s.batch(true, &rows, MissingPolicy::Complete);
    let l0 = vec2(&eval(&models[0], &b, &s.banks));
    for m in &models[1..] {
        assert_eq!(l0, vec2(&eval(m, &b, &s.banks)));
    }
}

fn grad_norm(grads: &candle_core::backprop::GradStore, v: &Var) -> f32 {
    grads
        .get(v.as_tensor())
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .unwrap_or(0.0)
}

fn vars(s: &Setup) -> Vec<(String, Var)> {
    let data = s.varmap.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn ce(logits: &Tensor, y: &Tensor) -> Tensor {
    let l = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    l.gather(&y.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap()
}

/// Gradients of the stage-II loss (answer cross-entropy plus 0.1 x the two ranking terms)
/// of one training forward of `m` on `b`.
fn stage_two_grads(m: &R2scp, s: &Setup, b: &Batch) -> candle_core::backprop::GradStore {
    let out = m
        .forward_with(
            b,
            &s.banks,
            ForwardOptions {
                train: true,
                rank_terms: true,
            },
        )
        .unwrap();
    let r = out.rank.as_ref().expect("rank terms");
    let y = b.answer.index_select(&r.rows_t, 0).unwrap();
    let loss = (ce(&out.logits, &b.answer)
        + ((ce(&r.logits_gt, &y) + ce(&r.logits_neg, &y)).unwrap() * 0.1).unwrap())
    .unwrap();
    loss.backward().unwrap()
}

#[test]
fn stage_two_gradients_reach_router_cap_decoder_and_w_proj_not_experts() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    m.set_experts_frozen(true);
    let rows: Vec<usize> = (0..16).collect();
    let b = s.batch(
        false,
        &rows,
        MissingPolicy::Simulated(MissingSim {
            rate: 0.7,
            kind: MissingType::Mixed,
            seed: 2,
        }),
    );
    assert!(b.missing.contains(&Missing::Audio) && b.missing.contains(&Missing::Visual));
    let grads = stage_two_grads(&m, &s, &b);
    let all = vars(&s);
    for want in [
        "router.fc1.weight",
        "router.fc2.weight",
        "decoder.fc1.weight",
        "decoder.fc2.weight",
        "decoder.ln.weight",
        "decoder.pool_audio.q.weight",
        "decoder.pool_visual.v.weight",
        "cap.audio.w_proj.weight",
        "cap.visual.w_proj.weight",
        "cap.audio.sa.q.weight",
        "cap.visual.ca.v.weight",
        "recover.audio.com.weight",
        "recover.visual.com.weight",
    ] {
        let v = &all
            .iter()
            .find(|(k, _)| k == want)
            .unwrap_or_else(|| panic!("no var {want}"))
            .1;
        assert!(grad_norm(&grads, v) > 0.0, "{want} gets no gradient");
    }
    for (k, v) in &all {
        if is_expert_var(k) {
            assert_eq!(
                grad_norm(&grads, v),
                0.0,
                "frozen expert var {k} got a gradient"
            );
        }
    }
    // The null tokens are used (and trained) only without retrieval.
    let m0 = s.model(&ModelConfig {
        use_retrieval: false,
        ..tiny_cfg()
    });
    m0.set_experts_frozen(true);
    let out = m0.forward(&b, &s.banks, true).unwrap();
    let grads = ce(&out.logits, &b.answer).backward().unwrap();
    let null = &all
        .iter()
        .find(|(k, _)| k == "recover.audio.null")
        .unwrap()
        .1;
    assert!(grad_norm(&grads, null) > 0.0);
}

#[test]
fn stage_one_trains_each_expert_on_its_own() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let rows: Vec<usize> = (0..12).collect();
    let b = s.batch(false, &rows, MissingPolicy::Complete);
    let el = m.expert_logits(&b, true).unwrap();
    let all = vars(&s);
    let get = |name: &str| &all.iter().find(|(k, _)| k == name).unwrap().1;
    // Audio loss alone: only the audio expert learns.
    let g = ce(&el.audio, &b.answer).backward().unwrap();
    assert!(grad_norm(&g, get("expert.audio.enc.layer0.attn.q.weight")) > 0.0);
    assert!(grad_norm(&g, get("expert.audio.phi.proj.weight")) > 0.0);
    assert!(grad_norm(&g, get("expert.audio.head.fc2.weight")) > 0.0);
    assert_eq!(
        grad_norm(&g, get("expert.visual.enc.layer0.attn.q.weight")),
        0.0
    );
    assert_eq!(
        grad_norm(&g, get("expert.text.enc.layer0.attn.q.weight")),
        0.0
    );
    // Text-fused loss: the text expert learns, audio/visual experts are not trained by it.
    let g = ce(&el.text, &b.answer).backward().unwrap();
    assert!(grad_norm(&g, get("expert.text.enc.layer0.attn.q.weight")) > 0.0);
    assert!(grad_norm(&g, get("expert.text.phi.emb.weight")) > 0.0);
    assert_eq!(
        grad_norm(&g, get("expert.audio.enc.layer0.attn.q.weight")),
        0.0
    );
    assert_eq!(grad_norm(&g, get("expert.visual.phi.proj.weight")), 0.0);
    // No stage-II var takes part in stage I.
    let total =
        (ce(&el.audio, &b.answer) + ce(&el.visual, &b.answer) + ce(&el.text, &b.answer)).unwrap();
    let g = total.backward().unwrap();
    for (k, v) in &all {
        if !is_expert_var(k) {
            assert_eq!(
                grad_norm(&g, v),
                0.0,
                "stage-II var {k} got a stage-I gradient"
            );
        }
    }
}

#[test]
fn rank_terms_cover_missing_train_rows_only() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let rows: Vec<usize> = (0..12).collect();
    let mut b = s.batch(false, &rows, MissingPolicy::Complete);
    for r in [0usize, 3, 8] {
        b.missing[r] = Missing::Audio;
    }
    b.missing[5] = Missing::Visual;
    let opts = ForwardOptions {
        train: false,
        rank_terms: true,
    };
    let out = m.forward_with(&b, &s.banks, opts).unwrap();
    let r = out.rank.expect("rank terms on a train batch");
    assert_eq!(r.rows, vec![0, 3, 5, 8]);
    let a = s.dims.n_answers;
    for l in [&r.logits_gt, &r.logits_pos, &r.logits_neg] {
        assert_eq!(l.dims(), &[4, a]);
    }
    assert_eq!(
        vec2(&r.logits_pos),
        vec2(&out.logits.index_select(&r.rows_t, 0).unwrap())
    );
    // Ground truth = the real features of the own clip: equal to the complete forward.
    let full = s.batch(false, &rows, MissingPolicy::Complete);
    let lf = eval(&m, &full, &s.banks)
        .index_select(&r.rows_t, 0)
        .unwrap();
    assert!(max_abs_diff(&lf, &r.logits_gt) < 1e-4);
    assert!(max_abs_diff(&r.logits_pos, &r.logits_neg) > 1e-6);
    let negs: Vec<_> = out.retrieval.iter().filter(|t| t.negative).collect();
    assert_eq!(negs.len(), 2);
    // Negative retrieval returns the LEAST similar rows: its scores are below the positives'.
    for t in &out.retrieval {
        let sc = t.scores.to_vec2::<f32>().unwrap();
        let pos = out
            .retrieval
            .iter()
            .find(|u| !u.negative && u.modality == t.modality)
            .unwrap();
        let ps = pos.scores.to_vec2::<f32>().unwrap();
        if t.negative {
            for (n, p) in sc.iter().zip(&ps) {
                assert!(n.iter().cloned().fold(f32::MIN, f32::max) <= p[p.len() - 1] + 1e-6);
            }
        }
    }
    // Test clips are not in the bank: no ground truth, no rank terms.
    let bt = s.batch(true, &rows, MissingPolicy::All(Modality::Audio));
    assert!(m.forward_with(&bt, &s.banks, opts).unwrap().rank.is_none());
    // Complete batch or retrieval off: none either.
    assert!(m
        .forward_with(&full, &s.banks, opts)
        .unwrap()
        .rank
        .is_none());
    let m0 = s.model(&ModelConfig {
        use_retrieval: false,
        ..tiny_cfg()
    });
    assert!(m0.forward_with(&b, &s.banks, opts).unwrap().rank.is_none());
}

#[test]
fn question_padding_is_masked() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let rows: Vec<usize> = (0..10).collect();
    for p in [MissingPolicy::Complete, MissingPolicy::All(Modality::Audio)] {
        let b = s.batch(true, &rows, p);
        let mask = vec2(&b.question_mask);
        assert!(
            mask.iter().flatten().any(|x| *x == 0.0),
            "some padding to test"
        );
        let q = b.question.to_vec2::<u32>().unwrap();
        let vocab = s.dims.vocab_size as u32;
        let q2: Vec<u32> = q
            .iter()
            .zip(&mask)
            .flat_map(|(r, mr)| {
                r.iter()
                    .zip(mr)
                    .enumerate()
                    .map(|(j, (&id, &mm))| {
                        if mm == 0.0 {
                            (j as u32 * 7 + 3) % vocab
                        } else {
                            id
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut b2 = b.clone();
        b2.question = Tensor::from_vec(q2, b.question.shape(), &s.dev).unwrap();
        assert!(
            max_abs_diff(
                &b.question.to_dtype(DType::F32).unwrap(),
                &b2.question.to_dtype(DType::F32).unwrap()
            ) > 0.0
        );
        assert_eq!(
            vec2(&eval(&m, &b, &s.banks)),
            vec2(&eval(&m, &b2, &s.banks))
        );
        let e1 = m.expert_logits(&b, false).unwrap();
        let e2 = m.expert_logits(&b2, false).unwrap();
        assert_eq!(vec2(&e1.text), vec2(&e2.text));
        assert_eq!(vec2(&e1.audio), vec2(&e2.audio));
    }
}

#[test]
fn attention_ignores_masked_keys_and_masked_mean() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mha = Mha::new(8, 2, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let q = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
    let kv = Tensor::randn(0f32, 1., (2, 5, 8), &dev).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 0., 1., 0.], [1., 0., 0., 0., 0.]], &dev).unwrap();
    let bias = key_bias(&mask, DType::F32).unwrap();
    let out = mha.forward(&q, &kv, Some(&bias)).unwrap();
    let kv2 = (&kv
        + (Tensor::randn(0f32, 10., (2, 5, 8), &dev).unwrap()
            * mask
                .unsqueeze(2)
                .unwrap()
                .affine(-1.0, 1.0)
                .unwrap()
                .broadcast_as((2, 5, 8))
                .unwrap())
        .unwrap())
    .unwrap();
    let out2 = mha.forward(&q, &kv2, Some(&bias)).unwrap();
    assert!(max_abs_diff(&kv, &kv2) > 1.0);
    assert!(max_abs_diff(&out, &out2) < 1e-6);
    let out3 = mha.forward(&q, &kv2, None).unwrap();
    assert!(max_abs_diff(&out, &out3) > 1e-4);
    let mm = masked_mean(&kv, &mask).unwrap().to_vec2::<f32>().unwrap();
    let kvv = kv.to_vec3::<f32>().unwrap();
    for j in 0..8 {
        let want0 = (kvv[0][0][j] + kvv[0][1][j] + kvv[0][3][j]) / 3.0;
        assert!((mm[0][j] - want0).abs() < 1e-5);
        assert!((mm[1][j] - kvv[1][0][j]).abs() < 1e-6);
    }
}

#[test]
fn dropout_is_seeded_and_eval_is_deterministic() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let rows: Vec<usize> = (0..8).collect();
    let b = s.batch(true, &rows, MissingPolicy::All(Modality::Visual));
    assert_eq!(vec2(&eval(&m, &b, &s.banks)), vec2(&eval(&m, &b, &s.banks)));
    m.set_dropout_seed(42);
    let t1 = m.forward(&b, &s.banks, true).unwrap().logits;
    m.set_dropout_seed(42);
    let t2 = m.forward(&b, &s.banks, true).unwrap().logits;
    assert_eq!(vec2(&t1), vec2(&t2));
    let t3 = m.forward(&b, &s.banks, true).unwrap().logits;
    assert!(
        max_abs_diff(&t1, &t3) > 0.0,
        "dropout draws a new mask per call"
    );
    assert!(max_abs_diff(&t1, &eval(&m, &b, &s.banks)) > 0.0);
}

#[test]
fn var_names_split_cleanly_into_stages() {
    let s = setup();
    let _m = s.model(&tiny_cfg());
    let all = vars(&s);
    let n_expert = all.iter().filter(|(k, _)| is_expert_var(k)).count();
    assert!(n_expert > 0 && n_expert < all.len());
    for (k, _) in &all {
        let ok = k.starts_with(EXPERT_PREFIX)
            || [
                "router.",
                "decoder.",
                "cap.audio.",
                "cap.visual.",
                "recover.audio.",
                "recover.visual.",
            ]
            .iter()
            .any(|p| k.starts_with(p));
        assert!(ok, "var {k} has no known prefix");
    }
    for m in ["audio", "visual", "text"] {
        assert!(all
            .iter()
            .any(|(k, _)| k.starts_with(&format!("expert.{m}.phi."))));
        assert!(all
            .iter()
            .any(|(k, _)| k.starts_with(&format!("expert.{m}.enc."))));
        assert!(all
            .iter()
            .any(|(k, _)| k.starts_with(&format!("expert.{m}.head."))));
    }
}

#[test]
fn config_serde_defaults_and_errors() {
    let cfg: ModelConfig = toml::from_str("dim = 32\nuse_cap = false\n").unwrap();
    assert_eq!(cfg.dim, 32);
    assert!(!cfg.use_cap);
    assert_eq!(cfg.heads, ModelConfig::default().heads);
    let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    assert!(toml::from_str::<ModelConfig>("dimm = 3").is_err());
    let s = setup();
    let vb = VarBuilder::from_varmap(&s.varmap, DType::F32, &s.dev);
    let bad = ModelConfig {
        k_purge: 100,
        ..tiny_cfg()
    };
    let err = R2scp::new(&bad, &s.dims, vb.clone())
        .err()
        .expect("k too large")
        .to_string();
    assert!(err.contains("k_purge = 100"), "{err}");
    let bad = ModelConfig {
        dim: 10,
        heads: 4,
        ..tiny_cfg()
    };
    let err = R2scp::new(&bad, &s.dims, vb)
        .err()
        .expect("heads")
        .to_string();
    assert!(err.contains("dim = 10"), "{err}");
    // A batch of the wrong shape is an error naming the field, not a panic.
    let m = s.model(&tiny_cfg());
    let mut b = s.batch(true, &[0, 1], MissingPolicy::Complete);
    b.audio = Tensor::zeros((2, 3, 4), DType::F32, &s.dev).unwrap();
    let err = m
        .forward(&b, &s.banks, false)
        .expect_err("shape")
        .to_string();
    assert!(err.contains("batch.audio"), "{err}");
}

#[test]
fn frozen_bank_cache_matches_running_the_experts() {
    let s = setup();
    let m = s.model(&tiny_cfg());
    let rows: Vec<usize> = (0..12).collect();
    let opts = ForwardOptions {
        train: false,
        rank_terms: true,
    };
    let b = s.batch(
        false,
        &rows,
        MissingPolicy::Simulated(MissingSim {
            rate: 0.8,
            kind: MissingType::Mixed,
            seed: 4,
        }),
    );
    let close = |x: &r2scp::model::Output, y: &r2scp::model::Output| {
        let (rx, ry) = (x.rank.as_ref().unwrap(), y.rank.as_ref().unwrap());
        max_abs_diff(&x.logits, &y.logits) < 1e-4
            && max_abs_diff(&rx.logits_gt, &ry.logits_gt) < 1e-4
            && max_abs_diff(&rx.logits_neg, &ry.logits_neg) < 1e-4
    };
    m.set_experts_frozen(false);
    let live = m.forward_with(&b, &s.banks, opts).unwrap();
    m.set_experts_frozen(true);
    let cached = m.forward_with(&b, &s.banks, opts).unwrap();
    let again = m.forward_with(&b, &s.banks, opts).unwrap();
    assert!(
        close(&live, &cached),
        "cached bank tokens differ from running the experts"
    );
    assert_eq!(vec2(&cached.logits), vec2(&again.logits));
    // Reloading expert weights while frozen invalidates the cache.
    let w = vars(&s)
        .into_iter()
        .find(|(k, _)| k == "expert.audio.phi.proj.weight")
        .unwrap()
        .1;
    w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
    let w2 = vars(&s)
        .into_iter()
        .find(|(k, _)| k == "expert.visual.phi.proj.weight")
        .unwrap()
        .1;
    w2.set(&(w2.as_tensor() * 0.5).unwrap()).unwrap();
    let cached2 = m.forward_with(&b, &s.banks, opts).unwrap();
    assert!(max_abs_diff(&cached.logits, &cached2.logits) > 1e-5);
    m.set_experts_frozen(false);
    let live2 = m.forward_with(&b, &s.banks, opts).unwrap();
    assert!(close(&live2, &cached2), "stale cache after a weight change");
}

#[test]
fn safe_retrieval_never_reads_the_missing_modality() {
    let rows: Vec<usize> = (0..12).collect();
    for q in [
        RetrievalQuery::CrossKey,
        RetrievalQuery::SameKey,
        RetrievalQuery::SameFeatures,
    ] {
        let s = setup();
        let m = s.model(&safe_cfg(q));
        for miss in Modality::ALL {
            for test in [true, false] {
                let b = s.batch(test, &rows, MissingPolicy::All(miss));
                let p = perturb(&b, miss, &rows, 13);
                assert_eq!(
                    vec2(&eval(&m, &b, &s.banks)),
                    vec2(&eval(&m, &p, &s.banks)),
                    "{q:?} missing {miss}: logits changed"
                );
            }
        }
        // ... while the available modality does matter.
        let b = s.batch(true, &rows, MissingPolicy::All(Modality::Audio));
        let p = perturb(&b, Modality::Visual, &rows, 13);
        assert!(max_abs_diff(&eval(&m, &b, &s.banks), &eval(&m, &p, &s.banks)) > 0.0);
    }
}

#[test]
fn same_view_search_compares_the_available_modality_with_itself() {
    let s = setup();
    let train = &s.splits.train;
    let m_bank = train.clip_ids.len();
    let flat = |t: &Tensor| -> Vec<Vec<f32>> { vec2(&t.flatten_from(1).unwrap()) };
    // Standardised bank features of each modality, computed by hand.
    let standardise = |x: &[Vec<f32>], rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
        let f = x[0].len();
        let n = x.len() as f32;
        let mean: Vec<f32> = (0..f)
            .map(|j| x.iter().map(|r| r[j]).sum::<f32>() / n)
            .collect();
        let sd: Vec<f32> = (0..f)
            .map(|j| (x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f32>() / n).sqrt())
            .collect();
        rows.iter()
            .map(|r| {
                (0..f)
                    .map(|j| {
                        if sd[j] > 1e-6 {
                            (r[j] - mean[j]) / sd[j]
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let rows: Vec<usize> = (0..10).collect();
    for q in [
        RetrievalQuery::SameKey,
        RetrievalQuery::SameFeatures,
        RetrievalQuery::SameKeyAndFeatures,
    ] {
        let m = s.model(&ModelConfig {
            n_retrieved: m_bank - 1,
            ..safe_cfg(q)
        });
        for miss in Modality::ALL {
            let avl = miss.other();
            let b = s.batch(true, &rows, MissingPolicy::All(miss));
            let (keys_b, keys_q, x, xq) = match avl {
                Modality::Audio => (
                    vec2(&train.audio_key),
                    vec2(&b.audio_key),
                    flat(&train.audio),
                    flat(&b.audio),
                ),
                Modality::Visual => (
                    vec2(&train.visual_key),
                    vec2(&b.visual_key),
                    flat(&train.visual),
                    flat(&b.visual),
                ),
            };
            let (feats_b, feats_q) = (standardise(&x, &x), standardise(&x, &xq));
            let expect = |r: usize, row: usize| -> f32 {
                let ck = cosine(&keys_q[r], &keys_b[row]);
                let cf = cosine(&feats_q[r], &feats_b[row]);
                match q {
                    RetrievalQuery::SameKey => ck,
                    RetrievalQuery::SameFeatures => cf,
                    _ => (ck + cf) / 2.0,
                }
            };
            let r32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let ret = m.retrieve(&b, &s.banks, miss, &r32, 3).unwrap();
            let idx = ret.indices.to_vec2::<u32>().unwrap();
            let sc = ret.scores.to_vec2::<f32>().unwrap();
            for (j, &r) in rows.iter().enumerate() {
                for (i, &row) in idx[j].iter().enumerate() {
                    let want = expect(r, row as usize);
                    assert!(
                        (want - sc[j][i]).abs() < 1e-3,
                        "{q:?} missing {miss}: row {r} cand {i}: score {} vs {want}",
                        sc[j][i]
                    );
                }
            }
            // Self-exclusion with every other clip retrieved (train queries).
            let bt = s.batch(false, &rows, MissingPolicy::All(miss));
            let out = m.forward(&bt, &s.banks, false).unwrap();
            let idx = out.retrieval[0].indices.to_vec2::<u32>().unwrap();
            for (j, &r) in out.retrieval[0].rows.iter().enumerate() {
                let own = s.banks.get(miss).row_of(bt.clip_ids[r]).unwrap() as u32;
                assert!(
                    !idx[j].contains(&own),
                    "{q:?}: row {r} retrieved its own clip"
                );
                let mut u = idx[j].clone();
                u.sort();
                u.dedup();
                assert_eq!(u.len(), m_bank - 1);
            }
        }
    }
}

#[test]
fn reliability_gate_falls_back_to_the_null_tokens() {
    let s = setup();
    let cfg = ModelConfig {
        recovery: RecoveryConfig {
            router_stats: false,
            ..RecoveryConfig::default()
        },
        ..tiny_cfg()
    };
    let m = s.model(&cfg);
    // Banks whose values are different features (keys unchanged): the same clips are
    // found, other tokens are borrowed.
    let mut other = s.splits.train.clone();
    other.audio = ((&other.audio * 3.0).unwrap() + 1.0).unwrap();
    other.visual = ((&other.visual * -2.0).unwrap() + 0.5).unwrap();
    let banks2 = Banks::from_dataset(&other, &s.dev).unwrap();
    let rows: Vec<usize> = (0..8).collect();
    for (bias, same) in [(-1e4f32, true), (1e4, false)] {
        for mm in ["audio", "visual"] {
            let t = Tensor::new(&[bias], &s.dev).unwrap();
            set_var(&s, &format!("recover.{mm}.gate.fc2.bias"), &t);
        }
        for miss in Modality::ALL {
            let b = s.batch(true, &rows, MissingPolicy::All(miss));
            let d = max_abs_diff(&eval(&m, &b, &s.banks), &eval(&m, &b, &banks2));
            assert_eq!(d == 0.0, same, "gate bias {bias}, missing {miss}: diff {d}");
        }
    }
}

#[test]
fn similarity_softmax_spans_top1_to_mean() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = RecoveryConfig {
        aggregate: Aggregate::Softmax,
        gate: false,
        ..RecoveryConfig::default()
    };
    let head = RecoveryHead::new(&cfg, vb).unwrap();
    let (r, n, l, d) = (2, 3, 4, 5);
    let h = Tensor::arange(0f32, (r * n * l * d) as f32, &dev)
        .unwrap()
        .reshape((r, n, l, d))
        .unwrap();
    // Row 0 prefers candidate 1, row 1 candidate 2.
    let scores = Tensor::new(&[[0.5f32, 0.9, 0.1], [0.2, 0.3, 0.8]], &dev).unwrap();
    let null = Tensor::zeros((l, d), DType::F32, &dev).unwrap();
    let set_tau = |tau: f32| {
        let v = varmap.data().lock().unwrap();
        v.get("log_tau")
            .unwrap()
            .set(&Tensor::new(&[tau.ln()], &dev).unwrap())
            .unwrap();
    };
    set_tau(1e-4);
    let top = head.combine(&h, &scores, &null).unwrap().h;
    for (row, best) in [(0usize, 1usize), (1, 2)] {
        let want = h.get(row).unwrap().get(best).unwrap();
        assert!(max_abs_diff(&top.get(row).unwrap(), &want) < 1e-3);
    }
    set_tau(1e4);
    let c = head.combine(&h, &scores, &null).unwrap();
    assert!(max_abs_diff(&c.h, &h.mean(1).unwrap()) < 1e-2);
    // Router statistics: flag, top-1, mean, spread, agreement, gate (1 without a gate).
    let st = vec2(&c.router_stats);
    assert_eq!(st[0].len(), ROUTER_STATS);
    assert_eq!(ROUTER_STATS, GATE_STATS + 2);
    assert_eq!(st[0][0], 1.0);
    assert!(
        (st[0][1] - 0.5).abs() < 1e-6,
        "top-1 is the first column: {:?}",
        st[0]
    );
    assert!((st[0][2] - 0.5).abs() < 1e-6);
    assert!((st[0][3] - 0.4).abs() < 1e-6);
    assert_eq!(st[0][5], 1.0);
    // Identical candidates agree perfectly; different ones less.
    let same = h.narrow(1, 0, 1).unwrap().repeat((1, n, 1, 1)).unwrap();
    let a = vec2(&RecoveryHead::stats(&scores, &same).unwrap());
    assert!((a[0][3] - 1.0).abs() < 1e-5 && (a[1][3] - 1.0).abs() < 1e-5);
    let neg = Tensor::cat(
        &[
            &h.narrow(1, 0, 1).unwrap(),
            &h.narrow(1, 0, 1).unwrap().neg().unwrap(),
            &h.narrow(1, 0, 1).unwrap(),
        ],
        1,
    )
    .unwrap();
    let a = vec2(&RecoveryHead::stats(&scores, &neg).unwrap());
    assert!((a[0][3] + 1.0 / 3.0).abs() < 1e-4, "agreement {}", a[0][3]);
}

#[test]
fn safe_retrieval_vars_get_gradients_in_stage_two() {
    let s = setup();
    let m = s.model(&safe_cfg(RetrievalQuery::SameFeatures));
    m.set_experts_frozen(true);
    let rows: Vec<usize> = (0..16).collect();
    let b = s.batch(
        false,
        &rows,
        MissingPolicy::Simulated(MissingSim {
            rate: 0.7,
            kind: MissingType::Mixed,
            seed: 2,
        }),
    );
    let grads = stage_two_grads(&m, &s, &b);
    let all = vars(&s);
    for want in [
        "recover.audio.log_tau",
        "recover.visual.log_tau",
        "recover.audio.gate.fc2.bias",
        "recover.visual.gate.fc2.weight",
        "recover.audio.null",
        "router.fc1.weight",
    ] {
        let v = &all
            .iter()
            .find(|(k, _)| k == want)
            .unwrap_or_else(|| panic!("no var {want}"))
            .1;
        assert!(grad_norm(&grads, v) > 0.0, "{want} gets no gradient");
    }
    let fc1 = &all
        .iter()
        .find(|(k, _)| k == "router.fc1.weight")
        .unwrap()
        .1;
    assert_eq!(fc1.as_tensor().dim(1).unwrap(), 3 * 16 + 2 * ROUTER_STATS);
}

/// `complete_ensemble`: in evaluation a complete row's answer probabilities are the mean
/// of the real pair, audio recovered and visual recovered; rows with a missing modality,
/// training forwards and models without retrieval are untouched.
#[test]
fn complete_rows_average_the_real_and_the_recovered_views() {
    let s = setup();
    let on = safe_cfg(RetrievalQuery::SameKeyAndFeatures);
    assert!(
        on.recovery.complete_ensemble,
        "the safe default ensembles complete rows"
    );
    assert!(!RecoveryConfig::paper().complete_ensemble);
    let off = ModelConfig {
        recovery: RecoveryConfig {
            complete_ensemble: false,
            ..on.recovery.clone()
        },
        ..on.clone()
    };
    // One VarMap: both models have the same weights.
    let m_on = s.model(&on);
    let m_off = s.model(&off);
    let rows: Vec<usize> = (0..10).collect();
    let complete = s.batch(true, &rows, MissingPolicy::Complete);
    let probs =
        |m: &R2scp, b: &Batch| candle_nn::ops::softmax(&eval(m, b, &s.banks), D::Minus1).unwrap();
    let views = [
        probs(&m_off, &complete),
        probs(
            &m_off,
            &s.batch(true, &rows, MissingPolicy::All(Modality::Audio)),
        ),
        probs(
            &m_off,
            &s.batch(true, &rows, MissingPolicy::All(Modality::Visual)),
        ),
    ];
    let mean = ((&views[0] + &views[1]).unwrap() + &views[2]).unwrap() / 3.0;
    let got = probs(&m_on, &complete);
    let d = max_abs_diff(&got, &mean.unwrap());
    assert!(
        d < 1e-5,
        "ensemble differs from the mean of the three views by {d}"
    );
    assert!(
        max_abs_diff(&views[0], &got) > 1e-4,
        "the ensemble changed nothing"
    );
    // Missing rows (also next to complete rows in one batch) keep their own answer.
    let mixed = s.batch(
        true,
        &rows,
        MissingPolicy::Simulated(MissingSim {
            rate: 0.6,
            kind: MissingType::Mixed,
            seed: 5,
        }),
    );
    let (l_on, l_off) = (
        eval(&m_on, &mixed, &s.banks),
        eval(&m_off, &mixed, &s.banks),
    );
    let (v_on, v_off) = (vec2(&l_on), vec2(&l_off));
    let mut n_missing = 0;
    for (i, miss) in mixed.missing.iter().enumerate() {
        if *miss != Missing::None {
            n_missing += 1;
            assert_eq!(v_on[i], v_off[i], "row {i} ({miss:?}) changed");
        }
    }
    assert!(n_missing > 0 && n_missing < rows.len());
    // Training forwards are untouched.
    let train = |m: &R2scp| {
        m.set_dropout_seed(9);
        m.forward(&complete, &s.banks, true).unwrap().logits
    };
    assert_eq!(max_abs_diff(&train(&m_on), &train(&m_off)), 0.0);
    // Without retrieval there is nothing to ensemble (own VarMap: the router is narrower).
    let s0 = setup();
    let none_on = s0.model(&ModelConfig {
        use_retrieval: false,
        ..on.clone()
    });
    let none_off = s0.model(&ModelConfig {
        use_retrieval: false,
        ..off
    });
    let d = max_abs_diff(
        &eval(&none_on, &complete, &s0.banks),
        &eval(&none_off, &complete, &s0.banks),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn default_cap_records_its_noise_rows_and_trains_w_proj_only_through_the_detection_loss() {
    let s = setup();
    // The default CAP carries the detection loss (docs/DESIGN.md, "CAP that finds the noise").
    let cfg = ModelConfig {
        cap: CapSettings::default(),
        ..safe_cfg(RetrievalQuery::SameKeyAndFeatures)
    };
    assert!(cfg.cap.detect_weight > 0.0);
    let m = s.model(&cfg);
    m.set_experts_frozen(true);
    let rows: Vec<usize> = (0..12).collect();
    let b = s.batch(false, &rows, MissingPolicy::All(Modality::Audio));
    let out = m
        .forward_with(
            &b,
            &s.banks,
            ForwardOptions {
                train: true,
                rank_terms: false,
            },
        )
        .unwrap();
    // one CAP trace for the recovered audio rows, k noise rows each, next to the retrieval
    let t = out
        .cap
        .iter()
        .find(|t| t.modality == Modality::Audio && !t.negative)
        .expect("cap trace");
    assert_eq!(t.rows, rows);
    assert_eq!(t.noise_idx.dims(), [12, cfg.k_purge]);
    let r = &out.retrieval[0];
    assert_eq!(r.rows, t.rows);
    // training rows are in the bank: the detection loss exists and is a finite scalar
    let det = out.detect_loss.as_ref().expect("detection loss");
    let v = det.to_scalar::<f32>().unwrap();
    assert!(v.is_finite() && v > 0.0, "{v}");
    let all = vars(&s);
    let var = |name: &str| &all.iter().find(|(k, _)| k == name).expect(name).1;
    let g_det = det.backward().unwrap();
    assert!(grad_norm(&g_det, var("cap.audio.w_proj.weight")) > 0.0);
    // scoring is detached: the detection loss reaches nothing but W_proj
    for (k, v) in &all {
        if k != "cap.audio.w_proj.weight" {
            assert_eq!(grad_norm(&g_det, v), 0.0, "{k} got a detection gradient");
        }
    }
    // without the straight-through gate the task loss gives W_proj nothing
    let g_task = ce(&out.logits, &b.answer).backward().unwrap();
    assert_eq!(grad_norm(&g_task, var("cap.audio.w_proj.weight")), 0.0);
    assert!(grad_norm(&g_task, var("cap.audio.sa.q.weight")) > 0.0);
    // evaluation forwards carry no detection loss; test clips are not in the bank
    let ev = m.forward(&b, &s.banks, false).unwrap();
    assert!(ev.detect_loss.is_none());
    let bt = s.batch(true, &[0, 1, 2], MissingPolicy::All(Modality::Visual));
    let tr = m
        .forward_with(
            &bt,
            &s.banks,
            ForwardOptions {
                train: true,
                rank_terms: false,
            },
        )
        .unwrap();
    assert!(tr.detect_loss.is_none());
    assert_eq!(tr.cap.len(), 1);
}

#[test]
fn cap_anchor_chooses_what_phase_1_scores_against() {
    // TOML: `anchor` names the context; H_com's mean is the default, H_avl's the paper's
    // (saved configs written before the switch existed load as `available`: unit test of
    // `upgrade_legacy_config`).
    let c: ModelConfig = toml::from_str("[cap]\nanchor = \"available\"\n").expect("toml");
    assert_eq!(c.cap.anchor, CapAnchor::Available);
    let c: ModelConfig = toml::from_str("[cap]\ndetect_weight = 0.0\n").expect("toml");
    assert_eq!(c.cap.anchor, CapAnchor::Common);
    assert_eq!(CapSettings::paper().anchor, CapAnchor::Available);
    assert!(toml::from_str::<ModelConfig>("[cap]\nanchor = \"query\"\n").is_err());

    // Same weights, same rows: only the anchor differs, so the noise rows must differ
    // somewhere (at W_proj = 0, delta is 1 - cos against H_avl's mean or H_com's mean).
    let s = setup();
    let base = safe_cfg(RetrievalQuery::SameKeyAndFeatures);
    let picks = |anchor: CapAnchor| {
        let m = s.model(&ModelConfig {
            cap: CapSettings {
                anchor,
                ..CapSettings::default()
            },
            ..base.clone()
        });
        let rows: Vec<usize> = (0..16).collect();
        let b = s.batch(true, &rows, MissingPolicy::All(Modality::Audio));
        let out = m.forward(&b, &s.banks, false).expect("forward");
        let t = out
            .cap
            .iter()
            .find(|t| t.modality == Modality::Audio && !t.negative)
            .expect("cap trace");
        t.noise_idx.to_vec2::<u32>().expect("noise_idx")
    };
    let (avl, com) = (picks(CapAnchor::Available), picks(CapAnchor::Common));
    assert_eq!(avl.len(), 16);
    assert_eq!(com.len(), 16);
    assert_ne!(avl, com, "the anchor setting changed no pick");
    // deterministic for a fixed anchor
    assert_eq!(avl, picks(CapAnchor::Available));
}
