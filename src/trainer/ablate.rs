//! `r2scp ablate`: the paper's ablations on one data set, averaged over seeds.
//!
//! Studies: `table2` (retrieval and CAP on/off, Table 2), `strategy` (w/o stage I, w/o
//! stage II, w/o ranking loss, Table 3), `n` (retrieved candidates, Fig. 4), `k`
//! (purification budget, Fig. 4), `rate` (training/test missing rate 30/50/70%, Fig. 5).
//!
//! Stage I does not depend on any of the ablated switches (n, k, CMR, CAP, ranking loss,
//! missing rate), so it is trained once per seed (that run is also the "w/o stage II"
//! variant) and every stage-II variant continues from a copy of its checkpoint through
//! the ordinary `--resume` path. Each variant is a normal run directory
//! (`<out>/seed<S>/<variant>/`); a finished variant is reused when `ablate` is run again
//! only if its config and the fingerprint of its data both match (the report lists the
//! reused ones). The output directory is a marked, locked run directory
//! ([`super::run_dir`]): a second `ablate` on the same `--out` fails at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::checkpoint::{atomic_write, load_tensors, save_tensors, write_json};
use super::config::TrainConfig;
use super::eval::{missing_avg, EvalResult};
use super::metrics::{read_metrics, MetricsWriter};
use super::noise_detection::{self, DetectionPair};
use super::plot::{Figures, Labels, Series, NOT_DRAWN};
use super::retrieval_quality::{self, RetrievalQuality};
use super::run_dir::{Open, RunDir, RunKind};
use super::stage::Stage;
use super::state::{checkpoint_dir, read_state, STATE_FORMAT};
use super::training::{load_data, load_data_for, train_in, RunOptions, Session};
use crate::data::{MissingPolicy, MissingSim, MissingType};
use crate::model::{is_expert_var, Banks, CapAnchor, CapSettings, RecoveryConfig, RetrievalQuery};

/// One ablation study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Study {
    /// Retrieval (CMR) and CAP on/off (Table 2).
    Table2,
    /// Training strategy (Table 3).
    Strategy,
    /// Number of retrieved candidates n in {1, 3, 5, 10}.
    N,
    /// Purification budget k in {1, 3, 5, 7, 9}.
    K,
    /// Missing rate 30/50/70% (full model vs. no retrieval/CAP).
    Rate,
    /// CAP's switches one at a time on top of the default model (straight-through gate,
    /// detached scoring, detection loss, residual gate), next to the paper's CAP.
    Cap,
}

impl Study {
    /// All studies in report order.
    pub const ALL: [Study; 6] = [
        Study::Table2,
        Study::Strategy,
        Study::N,
        Study::K,
        Study::Rate,
        Study::Cap,
    ];
}

/// Options of an ablation.
#[derive(Debug, Clone)]
pub struct AblateOptions {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Seeds to average over.
    pub seeds: Vec<u64>,
    /// Shrink the synthetic set and the epochs (smoke run).
    pub quick: bool,
    /// Studies to run.
    pub studies: Vec<Study>,
    /// No progress output from the runs.
    pub quiet: bool,
    /// Compute device.
    pub device: Device,
}

/// n values of the n study.
pub const N_VALUES: [usize; 4] = [1, 3, 5, 10];
/// k values of the k study.
pub const K_VALUES: [usize; 5] = [1, 3, 5, 7, 9];
/// (id, description, change) of a CAP-study variant.
pub type CapVariant = (&'static str, &'static str, fn(&mut CapSettings));

/// Variants of the CAP study: (id, what it changes, the change) on top of the base
/// config; `full` (the base) and `full-papercap` (the paper's CAP) run next to them.
pub const CAP_VARIANTS: [CapVariant; 5] = [
    ("cap-nodetect", "no detection loss", |c| {
        c.detect_weight = 0.0
    }),
    (
        "cap-avl",
        "scores against H_avl's mean (the paper's anchor)",
        |c| c.anchor = CapAnchor::Available,
    ),
    (
        "cap-st",
        "straight-through gate on (scoring detached)",
        |c| {
            c.straight_through = true;
            c.detach_scoring = true;
        },
    ),
    (
        "cap-st-centered",
        "straight-through gate on, centred per row (scoring detached)",
        |c| {
            c.straight_through = true;
            c.centered_straight_through = true;
            c.detach_scoring = true;
        },
    ),
    ("cap-gate", "residual gate", |c| c.residual_gate = true),
];
/// Missing rates of the rate study.
pub const RATES: [f32; 3] = [0.3, 0.5, 0.7];
/// Table 2 variant: the paper's plain retrieval (`RecoveryConfig::paper`), no CAP.
pub const PAPER_CMR_ONLY: &str = "cmr1-cap0-paper";
/// Table 2 variant: the paper's model, its plain retrieval with its CAP
/// (`CapSettings::paper`).
pub const PAPER_FULL: &str = "full-paper";
/// Table 2 variant: the default safe retrieval with the paper's CAP (`CapSettings::paper`),
/// next to `full` (safe retrieval with the default CAP).
pub const PAPER_CAP: &str = "full-papercap";

#[derive(Debug, Clone)]
struct Variant {
    id: String,
    cfg: TrainConfig,
    /// Test also under `Simulated(rate, mixed)`.
    sim_rate: Option<f32>,
}

/// Results of one variant for one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// Variant id (directory name).
    pub id: String,
    /// Seed.
    pub seed: u64,
    /// Table-1 rows (missing audio, missing visual, complete).
    pub test: Vec<EvalResult>,
    /// Accuracy under the simulated missing rate of the rate study, if any.
    pub sim: Option<EvalResult>,
    /// Top-1 retrieval answer agreement per missing setting (variants with retrieval).
    #[serde(default)]
    pub retrieval: Vec<RetrievalQuality>,
    /// The search `retrieval` was measured with.
    #[serde(default)]
    pub retrieval_query: Option<RetrievalQuery>,
    /// CAP's noise detection at initialisation and after training (synthetic set,
    /// variants with retrieval and CAP).
    #[serde(default)]
    pub detection: Option<DetectionPair>,
    /// Taken from an earlier run of `ablate` (same config, same data fingerprint) instead of
    /// trained now.
    #[serde(default)]
    pub reused: bool,
}

fn quick_cfg(c: &mut TrainConfig) {
    c.synthetic.n_train_clips = c.synthetic.n_train_clips.min(400);
    c.synthetic.n_val_clips = c.synthetic.n_val_clips.min(80);
    c.synthetic.n_test_clips = c.synthetic.n_test_clips.min(120);
    c.synthetic.n_prototypes = c.synthetic.n_prototypes.min(48);
    c.stage1.epochs = c.stage1.epochs.min(2);
    c.stage2.epochs = c.stage2.epochs.min(2);
}

fn variants(base: &TrainConfig, studies: &[Study]) -> (Vec<Variant>, Vec<String>) {
    let mut v: Vec<Variant> = Vec::new();
    let mut notes = Vec::new();
    let mut add = |id: String, f: &dyn Fn(&mut TrainConfig), sim_rate: Option<f32>| {
        let mut c = base.clone();
        f(&mut c);
        if let Some(x) = v.iter_mut().find(|x| x.id == id) {
            x.sim_rate = x.sim_rate.or(sim_rate);
        } else {
            v.push(Variant {
                id,
                cfg: c,
                sim_rate,
            });
        }
    };
    let full = |c: &mut TrainConfig| {
        c.model.use_retrieval = true;
        c.model.use_cap = true;
    };
    add("full".into(), &full, None);
    for s in studies {
        match s {
            Study::Table2 => {
                for (r, p) in [(false, false), (false, true), (true, false)] {
                    add(
                        format!("cmr{}-cap{}", r as u8, p as u8),
                        &move |c: &mut TrainConfig| {
                            c.model.use_retrieval = r;
                            c.model.use_cap = p;
                        },
                        None,
                    );
                }
                // The paper's plain retrieval next to the safe one (same stage I).
                if !base.model.recovery.is_paper() {
                    for (id, p) in [(PAPER_CMR_ONLY, false), (PAPER_FULL, true)] {
                        add(
                            id.into(),
                            &move |c: &mut TrainConfig| {
                                c.model.use_retrieval = true;
                                c.model.use_cap = p;
                                c.model.recovery = RecoveryConfig::paper();
                                if p {
                                    c.model.cap = CapSettings::paper();
                                }
                            },
                            None,
                        );
                    }
                }
                // The paper's CAP next to the default one (same retrieval, same stage I).
                if !base.model.cap.is_paper() {
                    add(
                        PAPER_CAP.into(),
                        &|c: &mut TrainConfig| {
                            c.model.use_retrieval = true;
                            c.model.use_cap = true;
                            c.model.cap = CapSettings::paper();
                        },
                        None,
                    );
                }
            }
            Study::Cap => {
                add(
                    "cmr1-cap0".into(),
                    &|c: &mut TrainConfig| {
                        c.model.use_retrieval = true;
                        c.model.use_cap = false;
                    },
                    None,
                );
                add(
                    PAPER_CAP.into(),
                    &|c: &mut TrainConfig| c.model.cap = CapSettings::paper(),
                    None,
                );
                for (id, _, f) in CAP_VARIANTS {
                    add(
                        id.into(),
                        &move |c: &mut TrainConfig| {
                            c.model.use_retrieval = true;
                            c.model.use_cap = true;
                            f(&mut c.model.cap);
                        },
                        None,
                    );
                }
            }
            Study::Strategy => {
                add(
                    "wo-stage1".into(),
                    &|c: &mut TrainConfig| c.stage1_enabled = false,
                    None,
                );
                add(
                    "wo-stage2".into(),
                    &|c: &mut TrainConfig| c.stage2_enabled = false,
                    None,
                );
                add(
                    "wo-rank".into(),
                    &|c: &mut TrainConfig| c.rank_loss = false,
                    None,
                );
            }
            Study::N => {
                for n in N_VALUES
                    .into_iter()
                    .filter(|&n| n != base.model.n_retrieved)
                {
                    let set_n = move |c: &mut TrainConfig| c.model.n_retrieved = n;
                    add(format!("n{n}"), &set_n, None);
                }
            }
            Study::K => {
                let kmax = if base.data.is_none() {
                    base.synthetic.la.min(base.synthetic.lv)
                } else {
                    usize::MAX
                };
                for k in K_VALUES {
                    if k > kmax {
                        notes.push(format!(
                            "k = {k} skipped: it exceeds the token count min(La, Lv) = {kmax} of the data"
                        ));
                        continue;
                    }
                    if k != base.model.k_purge {
                        // the budget as given, not capped by the sequence length
                        let set_k = move |c: &mut TrainConfig| {
                            c.model.k_purge = k;
                            c.model.cap.max_purge_share = 1.0;
                        };
                        add(format!("k{k}"), &set_k, None);
                    }
                }
            }
            Study::Rate => {
                for r in RATES {
                    let pct = (r * 100.0).round() as u32;
                    let id = if (r - base.missing_rate).abs() < 1e-6 {
                        "full".to_string()
                    } else {
                        format!("rate{pct}")
                    };
                    add(id, &move |c: &mut TrainConfig| c.missing_rate = r, Some(r));
                    let bid = if (r - base.missing_rate).abs() < 1e-6 {
                        "cmr0-cap0".to_string()
                    } else {
                        format!("rate{pct}-cmr0-cap0")
                    };
                    add(
                        bid,
                        &move |c: &mut TrainConfig| {
                            c.missing_rate = r;
                            c.model.use_retrieval = false;
                            c.model.use_cap = false;
                        },
                        Some(r),
                    );
                }
            }
        }
    }
    (v, notes)
}

/// Write to `dst` the expert (`expert.*`) weights of the stage-I file `src` and, for every
/// other var, the seeded initial value of a model built with `cfg`: the stage-II vars a
/// variant has (e.g. the retrieval head, the router width) depend on its config.
/// Where the shapes agree this is bit-identical to copying `src`, since initial values
/// are a function of (seed, var name).
fn fork_weights(src: &Path, dst: &Path, cfg: &TrainConfig) -> Result<()> {
    let stage1 = load_tensors(src, &Device::Cpu)?;
    let fresh = Session::new(cfg, &Device::Cpu)?;
    let mut w = fresh.weights()?;
    for (name, t) in w.iter_mut() {
        if is_expert_var(name) {
            *t = stage1
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{} has no expert var {name:?}", src.display()))?
                .clone();
        }
    }
    save_tensors(dst, &w)
}

/// Copy the stage-I checkpoint of `src` into a new run `dst` whose config is `cfg`, so
/// that resuming `dst` starts stage II from the shared experts.
fn fork_stage1(src: &Path, dst: &Path, cfg: &TrainConfig) -> Result<()> {
    let st = read_state(&checkpoint_dir(src).join("state.json"))?;
    if st.stage != Stage::Experts || !st.stage_done {
        bail!(
            "{}: stage I is not complete (stage {}, epoch {})",
            src.display(),
            st.stage.number(),
            st.epoch
        );
    }
    let ck = checkpoint_dir(dst);
    std::fs::create_dir_all(&ck).with_context(|| format!("creating {}", ck.display()))?;
    fork_weights(
        &checkpoint_dir(src).join(&st.model_file),
        &ck.join(&st.model_file),
        cfg,
    )
    .with_context(|| format!("copying the stage-I weights of {}", src.display()))?;
    let metrics_path = dst.join("metrics.jsonl");
    super::checkpoint::truncate_file(&metrics_path, 0)?;
    let mut w = MetricsWriter::open(&metrics_path)?;
    for r in read_metrics(&src.join("metrics.jsonl"))? {
        if r.stage == Some(Stage::Experts) {
            w.write(&r)?;
        }
    }
    let len = w.len()?;
    let mut ns = st.clone();
    ns.format = STATE_FORMAT;
    ns.config = cfg.clone();
    ns.finished = false;
    ns.test = None;
    ns.test_extra = None;
    ns.metrics_len = len;
    ns.optim_file = None;
    ns.best_file = None;
    cfg.write_snapshot(dst)?;
    write_json(&ck.join("state.json"), &ns)
}

/// Trains variant `v` in `dir` (reusing a finished run there whose config and data
/// fingerprint `data_fp` match, resuming an interrupted one, clearing any other).
fn run_variant(
    v: &Variant,
    seed: u64,
    dir: &Path,
    stage1_dir: &Path,
    data_fp: &str,
    opts: &AblateOptions,
) -> Result<VariantResult> {
    let run = RunDir::open(dir, RunKind::Train, Open::Reuse, "--out")?;
    let extra: Vec<MissingPolicy> = v
        .sim_rate
        .map(|r| {
            MissingPolicy::Simulated(MissingSim {
                rate: r,
                kind: MissingType::Mixed,
                seed: seed ^ 0x7e57,
            })
        })
        .into_iter()
        .collect();
    let state_path = checkpoint_dir(dir).join("state.json");
    let mut resume = false;
    if state_path.exists() {
        let st = read_state(&state_path)?;
        let same_data = st.data.as_ref().is_some_and(|d| d.fingerprint == data_fp);
        if st.config == v.cfg && same_data {
            let have_extra = st.test_extra.as_ref().map_or(0, Vec::len) == extra.len();
            if st.finished && have_extra {
                return Ok(VariantResult {
                    id: v.id.clone(),
                    seed,
                    test: st.test.unwrap_or_default(),
                    sim: st.test_extra.and_then(|e| e.into_iter().next()),
                    retrieval: Vec::new(),
                    retrieval_query: None,
                    detection: None,
                    reused: true,
                });
            }
            resume = !st.finished;
        }
    }
    if !resume {
        run.clear()?;
    }
    if !resume && v.cfg.stage1_enabled && v.id != "wo-stage2" {
        fork_stage1(stage1_dir, dir, &v.cfg)?;
        resume = true;
    }
    if !opts.quiet {
        println!("== seed {seed}: {} ==", v.id);
    }
    let ro = RunOptions {
        resume,
        quiet: opts.quiet,
        extra_eval: extra,
        device: opts.device.clone(),
        ..RunOptions::new(dir)
    };
    let s = train_in(&v.cfg, &ro, &run)
        .with_context(|| format!("ablation variant {} (seed {seed})", v.id))?;
    Ok(VariantResult {
        id: v.id.clone(),
        seed,
        test: s.test,
        sim: s.extra.into_iter().next(),
        retrieval: Vec::new(),
        retrieval_query: None,
        detection: None,
        reused: false,
    })
}

/// Retrieval quality of every variant with retrieval, one search per query mode (it
/// depends on the data and the mode only, not on the weights).
fn add_retrieval_quality(
    cfg: &TrainConfig,
    vars: &[Variant],
    results: &mut [VariantResult],
    opts: &AblateOptions,
) -> Result<()> {
    let mut done: Vec<(RetrievalQuery, Vec<RetrievalQuality>)> = Vec::new();
    let mut data = None;
    for r in results.iter_mut() {
        let Some(v) = vars.iter().find(|v| v.id == r.id) else {
            continue;
        };
        if !v.cfg.model.use_retrieval || !v.cfg.stage2_enabled {
            continue;
        }
        let q = v.cfg.model.recovery.query;
        r.retrieval_query = Some(q);
        if let Some((_, m)) = done.iter().find(|(dq, _)| *dq == q) {
            r.retrieval = m.clone();
            continue;
        }
        if data.is_none() {
            let splits = load_data(cfg)?;
            let banks = Banks::from_dataset(&splits.train, &opts.device)?;
            data = Some((splits, banks));
        }
        let Some((splits, banks)) = data.as_ref() else {
            continue;
        };
        let m = retrieval_quality::measure(splits, banks, q, cfg.eval_batch_size, &opts.device)?;
        r.retrieval = m.clone();
        done.push((q, m));
    }
    Ok(())
}

/// CAP's noise detection (at initialisation and trained) of every variant with retrieval
/// and CAP, on the synthetic set only (real data records no noise tokens).
fn add_noise_detection(
    cfg: &TrainConfig,
    vars: &[Variant],
    results: &mut [VariantResult],
    sdir: &Path,
    s1dir: &Path,
    opts: &AblateOptions,
) -> Result<()> {
    let mut data = None;
    for r in results.iter_mut() {
        let Some(v) = vars.iter().find(|v| v.id == r.id) else {
            continue;
        };
        let m = &v.cfg.model;
        if !(m.use_retrieval && m.use_cap && v.cfg.stage2_enabled && v.cfg.stage1_enabled) {
            continue;
        }
        if data.is_none() {
            data = noise_detection::synthetic_with_meta(cfg)?;
        }
        let Some(d) = data.as_ref() else {
            return Ok(());
        };
        let s1 = read_state(&checkpoint_dir(s1dir).join("state.json"))?;
        let s1file = checkpoint_dir(s1dir).join(&s1.model_file);
        r.detection = Some(
            noise_detection::measure_run(&sdir.join(&v.id), &s1file, d, &opts.device)
                .with_context(|| format!("noise detection of variant {}", v.id))?,
        );
    }
    Ok(())
}

/// Trains every variant of the chosen studies for every seed (reusing finished ones) and
/// writes `results.json` and the report; returns the path of the markdown report.
pub fn run_studies(base: &TrainConfig, opts: &AblateOptions) -> Result<PathBuf> {
    if opts.seeds.is_empty() {
        bail!("ablate: no seeds given");
    }
    let mut base = base.clone();
    base.absolute_paths()?;
    let base = &base;
    for &seed in &opts.seeds {
        let mut b = base.clone();
        b.seed = seed;
        b.apply_seed();
        if opts.quick {
            quick_cfg(&mut b);
        }
        b.validate()?;
        super::footprint::check_config(&b)?;
    }
    let _out = RunDir::open(&opts.out_dir, RunKind::Ablate, Open::Reuse, "--out")?;
    let mut results: Vec<VariantResult> = Vec::new();
    let mut notes = Vec::new();
    let t0 = std::time::Instant::now();
    for &seed in &opts.seeds {
        let mut b = base.clone();
        b.seed = seed;
        b.apply_seed();
        if opts.quick {
            quick_cfg(&mut b);
        }
        b.validate()?;
        let (vars, n) = variants(&b, &opts.studies);
        notes = n;
        let sdir = opts.out_dir.join(format!("seed{seed}"));
        // Stage I once per seed: the "w/o stage II" run.
        let mut s1 = b.clone();
        s1.stage2_enabled = false;
        s1.stage1_enabled = true;
        // Stage I never uses the retrieval safeguards or CAP's switches: one stage I
        // serves every setting.
        s1.model.recovery = RecoveryConfig::default();
        s1.model.cap = CapSettings::default();
        let s1v = Variant {
            id: "wo-stage2".into(),
            cfg: s1,
            sim_rate: None,
        };
        let needs_s1 = vars.iter().any(|v| v.cfg.stage1_enabled);
        let s1dir = sdir.join("wo-stage2");
        // Every variant of a seed trains on the same data.
        let data_fp = load_data_for(&b, None)?.fingerprint;
        if needs_s1 {
            let r = run_variant(&s1v, seed, &s1dir, &s1dir, &data_fp, opts)?;
            if vars.iter().any(|v| v.id == "wo-stage2") {
                results.push(r);
            }
        }
        let first = results.len();
        for v in vars.iter().filter(|v| v.id != "wo-stage2") {
            let r = run_variant(v, seed, &sdir.join(&v.id), &s1dir, &data_fp, opts)?;
            results.push(r);
        }
        add_retrieval_quality(&b, &vars, &mut results[first..], opts)?;
        add_noise_detection(&b, &vars, &mut results[first..], &sdir, &s1dir, opts)?;
    }
    write_json(&opts.out_dir.join("results.json"), &results)?;
    let path = write_report(opts, &results, &notes, t0.elapsed().as_secs_f64())?;
    Ok(path)
}

/// Table 2 additions: the paper's plain retrieval next to the default (when both ran)
/// and the retrieval quality of every variant with retrieval.
fn paper_rows_and_quality(agg: &Agg, results: &[VariantResult]) -> String {
    let mut md = String::new();
    if agg.has(PAPER_CMR_ONLY) || agg.has(PAPER_FULL) {
        let _ = writeln!(
            md,
            "\nRetrieval as in the paper (cross-modal key search, mean of Eq. 4, no gate, no router \
             statistics) and CAP as in the paper (Eq. 5-8 with the straight-through gate, \
             `--paper-cap`) against the defaults:\n\n\
             | retrieval | CAP | missing audio | missing visual | complete | missing avg |\n|---|---|---:|---:|---:|---:|"
        );
        for (id, r, c) in [
            (PAPER_CMR_ONLY, "paper", ""),
            (PAPER_FULL, "paper", "paper"),
            ("cmr1-cap0", "safe", ""),
            (PAPER_CAP, "safe", "paper"),
            ("full", "safe", "default"),
        ] {
            if agg.has(id) {
                let _ = writeln!(md, "| {r} | {c} | {} |", agg.setting_cells(id));
            }
        }
    }
    let mut rows: Vec<(String, RetrievalQuery, Vec<Vec<RetrievalQuality>>)> = Vec::new();
    for r in results.iter().filter(|r| !r.retrieval.is_empty()) {
        let q = r.retrieval_query.unwrap_or(RetrievalQuery::CrossKey);
        match rows.iter_mut().find(|x| x.0 == r.id) {
            Some(x) => x.2.push(r.retrieval.clone()),
            None => rows.push((r.id.clone(), q, vec![r.retrieval.clone()])),
        }
    }
    if !rows.is_empty() {
        md.push('\n');
        md.push_str(&retrieval_quality::report_section(&rows));
    }
    md
}

/// CAP noise detection of every variant that has it, in variant order.
fn detection_section(results: &[VariantResult]) -> String {
    let mut rows: Vec<(String, String, Vec<DetectionPair>)> = Vec::new();
    for r in results {
        let Some(d) = r.detection.as_ref() else {
            continue;
        };
        match rows.iter_mut().find(|x| x.0 == r.id) {
            Some(x) => x.2.push(d.clone()),
            None => rows.push((r.id.clone(), variant_label(&r.id), vec![d.clone()])),
        }
    }
    noise_detection::report_section(&rows)
}

/// What a Table 2 variant with CAP is, in words.
fn variant_label(id: &str) -> String {
    match id {
        "full" => "safe retrieval + CAP".into(),
        PAPER_FULL => "paper retrieval + paper CAP".into(),
        PAPER_CAP => "safe retrieval + paper CAP".into(),
        other => CAP_VARIANTS
            .iter()
            .find(|(id, _, _)| *id == other)
            .map_or_else(|| other.into(), |(_, what, _)| (*what).into()),
    }
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}

struct Agg<'a> {
    by_id: BTreeMap<&'a str, Vec<&'a VariantResult>>,
}

impl<'a> Agg<'a> {
    fn new(rs: &'a [VariantResult]) -> Self {
        let mut by_id: BTreeMap<&str, Vec<&VariantResult>> = BTreeMap::new();
        for r in rs {
            by_id.entry(r.id.as_str()).or_default().push(r);
        }
        Self { by_id }
    }
    fn has(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }
    /// (mean, std) in % of `f` over seeds.
    fn stat(&self, id: &str, f: impl Fn(&VariantResult) -> Option<f64>) -> Option<(f64, f64)> {
        let v: Vec<f64> = self
            .by_id
            .get(id)?
            .iter()
            .filter_map(|r| f(r))
            .map(|x| 100.0 * x)
            .collect();
        (!v.is_empty()).then(|| mean_std(&v))
    }
    fn setting(&self, id: &str, s: &str) -> Option<(f64, f64)> {
        self.stat(id, |r| {
            r.test.iter().find(|e| e.setting == s).map(|e| e.acc())
        })
    }
    fn miss(&self, id: &str) -> Option<(f64, f64)> {
        self.stat(id, |r| missing_avg(&r.test))
    }
    /// The cells "missing audio | missing visual | complete | missing avg" of variant `id`.
    fn setting_cells(&self, id: &str) -> String {
        format!(
            "{} | {} | {} | {}",
            fmt_mean_std(self.setting(id, "missing-audio")),
            fmt_mean_std(self.setting(id, "missing-visual")),
            fmt_mean_std(self.setting(id, "complete")),
            fmt_mean_std(self.miss(id))
        )
    }
}

/// `mean ± std` with two decimals, `-` when there is nothing.
fn fmt_mean_std(x: Option<(f64, f64)>) -> String {
    match x {
        Some((m, s)) => format!("{m:.2} ± {s:.2}"),
        None => "-".into(),
    }
}

/// Writes `<out>/report.md` (a section per study that ran, the notes, every variant) and
/// its plots; returns the report's path.
fn write_report(
    opts: &AblateOptions,
    results: &[VariantResult],
    notes: &[String],
    secs: f64,
) -> Result<PathBuf> {
    let agg = Agg::new(results);
    let figures = Figures::new(&opts.out_dir)?;
    let mut md = report_header(opts, secs);
    if opts.studies.contains(&Study::Table2) {
        table2_section(&mut md, &agg, &figures)?;
        md.push_str(&paper_rows_and_quality(&agg, results));
        md.push_str(&detection_section(results));
    }
    if opts.studies.contains(&Study::Cap) {
        cap_section(&mut md, &agg);
        if !opts.studies.contains(&Study::Table2) {
            md.push_str(&detection_section(results));
        }
    }
    if opts.studies.contains(&Study::Strategy) {
        strategy_section(&mut md, &agg);
    }
    if opts.studies.contains(&Study::N) {
        let title = "Retrieved candidates n (Fig. 4)";
        sweep_section(&mut md, &agg, &figures, title, "n", &N_VALUES)?;
    }
    if opts.studies.contains(&Study::K) {
        let title = "Purification budget k (Fig. 4)";
        sweep_section(&mut md, &agg, &figures, title, "k", &K_VALUES)?;
    }
    if opts.studies.contains(&Study::Rate) {
        rate_section(&mut md, &agg, &figures)?;
    }
    notes_section(&mut md, notes);
    reuse_section(&mut md, results);
    variants_section(&mut md, &agg);
    let path = opts.out_dir.join("report.md");
    atomic_write(&path, md.as_bytes())?;
    Ok(path)
}

/// Title, seeds, wall time and what "missing avg" means.
fn report_header(opts: &AblateOptions, secs: f64) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# r2scp ablations\n");
    let _ = writeln!(
        md,
        "Seeds: {:?}{}. Test accuracy in % (mean ± sample std over seeds). Wall time {:.0}s.\n",
        opts.seeds,
        if opts.quick {
            " (--quick: reduced data and epochs)"
        } else {
            ""
        },
        secs
    );
    let _ = writeln!(
        md,
        "\"Missing avg\" is the mean of the missing-audio and missing-visual settings (the metric of the paper's Table 3).\n"
    );
    if !cfg!(feature = "cli") {
        let _ = writeln!(md, "{NOT_DRAWN}\n");
    }
    md
}

/// Ends a section with its plot: test accuracy (%) against `x`, drawn into
/// `plots/<name>.png` and linked (only the blank line when the build draws no plots).
fn accuracy_plot(
    md: &mut String,
    figures: &Figures,
    name: &str,
    title: &str,
    x: &str,
    series: &[Series],
) -> Result<()> {
    let labels = Labels {
        title,
        x,
        y: "test accuracy (%)",
    };
    match figures.line_plot(name, labels, series)? {
        Some(link) => {
            let _ = write!(md, "\n{link}\n\n");
        }
        None => md.push('\n'),
    }
    Ok(())
}

/// Table 2: accuracy per setting for CMR/CAP on and off, the missing average, one plot.
fn table2_section(md: &mut String, agg: &Agg, figures: &Figures) -> Result<()> {
    let _ = writeln!(md, "## Retrieval (CMR) and purification (CAP), Table 2\n");
    let _ = writeln!(
        md,
        "| A | V | CMR | CAP | accuracy |\n|---|---|---|---|---:|"
    );
    let combos = [
        ("cmr0-cap0", "", ""),
        ("cmr0-cap1", "", "✓"),
        ("cmr1-cap0", "✓", ""),
        ("full", "✓", "✓"),
    ];
    for (s, a, v) in [
        ("missing-visual", "●", "○"),
        ("missing-audio", "○", "●"),
        ("complete", "●", "●"),
    ] {
        for (id, r, c) in combos {
            let _ = writeln!(
                md,
                "| {a} | {v} | {r} | {c} | {} |",
                fmt_mean_std(agg.setting(id, s))
            );
        }
    }
    let _ = writeln!(md, "\n| CMR | CAP | missing avg |\n|---|---|---:|");
    for (id, r, c) in combos {
        let _ = writeln!(md, "| {r} | {c} | {} |", fmt_mean_std(agg.miss(id)));
    }
    let series: Vec<Series> = ["missing-audio", "missing-visual", "complete"]
        .iter()
        .map(|s| {
            Series::new(
                *s,
                combos
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (id, _, _))| agg.setting(id, s).map(|(m, _)| (i as f64, m)))
                    .collect(),
            )
        })
        .collect();
    let title = "CMR/CAP: 0 none, 1 CAP only, 2 CMR only, 3 both";
    accuracy_plot(md, figures, "table2", title, "variant", &series)
}

/// The CAP study: accuracy of each CAP switch against the default CAP, the paper's CAP
/// and no CAP (all with the base retrieval).
fn cap_section(md: &mut String, agg: &Agg) {
    let _ = writeln!(
        md,
        "## CAP switches

| variant | CAP | missing audio | missing visual | complete | missing avg |
         |---|---|---:|---:|---:|---:|"
    );
    let mut rows: Vec<(&str, &str)> = vec![
        ("cmr1-cap0", "none"),
        ("full", "default"),
        (PAPER_CAP, "paper (`--paper-cap`)"),
    ];
    rows.extend(CAP_VARIANTS.iter().map(|(id, what, _)| (*id, *what)));
    for (id, what) in rows {
        if agg.has(id) {
            let _ = writeln!(md, "| {id} | {what} | {} |", agg.setting_cells(id));
        }
    }
    md.push('\n');
}

/// Table 3: the full model against each training strategy left out.
fn strategy_section(md: &mut String, agg: &Agg) {
    let _ = writeln!(
        md,
        "## Training strategy, Table 3\n\n| Method | missing avg | complete |\n|---|---:|---:|"
    );
    for (id, label) in [
        ("full", "R2ScP (full)"),
        (
            "wo-stage1",
            "w/o modality-specific expert pre-training (stage I)",
        ),
        ("wo-stage2", "w/o expert mixing training (stage II)"),
        ("wo-rank", "w/o ranking loss"),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {} | {} |",
            fmt_mean_std(agg.miss(id)),
            fmt_mean_std(agg.setting(id, "complete"))
        );
    }
    md.push('\n');
}

/// A sweep over one option `name` (`n` or `k`, variant ids `<name><value>`; the value of
/// the base config is the `full` variant): a table and a plot `<name>.png`.
fn sweep_section(
    md: &mut String,
    agg: &Agg,
    figures: &Figures,
    title: &str,
    name: &str,
    vals: &[usize],
) -> Result<()> {
    let _ = writeln!(
        md,
        "## {title}\n\n| {name} | missing avg | complete |\n|---:|---:|---:|"
    );
    let mut pts = Vec::new();
    let mut cpts = Vec::new();
    for &x in vals {
        let own = format!("{name}{x}");
        let id = if agg.has(&own) { own } else { "full".into() };
        if !agg.has(&id) {
            continue;
        }
        let m = agg.miss(&id);
        let c = agg.setting(&id, "complete");
        let _ = writeln!(md, "| {x} | {} | {} |", fmt_mean_std(m), fmt_mean_std(c));
        pts.extend(m.map(|(v, _)| (x as f64, v)));
        cpts.extend(c.map(|(v, _)| (x as f64, v)));
    }
    let series = [
        Series::new("missing avg", pts),
        Series::new("complete", cpts),
    ];
    accuracy_plot(md, figures, name, title, name, &series)
}

/// Fig. 5: each training/test missing rate, the full model against no CMR/CAP.
fn rate_section(md: &mut String, agg: &Agg, figures: &Figures) -> Result<()> {
    let _ = writeln!(
        md,
        "## Missing rate (Fig. 5)\n\nTrained and tested with the same rate (mixed audio/visual); \
         the last two columns are the fixed missing-audio/missing-visual average.\n\n\
         | rate | R2ScP (sim) | no CMR/CAP (sim) | R2ScP missing avg | no CMR/CAP missing avg |\n|---:|---:|---:|---:|---:|"
    );
    let mut full_pts = Vec::new();
    let mut base_pts = Vec::new();
    for r in RATES {
        let pct = (r * 100.0).round() as u32;
        let pick = |a: &str, b: &str| {
            if agg
                .by_id
                .get(a)
                .is_some_and(|v| v.iter().any(|x| x.sim.is_some()))
            {
                a.to_string()
            } else {
                b.to_string()
            }
        };
        let fid = pick(&format!("rate{pct}"), "full");
        let bid = pick(&format!("rate{pct}-cmr0-cap0"), "cmr0-cap0");
        let fs = agg.stat(&fid, |x| x.sim.as_ref().map(|e| e.acc()));
        let bs = agg.stat(&bid, |x| x.sim.as_ref().map(|e| e.acc()));
        let _ = writeln!(
            md,
            "| {pct}% | {} | {} | {} | {} |",
            fmt_mean_std(fs),
            fmt_mean_std(bs),
            fmt_mean_std(agg.miss(&fid)),
            fmt_mean_std(agg.miss(&bid))
        );
        full_pts.extend(fs.map(|(m, _)| (pct as f64, m)));
        base_pts.extend(bs.map(|(m, _)| (pct as f64, m)));
    }
    let series = [
        Series::new("R2ScP", full_pts),
        Series::new("no CMR / no CAP", base_pts),
    ];
    accuracy_plot(
        md,
        figures,
        "rate",
        "Missing rate",
        "missing rate (%)",
        &series,
    )
}

/// What the variant list left out, and why.
fn notes_section(md: &mut String, notes: &[String]) {
    if !notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
}

/// Which variant runs were taken from an earlier `ablate` (same config and data
/// fingerprint) and which were trained by this one.
fn reuse_section(md: &mut String, results: &[VariantResult]) {
    let list = |reused: bool| {
        let v: Vec<String> = results
            .iter()
            .filter(|r| r.reused == reused)
            .map(|r| format!("{} (seed {})", r.id, r.seed))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        md,
        "## Reused runs

Reused from an earlier run of `ablate` (same config, same data \
         fingerprint): {}.

Trained by this run: {}.
",
        list(true),
        list(false)
    );
}

/// Every variant's three settings and missing average.
fn variants_section(md: &mut String, agg: &Agg) {
    let _ = writeln!(md, "## All variants (Table 1 average over the three settings)\n\n| variant | missing audio | missing visual | complete | missing avg |\n|---|---:|---:|---:|---:|");
    for id in agg.by_id.keys() {
        let _ = writeln!(md, "| {id} | {} |", agg.setting_cells(id));
    }
}
