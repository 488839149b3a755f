//! CAP: Context-aware Adaptive Purification (paper section 3.3, Algorithm 1) as candle ops and
//! one reusable layer.
//!
//! - [`fn@dissonance_topk`] (phase 1, Eq. 2-5): masked mean pooling of the available modality,
//!   cosine dissonance of every projected retrieved token, top-k noise indices and mask, in one
//!   fused pass (CPU) or one kernel (CUDA). `delta` is differentiable w.r.t. `P` and the context.
//! - [`fn@topk_rows`]: the same top-k machinery over a score row (phase 2 saliency selection).
//! - [`fn@gather_inject`] (phase 3, Eq. 8-9): out-of-place row injection with its backward.
//! - [`CapLayer`]: `W_proj`, the guidance block (self-attention + cross-attention with the
//!   question), saliency, the injection, and a straight-through gate so `W_proj` learns.
//!
//! Each op lives in its own module (`src/cap/<op>/`, kernel `kernels/<op>.cu`, tests
//! `tests/ops/<op>.rs`) and has a `*_reference` built only from plain candle ops; the tests
//! hold the fused paths (and the emulated CUDA kernels) to them. Device dispatch follows
//! `tensor.device()`. Ordering everywhere: larger first, ties to the LOWER index, NaN ranked
//! as -inf.

pub mod dissonance_topk;
pub mod gather_inject;
mod layer;
pub mod topk_rows;

#[cfg(feature = "emulate")]
#[doc(hidden)]
pub use dissonance_topk::dissonance_topk_emulated;
pub use dissonance_topk::{dissonance_topk, dissonance_topk_reference, Context, Dissonance};
pub use gather_inject::{gather_inject, gather_inject_reference};
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub use gather_inject::{gather_inject_backward_emulated, gather_inject_emulated};
pub use layer::{CapConfig, CapLayer, CapOutput};
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub use topk_rows::topk_rows_emulated;
pub use topk_rows::{topk_rows, topk_rows_reference};

#[cfg(test)]
mod tests {
    use super::dissonance_topk::kernel::plan as dissonance_plan;
    use super::gather_inject::kernel::plan as inject_plan;
    use super::topk_rows::kernel::plan as topk_rows_plan;

    #[test]
    fn plans_cover_rows_and_fit_smem() {
        let p = dissonance_plan(64, 60, 512, 5).expect("plan");
        assert_eq!(p.launch.grid, (64, 1, 1));
        assert_eq!((p.kp, p.tile), (8, 64));
        assert_eq!(p.launch.smem_bytes, (512 + 32 + 24 + 2 * (16 + 64)) * 4);
        let p = dissonance_plan(1, 3000, 64, 1000).expect("plan");
        assert_eq!((p.kp, p.tile), (1024, 1024));
        assert!(dissonance_plan(1, 3000, 64, 1025).is_err());
        assert!(dissonance_plan(1, 10, 20_000, 5).is_err());
        let p = topk_rows_plan(3, 1, 1).expect("plan");
        assert_eq!((p.kp, p.tile), (2, 2));
        assert_eq!(inject_plan(9).expect("plan").grid, (5, 1, 1));
        assert!(inject_plan(0).is_err());
    }
}
