//! Fused cosine retrieval and token purification for
//! [candle](https://github.com/huggingface/candle), with hand-written CUDA kernels, and the
//! R2ScP model built on them ("Retrieving to Recover", missing-modality audio-visual
//! question answering).
//!
//! - **Search vectors**: [`MemoryBank`], a flat cosine index used like FAISS's (`add`,
//!   `search` -> scores and your ids), or the op [`cosine_topk`] on two tensors.
//! - **Purify a token sequence** against a context: [`CapLayer`], built on the ops
//!   [`dissonance_topk`], [`topk_rows`] and [`gather_inject`].
//! - **Reproduce the paper**: [`model`], [`trainer`], [`data`], and the `r2scp` binary.
//!
//! Start with `use r2scp::prelude::*;` and the examples below. Errors are [`Error`]: one
//! line, and `?` turns them into `candle_core::Error` or `anyhow::Error`.
//!
//! # Set-up
//!
//! ```toml
//! [dependencies]
//! r2scp = { path = "../r2scp", default-features = false } # features = ["cuda"] for the kernels
//! candle-core = "0.11.1"
//!
//! # Debug builds leave dependencies unoptimised, and the fused CPU paths then run many
//! # times slower (a bank search 24x, README): optimise r2scp in debug builds too (`"*"`
//! # for candle as well).
//! [profile.dev.package.r2scp]
//! opt-level = 3
//! ```
//!
//! Features: `cuda` (candle's CUDA backend and r2scp's kernels; needs `nvcc` at build time),
//! `cli` (default: the `r2scp` binary's clap, TOML, progress bars and PNG plots; a library
//! user turns it off). The device of the input tensors picks the path: fused host code on
//! the CPU, the kernels in `kernels/` on CUDA.
//!
//! # Search a bank
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use r2scp::prelude::*;
//!
//! let dev = Device::Cpu;
//! // 1000 keys of D = 64 (any float dtype; f16/bf16 halve the bytes read per search)
//! let keys = Tensor::randn(0f32, 1., (1000, 64), &dev)?;
//! let mut bank = MemoryBank::from_keys(keys.clone())?; // ids 0..1000
//! bank.add(&Tensor::randn(0f32, 1., (24, 64), &dev)?)?; // ids 1000..1024
//!
//! let queries = keys.narrow(0, 10, 3)?; // rows 10, 11, 12 as queries
//! let (scores, ids) = bank.search(&queries, 5)?; // [3, 5] f32, [3, 5] u32
//! assert_eq!(ids.to_vec2::<u32>()?[0][0], 10); // each finds itself first
//! assert!((scores.to_vec2::<f32>()?[0][0] - 1.0).abs() < 1e-5);
//!
//! // The same search as an op on tensors: bank rows instead of ids, and a row to skip
//! // per query (here each query's own row).
//! let exclude = Tensor::new(&[10u32, 11, 12], &dev)?;
//! let (_, rows) = cosine_topk(&queries, &keys, None, 5, Some(&exclude))?;
//! assert_ne!(rows.to_vec2::<u32>()?[0][0], 10);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Purify tokens (CAP)
//!
//! [`CapLayer`] is the whole mechanism as a candle-nn layer (see its page). Its three ops,
//! usable alone: which tokens of a sequence disagree with a context, which tokens of another
//! sequence matter most, and the replacement of the former by the latter.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use r2scp::prelude::*;
//!
//! let dev = Device::Cpu;
//! let (b, l, d, k) = (2, 6, 16, 2);
//! let tokens = Tensor::randn(0f32, 1., (b, l, d), &dev)?; // sequence to purify
//! let context = Tensor::randn(0f32, 1., (b, 4, d), &dev)?; // what it should agree with
//! let guide = Tensor::randn(0f32, 1., (b, 5, d), &dev)?; // where replacements come from
//! let saliency = Tensor::randn(0f32, 1., (b, 5), &dev)?; // a score per guide token
//!
//! let noisy = dissonance_topk(&tokens, Context::Tokens { h_avl: &context, mask: None }, k)?;
//! let (_, salient) = topk_rows(&saliency, k)?; // [b, k] u32
//! let purified = gather_inject(&tokens, &guide, &noisy.noise_idx, &salient)?;
//! assert_eq!(purified.dims(), [b, l, d]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Contracts shared by every op
//!
//! - Shapes and dtypes are in each op's docs; indices are u32; scores of a top-n are sorted
//!   best first and **ties go to the lower index**, on every path.
//! - **NaN**: an op that ranks ([`cosine_topk`], [`MemoryBank::search`],
//!   [`dissonance_topk`], [`topk_rows`]) returns an error naming where the NaN is (a NaN
//!   has no rank); [`gather_inject`], which only copies rows, carries a NaN to its output
//!   unchanged. No op drops or invents one.
//! - Errors, never panics, on bad input; each is one line naming the op, the value and
//!   what was expected ([`Error`]; the backtrace is in `{:?}` and [`Error::backtrace`]).
//! - Gradients: [`dissonance_topk`]'s `delta`, [`topk_rows`]' values and [`gather_inject`]
//!   are differentiable; retrieval scores and all indices are not.
//!
//! # Layout
//!
//! An op `<op>` has `kernels/<op>.cu`, `src/<family>/<op>/`, `kernels/emu/<op>.cpp` and
//! `tests/ops/<op>.rs` (docs/DESIGN.md, "Layout"). Modules: [`retrieve`] (`cosine_topk`,
//! paper Eq. 1), [`bank`], [`cap`] (the CAP ops and [`CapLayer`]), [`data`] (synthetic AVQA,
//! the MUSIC-AVQA loader, missing-modality simulation), [`model`] (experts, router, decoder,
//! the full R2ScP model), [`trainer`] (two-stage training, evaluation, ablations,
//! checkpoints; without `cli`: no progress bars, no PNG plots, no TOML).

pub mod bank;
#[doc(hidden)]
pub mod bench;
pub mod cap;
mod check;
pub mod data;
mod elem;
pub mod error;
#[doc(hidden)]
pub mod io;
#[doc(hidden)]
pub mod kernel;
#[doc(hidden)]
pub mod memory;
pub mod model;
#[doc(hidden)]
pub mod nn;
pub mod retrieve;
mod simd;
pub(crate) mod topk;
pub mod trainer;

pub use bank::MemoryBank;
pub use cap::{
    dissonance_topk, gather_inject, topk_rows, CapConfig, CapLayer, CapOutput, Context, Dissonance,
};
pub use error::{Error, Result};
pub use retrieve::{cosine_topk, cosine_topk_deferred, key_norms, PendingTopN};

/// The README's Rust examples, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

/// What a user of the ops, the bank and the CAP layer needs: `use r2scp::prelude::*;`.
pub mod prelude {
    pub use crate::bank::{MemoryBank, NO_ID};
    pub use crate::cap::{
        dissonance_topk, gather_inject, topk_rows, CapConfig, CapLayer, CapOutput, Context,
        Dissonance,
    };
    pub use crate::retrieve::{cosine_topk, cosine_topk_deferred, key_norms};
}
