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
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::checkpoint::{load_tensors, read_json, save_tensors, truncate_file, write_json};
use super::config::{StageConfig, TrainConfig};
use super::eval::{evaluate, evaluate_table, mean_acc, EvalResult, Predictor};
use super::init::seeded_var_builder;
use super::loss::{correct, cross_entropy_per_sample, rank_terms, weighted_mean};
use super::metrics::{MetricsWriter, Record};
use super::optim::{AdamW, AdamWParams, Schedule};
use super::progress;
use crate::data::{
    batches, generate, load_music_avqa, MissingPolicy, MissingSim, QuestionType, Splits,
};
use crate::model::{is_expert_var, Banks, ForwardOptions, R2scp};

/// Version of the `state.json` layout.
pub const STATE_FORMAT: u32 = 1;

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
pub fn derive_seed(seed: u64, stage: u8, epoch: usize, tag: SeedTag) -> u64 {
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
    let splits = match &cfg.data {
        Some(dir) => load_music_avqa(dir)
            .with_context(|| format!("loading MUSIC-AVQA features from {}", dir.display()))?,
        None => generate(&cfg.synthetic).context("generating the synthetic data set")?,
    };
    splits.validate()?;
    Ok(splits)
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
}

impl Session {
    /// Load the data and build the model (seeded initialisation).
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let splits = load_data(cfg)?;
        Self::from_splits(cfg, splits, device)
    }

    /// Build banks and the model over already-loaded splits.
    pub fn from_splits(cfg: &TrainConfig, splits: Splits, device: &Device) -> Result<Self> {
        let banks = Banks::from_dataset(&splits.train, device)?;
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, derive_seed(cfg.seed, 0, 0, SeedTag::Init), device);
        let model = R2scp::new(&cfg.model, &splits.dims(), vb)
            .map_err(|e| anyhow!("building the model: {e}"))?;
        Ok(Self {
            cfg: cfg.clone(),
            splits,
            banks,
            varmap,
            model,
            device: device.clone(),
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
    /// model's parameters with their shapes (errors name the file and the parameter).
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
            var.set(&t.to_dtype(DType::F32)?)
                .map_err(|e| anyhow!("checkpoint file {}: {name}: {e}", path.display()))?;
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
            quiet: false,
            halt_after_epochs: None,
            report: true,
            extra_eval: Vec::new(),
            device: Device::Cpu,
        }
    }
}

/// The JSON state next to the checkpoint tensors (`checkpoint/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Layout version ([`STATE_FORMAT`]).
    pub format: u32,
    /// The run's configuration (resume uses it, not the command line).
    pub config: TrainConfig,
    /// Stage of the last completed epoch (1 or 2).
    pub stage: u8,
    /// Epochs completed in `stage`.
    pub epoch: usize,
    /// Optimizer updates done in `stage`.
    pub step: u64,
    /// `stage` has ended (its best weights are in `model_file`).
    pub stage_done: bool,
    /// Best validation accuracy of `stage` so far.
    pub best_val: Option<f64>,
    /// Epoch of `best_val`.
    pub best_epoch: usize,
    /// Epochs since `best_val` improved.
    pub bad_epochs: usize,
    /// Length in bytes of `metrics.jsonl` at this checkpoint.
    pub metrics_len: u64,
    /// Parameters (file name in the checkpoint directory).
    pub model_file: String,
    /// AdamW moments (absent once the stage is done).
    pub optim_file: Option<String>,
    /// Parameters of the best epoch of `stage`.
    pub best_file: Option<String>,
    /// Seeds the next epoch will use: (order, missing, dropout). Informational: they are
    /// recomputed from (seed, stage, epoch).
    pub next_seeds: [u64; 3],
    /// Training and final evaluation are complete.
    pub finished: bool,
    /// Final test results (Table 1 rows), when finished.
    pub test: Option<Vec<EvalResult>>,
    /// Results of [`RunOptions::extra_eval`], when finished.
    #[serde(default)]
    pub test_extra: Option<Vec<EvalResult>>,
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

/// Path of the checkpoint directory of a run.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Find `state.json` from a run directory or a checkpoint directory.
pub fn find_state(dir: &Path) -> Result<PathBuf> {
    for p in [
        dir.join("checkpoint").join("state.json"),
        dir.join("state.json"),
    ] {
        if p.is_file() {
            return Ok(p);
        }
    }
    if !dir.exists() {
        bail!("checkpoint directory {} does not exist", dir.display());
    }
    bail!(
        "{} holds no checkpoint (expected checkpoint/state.json or state.json)",
        dir.display()
    )
}

/// Read a checkpoint's state; errors name the file.
pub fn read_state(path: &Path) -> Result<TrainState> {
    let mut raw: serde_json::Value = read_json(path)?;
    crate::model::recovery::upgrade_legacy_config(&mut raw["config"]["model"]);
    let st: TrainState = serde_json::from_value(raw)
        .map_err(|e| anyhow!("{} is not a valid state file: {e}", path.display()))?;
    if st.format != STATE_FORMAT {
        bail!(
            "{}: state format {} is not supported (expected {STATE_FORMAT})",
            path.display(),
            st.format
        );
    }
    Ok(st)
}

fn stage_cfg(cfg: &TrainConfig, stage: u8) -> &StageConfig {
    if stage == 1 {
        &cfg.stage1
    } else {
        &cfg.stage2
    }
}

fn stage_name(stage: u8) -> &'static str {
    if stage == 1 {
        "stage I"
    } else {
        "stage II"
    }
}

/// Running sums over a logging window.
#[derive(Default)]
struct Window {
    n_steps: usize,
    n_samples: usize,
    correct: usize,
    loss: f64,
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
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let start = Instant::now();
    let ckpt = checkpoint_dir(&opts.run_dir);
    let state_path = ckpt.join("state.json");
    let metrics_path = opts.run_dir.join("metrics.jsonl");
    let (cfg, state) = if opts.resume {
        let st = read_state(&find_state(&opts.run_dir)?)?;
        truncate_file(&metrics_path, st.metrics_len)?;
        (st.config.clone(), Some(st))
    } else {
        if state_path.exists() {
            bail!(
                "run directory {} already holds a checkpoint; use --resume to continue it or choose another --name",
                opts.run_dir.display()
            );
        }
        cfg.validate()?;
        std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;
        truncate_file(&metrics_path, 0)?;
        let toml = toml::to_string_pretty(cfg).context("serialising the config")?;
        super::checkpoint::atomic_write(&opts.run_dir.join("config.toml"), toml.as_bytes())?;
        (cfg.clone(), None)
    };
    let s = Session::new(&cfg, &opts.device)?;
    let fresh = state.is_none();
    let state = match state {
        Some(st) => {
            s.load_weights(&ckpt.join(&st.model_file))?;
            st
        }
        None => TrainState {
            format: STATE_FORMAT,
            config: cfg.clone(),
            stage: if cfg.stage1_enabled { 1 } else { 2 },
            epoch: 0,
            step: 0,
            stage_done: false,
            best_val: None,
            best_epoch: 0,
            bad_epochs: 0,
            metrics_len: 0,
            model_file: String::new(),
            optim_file: None,
            best_file: None,
            next_seeds: [0; 3],
            finished: false,
            test: None,
            test_extra: None,
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
    t.run()
}

impl Trainer<'_> {
    fn cfg(&self) -> &TrainConfig {
        &self.s.cfg
    }

    fn run(&mut self) -> Result<RunSummary> {
        if !self.state.finished {
            for stage in [1u8, 2] {
                let enabled = if stage == 1 {
                    self.cfg().stage1_enabled
                } else {
                    self.cfg().stage2_enabled
                };
                if !enabled
                    || (self.state.stage > stage)
                    || (self.state.stage == stage && self.state.stage_done)
                {
                    continue;
                }
                if self.state.stage < stage {
                    // previous stage finished: start this one fresh
                    self.state.stage = stage;
                    self.state.epoch = 0;
                    self.state.step = 0;
                    self.state.stage_done = false;
                    self.state.best_val = None;
                    self.state.best_epoch = 0;
                    self.state.bad_epochs = 0;
                    self.state.optim_file = None;
                    self.state.best_file = None;
                }
                if let Flow::Halted = self.run_stage(stage)? {
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
        let want = self.opts.extra_eval.len();
        if self.state.test_extra.as_ref().map_or(0, Vec::len) != want {
            let mut extra = Vec::with_capacity(want);
            for p in &self.opts.extra_eval {
                extra.push(evaluate(
                    &self.s.model,
                    &self.s.splits.test,
                    &self.s.banks,
                    *p,
                    self.cfg().eval_batch_size,
                    self.predictor(),
                    &self.s.device,
                )?);
            }
            self.state.test_extra = Some(extra);
            write_json(
                &checkpoint_dir(&self.opts.run_dir).join("state.json"),
                &self.state,
            )?;
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

    fn predictor(&self) -> Predictor {
        if self.cfg().stage2_enabled {
            Predictor::Full
        } else {
            Predictor::Experts
        }
    }

    fn finish(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let rows = evaluate_table(
            &self.s.model,
            &self.s.splits.test,
            &self.s.banks,
            self.cfg().eval_batch_size,
            self.predictor(),
            &self.s.device,
        )?;
        for r in &rows {
            let mut rec = Record {
                kind: "test".into(),
                stage: 0,
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
        write_json(
            &checkpoint_dir(&self.opts.run_dir).join("state.json"),
            &self.state,
        )?;
        Ok(())
    }

    fn run_stage(&mut self, stage: u8) -> Result<Flow> {
        let cfg = self.cfg().clone();
        let sc = stage_cfg(&cfg, stage).clone();
        let frozen = stage == 2 && cfg.stage1_enabled;
        self.s.model.set_experts_frozen(frozen);
        let trainable = move |n: &str| {
            if stage == 1 {
                is_expert_var(n)
            } else {
                !frozen || !is_expert_var(n)
            }
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
                .map_err(|e| anyhow!("checkpoint file {}: {e}", ckpt.join(f).display()))?;
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
            let tag = format!("s{stage}e{epoch}");
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
                    "{} epoch {epoch}/{}: val {:.2}%{}{}",
                    stage_name(stage),
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
                derive_seed(cfg.seed, stage, epoch + 1, SeedTag::Order),
                derive_seed(cfg.seed, stage, epoch + 1, SeedTag::Missing),
                derive_seed(cfg.seed, stage, epoch + 1, SeedTag::Dropout),
            ];
            self.write_checkpoint(&tag, if done { None } else { Some(&opt) })?;
            self.epochs_done_here += 1;
            let last_stage = stage == 2 || !cfg.stage2_enabled;
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
        write_json(&ckpt.join("state.json"), &self.state)?;
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

    fn train_epoch(
        &mut self,
        stage: u8,
        epoch: usize,
        opt: &mut AdamW,
        sched: &Schedule,
        spe: u64,
    ) -> Result<()> {
        let cfg = self.cfg().clone();
        let seed = cfg.seed;
        self.s
            .model
            .set_dropout_seed(derive_seed(seed, stage, epoch, SeedTag::Dropout));
        let policy = if stage == 1 {
            MissingPolicy::Complete
        } else {
            MissingPolicy::Simulated(MissingSim {
                rate: cfg.missing_rate,
                kind: cfg.missing_type,
                seed: derive_seed(seed, stage, epoch, SeedTag::Missing),
            })
        };
        let order = derive_seed(seed, stage, epoch, SeedTag::Order);
        let pb = progress::bar(
            spe,
            &format!("{} ep {epoch}", stage_name(stage)),
            !self.opts.quiet,
        );
        let mut win = Window::default();
        let mut shown = Window::default();
        let epoch_start = Instant::now();
        let mut epoch_samples = 0usize;
        let use_rank = stage == 2 && cfg.rank_loss && cfg.lambda_rank > 0.0;
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
            let b = batch.len();
            let (loss, ok) = if stage == 1 {
                let el = self.s.model.expert_logits(&batch, true)?;
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
                (loss, okt.iter().filter(|x| **x).count())
            } else {
                let out = self.s.model.forward_with(
                    &batch,
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
                win.router_n += b;
                let ok = correct(&out.logits, &batch.answer)?;
                (loss, ok.iter().filter(|x| **x).count())
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "{} epoch {epoch} step {}: loss is {lv}; lower the learning rate",
                    stage_name(stage),
                    opt.step_count() + 1
                );
            }
            opt.backward_step(&loss)?;
            win.n_steps += 1;
            win.n_samples += b;
            win.correct += ok;
            win.loss += lv;
            shown.n_samples += b;
            shown.correct += ok;
            shown.loss += lv;
            shown.n_steps += 1;
            epoch_samples += b;
            pb.inc(1);
            pb.set_message(format!(
                "loss {:.3} acc {:.1}% {:.0} q/s",
                shown.loss / shown.n_steps as f64,
                100.0 * shown.correct as f64 / shown.n_samples.max(1) as f64,
                epoch_samples as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9)
            ));
            if win.n_steps >= cfg.log_every {
                flush_window(&mut self.metrics, self.start, stage, epoch, opt, &mut win)?;
            }
        }
        if win.n_steps > 0 {
            flush_window(&mut self.metrics, self.start, stage, epoch, opt, &mut win)?;
        }
        pb.finish_and_clear();
        if !self.opts.quiet {
            println!(
                "{} epoch {epoch}: train loss {:.4} acc {:.2}% ({:.1}s, {:.0} q/s)",
                stage_name(stage),
                shown.loss / shown.n_steps.max(1) as f64,
                100.0 * shown.correct as f64 / shown.n_samples.max(1) as f64,
                epoch_start.elapsed().as_secs_f64(),
                epoch_samples as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9)
            );
        }
        Ok(())
    }
}

fn flush_window(
    metrics: &mut MetricsWriter,
    start: Instant,
    stage: u8,
    epoch: usize,
    opt: &AdamW,
    win: &mut Window,
) -> Result<()> {
    let steps = win.n_steps.max(1) as f64;
    let n = win.n_samples.max(1) as f64;
    let mut rec = Record {
        kind: "train".into(),
        stage,
        epoch,
        step: opt.step_count(),
        loss: Some(win.loss / steps),
        acc: Some(win.correct as f64 / n),
        lr: Some(opt.lr()),
        router: (win.router_n > 0).then(|| win.router.map(|v| v / win.router_n as f64)),
        secs: Some(start.elapsed().as_secs_f64()),
        samples_per_s: win
            .started
            .map(|t| win.n_samples as f64 / t.elapsed().as_secs_f64().max(1e-9)),
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
    fn validate(&mut self, stage: u8, epoch: usize) -> Result<f64> {
        let cfg = self.cfg().clone();
        let val = &self.s.splits.val;
        let secs = Some(self.start.elapsed().as_secs_f64());
        if stage == 1 {
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
                stage,
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
                stage,
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

/// Evaluate a finished (or interrupted) run's checkpoint on the test split: the
/// Table-1 rows. `dir` is the run directory or its `checkpoint/` directory.
pub fn evaluate_checkpoint(dir: &Path, device: &Device) -> Result<(TrainState, Vec<EvalResult>)> {
    let state_path = find_state(dir)?;
    let st = read_state(&state_path)?;
    let ckdir = state_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let s = Session::new(&st.config, device)?;
    s.load_weights(&ckdir.join(&st.model_file))?;
    let predictor = if st.config.stage2_enabled && (st.stage == 2) {
        Predictor::Full
    } else {
        Predictor::Experts
    };
    if st.config.stage2_enabled && st.stage == 2 {
        s.model.set_experts_frozen(st.config.stage1_enabled);
    }
    let rows = evaluate_table(
        &s.model,
        &s.splits.test,
        &s.banks,
        st.config.eval_batch_size,
        predictor,
        device,
    )?;
    Ok((st, rows))
}
