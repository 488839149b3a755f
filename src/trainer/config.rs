//! [`TrainConfig`]: every option of a training run (serde; TOML file and CLI flags).
//!
//! A TOML file names only what it changes; everything else keeps its default. Top-level
//! keys are the trainer options below, plus `[stage1]`, `[stage2]`, `[model]`
//! ([`ModelConfig`]) and `[synthetic]` ([`SyntheticConfig`]) tables. Unknown keys are
//! rejected with the offending key in the message. Reading TOML is part of the `cli`
//! feature; the serde form (JSON in `state.json`) is always there.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::atomic_write;
use super::optim::Decay;
use super::stage::Stage;
use crate::data::{MissingType, SyntheticConfig, UnknownAnswer};
use crate::model::ModelConfig;

/// Per-stage optimisation options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// Maximum number of epochs (early stopping may end the stage sooner).
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the stage's updates spent in linear warmup.
    pub warmup_frac: f64,
    /// Early-stopping patience in epochs without a new best validation accuracy
    /// (0 = never stop early). The best epoch's weights are kept.
    pub patience: usize,
}

impl StageConfig {
    fn stage1() -> Self {
        Self {
            epochs: 6,
            lr: 2e-3,
            warmup_frac: 0.05,
            patience: 0,
        }
    }
    fn stage2() -> Self {
        Self {
            epochs: 8,
            lr: 1.5e-3,
            warmup_frac: 0.05,
            patience: 3,
        }
    }
}

impl Default for StageConfig {
    fn default() -> Self {
        Self::stage2()
    }
}

/// A partially given `[stage1]` / `[stage2]` table, merged onto that stage's defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialStage {
    epochs: Option<usize>,
    lr: Option<f64>,
    warmup_frac: Option<f64>,
    patience: Option<usize>,
}

impl PartialStage {
    fn merge(self, mut base: StageConfig) -> StageConfig {
        if let Some(v) = self.epochs {
            base.epochs = v;
        }
        if let Some(v) = self.lr {
            base.lr = v;
        }
        if let Some(v) = self.warmup_frac {
            base.warmup_frac = v;
        }
        if let Some(v) = self.patience {
            base.patience = v;
        }
        base
    }
}

fn de_stage1<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<StageConfig, D::Error> {
    Ok(PartialStage::deserialize(d)?.merge(StageConfig::stage1()))
}

fn de_stage2<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<StageConfig, D::Error> {
    Ok(PartialStage::deserialize(d)?.merge(StageConfig::stage2()))
}

/// All options of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds everything: the synthetic data (overrides `synthetic.seed`), parameter
    /// initialisation, data order, missing-modality masks and dropout (`model.seed`).
    pub seed: u64,
    /// MUSIC-AVQA-layout feature directory; `None` = the built-in synthetic set. A run
    /// stores it absolute ([`TrainConfig::absolute_paths`]).
    pub data: Option<PathBuf>,
    /// With `data`: what a val/test answer that no train question has becomes (`"error"`,
    /// the default, or `"map_to_unk"`: an extra `<unk>` answer class no prediction can match).
    pub unknown_answer: UnknownAnswer,
    /// Batch size for training.
    pub batch_size: usize,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Stage I (modality-specific expert pre-training).
    #[serde(deserialize_with = "de_stage1")]
    pub stage1: StageConfig,
    /// Stage II (expert mixing with the router; experts frozen).
    #[serde(deserialize_with = "de_stage2")]
    pub stage2: StageConfig,
    /// AdamW decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Learning-rate decay after warmup.
    pub decay: Decay,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_frac: f64,
    /// lambda of Eq. 15: weight of L_rank+ + L_rank-.
    pub lambda_rank: f64,
    /// Margin inside the hinges of Eq. 13-14: max(0, margin + L_a - L_b).
    pub margin: f64,
    /// Use the ranking loss in stage II (Table 3 "w/o ranking loss" = false).
    pub rank_loss: bool,
    /// Run stage I (Table 3 "w/o stage I" = false: stage II then trains all parameters
    /// from scratch, experts included).
    pub stage1_enabled: bool,
    /// Run stage II (Table 3 "w/o stage II" = false: no router/decoder training; the
    /// prediction is the average of the stage-I experts' own heads).
    pub stage2_enabled: bool,
    /// Training missing rate eta (stage II).
    pub missing_rate: f32,
    /// Training missing type (stage II).
    pub missing_type: MissingType,
    /// Write a `train` metrics line every this many updates.
    pub log_every: usize,
    /// Model sizes and switches.
    pub model: ModelConfig,
    /// Synthetic data generator (ignored with `data`).
    pub synthetic: SyntheticConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            data: None,
            unknown_answer: UnknownAnswer::Error,
            batch_size: 32,
            eval_batch_size: 128,
            stage1: StageConfig::stage1(),
            stage2: StageConfig::stage2(),
            weight_decay: 0.01,
            grad_clip: 1.0,
            decay: Decay::Cosine,
            min_lr_frac: 0.05,
            lambda_rank: 0.1,
            margin: 0.0,
            rank_loss: true,
            stage1_enabled: true,
            stage2_enabled: true,
            missing_rate: 0.5,
            missing_type: MissingType::Mixed,
            log_every: 10,
            model: ModelConfig::default(),
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// File name of the config snapshot [`TrainConfig::write_snapshot`] writes into a run
/// directory: TOML with the `cli` feature, JSON without it.
pub const SNAPSHOT_FILE: &str = if cfg!(feature = "cli") {
    "config.toml"
} else {
    "config.json"
};

impl TrainConfig {
    /// The options of `stage`.
    pub fn stage(&self, stage: Stage) -> &StageConfig {
        match stage {
            Stage::Experts => &self.stage1,
            Stage::Mixing => &self.stage2,
        }
    }

    /// Whether `stage` runs (Table 3 "w/o stage I" / "w/o stage II" turn one off).
    pub fn stage_enabled(&self, stage: Stage) -> bool {
        match stage {
            Stage::Experts => self.stage1_enabled,
            Stage::Mixing => self.stage2_enabled,
        }
    }

    /// Write the human-readable copy of this config, `run_dir/`[`SNAPSHOT_FILE`],
    /// atomically. Resume reads `checkpoint/state.json`, which holds the config too; only a
    /// run killed before its first checkpoint resumes from this copy ([`Self::read_snapshot`]).
    pub fn write_snapshot(&self, run_dir: &Path) -> Result<()> {
        #[cfg(feature = "cli")]
        let text = toml::to_string_pretty(self).context("serialising the config")?;
        #[cfg(not(feature = "cli"))]
        let text = serde_json::to_string_pretty(self).context("serialising the config")? + "\n";
        atomic_write(&run_dir.join(SNAPSHOT_FILE), text.as_bytes())
    }

    /// The config in `run_dir/`[`SNAPSHOT_FILE`] (written by [`Self::write_snapshot`]).
    pub fn read_snapshot(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(SNAPSHOT_FILE);
        #[cfg(feature = "cli")]
        {
            Self::from_toml_file(&path)
        }
        #[cfg(not(feature = "cli"))]
        {
            let s = crate::io::read_text_capped(&path, crate::io::MAX_CONFIG_BYTES, "config file")?;
            serde_json::from_str(&s).with_context(|| format!("config file {}", path.display()))
        }
    }

    /// Parse a TOML file (unknown keys and bad values name the file and the key).
    #[cfg(feature = "cli")]
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let s = crate::io::read_text_capped(path, crate::io::MAX_CONFIG_BYTES, "config file")?;
        Self::from_toml_str(&s).with_context(|| format!("config file {}", path.display()))
    }

    /// Parse TOML text.
    #[cfg(feature = "cli")]
    pub fn from_toml_str(s: &str) -> Result<Self> {
        toml::from_str(s)
            .map_err(|e| anyhow::anyhow!("{}", super::checkpoint::one_line(&e.to_string())))
    }

    /// Make `data` absolute (against the current directory, without resolving symbolic
    /// links), so that a checkpoint names the same directory from wherever it is used.
    pub fn absolute_paths(&mut self) -> Result<()> {
        if let Some(d) = &self.data {
            let abs = std::path::absolute(d)
                .with_context(|| format!("data directory {}", d.display()))?;
            self.data = Some(abs);
        }
        Ok(())
    }

    /// Propagate `seed` into the data and model seeds. Called once after all overrides.
    pub fn apply_seed(&mut self) {
        self.synthetic.seed = self.seed;
        self.model.seed = self.seed;
    }

    /// Check ranges; errors name the option, its value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        // The config is saved as TOML (config.toml), whose integers are 64-bit signed.
        let v = serde_json::to_value(self).context("serialising the config")?;
        let too_large = (self.seed > i64::MAX as u64)
            .then(|| ("seed".to_string(), self.seed))
            .or_else(|| first_above_i64(&v, ""));
        if let Some((key, n)) = too_large {
            bail!(
                "{key} = {n}{}, expected at most {} (2^63 - 1, the largest integer config.toml holds)",
                flag_of(&key).map(|f| format!(" ({f})")).unwrap_or_default(),
                i64::MAX
            );
        }
        ensure!(self.batch_size >= 1, "batch_size = 0, expected >= 1");
        ensure!(
            self.eval_batch_size >= 1,
            "eval_batch_size = 0, expected >= 1"
        );
        for (name, s) in [("stage1", &self.stage1), ("stage2", &self.stage2)] {
            ensure!(
                s.lr.is_finite() && s.lr > 0.0,
                "{name}.lr = {}, expected a positive number",
                s.lr
            );
            ensure!(
                (0.0..1.0).contains(&s.warmup_frac),
                "{name}.warmup_frac = {}, expected in [0, 1)",
                s.warmup_frac
            );
        }
        ensure!(
            self.stage1_enabled || self.stage2_enabled,
            "both stages are disabled; nothing to train"
        );
        if self.stage1_enabled {
            ensure!(
                self.stage1.epochs >= 1,
                "stage1.epochs = 0, expected >= 1 (or disable stage I)"
            );
        }
        if self.stage2_enabled {
            ensure!(
                self.stage2.epochs >= 1,
                "stage2.epochs = 0, expected >= 1 (or disable stage II)"
            );
        }
        ensure!(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "weight_decay = {}, expected >= 0",
            self.weight_decay
        );
        // Decoupled decay multiplies every matrix by 1 - lr x weight_decay per step: at 1 or
        // more it zeroes or flips the weights and the loss turns NaN.
        for stage in [Stage::Experts, Stage::Mixing] {
            let lr = self.stage(stage).lr;
            ensure!(
                !self.stage_enabled(stage) || lr * self.weight_decay < 1.0,
                "weight_decay = {} (--weight-decay): with stage{}.lr = {lr} each AdamW step \
                 multiplies the weights by 1 - lr x weight_decay = {}; expected \
                 lr x weight_decay < 1 (weight_decay < {})",
                short(self.weight_decay),
                stage.number(),
                short(1.0 - lr * self.weight_decay),
                short(1.0 / lr)
            );
        }
        ensure!(
            self.grad_clip >= 0.0,
            "grad_clip = {}, expected >= 0",
            self.grad_clip
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_frac),
            "min_lr_frac = {}, expected in [0, 1]",
            self.min_lr_frac
        );
        ensure!(
            self.lambda_rank >= 0.0 && self.lambda_rank.is_finite(),
            "lambda_rank = {}, expected >= 0",
            self.lambda_rank
        );
        ensure!(
            self.margin >= 0.0 && self.margin.is_finite(),
            "margin = {}, expected >= 0",
            self.margin
        );
        ensure!(
            self.missing_rate.is_finite() && (0.0..=1.0).contains(&self.missing_rate),
            "missing_rate = {}, expected in [0, 1]",
            self.missing_rate
        );
        ensure!(self.log_every >= 1, "log_every = 0, expected >= 1");
        self.model.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.data.is_none() {
            self.synthetic.validate()?;
        }
        if let Some(d) = &self.data {
            if !d.is_dir() {
                bail!(
                    "data directory {} does not exist or is not a directory",
                    d.display()
                );
            }
        }
        Ok(())
    }
}

/// `x` as written in a config: `0.01`, `500`, or `1e300` when plain digits would be long.
fn short(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{}", (x * 1e6).round() / 1e6)
    }
}

/// The first integer in `v` above `i64::MAX`, with its dotted key.
fn first_above_i64(v: &serde_json::Value, key: &str) -> Option<(String, u64)> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .filter(|&n| n > i64::MAX as u64)
            .map(|n| (key.to_string(), n)),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, v)| {
            let k = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            first_above_i64(v, &k)
        }),
        serde_json::Value::Array(a) => a.iter().find_map(|v| first_above_i64(v, key)),
        _ => None,
    }
}

/// The command-line flag of a config key, where there is one.
fn flag_of(key: &str) -> Option<&'static str> {
    Some(match key {
        "seed" | "model.seed" | "synthetic.seed" => "--seed",
        "stage1.epochs" => "--epochs1",
        "stage2.epochs" => "--epochs2",
        "batch_size" => "--batch-size",
        "stage2.patience" => "--patience",
        "model.n_retrieved" => "-n",
        "model.k_purge" => "-k",
        "model.dim" => "--dim",
        "synthetic.n_train_clips" => "--train-clips",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cli")]
    #[test]
    fn toml_partial_and_unknown_keys() {
        let c = TrainConfig::from_toml_str(
            "seed = 3\n[stage2]\nepochs = 2\n[model]\nn_retrieved = 5\n",
        )
        .expect("parse");
        assert_eq!(c.seed, 3);
        assert_eq!(c.stage2.epochs, 2);
        assert_eq!(c.stage2.lr, TrainConfig::default().stage2.lr);
        let c1 = TrainConfig::from_toml_str("[stage1]\nepochs = 1\n").expect("parse");
        assert_eq!(c1.stage1.lr, TrainConfig::default().stage1.lr);
        assert_eq!(c1.stage1.epochs, 1);
        assert_eq!(c.model.n_retrieved, 5);
        let e = TrainConfig::from_toml_str("bogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn validate_names_the_bad_option() {
        let mut bad = TrainConfig {
            missing_rate: 1.5,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("missing_rate"));
        bad.missing_rate = 0.3;
        bad.validate().expect("valid");
    }

    #[test]
    fn seeds_past_i64_and_runaway_weight_decay_are_refused() {
        let mut c = TrainConfig {
            seed: 1 << 63,
            ..Default::default()
        };
        c.apply_seed();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with(
                "seed = 9223372036854775808 (--seed), expected at most 9223372036854775807"
            ),
            "{e}"
        );
        let mut c = TrainConfig::default();
        c.stage1.epochs = usize::MAX;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("stage1.epochs = 18446744073709551615 (--epochs1)"),
            "{e}"
        );
        let c = TrainConfig {
            weight_decay: 1e300,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("weight_decay = 1e300") && e.contains("< 1"),
            "{e}"
        );
        let c = TrainConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        c.validate().expect("lr x weight_decay = 0.001");
    }
}
