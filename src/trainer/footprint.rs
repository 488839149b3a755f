//! The memory a training run will need, estimated from its config and the data's shapes
//! before anything is allocated, and refused with one line naming the option when it
//! exceeds [`crate::memory::limit`].
//!
//! Counted: the model's parameters (exact up to a few small heads) times five (weights,
//! gradients, the two AdamW moments, one checkpoint copy); the synthetic data set (clips and
//! questions, twice for the generator's own buffers) or the loaded data's tensors; the
//! memory bank (three copies of the train features: raw, standardised, and keys with
//! features); and one training batch's activations (per encoder layer ~12 D + 2 F floats per
//! token plus three L x L attention maps per head, twice for the backward pass) or one
//! evaluation batch's forward with its B x M bank similarities, whichever is larger.
//!
//! It is an estimate of the large buffers, not a bound: for the default configuration it is
//! 129 MiB where `r2scp train` peaked at 137 MiB of resident memory (README; the unit test
//! `the_default_run_is_estimated_near_its_measured_peak` prints the estimate). Its purpose is
//! to catch sizes that cannot fit at all, with one line naming the option.

use anyhow::Result;

use super::config::TrainConfig;
use crate::data::{DataDims, SyntheticConfig, MAX_QUESTION_WORDS};
use crate::memory::Limit;
use crate::model::ModelConfig;

/// Bytes of an f32.
const F32: u128 = 4;
/// Copies of every parameter while training: weights, gradients, AdamW m and v, and the
/// tensors a checkpoint write serialises.
const TRAIN_COPIES: u128 = 5;

/// The estimate, in bytes (parameters in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Parameters (elements).
    pub params: u128,
    /// The data set's tensors.
    pub data: u128,
    /// The memory bank.
    pub bank: u128,
    /// The largest batch's activations.
    pub batch: u128,
}

impl Footprint {
    /// Everything together, in bytes.
    pub fn total(&self) -> u128 {
        self.params * F32 * TRAIN_COPIES + self.data + self.bank + self.batch
    }
}

/// Elements of an `a -> b` linear layer with bias.
fn linear(a: u128, b: u128) -> u128 {
    a * b + b
}

/// Parameters of the model `m` builds for data of shape `d` (the few small retrieval and
/// gate heads are over-counted by a constant).
pub fn param_count(m: &ModelConfig, d: &DataDims) -> u128 {
    let (dim, f) = (m.dim as u128, (m.ffn_mult as u128) * (m.dim as u128));
    let (v, a) = (d.vocab_size as u128, d.n_answers as u128);
    let ln = 2 * dim;
    let mha = 4 * linear(dim, dim);
    let layer = mha + 2 * ln + linear(dim, f) + linear(f, dim);
    let encoder = |n: usize| n as u128 * layer + ln;
    let uni_head = v * dim + ln + mha + linear(2 * dim, dim) + linear(dim, a);
    let av_expert = |l: usize, din: usize| {
        linear(din as u128, dim) + l as u128 * dim + encoder(m.expert_layers) + uni_head
    };
    let fused_head = 3 * ln + mha + linear(dim, dim) + linear(dim, a);
    let text = v * dim + d.lq as u128 * dim + encoder(m.text_layers) + fused_head;
    // Null tokens, H_com adapter, CAP (W_proj, self- and cross-attention, two norms) and
    // the retrieval head (temperature, gate: at most 1,024).
    let recovery =
        |l: usize| l as u128 * dim + linear(dim, dim) + linear(dim, dim) + 2 * mha + 2 * ln + 1024;
    let router = linear(3 * dim + 64, dim) + linear(dim, 3);
    let decoder = 2 * mha + ln + linear(dim, 2 * dim) + linear(2 * dim, a);
    av_expert(d.la, d.da)
        + av_expert(d.lv, d.dv)
        + text
        + recovery(d.la)
        + recovery(d.lv)
        + router
        + decoder
}

/// Activation bytes of one sample through the model, forward only.
fn sample_bytes(m: &ModelConfig, d: &DataDims) -> u128 {
    let (dim, f, h) = (
        m.dim as u128,
        (m.ffn_mult as u128) * (m.dim as u128),
        m.heads as u128,
    );
    let enc = |l: usize, layers: usize| {
        let l = l as u128;
        layers as u128 * (l * (12 * dim + 2 * f) + 3 * h * l * l)
    };
    let (la, lv, lq) = (d.la as u128, d.lv as u128, d.lq as u128);
    let cap =
        |l: u128| (l + lq) * dim * 20 + 3 * h * l * (l + lq) + 2 * m.n_retrieved as u128 * l * dim;
    let floats = enc(d.la, m.expert_layers)
        + enc(d.lv, m.expert_layers)
        + enc(d.lq, m.text_layers)
        + cap(la)
        + cap(lv)
        + 20 * dim * (la + lv + lq);
    floats * F32
}

/// Shapes of the synthetic set `s` would generate (question length, vocabulary and answers
/// bounded from above).
pub fn synthetic_dims(s: &SyntheticConfig) -> DataDims {
    DataDims {
        la: s.la,
        da: s.da,
        lv: s.lv,
        dv: s.dv,
        lq: 16,
        dk: s.dk,
        vocab_size: 64,
        n_answers: 32,
    }
}

/// Bytes of one clip's features and keys.
fn clip_bytes(d: &DataDims) -> u128 {
    ((d.la as u128) * (d.da as u128) + (d.lv as u128) * (d.dv as u128) + 2 * d.dk as u128) * F32
}

/// The estimate for training `cfg` on data of shape `dims` with `train_clips` clips in the
/// bank, the data itself taking `data` bytes.
pub fn estimate(cfg: &TrainConfig, dims: &DataDims, train_clips: u128, data: u128) -> Footprint {
    let m = &cfg.model;
    let per_sample = sample_bytes(m, dims);
    let train_batch = cfg.batch_size as u128 * per_sample * 2;
    let eval_batch = cfg.eval_batch_size as u128 * (per_sample + 2 * train_clips * F32);
    Footprint {
        params: param_count(m, dims),
        data,
        bank: 3 * train_clips * clip_bytes(dims),
        batch: train_batch.max(eval_batch),
    }
}

/// The estimate before any data exists: the synthetic set's shapes and size from its
/// config; for a data directory, the smallest shapes (the model's own sizes only).
fn estimate_before_data(cfg: &TrainConfig) -> Footprint {
    match cfg.data {
        None => {
            let s = &cfg.synthetic;
            let dims = synthetic_dims(s);
            let clips = s.n_train_clips as u128 + s.n_val_clips as u128 + s.n_test_clips as u128;
            let questions = clips * s.questions_per_clip as u128;
            let data = 2 * (clips * clip_bytes(&dims) + questions * (dims.lq as u128 * F32 + 32));
            estimate(cfg, &dims, s.n_train_clips as u128, data)
        }
        Some(_) => {
            let dims = DataDims {
                la: 1,
                da: 1,
                lv: 1,
                dv: 1,
                lq: 1,
                dk: 1,
                vocab_size: 2,
                n_answers: 2,
            };
            estimate(cfg, &dims, 1, 0)
        }
    }
}

/// An option that can make a run too large: its config name, its flag, its value, and a
/// way to put it back to its default.
struct Knob {
    name: &'static str,
    flag: Option<&'static str>,
    value: String,
    reset: fn(&mut TrainConfig),
}

fn knobs(cfg: &TrainConfig) -> Vec<Knob> {
    let m = &cfg.model;
    let s = &cfg.synthetic;
    let mut k = vec![
        Knob {
            name: "model.dim",
            flag: Some("--dim"),
            value: m.dim.to_string(),
            reset: |c| c.model.dim = ModelConfig::default().dim,
        },
        Knob {
            name: "model.ffn_mult",
            flag: None,
            value: m.ffn_mult.to_string(),
            reset: |c| c.model.ffn_mult = ModelConfig::default().ffn_mult,
        },
        Knob {
            name: "model.expert_layers",
            flag: None,
            value: m.expert_layers.to_string(),
            reset: |c| c.model.expert_layers = ModelConfig::default().expert_layers,
        },
        Knob {
            name: "model.text_layers",
            flag: None,
            value: m.text_layers.to_string(),
            reset: |c| c.model.text_layers = ModelConfig::default().text_layers,
        },
        Knob {
            name: "model.heads",
            flag: None,
            value: m.heads.to_string(),
            reset: |c| c.model.heads = ModelConfig::default().heads,
        },
        Knob {
            name: "model.n_retrieved",
            flag: Some("-n"),
            value: m.n_retrieved.to_string(),
            reset: |c| c.model.n_retrieved = ModelConfig::default().n_retrieved,
        },
        Knob {
            name: "batch_size",
            flag: Some("--batch-size"),
            value: cfg.batch_size.to_string(),
            reset: |c| c.batch_size = TrainConfig::default().batch_size,
        },
        Knob {
            name: "eval_batch_size",
            flag: None,
            value: cfg.eval_batch_size.to_string(),
            reset: |c| c.eval_batch_size = TrainConfig::default().eval_batch_size,
        },
    ];
    if cfg.data.is_none() {
        macro_rules! syn {
            ($field:ident, $flag:expr) => {
                k.push(Knob {
                    name: concat!("synthetic.", stringify!($field)),
                    flag: $flag,
                    value: s.$field.to_string(),
                    reset: |c| c.synthetic.$field = SyntheticConfig::default().$field,
                })
            };
        }
        syn!(n_train_clips, Some("--train-clips"));
        syn!(n_val_clips, None);
        syn!(n_test_clips, None);
        syn!(questions_per_clip, None);
        syn!(la, None);
        syn!(da, None);
        syn!(lv, None);
        syn!(dv, None);
        syn!(dk, None);
    }
    k
}

/// Refuse `cfg` when training it needs more than the memory limit; `estimate_of` gives the
/// estimate of a config (with the option under test put back to its default). The error
/// names the option whose default would shrink the estimate the most.
fn refuse_if_too_large(
    cfg: &TrainConfig,
    estimate_of: impl Fn(&TrainConfig) -> Footprint,
    limit: &Limit,
) -> Result<()> {
    let f = estimate_of(cfg);
    let culprit = knobs(cfg)
        .into_iter()
        .map(|k| {
            let mut c = cfg.clone();
            (k.reset)(&mut c);
            (estimate_of(&c).total(), k)
        })
        .min_by_key(|(t, _)| *t)
        .map(|(_, k)| k);
    let what = || {
        let name = match &culprit {
            Some(k) => format!(
                "{} = {}{}: ",
                k.name,
                k.value,
                k.flag.map(|f| format!(" ({f})")).unwrap_or_default()
            ),
            None => String::new(),
        };
        let mb = crate::memory::fmt_bytes;
        format!(
            "{name}training (parameters, gradients and AdamW moments {}, data {}, memory bank {}, largest batch {})",
            mb(f.params * F32 * TRAIN_COPIES),
            mb(f.data),
            mb(f.bank),
            mb(f.batch)
        )
    };
    crate::memory::check_against(limit, f.total(), what, "; lower it")
}

/// The check before any data is loaded or generated: the synthetic set from its config, or
/// the model alone for a data directory.
pub fn check_config(cfg: &TrainConfig) -> Result<()> {
    refuse_if_too_large(cfg, estimate_before_data, &crate::memory::limit()?)
}

/// The check once the data is loaded: its shapes `dims`, `train_clips` clips in the bank,
/// `data` bytes already taken by it.
pub fn check_loaded(
    cfg: &TrainConfig,
    dims: &DataDims,
    train_clips: usize,
    data: u128,
) -> Result<()> {
    let lq = dims.lq.min(MAX_QUESTION_WORDS);
    let dims = DataDims { lq, ..*dims };
    refuse_if_too_large(
        cfg,
        |c| estimate(c, &dims, train_clips as u128, data),
        &crate::memory::limit()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::R2scp;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn actual_params(m: &ModelConfig, d: &DataDims) -> u128 {
        let vm = VarMap::new();
        let vb = crate::trainer::init::seeded_var_builder(&vm, 1, &Device::Cpu);
        R2scp::new(m, d, vb).expect("model");
        let data = vm.data().lock().unwrap();
        data.values()
            .map(|v| v.as_tensor().elem_count() as u128)
            .sum()
    }

    #[test]
    fn the_parameter_estimate_bounds_the_real_count_closely() {
        let d = synthetic_dims(&SyntheticConfig::default());
        let base = ModelConfig::default();
        let wide = ModelConfig {
            dim: 96,
            heads: 4,
            expert_layers: 3,
            ffn_mult: 4,
            ..ModelConfig::default()
        };
        let plain = ModelConfig {
            use_retrieval: false,
            use_cap: false,
            ..ModelConfig::default()
        };
        for m in [base, wide, plain] {
            let (est, real) = (param_count(&m, &d), actual_params(&m, &d));
            assert!(
                est >= real && est <= real + real / 4,
                "estimate {est}, real {real} for {m:?}"
            );
        }
    }

    /// The estimate of the default run, beside the 137 MiB peak the README measured for it
    /// (`cargo test --lib footprint -- --nocapture` prints it).
    #[test]
    fn the_default_run_is_estimated_near_its_measured_peak() {
        let f = estimate_before_data(&TrainConfig::default());
        println!(
            "default run: {f:?}, {}",
            crate::memory::fmt_bytes(f.total())
        );
        assert!((100 << 20..=200 << 20).contains(&f.total()), "{f:?}");
    }

    #[test]
    fn absurd_sizes_name_their_option() {
        let eight_gib = Limit {
            bytes: 8 << 30,
            source: "a test limit".into(),
        };
        for (set, name) in [
            (
                (|c: &mut TrainConfig| c.model.ffn_mult = 1_000_000_000_000)
                    as fn(&mut TrainConfig),
                "model.ffn_mult = 1000000000000",
            ),
            (|c| c.model.dim = 1_000_000, "model.dim = 1000000 (--dim)"),
            (
                |c| c.model.expert_layers = 100_000,
                "model.expert_layers = 100000",
            ),
            (
                |c| c.synthetic.n_train_clips = 1_000_000_000_000,
                "synthetic.n_train_clips = 1000000000000 (--train-clips)",
            ),
        ] {
            let mut c = TrainConfig::default();
            set(&mut c);
            let e = refuse_if_too_large(&c, estimate_before_data, &eight_gib)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(name) && e.contains("needs about") && e.contains("(8.00 GiB)"),
                "{e}"
            );
        }
        refuse_if_too_large(&TrainConfig::default(), estimate_before_data, &eight_gib)
            .expect("the default fits");
    }
}
