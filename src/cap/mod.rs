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
//! `tensor.device()`. Ordering everywhere: larger first, ties to the LOWER index. NaN: the
//! ranking ops (`dissonance_topk`, `topk_rows`) return an error naming where it is (the
//! kernels rank it as -inf, so their output is deterministic before the check);
//! `gather_inject` copies values, a NaN included.

#[doc(hidden)]
pub mod dissonance_topk;
#[doc(hidden)]
pub mod gather_inject;
mod layer;
#[doc(hidden)]
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
    use super::dissonance_topk::kernel::{anchor_plan, plan as dissonance_plan};
    use super::gather_inject::kernel::plan as inject_plan;
    use super::topk_rows::kernel::plan as topk_rows_plan;
    use crate::kernel::rows_vec16;

    #[test]
    fn plans_cover_rows_and_fit_smem() {
        // 8 tokens per block: ceil(60 / 8) = 8 blocks per batch row
        let p = dissonance_plan(64, 60, 512, 5).expect("plan");
        assert_eq!((p.launch.grid, p.launch.block), ((512, 1, 1), (128, 1, 1)));
        assert_eq!((p.kp, p.tile), (8, 64));
        assert_eq!(p.launch.smem_bytes, (512 + 32 + 24 + 2 * (16 + 64)) * 4);
        assert_eq!(
            dissonance_plan(3, 1, 8, 1).expect("plan").launch.grid,
            (3, 1, 1)
        );
        // one 16-byte vector of columns per lane: 128 f32 or 256 f16 columns per block
        let a = anchor_plan(64, 512, 4).expect("plan");
        assert_eq!(
            (a.grid, a.block, a.smem_bytes),
            ((256, 1, 1), (128, 1, 1), 0)
        );
        assert_eq!(anchor_plan(2, 257, 2).expect("plan").grid, (4, 1, 1));
        let p = dissonance_plan(1, 3000, 64, 1000).expect("plan");
        assert_eq!((p.kp, p.tile), (1024, 1024));
        assert!(dissonance_plan(1, 3000, 64, 1025).is_err());
        assert!(dissonance_plan(1, 10, 20_000, 5).is_err());
        // short rows: one warp per row, 2 rows per block, no shared memory
        let p = topk_rows_plan(3, 1, 1).expect("plan");
        assert_eq!((p.kp, p.tile), (2, 2));
        assert_eq!((p.launch.grid, p.launch.smem_bytes), ((2, 1, 1), 0));
        let p = topk_rows_plan(3, 257, 1).expect("plan");
        assert_eq!(p.launch.grid, (3, 1, 1));
        assert_eq!(
            topk_rows_plan(3, 256, 33).expect("plan").launch.grid,
            (3, 1, 1)
        );
        assert_eq!(inject_plan(9).expect("plan").grid, (2, 1, 1));
        assert_eq!(inject_plan(9).expect("plan").block, (256, 1, 1));
        assert!(inject_plan(0).is_err());
    }

    #[test]
    fn rows_are_vectorised_only_when_every_row_is_aligned() {
        assert!(rows_vec16(64, 4, &[0x1000, 0x2010]));
        assert!(rows_vec16(8, 2, &[0x1000]));
        assert!(!rows_vec16(37, 4, &[0x1000]));
        assert!(!rows_vec16(6, 2, &[0x1000])); // 12-byte rows
        assert!(!rows_vec16(64, 4, &[0x1000, 0x2004]));
    }
}
