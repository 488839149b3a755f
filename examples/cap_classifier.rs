//! CAP in a classifier: the noisy-token task.
//!
//! Each sample is a sequence of 12 tokens to classify: 6 tokens of its class and 6 tokens
//! of another class, shuffled, plus 8 clean context tokens of its class. The model is a
//! linear token encoder, a [`CapLayer`] that purifies the 12 tokens against the context
//! (k = 6), a mean pool of the purified tokens and a linear head; it is trained with
//! candle-nn's AdamW. CAP finds the noise when its `noise_idx` hits the 6 foreign tokens
//! (a random pick hits 50%). The program prints test accuracy and that hit share, at
//! initialisation and after training.
//!
//! Run: `cargo run --release --example cap_classifier` (defaults), or add
//! `-- --straight-through` (the straight-through gate on), `-- --no-detach` (phase-1
//! gradients reach the encoder), `-- --seed N`, `-- --steps N`.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use r2scp::cap::{CapConfig, CapContext, CapLayer, PaperInputs};
use r2scp::trainer::init::seeded_var_builder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Sizes and switches of one run of the task.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// Seed of the data and of the initialisation.
    pub seed: u64,
    /// AdamW steps of batch `batch`.
    pub steps: usize,
    /// Training batch size.
    pub batch: usize,
    /// CAP's switches (`dim`, `heads`, `k` are set by the task).
    pub cap: CapConfig,
    /// Where the replacement rows come from.
    pub source: Source,
}

/// Where the rows that replace the noise come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The context tokens (`CapContext::Tokens`).
    Context,
    /// The sequence itself, its noise rows excluded (`CapContext::Pooled` with the
    /// context's mean as the anchor).
    OwnClean,
    /// The sequence itself, noise rows included (the paper form with `h_com` = the
    /// sequence, as this crate's first layer was used on this task).
    OwnAll,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 300,
            batch: 32,
            cap: CapConfig::new(DIM, 4, FOREIGN),
            source: Source::Context,
        }
    }
}

/// Accuracy and noise hit share on the test set.
#[derive(Clone, Copy, Debug)]
pub struct TaskScore {
    /// Share of test samples classified correctly.
    pub accuracy: f64,
    /// Share of `noise_idx` entries that are foreign tokens (chance 0.5).
    pub hit_share: f64,
}

/// What a run measured.
#[derive(Clone, Copy, Debug)]
pub struct TaskReport {
    /// Before training.
    pub init: TaskScore,
    /// After training.
    pub trained: TaskScore,
}

const CLASSES: usize = 8;
const RAW: usize = 32;
const DIM: usize = 32;
const OWN: usize = 6;
const FOREIGN: usize = 6;
const CONTEXT: usize = 8;
/// Std of the per-token noise around a class prototype (prototype entries have std 1).
const TOKEN_NOISE: f32 = 2.0;

/// A batch of the task: sequence [B, 12, RAW], context [B, 8, RAW], labels [B], and the
/// positions of the foreign tokens per sample.
struct Batch {
    seq: Tensor,
    ctx: Tensor,
    labels: Tensor,
    foreign: Vec<Vec<usize>>,
}

struct Task {
    protos: Vec<Vec<f32>>,
    rng: ChaCha8Rng,
}

impl Task {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let protos = (0..CLASSES)
            .map(|_| (0..RAW).map(|_| rng.sample(StandardNormal)).collect())
            .collect();
        Self { protos, rng }
    }

    fn token(&mut self, class: usize, out: &mut Vec<f32>) {
        for i in 0..RAW {
            let e: f32 = self.rng.sample(StandardNormal);
            out.push(self.protos[class][i] + TOKEN_NOISE * e);
        }
    }

    fn batch(&mut self, b: usize, dev: &Device) -> Result<Batch> {
        let l = OWN + FOREIGN;
        let (mut seq, mut ctx, mut labels, mut foreign) = (vec![], vec![], vec![], vec![]);
        for _ in 0..b {
            let y = self.rng.random_range(0..CLASSES);
            let other = (y + self.rng.random_range(1..CLASSES)) % CLASSES;
            let mut order: Vec<usize> = (0..l).collect();
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut self.rng);
            // position p holds an own token when order[p] < OWN
            for &o in &order {
                self.token(if o < OWN { y } else { other }, &mut seq);
            }
            for _ in 0..CONTEXT {
                self.token(y, &mut ctx);
            }
            foreign.push((0..l).filter(|&p| order[p] >= OWN).collect());
            labels.push(y as u32);
        }
        Ok(Batch {
            seq: Tensor::from_vec(seq, (b, l, RAW), dev)?,
            ctx: Tensor::from_vec(ctx, (b, CONTEXT, RAW), dev)?,
            labels: Tensor::from_vec(labels, b, dev)?,
            foreign,
        })
    }
}

struct Model {
    enc: Linear,
    cap: CapLayer,
    head: Linear,
    source: Source,
}

impl Model {
    fn new(cap: &CapConfig, source: Source, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            enc: linear(RAW, DIM, vb.pp("enc"))?,
            cap: CapLayer::new(cap, vb.pp("cap"))?,
            head: linear(DIM, CLASSES, vb.pp("head"))?,
            source,
        })
    }

    /// (logits [B, CLASSES], noise_idx [B, k]).
    fn forward(&self, b: &Batch) -> Result<(Tensor, Tensor)> {
        let xs = self.enc.forward(&b.seq)?;
        let ctx = self.enc.forward(&b.ctx)?;
        let out = match self.source {
            Source::Context => self.cap.purify(&xs, None, CapContext::tokens(&ctx), None)?,
            Source::OwnClean => {
                let g = ctx.mean(1)?;
                self.cap.purify(&xs, None, CapContext::Pooled(&g), None)?
            }
            Source::OwnAll => {
                let q = ctx.mean_keepdim(1)?;
                self.cap.forward_paper(&PaperInputs {
                    h_miss: &xs,
                    h_avl: &ctx,
                    avl_mask: None,
                    h_com: &xs,
                    com_mask: None,
                    q: &q,
                    q_mask: None,
                })?
            }
        };
        let logits = self.head.forward(&out.purified.mean(1)?)?;
        Ok((logits, out.noise_idx))
    }
}

fn score(model: &Model, test: &Batch) -> Result<TaskScore> {
    let (logits, noise) = model.forward(test)?;
    let accuracy = logits
        .argmax(D::Minus1)?
        .eq(&test.labels)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    let picked = noise.to_vec2::<u32>()?;
    let hits: usize = picked
        .iter()
        .zip(&test.foreign)
        .map(|(p, f)| p.iter().filter(|&&i| f.contains(&(i as usize))).count())
        .sum();
    let total: usize = picked.iter().map(Vec::len).sum();
    Ok(TaskScore {
        accuracy,
        hit_share: hits as f64 / total as f64,
    })
}

/// Trains the classifier as `opts` says and scores it on 512 test samples.
pub fn run_task(opts: &TaskOptions, dev: &Device) -> Result<TaskReport> {
    let mut task = Task::new(opts.seed);
    let test = task.batch(512, dev)?;
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, opts.seed, dev);
    let cfg = CapConfig {
        dim: DIM,
        k: FOREIGN,
        ..opts.cap
    };
    let model = Model::new(&cfg, opts.source, vb)?;
    let init = score(&model, &test)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    for _ in 0..opts.steps {
        let b = task.batch(opts.batch, dev)?;
        let (logits, _) = model.forward(&b)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &b.labels)?;
        opt.backward_step(&loss)?;
    }
    let trained = score(&model, &test)?;
    Ok(TaskReport { init, trained })
}

#[allow(dead_code)] // the test includes this file for `run_task`
fn main() -> Result<()> {
    let mut opts = TaskOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name} {v:?}: expected an unsigned integer"))
        };
        match a.as_str() {
            "--straight-through" => opts.cap.straight_through = true,
            "--no-detach" => opts.cap.detach_scoring = false,
            "--residual-gate" => opts.cap.residual_gate = true,
            "--paper" => opts.cap = CapConfig::paper(DIM, 4, FOREIGN),
            "--own-clean" => opts.source = Source::OwnClean,
            "--own-all" => opts.source = Source::OwnAll,
            "--seed" => opts.seed = num("--seed")?,
            "--steps" => opts.steps = num("--steps")? as usize,
            other => anyhow::bail!(
                "unknown argument {other:?}; expected --straight-through, --no-detach, \
                 --residual-gate, --paper, --own-clean, --own-all, --seed N or --steps N"
            ),
        }
    }
    let dev = Device::Cpu;
    println!(
        "noisy-token classifier: {OWN} class tokens + {FOREIGN} foreign tokens, {CONTEXT} context \
         tokens, k = {FOREIGN}; {:?}",
        opts
    );
    let r = run_task(&opts, &dev)?;
    for (when, s) in [("initialisation", r.init), ("trained", r.trained)] {
        println!(
            "{when:>14}: test accuracy {:.1}%, noise_idx hits foreign tokens {:.1}% (chance 50%)",
            100.0 * s.accuracy,
            100.0 * s.hit_share
        );
    }
    Ok(())
}
