//! Modality encoders Phi_m and the experts E_a, E_v, E_t with their stage-I heads.
//!
//! Every var built here lives under `expert.{audio,visual,text}.*` so the trainer
//! can freeze all of it in stage II by prefix.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder};

use crate::nn::{key_bias, masked_mean, DropoutRng, LayerNorm, Mha, TransformerEncoder};

/// Phi_m for a feature modality: Linear(D_raw -> D) plus a learned positional
/// embedding [L, D]. Vars: `proj`, `pos`.
#[derive(Debug, Clone)]
pub struct FeatureEncoder {
    proj: Linear,
    pos: Tensor,
    len: usize,
    in_dim: usize,
}

impl FeatureEncoder {
    /// `len` tokens of `in_dim` raw features -> `dim`.
    pub fn new(len: usize, in_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(in_dim, dim, vb.pp("proj"))?,
            pos: vb.get_with_hints(
                (len, dim),
                "pos",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            len,
            in_dim,
        })
    }

    /// Sum of |w| of the projection weight (a cheap change detector for caches).
    pub fn fingerprint(&self) -> Result<f32> {
        self.proj.weight().abs()?.sum_all()?.to_scalar::<f32>()
    }

    /// raw [B, L, D_raw] f32 -> [B, L, D]. L and D_raw must match the construction.
    pub fn forward(&self, raw: &Tensor) -> Result<Tensor> {
        let (_, l, d) = raw.dims3()?;
        if l != self.len || d != self.in_dim {
            crate::error::bail!(
                "FeatureEncoder: raw features {:?} do not match the expected [B, {}, {}]",
                raw.shape(),
                self.len,
                self.in_dim
            );
        }
        self.proj.forward(raw)?.broadcast_add(&self.pos)
    }
}

/// Phi_t: token embedding (vocab x D, id 0 = pad) plus a learned positional
/// embedding [Lq, D]. Vars: `emb`, `pos`.
#[derive(Debug, Clone)]
pub struct TokenEncoder {
    emb: Embedding,
    pos: Tensor,
    len: usize,
}

impl TokenEncoder {
    /// Questions of `len` tokens from a `vocab`-word vocabulary.
    pub fn new(len: usize, vocab: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            emb: candle_nn::embedding(vocab, dim, vb.pp("emb"))?,
            pos: vb.get_with_hints(
                (len, dim),
                "pos",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            len,
        })
    }

    /// The longest question it encodes (rows of its positional embedding).
    pub fn max_len(&self) -> usize {
        self.len
    }

    /// ids [B, L] u32 with 1 <= L <= Lq (a batch is padded to its longest question)
    /// -> [B, L, D].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        if l == 0 || l > self.len {
            crate::error::bail!(
                "TokenEncoder: question ids {:?} do not match the expected [B, 1..={}]",
                ids.shape(),
                self.len
            );
        }
        self.emb
            .forward(ids)?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)
    }
}

/// Stage-I head of the audio / visual expert: P(y | E_m(F_m), question).
/// The expert itself sees only its modality; the head adds a private bag-of-words
/// question vector (its own embedding, not E_t) because an AVQA answer is not
/// defined without the question. The question vector attends over the expert's
/// tokens (MHA pooling), then an MLP on [pooled; question] gives answer logits.
/// Vars: `qemb`, `ln`, `pool`, `fc1`, `fc2`.
#[derive(Debug, Clone)]
pub struct UniHead {
    qemb: Embedding,
    ln: LayerNorm,
    pool: Mha,
    fc1: Linear,
    fc2: Linear,
}

impl UniHead {
    /// Width D = `dim`, `vocab` question words, `answers` classes.
    pub fn new(
        dim: usize,
        heads: usize,
        vocab: usize,
        answers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            qemb: candle_nn::embedding(vocab, dim, vb.pp("qemb"))?,
            ln: LayerNorm::new(dim, vb.pp("ln"))?,
            pool: Mha::new(dim, heads, vb.pp("pool"))?,
            fc1: candle_nn::linear(2 * dim, dim, vb.pp("fc1"))?,
            fc2: candle_nn::linear(dim, answers, vb.pp("fc2"))?,
        })
    }

    /// h [B, L, D] expert tokens, question [B, Lq] u32, qmask [B, Lq] f32 -> logits [B, A].
    pub fn forward(
        &self,
        h: &Tensor,
        question: &Tensor,
        qmask: &Tensor,
        drop: &DropoutRng,
        p: f32,
        train: bool,
    ) -> Result<Tensor> {
        let qv = masked_mean(&self.qemb.forward(question)?, qmask)?; // [B, D]
        let pooled = self.pool.forward(&qv.unsqueeze(1)?, h, None)?.squeeze(1)?;
        let z = Tensor::cat(&[&self.ln.forward(&pooled)?, &qv], 1)?;
        let z = drop.apply(&self.fc1.forward(&z)?.gelu()?, p, train)?;
        self.fc2.forward(&z)
    }
}

/// Stage-I head of the text expert (the {v,t,a} term of Eq. 10): question
/// tokens from E_t attend (one cross-attention block) over the concatenated
/// audio and visual expert tokens, then a masked mean over the question and an
/// MLP give answer logits. Vars: `ln_q`, `ln_kv`, `cross`, `ln`, `fc1`, `fc2`.
#[derive(Debug, Clone)]
pub struct FusedHead {
    ln_q: LayerNorm,
    ln_kv: LayerNorm,
    cross: Mha,
    ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Lq: question tokens are padded to at most this (dropout masks are drawn at it).
    lq: usize,
}

impl FusedHead {
    /// Width D = `dim`, `answers` classes, questions of at most `lq` tokens.
    pub fn new(
        dim: usize,
        heads: usize,
        answers: usize,
        lq: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            lq,
            ln_q: LayerNorm::new(dim, vb.pp("ln_q"))?,
            ln_kv: LayerNorm::new(dim, vb.pp("ln_kv"))?,
            cross: Mha::new(dim, heads, vb.pp("cross"))?,
            ln: LayerNorm::new(dim, vb.pp("ln"))?,
            fc1: candle_nn::linear(dim, dim, vb.pp("fc1"))?,
            fc2: candle_nn::linear(dim, answers, vb.pp("fc2"))?,
        })
    }

    /// ht [B, Lq, D], qmask [B, Lq]; av [B, La+Lv, D] audio-visual tokens with
    /// av_mask [B, La+Lv] (0 for every token of a missing modality) -> logits [B, A].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ht: &Tensor,
        qmask: &Tensor,
        av: &Tensor,
        av_mask: &Tensor,
        drop: &DropoutRng,
        p: f32,
        train: bool,
    ) -> Result<Tensor> {
        let bias = key_bias(av_mask, DType::F32)?;
        let a = self.cross.forward(
            &self.ln_q.forward(ht)?,
            &self.ln_kv.forward(av)?,
            Some(&bias),
        )?;
        let x = (ht + drop.apply_padded(&a, p, train, Some(self.lq))?)?;
        let pooled = masked_mean(&self.ln.forward(&x)?, qmask)?;
        let z = drop.apply(&self.fc1.forward(&pooled)?.gelu()?, p, train)?;
        self.fc2.forward(&z)
    }
}

/// An audio or visual expert: Phi_m, the transformer E_m and its stage-I head.
/// Vars under its prefix: `phi.*`, `enc.*`, `head.*`.
#[derive(Debug, Clone)]
pub struct AvExpert {
    /// Phi_m.
    pub phi: FeatureEncoder,
    /// E_m.
    pub enc: TransformerEncoder,
    /// Stage-I head.
    pub head: UniHead,
}

/// Sizes shared by the experts.
#[derive(Debug, Clone, Copy)]
pub struct ExpertSizes {
    /// D.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN hidden width.
    pub ffn: usize,
    /// Question vocabulary size.
    pub vocab: usize,
    /// Answer classes.
    pub answers: usize,
}

impl AvExpert {
    /// `len` tokens of `in_dim` raw features, `layers` transformer layers.
    pub fn new(
        len: usize,
        in_dim: usize,
        layers: usize,
        s: ExpertSizes,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            phi: FeatureEncoder::new(len, in_dim, s.dim, vb.pp("phi"))?,
            enc: TransformerEncoder::new(s.dim, s.heads, s.ffn, layers, vb.pp("enc"))?,
            head: UniHead::new(s.dim, s.heads, s.vocab, s.answers, vb.pp("head"))?,
        })
    }

    /// E_m(Phi_m(raw)): raw [B, L, D_raw] -> [B, L, D].
    pub fn encode(&self, raw: &Tensor, drop: &DropoutRng, p: f32, train: bool) -> Result<Tensor> {
        let f = self.phi.forward(raw)?;
        self.enc.forward(&f, None, drop, p, train)
    }
}

/// The text expert: Phi_t, E_t and the fused stage-I head.
/// Vars under its prefix: `phi.*`, `enc.*`, `head.*`.
#[derive(Debug, Clone)]
pub struct TextExpert {
    /// Phi_t.
    pub phi: TokenEncoder,
    /// E_t.
    pub enc: TransformerEncoder,
    /// Stage-I head ({v,t,a} term of Eq. 10).
    pub head: FusedHead,
}

impl TextExpert {
    /// Questions of `len` tokens, `layers` transformer layers.
    pub fn new(len: usize, layers: usize, s: ExpertSizes, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            phi: TokenEncoder::new(len, s.vocab, s.dim, vb.pp("phi"))?,
            enc: TransformerEncoder::new(s.dim, s.heads, s.ffn, layers, vb.pp("enc"))?,
            head: FusedHead::new(s.dim, s.heads, s.answers, len, vb.pp("head"))?,
        })
    }

    /// E_t(Phi_t(ids)) with pad keys masked: ids [B, L] u32, mask [B, L] -> [B, L, D]
    /// (L <= Lq; dropout masks are drawn at Lq, so the padding does not change the result).
    pub fn encode(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        drop: &DropoutRng,
        p: f32,
        train: bool,
    ) -> Result<Tensor> {
        let f = self.phi.forward(ids)?;
        self.enc
            .forward_padded(&f, Some(mask), drop, p, train, Some(self.phi.max_len()))
    }
}
