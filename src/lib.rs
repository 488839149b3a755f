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
//! - [`io`]: bounded readers of every file taken from a user or an earlier run.
//! - [`bench`]: side-by-side benchmarks behind `r2scp bench`.

pub mod bank;
pub mod bench;
pub mod cap;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub mod emu;
pub mod io;
pub mod launch;
pub mod model;
pub mod retrieve;
pub mod topk;
pub mod trainer;
