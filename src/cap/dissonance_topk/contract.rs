//! The contract of `dissonance_topk`: its context and output types, and the validation every
//! path runs.

use crate::check::{
    check_device, check_dims2, check_dtype, check_like, dims3, middle_dim, CAP_FLOATS,
};
use candle_core::{bail, DType, Result, Tensor};

pub(crate) const OP: &str = "dissonance_topk";

/// The available-modality context of [`fn@super::dissonance_topk`]: tokens to pool, or the
/// pooled vector itself.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use r2scp::Context;
/// let dev = Device::Cpu;
/// let h_avl = Tensor::zeros((2, 7, 16), candle_core::DType::F32, &dev)?; // [B, La, D]
/// let valid = Tensor::new(&[[1u8, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], &dev)?; // [B, La]
/// let _padded = Context::Tokens { h_avl: &h_avl, mask: Some(&valid) };
/// let _all = Context::Tokens { h_avl: &h_avl, mask: None };
/// let g = h_avl.mean(1)?; // [B, D]
/// let _pooled = Context::Anchor(&g);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

/// Output of [`fn@super::dissonance_topk`].
#[derive(Clone, Debug)]
pub struct Dissonance {
    /// \[B, L\] delta = 1 - cos(P\[b, i\], g\[b\]) (Eq. 3 with the epsilon of Eq. 1); f32, or f64
    /// for f64 inputs. Differentiable w.r.t. `P` and the context tensor.
    pub delta: Tensor,
    /// [B, k] u32 noise indices, delta descending, ties to the lower index (Eq. 5). No gradient.
    pub noise_idx: Tensor,
    /// [B, L] f32, 1 at the noise indices, else 0. No gradient.
    pub noise_mask: Tensor,
}

/// Problem sizes after validation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub l: usize,
    /// Available tokens per row (0 for an anchor context).
    pub la: usize,
    pub d: usize,
    pub k: usize,
}

/// Validates shapes, dtypes, devices and k; returns the sizes.
pub(crate) fn validate(p: &Tensor, ctx: &Context, k: usize) -> Result<Dims> {
    let (b, l, d) = dims3((p, "P"), OP)?;
    check_dtype(p.dtype(), &CAP_FLOATS, "P", "f32, f16, bf16 or f64", OP)?;
    if k == 0 {
        bail!("{OP}: k = 0, expected 1 <= k <= L = {l}");
    }
    if k > l {
        bail!("{OP}: k = {k} exceeds the L = {l} retrieved tokens");
    }
    if d == 0 {
        bail!("{OP}: P has feature dim D = 0, expected D >= 1");
    }
    let la = match ctx {
        Context::Anchor(g) => {
            check_dims2((g, "anchor"), "[B, D]", b, d, OP)?;
            check_like((g, "anchor"), (p, "P"), OP)?;
            0
        }
        Context::Tokens { h_avl, mask } => {
            let la = middle_dim((h_avl, "h_avl"), "La", b, d, OP)?;
            if la == 0 {
                bail!("{OP}: h_avl has La = 0 tokens, expected La >= 1");
            }
            check_like((h_avl, "h_avl"), (p, "P"), OP)?;
            if let Some(m) = mask {
                check_dims2((m, "mask"), "[B, La]", b, la, OP)?;
                if !matches!(m.dtype(), DType::F32 | DType::U8) {
                    bail!("{OP}: mask dtype {:?}, expected f32 or u8", m.dtype());
                }
                check_device((m, "mask"), (p, "P"), OP)?;
            }
            la
        }
    };
    Ok(Dims { b, l, la, d, k })
}
