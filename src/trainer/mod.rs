//! Two-stage training (paper section 3.4-3.5), evaluation, ablations and checkpoints.
//!
//! - [`run`]: a training run ([`train`]): stage I (each expert with its own head), stage II
//!   (experts frozen; router, CMR/CAP parts and decoder trained with L_task + lambda
//!   (L_rank+ + L_rank-)), checkpoints each epoch, `--resume`, early stopping, final test.
//! - [`eval`]: accuracy per missing setting and question type; the Table 1 layout.
//! - [`loss`]: cross-entropy and the hinge ranking loss (Eq. 13-15).
//! - [`optim`]: AdamW with persistent moments and the warmup + decay schedule.
//! - [`init`]: seeded parameter initialisation (candle's CPU RNG cannot be seeded).
//! - [`checkpoint`]: atomic file writes; [`metrics`]: `metrics.jsonl`.
//! - [`report`], [`plot`]: `report.md` and PNG plots; [`ablate`]: the ablation study.
//! - [`config`]: [`TrainConfig`] (TOML + CLI).
//! - [`retrieval_quality`]: how often the top-1 retrieved clip shares the answer.

pub mod ablate;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod report;
pub mod retrieval_quality;
pub mod run;

pub use config::{StageConfig, TrainConfig};
pub use eval::{evaluate, evaluate_table, format_table1, EvalResult, Predictor};
pub use run::{evaluate_checkpoint, train, RunOptions, RunSummary, Session, TrainState};
