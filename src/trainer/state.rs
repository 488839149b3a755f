//! [`TrainState`]: the JSON state of a run's checkpoint (`checkpoint/state.json`), and
//! where to find it.
//!
//! The training loop writes it, the report, `r2scp eval` and the ablations read it; this
//! module imports none of them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::read_json;
use super::config::TrainConfig;
use super::eval::EvalResult;
use super::stage::Stage;
use crate::data::{DataDims, Vocab};

/// Version of the `state.json` layout.
pub const STATE_FORMAT: u32 = 1;

/// The JSON state next to the checkpoint tensors (`checkpoint/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Layout version ([`STATE_FORMAT`]).
    pub format: u32,
    /// The run's configuration (resume uses it, not the command line).
    pub config: TrainConfig,
    /// Stage of the last completed epoch (`1` or `2` on disk).
    pub stage: Stage,
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
    /// Results of the run's extra test settings (`RunOptions::extra_eval`), when finished.
    #[serde(default)]
    pub test_extra: Option<Vec<EvalResult>>,
    /// The data the run trained on: fingerprint, shapes and vocabularies (`None` in a
    /// checkpoint written before r2scp recorded them).
    #[serde(default)]
    pub data: Option<DataRecord>,
}

/// What a checkpoint records about the data it was trained on, so that `eval` maps other
/// data onto the model's own ids and `--resume` and `ablate` notice a change
/// (docs/DESIGN.md, "Run directories"). The data's path is the config's `data`, absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// Content fingerprint ([`crate::data::fingerprint`]).
    pub fingerprint: String,
    /// The shapes the model was built for.
    pub dims: DataDims,
    /// Question vocabulary (token id = position).
    pub words: Vocab,
    /// Answer classes (class id = position).
    pub answers: Vocab,
}

impl TrainState {
    /// The state of a run that has not trained yet: at epoch 0 of its first enabled stage.
    pub fn new(cfg: &TrainConfig) -> Self {
        Self {
            format: STATE_FORMAT,
            config: cfg.clone(),
            stage: if cfg.stage1_enabled {
                Stage::Experts
            } else {
                Stage::Mixing
            },
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
            data: None,
        }
    }

    /// Moves on to `stage` at epoch 0: counters, early-stopping state and the previous
    /// stage's optimizer and best-epoch files are reset (the weights are kept).
    pub fn begin_stage(&mut self, stage: Stage) {
        self.stage = stage;
        self.epoch = 0;
        self.step = 0;
        self.stage_done = false;
        self.best_val = None;
        self.best_epoch = 0;
        self.bad_epochs = 0;
        self.optim_file = None;
        self.best_file = None;
    }
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
        .map_err(|e| anyhow::anyhow!("{} is not a valid state file: {e}", path.display()))?;
    if st.format != STATE_FORMAT {
        bail!(
            "{}: state format {} is not supported (expected {STATE_FORMAT})",
            path.display(),
            st.format
        );
    }
    check_state(&st).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    Ok(st)
}

/// What a state file must satisfy beyond its JSON types (the stage is 1 or 2 by its
/// deserialisation) before a run trusts it: a valid saved config (a hostile
/// `batch_size = 0` would divide by zero) and tensor file names that stay inside the
/// checkpoint directory.
fn check_state(st: &TrainState) -> Result<()> {
    for (field, name) in [
        ("model_file", Some(&st.model_file)),
        ("optim_file", st.optim_file.as_ref()),
        ("best_file", st.best_file.as_ref()),
    ] {
        if let Some(n) = name {
            let plain = !n.is_empty() && !n.contains(['/', '\\']) && n != "." && n != "..";
            if !plain {
                bail!("{field} = {n:?}, expected a file name in the checkpoint directory");
            }
        }
    }
    st.config.validate().context("saved config")
}
