//! The training run: data, model, the two stages, checkpoints, resume and the final
//! evaluation.
//!
//! Determinism: parameters are initialised from `(seed, var name)` ([`super::init`]); the
//! data order, the simulated missing masks and the dropout stream of every epoch are
//! functions of `(seed, stage, epoch)` only ([`derive_seed`]). A checkpoint therefore only
//! needs the parameters, the AdamW moments, the step/epoch counters and the early-stopping
//! state to continue exactly where an interrupted run stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::checkpoint::{load_tensors, save_tensors, truncate_file, write_json};
use super::config::TrainConfig;
use super::eval::{evaluate, evaluate_table, mean_acc, EvalResult, Predictor};
use super::footprint;
use super::init::seeded_var_builder;
use super::loss::{correct, cross_entropy_per_sample, rank_terms, weighted_mean};
use super::metrics::{MetricsWriter, Record};
use super::optim::{AdamW, AdamWParams, Schedule};
use super::progress::EpochBar;
use super::run_dir::{Open, RunDir, RunKind};
use super::stage::Stage;
use super::state::{checkpoint_dir, find_state, read_state, DataRecord, TrainState};
use crate::data::{
    batches, fingerprint, generate, load_music_avqa_full, map_splits, AvqaOptions, Batch, DataDims,
    Loaded, MissingPolicy, MissingSim, ModelVocab, QuestionType, Splits,
};
use crate::model::{is_expert_var, Banks, ForwardOptions, R2scp};

/// Purpose tags of [`derive_seed`].
#[derive(Debug, Clone, Copy)]
pub enum SeedTag {
    /// Data order of an epoch.
    Order = 1,
    /// Simulated missing masks of an epoch.
    Missing = 2,
    /// Dropout stream of an epoch.
    Dropout = 3,
    /// Parameter initialisation.
    Init = 4,
}

/// SplitMix64 of `(seed, stage, epoch, tag)`: the seed of one purpose in one epoch.
/// `stage` is `None` for seeds tied to no stage (initialisation, with epoch 0); it enters
/// the hash as its number (1, 2; 0 for `None`), so the seeds are those of the `u8` stages
/// that came before the [`Stage`] enum.
pub fn derive_seed(seed: u64, stage: Option<Stage>, epoch: usize, tag: SeedTag) -> u64 {
    let stage = stage.map_or(0, Stage::number);
    let mut z = seed
        ^ (stage as u64).wrapping_mul(0xA24B_AED4_963E_E407)
        ^ (epoch as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25)
        ^ (tag as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Load the data set a config names: the MUSIC-AVQA directory, or the synthetic set.
pub fn load_data(cfg: &TrainConfig) -> Result<Splits> {
    Ok(load_data_for(cfg, None)?.splits)
}

/// [`load_data`] with the data's fingerprint; with `model`, mapped onto a trained model's
/// vocabularies ([`crate::data::mapping`]).
pub fn load_data_for(cfg: &TrainConfig, model: Option<ModelVocab>) -> Result<Loaded> {
    let loaded = match &cfg.data {
        Some(dir) => {
            let opts = AvqaOptions {
                unknown_answer: cfg.unknown_answer,
                ..AvqaOptions::default()
            };
            load_music_avqa_full(dir, &opts, model)
                .with_context(|| format!("loading MUSIC-AVQA features from {}", dir.display()))?
        }
        None => {
            footprint::check_config(cfg)?;
            let splits = generate(&cfg.synthetic).context("generating the synthetic data set")?;
            let fingerprint = fingerprint::of_splits("synthetic", &splits)?;
            let (splits, mapping) = match model {
                Some(m) => {
                    let (s, m) = map_splits(&splits, m)?;
                    (s, Some(m))
                }
                None => (splits, None),
            };
            Loaded {
                splits,
                fingerprint,
                mapping,
            }
        }
    };
    loaded.splits.validate()?;
    Ok(loaded)
}

/// Bytes of the tensors of `splits`.
fn data_bytes(splits: &Splits) -> u128 {
    [&splits.train, &splits.val, &splits.test]
        .iter()
        .flat_map(|d| {
            [
                &d.audio,
                &d.visual,
                &d.audio_key,
                &d.visual_key,
                &d.questions,
            ]
        })
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u128)
        .sum()
}

/// Data, memory banks and a freshly initialised model.
pub struct Session {
    /// The resolved configuration.
    pub cfg: TrainConfig,
    /// Train/val/test splits (CPU).
    pub splits: Splits,
    /// Memory banks from the train split, on `device`.
    pub banks: Banks,
    /// All parameters, by name.
    pub varmap: VarMap,
    /// The model.
    pub model: R2scp,
    /// Compute device.
    pub device: Device,
    /// The data's fingerprint, the model's shapes and vocabularies (what a checkpoint
    /// records).
    pub data: DataRecord,
}

impl Session {
    /// Load the data and build the model (seeded initialisation).
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let loaded = load_data_for(cfg, None)?;
        Self::build(cfg, loaded.splits, loaded.fingerprint, None, device)
    }

    /// Build banks and the model over already-loaded splits.
    pub fn from_splits(cfg: &TrainConfig, splits: Splits, device: &Device) -> Result<Self> {
        let fp = fingerprint::of_splits("splits", &splits)?;
        Self::build(cfg, splits, fp, None, device)
    }

    /// Build banks and the model over `splits` with fingerprint `fp`; the model's shapes
    /// are `dims` (a checkpoint's, for data mapped onto its vocabularies) or the data's.
    /// Refuses, before allocating, a model, bank and batch that need more than the memory
    /// limit ([`footprint`]) and an `n_retrieved` larger than the bank can give.
    fn build(
        cfg: &TrainConfig,
        splits: Splits,
        fp: String,
        dims: Option<DataDims>,
        device: &Device,
    ) -> Result<Self> {
        let dims = dims.unwrap_or_else(|| splits.dims());
        let n_train = splits.train.n_clips();
        footprint::check_loaded(cfg, &dims, n_train, data_bytes(&splits))?;
        check_bank_size(cfg, n_train)?;
        let banks = Banks::from_dataset(&splits.train, device)?;
        let varmap = VarMap::new();
        let vb = seeded_var_builder(
            &varmap,
            derive_seed(cfg.seed, None, 0, SeedTag::Init),
            device,
        );
        let model = R2scp::new(&cfg.model, &dims, vb).context("building the model")?;
        let data = DataRecord {
            fingerprint: fp,
            dims,
            words: splits.train.vocab.clone(),
            answers: splits.train.answer_vocab.clone(),
        };
        Ok(Self {
            cfg: cfg.clone(),
            splits,
            banks,
            varmap,
            model,
            device: device.clone(),
            data,
        })
    }

    /// All parameters as named tensors.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("VarMap lock poisoned"))?;
        Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect())
    }

    /// Save all parameters to `path` (safetensors, atomically).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        save_tensors(path, &self.weights()?)
    }

    /// Set every parameter from a safetensors file; the file must hold exactly this
    /// model's parameters with their shapes and dtypes (errors name the file and the
    /// parameter).
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let file = load_tensors(path, &self.device)?;
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("VarMap lock poisoned"))?;
        for (name, var) in data.iter() {
            let t = file.get(name).ok_or_else(|| {
                anyhow!(
                    "checkpoint file {} has no parameter {name:?} (not a checkpoint of this model)",
                    path.display()
                )
            })?;
            if t.dims() != var.as_tensor().dims() {
                bail!(
                    "checkpoint file {}: parameter {name:?} has shape {:?}, expected {:?}",
                    path.display(),
                    t.dims(),
                    var.as_tensor().dims()
                );
            }
            if t.dtype() != var.as_tensor().dtype() {
                bail!(
                    "checkpoint file {}: parameter {name:?} has dtype {:?}, expected {:?}",
                    path.display(),
                    t.dtype(),
                    var.as_tensor().dtype()
                );
            }
            var.set(t)
                .with_context(|| format!("checkpoint file {}: {name}", path.display()))?;
        }
        if let Some(extra) = file.keys().find(|k| !data.contains_key(*k)) {
            bail!(
                "checkpoint file {} has parameter {extra:?} that this model does not have",
                path.display()
            );
        }
        Ok(())
    }
}

/// Options of a run that are not part of its configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `runs/<name>`: metrics, checkpoint, report and plots go here.
    pub run_dir: PathBuf,
    /// Continue from `run_dir/checkpoint/state.json` (the saved config is used).
    pub resume: bool,
    /// Replace a run directory r2scp created that already holds a checkpoint (`--force`):
    /// its outputs are deleted first. A directory without the run marker is never touched
    /// ([`super::run_dir`]).
    pub force: bool,
    /// No progress bars and no per-epoch lines on stdout.
    pub quiet: bool,
    /// Stop (as if interrupted) after this many epochs completed by this process,
    /// checkpoint written. Used to test `--resume`.
    pub halt_after_epochs: Option<usize>,
    /// Write `report.md` and the PNG plots at the end.
    pub report: bool,
    /// Extra test settings evaluated at the end (e.g. a simulated missing rate), kept
    /// apart from the Table-1 rows.
    pub extra_eval: Vec<MissingPolicy>,
    /// Compute device.
    pub device: Device,
}

impl RunOptions {
    /// Defaults: fresh run on CPU, with progress output and a report.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            resume: false,
            force: false,
            quiet: false,
            halt_after_epochs: None,
            report: true,
            extra_eval: Vec::new(),
            device: Device::Cpu,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run directory.
    pub run_dir: PathBuf,
    /// Stopped early by `halt_after_epochs` (no test results).
    pub halted: bool,
    /// Test results per setting (missing audio, missing visual, complete).
    pub test: Vec<EvalResult>,
    /// Results of [`RunOptions::extra_eval`].
    pub extra: Vec<EvalResult>,
    /// Best validation accuracy of the last stage.
    pub best_val: Option<f64>,
    /// Wall-clock seconds spent in this process.
    pub secs: f64,
}

/// Running sums of updates: loss, samples and correct answers.
#[derive(Default)]
struct Tally {
    n_steps: usize,
    n_samples: usize,
    correct: usize,
    loss: f64,
}

impl Tally {
    /// One update over `samples` samples, `correct` of them answered right, loss `loss`.
    fn add(&mut self, samples: usize, correct: usize, loss: f64) {
        self.n_steps += 1;
        self.n_samples += samples;
        self.correct += correct;
        self.loss += loss;
    }

    fn mean_loss(&self) -> f64 {
        self.loss / self.n_steps.max(1) as f64
    }

    /// Accuracy in %, computed as 100 * correct / samples (in this order: the printed
    /// figures round the same way as they always have).
    fn percent_correct(&self) -> f64 {
        100.0 * self.correct as f64 / self.n_samples.max(1) as f64
    }

    /// Samples per second since `since`.
    fn throughput(&self, since: Instant) -> f64 {
        self.n_samples as f64 / since.elapsed().as_secs_f64().max(1e-9)
    }
}

/// Running sums over a logging window: a [`Tally`], the loss parts and accuracies of the
/// stage, and the router weights.
#[derive(Default)]
struct Window {
    tally: Tally,
    parts: Vec<(String, f64)>,
    router: [f64; 3],
    router_n: usize,
    started: Option<Instant>,
}

impl Window {
    fn add_part(&mut self, name: &str, v: f64) {
        if let Some(p) = self.parts.iter_mut().find(|p| p.0 == name) {
            p.1 += v;
        } else {
            self.parts.push((name.to_string(), v));
        }
    }
}

/// One training run (see the module docs).
struct Trainer<'a> {
    s: Session,
    opts: &'a RunOptions,
    state: TrainState,
    metrics: MetricsWriter,
    start: Instant,
    epochs_done_here: usize,
}

enum Flow {
    Done,
    Halted,
}

/// Train (or resume) a run and evaluate it. See [`RunOptions`].
///
/// The run directory is locked from before the first write to the end ([`RunDir`]): a
/// second process on it fails at once. A new run that fails before its first checkpoint
/// leaves no directory behind (when this call created it).
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let mut cfg = cfg.clone();
    let how = if opts.resume {
        Open::Resume
    } else {
        cfg.absolute_paths()?;
        cfg.validate()?;
        footprint::check_config(&cfg)?;
        Open::Fresh { force: opts.force }
    };
    let dir = RunDir::open(&opts.run_dir, RunKind::Train, how, "--name")?;
    let r = train_in(&cfg, opts, &dir);
    if r.is_err() && !checkpoint_dir(&opts.run_dir).join("state.json").exists() {
        dir.remove_if_created();
    }
    r
}

/// [`train`] in a run directory the caller has opened (and holds locked).
pub(crate) fn train_in(cfg: &TrainConfig, opts: &RunOptions, _dir: &RunDir) -> Result<RunSummary> {
    let start = Instant::now();
    let ckpt = checkpoint_dir(&opts.run_dir);
    let state_path = ckpt.join("state.json");
    let metrics_path = opts.run_dir.join("metrics.jsonl");
    if opts.resume {
        // Temporary files of writes a kill interrupted; they are never read.
        super::checkpoint::remove_temp_files(&ckpt);
        super::checkpoint::remove_temp_files(&opts.run_dir);
    }
    let saved_cfg = opts.run_dir.join(super::config::SNAPSHOT_FILE);
    // A run killed before its first checkpoint has only its config: resuming starts it over.
    let restart = opts.resume && find_state(&opts.run_dir).is_err() && saved_cfg.is_file();
    let (cfg, state) = if opts.resume && !restart {
        let st = read_state(&find_state(&opts.run_dir)?)?;
        truncate_file(&metrics_path, st.metrics_len)?;
        (st.config.clone(), Some(st))
    } else {
        let cfg = &if restart {
            TrainConfig::read_snapshot(&opts.run_dir)?
        } else {
            cfg.clone()
        };
        if state_path.exists() {
            bail!(
                "run directory {} already holds a checkpoint; use --resume to continue it or choose another --name",
                opts.run_dir.display()
            );
        }
        cfg.validate()?;
        std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;
        truncate_file(&metrics_path, 0)?;
        cfg.write_snapshot(&opts.run_dir)?;
        (cfg.clone(), None)
    };
    let s = Session::new(&cfg, &opts.device)?;
    let fresh = state.is_none();
    let state = match state {
        Some(mut st) => {
            match &st.data {
                Some(rec) if *rec != s.data => bail!(
                    "the data {} changed since run {} started (fingerprint {}, now {}); resuming \
                     would continue on other data: restore the data, or start a new run (another \
                     --name, or --force)",
                    data_name(&cfg),
                    opts.run_dir.display(),
                    rec.fingerprint,
                    s.data.fingerprint
                ),
                Some(_) => {}
                None => {
                    eprintln!(
                        "note: run {} records no data fingerprint (an older r2scp wrote it); \
                         recording that of {} as it is now ({})",
                        opts.run_dir.display(),
                        data_name(&cfg),
                        s.data.fingerprint
                    );
                    st.data = Some(s.data.clone());
                }
            }
            s.load_weights(&ckpt.join(&st.model_file))?;
            st
        }
        None => TrainState {
            data: Some(s.data.clone()),
            ..TrainState::new(&cfg)
        },
    };
    let metrics = MetricsWriter::open(&metrics_path)?;
    let mut t = Trainer {
        s,
        opts,
        state,
        metrics,
        start,
        epochs_done_here: 0,
    };
    if !opts.quiet {
        let what = if fresh { "training" } else { "resuming" };
        println!(
            "{what} {} on {} ({} train / {} val / {} test questions)",
            opts.run_dir.display(),
            cfg.data
                .as_ref()
                .map_or("the synthetic set".to_string(), |d| d.display().to_string()),
            t.s.splits.train.len(),
            t.s.splits.val.len(),
            t.s.splits.test.len()
        );
    }
    t.train_and_test()
}

impl Trainer<'_> {
    fn cfg(&self) -> &TrainConfig {
        &self.s.cfg
    }

    /// Trains the stages not done yet, tests the model (Table-1 rows and
    /// [`RunOptions::extra_eval`]) and writes the report.
    fn train_and_test(&mut self) -> Result<RunSummary> {
        if !self.state.finished {
            for stage in Stage::ALL {
                if !self.cfg().stage_enabled(stage)
                    || (self.state.stage > stage)
                    || (self.state.stage == stage && self.state.stage_done)
                {
                    continue;
                }
                if self.state.stage < stage {
                    // previous stage finished: start this one fresh
                    self.state.begin_stage(stage);
                }
                if let Flow::Halted = self.train_stage(stage)? {
                    return Ok(RunSummary {
                        run_dir: self.opts.run_dir.clone(),
                        halted: true,
                        test: Vec::new(),
                        extra: Vec::new(),
                        best_val: self.state.best_val,
                        secs: self.start.elapsed().as_secs_f64(),
                    });
                }
            }
            self.finish()?;
        }
        if self.state.test_extra.as_ref().map_or(0, Vec::len) != self.opts.extra_eval.len() {
            self.test_extra_settings()?;
        }
        let test = self.state.test.clone().unwrap_or_default();
        if self.opts.report {
            super::report::write_run_report(&self.opts.run_dir, &self.state)?;
        }
        Ok(RunSummary {
            run_dir: self.opts.run_dir.clone(),
            halted: false,
            test,
            extra: self.state.test_extra.clone().unwrap_or_default(),
            best_val: self.state.best_val,
            secs: self.start.elapsed().as_secs_f64(),
        })
    }

    /// Tests the model under each of [`RunOptions::extra_eval`] and saves the results in
    /// the state.
    fn test_extra_settings(&mut self) -> Result<()> {
        self.state.test_extra = Some(self.test_under(&self.opts.extra_eval)?);
        self.save_state()
    }

    /// Accuracy on the test split under each missing-modality policy.
    fn test_under(&self, policies: &[MissingPolicy]) -> Result<Vec<EvalResult>> {
        policies
            .iter()
            .map(|p| {
                evaluate(
                    &self.s.model,
                    &self.s.splits.test,
                    &self.s.banks,
                    *p,
                    self.cfg().eval_batch_size,
                    self.predictor(),
                    &self.s.device,
                )
            })
            .collect()
    }

    /// Writes `checkpoint/state.json` (atomically; the commit point of a checkpoint).
    fn save_state(&self) -> Result<()> {
        write_json(
            &checkpoint_dir(&self.opts.run_dir).join("state.json"),
            &self.state,
        )
    }

    fn predictor(&self) -> Predictor {
        if self.cfg().stage2_enabled {
            Predictor::Full
        } else {
            Predictor::Experts
        }
    }

    fn finish(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let rows = self.test_under(&MissingPolicy::EVAL_SETTINGS)?;
        for r in &rows {
            let mut rec = Record {
                kind: "test".into(),
                stage: None,
                epoch: 0,
                step: 0,
                loss: Some(r.loss),
                acc: Some(r.acc()),
                router: (self.predictor() == Predictor::Full).then_some(r.router),
                setting: Some(r.setting.clone()),
                secs: Some(self.start.elapsed().as_secs_f64()),
                ..Default::default()
            };
            for q in QuestionType::ALL {
                if let Some(a) = r.type_acc(q) {
                    rec.extra.insert(format!("qt.{}", q.as_str()), a);
                }
            }
            self.metrics.write(&rec)?;
        }
        if !self.opts.quiet {
            println!(
                "test ({:.1}s): {}  | average {:.2}%",
                t0.elapsed().as_secs_f64(),
                rows.iter()
                    .map(|r| format!("{} {:.2}%", r.setting, 100.0 * r.acc()))
                    .collect::<Vec<_>>()
                    .join(", "),
                100.0 * mean_acc(&rows)
            );
        }
        self.state.test = Some(rows);
        self.state.finished = true;
        self.state.metrics_len = self.metrics.len()?;
        self.save_state()
    }

    fn train_stage(&mut self, stage: Stage) -> Result<Flow> {
        let cfg = self.cfg().clone();
        let sc = cfg.stage(stage).clone();
        let frozen = stage == Stage::Mixing && cfg.stage1_enabled;
        self.s.model.set_experts_frozen(frozen);
        let trainable = move |n: &str| match stage {
            Stage::Experts => is_expert_var(n),
            Stage::Mixing => !frozen || !is_expert_var(n),
        };
        let params = AdamWParams {
            lr: sc.lr,
            weight_decay: cfg.weight_decay,
            grad_clip: cfg.grad_clip,
            ..AdamWParams::default()
        };
        let mut opt = AdamW::from_varmap(&self.s.varmap, trainable, params)?;
        let ckpt = checkpoint_dir(&self.opts.run_dir);
        if let Some(f) = &self.state.optim_file {
            let t = load_tensors(&ckpt.join(f), &self.s.device)?;
            opt.load_state(&t, self.state.step)
                .with_context(|| format!("checkpoint file {}", ckpt.join(f).display()))?;
        }
        let n_train = self.s.splits.train.len();
        let spe = n_train.div_ceil(cfg.batch_size) as u64;
        let total = spe * sc.epochs as u64;
        let sched = Schedule {
            peak: sc.lr,
            warmup: (sc.warmup_frac * total as f64).round() as u64,
            total,
            min_frac: cfg.min_lr_frac,
            decay: cfg.decay,
        };
        let first = self.state.epoch + 1;
        for epoch in first..=sc.epochs {
            self.train_epoch(stage, epoch, &mut opt, &sched, spe)?;
            self.state.step = opt.step_count();
            let val = self.validate(stage, epoch)?;
            let improved = self.state.best_val.is_none_or(|b| val > b);
            let tag = format!("s{}e{epoch}", stage.number());
            if improved {
                self.state.best_val = Some(val);
                self.state.best_epoch = epoch;
                self.state.bad_epochs = 0;
                let f = format!("best-{tag}.safetensors");
                self.s.save_weights(&ckpt.join(&f))?;
                self.state.best_file = Some(f);
            } else {
                self.state.bad_epochs += 1;
            }
            let early = sc.patience > 0 && self.state.bad_epochs >= sc.patience;
            let done = early || epoch == sc.epochs;
            if done && !improved {
                if let Some(f) = &self.state.best_file {
                    self.s.load_weights(&ckpt.join(f))?;
                }
            }
            if !self.opts.quiet {
                println!(
                    "{stage} epoch {epoch}/{}: val {:.2}%{}{}",
                    sc.epochs,
                    100.0 * val,
                    if improved { " (best)" } else { "" },
                    if early {
                        format!(
                            " - early stop, keeping epoch {} ({:.2}%)",
                            self.state.best_epoch,
                            100.0 * self.state.best_val.unwrap_or(0.0)
                        )
                    } else {
                        String::new()
                    }
                );
            }
            self.state.epoch = epoch;
            self.state.step = opt.step_count();
            self.state.stage_done = done;
            self.state.next_seeds = [
                derive_seed(cfg.seed, Some(stage), epoch + 1, SeedTag::Order),
                derive_seed(cfg.seed, Some(stage), epoch + 1, SeedTag::Missing),
                derive_seed(cfg.seed, Some(stage), epoch + 1, SeedTag::Dropout),
            ];
            self.write_checkpoint(&tag, if done { None } else { Some(&opt) })?;
            self.epochs_done_here += 1;
            let last_stage = stage == Stage::Mixing || !cfg.stage2_enabled;
            let halt = self
                .opts
                .halt_after_epochs
                .is_some_and(|h| self.epochs_done_here >= h);
            if halt && !(done && last_stage) {
                return Ok(Flow::Halted);
            }
            if done {
                break;
            }
        }
        Ok(Flow::Done)
    }

    fn write_checkpoint(&mut self, tag: &str, opt: Option<&AdamW>) -> Result<()> {
        let ckpt = checkpoint_dir(&self.opts.run_dir);
        let model_file = format!("model-{tag}.safetensors");
        self.s.save_weights(&ckpt.join(&model_file))?;
        let optim_file = match opt {
            Some(o) => {
                let f = format!("optim-{tag}.safetensors");
                save_tensors(&ckpt.join(&f), &o.state_tensors())?;
                Some(f)
            }
            None => None,
        };
        self.state.model_file = model_file;
        self.state.optim_file = optim_file;
        self.state.metrics_len = self.metrics.len()?;
        self.save_state()?;
        // Drop tensor files of older generations.
        let keep: Vec<&str> = [
            Some(self.state.model_file.as_str()),
            self.state.optim_file.as_deref(),
            self.state.best_file.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Ok(rd) = std::fs::read_dir(&ckpt) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") && !keep.contains(&name.as_str()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// One pass over the training split: an AdamW update per batch, a `train` metrics
    /// line every `log_every` updates, the progress bar and the epoch's summary line.
    fn train_epoch(
        &mut self,
        stage: Stage,
        epoch: usize,
        opt: &mut AdamW,
        sched: &Schedule,
        spe: u64,
    ) -> Result<()> {
        let cfg = self.cfg().clone();
        let seed = cfg.seed;
        self.s
            .model
            .set_dropout_seed(derive_seed(seed, Some(stage), epoch, SeedTag::Dropout));
        let policy = training_missing_policy(&cfg, stage, epoch);
        let order = derive_seed(seed, Some(stage), epoch, SeedTag::Order);
        let bar = EpochBar::new(spe, &format!("{stage} ep {epoch}"), !self.opts.quiet);
        let mut win = Window::default();
        let mut shown = Tally::default();
        let epoch_start = Instant::now();
        let use_rank = stage == Stage::Mixing && cfg.rank_loss && cfg.lambda_rank > 0.0;
        for batch in batches(
            &self.s.splits.train,
            cfg.batch_size,
            Some(order),
            policy,
            &self.s.device,
        ) {
            let batch = batch?;
            let lr = sched.lr(opt.step_count());
            opt.set_lr(lr);
            win.started.get_or_insert_with(Instant::now);
            let (loss, ok) = match stage {
                Stage::Experts => self.expert_loss(&batch, &mut win)?,
                Stage::Mixing => self.mixing_loss(&batch, use_rank, &mut win)?,
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                let first_update =
                    opt.step_count() == 0 && (stage == Stage::Experts || !cfg.stage1_enabled);
                if first_update {
                    bail!(
                        "{stage} epoch {epoch} step 1: loss is {lv} before any weight changed: \
                         the data or the initial model overflow f32 (check the feature \
                         magnitudes and the model sizes)"
                    );
                }
                bail!(
                    "{stage} epoch {epoch} step {}: loss is {lv}; lower the learning rate \
                     ({}.lr = {}) or the weight decay ({})",
                    opt.step_count() + 1,
                    if stage == Stage::Experts {
                        "stage1"
                    } else {
                        "stage2"
                    },
                    cfg.stage(stage).lr,
                    cfg.weight_decay
                );
            }
            opt.backward_step(&loss)?;
            win.tally.add(batch.len(), ok, lv);
            shown.add(batch.len(), ok, lv);
            bar.step(|| {
                format!(
                    "loss {:.3} acc {:.1}% {:.0} q/s",
                    shown.mean_loss(),
                    shown.percent_correct(),
                    shown.throughput(epoch_start)
                )
            });
            if win.tally.n_steps >= cfg.log_every {
                flush_window(&mut self.metrics, self.start, stage, epoch, opt, &mut win)?;
            }
        }
        if win.tally.n_steps > 0 {
            flush_window(&mut self.metrics, self.start, stage, epoch, opt, &mut win)?;
        }
        bar.finish();
        if !self.opts.quiet {
            println!(
                "{stage} epoch {epoch}: train loss {:.4} acc {:.2}% ({:.1}s, {:.0} q/s)",
                shown.mean_loss(),
                shown.percent_correct(),
                epoch_start.elapsed().as_secs_f64(),
                shown.throughput(epoch_start)
            );
        }
        Ok(())
    }

    /// Stage-I loss of one batch: the sum of the three experts' cross-entropies, each
    /// with its own head (audio and visual over the samples that have the modality).
    /// Adds the parts and the per-expert accuracies to `win`; returns the loss and the
    /// text expert's correct count.
    fn expert_loss(&self, batch: &Batch, win: &mut Window) -> Result<(Tensor, usize)> {
        let el = self.s.model.expert_logits(batch, true)?;
        let la = weighted_mean(
            &cross_entropy_per_sample(&el.audio, &batch.answer)?,
            &el.audio_present,
        )?;
        let lv = weighted_mean(
            &cross_entropy_per_sample(&el.visual, &batch.answer)?,
            &el.visual_present,
        )?;
        let lt = cross_entropy_per_sample(&el.text, &batch.answer)?.mean_all()?;
        let loss = ((&la + &lv)? + &lt)?;
        for (name, t) in [
            ("loss_audio", &la),
            ("loss_visual", &lv),
            ("loss_text", &lt),
        ] {
            win.add_part(name, t.to_scalar::<f32>()? as f64);
        }
        let oka = correct(&el.audio, &batch.answer)?;
        let okv = correct(&el.visual, &batch.answer)?;
        let okt = correct(&el.text, &batch.answer)?;
        win.add_part("acc_audio", oka.iter().filter(|x| **x).count() as f64);
        win.add_part("acc_visual", okv.iter().filter(|x| **x).count() as f64);
        win.add_part("acc_text", okt.iter().filter(|x| **x).count() as f64);
        Ok((loss, okt.iter().filter(|x| **x).count()))
    }

    /// Stage-II loss of one batch: L_task, plus lambda (L_rank+ + L_rank-) when
    /// `use_rank` (Eq. 15). Adds the parts and the router weights to `win`; returns the
    /// loss and the correct count.
    fn mixing_loss(
        &self,
        batch: &Batch,
        use_rank: bool,
        win: &mut Window,
    ) -> Result<(Tensor, usize)> {
        let cfg = self.cfg();
        let out = self.s.model.forward_with(
            batch,
            &self.s.banks,
            ForwardOptions {
                train: true,
                rank_terms: use_rank,
            },
        )?;
        let task = cross_entropy_per_sample(&out.logits, &batch.answer)?.mean_all()?;
        win.add_part("task", task.to_scalar::<f32>()? as f64);
        let mut loss = task;
        if let (true, Some(r)) = (use_rank, out.rank.as_ref()) {
            let ans = batch.answer.index_select(&r.rows_t, 0)?;
            let (rp, rn) = rank_terms(
                &cross_entropy_per_sample(&r.logits_gt, &ans)?,
                &cross_entropy_per_sample(&r.logits_pos, &ans)?,
                &cross_entropy_per_sample(&r.logits_neg, &ans)?,
                cfg.margin,
            )?;
            win.add_part("rank_pos", rp.to_scalar::<f32>()? as f64);
            win.add_part("rank_neg", rn.to_scalar::<f32>()? as f64);
            loss = (loss + ((rp + rn)? * cfg.lambda_rank)?)?;
        }
        let w = out.router_weights.sum(0)?.to_vec1::<f32>()?;
        for (acc, v) in win.router.iter_mut().zip(&w) {
            *acc += *v as f64;
        }
        win.router_n += batch.len();
        let ok = correct(&out.logits, &batch.answer)?;
        Ok((loss, ok.iter().filter(|x| **x).count()))
    }
}

/// The missing modalities of an epoch's training batches: none in stage I; in stage II
/// the configured rate and type, drawn from the epoch's own seed.
fn training_missing_policy(cfg: &TrainConfig, stage: Stage, epoch: usize) -> MissingPolicy {
    match stage {
        Stage::Experts => MissingPolicy::Complete,
        Stage::Mixing => MissingPolicy::Simulated(MissingSim {
            rate: cfg.missing_rate,
            kind: cfg.missing_type,
            seed: derive_seed(cfg.seed, Some(stage), epoch, SeedTag::Missing),
        }),
    }
}

/// Writes the `train` metrics line of `win` and starts a new window.
fn flush_window(
    metrics: &mut MetricsWriter,
    start: Instant,
    stage: Stage,
    epoch: usize,
    opt: &AdamW,
    win: &mut Window,
) -> Result<()> {
    let steps = win.tally.n_steps.max(1) as f64;
    let n = win.tally.n_samples.max(1) as f64;
    let mut rec = Record {
        kind: "train".into(),
        stage: Some(stage),
        epoch,
        step: opt.step_count(),
        loss: Some(win.tally.loss / steps),
        acc: Some(win.tally.correct as f64 / n),
        lr: Some(opt.lr()),
        router: (win.router_n > 0).then(|| win.router.map(|v| v / win.router_n as f64)),
        secs: Some(start.elapsed().as_secs_f64()),
        samples_per_s: win.started.map(|t| win.tally.throughput(t)),
        ..Default::default()
    };
    for (k, v) in &win.parts {
        let v = if k.starts_with("acc_") {
            v / n
        } else {
            v / steps
        };
        rec.extra.insert(k.clone(), v);
    }
    metrics.write(&rec)?;
    *win = Window::default();
    Ok(())
}

impl Trainer<'_> {
    /// Validation accuracy used for early stopping: stage I, the mean accuracy of the
    /// three experts' own heads (complete data); stage II, the mean over the three Table-1
    /// settings.
    fn validate(&mut self, stage: Stage, epoch: usize) -> Result<f64> {
        let cfg = self.cfg().clone();
        let val = &self.s.splits.val;
        let secs = Some(self.start.elapsed().as_secs_f64());
        if stage == Stage::Experts {
            let mut counts = [0usize; 3];
            let mut n = 0usize;
            for batch in batches(
                val,
                cfg.eval_batch_size,
                None,
                MissingPolicy::Complete,
                &self.s.device,
            ) {
                let batch = batch?;
                let el = self.s.model.expert_logits(&batch, false)?;
                for (c, l) in counts.iter_mut().zip([&el.audio, &el.visual, &el.text]) {
                    *c += correct(l, &batch.answer)?.iter().filter(|x| **x).count();
                }
                n += batch.len();
            }
            let accs = counts.map(|c| c as f64 / n.max(1) as f64);
            let mean = accs.iter().sum::<f64>() / 3.0;
            let mut rec = Record {
                kind: "val".into(),
                stage: Some(stage),
                epoch,
                step: self.state.step,
                acc: Some(mean),
                setting: Some("complete".into()),
                secs,
                ..Default::default()
            };
            for (k, a) in ["acc_audio", "acc_visual", "acc_text"].iter().zip(accs) {
                rec.extra.insert(k.to_string(), a);
            }
            self.metrics.write(&rec)?;
            return Ok(mean);
        }
        let rows = evaluate_table(
            &self.s.model,
            val,
            &self.s.banks,
            cfg.eval_batch_size,
            Predictor::Full,
            &self.s.device,
        )?;
        for r in &rows {
            self.metrics.write(&Record {
                kind: "val".into(),
                stage: Some(stage),
                epoch,
                step: self.state.step,
                loss: Some(r.loss),
                acc: Some(r.acc()),
                router: Some(r.router),
                setting: Some(r.setting.clone()),
                secs,
                ..Default::default()
            })?;
        }
        Ok(mean_acc(&rows))
    }
}

/// The data a config names, for messages: its directory or "the synthetic set".
fn data_name(cfg: &TrainConfig) -> String {
    match &cfg.data {
        Some(d) => format!("at {}", d.display()),
        None => "(the synthetic set)".to_string(),
    }
}

/// The memory bank must hold more clips than `n_retrieved`: a training question never
/// retrieves its own clip.
fn check_bank_size(cfg: &TrainConfig, n_train_clips: usize) -> Result<()> {
    let n = cfg.model.n_retrieved;
    if cfg.model.use_retrieval && cfg.stage2_enabled && n >= n_train_clips {
        bail!(
            "-n {n} (model.n_retrieved): the memory bank holds {n_train_clips} train clips and a \
             question never retrieves its own clip, so at most {} can be retrieved; lower -n",
            n_train_clips.saturating_sub(1)
        );
    }
    Ok(())
}

/// A checkpoint's test results ([`evaluate_checkpoint`]).
#[derive(Debug, Clone)]
pub struct CheckpointEval {
    /// The checkpoint's state.
    pub state: TrainState,
    /// Table-1 rows. Test questions whose answer the model has no class for (data changed
    /// since training) are counted in `n` and the per-type totals, never as correct.
    pub rows: Vec<EvalResult>,
    /// One line, when the data is not the data the checkpoint was trained on or the
    /// checkpoint recorded none (an older r2scp wrote it).
    pub warning: Option<String>,
}

/// Evaluate a finished (or interrupted) run's checkpoint on the test split: the
/// Table-1 rows. `dir` is the run directory or its `checkpoint/` directory.
///
/// The data is mapped onto the vocabularies the checkpoint recorded, never onto ids derived
/// from the data again; when its fingerprint differs from the recorded one, the result
/// carries a one-line warning (see [`CheckpointEval`]).
pub fn evaluate_checkpoint(dir: &Path, device: &Device) -> Result<CheckpointEval> {
    let state_path = find_state(dir)?;
    let st = read_state(&state_path)?;
    let ckdir = state_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let cfg = &st.config;
    let (s, warning, unknown) = match &st.data {
        Some(rec) => {
            let model = ModelVocab {
                words: &rec.words,
                answers: &rec.answers,
                max_len: rec.dims.lq,
            };
            let loaded = load_data_for(cfg, Some(model))?;
            let have = loaded.splits.dims();
            let shape = |d: &DataDims| (d.la, d.da, d.lv, d.dv, d.dk);
            if shape(&have) != shape(&rec.dims) {
                bail!(
                    "the data {} has audio [{}, {}], visual [{}, {}] and keys of {} but {} was \
                     trained on audio [{}, {}], visual [{}, {}] and keys of {}; it cannot be \
                     evaluated on this data",
                    data_name(cfg),
                    have.la,
                    have.da,
                    have.lv,
                    have.dv,
                    have.dk,
                    dir.display(),
                    rec.dims.la,
                    rec.dims.da,
                    rec.dims.lv,
                    rec.dims.dv,
                    rec.dims.dk
                );
            }
            let mapping = loaded.mapping.unwrap_or_default();
            let warning =
                (loaded.fingerprint != rec.fingerprint || !mapping.is_exact()).then(|| {
                    format!(
                    "the data {} differs from the data {} was trained on (fingerprint {}, now {}); \
                     questions and answers are mapped by the checkpoint's vocabularies: {} test \
                     questions whose answer it has no class for{} are counted wrong, {} unknown \
                     words read as <unk>, {} questions cut to {} words",
                    data_name(cfg),
                    dir.display(),
                    rec.fingerprint,
                    loaded.fingerprint,
                    mapping.unknown_answers[2].len(),
                    match mapping.test_answer_examples(3) {
                        e if e.is_empty() => String::new(),
                        e => format!(" ({e})"),
                    },
                    mapping.unknown_words,
                    mapping.truncated,
                    rec.dims.lq
                )
                });
            let s = Session::build(
                cfg,
                loaded.splits,
                loaded.fingerprint,
                Some(rec.dims),
                device,
            )?;
            (s, warning, mapping.unknown_answers[2].clone())
        }
        None => {
            let warning = format!(
                "{} was written by an older r2scp and records neither its data's fingerprint nor \
                 its vocabularies; evaluating with vocabularies derived again from the data {}, \
                 which is right only if the data has not changed since training",
                dir.display(),
                data_name(cfg)
            );
            (Session::new(cfg, device)?, Some(warning), Vec::new())
        }
    };
    s.load_weights(&ckdir.join(&st.model_file))?;
    let predictor = if cfg.stage2_enabled && (st.stage == Stage::Mixing) {
        Predictor::Full
    } else {
        Predictor::Experts
    };
    if cfg.stage2_enabled && st.stage == Stage::Mixing {
        s.model.set_experts_frozen(cfg.stage1_enabled);
    }
    let mut rows = evaluate_table(
        &s.model,
        &s.splits.test,
        &s.banks,
        cfg.eval_batch_size,
        predictor,
        device,
    )?;
    for r in rows.iter_mut() {
        for (t, _) in &unknown {
            r.n += 1;
            r.per_type[t.index()].1 += 1;
        }
    }
    Ok(CheckpointEval {
        state: st,
        rows,
        warning,
    })
}
