//! Batching: deterministic order, [`Batch`] tensors on a device, missing modalities zeroed.

use crate::error::bail;
use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Dataset, Missing, MissingPolicy, Modality, QuestionType};

/// One batch of B questions with their clips, on one device.
///
/// The features and key of a sample's missing modality are exactly zero (never the real values),
/// so nothing can leak; models must still consult [`Batch::missing`] and not use them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Audio tokens `[B, La, Da]` f32 (zero where audio is missing).
    pub audio: Tensor,
    /// Visual tokens `[B, Lv, Dv]` f32 (zero where visual is missing).
    pub visual: Tensor,
    /// Audio unified key `[B, Dk]` f32 (zero where audio is missing).
    pub audio_key: Tensor,
    /// Visual unified key `[B, Dk]` f32 (zero where visual is missing).
    pub visual_key: Tensor,
    /// Question token ids `[B, Lb]` u32, 0 = pad, where Lb (at most the split's Lq) is the
    /// length of the batch's longest question.
    pub question: Tensor,
    /// Question mask `[B, Lb]` f32, 1 = real token, 0 = pad.
    pub question_mask: Tensor,
    /// Answer class `[B]` u32.
    pub answer: Tensor,
    /// Question type of each sample `[B]`.
    pub qtypes: Vec<QuestionType>,
    /// Clip id of each sample `[B]` (for the memory bank's self-exclusion).
    pub clip_ids: Vec<u32>,
    /// Missing modality of each sample `[B]`.
    pub missing: Vec<Missing>,
    /// Question row of each sample in the source [`Dataset`] `[B]`.
    pub rows: Vec<usize>,
}

impl Batch {
    /// Batch size B.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when B = 0 (never produced by [`batches`]).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Presence mask `[B]` f32 on the batch's device: 1 where modality `m` is present, 0 where missing.
    pub fn present(&self, m: Modality) -> Result<Tensor> {
        let v: Vec<f32> = self
            .missing
            .iter()
            .map(|x| if x.is_missing(m) { 0.0 } else { 1.0 })
            .collect();
        Tensor::from_vec(v, self.missing.len(), self.audio.device())
    }

    /// The bank exclusion list for this batch: `Some(clip id)` for every sample (a clip never
    /// retrieves itself), in the form `MemoryBank::search` takes.
    pub fn exclude_ids(&self) -> Vec<Option<u32>> {
        self.clip_ids.iter().map(|&c| Some(c)).collect()
    }
}

impl Dataset {
    /// Build the batch of question rows `rows` on `device`, with missing modalities decided by
    /// `policy` (per question row) and zeroed.
    ///
    /// Errors on an empty `rows`, a row out of range, or an invalid policy.
    pub fn batch(&self, rows: &[usize], policy: &MissingPolicy, device: &Device) -> Result<Batch> {
        policy.validate()?;
        if rows.is_empty() {
            bail!("Dataset::batch: rows is empty, expected at least one question row");
        }
        let n = self.len();
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            bail!("Dataset::batch: question row {r} out of range, the split has {n} questions");
        }
        let b = rows.len();
        let missing: Vec<Missing> = rows.iter().map(|&r| policy.decide(r)).collect();
        let clip_rows: Vec<u32> = rows.iter().map(|&r| self.clip_of[r] as u32).collect();
        let cpu = self.audio.device();
        let clip_idx = Tensor::from_vec(clip_rows.clone(), b, cpu)?;
        let q_idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), b, cpu)?;

        let gather = |t: &Tensor, m: Modality| -> Result<Tensor> {
            let g = t.index_select(&clip_idx, 0)?;
            let g = if missing.iter().any(|x| x.is_missing(m)) {
                let keep: Vec<u8> = missing.iter().map(|x| u8::from(!x.is_missing(m))).collect();
                let mut shape = vec![b];
                shape.extend(std::iter::repeat_n(1, g.rank() - 1));
                let keep = Tensor::from_vec(keep, shape, cpu)?.broadcast_as(g.shape())?;
                keep.where_cond(&g, &g.zeros_like()?)?
            } else {
                g
            };
            g.to_device(device)
        };
        let audio = gather(&self.audio, Modality::Audio)?;
        let visual = gather(&self.visual, Modality::Visual)?;
        let audio_key = gather(&self.audio_key, Modality::Audio)?;
        let visual_key = gather(&self.visual_key, Modality::Visual)?;

        // Padded to the batch's longest question, not the split's.
        let question = self.questions.index_select(&q_idx, 0)?;
        let lq = rows
            .iter()
            .map(|&r| self.question_len[r])
            .max()
            .unwrap_or(1)
            .clamp(1, question.dim(1)?);
        let question = question.narrow(1, 0, lq)?.contiguous()?;
        let mut mask = vec![0f32; b * lq];
        for (i, &r) in rows.iter().enumerate() {
            let l = self.question_len[r].min(lq);
            mask[i * lq..i * lq + l].iter_mut().for_each(|x| *x = 1.0);
        }
        let question_mask = Tensor::from_vec(mask, (b, lq), device)?;
        let question = question.to_device(device)?;
        let answer = Tensor::from_vec(
            rows.iter().map(|&r| self.answers[r]).collect::<Vec<u32>>(),
            b,
            device,
        )?;
        Ok(Batch {
            audio,
            visual,
            audio_key,
            visual_key,
            question,
            question_mask,
            answer,
            qtypes: rows.iter().map(|&r| self.qtypes[r]).collect(),
            clip_ids: clip_rows
                .iter()
                .map(|&c| self.clip_ids[c as usize])
                .collect(),
            missing,
            rows: rows.to_vec(),
        })
    }

    /// The question order [`batches`] uses: `0..N`, shuffled by a ChaCha8 RNG seeded with
    /// `shuffle_seed` when given.
    pub fn order(&self, shuffle_seed: Option<u64>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(seed) = shuffle_seed {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            order.shuffle(&mut rng);
        }
        order
    }
}

/// Iterator over the batches of a [`Dataset`], see [`batches`].
#[derive(Debug)]
pub struct Batches<'a> {
    ds: &'a Dataset,
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    policy: MissingPolicy,
    device: Device,
    failed: bool,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        if self.batch_size == 0 {
            self.failed = true;
            return Some(Err(candle_core::Error::Msg(
                "batches: batch_size = 0, expected at least 1".to_string(),
            )));
        }
        if let Err(e) = self.policy.validate() {
            self.failed = true;
            return Some(Err(e));
        }
        if self.pos >= self.order.len() {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let rows = &self.order[self.pos..end];
        self.pos = end;
        let r = self.ds.batch(rows, &self.policy, &self.device);
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.failed {
            0
        } else if self.batch_size == 0 {
            1
        } else {
            (self.order.len() - self.pos).div_ceil(self.batch_size)
        };
        (n, Some(n))
    }
}

/// Deterministic batches over all questions of `ds`.
///
/// Order: `0..N`, or shuffled by `shuffle_seed` (ChaCha8, see [`Dataset::order`]). The last
/// batch holds the remainder (it is not dropped). Missing modalities come from `missing`
/// (decided per question row, see [`MissingPolicy`]) and are zeroed. Tensors are built on CPU and
/// moved to `device`. A zero `batch_size` or an invalid policy yields one error item.
pub fn batches<'a>(
    ds: &'a Dataset,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    missing: MissingPolicy,
    device: &Device,
) -> Batches<'a> {
    Batches {
        ds,
        order: ds.order(shuffle_seed),
        pos: 0,
        batch_size,
        policy: missing,
        device: device.clone(),
        failed: false,
    }
}
