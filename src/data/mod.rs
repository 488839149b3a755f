//! Data: everything between files on disk and [`Batch`] tensors.
//!
//! - [`synthetic`]: the built-in synthetic AVQA generator ([`generate`]), deterministic from a seed.
//! - [`avqa`]: the MUSIC-AVQA loader ([`load_music_avqa`]) for pre-extracted `.npy` features.
//! - [`missing`]: missing-modality simulation ([`MissingPolicy`], [`MissingSim`]).
//! - [`batch`]: deterministic batching into [`Batch`] tensors on a device ([`batches`]).
//! - [`fingerprint`]: content fingerprints of a data set (what a checkpoint records).
//! - [`mapping`]: a data set mapped onto a trained model's vocabularies ([`ModelVocab`]).
//!
//! All data is kept CPU-side, row-major, f32 (token ids and answers u32); a [`Batch`] is moved to the
//! requested device when it is built. See `docs/DATA.md`.

pub mod avqa;
pub mod batch;
pub mod fingerprint;
pub mod mapping;
pub mod missing;
pub mod synthetic;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context as _};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use avqa::{
    load_music_avqa, load_music_avqa_full, load_music_avqa_with, AvqaOptions, UnknownAnswer,
};
pub use batch::{batches, Batch, Batches};
pub use mapping::{map_splits, Loaded, ModelVocab, VocabMapping, MAX_QUESTION_WORDS};
pub use missing::{MissingPolicy, MissingSim};
pub use synthetic::{generate, generate_with_meta, SyntheticConfig, SyntheticMeta};

/// One of the two perceptual modalities (the question text is always present).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Audio tokens `[La, Da]`.
    Audio,
    /// Visual tokens `[Lv, Dv]`.
    Visual,
}

impl Modality {
    /// Both modalities, audio first.
    pub const ALL: [Modality; 2] = [Modality::Audio, Modality::Visual];

    /// `"audio"` or `"visual"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Audio => "audio",
            Modality::Visual => "visual",
        }
    }

    /// The other modality.
    pub fn other(self) -> Modality {
        match self {
            Modality::Audio => Modality::Visual,
            Modality::Visual => Modality::Audio,
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Modality {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "audio" | "a" => Ok(Modality::Audio),
            "visual" | "v" | "video" => Ok(Modality::Visual),
            _ => bail!("unknown modality {s:?}, expected \"audio\" or \"visual\""),
        }
    }
}

/// Which modality (if any) is missing for one sample of a [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    /// Complete sample: both modalities present.
    None,
    /// Audio missing (its features and key are zeroed in the batch).
    Audio,
    /// Visual missing (its features and key are zeroed in the batch).
    Visual,
}

impl Missing {
    /// True when modality `m` is missing for this sample.
    pub fn is_missing(self, m: Modality) -> bool {
        matches!(
            (self, m),
            (Missing::Audio, Modality::Audio) | (Missing::Visual, Modality::Visual)
        )
    }

    /// The missing modality, if any.
    pub fn modality(self) -> Option<Modality> {
        match self {
            Missing::None => None,
            Missing::Audio => Some(Modality::Audio),
            Missing::Visual => Some(Modality::Visual),
        }
    }

    /// `"none"`, `"audio"` or `"visual"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Missing::None => "none",
            Missing::Audio => "audio",
            Missing::Visual => "visual",
        }
    }
}

impl From<Modality> for Missing {
    fn from(m: Modality) -> Self {
        match m {
            Modality::Audio => Missing::Audio,
            Modality::Visual => Missing::Visual,
        }
    }
}

/// The kind of missingness simulated during training (paper: missing audio, missing visual, mixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingType {
    /// Dropped samples lose their audio.
    Audio,
    /// Dropped samples lose their visual.
    Visual,
    /// Dropped samples lose audio or visual with probability 1/2 each.
    Mixed,
}

impl MissingType {
    /// `"audio"`, `"visual"` or `"mixed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MissingType::Audio => "audio",
            MissingType::Visual => "visual",
            MissingType::Mixed => "mixed",
        }
    }
}

impl fmt::Display for MissingType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MissingType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "audio" => Ok(MissingType::Audio),
            "visual" => Ok(MissingType::Visual),
            "mixed" => Ok(MissingType::Mixed),
            _ => bail!("unknown missing type {s:?}, expected \"audio\", \"visual\" or \"mixed\""),
        }
    }
}

/// The nine MUSIC-AVQA question types (the columns of the paper's Table 1), in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuestionType {
    /// Audio / Counting ("A-Count").
    AudioCounting,
    /// Audio / Comparative ("A-Comp").
    AudioComparative,
    /// Visual / Counting ("V-Count").
    VisualCounting,
    /// Visual / Location ("V-Loc").
    VisualLocation,
    /// Audio-Visual / Existential ("AV-Ext").
    AvExistential,
    /// Audio-Visual / Counting ("AV-Count").
    AvCounting,
    /// Audio-Visual / Location ("AV-Loc").
    AvLocation,
    /// Audio-Visual / Comparative ("AV-Comp").
    AvComparative,
    /// Audio-Visual / Temporal ("AV-Temp").
    AvTemporal,
}

impl QuestionType {
    /// All nine types in Table-1 order; `ALL[t.index()] == t`.
    pub const ALL: [QuestionType; 9] = [
        QuestionType::AudioCounting,
        QuestionType::AudioComparative,
        QuestionType::VisualCounting,
        QuestionType::VisualLocation,
        QuestionType::AvExistential,
        QuestionType::AvCounting,
        QuestionType::AvLocation,
        QuestionType::AvComparative,
        QuestionType::AvTemporal,
    ];

    /// Short column name, e.g. `"A-Count"`, `"AV-Temp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuestionType::AudioCounting => "A-Count",
            QuestionType::AudioComparative => "A-Comp",
            QuestionType::VisualCounting => "V-Count",
            QuestionType::VisualLocation => "V-Loc",
            QuestionType::AvExistential => "AV-Ext",
            QuestionType::AvCounting => "AV-Count",
            QuestionType::AvLocation => "AV-Loc",
            QuestionType::AvComparative => "AV-Comp",
            QuestionType::AvTemporal => "AV-Temp",
        }
    }

    /// Position in [`QuestionType::ALL`] (0..9).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Inverse of [`QuestionType::index`].
    pub fn from_index(i: usize) -> Option<QuestionType> {
        Self::ALL.get(i).copied()
    }

    /// The MUSIC-AVQA group: `"Audio"`, `"Visual"` or `"Audio-Visual"`.
    pub fn group(self) -> &'static str {
        match self {
            QuestionType::AudioCounting | QuestionType::AudioComparative => "Audio",
            QuestionType::VisualCounting | QuestionType::VisualLocation => "Visual",
            _ => "Audio-Visual",
        }
    }

    /// Whether answering this type needs modality `m` (audio types need audio only, visual types
    /// visual only, audio-visual types both). The synthetic generator is built so this holds.
    pub fn needs(self, m: Modality) -> bool {
        match self.group() {
            "Audio" => m == Modality::Audio,
            "Visual" => m == Modality::Visual,
            _ => true,
        }
    }

    /// Parse a MUSIC-AVQA `type` pair, e.g. `("Audio-Visual", "Temporal")`. Case-insensitive;
    /// `"Existential"`/`"Exist"`, `"Comparative"`/`"Comparison"`, `"Location"`/`"Localization"`
    /// are accepted. `None` for a pair that is not one of the nine types.
    pub fn from_avqa(group: &str, kind: &str) -> Option<QuestionType> {
        let g = group.trim().to_ascii_lowercase().replace(['_', ' '], "-");
        let k = kind.trim().to_ascii_lowercase();
        let k = match k.as_str() {
            "counting" | "count" => "count",
            "comparative" | "comparison" | "compare" => "comp",
            "location" | "localization" | "localisation" => "loc",
            "existential" | "exist" | "existence" => "ext",
            "temporal" | "temporal-reasoning" => "temp",
            _ => return None,
        };
        match (g.as_str(), k) {
            ("audio", "count") => Some(QuestionType::AudioCounting),
            ("audio", "comp") => Some(QuestionType::AudioComparative),
            ("visual", "count") => Some(QuestionType::VisualCounting),
            ("visual", "loc") => Some(QuestionType::VisualLocation),
            ("audio-visual" | "audiovisual" | "av", "ext") => Some(QuestionType::AvExistential),
            ("audio-visual" | "audiovisual" | "av", "count") => Some(QuestionType::AvCounting),
            ("audio-visual" | "audiovisual" | "av", "loc") => Some(QuestionType::AvLocation),
            ("audio-visual" | "audiovisual" | "av", "comp") => Some(QuestionType::AvComparative),
            ("audio-visual" | "audiovisual" | "av", "temp") => Some(QuestionType::AvTemporal),
            _ => None,
        }
    }
}

impl fmt::Display for QuestionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token vocabulary: a list of distinct strings, id = position.
///
/// Question vocabularies start with [`Vocab::PAD`] = `"<pad>"` (id 0) and [`Vocab::UNK`] =
/// `"<unk>"` (id 1); answer vocabularies have no reserved entries unless documented otherwise.
/// Serialises as a JSON list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Vocab {
    tokens: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    /// Id of the padding token in question vocabularies.
    pub const PAD: u32 = 0;
    /// Id of the unknown-word token in question vocabularies.
    pub const UNK: u32 = 1;

    /// Build from distinct tokens; errors on a duplicate (naming it).
    pub fn new(tokens: Vec<String>) -> anyhow::Result<Self> {
        let mut index = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if let Some(prev) = index.insert(t.clone(), i as u32) {
                bail!("Vocab::new: token {t:?} appears twice (ids {prev} and {i})");
            }
        }
        Ok(Vocab { tokens, index })
    }

    /// A question vocabulary: `"<pad>"`, `"<unk>"`, then `words` (duplicates and reserved words
    /// skipped, order kept).
    pub fn question(words: impl IntoIterator<Item = String>) -> Self {
        let mut tokens = vec!["<pad>".to_string(), "<unk>".to_string()];
        let mut index: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        for w in words {
            if !index.contains_key(&w) {
                index.insert(w.clone(), tokens.len() as u32);
                tokens.push(w);
            }
        }
        Vocab { tokens, index }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Id of `token`, if present.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.index.get(token).copied()
    }

    /// Token with id `id`, if in range.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// All tokens, id order.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Ids of `words`, unknown words mapped to [`Vocab::UNK`] (question vocabularies only).
    pub fn encode<S: AsRef<str>>(&self, words: &[S]) -> Vec<u32> {
        words
            .iter()
            .map(|w| self.id(w.as_ref()).unwrap_or(Self::UNK))
            .collect()
    }

    /// Words of `ids`, stopping at the first [`Vocab::PAD`]; out-of-range ids become `"<?>"`.
    pub fn decode(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .take_while(|&&i| i != Self::PAD)
            .map(|&i| self.token(i).unwrap_or("<?>").to_string())
            .collect()
    }
}

impl TryFrom<Vec<String>> for Vocab {
    type Error = anyhow::Error;
    fn try_from(v: Vec<String>) -> anyhow::Result<Self> {
        Vocab::new(v)
    }
}

impl From<Vocab> for Vec<String> {
    fn from(v: Vocab) -> Self {
        v.tokens
    }
}

/// The shapes a model needs to be built for a data set (same for all splits of a [`Splits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataDims {
    /// Audio tokens per clip.
    pub la: usize,
    /// Audio feature dimension.
    pub da: usize,
    /// Visual tokens per clip.
    pub lv: usize,
    /// Visual feature dimension.
    pub dv: usize,
    /// Question length (padded).
    pub lq: usize,
    /// Unified key dimension (both modalities).
    pub dk: usize,
    /// Question vocabulary size (including `<pad>`, `<unk>`).
    pub vocab_size: usize,
    /// Number of answer classes.
    pub n_answers: usize,
}

/// One split of a data set; all tensors on CPU, contiguous, f32 unless stated.
///
/// Clips (C of them) and questions (N of them) are stored separately; question `i` is about clip
/// row `clip_of[i]`.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Audio tokens `[C, La, Da]` f32.
    pub audio: Tensor,
    /// Visual tokens `[C, Lv, Dv]` f32.
    pub visual: Tensor,
    /// Audio keys in the unified embedding space `[C, Dk]` f32.
    pub audio_key: Tensor,
    /// Visual keys in the unified embedding space `[C, Dk]` f32.
    pub visual_key: Tensor,
    /// Clip ids `[C]`, unique across all splits of one [`Splits`] (bank self-exclusion uses them).
    pub clip_ids: Vec<u32>,
    /// Clip names `[C]` (video ids for real data, `"syn-<id>"` for synthetic data).
    pub clip_names: Vec<String>,
    /// Question token ids `[N, Lq]` u32, padded with [`Vocab::PAD`] = 0.
    pub questions: Tensor,
    /// Number of real tokens of each question `[N]` (1..=Lq).
    pub question_len: Vec<usize>,
    /// Answer class of each question `[N]` (index into `answer_vocab`).
    pub answers: Vec<u32>,
    /// Question type of each question `[N]`.
    pub qtypes: Vec<QuestionType>,
    /// Clip row of each question `[N]` (row into the clip tensors).
    pub clip_of: Vec<usize>,
    /// Question vocabulary (shared by all splits).
    pub vocab: Vocab,
    /// Answer vocabulary (shared by all splits).
    pub answer_vocab: Vocab,
}

impl Dataset {
    /// Number of questions N.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// True when there are no questions.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Number of clips C.
    pub fn n_clips(&self) -> usize {
        self.clip_ids.len()
    }

    /// The shapes of this split.
    pub fn dims(&self) -> DataDims {
        let (_, la, da) = self.audio.dims3().unwrap_or((0, 0, 0));
        let (_, lv, dv) = self.visual.dims3().unwrap_or((0, 0, 0));
        let dk = self.audio_key.dims().get(1).copied().unwrap_or(0);
        let lq = self.questions.dims().get(1).copied().unwrap_or(0);
        DataDims {
            la,
            da,
            lv,
            dv,
            lq,
            dk,
            vocab_size: self.vocab.len(),
            n_answers: self.answer_vocab.len(),
        }
    }

    /// Number of questions of each type, indexed by [`QuestionType::index`].
    pub fn qtype_counts(&self) -> [usize; 9] {
        let mut c = [0; 9];
        for t in &self.qtypes {
            c[t.index()] += 1;
        }
        c
    }

    /// Check every shape/dtype/length invariant documented on the fields.
    pub fn validate(&self) -> anyhow::Result<()> {
        let c = self.clip_ids.len();
        let n = self.answers.len();
        let (ca, _, _) = self
            .audio
            .dims3()
            .context("Dataset.audio must be [C, La, Da]")?;
        let (cv, _, _) = self
            .visual
            .dims3()
            .context("Dataset.visual must be [C, Lv, Dv]")?;
        let (cka, dk) = self
            .audio_key
            .dims2()
            .context("Dataset.audio_key must be [C, Dk]")?;
        let (ckv, dkv) = self
            .visual_key
            .dims2()
            .context("Dataset.visual_key must be [C, Dk]")?;
        ensure!(
            ca == c && cv == c && cka == c && ckv == c,
            "Dataset: clip counts disagree: audio {ca}, visual {cv}, audio_key {cka}, visual_key {ckv}, clip_ids {c}"
        );
        ensure!(
            dk == dkv,
            "Dataset: audio key dim {dk} != visual key dim {dkv}"
        );
        ensure!(
            self.clip_names.len() == c,
            "Dataset: {} clip names for {c} clips",
            self.clip_names.len()
        );
        for (name, t) in [
            ("audio", &self.audio),
            ("visual", &self.visual),
            ("audio_key", &self.audio_key),
            ("visual_key", &self.visual_key),
        ] {
            ensure!(
                t.dtype() == DType::F32,
                "Dataset.{name}: dtype {:?}, expected f32",
                t.dtype()
            );
        }
        let (nq, lq) = self
            .questions
            .dims2()
            .context("Dataset.questions must be [N, Lq]")?;
        ensure!(
            self.questions.dtype() == DType::U32,
            "Dataset.questions: dtype {:?}, expected u32",
            self.questions.dtype()
        );
        ensure!(
            nq == n && self.question_len.len() == n && self.qtypes.len() == n && self.clip_of.len() == n,
            "Dataset: question counts disagree: questions {nq}, question_len {}, answers {n}, qtypes {}, clip_of {}",
            self.question_len.len(),
            self.qtypes.len(),
            self.clip_of.len()
        );
        if let Some((i, &l)) = self
            .question_len
            .iter()
            .enumerate()
            .find(|(_, &l)| l == 0 || l > lq)
        {
            bail!("Dataset: question {i} has length {l}, expected 1..={lq}");
        }
        if let Some((i, &r)) = self.clip_of.iter().enumerate().find(|(_, &r)| r >= c) {
            bail!("Dataset: question {i} refers to clip row {r}, but there are {c} clips");
        }
        let na = self.answer_vocab.len() as u32;
        if let Some((i, &a)) = self.answers.iter().enumerate().find(|(_, &a)| a >= na) {
            bail!(
                "Dataset: question {i} has answer {a}, but the answer vocabulary has {na} entries"
            );
        }
        Ok(())
    }
}

/// The three splits of a data set, sharing vocabularies and shapes.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Training split (also the memory bank's source).
    pub train: Dataset,
    /// Validation split (early stopping).
    pub val: Dataset,
    /// Test split (reported numbers).
    pub test: Dataset,
}

impl Splits {
    /// The shapes (taken from the train split; [`Splits::validate`] checks the others agree).
    pub fn dims(&self) -> DataDims {
        self.train.dims()
    }

    /// Validate each split and check that dims, vocabularies and clip-id uniqueness agree.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut seen = HashMap::new();
        for (name, ds) in [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ] {
            ds.validate().with_context(|| format!("split {name}"))?;
            ensure!(
                ds.dims() == self.train.dims(),
                "split {name}: dims {:?} differ from train dims {:?}",
                ds.dims(),
                self.train.dims()
            );
            ensure!(
                ds.vocab == self.train.vocab && ds.answer_vocab == self.train.answer_vocab,
                "split {name}: vocabularies differ from the train split's"
            );
            for (id, cname) in ds.clip_ids.iter().zip(&ds.clip_names) {
                if let Some((other_split, other_name)) = seen.insert(*id, (name, cname)) {
                    ensure!(
                        other_name == cname,
                        "clip id {id} used for {other_name:?} ({other_split}) and {cname:?} ({name})"
                    );
                }
            }
        }
        Ok(())
    }
}
