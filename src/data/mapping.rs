//! Loading a data set for a trained model: its words and answers mapped onto the model's
//! vocabularies (the ones its checkpoint recorded), never onto ids derived afresh from the
//! data, which change when the data does (docs/DESIGN.md, "Run directories").

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Dataset, QuestionType, Splits, Vocab};

/// The longest question accepted, in words. A longer one is an error when a data set is
/// loaded for training (it is almost certainly a broken entry, and attention memory grows
/// with the square of the padded length); when a data set is mapped onto a model's
/// vocabularies ([`ModelVocab`]), questions longer than the model's length are cut to it.
pub const MAX_QUESTION_WORDS: usize = 64;

/// A trained model's vocabularies and question length, from its checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct ModelVocab<'a> {
    /// Question words (`<pad>`, `<unk>`, then the training words).
    pub words: &'a Vocab,
    /// Answer classes.
    pub answers: &'a Vocab,
    /// The model's question length Lq: longer questions are cut to it.
    pub max_len: usize,
}

/// What mapping a data set onto a model's vocabularies changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabMapping {
    /// Per split (train, val, test): the questions whose answer the model has no class for,
    /// left out of the split (their clips stay), as (question type, answer).
    pub unknown_answers: [Vec<(QuestionType, String)>; 3],
    /// Question words the model's vocabulary lacks (read as `<unk>`), over all splits.
    pub unknown_words: usize,
    /// Questions cut to the model's question length.
    pub truncated: usize,
}

impl VocabMapping {
    /// True when nothing was dropped, cut or read as `<unk>`.
    pub fn is_exact(&self) -> bool {
        self.unknown_answers.iter().all(Vec::is_empty)
            && self.unknown_words == 0
            && self.truncated == 0
    }

    /// Distinct unknown answers of the test split, at most `n`, quoted and comma-separated.
    pub fn test_answer_examples(&self, n: usize) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for (_, a) in &self.unknown_answers[2] {
            if !seen.contains(&a.as_str()) {
                seen.push(a);
            }
        }
        let mut s: Vec<String> = seen.iter().take(n).map(|a| format!("{a:?}")).collect();
        if seen.len() > n {
            s.push("...".into());
        }
        s.join(", ")
    }
}

/// A loaded data set with its fingerprint ([`super::fingerprint`]) and, when it was loaded
/// with a model's vocabularies, what the mapping changed.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The splits.
    pub splits: Splits,
    /// Content fingerprint of the data.
    pub fingerprint: String,
    /// `Some` when loaded with [`ModelVocab`].
    pub mapping: Option<VocabMapping>,
}

/// Map already-built `splits` onto `model`'s vocabularies: question words re-encoded
/// (unknown ones as `<unk>`), questions cut to `model.max_len`, answers the model has no
/// class for left out (their clips are kept, so the memory bank does not change).
pub fn map_splits(splits: &Splits, model: ModelVocab) -> Result<(Splits, VocabMapping)> {
    let mut m = VocabMapping::default();
    let lq = splits.dims().lq.min(model.max_len).max(1);
    let mut out = Vec::with_capacity(3);
    for (i, ds) in [&splits.train, &splits.val, &splits.test]
        .into_iter()
        .enumerate()
    {
        let ids = ds.questions.to_vec2::<u32>()?;
        let (mut questions, mut question_len) = (Vec::new(), Vec::new());
        let (mut answers, mut qtypes, mut clip_of) = (Vec::new(), Vec::new(), Vec::new());
        for (q, row) in ids.iter().enumerate() {
            let answer = ds.answer_vocab.token(ds.answers[q]).unwrap_or("<?>");
            let Some(a) = model.answers.id(answer) else {
                m.unknown_answers[i].push((ds.qtypes[q], answer.to_string()));
                continue;
            };
            let words = ds.vocab.decode(&row[..ds.question_len[q].min(row.len())]);
            let mut enc = model.words.encode(&words);
            m.unknown_words += words
                .iter()
                .zip(&enc)
                .filter(|(w, &id)| id == Vocab::UNK && w.as_str() != "<unk>")
                .count();
            if enc.len() > lq {
                enc.truncate(lq);
                m.truncated += 1;
            }
            question_len.push(enc.len().max(1));
            enc.resize(lq, Vocab::PAD);
            questions.extend(enc);
            answers.push(a);
            qtypes.push(ds.qtypes[q]);
            clip_of.push(ds.clip_of[q]);
        }
        let n = answers.len();
        out.push(Dataset {
            questions: Tensor::from_vec(questions, (n, lq), ds.questions.device())?,
            question_len,
            answers,
            qtypes,
            clip_of,
            vocab: model.words.clone(),
            answer_vocab: model.answers.clone(),
            ..ds.clone()
        });
    }
    let test = out.pop().expect("three splits");
    let val = out.pop().expect("three splits");
    let train = out.pop().expect("three splits");
    let mapped = Splits { train, val, test };
    mapped.validate()?;
    Ok((mapped, m))
}
