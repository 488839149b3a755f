//! MUSIC-AVQA loader: annotations `avqa-{train,val,test}.json` plus per-video `.npy` features.
//!
//! Layout under `dir` (names configurable in [`AvqaOptions`]):
//! ```text
//! avqa-train.json  avqa-val.json  avqa-test.json
//! audio/<video_id>.npy          [T_a, Da]  (f2/f4/f8, either byte order, C or Fortran order; read as f32)
//! visual/<video_id>.npy         [T_v, Dv]
//! keys/audio/<video_id>.npy     [Dk] or [1, Dk]   (optional, unified-space keys)
//! keys/visual/<video_id>.npy    [Dk] or [1, Dk]   (optional)
//! ```
//! Each annotation entry has `video_id`, `question_id`, `type` (a list like
//! `["Audio-Visual", "Counting"]` or that list encoded as a string, as in the released files),
//! `question_content` (with `<Object>`-style placeholders), `templ_values` (a list or a string
//! encoding one, filling the placeholders in order) and `anser` (the answer; `answer` is accepted
//! too).
//!
//! Rules: every audio file has the same shape `[T_a, Da]` and every visual file `[T_v, Dv]`
//! (`T_a` and `T_v` may differ). If `keys/<modality>/` exists, every video needs a key there; if
//! not, the keys of that modality are derived: mean over T, then a fixed Gaussian projection
//! `[Dk, D]` (entries N(0, 1/D), ChaCha8 seeded by `key_seed`, one stream per modality). Derived
//! audio and visual keys are NOT aligned with each other (they are independent projections), so
//! cross-modal retrieval with them is no better than chance; supply real unified keys (e.g.
//! ImageBind) for meaningful retrieval.
//!
//! Vocabularies come from the train split: question words sorted, after `<pad>`, `<unk>` (unknown
//! words in val/test map to `<unk>`); answers sorted. An answer in val/test that is not a train
//! answer is an error by default ([`UnknownAnswer::Error`]); with [`UnknownAnswer::MapToUnk`] the
//! answer vocabulary gets an `"<unk>"` class at id 0 and such questions are labelled with it (a
//! model can never be credited for them). [`load_music_avqa_full`] with a [`ModelVocab`] uses a
//! trained model's vocabularies instead (see [`super::mapping`]).
//!
//! Limits: a question has at most [`MAX_QUESTION_WORDS`] words and a feature value at most
//! [`MAX_FEATURE_ABS`] in magnitude; more is an error naming the file and the entry.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fingerprint::Fingerprinter;
use super::mapping::{Loaded, ModelVocab, VocabMapping, MAX_QUESTION_WORDS};
use super::{Dataset, QuestionType, Splits, Vocab};
use crate::io::npy::NpyArray;

/// The largest feature (and key) value accepted in magnitude. Real features are within a few
/// hundred; values near f32's limit overflow the model's projections, attention scores and
/// the bank's standardisation statistics, and training would end in a NaN loss.
pub const MAX_FEATURE_ABS: f32 = 1e6;

/// What to do with a val/test answer that never occurs in the train split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownAnswer {
    /// Fail, naming the file, the question id and the answer (default).
    Error,
    /// Label it with an extra `"<unk>"` answer class (id 0).
    MapToUnk,
}

/// Options of [`load_music_avqa_with`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AvqaOptions {
    /// Handling of val/test answers unseen in train.
    pub unknown_answer: UnknownAnswer,
    /// Dimension of derived keys (used only when a modality has no `keys/<modality>/` directory
    /// and the other has none either; otherwise the provided keys' dimension).
    pub derived_key_dim: usize,
    /// Seed of the derived-key projections.
    pub key_seed: u64,
    /// Audio feature directory, relative to the data directory.
    pub audio_dir: String,
    /// Visual feature directory, relative to the data directory.
    pub visual_dir: String,
    /// Key directory (with `audio/` and `visual/` inside), relative to the data directory.
    pub keys_dir: String,
}

impl Default for AvqaOptions {
    fn default() -> Self {
        AvqaOptions {
            unknown_answer: UnknownAnswer::Error,
            derived_key_dim: 64,
            key_seed: 0,
            audio_dir: "audio".into(),
            visual_dir: "visual".into(),
            keys_dir: "keys".into(),
        }
    }
}

/// Load `dir` in the MUSIC-AVQA layout with default [`AvqaOptions`].
pub fn load_music_avqa(dir: &Path) -> Result<Splits> {
    load_music_avqa_with(dir, &AvqaOptions::default())
}

/// One parsed annotation entry.
#[derive(Debug, Clone)]
struct Entry {
    video: String,
    question_id: String,
    qtype: QuestionType,
    words: Vec<String>,
    answer: String,
}

/// Load `dir` in the MUSIC-AVQA layout (see the module docs for the layout and the rules).
pub fn load_music_avqa_with(dir: &Path, opts: &AvqaOptions) -> Result<Splits> {
    Ok(load_music_avqa_full(dir, opts, None)?.splits)
}

/// Load `dir` in the MUSIC-AVQA layout with its content fingerprint
/// ([`super::fingerprint`]). With `model`, words and answers are mapped onto the model's
/// vocabularies (questions with an answer it has no class for are left out and listed,
/// questions longer than its Lq are cut; see [`super::mapping`]) instead of vocabularies
/// derived from the train split.
pub fn load_music_avqa_full(
    dir: &Path,
    opts: &AvqaOptions,
    model: Option<ModelVocab>,
) -> Result<Loaded> {
    ensure!(
        dir.is_dir(),
        "load_music_avqa: {} is not a directory",
        dir.display()
    );
    ensure!(
        opts.derived_key_dim >= 1,
        "load_music_avqa: derived_key_dim = 0, expected >= 1"
    );
    let names = ["train", "val", "test"];
    let mut fp = Fingerprinter::new("avqa");
    let mut entries = Vec::with_capacity(3);
    for name in names {
        let path = dir.join(format!("avqa-{name}.json"));
        let bytes =
            crate::io::read_capped(&path, crate::io::MAX_ANNOTATION_BYTES, "annotation file")?;
        fp.bytes(&bytes);
        let e = parse_annotations(&path, &bytes)?;
        drop(bytes);
        ensure!(!e.is_empty(), "{}: no questions", path.display());
        if model.is_none() {
            if let Some(long) = e.iter().find(|x| x.words.len() > MAX_QUESTION_WORDS) {
                bail!(
                    "{}: question {} has {} words, more than the {MAX_QUESTION_WORDS} accepted \
                     (README, \"Data limits\"); shorten it or leave it out",
                    path.display(),
                    long.question_id,
                    long.words.len()
                );
            }
        }
        entries.push((path, e));
    }

    let (vocab, answer_vocab, max_len) = match model {
        Some(m) => (m.words.clone(), m.answers.clone(), m.max_len.max(1)),
        None => {
            // Vocabularies from train.
            let train_words: BTreeSet<&str> = entries[0]
                .1
                .iter()
                .flat_map(|e| e.words.iter().map(String::as_str))
                .collect();
            let vocab = Vocab::question(train_words.into_iter().map(str::to_string));
            let train_answers: BTreeSet<&str> =
                entries[0].1.iter().map(|e| e.answer.as_str()).collect();
            let mut answers: Vec<String> = Vec::new();
            if opts.unknown_answer == UnknownAnswer::MapToUnk {
                answers.push("<unk>".to_string());
            }
            answers.extend(train_answers.into_iter().map(str::to_string));
            (vocab, Vocab::new(answers)?, MAX_QUESTION_WORDS)
        }
    };
    let lq = entries
        .iter()
        .flat_map(|(_, e)| e.iter().map(|x| x.words.len()))
        .max()
        .unwrap_or(1)
        .min(max_len);
    let mut mapping = model.map(|_| VocabMapping::default());

    // Global clip ids: first appearance over train, val, test.
    let mut clip_id: HashMap<String, u32> = HashMap::new();
    for (_, es) in &entries {
        for e in es {
            let next = clip_id.len() as u32;
            clip_id.entry(e.video.clone()).or_insert(next);
        }
    }

    let mut feats = FeatureReader::new(dir, opts)?;
    let mut out = Vec::with_capacity(3);
    for (i, (path, es)) in entries.iter().enumerate() {
        let unknown = match mapping.as_mut() {
            Some(m) => Unknown::Leave(&mut m.unknown_answers[i]),
            None => Unknown::Policy(opts.unknown_answer),
        };
        let (ds, unknown_words, truncated) = build_split(
            path,
            es,
            &clip_id,
            &mut feats,
            &vocab,
            &answer_vocab,
            lq,
            unknown,
        )?;
        if let Some(m) = mapping.as_mut() {
            m.unknown_words += unknown_words;
            m.truncated += truncated;
        }
        out.push(ds);
    }
    let test = out.pop().expect("three splits");
    let val = out.pop().expect("three splits");
    let train = out.pop().expect("three splits");
    let splits = Splits { train, val, test };
    splits.validate()?;
    fp.feature_shapes(&splits.dims());
    for (m, keys) in [("audio", &feats.audio_keys), ("visual", &feats.visual_keys)] {
        fp.str(m);
        match keys {
            Some(_) => fp.str("key files"),
            None => {
                fp.str("derived keys");
                fp.u64(opts.key_seed);
            }
        }
    }
    Ok(Loaded {
        splits,
        fingerprint: fp.finish(),
        mapping,
    })
}

/// What [`build_split`] does with an answer missing from the answer vocabulary.
enum Unknown<'a> {
    /// As the options say (an error, or the `<unk>` class).
    Policy(UnknownAnswer),
    /// Leave the question out and list it (a model's vocabulary, [`ModelVocab`]).
    Leave(&'a mut Vec<(QuestionType, String)>),
}

/// One split; also returns the number of unknown question words and of questions cut to
/// `lq` (both only possible with a model's vocabulary).
#[allow(clippy::too_many_arguments)]
fn build_split(
    path: &Path,
    es: &[Entry],
    clip_id: &HashMap<String, u32>,
    feats: &mut FeatureReader,
    vocab: &Vocab,
    answer_vocab: &Vocab,
    lq: usize,
    mut unknown: Unknown,
) -> Result<(Dataset, usize, usize)> {
    let (mut unknown_words, mut truncated) = (0, 0);
    let mut row_of: HashMap<&str, usize> = HashMap::new();
    let mut videos: Vec<&str> = Vec::new();
    let mut questions = Vec::with_capacity(es.len() * lq);
    let mut question_len = Vec::with_capacity(es.len());
    let mut answers = Vec::with_capacity(es.len());
    let mut qtypes = Vec::with_capacity(es.len());
    let mut clip_of = Vec::with_capacity(es.len());
    for e in es {
        let row = *row_of.entry(e.video.as_str()).or_insert_with(|| {
            videos.push(e.video.as_str());
            videos.len() - 1
        });
        let a = match (answer_vocab.id(&e.answer), &mut unknown) {
            (Some(a), _) => a,
            (None, Unknown::Policy(UnknownAnswer::MapToUnk)) => 0,
            (None, Unknown::Leave(list)) => {
                list.push((e.qtype, e.answer.clone()));
                continue;
            }
            (None, Unknown::Policy(UnknownAnswer::Error)) => bail!(
                "{}: question {} has answer {:?}, which does not occur in the train split \
                 (unknown_answer = \"map_to_unk\" in the --config file labels such answers <unk>)",
                path.display(),
                e.question_id,
                e.answer
            ),
        };
        let mut ids = vocab.encode(&e.words);
        unknown_words += e
            .words
            .iter()
            .zip(&ids)
            .filter(|(w, &id)| id == Vocab::UNK && w.as_str() != "<unk>")
            .count();
        if ids.len() > lq {
            ids.truncate(lq);
            truncated += 1;
        }
        question_len.push(ids.len());
        ids.resize(lq, Vocab::PAD);
        questions.extend(ids);
        answers.push(a);
        qtypes.push(e.qtype);
        clip_of.push(row);
    }
    let c = videos.len();
    let (mut audio, mut visual, mut audio_key, mut visual_key) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for v in &videos {
        let f = feats
            .video(v)
            .with_context(|| format!("{}: video {v:?}", path.display()))?;
        audio.extend(f.audio);
        visual.extend(f.visual);
        audio_key.extend(f.audio_key);
        visual_key.extend(f.visual_key);
    }
    let s = feats.shapes();
    let cpu = Device::Cpu;
    let n = answers.len();
    let ds = Dataset {
        audio: Tensor::from_vec(audio, (c, s.audio.0, s.audio.1), &cpu)?,
        visual: Tensor::from_vec(visual, (c, s.visual.0, s.visual.1), &cpu)?,
        audio_key: Tensor::from_vec(audio_key, (c, s.dk), &cpu)?,
        visual_key: Tensor::from_vec(visual_key, (c, s.dk), &cpu)?,
        clip_ids: videos.iter().map(|v| clip_id[*v]).collect(),
        clip_names: videos.iter().map(|v| v.to_string()).collect(),
        questions: Tensor::from_vec(questions, (n, lq), &cpu)?,
        question_len,
        answers,
        qtypes,
        clip_of,
        vocab: vocab.clone(),
        answer_vocab: answer_vocab.clone(),
    };
    Ok((ds, unknown_words, truncated))
}

/// Parse one annotation file from its bytes; errors name the file and the entry.
fn parse_annotations(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>> {
    crate::io::json::parse_list(path, bytes, |i, v| {
        parse_entry(&v).with_context(|| format!("{}: entry {i}", path.display()))
    })
}

fn parse_entry(v: &Value) -> Result<Entry> {
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("expected a JSON object, found {}", kind_of(v)))?;
    let field = |name: &str| {
        obj.get(name)
            .ok_or_else(|| anyhow!("missing field {name:?}"))
    };
    let scalar = |name: &str| -> Result<String> {
        match field(name)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => bail!(
                "field {name:?}: expected a string or number, found {}",
                kind_of(other)
            ),
        }
    };
    let question_id = scalar("question_id")?;
    let ctx = || format!("question {question_id}");
    let video = scalar("video_id").with_context(ctx)?;
    ensure!(
        !video.is_empty() && !video.contains(['/', '\\']) && video != "." && video != "..",
        "question {question_id}: video_id {video:?} is not a plain file name"
    );
    let ty = string_list(field("type").with_context(ctx)?)
        .with_context(|| format!("question {question_id}: field \"type\""))?;
    ensure!(
        ty.len() == 2,
        "question {question_id}: field \"type\" = {ty:?}, expected two entries like [\"Audio\", \"Counting\"]"
    );
    let qtype = QuestionType::from_avqa(&ty[0], &ty[1]).ok_or_else(|| {
        anyhow!(
            "question {question_id}: unknown question type {ty:?}, expected one of the nine MUSIC-AVQA types \
             (Audio: Counting/Comparative; Visual: Counting/Location; Audio-Visual: \
             Existential/Counting/Location/Comparative/Temporal)"
        )
    })?;
    let content = match field("question_content").with_context(ctx)? {
        Value::String(s) => s.clone(),
        other => bail!(
            "question {question_id}: field \"question_content\": expected a string, found {}",
            kind_of(other)
        ),
    };
    let values = match obj.get("templ_values") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => string_list(v)
            .with_context(|| format!("question {question_id}: field \"templ_values\""))?,
    };
    let words = tokenize(&content, &values).with_context(ctx)?;
    let answer = match obj.get("anser").or_else(|| obj.get("answer")) {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!(
            "question {question_id}: field \"anser\": expected a string, found {}",
            kind_of(other)
        ),
        None => bail!("question {question_id}: missing field \"anser\" (the answer)"),
    };
    ensure!(!answer.is_empty(), "question {question_id}: empty answer");
    Ok(Entry {
        video,
        question_id,
        qtype,
        words,
        answer,
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A list of strings given as a JSON list, or as a string encoding one (JSON, or Python-style
/// with single quotes, as in the released MUSIC-AVQA files).
fn string_list(v: &Value) -> Result<Vec<String>> {
    let list = match v {
        Value::Array(a) => a.clone(),
        Value::String(s) => {
            let parsed: Value = crate::io::json::from_str_bounded(s)
                .or_else(|_| crate::io::json::from_str_bounded(&s.replace('\'', "\"")))
                .map_err(|e| anyhow!("cannot parse {s:?} as a list: {e}"))?;
            match parsed {
                Value::Array(a) => a,
                other => bail!("{s:?} encodes {}, expected a list", kind_of(&other)),
            }
        }
        other => bail!("expected a list of strings, found {}", kind_of(other)),
    };
    list.iter()
        .map(|x| match x {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => bail!(
                "list entry {x}: expected a string, found {}",
                kind_of(other)
            ),
        })
        .collect()
}

/// Lower-cased words of `content` with each word containing `<` (a placeholder such as
/// `<Object>`) replaced by the next template value (as the official MUSIC-AVQA code does);
/// punctuation `?` `,` `.` `!` `;` is stripped. Fewer values than placeholders is an error; extra
/// values are ignored.
fn tokenize(content: &str, values: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut next = 0;
    let n_placeholders = content
        .split_whitespace()
        .filter(|w| w.contains('<'))
        .count();
    for w in content.split_whitespace() {
        if w.contains('<') {
            let v = values.get(next).ok_or_else(|| {
                anyhow!(
                    "question {content:?} has {n_placeholders} placeholders but templ_values has only {} values {values:?}",
                    values.len()
                )
            })?;
            next += 1;
            out.extend(clean_words(v));
        } else {
            out.extend(clean_words(w));
        }
    }
    ensure!(!out.is_empty(), "question {content:?} has no words");
    Ok(out)
}

fn clean_words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| matches!(c, '?' | ',' | '.' | '!' | ';'))
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Shapes fixed by the first files read.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    audio: (usize, usize),
    visual: (usize, usize),
    dk: usize,
}

/// Features of one video, flattened row-major.
struct VideoFeatures {
    audio: Vec<f32>,
    visual: Vec<f32>,
    audio_key: Vec<f32>,
    visual_key: Vec<f32>,
}

/// Reads per-video files, checks shapes against the first file of each kind, derives keys.
struct FeatureReader {
    audio_dir: PathBuf,
    visual_dir: PathBuf,
    audio_keys: Option<PathBuf>,
    visual_keys: Option<PathBuf>,
    key_seed: u64,
    derived_dk: usize,
    /// (shape, file that set it) per kind.
    audio_shape: Option<((usize, usize), PathBuf)>,
    visual_shape: Option<((usize, usize), PathBuf)>,
    key_dim: Option<(usize, PathBuf)>,
    proj_audio: Option<Vec<f32>>,
    proj_visual: Option<Vec<f32>>,
}

impl FeatureReader {
    fn new(dir: &Path, opts: &AvqaOptions) -> Result<Self> {
        let audio_dir = dir.join(&opts.audio_dir);
        let visual_dir = dir.join(&opts.visual_dir);
        for d in [&audio_dir, &visual_dir] {
            ensure!(d.is_dir(), "{}: feature directory not found", d.display());
        }
        let keys = dir.join(&opts.keys_dir);
        let audio_keys = Some(keys.join("audio")).filter(|p| p.is_dir());
        let visual_keys = Some(keys.join("visual")).filter(|p| p.is_dir());
        Ok(FeatureReader {
            audio_dir,
            visual_dir,
            audio_keys,
            visual_keys,
            key_seed: opts.key_seed,
            derived_dk: opts.derived_key_dim,
            audio_shape: None,
            visual_shape: None,
            key_dim: None,
            proj_audio: None,
            proj_visual: None,
        })
    }

    fn shapes(&self) -> Shapes {
        Shapes {
            audio: self.audio_shape.as_ref().map(|s| s.0).unwrap_or((0, 0)),
            visual: self.visual_shape.as_ref().map(|s| s.0).unwrap_or((0, 0)),
            dk: self
                .key_dim
                .as_ref()
                .map(|s| s.0)
                .unwrap_or(self.derived_dk),
        }
    }

    fn video(&mut self, video: &str) -> Result<VideoFeatures> {
        let file = format!("{video}.npy");
        let (audio, ta, da) = read_matrix(&self.audio_dir.join(&file), &mut self.audio_shape)?;
        let (visual, tv, dv) = read_matrix(&self.visual_dir.join(&file), &mut self.visual_shape)?;
        // Provided keys fix Dk; they are read first so that derived keys use the same dimension.
        let ak = match &self.audio_keys {
            Some(d) => Some(read_key(&d.join(&file), &mut self.key_dim)?),
            None => None,
        };
        let vk = match &self.visual_keys {
            Some(d) => Some(read_key(&d.join(&file), &mut self.key_dim)?),
            None => None,
        };
        let dk = self
            .key_dim
            .as_ref()
            .map(|k| k.0)
            .unwrap_or(self.derived_dk);
        let seed = self.key_seed;
        let audio_key = match ak {
            Some(k) => k,
            None => {
                let p = self
                    .proj_audio
                    .get_or_insert_with(|| key_projection(seed, 1, dk, da));
                derive_key(&audio, ta, da, p)
            }
        };
        let visual_key = match vk {
            Some(k) => k,
            None => {
                let p = self
                    .proj_visual
                    .get_or_insert_with(|| key_projection(seed, 2, dk, dv));
                derive_key(&visual, tv, dv, p)
            }
        };
        Ok(VideoFeatures {
            audio,
            visual,
            audio_key,
            visual_key,
        })
    }
}

/// Read a float `.npy` as f32 through the bounded reader (errors name the file).
fn read_npy_f32(path: &Path) -> Result<NpyArray> {
    ensure!(path.exists(), "{}: feature file not found", path.display());
    crate::io::npy::read_f32(path)
}

/// Read a `[T, D]` matrix; the first file fixes `(T, D)` and later files must match.
fn read_matrix(
    path: &Path,
    expect: &mut Option<((usize, usize), PathBuf)>,
) -> Result<(Vec<f32>, usize, usize)> {
    let t = read_npy_f32(path)?;
    let &[r, c] = t.shape.as_slice() else {
        bail!(
            "{}: shape {:?}, expected a matrix [T, D] (time steps x feature dim)",
            path.display(),
            t.shape
        );
    };
    ensure!(
        r > 0 && c > 0,
        "{}: empty feature matrix of shape [{r}, {c}]",
        path.display()
    );
    match expect {
        Some((s, first)) => ensure!(
            *s == (r, c),
            "{}: shape [{r}, {c}] differs from [{}, {}] of {} (all videos need the same T and D per modality)",
            path.display(),
            s.0,
            s.1,
            first.display()
        ),
        None => *expect = Some(((r, c), path.to_path_buf())),
    }
    let v = t.data;
    check_values(path, &v)?;
    Ok((v, r, c))
}

/// Read a key `[Dk]` or `[1, Dk]`; the first key fixes Dk.
fn read_key(path: &Path, expect: &mut Option<(usize, PathBuf)>) -> Result<Vec<f32>> {
    let t = read_npy_f32(path)?;
    let dk = match t.shape.as_slice() {
        [d] => *d,
        [1, d] => *d,
        other => bail!(
            "{}: shape {other:?}, expected a key vector [Dk] or [1, Dk]",
            path.display()
        ),
    };
    ensure!(dk > 0, "{}: empty key", path.display());
    match expect {
        Some((d, first)) => ensure!(
            *d == dk,
            "{}: key dimension {dk} differs from {d} of {} (all keys need the same Dk)",
            path.display(),
            first.display()
        ),
        None => *expect = Some((dk, path.to_path_buf())),
    }
    let v = t.data;
    check_values(path, &v)?;
    Ok(v)
}

/// Every value finite and at most [`MAX_FEATURE_ABS`] in magnitude.
fn check_values(path: &Path, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: non-finite value {} at flat index {i}",
            path.display(),
            v[i]
        );
    }
    if let Some(i) = v.iter().position(|x| x.abs() > MAX_FEATURE_ABS) {
        bail!(
            "{}: value {:e} at flat index {i} exceeds the {MAX_FEATURE_ABS:e} accepted in magnitude \
             (values this large overflow the model's f32 arithmetic; rescale the features)",
            path.display(),
            v[i]
        );
    }
    Ok(())
}

/// Gaussian `[dk, d]` projection, entries N(0, 1/d), ChaCha8(seed) stream `stream`.
fn key_projection(seed: u64, stream: u64, dk: usize, d: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let std = 1.0 / (d as f32).sqrt();
    (0..dk * d)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * std)
        .collect()
}

/// Mean over T of `x [t, d]`, then `proj [dk, d]` applied.
fn derive_key(x: &[f32], t: usize, d: usize, proj: &[f32]) -> Vec<f32> {
    let mut mean = vec![0f32; d];
    for row in x.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= t as f32);
    proj.chunks_exact(d)
        .map(|r| r.iter().zip(&mean).map(|(a, b)| a * b).sum())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_fills_placeholders_in_order() {
        let w = tokenize(
            "Is the <Object> louder than the <Object2>?",
            &["cello".into(), "acoustic guitar".into()],
        )
        .unwrap();
        assert_eq!(
            w,
            ["is", "the", "cello", "louder", "than", "the", "acoustic", "guitar"]
        );
        let e = tokenize("Where is the <Object>?", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 placeholders") && e.contains("only 0"), "{e}");
    }

    #[test]
    fn string_list_accepts_list_json_string_and_python_string() {
        for v in [
            serde_json::json!(["Audio", "Counting"]),
            serde_json::json!("[\"Audio\", \"Counting\"]"),
            serde_json::json!("['Audio', 'Counting']"),
        ] {
            assert_eq!(string_list(&v).unwrap(), ["Audio", "Counting"]);
        }
        assert!(string_list(&serde_json::json!("Audio")).is_err());
        assert!(string_list(&serde_json::json!(3)).is_err());
    }

    #[test]
    fn derive_key_is_projection_of_mean() {
        let x = [1.0, 2.0, 3.0, 4.0]; // [2, 2], mean [2, 3]
        let p = [1.0, 0.0, 1.0, 1.0, 0.5, -1.0]; // [3, 2]
        assert_eq!(derive_key(&x, 2, 2, &p), vec![2.0, 5.0, -2.0]);
    }
}
