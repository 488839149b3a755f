//! The built-in synthetic AVQA generator (see `docs/DATA.md`).
//!
//! Every clip is a latent scene: 1..=`max_sources` instruments (sources) drawn from one of
//! `n_prototypes` scene prototypes (in families that share instruments but differ in layout or
//! audio attributes) with small per-clip variations. Each source has an instrument
//! class (seen and heard), a position left/middle/right (seen only), whether it sounds, a loudness
//! level 1..=4 and an onset order (heard only). The scene is rendered through fixed random
//! projections into visual tokens `[Lv, Dv]` (one column group of tokens per position) and audio
//! tokens `[La, Da]` (one token per time step), plus Gaussian noise. Each modality also gets a
//! key in a unified space: a noisy, imperfectly aligned projection of the prototype latent plus the
//! content it sees, so cross-modal retrieval mostly (not always) finds clips of the same prototype,
//! whose real features carry the prototype's modality-specific attributes.
//!
//! Randomness: ChaCha8 seeded with `seed`, with separate streams for the fixed "world" (embeddings,
//! projections, prototypes) and for each split, so changing one split's size does not change the
//! others.

use std::collections::HashSet;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use super::{Dataset, QuestionType, Splits, Vocab};

/// Instrument names (the first `n_instruments` are used).
pub const INSTRUMENTS: [&str; 12] = [
    "cello",
    "violin",
    "piano",
    "guitar",
    "flute",
    "drum",
    "trumpet",
    "accordion",
    "saxophone",
    "clarinet",
    "xylophone",
    "tuba",
];

/// Position names, left to right.
pub const POSITIONS: [&str; 3] = ["left", "middle", "right"];

/// Configuration of the synthetic generator. Every field has a default (serde fills missing ones);
/// unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Seed of everything (ChaCha8).
    pub seed: u64,
    /// Clips in the train split (the memory bank's source).
    pub n_train_clips: usize,
    /// Clips in the validation split.
    pub n_val_clips: usize,
    /// Clips in the test split.
    pub n_test_clips: usize,
    /// Questions generated per clip.
    pub questions_per_clip: usize,
    /// Number of scene prototypes shared by all splits.
    pub n_prototypes: usize,
    /// Prototypes come in families of this size (1..=4): members share instrument classes; member
    /// `m` uses an alternative layout (positions) when bit 0 of `m` is set and alternative audio
    /// attributes (sounding, loudness, order) when bit 1 is set. So a clip's visual content alone
    /// leaves its audio attributes ambiguous between family members and vice versa, while the
    /// unified keys (which encode the prototype) tell them apart. 1 = independent prototypes.
    pub prototype_family_size: usize,
    /// Number of instrument classes (2..=12).
    pub n_instruments: usize,
    /// Maximum sources per scene (1..=3, one per position).
    pub max_sources: usize,
    /// Audio tokens per clip (time steps), >= `max_sources`.
    pub la: usize,
    /// Audio feature dimension.
    pub da: usize,
    /// Visual tokens per clip (split into 3 column groups), >= 3.
    pub lv: usize,
    /// Visual feature dimension.
    pub dv: usize,
    /// Unified key dimension.
    pub dk: usize,
    /// Dimension of the latent semantic space the scenes are rendered from.
    pub latent_dim: usize,
    /// Std of the Gaussian noise added to every feature entry (signal entries have std ~1).
    pub feature_noise: f32,
    /// Per-attribute probability that a clip deviates from its prototype (position, loudness,
    /// sounding, order).
    pub variation: f32,
    /// Per-source probability that a clip's instrument class deviates from its prototype.
    pub identity_variation: f32,
    /// Probability that a prototype source is silent (visible but not sounding).
    pub silent_prob: f32,
    /// Std of the Gaussian noise added to every key entry (signal entries have std ~1).
    pub key_noise: f32,
    /// Weight of the modality-specific random distortion of the key projection (0 = perfectly
    /// aligned audio and visual key spaces).
    pub key_misalignment: f32,
    /// Weight of the clip content (instrument classes) in the key latent, next to the prototype
    /// latent (weight 1).
    pub key_content_weight: f32,
    /// Background events (0 = none, the default): every prototype has an audio background
    /// (one of 4 event types, e.g. applause, over `max(1, La / 4)` consecutive time steps)
    /// and a visual one (one of 4 occluders over one column); each clip shows its
    /// prototype's audio background with this probability and, independently, its visual
    /// one. A covered token renders the event instead of the scene. Clips of a prototype
    /// therefore often share a background the query clip does not have: retrieved noise
    /// that contradicts the available modality, as in the paper's example of recalled
    /// applause. Drawn from their own random streams: 0 leaves every other value as before.
    pub background_prob: f32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            n_train_clips: 1000,
            n_val_clips: 200,
            n_test_clips: 300,
            questions_per_clip: 4,
            n_prototypes: 96,
            prototype_family_size: 4,
            n_instruments: 8,
            max_sources: 3,
            la: 8,
            da: 64,
            lv: 9,
            dv: 96,
            dk: 48,
            latent_dim: 32,
            feature_noise: 0.3,
            variation: 0.05,
            identity_variation: 0.05,
            silent_prob: 0.4,
            key_noise: 1.0,
            key_misalignment: 0.7,
            key_content_weight: 0.5,
            background_prob: 0.0,
        }
    }
}

impl SyntheticConfig {
    /// Check ranges; errors name the field, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.n_train_clips >= 2,
            "SyntheticConfig.n_train_clips = {}, expected >= 2",
            self.n_train_clips
        );
        ensure!(
            self.n_val_clips >= 1,
            "SyntheticConfig.n_val_clips = {}, expected >= 1",
            self.n_val_clips
        );
        ensure!(
            self.n_test_clips >= 1,
            "SyntheticConfig.n_test_clips = {}, expected >= 1",
            self.n_test_clips
        );
        ensure!(
            self.questions_per_clip >= 1,
            "SyntheticConfig.questions_per_clip = {}, expected >= 1",
            self.questions_per_clip
        );
        ensure!(
            self.n_prototypes >= 1,
            "SyntheticConfig.n_prototypes = {}, expected >= 1",
            self.n_prototypes
        );
        ensure!(
            (1..=4).contains(&self.prototype_family_size),
            "SyntheticConfig.prototype_family_size = {}, expected 1..=4",
            self.prototype_family_size
        );
        ensure!(
            (2..=INSTRUMENTS.len()).contains(&self.n_instruments),
            "SyntheticConfig.n_instruments = {}, expected 2..={}",
            self.n_instruments,
            INSTRUMENTS.len()
        );
        ensure!(
            (1..=3).contains(&self.max_sources),
            "SyntheticConfig.max_sources = {}, expected 1..=3",
            self.max_sources
        );
        ensure!(
            self.la >= self.max_sources,
            "SyntheticConfig.la = {}, expected >= max_sources = {}",
            self.la,
            self.max_sources
        );
        ensure!(
            self.lv >= 3,
            "SyntheticConfig.lv = {}, expected >= 3",
            self.lv
        );
        for (name, v) in [
            ("da", self.da),
            ("dv", self.dv),
            ("dk", self.dk),
            ("latent_dim", self.latent_dim),
        ] {
            ensure!(v >= 1, "SyntheticConfig.{name} = {v}, expected >= 1");
        }
        for (name, v) in [
            ("variation", self.variation),
            ("identity_variation", self.identity_variation),
            ("background_prob", self.background_prob),
            ("silent_prob", self.silent_prob),
        ] {
            ensure!(
                v.is_finite() && (0.0..=1.0).contains(&v),
                "SyntheticConfig.{name} = {v}, expected a probability in [0, 1]"
            );
        }
        for (name, v) in [
            ("feature_noise", self.feature_noise),
            ("key_noise", self.key_noise),
            ("key_misalignment", self.key_misalignment),
            ("key_content_weight", self.key_content_weight),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "SyntheticConfig.{name} = {v}, expected a finite value >= 0"
            );
        }
        Ok(())
    }
}

/// Ground truth the generator knows but a model must not see: the scene prototype of each clip,
/// per split (clip row order). Used by tests and diagnostics (e.g. retrieval precision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticMeta {
    /// Prototype of each train clip.
    pub train_prototypes: Vec<u32>,
    /// Prototype of each val clip.
    pub val_prototypes: Vec<u32>,
    /// Prototype of each test clip.
    pub test_prototypes: Vec<u32>,
    /// What every token of every train clip renders.
    pub train_content: TokenContent,
    /// What every token of every val clip renders.
    pub val_content: TokenContent,
    /// What every token of every test clip renders.
    pub test_content: TokenContent,
}

/// What each token of each clip of a split renders, as a code per token: two tokens at
/// the same position render the same latent (before the feature noise) exactly when their
/// codes are equal. Visual token `j` (column `j * 3 / Lv`): 0 for an empty column, else
/// 1 + the class of the source standing there. Audio token `t`: 1 + 4 * class +
/// (loudness - 1) of the source playing at step `t`, or 0 for none. A token covered by a
/// background event (`background_prob`) renders event `e`: code 1 + K + e (visual) or
/// 1 + 4 K + e (audio), K = `n_instruments`; the `*_scene` codes are what the scene puts
/// at each token, as if no event covered it (equal to the rendered codes without events).
///
/// **Noise token.** A recovered token (position `i` of the missing modality of a query
/// clip, recovered from n retrieved clips) is *noise* when fewer than half of the n
/// retrieved clips render the query's scene code at position `i` (`2 * matches < n`): the
/// retrieved evidence there shows another instrument, another loudness, an instrument
/// where there is none, nothing where there is one, or a background event.
/// [`noise_tokens`] computes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenContent {
    /// Rendered audio codes `[C * La]` (row-major, clip by clip).
    pub audio: Vec<u32>,
    /// Rendered visual codes `[C * Lv]` (row-major, clip by clip).
    pub visual: Vec<u32>,
    /// Audio scene codes `[C * La]`.
    pub audio_scene: Vec<u32>,
    /// Visual scene codes `[C * Lv]`.
    pub visual_scene: Vec<u32>,
}

/// The noise tokens (see [`TokenContent`]) of one recovered sequence: `own` are the
/// query clip's scene codes `[L]`, `retrieved` the rendered codes `[L]` of each of its n
/// retrieved clips.
/// Returns `[L]`, true = noise. With no retrieved clip every token is noise.
pub fn noise_tokens(own: &[u32], retrieved: &[&[u32]]) -> Vec<bool> {
    let n = retrieved.len();
    (0..own.len())
        .map(|i| {
            let matches = retrieved
                .iter()
                .filter(|r| r.get(i) == Some(&own[i]))
                .count();
            2 * matches < n || n == 0
        })
        .collect()
}

/// Generate the three splits (deterministic in `cfg`).
pub fn generate(cfg: &SyntheticConfig) -> Result<Splits> {
    Ok(generate_with_meta(cfg)?.0)
}

/// [`generate`] plus the ground-truth prototypes of every clip.
pub fn generate_with_meta(cfg: &SyntheticConfig) -> Result<(Splits, SyntheticMeta)> {
    cfg.validate()?;
    let world = World::new(cfg);
    let vocab = question_vocab(cfg.n_instruments);
    let answer_vocab = answer_vocab(cfg.n_instruments);
    let mut id_base = 0u32;
    let mut out = Vec::with_capacity(3);
    for (stream, n) in [
        (1u64, cfg.n_train_clips),
        (2, cfg.n_val_clips),
        (3, cfg.n_test_clips),
    ] {
        let mut rng = rng_stream(cfg.seed, stream);
        // background decisions: streams 5-7, so the clips themselves do not depend on them
        let mut bg_rng = rng_stream(cfg.seed, 4 + stream);
        let (ds, protos, content) =
            world.split(&mut rng, &mut bg_rng, n, id_base, &vocab, &answer_vocab)?;
        id_base += n as u32;
        out.push((ds, protos, content));
    }
    let (test, test_prototypes, test_content) = out.pop().expect("three splits");
    let (val, val_prototypes, val_content) = out.pop().expect("three splits");
    let (train, train_prototypes, train_content) = out.pop().expect("three splits");
    let splits = Splits { train, val, test };
    splits.validate()?;
    Ok((
        splits,
        SyntheticMeta {
            train_prototypes,
            val_prototypes,
            test_prototypes,
            train_content,
            val_content,
            test_content,
        },
    ))
}

fn rng_stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    rng.sample::<f32, _>(StandardNormal)
}

fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * std).collect()
}

/// `[rows, cols]` row-major Gaussian matrix with entries N(0, 1/cols), so a vector with N(0,1)
/// entries maps to entries of std ~1.
fn projection(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    normal_vec(rng, rows * cols, 1.0 / (cols as f32).sqrt())
}

/// `out += a * x`.
fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `out += m [rows, cols] @ x [cols]`.
fn matvec_add(m: &[f32], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    for (o, row) in out.iter_mut().zip(m.chunks_exact(cols)) {
        *o += row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// One instrument in a scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// Instrument class (both modalities).
    pub class: usize,
    /// 0 = left, 1 = middle, 2 = right (visual only); distinct within a scene.
    pub pos: usize,
    /// Whether it sounds (audio only; a silent source is still visible).
    pub sounding: bool,
    /// Loudness level 1..=4 (audio only, meaningful when sounding).
    pub loud: u8,
    /// Onset order key (audio only): among sounding sources, lower starts earlier; distinct.
    pub order: usize,
}

/// The latent scene of a clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scene {
    pub proto: usize,
    pub sources: Vec<Source>,
    /// The clip shows its prototype's audio background (`background_prob`).
    pub bg_audio: bool,
    /// The clip shows its prototype's visual background.
    pub bg_visual: bool,
}

impl Scene {
    fn sounding(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter().filter(|s| s.sounding)
    }

    fn n_sounding(&self) -> usize {
        self.sounding().count()
    }

    fn class_count(&self, c: usize) -> usize {
        self.sources.iter().filter(|s| s.class == c).count()
    }

    /// The unique source of class `c`, if exactly one.
    fn unique_class(&self, c: usize) -> Option<&Source> {
        let mut it = self.sources.iter().filter(|s| s.class == c);
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    /// The unique sounding source of class `c`, if exactly one sounds.
    fn unique_sounding_class(&self, c: usize) -> Option<&Source> {
        let mut it = self.sounding().filter(|s| s.class == c);
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    fn at(&self, pos: usize) -> Option<&Source> {
        self.sources.iter().find(|s| s.pos == pos)
    }

    /// Onset rank of each source among the sounding ones (None for silent sources).
    fn onset_ranks(&self) -> Vec<Option<usize>> {
        self.sources
            .iter()
            .map(|s| {
                s.sounding
                    .then(|| self.sounding().filter(|o| o.order < s.order).count())
            })
            .collect()
    }

    /// Ensure at least one source sounds.
    fn fix_sounding(&mut self, rng: &mut ChaCha8Rng) {
        if !self.sources.iter().any(|s| s.sounding) {
            let i = rng.random_range(0..self.sources.len());
            self.sources[i].sounding = true;
        }
    }
}

/// A concrete question: template and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum QSpec {
    /// A-Count: "how many instruments are sounding".
    CountSounding,
    /// A-Comp: "is the <I1> louder than the <I2>" (each the only sounding one of its class).
    LouderYesNo(usize, usize),
    /// A-Comp: "which is louder the <I1> or the <I2>".
    WhichLouder(usize, usize),
    /// V-Count: "how many instruments are in the video".
    CountAll,
    /// V-Count: "how many <I> are in the video".
    CountClass(usize),
    /// V-Loc: "where is the <I>".
    WhereIs(usize),
    /// V-Loc: "what is the instrument on the <P>".
    WhatAt(usize),
    /// AV-Ext: "is the instrument on the <P> sounding".
    SoundingAt(usize),
    /// AV-Count: "how many instruments are silent".
    CountSilent,
    /// AV-Count: "how many sounding instruments are not on the <P>".
    CountSoundingNotAt(usize),
    /// AV-Loc: "where is the loudest/quietest instrument".
    WhereExtremeLoud(bool),
    /// AV-Comp: "is the instrument on the <P1> louder than the instrument on the <P2>".
    LouderAt(usize, usize),
    /// AV-Temp: "where is the instrument that starts first/last".
    WhereStarts(bool),
}

impl QSpec {
    pub(crate) fn qtype(self) -> QuestionType {
        match self {
            QSpec::CountSounding => QuestionType::AudioCounting,
            QSpec::LouderYesNo(..) | QSpec::WhichLouder(..) => QuestionType::AudioComparative,
            QSpec::CountAll | QSpec::CountClass(_) => QuestionType::VisualCounting,
            QSpec::WhereIs(_) | QSpec::WhatAt(_) => QuestionType::VisualLocation,
            QSpec::SoundingAt(_) => QuestionType::AvExistential,
            QSpec::CountSilent | QSpec::CountSoundingNotAt(_) => QuestionType::AvCounting,
            QSpec::WhereExtremeLoud(_) => QuestionType::AvLocation,
            QSpec::LouderAt(..) => QuestionType::AvComparative,
            QSpec::WhereStarts(_) => QuestionType::AvTemporal,
        }
    }

    pub(crate) fn words(self) -> Vec<&'static str> {
        let i = |c: usize| INSTRUMENTS[c];
        let p = |c: usize| POSITIONS[c];
        let s = |t: &'static str| t.split(' ').collect::<Vec<_>>();
        match self {
            QSpec::CountSounding => s("how many instruments are sounding"),
            QSpec::LouderYesNo(a, b) => {
                [s("is the"), vec![i(a)], s("louder than the"), vec![i(b)]].concat()
            }
            QSpec::WhichLouder(a, b) => [
                s("which is louder the"),
                vec![i(a)],
                s("or the"),
                vec![i(b)],
            ]
            .concat(),
            QSpec::CountAll => s("how many instruments are in the video"),
            QSpec::CountClass(c) => [s("how many"), vec![i(c)], s("are in the video")].concat(),
            QSpec::WhereIs(c) => [s("where is the"), vec![i(c)]].concat(),
            QSpec::WhatAt(q) => [s("what is the instrument on the"), vec![p(q)]].concat(),
            QSpec::SoundingAt(q) => {
                [s("is the instrument on the"), vec![p(q)], s("sounding")].concat()
            }
            QSpec::CountSilent => s("how many instruments are silent"),
            QSpec::CountSoundingNotAt(q) => [
                s("how many sounding instruments are not on the"),
                vec![p(q)],
            ]
            .concat(),
            QSpec::WhereExtremeLoud(true) => s("where is the loudest instrument"),
            QSpec::WhereExtremeLoud(false) => s("where is the quietest instrument"),
            QSpec::LouderAt(a, b) => [
                s("is the instrument on the"),
                vec![p(a)],
                s("louder than the instrument on the"),
                vec![p(b)],
            ]
            .concat(),
            QSpec::WhereStarts(true) => s("where is the instrument that starts first"),
            QSpec::WhereStarts(false) => s("where is the instrument that starts last"),
        }
    }

    /// The answer on `scene`, or `None` when the question does not apply (ambiguous or refers to
    /// something absent).
    pub(crate) fn answer(self, scene: &Scene) -> Option<String> {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        let num = |n: usize| n.to_string();
        let pos = |s: &Source| POSITIONS[s.pos].to_string();
        let sounding_pair = |a: Option<&Source>, b: Option<&Source>| -> Option<(u8, u8)> {
            let (a, b) = (a?, b?);
            (a.sounding && b.sounding && a.loud != b.loud).then_some((a.loud, b.loud))
        };
        // Two distinct classes, each present once: their loudness pair, as above.
        let louder_pair = |a: usize, b: usize| -> Option<(u8, u8)> {
            if a == b {
                return None;
            }
            sounding_pair(
                scene.unique_sounding_class(a),
                scene.unique_sounding_class(b),
            )
        };
        match self {
            QSpec::CountSounding => Some(num(scene.n_sounding())),
            QSpec::LouderYesNo(a, b) => {
                let (la, lb) = louder_pair(a, b)?;
                Some(yes_no(la > lb))
            }
            QSpec::WhichLouder(a, b) => {
                let (la, lb) = louder_pair(a, b)?;
                Some(INSTRUMENTS[if la > lb { a } else { b }].to_string())
            }
            QSpec::CountAll => Some(num(scene.sources.len())),
            QSpec::CountClass(c) => Some(num(scene.class_count(c))),
            QSpec::WhereIs(c) => scene.unique_class(c).map(pos),
            QSpec::WhatAt(q) => scene.at(q).map(|s| INSTRUMENTS[s.class].to_string()),
            QSpec::SoundingAt(q) => scene.at(q).map(|s| yes_no(s.sounding)),
            QSpec::CountSilent => Some(num(scene.sources.len() - scene.n_sounding())),
            QSpec::CountSoundingNotAt(q) => {
                Some(num(scene.sounding().filter(|s| s.pos != q).count()))
            }
            QSpec::WhereExtremeLoud(loudest) => {
                let key = |s: &&Source| {
                    if loudest {
                        s.loud as i32
                    } else {
                        -(s.loud as i32)
                    }
                };
                let best = scene.sounding().max_by_key(key)?;
                let ties = scene.sounding().filter(|s| s.loud == best.loud).count();
                (scene.n_sounding() >= 2 && ties == 1).then(|| pos(best))
            }
            QSpec::LouderAt(a, b) => {
                if a == b {
                    return None;
                }
                let (la, lb) = sounding_pair(scene.at(a), scene.at(b))?;
                Some(yes_no(la > lb))
            }
            QSpec::WhereStarts(first) => {
                if scene.n_sounding() < 2 {
                    return None;
                }
                let s = if first {
                    scene.sounding().min_by_key(|s| s.order)
                } else {
                    scene.sounding().max_by_key(|s| s.order)
                }?;
                Some(pos(s))
            }
        }
    }

    /// Sample a question of type `t` whose answer on `scene` is defined (None after a few tries).
    pub(crate) fn sample(
        t: QuestionType,
        scene: &Scene,
        n_instruments: usize,
        rng: &mut ChaCha8Rng,
    ) -> Option<QSpec> {
        for _ in 0..12 {
            let present = |rng: &mut ChaCha8Rng| {
                scene.sources[rng.random_range(0..scene.sources.len())].clone()
            };
            let coin = rng.random_bool(0.5);
            let spec = match t {
                QuestionType::AudioCounting => QSpec::CountSounding,
                QuestionType::AudioComparative => {
                    let (a, b) = (present(rng).class, present(rng).class);
                    if coin {
                        QSpec::LouderYesNo(a, b)
                    } else {
                        QSpec::WhichLouder(a, b)
                    }
                }
                QuestionType::VisualCounting => {
                    if coin {
                        QSpec::CountAll
                    } else if rng.random_bool(0.7) {
                        QSpec::CountClass(present(rng).class)
                    } else {
                        QSpec::CountClass(rng.random_range(0..n_instruments))
                    }
                }
                QuestionType::VisualLocation => {
                    if coin {
                        QSpec::WhereIs(present(rng).class)
                    } else {
                        QSpec::WhatAt(present(rng).pos)
                    }
                }
                QuestionType::AvExistential => QSpec::SoundingAt(present(rng).pos),
                QuestionType::AvCounting => {
                    if coin {
                        QSpec::CountSilent
                    } else {
                        QSpec::CountSoundingNotAt(rng.random_range(0..3))
                    }
                }
                QuestionType::AvLocation => QSpec::WhereExtremeLoud(coin),
                QuestionType::AvComparative => QSpec::LouderAt(present(rng).pos, present(rng).pos),
                QuestionType::AvTemporal => QSpec::WhereStarts(coin),
            };
            if spec.answer(scene).is_some() {
                return Some(spec);
            }
        }
        None
    }
}

/// All words that can appear in a question.
fn question_vocab(n_instruments: usize) -> Vocab {
    let templates = [
        "how many instruments are sounding",
        "is the louder than the",
        "which is louder the or the",
        "how many instruments are in the video",
        "where is the",
        "what is the instrument on the",
        "is the instrument on the sounding",
        "how many instruments are silent",
        "how many sounding instruments are not on the",
        "where is the loudest instrument",
        "where is the quietest instrument",
        "is the instrument on the louder than the instrument on the",
        "where is the instrument that starts first",
        "where is the instrument that starts last",
    ];
    let mut words: Vec<String> = Vec::new();
    for t in templates {
        words.extend(t.split(' ').map(str::to_string));
    }
    words.extend(POSITIONS.iter().map(|s| s.to_string()));
    words.extend(INSTRUMENTS[..n_instruments].iter().map(|s| s.to_string()));
    Vocab::question(words)
}

/// The answer classes: counts 0..=3, yes/no, positions, instruments.
fn answer_vocab(n_instruments: usize) -> Vocab {
    let mut a: Vec<String> = ["0", "1", "2", "3", "yes", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(POSITIONS.iter().map(|s| s.to_string()));
    a.extend(INSTRUMENTS[..n_instruments].iter().map(|s| s.to_string()));
    Vocab::new(a).expect("distinct answer words")
}

/// Longest question in tokens (the padded length Lq).
fn max_question_len() -> usize {
    // "is the instrument on the <P1> louder than the instrument on the <P2>"
    QSpec::LouderAt(0, 1).words().len()
}

/// The fixed random "world": embeddings, projections and prototypes.
pub(crate) struct World {
    cfg: SyntheticConfig,
    /// Visual class embeddings `[K][ds]`.
    cls_vis: Vec<Vec<f32>>,
    /// Audio class embeddings `[K][ds]`.
    cls_aud: Vec<Vec<f32>>,
    /// Key-space class embeddings `[K][ds]`.
    cls_key: Vec<Vec<f32>>,
    /// Column embeddings `[3][ds]`.
    col_emb: Vec<Vec<f32>>,
    /// Per visual token embeddings `[Lv][ds]`.
    tok_emb: Vec<Vec<f32>>,
    /// Per audio time step embeddings `[La][ds]`.
    time_emb: Vec<Vec<f32>>,
    /// Loudness-level embeddings `[4][ds]` (levels 1..=4).
    loud_emb: Vec<Vec<f32>>,
    /// Visual projection `[Dv, ds]`, audio projection `[Da, ds]`.
    proj_v: Vec<f32>,
    proj_a: Vec<f32>,
    /// Shared key projection `[Dk, ds]` and per-modality distortions.
    key_w: Vec<f32>,
    key_ga: Vec<f32>,
    key_gv: Vec<f32>,
    /// Prototype latents `[P][ds]` and scenes.
    proto_latent: Vec<Vec<f32>>,
    protos: Vec<Scene>,
    /// Background events (`background_prob`).
    bg: Backgrounds,
}

/// Event types of the background events.
const BACKGROUND_EVENTS: usize = 4;

/// The background events of the world: embeddings `[BACKGROUND_EVENTS][ds]` per modality
/// and, per prototype, where its events fall and which they are.
struct Backgrounds {
    audio_emb: Vec<Vec<f32>>,
    visual_emb: Vec<Vec<f32>>,
    /// Per prototype: first covered audio step, audio event, covered column, visual event.
    per_proto: Vec<(usize, usize, usize, usize)>,
}

impl Backgrounds {
    /// Audio steps covered by a background: `max(1, La / 4)`.
    fn audio_len(la: usize) -> usize {
        (la / 4).max(1)
    }

    fn new(cfg: &SyntheticConfig) -> Self {
        // stream 4: independent of the world (stream 0) and the splits (1-3)
        let mut rng = rng_stream(cfg.seed, 4);
        let ds = cfg.latent_dim;
        let audio_emb = (0..BACKGROUND_EVENTS)
            .map(|_| normal_vec(&mut rng, ds, 1.0))
            .collect();
        let visual_emb = (0..BACKGROUND_EVENTS)
            .map(|_| normal_vec(&mut rng, ds, 1.0))
            .collect();
        let span = cfg.la - Self::audio_len(cfg.la) + 1;
        let per_proto = (0..cfg.n_prototypes)
            .map(|_| {
                (
                    rng.random_range(0..span),
                    rng.random_range(0..BACKGROUND_EVENTS),
                    rng.random_range(0..3),
                    rng.random_range(0..BACKGROUND_EVENTS),
                )
            })
            .collect();
        Self {
            audio_emb,
            visual_emb,
            per_proto,
        }
    }
}

impl World {
    pub(crate) fn new(cfg: &SyntheticConfig) -> World {
        let mut rng = rng_stream(cfg.seed, 0);
        let ds = cfg.latent_dim;
        let k = cfg.n_instruments;
        let embs = |n: usize, rng: &mut ChaCha8Rng| {
            (0..n).map(|_| normal_vec(rng, ds, 1.0)).collect::<Vec<_>>()
        };
        let cls_vis = embs(k, &mut rng);
        let cls_aud = embs(k, &mut rng);
        let cls_key = embs(k, &mut rng);
        let col_emb = embs(3, &mut rng);
        let tok_emb = embs(cfg.lv, &mut rng);
        let time_emb = embs(cfg.la, &mut rng);
        let proj_v = projection(&mut rng, cfg.dv, ds);
        let proj_a = projection(&mut rng, cfg.da, ds);
        let key_w = projection(&mut rng, cfg.dk, ds);
        let key_ga = projection(&mut rng, cfg.dk, ds);
        let key_gv = projection(&mut rng, cfg.dk, ds);
        let proto_latent = embs(cfg.n_prototypes, &mut rng);
        let protos = Self::prototypes(cfg, &mut rng);
        let loud_emb = embs(4, &mut rng);
        let bg = Backgrounds::new(cfg);
        World {
            cfg: cfg.clone(),
            cls_vis,
            cls_aud,
            cls_key,
            col_emb,
            tok_emb,
            time_emb,
            loud_emb,
            proj_v,
            proj_a,
            key_w,
            key_ga,
            key_gv,
            proto_latent,
            protos,
            bg,
        }
    }

    fn prototype(cfg: &SyntheticConfig, p: usize, rng: &mut ChaCha8Rng) -> Scene {
        // 1, 2, 3 sources with weights 0.2, 0.4, 0.4, capped at max_sources.
        let u: f32 = rng.random();
        let n = (if u < 0.2 {
            1
        } else if u < 0.6 {
            2
        } else {
            3
        })
        .min(cfg.max_sources);
        let mut positions = [0usize, 1, 2];
        rand::seq::SliceRandom::shuffle(&mut positions[..], rng);
        let mut orders: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(&mut orders[..], rng);
        let sources = (0..n)
            .map(|i| Source {
                class: rng.random_range(0..cfg.n_instruments),
                pos: positions[i],
                sounding: !rng.random_bool(f64::from(cfg.silent_prob)),
                loud: rng.random_range(1..=4),
                order: orders[i],
            })
            .collect();
        let mut scene = Scene {
            proto: p,
            sources,
            bg_audio: false,
            bg_visual: false,
        };
        scene.fix_sounding(rng);
        scene
    }

    /// All prototypes, in families of `prototype_family_size` (see [`SyntheticConfig`]): member
    /// `m` of a family takes the base's layout (positions) or an alternative one when bit 0 of `m`
    /// is set, and the base's audio attributes (sounding, loudness, order) or alternative ones when
    /// bit 1 is set; classes are shared by the whole family.
    fn prototypes(cfg: &SyntheticConfig, rng: &mut ChaCha8Rng) -> Vec<Scene> {
        let fs = cfg.prototype_family_size;
        let mut out: Vec<Scene> = Vec::with_capacity(cfg.n_prototypes);
        let mut alt_layout = Vec::new();
        let mut alt_audio = Vec::new();
        for p in 0..cfg.n_prototypes {
            let m = p % fs;
            if m == 0 {
                let base = Self::prototype(cfg, p, rng);
                alt_layout = Self::alternative_layout(&base, rng);
                alt_audio = Self::alternative_audio(cfg, &base, rng);
                out.push(base);
                continue;
            }
            let mut scene = out[p - m].clone();
            scene.proto = p;
            for (i, s) in scene.sources.iter_mut().enumerate() {
                if m & 1 == 1 {
                    s.pos = alt_layout[i];
                }
                if m & 2 == 2 {
                    (s.sounding, s.loud, s.order) = alt_audio[i];
                }
            }
            out.push(scene);
        }
        out
    }

    /// Positions for the sources of `base`, different from its own when possible.
    fn alternative_layout(base: &Scene, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let own: Vec<usize> = base.sources.iter().map(|s| s.pos).collect();
        let mut pos = [0usize, 1, 2];
        for _ in 0..20 {
            rand::seq::SliceRandom::shuffle(&mut pos[..], rng);
            if pos[..own.len()] != own[..] {
                break;
            }
        }
        pos[..own.len()].to_vec()
    }

    /// (sounding, loudness, order) for the sources of `base`, different from its own when possible
    /// (at least one source sounds).
    fn alternative_audio(
        cfg: &SyntheticConfig,
        base: &Scene,
        rng: &mut ChaCha8Rng,
    ) -> Vec<(bool, u8, usize)> {
        let own: Vec<(bool, u8, usize)> = base
            .sources
            .iter()
            .map(|s| (s.sounding, s.loud, s.order))
            .collect();
        let n = own.len();
        let mut alt = own.clone();
        for _ in 0..20 {
            let mut orders: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(&mut orders[..], rng);
            alt = (0..n)
                .map(|i| {
                    (
                        !rng.random_bool(f64::from(cfg.silent_prob)),
                        rng.random_range(1..=4),
                        orders[i],
                    )
                })
                .collect();
            if !alt.iter().any(|a| a.0) {
                let i = rng.random_range(0..n);
                alt[i].0 = true;
            }
            if alt != own {
                break;
            }
        }
        alt
    }

    /// A clip: a copy of a random prototype with per-attribute variations.
    pub(crate) fn sample_scene(&self, rng: &mut ChaCha8Rng) -> Scene {
        let cfg = &self.cfg;
        let p = rng.random_range(0..self.protos.len());
        let mut scene = self.protos[p].clone();
        let v = f64::from(cfg.variation);
        let n = scene.sources.len();
        for i in 0..n {
            if rng.random_bool(f64::from(cfg.identity_variation)) {
                scene.sources[i].class = rng.random_range(0..cfg.n_instruments);
            }
            if rng.random_bool(v) {
                // move to another position, swapping with its occupant if any
                let new_pos = (scene.sources[i].pos + rng.random_range(1..3)) % 3;
                let old_pos = scene.sources[i].pos;
                if let Some(j) = scene.sources.iter().position(|s| s.pos == new_pos) {
                    scene.sources[j].pos = old_pos;
                }
                scene.sources[i].pos = new_pos;
            }
            if rng.random_bool(v) {
                scene.sources[i].loud = rng.random_range(1..=4);
            }
            if rng.random_bool(v) {
                scene.sources[i].sounding = !scene.sources[i].sounding;
            }
        }
        if n >= 2 && rng.random_bool(v) {
            let i = rng.random_range(0..n);
            let j = (i + rng.random_range(1..n)) % n;
            let (oi, oj) = (scene.sources[i].order, scene.sources[j].order);
            scene.sources[i].order = oj;
            scene.sources[j].order = oi;
        }
        scene.fix_sounding(rng);
        scene
    }

    /// Visual tokens `[Lv * Dv]` (noise-free when `noise` is false).
    pub(crate) fn render_visual(
        &self,
        scene: &Scene,
        rng: &mut ChaCha8Rng,
        noise: bool,
    ) -> Vec<f32> {
        let lv = self.cfg.lv;
        self.render(&self.proj_v, lv, self.cfg.dv, rng, noise, |j, h| {
            h.copy_from_slice(&self.col_emb[j * 3 / lv]);
            axpy(h, 0.5, &self.tok_emb[j]);
            if let Some(e) = self.visual_background(scene, j) {
                axpy(h, 1.0, &self.bg.visual_emb[e]);
            } else if let Some(s) = self.visual_source(scene, j) {
                axpy(h, 1.0, &self.cls_vis[s.class]);
            }
        })
    }

    /// The background event covering visual token `j` of `scene`, if any.
    fn visual_background(&self, scene: &Scene, j: usize) -> Option<usize> {
        let (_, _, col, e) = self.bg.per_proto[scene.proto];
        (scene.bg_visual && j * 3 / self.cfg.lv == col).then_some(e)
    }

    /// The background event covering audio step `t` of `scene`, if any.
    fn audio_background(&self, scene: &Scene, t: usize) -> Option<usize> {
        let (start, e, _, _) = self.bg.per_proto[scene.proto];
        let len = Backgrounds::audio_len(self.cfg.la);
        (scene.bg_audio && (start..start + len).contains(&t)).then_some(e)
    }

    /// The source visual token `j` shows: the one standing in its column `j * 3 / Lv`.
    fn visual_source<'s>(&self, scene: &'s Scene, j: usize) -> Option<&'s Source> {
        scene.at(j * 3 / self.cfg.lv)
    }

    /// The source playing at audio step `t`: the sounding source of onset rank
    /// `t * n_sounding / La`.
    fn audio_source<'s>(&self, scene: &'s Scene, t: usize) -> Option<&'s Source> {
        let ns = scene.n_sounding().max(1);
        let active = t * ns / self.cfg.la;
        scene
            .sources
            .iter()
            .zip(scene.onset_ranks())
            .find(|(_, r)| *r == Some(active))
            .map(|(s, _)| s)
    }

    /// Visual content codes `[Lv]` of a clip (see [`TokenContent`]): what its tokens
    /// render (`rendered`, background events included) or what its scene puts there.
    fn visual_content(&self, scene: &Scene, rendered: bool) -> Vec<u32> {
        let k = self.cfg.n_instruments as u32;
        (0..self.cfg.lv)
            .map(|j| match self.visual_background(scene, j) {
                Some(e) if rendered => 1 + k + e as u32,
                _ => self
                    .visual_source(scene, j)
                    .map_or(0, |s| 1 + s.class as u32),
            })
            .collect()
    }

    /// Audio content codes `[La]` of a clip (see [`TokenContent`]), as
    /// [`World::visual_content`].
    fn audio_content(&self, scene: &Scene, rendered: bool) -> Vec<u32> {
        let k = self.cfg.n_instruments as u32;
        (0..self.cfg.la)
            .map(|t| match self.audio_background(scene, t) {
                Some(e) if rendered => 1 + 4 * k + e as u32,
                _ => self
                    .audio_source(scene, t)
                    .map_or(0, |s| 1 + 4 * s.class as u32 + u32::from(s.loud) - 1),
            })
            .collect()
    }

    /// Audio tokens `[La * Da]`: the sounding sources play one after another in onset order;
    /// time step `t` belongs to the source of onset rank `t * n_sounding / La` and carries its
    /// class and loudness embeddings (plus the time-step embedding).
    pub(crate) fn render_audio(
        &self,
        scene: &Scene,
        rng: &mut ChaCha8Rng,
        noise: bool,
    ) -> Vec<f32> {
        let la = self.cfg.la;
        self.render(&self.proj_a, la, self.cfg.da, rng, noise, |t, h| {
            h.copy_from_slice(&self.time_emb[t]);
            if let Some(e) = self.audio_background(scene, t) {
                axpy(h, 1.0, &self.bg.audio_emb[e]);
            } else if let Some(s) = self.audio_source(scene, t) {
                axpy(h, 1.0, &self.cls_aud[s.class]);
                axpy(h, 1.0, &self.loud_emb[usize::from(s.loud) - 1]);
            }
        })
    }

    /// `tokens` rows of `dim` features: `latent(t, h)` writes token `t`'s latent `h` [Ds],
    /// which `proj` [dim, Ds] projects into row `t`; then the feature noise when `noise`.
    fn render(
        &self,
        proj: &[f32],
        tokens: usize,
        dim: usize,
        rng: &mut ChaCha8Rng,
        noise: bool,
        mut latent: impl FnMut(usize, &mut [f32]),
    ) -> Vec<f32> {
        let mut out = vec![0f32; tokens * dim];
        let mut h = vec![0f32; self.cfg.latent_dim];
        for t in 0..tokens {
            latent(t, &mut h);
            matvec_add(proj, &h, &mut out[t * dim..(t + 1) * dim]);
        }
        if noise {
            add_noise(&mut out, self.cfg.feature_noise, rng);
        }
        out
    }

    /// Unified key `[Dk]` of one modality: `(W + mis * G_m) z_m + noise`, with
    /// `z_m = proto_latent + content_weight * mean(class key embeddings the modality perceives)`
    /// (audio perceives sounding sources, visual all sources).
    pub(crate) fn key(
        &self,
        scene: &Scene,
        audio: bool,
        rng: &mut ChaCha8Rng,
        noise: bool,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let mut z = self.proto_latent[scene.proto].clone();
        let perceived: Vec<&Source> = scene
            .sources
            .iter()
            .filter(|s| !audio || s.sounding)
            .collect();
        let w = cfg.key_content_weight / perceived.len().max(1) as f32;
        for s in perceived {
            axpy(&mut z, w, &self.cls_key[s.class]);
        }
        let mut k = vec![0f32; cfg.dk];
        matvec_add(&self.key_w, &z, &mut k);
        let g = if audio { &self.key_ga } else { &self.key_gv };
        let zm: Vec<f32> = z.iter().map(|x| x * cfg.key_misalignment).collect();
        matvec_add(g, &zm, &mut k);
        if noise {
            add_noise(&mut k, cfg.key_noise, rng);
        }
        k
    }

    /// Generate one split of `n` clips with ids `id_base..id_base + n`.
    fn split(
        &self,
        rng: &mut ChaCha8Rng,
        bg_rng: &mut ChaCha8Rng,
        n: usize,
        id_base: u32,
        vocab: &Vocab,
        answer_vocab: &Vocab,
    ) -> Result<(Dataset, Vec<u32>, TokenContent)> {
        let cfg = &self.cfg;
        let lq = max_question_len();
        let mut audio = Vec::with_capacity(n * cfg.la * cfg.da);
        let mut visual = Vec::with_capacity(n * cfg.lv * cfg.dv);
        let mut audio_key = Vec::with_capacity(n * cfg.dk);
        let mut visual_key = Vec::with_capacity(n * cfg.dk);
        let mut protos = Vec::with_capacity(n);
        let mut content = TokenContent::default();
        let nq = n * cfg.questions_per_clip;
        let mut questions = Vec::with_capacity(nq * lq);
        let mut question_len = Vec::with_capacity(nq);
        let mut answers = Vec::with_capacity(nq);
        let mut qtypes = Vec::with_capacity(nq);
        let mut clip_of = Vec::with_capacity(nq);
        let mut per_type = [0usize; 9];
        for c in 0..n {
            let mut scene = self.sample_scene(rng);
            if cfg.background_prob > 0.0 {
                let p = f64::from(cfg.background_prob);
                scene.bg_audio = bg_rng.random_bool(p);
                scene.bg_visual = bg_rng.random_bool(p);
            }
            protos.push(scene.proto as u32);
            content.audio.extend(self.audio_content(&scene, true));
            content.visual.extend(self.visual_content(&scene, true));
            content
                .audio_scene
                .extend(self.audio_content(&scene, false));
            content
                .visual_scene
                .extend(self.visual_content(&scene, false));
            audio.extend(self.render_audio(&scene, rng, true));
            visual.extend(self.render_visual(&scene, rng, true));
            audio_key.extend(self.key(&scene, true, rng, true));
            visual_key.extend(self.key(&scene, false, rng, true));
            let mut asked = HashSet::new();
            let mut made = 0;
            let mut tries = 0;
            while made < cfg.questions_per_clip {
                tries += 1;
                // Balance the types over the split: try the types asked least so far first
                // (random order among equals), taking the first one that applies to the scene.
                let mut order: Vec<usize> = (0..QuestionType::ALL.len()).collect();
                rand::seq::SliceRandom::shuffle(&mut order[..], rng);
                order.sort_by_key(|&t| per_type[t]);
                let mut chosen = None;
                for t in order {
                    let Some(spec) =
                        QSpec::sample(QuestionType::ALL[t], &scene, cfg.n_instruments, rng)
                    else {
                        continue;
                    };
                    // Avoid repeating a question on the same clip unless the scene is too small.
                    if asked.contains(&spec) && tries < 50 {
                        continue;
                    }
                    chosen = Some(spec);
                    break;
                }
                let Some(spec) = chosen else {
                    continue;
                };
                asked.insert(spec);
                per_type[spec.qtype().index()] += 1;
                let answer = spec.answer(&scene).expect("sampled spec applies");
                let words = spec.words();
                let mut ids = vocab.encode(&words);
                question_len.push(ids.len());
                ids.resize(lq, Vocab::PAD);
                questions.extend(ids);
                let a = answer_vocab.id(&answer).ok_or_else(|| {
                    anyhow::anyhow!("synthetic: answer {answer:?} not in the answer vocabulary")
                })?;
                answers.push(a);
                qtypes.push(spec.qtype());
                clip_of.push(c);
                made += 1;
            }
        }
        let cpu = Device::Cpu;
        let ds = Dataset {
            audio: Tensor::from_vec(audio, (n, cfg.la, cfg.da), &cpu)?,
            visual: Tensor::from_vec(visual, (n, cfg.lv, cfg.dv), &cpu)?,
            audio_key: Tensor::from_vec(audio_key, (n, cfg.dk), &cpu)?,
            visual_key: Tensor::from_vec(visual_key, (n, cfg.dk), &cpu)?,
            clip_ids: (0..n as u32).map(|i| id_base + i).collect(),
            clip_names: (0..n as u32)
                .map(|i| format!("syn-{}", id_base + i))
                .collect(),
            questions: Tensor::from_vec(questions, (nq, lq), &cpu)?,
            question_len,
            answers,
            qtypes,
            clip_of,
            vocab: vocab.clone(),
            answer_vocab: answer_vocab.clone(),
        };
        Ok((ds, protos, content))
    }
}

fn add_noise(v: &mut [f32], std: f32, rng: &mut ChaCha8Rng) {
    if std > 0.0 {
        for x in v.iter_mut() {
            *x += std * normal(rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::seq::SliceRandom;

    use super::*;
    use crate::data::Modality;

    fn world() -> (World, ChaCha8Rng) {
        let cfg = SyntheticConfig::default();
        (World::new(&cfg), rng_stream(cfg.seed, 99))
    }

    /// Resample every audio-only attribute (sounding, loudness, onset order).
    fn perturb_audio(s: &Scene, rng: &mut ChaCha8Rng) -> Scene {
        let mut s = s.clone();
        let mut orders: Vec<usize> = (0..s.sources.len()).collect();
        orders.shuffle(rng);
        for (src, o) in s.sources.iter_mut().zip(orders) {
            src.sounding = rng.random_bool(0.7);
            src.loud = rng.random_range(1..=4);
            src.order = o;
        }
        s.fix_sounding(rng);
        s
    }

    /// Change visual-only information: resample positions, then add a silent source at a free
    /// position or remove a silent one (silent sources are seen but not heard).
    fn perturb_visual(s: &Scene, rng: &mut ChaCha8Rng, n_instruments: usize) -> Scene {
        let mut s = s.clone();
        let mut pos = [0usize, 1, 2];
        pos.shuffle(rng);
        for (src, p) in s.sources.iter_mut().zip(pos) {
            src.pos = p;
        }
        if rng.random_bool(0.5) {
            if let Some(i) = s.sources.iter().position(|x| !x.sounding) {
                s.sources.remove(i);
            } else if s.sources.len() < 3 {
                let order = s.sources.iter().map(|x| x.order).max().map_or(0, |o| o + 1);
                s.sources.push(Source {
                    class: rng.random_range(0..n_instruments),
                    pos: pos[s.sources.len()],
                    sounding: false,
                    loud: rng.random_range(1..=4),
                    order,
                });
            }
        }
        s
    }

    /// What the visual tokens show: the class at each position.
    fn visual_content(s: &Scene) -> [Option<usize>; 3] {
        [0, 1, 2].map(|p| s.at(p).map(|x| x.class))
    }

    #[test]
    fn rendering_puts_each_attribute_in_the_claimed_modality() {
        let (w, mut rng) = world();
        let (mut a_changed, mut v_changed, mut n) = (0, 0, 0);
        for _ in 0..300 {
            let s = w.sample_scene(&mut rng);
            let (a0, v0) = (
                w.render_audio(&s, &mut rng, false),
                w.render_visual(&s, &mut rng, false),
            );
            // visual-only change: audio bit-identical
            let sv = perturb_visual(&s, &mut rng, w.cfg.n_instruments);
            assert_eq!(w.render_audio(&sv, &mut rng, false), a0);
            let shows = visual_content(&sv) != visual_content(&s);
            v_changed += usize::from((w.render_visual(&sv, &mut rng, false) != v0) == shows);
            // audio-only change: visual bit-identical
            let sa = perturb_audio(&s, &mut rng);
            assert_eq!(w.render_visual(&sa, &mut rng, false), v0);
            a_changed += usize::from(w.render_audio(&sa, &mut rng, false) != a0);
            // identity is in both
            let mut sc = s.clone();
            sc.sources[0].class = (sc.sources[0].class + 1) % w.cfg.n_instruments;
            assert_ne!(w.render_visual(&sc, &mut rng, false), v0);
            if sc.sources[0].sounding {
                assert_ne!(w.render_audio(&sc, &mut rng, false), a0);
            }
            n += 1;
        }
        assert_eq!(
            v_changed, n,
            "the visual tokens change exactly when what is seen changes"
        );
        assert!(
            a_changed as f32 > 0.7 * n as f32,
            "audio changed {a_changed}/{n}"
        );
    }

    #[test]
    fn equal_content_codes_mean_equal_noise_free_tokens() {
        // The noise-token labels rest on this: at one position, two clips' tokens render
        // the same latent exactly when their codes are equal.
        let w = World::new(&SyntheticConfig {
            background_prob: 0.5,
            ..SyntheticConfig::default()
        });
        let mut rng = rng_stream(7, 9);
        let scenes: Vec<Scene> = (0..60)
            .map(|_| {
                let mut s = w.sample_scene(&mut rng);
                (s.bg_audio, s.bg_visual) = (rng.random_bool(0.5), rng.random_bool(0.5));
                s
            })
            .collect();
        let (la, da, lv, dv) = (w.cfg.la, w.cfg.da, w.cfg.lv, w.cfg.dv);
        // (audio tokens, visual tokens, audio codes, visual codes) per scene
        type Rendered = (Vec<f32>, Vec<f32>, Vec<u32>, Vec<u32>);
        let rendered: Vec<Rendered> = scenes
            .iter()
            .map(|s| {
                (
                    w.render_audio(s, &mut rng, false),
                    w.render_visual(s, &mut rng, false),
                    w.audio_content(s, true),
                    w.visual_content(s, true),
                )
            })
            .collect();
        let (mut same, mut differ) = (0, 0);
        for a in &rendered {
            for b in &rendered {
                for t in 0..la {
                    let eq = a.0[t * da..(t + 1) * da] == b.0[t * da..(t + 1) * da];
                    assert_eq!(eq, a.2[t] == b.2[t], "audio step {t}");
                    same += usize::from(eq);
                    differ += usize::from(!eq);
                }
                for j in 0..lv {
                    let eq = a.1[j * dv..(j + 1) * dv] == b.1[j * dv..(j + 1) * dv];
                    assert_eq!(eq, a.3[j] == b.3[j], "visual token {j}");
                }
            }
        }
        assert!(same > 0 && differ > 0, "{same} equal, {differ} different");
    }

    #[test]
    fn background_events_change_only_the_tokens_they_cover() {
        let base = SyntheticConfig {
            n_train_clips: 60,
            n_val_clips: 10,
            n_test_clips: 10,
            ..SyntheticConfig::default()
        };
        let (plain, pm) = generate_with_meta(&base).unwrap();
        let bg = SyntheticConfig {
            background_prob: 0.5,
            ..base.clone()
        };
        let (with, wm) = generate_with_meta(&bg).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // keys, questions and answers do not depend on the events
        assert_eq!(v(&plain.train.audio_key), v(&with.train.audio_key));
        assert_eq!(plain.train.answers, with.train.answers);
        assert_eq!(pm.train_content.audio, pm.train_content.audio_scene);
        assert_eq!(pm.train_content.audio_scene, wm.train_content.audio_scene);
        assert_eq!(pm.train_content.visual_scene, wm.train_content.visual_scene);
        for (x, y, codes, scene, d) in [
            (
                &plain.train.audio,
                &with.train.audio,
                &wm.train_content.audio,
                &wm.train_content.audio_scene,
                base.da,
            ),
            (
                &plain.train.visual,
                &with.train.visual,
                &wm.train_content.visual,
                &wm.train_content.visual_scene,
                base.dv,
            ),
        ] {
            let (x, y) = (v(x), v(y));
            let mut covered = 0;
            for (t, (c, s)) in codes.iter().zip(scene).enumerate() {
                let same = x[t * d..(t + 1) * d] == y[t * d..(t + 1) * d];
                // a token differs exactly when an event covers it
                assert_eq!(same, c == s, "token {t}");
                covered += usize::from(c != s);
            }
            let share = covered as f64 / codes.len() as f64;
            assert!((0.05..0.3).contains(&share), "covered share {share}");
        }
    }

    #[test]
    fn noise_tokens_are_the_positions_most_retrieved_clips_get_wrong() {
        let own = [1, 2, 3, 0];
        let r1 = [1, 2, 9, 9];
        let r2 = [1, 5, 3, 9];
        let r3 = [7, 5, 9, 0];
        assert_eq!(
            noise_tokens(&own, &[&r1[..], &r2[..], &r3[..]]),
            [false, true, true, true]
        );
        assert_eq!(noise_tokens(&own, &[&r1[..]]), [false, false, true, true]);
        // two clips: one match of two is not "fewer than half"
        assert_eq!(
            noise_tokens(&own, &[&r1[..], &r3[..]]),
            [false, false, true, false]
        );
        assert_eq!(noise_tokens(&own, &[]), [true; 4]);
    }

    #[test]
    fn each_question_type_needs_exactly_the_modalities_it_claims() {
        let (w, mut rng) = world();
        // per type: [asked, changed by audio-only perturbation, changed by visual-only perturbation]
        let mut stats: HashMap<QuestionType, [usize; 3]> = HashMap::new();
        for _ in 0..3000 {
            let s = w.sample_scene(&mut rng);
            let t = QuestionType::ALL[rng.random_range(0..9)];
            let Some(spec) = QSpec::sample(t, &s, w.cfg.n_instruments, &mut rng) else {
                continue;
            };
            assert_eq!(spec.qtype(), t);
            let ans = spec.answer(&s);
            let e = stats.entry(t).or_default();
            e[0] += 1;
            e[1] += usize::from(spec.answer(&perturb_audio(&s, &mut rng)) != ans);
            e[2] +=
                usize::from(spec.answer(&perturb_visual(&s, &mut rng, w.cfg.n_instruments)) != ans);
        }
        for t in QuestionType::ALL {
            let [n, by_a, by_v] = stats[&t];
            let (fa, fv) = (by_a as f32 / n as f32, by_v as f32 / n as f32);
            eprintln!("{t}: n {n}, changed by audio {fa:.2}, by visual {fv:.2}");
            assert!(n > 50, "{t}: only {n} questions");
            for (m, f) in [(Modality::Audio, fa), (Modality::Visual, fv)] {
                if t.needs(m) {
                    assert!(f > 0.15, "{t} should depend on {m}: changed {f}");
                } else {
                    assert_eq!(f, 0.0, "{t} must not depend on {m}");
                }
            }
        }
    }

    /// The answer an oracle gives from retrieved information only: the answer on the top-1
    /// retrieved train scene (cross-modal cosine on unified keys), versus the best text-only prior
    /// (majority train answer of the exact question). Retrieval must carry the missing modality's
    /// information far better than the prior.
    #[test]
    fn retrieved_scenes_answer_missing_modality_questions_better_than_the_prior() {
        let cfg = SyntheticConfig::default();
        let w = World::new(&cfg);
        let mut rng = rng_stream(cfg.seed, 98);
        let train: Vec<Scene> = (0..cfg.n_train_clips)
            .map(|_| w.sample_scene(&mut rng))
            .collect();
        let test: Vec<Scene> = (0..cfg.n_test_clips)
            .map(|_| w.sample_scene(&mut rng))
            .collect();
        let keys = |sc: &[Scene], audio: bool, rng: &mut ChaCha8Rng| -> Vec<Vec<f32>> {
            sc.iter().map(|s| w.key(s, audio, rng, true)).collect()
        };
        let (tr_a, tr_v) = (keys(&train, true, &mut rng), keys(&train, false, &mut rng));
        let (te_a, te_v) = (keys(&test, true, &mut rng), keys(&test, false, &mut rng));
        let cos = |a: &[f32], b: &[f32]| {
            let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            d / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
                * b.iter().map(|x| x * x).sum::<f32>().sqrt())
        };
        let top1 = |q: &[f32], bank: &[Vec<f32>]| {
            (0..bank.len())
                .max_by(|&i, &j| {
                    cos(q, &bank[i])
                        .total_cmp(&cos(q, &bank[j]))
                        .then(j.cmp(&i))
                })
                .expect("non-empty bank")
        };
        // text prior: majority answer per exact question over the train scenes
        let mut prior: HashMap<QSpec, HashMap<String, usize>> = HashMap::new();
        for s in &train {
            for _ in 0..6 {
                let t = QuestionType::ALL[rng.random_range(0..9)];
                if let Some(q) = QSpec::sample(t, s, cfg.n_instruments, &mut rng) {
                    *prior
                        .entry(q)
                        .or_default()
                        .entry(q.answer(s).expect("applies"))
                        .or_default() += 1;
                }
            }
        }
        let majority = |q: &QSpec| {
            prior.get(q).and_then(|m| {
                m.iter()
                    .max_by_key(|(a, c)| (**c, std::cmp::Reverse(a.to_string())))
                    .map(|x| x.0.clone())
            })
        };
        // content shortcut: what an ideal memoriser of the available modality's content could
        // answer: the majority answer over train scenes whose available-modality content equals
        // the test scene's (audio: (class, loudness) of the sounding sources in onset order;
        // visual: the class at each position).
        let audio_sig = |s: &Scene| {
            let mut v: Vec<(usize, usize, u8)> =
                s.sounding().map(|x| (x.order, x.class, x.loud)).collect();
            v.sort_unstable();
            v.into_iter().map(|x| (x.1, x.2)).collect::<Vec<_>>()
        };
        let shortcut = |q: &QSpec, s: &Scene, missing: Modality| -> Option<String> {
            let mut votes: HashMap<String, usize> = HashMap::new();
            for t in &train {
                let same = match missing {
                    Modality::Visual => audio_sig(t) == audio_sig(s),
                    Modality::Audio => visual_content(t) == visual_content(s),
                };
                if let (true, Some(a)) = (same, q.answer(t)) {
                    *votes.entry(a).or_default() += 1;
                }
            }
            votes
                .into_iter()
                .max_by_key(|(a, c)| (*c, std::cmp::Reverse(a.clone())))
                .map(|x| x.0)
        };
        for missing in [Modality::Visual, Modality::Audio] {
            let types: Vec<QuestionType> = QuestionType::ALL
                .into_iter()
                .filter(|t| t.needs(missing) && !t.needs(missing.other()))
                .collect();
            let (mut n, mut ok_ret, mut ok_prior, mut ok_short) = (0usize, 0usize, 0usize, 0usize);
            for (i, s) in test.iter().enumerate() {
                let (q_key, bank) = match missing {
                    Modality::Visual => (&te_a[i], &tr_v),
                    Modality::Audio => (&te_v[i], &tr_a),
                };
                let r = &train[top1(q_key, bank)];
                for &t in &types {
                    let Some(q) = QSpec::sample(t, s, cfg.n_instruments, &mut rng) else {
                        continue;
                    };
                    let truth = q.answer(s);
                    let p = majority(&q);
                    let from_ret = q.answer(r).or_else(|| p.clone());
                    n += 1;
                    ok_ret += usize::from(from_ret == truth);
                    ok_prior += usize::from(p == truth);
                    ok_short += usize::from(shortcut(&q, s, missing).or(p) == truth);
                }
            }
            let acc = |k: usize| k as f32 / n as f32;
            let (acc_ret, acc_prior, acc_short) = (acc(ok_ret), acc(ok_prior), acc(ok_short));
            eprintln!(
                "missing {missing}: {n} questions, retrieval oracle {acc_ret:.3}, \
                 content shortcut {acc_short:.3}, text prior {acc_prior:.3}"
            );
            assert!(
                acc_ret > acc_prior + 0.1,
                "missing {missing}: retrieval {acc_ret} vs prior {acc_prior}"
            );
        }
    }

    #[test]
    fn questions_fit_the_padded_length_and_vocabularies() {
        let (w, mut rng) = world();
        let vocab = question_vocab(w.cfg.n_instruments);
        let answers = answer_vocab(w.cfg.n_instruments);
        for _ in 0..2000 {
            let s = w.sample_scene(&mut rng);
            let t = QuestionType::ALL[rng.random_range(0..9)];
            if let Some(q) = QSpec::sample(t, &s, w.cfg.n_instruments, &mut rng) {
                let words = q.words();
                assert!(words.len() <= max_question_len());
                assert!(words.iter().all(|x| vocab.id(x).is_some()), "{words:?}");
                assert!(answers.id(&q.answer(&s).expect("applies")).is_some());
            }
        }
    }
}
