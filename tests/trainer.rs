//! Trainer tests: a tiny config trains end to end; an interrupted run resumed with
//! `--resume` ends with the same metrics; experts stay frozen in stage II; the ranking loss
//! is zero exactly when the ordering of Eq. 13-14 holds.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use r2scp::trainer::checkpoint::load_tensors;
use r2scp::trainer::config::SNAPSHOT_FILE;
use r2scp::trainer::loss::{cross_entropy_per_sample, rank_terms};
use r2scp::trainer::metrics::{read_metrics, Record};
use r2scp::trainer::plot::NOT_DRAWN;
use r2scp::trainer::state::{checkpoint_dir, read_state};
use r2scp::trainer::{train, RunOptions, Stage, TrainConfig};

fn tiny() -> TrainConfig {
    let mut c = TrainConfig {
        batch_size: 16,
        eval_batch_size: 64,
        log_every: 3,
        seed: 5,
        ..Default::default()
    };
    c.stage1.epochs = 1;
    c.stage2.epochs = 2;
    c.stage2.patience = 0;
    c.synthetic.n_train_clips = 60;
    c.synthetic.n_val_clips = 12;
    c.synthetic.n_test_clips = 12;
    c.synthetic.n_prototypes = 12;
    c.model.dim = 16;
    c.model.heads = 2;
    c.model.expert_layers = 1;
    c.apply_seed();
    c
}

fn opts(dir: &Path) -> RunOptions {
    RunOptions {
        quiet: true,
        report: false,
        ..RunOptions::new(dir)
    }
}

fn det(path: &Path) -> Vec<Record> {
    read_metrics(path)
        .expect("metrics")
        .iter()
        .map(Record::deterministic)
        .collect()
}

fn weights(path: &Path) -> HashMap<String, Vec<f32>> {
    load_tensors(path, &Device::Cpu)
        .expect("weights")
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn tiny_config_trains_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = RunOptions {
        report: true,
        ..opts(&run)
    };
    let s = train(&tiny(), &o).expect("train");
    assert!(!s.halted);
    let settings: Vec<&str> = s.test.iter().map(|r| r.setting.as_str()).collect();
    assert_eq!(settings, ["missing-audio", "missing-visual", "complete"]);
    for r in &s.test {
        let q = tiny().synthetic.questions_per_clip;
        assert_eq!(r.n, 12 * q, "12 test clips x {q} questions");
        assert!((0.0..=1.0).contains(&r.acc()));
        let w: f64 = r.router.iter().sum();
        assert!((w - 1.0).abs() < 1e-3, "router weights sum to {w}");
    }
    // The `cli` feature draws the plots and snapshots the config as TOML; without it the
    // snapshot is JSON and the report says that no plots were drawn.
    let plots: &[&str] = if cfg!(feature = "cli") {
        &["plots/loss.png", "plots/accuracy.png", "plots/router.png"]
    } else {
        &[]
    };
    assert_eq!(SNAPSHOT_FILE == "config.toml", cfg!(feature = "cli"));
    for f in [
        "metrics.jsonl",
        "report.md",
        "results.json",
        SNAPSHOT_FILE,
        "checkpoint/state.json",
    ]
    .iter()
    .chain(plots)
    {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert_eq!(
        report.contains(NOT_DRAWN),
        !cfg!(feature = "cli"),
        "{report}"
    );
    let st = read_state(&checkpoint_dir(&run).join("state.json")).unwrap();
    assert!(st.finished && st.stage == Stage::Mixing && st.stage_done);
    let m = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert!(m
        .iter()
        .any(|r| r.kind == "train" && r.stage == Some(Stage::Experts)));
    assert!(m
        .iter()
        .any(|r| r.kind == "train" && r.stage == Some(Stage::Mixing) && r.router.is_some()));
    assert!(m.iter().any(|r| r.kind == "train"
        && r.stage == Some(Stage::Mixing)
        && r.extra.contains_key("rank_pos")));
    assert_eq!(m.iter().filter(|r| r.kind == "test").count(), 3);
    // a second fresh run into the same directory is refused
    let err = train(&tiny(), &o).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn resume_after_interruption_gives_identical_metrics() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let sa = train(&cfg, &opts(&a)).expect("uninterrupted");

    // Interrupted after stage I, then in the middle of stage II (optimizer moments
    // in flight), with a torn metrics line as a crash would leave.
    let b = dir.path().join("b");
    let halt = |resume: bool| RunOptions {
        resume,
        halt_after_epochs: Some(1),
        ..opts(&b)
    };
    assert!(train(&cfg, &halt(false)).unwrap().halted);
    let st = read_state(&checkpoint_dir(&b).join("state.json")).unwrap();
    assert_eq!(
        (st.stage, st.epoch, st.stage_done),
        (Stage::Experts, 1, true)
    );
    assert!(train(&cfg, &halt(true)).unwrap().halted);
    let st = read_state(&checkpoint_dir(&b).join("state.json")).unwrap();
    assert_eq!(
        (st.stage, st.epoch, st.stage_done),
        (Stage::Mixing, 1, false)
    );
    assert!(st.optim_file.is_some());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(b.join("metrics.jsonl"))
            .unwrap();
        f.write_all(b"{\"kind\":\"train\",\"stage\":2,\"ep")
            .unwrap();
    }
    // a different config on the command line is ignored: the saved one is used
    let mut other = cfg.clone();
    other.stage2.lr = 0.5;
    let sb = train(
        &other,
        &RunOptions {
            resume: true,
            ..opts(&b)
        },
    )
    .expect("resumed");
    assert!(!sb.halted);
    assert_eq!(det(&a.join("metrics.jsonl")), det(&b.join("metrics.jsonl")));
    assert_eq!(sa.test, sb.test);
    let sta = read_state(&checkpoint_dir(&a).join("state.json")).unwrap();
    let stb = read_state(&checkpoint_dir(&b).join("state.json")).unwrap();
    assert_eq!(
        weights(&checkpoint_dir(&a).join(&sta.model_file)),
        weights(&checkpoint_dir(&b).join(&stb.model_file))
    );
}

#[test]
fn experts_are_frozen_in_stage_two() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let o = RunOptions {
        halt_after_epochs: Some(1),
        ..opts(&run)
    };
    assert!(train(&cfg, &o).unwrap().halted);
    let st = read_state(&checkpoint_dir(&run).join("state.json")).unwrap();
    let before = weights(&checkpoint_dir(&run).join(&st.model_file));
    train(
        &cfg,
        &RunOptions {
            resume: true,
            ..opts(&run)
        },
    )
    .unwrap();
    let st = read_state(&checkpoint_dir(&run).join("state.json")).unwrap();
    let after = weights(&checkpoint_dir(&run).join(&st.model_file));
    assert_eq!(before.len(), after.len());
    let mut n_expert = 0;
    let mut changed_other = 0;
    for (k, v) in &before {
        if k.starts_with("expert.") {
            n_expert += 1;
            assert_eq!(v, &after[k], "expert var {k} changed in stage II");
        } else if v != &after[k] {
            changed_other += 1;
        }
    }
    assert!(n_expert > 0);
    assert!(changed_other > 0, "stage II trained nothing");
}

#[test]
fn stage_one_trains_experts_only() {
    // Stage II disabled: only stage I runs; non-expert parameters keep their init.
    let mut cfg = tiny();
    cfg.stage2_enabled = false;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let s = train(&cfg, &opts(&a)).unwrap();
    assert_eq!(s.test.len(), 3);
    let sess = r2scp::trainer::Session::new(&cfg, &Device::Cpu).unwrap();
    let init: HashMap<String, Vec<f32>> = sess
        .weights()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    let st = read_state(&checkpoint_dir(&a).join("state.json")).unwrap();
    let fin = weights(&checkpoint_dir(&a).join(&st.model_file));
    let mut expert_changed = 0;
    for (k, v) in &init {
        if k.starts_with("expert.") {
            expert_changed += (v != &fin[k]) as usize;
        } else {
            assert_eq!(v, &fin[k], "non-expert var {k} changed in stage I");
        }
    }
    assert!(expert_changed > 0);
}

#[test]
fn ranking_loss_zero_iff_ordering_holds() {
    let dev = Device::Cpu;
    let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
    let s = |x: &Tensor| x.to_scalar::<f32>().unwrap();
    // gt better than positive better than negative: both hinges zero
    let (p, n) = rank_terms(&t(&[0.1, 0.2]), &t(&[0.5, 0.6]), &t(&[1.0, 2.0]), 0.0).unwrap();
    assert_eq!((s(&p), s(&n)), (0.0, 0.0));
    // a margin larger than the gaps makes them non-zero
    let (p, n) = rank_terms(&t(&[0.1, 0.2]), &t(&[0.5, 0.6]), &t(&[1.0, 2.0]), 0.6).unwrap();
    assert!((s(&p) - 0.2).abs() < 1e-6, "{}", s(&p));
    // pos - neg = [-0.5, -1.4]: only the first row is inside the margin
    assert!((s(&n) - 0.05).abs() < 1e-6, "{}", s(&n));
    // violated orderings: positive better than gt, negative better than positive
    let (p, n) = rank_terms(&t(&[1.0, 0.0]), &t(&[0.5, 0.5]), &t(&[0.2, 0.5]), 0.0).unwrap();
    assert!((s(&p) - 0.25).abs() < 1e-6);
    assert!((s(&n) - 0.15).abs() < 1e-6);
    // mismatched shapes are an error
    assert!(rank_terms(&t(&[1.0]), &t(&[0.5, 0.5]), &t(&[0.2, 0.5]), 0.0).is_err());

    // gradients: from logits through the cross-entropy into the hinge
    let lg = Var::from_tensor(&Tensor::new(&[[2f32, 0.0], [0.0, 2.0]], &dev).unwrap()).unwrap();
    let lp = Var::from_tensor(&Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &dev).unwrap()).unwrap();
    let ln = Var::from_tensor(&Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap()).unwrap();
    let y = Tensor::new(&[0u32, 1], &dev).unwrap();
    let ce = |v: &Var| cross_entropy_per_sample(v.as_tensor(), &y).unwrap();
    let (p, n) = rank_terms(&ce(&lg), &ce(&lp), &ce(&ln), 0.0).unwrap();
    // gt is right (low loss) -> L_rank+ = 0; positive worse than negative -> L_rank- > 0
    assert_eq!(s(&p), 0.0);
    assert!(s(&n) > 0.0);
    let g = (p + n).unwrap().backward().unwrap();
    let gsum = |v: &Var| {
        g.get(v.as_tensor())
            .map(|t| {
                t.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0)
    };
    assert_eq!(gsum(&lg), 0.0);
    assert!(gsum(&lp) > 0.0 && gsum(&ln) > 0.0);
}

#[test]
fn ablation_shares_stage_one_and_reports() {
    use r2scp::trainer::ablate::{self, AblateOptions, Study};
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("abl");
    let o = AblateOptions {
        out_dir: out.clone(),
        seeds: vec![cfg.seed],
        quick: false,
        studies: vec![Study::Table2, Study::Strategy],
        quiet: true,
        device: Device::Cpu,
    };
    let report = ablate::run_studies(&cfg, &o).expect("ablate");
    let md = std::fs::read_to_string(&report).unwrap();
    for w in [
        "Table 2",
        "Table 3",
        "w/o ranking loss",
        "missing avg",
        "Retrieval quality",
        "| full | same_key_and_features |",
        "| full-paper | cross_key |",
        "| full-papercap | same_key_and_features |",
        "### CAP noise detection",
        "| full (safe retrieval + CAP) | missing-audio |",
        "| full-papercap (safe retrieval + paper CAP) | missing-visual |",
    ] {
        assert!(md.contains(w), "{w} missing from report:\n{md}");
    }
    if cfg!(feature = "cli") {
        assert!(out.join("plots/table2.png").is_file());
    } else {
        assert!(
            md.contains(NOT_DRAWN) && !out.join("plots").exists(),
            "{md}"
        );
    }
    let sdir = out.join(format!("seed{}", cfg.seed));
    for v in [
        "full",
        "cmr0-cap0",
        "cmr0-cap1",
        "cmr1-cap0",
        "wo-stage1",
        "wo-stage2",
        "wo-rank",
        "cmr1-cap0-paper",
        "full-paper",
        "full-papercap",
    ] {
        let st = read_state(&checkpoint_dir(&sdir.join(v)).join("state.json")).unwrap();
        assert!(st.finished, "{v} not finished");
    }
    // The forked "full" variant equals a plain uninterrupted run of the same config.
    let plain = dir.path().join("plain");
    let s = train(&cfg, &opts(&plain)).unwrap();
    let full = read_state(&checkpoint_dir(&sdir.join("full")).join("state.json")).unwrap();
    // (the state went through JSON: compare counts exactly, losses to rounding)
    let ft = full.test.unwrap();
    assert_eq!(s.test.len(), ft.len());
    for (a, b) in s.test.iter().zip(&ft) {
        assert_eq!((a.n, a.correct, a.per_type), (b.n, b.correct, b.per_type));
        assert!((a.loss - b.loss).abs() < 1e-9);
    }
    assert_eq!(
        det(&plain.join("metrics.jsonl")),
        det(&sdir.join("full").join("metrics.jsonl"))
    );
    // Rerunning reuses the finished variants (no retraining: metrics files unchanged).
    let read = || std::fs::read_to_string(sdir.join("cmr1-cap0/metrics.jsonl")).unwrap();
    let before = read();
    ablate::run_studies(&cfg, &o).expect("ablate again");
    assert!(before == read(), "a finished variant was retrained");
}
