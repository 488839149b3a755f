//! Two-stage training (paper section 3.4-3.5), evaluation, ablations and checkpoints.
//!
//! - [`training`]: a training run ([`train`]): stage I (each expert with its own head),
//!   stage II (experts frozen; router, CMR/CAP parts and decoder trained with L_task +
//!   lambda (L_rank+ + L_rank-)), checkpoints each epoch, `--resume`, early stopping, final
//!   test.
//! - [`stage`]: [`Stage`], the two stages; [`state`]: [`TrainState`], the checkpoint's
//!   `state.json`.
//! - [`eval`]: accuracy per missing setting and question type; the Table 1 layout.
//! - [`loss`]: cross-entropy and the hinge ranking loss (Eq. 13-15).
//! - [`optim`]: AdamW with persistent moments and the warmup + decay schedule.
//! - [`init`]: seeded parameter initialisation (candle's CPU RNG cannot be seeded).
//! - [`checkpoint`]: atomic file writes; [`metrics`]: `metrics.jsonl`.
//! - [`run_dir`]: the run directory's marker and lock ([`run_dir::RunDir`]).
//! - [`footprint`]: the memory a run will need, checked before anything is allocated.
//! - [`report`], [`plot`]: `report.md` and PNG plots; [`ablate`]: the ablation study.
//! - [`config`]: [`TrainConfig`] (TOML + CLI).
//! - [`progress`]: the progress bar of an epoch.
//! - [`retrieval_quality`]: how often the top-1 retrieved clip shares the answer.
//!
//! Dependencies point one way: `ablate` -> `training` -> `report` -> `state` ->
//! `config` / `eval` / `stage`. Progress bars, plots and TOML need the `cli` feature;
//! without it training runs the same, silently, and reports say their plots were not drawn.

pub mod ablate;
#[doc(hidden)]
pub mod checkpoint;
pub mod config;
pub mod eval;
#[doc(hidden)]
pub mod footprint;
#[doc(hidden)]
pub mod init;
#[doc(hidden)]
pub mod loss;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod optim;
#[doc(hidden)]
pub mod plot;
#[doc(hidden)]
pub mod progress;
#[doc(hidden)]
pub mod report;
#[doc(hidden)]
pub mod retrieval_quality;
pub mod run_dir;
pub mod stage;
#[doc(hidden)]
pub mod state;
pub mod training;

pub use config::{StageConfig, TrainConfig};
pub use eval::{evaluate, evaluate_table, format_table1, EvalResult, Predictor};
pub use stage::Stage;
pub use state::TrainState;
pub use training::{evaluate_checkpoint, train, CheckpointEval, RunOptions, RunSummary, Session};
