//! Content fingerprints of a data set: what a checkpoint records about the data it was
//! trained on, so that `eval`, `--resume` and `ablate` notice when the data at the same
//! path has changed (docs/DESIGN.md, "Run directories").
//!
//! MUSIC-AVQA data ([`super::avqa`]): the bytes of `avqa-{train,val,test}.json`, the feature
//! shapes (`[T_a, D_a]`, `[T_v, D_v]`, `D_k`) and where the keys come from (files, or the
//! derived projection and its seed). Feature values are not hashed: reading them all again
//! would cost as much as loading the set, and the shapes are what the model is built for.
//! The synthetic set ([`super::synthetic`]): its questions, answers, question types, clips
//! and vocabularies as generated, and the shapes.
//!
//! The hash is 128-bit FNV-1a, spelled out here because it must never change between
//! builds (std's `DefaultHasher` may): a fingerprint is `fnv1a128:` and 32 hex digits.

use super::{DataDims, Splits};

const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

/// Builds a fingerprint from a sequence of fields (each length-prefixed, so that `"ab", "c"`
/// and `"a", "bc"` differ).
#[derive(Debug, Clone)]
pub struct Fingerprinter {
    h: u128,
}

impl Fingerprinter {
    /// A fingerprint of the kind `kind` (`"avqa"`, `"synthetic"`): two kinds never agree.
    pub fn new(kind: &str) -> Self {
        let mut f = Self { h: OFFSET };
        f.str(kind);
        f
    }

    fn raw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.h ^= b as u128;
            self.h = self.h.wrapping_mul(PRIME);
        }
    }

    /// Adds `bytes`, length first.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.raw(&(bytes.len() as u64).to_le_bytes());
        self.raw(bytes);
    }

    /// Adds a string.
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Adds an integer.
    pub fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }

    /// Adds the shapes of `dims` that do not come from the annotations: tokens and feature
    /// dimension per modality and the key dimension.
    pub fn feature_shapes(&mut self, dims: &DataDims) {
        for v in [dims.la, dims.da, dims.lv, dims.dv, dims.dk] {
            self.u64(v as u64);
        }
    }

    /// `fnv1a128:<32 hex digits>`.
    pub fn finish(&self) -> String {
        format!("fnv1a128:{:032x}", self.h)
    }
}

/// The fingerprint of generated splits: per split its questions (token ids), lengths,
/// answers, question types and clip names, then both vocabularies and the feature shapes.
pub fn of_splits(kind: &str, splits: &Splits) -> candle_core::Result<String> {
    let mut f = Fingerprinter::new(kind);
    for ds in [&splits.train, &splits.val, &splits.test] {
        for id in ds.questions.flatten_all()?.to_vec1::<u32>()? {
            f.u64(id as u64);
        }
        for (&l, (&a, t)) in ds
            .question_len
            .iter()
            .zip(ds.answers.iter().zip(&ds.qtypes))
        {
            f.u64(l as u64);
            f.u64(a as u64);
            f.u64(t.index() as u64);
        }
        for (name, &row) in ds.clip_names.iter().zip(&ds.clip_of) {
            f.str(name);
            f.u64(row as u64);
        }
    }
    for t in splits.train.vocab.tokens() {
        f.str(t);
    }
    for t in splits.train.answer_vocab.tokens() {
        f.str(t);
    }
    f.feature_shapes(&splits.dims());
    Ok(f.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a128_matches_the_published_vectors() {
        // FNV-1a 128 of "" and "a" (http://www.isthe.com/chongo/tech/comp/fnv/).
        let empty = Fingerprinter { h: OFFSET };
        assert_eq!(empty.finish(), "fnv1a128:6c62272e07bb014262b821756295c58d");
        let mut a = Fingerprinter { h: OFFSET };
        a.raw(b"a");
        assert_eq!(a.finish(), "fnv1a128:d228cb696f1a8caf78912b704e4a8964");
    }

    #[test]
    fn fields_are_length_prefixed_and_kinds_differ() {
        let fp = |parts: &[&str]| {
            let mut f = Fingerprinter::new("avqa");
            parts.iter().for_each(|p| f.str(p));
            f.finish()
        };
        assert_ne!(fp(&["ab", "c"]), fp(&["a", "bc"]));
        assert_eq!(fp(&["ab", "c"]), fp(&["ab", "c"]));
        assert_ne!(
            Fingerprinter::new("avqa").finish(),
            Fingerprinter::new("synthetic").finish()
        );
    }
}
