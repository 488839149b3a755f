//! r2scp: R2ScP ("Retrieving to Recover") for missing-modality audio-visual
//! question answering, built on candle around hand-written CUDA kernels.
//!
//! Layout (each concept one module; an op `<op>` has `kernels/<op>.cu`, `src/<family>/<op>/`,
//! `kernels/emu/<op>.cpp` and `tests/ops/<op>.rs`; docs/DESIGN.md "Layout"):
//! - [`retrieve`]: fused cosine top-n retrieval (`cosine_topk`, paper Eq. 1, CMR).
//! - [`bank`]: the memory bank searched by CMR.
//! - [`cap`]: CAP ops (`dissonance_topk`, `gather_inject`, `topk_rows`) and `CapLayer`.
//! - [`kernel`]: what every kernel shares: the host/device ABI, launch plans, the CUDA and
//!   emulator launchers.
//! - [`data`]: synthetic AVQA generator, MUSIC-AVQA loader, missing-modality simulation.
//! - [`model`]: experts, router, decoder and the full R2ScP model.
//! - [`nn`]: transformer building blocks (LayerNorm, attention) shared by the model and
//!   `CapLayer`.
//! - [`trainer`]: two-stage training, evaluation, ablations, checkpoints.
//! - [`io`]: bounded readers of every file taken from a user or an earlier run.
//! - [`memory`]: the memory limit, and refusing sizes that would exceed it.
//! - [`mod@bench`]: measuring helpers, and the side-by-side benchmarks behind `r2scp bench`.
//!
//! Features: `cli` (default) adds what only the `r2scp` binary needs: clap, TOML config
//! files, progress bars (indicatif) and PNG plots (plotters). With
//! `default-features = false` the library is the ops, the bank, the data, the model and the
//! trainer (training, checkpoints, evaluation, metrics, reports without plots).

pub mod bank;
pub mod bench;
pub mod cap;
mod check;
pub mod data;
mod elem;
pub mod io;
pub mod kernel;
pub mod memory;
pub mod model;
pub mod nn;
pub mod retrieve;
mod simd;
pub(crate) mod topk;
pub mod trainer;
