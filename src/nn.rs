//! Transformer building blocks on candle-nn, shared by the model and `CapLayer`: a
//! differentiable LayerNorm,
//! multi-head attention with key masks, a feed-forward block, a pre-LN encoder
//! layer and a seeded, deterministic dropout.
//!
//! Why not `candle_nn::LayerNorm` / `candle_nn::ops::softmax_last_dim`: in
//! candle-nn 0.11.1 both take a fused path (`apply_op*_no_bwd`) that records no
//! backward op, so gradients would silently stop there. Everything here is built
//! from plain candle ops that all have a backward.
//!
//! The model runs them in f32; `CapLayer` (crate::cap) runs them in its own dtype (f16/bf16
//! inputs are normalised in f32). Tensors live on the caller's device; nothing here is
//! CPU-only.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Additive attention logit bias of a masked key (valid keys get 0). Finite in every dtype
/// (f16 tops out at 65504), so an all-masked row softmaxes to a finite row rather than NaN;
/// after the softmax's max subtraction a masked key's weight underflows to exactly 0.
pub const MASK_BIAS: f64 = -30_000.0;

/// LayerNorm over the last dim, built from differentiable ops.
/// Vars: `weight` [D] (init 1), `bias` [D] (init 0).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `dim` = size of the normalised (last) dim.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps: 1e-5,
        })
    }

    /// A copy whose parameters are detached (constants: no gradient reaches the vars).
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

/// A copy of `l` with detached weight and bias.
pub fn detach_linear(l: &Linear) -> Linear {
    Linear::new(l.weight().detach(), l.bias().map(|b| b.detach()))
}

impl Module for LayerNorm {
    /// x [.., D] -> [.., D]; f16/bf16 are normalised in f32 and rounded back.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.to_dtype(if dt == DType::F64 {
            DType::F64
        } else {
            DType::F32
        })?;
        let d = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / d)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Seeded dropout. Masks are drawn on the host from ChaCha8 seeded by
/// (`seed`, call counter) and copied to the tensor's device, so a run is
/// reproducible on CPU and CUDA alike (candle's CPU RNG cannot be seeded).
#[derive(Debug)]
pub struct DropoutRng {
    seed: AtomicU64,
    counter: AtomicU64,
}

impl DropoutRng {
    /// A new stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed: AtomicU64::new(seed),
            counter: AtomicU64::new(0),
        }
    }

    /// Restart the stream at `seed` (call counter reset to 0).
    pub fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst);
        self.counter.store(0, Ordering::SeqCst);
    }

    /// Inverted dropout with probability `p` when `train`; identity otherwise.
    pub fn apply(&self, x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
        self.apply_padded(x, p, train, None)
    }

    /// [`Self::apply`] on a token tensor `x` [B, L, ..] padded to its batch's longest
    /// sequence, `L <= full`: the mask is drawn for [B, full, ..] and cut to L, so a
    /// token's mask does not depend on how its batch was padded (`None`, or `full == L`:
    /// exactly [`Self::apply`]).
    pub fn apply_padded(
        &self,
        x: &Tensor,
        p: f32,
        train: bool,
        full: Option<usize>,
    ) -> Result<Tensor> {
        if !train || p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            crate::error::bail!("dropout: p = {p} must be in [0, 1)");
        }
        let mut shape = x.dims().to_vec();
        let l = shape.get(1).copied().unwrap_or(0);
        let full = full.filter(|&f| shape.len() >= 2 && f != l);
        if let Some(f) = full {
            if f < l {
                candle_core::bail!("dropout: tokens {l} exceed the padded length {f}");
            }
            shape[1] = f;
        }
        let c = self.counter.fetch_add(1, Ordering::SeqCst);
        let s = self.seed.load(Ordering::SeqCst);
        let mut rng =
            ChaCha8Rng::seed_from_u64(s ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17));
        let scale = 1.0 / (1.0 - p);
        let n: usize = shape.iter().product();
        let mask: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
            .collect();
        let mut mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        if full.is_some() {
            mask = mask.narrow(1, 0, l)?;
        }
        x.mul(&mask)
    }
}

/// Key mask [B, Lk] (f32 or u8, 1 = valid) -> additive bias [B, 1, 1, Lk] in `dtype` for
/// attention logits: 0 for valid keys, [`MASK_BIAS`] for masked ones.
pub fn key_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, lk) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    ((1.0 - m)? * MASK_BIAS)?.reshape((b, 1, 1, lk))
}

/// Mean over dim 1 of x [B, L, D] counting only rows where mask [B, L] is 1; -> [B, D].
/// A row with an all-zero mask gives zeros (the denominator is clamped to 1).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(2)?; // [B, L, 1]
    let num = x.broadcast_mul(&m)?.sum(1)?; // [B, D]
    let den = m.sum(1)?.clamp(1.0f32, f32::MAX)?; // [B, 1]
    num.broadcast_div(&den)
}

/// Multi-head (cross-)attention with optional key masking.
/// Vars: `q`, `k`, `v`, `o` (Linear D -> D with bias).
#[derive(Debug, Clone)]
pub struct Mha {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    head_dim: usize,
}

impl Mha {
    /// `dim` must be divisible by `heads`.
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            crate::error::bail!("Mha: dim = {dim} must be a positive multiple of heads = {heads}");
        }
        Ok(Self {
            q: candle_nn::linear(dim, dim, vb.pp("q"))?,
            k: candle_nn::linear(dim, dim, vb.pp("k"))?,
            v: candle_nn::linear(dim, dim, vb.pp("v"))?,
            o: candle_nn::linear(dim, dim, vb.pp("o"))?,
            heads,
            head_dim: dim / heads,
        })
    }

    /// A copy whose parameters are detached.
    pub fn detached(&self) -> Self {
        Self {
            q: detach_linear(&self.q),
            k: detach_linear(&self.k),
            v: detach_linear(&self.v),
            o: detach_linear(&self.o),
            heads: self.heads,
            head_dim: self.head_dim,
        }
    }

    /// xq [B, Lq, D], xkv [B, Lk, D], bias: additive [B, 1, 1, Lk] (see [`key_bias`]).
    /// Returns the output [B, Lq, D].
    pub fn forward(&self, xq: &Tensor, xkv: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let scores = self.logits(xq, xkv)?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        self.mix(&attn, xkv)
    }

    /// x [B, L, D] -> [B, H, L, D/H] (contiguous).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Scaled attention logits [B, H, Lq, Lk] of queries xq [B, Lq, D] against keys
    /// xkv [B, Lk, D] (no mask): what `CapLayer` reads its saliency from.
    pub fn logits(&self, xq: &Tensor, xkv: &Tensor) -> Result<Tensor> {
        let (b, _, d) = xq.dims3()?;
        let (b2, _, d2) = xkv.dims3()?;
        if b != b2 || d != d2 {
            crate::error::bail!(
                "Mha: query {:?} and key/value {:?} disagree in batch or dim",
                xq.shape(),
                xkv.shape()
            );
        }
        let q = self.split_heads(&self.q.forward(xq)?)?;
        let k = self.split_heads(&self.k.forward(xkv)?)?;
        q.matmul(&k.t()?.contiguous()?)? * (1.0 / (self.head_dim as f64).sqrt())
    }

    /// The output [B, Lq, D] for attention weights attn [B, H, Lq, Lk] over xkv [B, Lk, D]:
    /// the weighted values, heads merged, through the output projection.
    pub fn mix(&self, attn: &Tensor, xkv: &Tensor) -> Result<Tensor> {
        let (b, _, lq, _) = attn.dims4()?;
        let v = self.split_heads(&self.v.forward(xkv)?)?;
        let out = attn.matmul(&v)?; // [B, H, Lq, hd]
        let out =
            out.transpose(1, 2)?
                .contiguous()?
                .reshape((b, lq, self.heads * self.head_dim))?;
        self.o.forward(&out)
    }
}

/// Position-wise feed-forward: Linear(D, F) -> GELU -> Linear(F, D). Vars: `fc1`, `fc2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    /// `dim` = D, `hidden` = F.
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(dim, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("fc2"))?,
        })
    }

    /// A copy whose parameters are detached.
    pub fn detached(&self) -> Self {
        Self {
            fc1: detach_linear(&self.fc1),
            fc2: detach_linear(&self.fc2),
        }
    }

    /// x [.., D] -> [.., D]; dropout after the activation.
    pub fn forward(&self, x: &Tensor, drop: &DropoutRng, p: f32, train: bool) -> Result<Tensor> {
        self.forward_padded(x, drop, p, train, None)
    }

    /// [`Self::forward`] on tokens x [B, L, D] padded to `full` (see
    /// [`DropoutRng::apply_padded`]).
    pub fn forward_padded(
        &self,
        x: &Tensor,
        drop: &DropoutRng,
        p: f32,
        train: bool,
        full: Option<usize>,
    ) -> Result<Tensor> {
        let h = self.fc1.forward(x)?.gelu()?;
        let h = drop.apply_padded(&h, p, train, full)?;
        self.fc2.forward(&h)
    }
}

/// Pre-LN transformer encoder layer:
/// x += Drop(MHA(LN(x))); x += Drop(FFN(LN(x))). Vars: `ln1`, `attn`, `ln2`, `ffn`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    ln1: LayerNorm,
    attn: Mha,
    ln2: LayerNorm,
    ffn: FeedForward,
}

impl EncoderLayer {
    /// D = `dim`, FFN hidden = `ffn`.
    pub fn new(dim: usize, heads: usize, ffn: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(dim, vb.pp("ln1"))?,
            attn: Mha::new(dim, heads, vb.pp("attn"))?,
            ln2: LayerNorm::new(dim, vb.pp("ln2"))?,
            ffn: FeedForward::new(dim, ffn, vb.pp("ffn"))?,
        })
    }

    /// A copy whose parameters are detached.
    pub fn detached(&self) -> Self {
        Self {
            ln1: self.ln1.detached(),
            attn: self.attn.detached(),
            ln2: self.ln2.detached(),
            ffn: self.ffn.detached(),
        }
    }

    /// x [B, L, D], bias [B, 1, 1, L] additive key mask or None -> [B, L, D].
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        drop: &DropoutRng,
        p: f32,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_padded(x, bias, drop, p, train, None)
    }

    /// [`Self::forward`] on tokens padded to `full` (see [`DropoutRng::apply_padded`]).
    pub fn forward_padded(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        drop: &DropoutRng,
        p: f32,
        train: bool,
        full: Option<usize>,
    ) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let a = self.attn.forward(&h, &h, bias)?;
        let x = (x + drop.apply_padded(&a, p, train, full)?)?;
        let h = self.ln2.forward(&x)?;
        let f = self.ffn.forward_padded(&h, drop, p, train, full)?;
        x + drop.apply_padded(&f, p, train, full)?
    }
}

/// A stack of [`EncoderLayer`]s followed by a final LayerNorm.
/// Vars: `layer{i}.*`, `ln_f`. It carries no positional embedding, so it accepts
/// any sequence length (positions come from the modality encoder Phi_m).
#[derive(Debug, Clone)]
pub struct TransformerEncoder {
    layers: Vec<EncoderLayer>,
    ln_f: LayerNorm,
}

impl TransformerEncoder {
    /// `n_layers` layers of width `dim`.
    pub fn new(
        dim: usize,
        heads: usize,
        ffn: usize,
        n_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|i| EncoderLayer::new(dim, heads, ffn, vb.pp(format!("layer{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            ln_f: LayerNorm::new(dim, vb.pp("ln_f"))?,
        })
    }

    /// A copy whose parameters are detached (shares storage with the vars, so it sees
    /// in-place var updates such as a checkpoint load, but gives them no gradient).
    pub fn detached(&self) -> Self {
        Self {
            layers: self.layers.iter().map(EncoderLayer::detached).collect(),
            ln_f: self.ln_f.detached(),
        }
    }

    /// x [B, L, D], key mask [B, L] (1 = valid) or None -> [B, L, D].
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        drop: &DropoutRng,
        p: f32,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_padded(x, mask, drop, p, train, None)
    }

    /// [`Self::forward`] on tokens padded to their batch's longest sequence, `L <= full`:
    /// dropout masks are drawn at the full length (see [`DropoutRng::apply_padded`]), so
    /// the result for the real tokens does not depend on the padding.
    pub fn forward_padded(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        drop: &DropoutRng,
        p: f32,
        train: bool,
        full: Option<usize>,
    ) -> Result<Tensor> {
        let bias = mask.map(|m| key_bias(m, x.dtype())).transpose()?;
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward_padded(&h, bias.as_ref(), drop, p, train, full)?;
        }
        self.ln_f.forward(&h)
    }
}

/// u32 row indices -> a \[n\] u32 tensor on `device`.
pub fn index_tensor(rows: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_vec(rows.to_vec(), rows.len(), device)
}
