//! r2scp: R2ScP ("Retrieving to Recover") for missing-modality audio-visual
//! question answering, built on candle around hand-written CUDA kernels.
//!
//! Layout (each concept one module; kernels in `kernels/<name>.cu` mirror `src/<family>/`):
//! - [`retrieve`]: fused cosine top-n retrieval (`cosine_topk`, paper Eq. 1, CMR).
//! - [`bank`]: the memory bank searched by CMR.
//! - [`cap`]: CAP ops (`dissonance_topk`, `gather_inject`, `topk_rows`) and `CapLayer`.
//! - [`data`]: synthetic AVQA generator, MUSIC-AVQA loader, missing-modality simulation.
//! - [`model`]: experts, router, decoder and the full R2ScP model.
//! - [`trainer`]: two-stage training, evaluation, ablations, checkpoints.
//! - [`mod@bench`]: measuring helpers, and the side-by-side benchmarks behind `r2scp bench`.
//!
//! Features: `cli` (default) adds what only the `r2scp` binary needs: clap, TOML config
//! files, progress bars (indicatif) and PNG plots (plotters). With
//! `default-features = false` the library is the ops, the bank, the data, the model and the
//! trainer (training, checkpoints, evaluation, metrics, reports without plots).

pub mod bank;
pub mod bench;
pub mod cap;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub mod emu;
pub mod launch;
pub mod model;
pub mod retrieve;
pub mod topk;
pub mod trainer;
