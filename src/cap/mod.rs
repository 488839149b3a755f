//! CAP: Context-aware Adaptive Purification (paper section 3.3, Algorithm 1) as candle ops and
//! one reusable layer.
//!
//! - [`dissonance_topk`] (phase 1, Eq. 2-5): masked mean pooling of the available modality,
//!   cosine dissonance of every projected retrieved token, top-k noise indices and mask, in one
//!   fused pass (CPU) or one kernel (CUDA). `delta` is differentiable w.r.t. `P` and the context.
//! - [`topk_rows`]: the same top-k machinery over a score row (phase 2 saliency selection).
//! - [`gather_inject`] (phase 3, Eq. 8-9): out-of-place row injection with its backward.
//! - [`CapLayer`]: `W_proj`, the guidance block (self-attention + cross-attention with the
//!   question), saliency, the injection, and a straight-through gate so `W_proj` learns.
//!
//! Every op has a `*_reference` built only from plain candle ops; the tests hold the fused
//! paths (and the emulated CUDA kernels) to them. Device dispatch follows `tensor.device()`.
//! Ordering everywhere: larger first, ties to the LOWER index, NaN ranked as -inf.

#[cfg(feature = "cuda")]
mod cuda;
mod dissonance;
mod elem;
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub mod emu;
mod inject;
pub mod kernel;
mod layer;
mod topk_rows;

pub use dissonance::{dissonance_topk, dissonance_topk_reference};
pub use inject::{gather_inject, gather_inject_reference};
pub use layer::{CapConfig, CapLayer, CapOutput};
pub use topk_rows::{topk_rows, topk_rows_reference};

use candle_core::Tensor;

/// The epsilon of Eq. 1 added to the product of norms in every CAP cosine, so a zero vector
/// has cosine 0 (delta 1), never NaN.
pub const COS_EPS: f64 = 1e-8;

/// The available-modality context of [`dissonance_topk`].
#[derive(Clone, Copy, Debug)]
pub enum Context<'a> {
    /// Available tokens `h_avl` [B, La, D] (the dtype of `P`), pooled by a masked mean
    /// (Eq. 2). `mask` [B, La] f32 or u8 holds per-token weights, 1 = valid, 0 = padded:
    /// g = sum_t m_t h_t / sum_t m_t, and g = 0 when a row has no valid token.
    Tokens {
        /// [B, La, D]
        h_avl: &'a Tensor,
        /// [B, La] f32 or u8, 1 = valid
        mask: Option<&'a Tensor>,
    },
    /// A precomputed anchor g [B, D] (the dtype of `P`).
    Anchor(&'a Tensor),
}

/// Output of [`dissonance_topk`].
#[derive(Clone, Debug)]
pub struct Dissonance {
    /// [B, L] delta = 1 - cos(P[b, i], g[b]) (Eq. 3 with the epsilon of Eq. 1); f32, or f64
    /// for f64 inputs. Differentiable w.r.t. `P` and the context tensor.
    pub delta: Tensor,
    /// [B, k] u32 noise indices, delta descending, ties to the lower index (Eq. 5). No gradient.
    pub noise_idx: Tensor,
    /// [B, L] f32, 1 at the noise indices, else 0. No gradient.
    pub noise_mask: Tensor,
}
