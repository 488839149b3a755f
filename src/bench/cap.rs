//! `r2scp bench cap`: each fused CAP op and the whole `CapLayer` forward against the
//! plain-candle reference composition, in one side-by-side table.

use super::{time_best_pair, Table};
use crate::cap::{
    dissonance_topk, dissonance_topk_reference, gather_inject, gather_inject_reference, topk_rows,
    topk_rows_reference, CapConfig, CapLayer, Context,
};
use anyhow::{bail, Context as _};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Options of `r2scp bench cap`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Batch sizes B (comma list).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub b: Vec<usize>,
    /// Retrieved tokens L per sample (comma list); also the H_com length Lc.
    #[arg(long, value_delimiter = ',', default_value = "10,60,180")]
    pub l: Vec<usize>,
    /// Feature sizes D (comma list).
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    pub d: Vec<usize>,
    /// Purification budget k.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Available-modality tokens La.
    #[arg(long, default_value_t = 60)]
    pub la: usize,
    /// Question tokens Lq (CapLayer rows).
    #[arg(long, default_value_t = 12)]
    pub lq: usize,
    /// Attention heads of the CapLayer rows.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// dtype of the inputs: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed repetitions per cell (best is reported), after one warm-up.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Skip the CapLayer rows (they dominate the run time at D = 1024).
    #[arg(long)]
    pub skip_layer: bool,
    /// Device: `cpu` or `cuda` (needs the `cuda` feature and a GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

fn rand_tensor(shape: &[usize], seed: u64, dt: DType, dev: &Device) -> anyhow::Result<Tensor> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dt)?)
}

fn ms(t: Duration) -> String {
    format!("{:.3}", t.as_secs_f64() * 1e3)
}

/// Times `f` and `g` alternately, rep by rep (synchronising the device after each call),
/// and returns the best time of each. Timed one variant after the other, the whole-layer
/// row read 0.6x; alternating, 1.2x (BENCHMARKS.md, CAP ops).
fn timed_pair(
    reps: usize,
    dev: &Device,
    mut f: impl FnMut() -> candle_core::Result<()>,
    mut g: impl FnMut() -> candle_core::Result<()>,
) -> anyhow::Result<(Duration, Duration)> {
    let mut err = None;
    let mut keep = |r: candle_core::Result<()>| {
        if let Err(e) = r {
            err.get_or_insert(e);
        }
    };
    let (tf, tg, rf) = time_best_pair(
        reps,
        || f().and_then(|_| dev.synchronize()),
        || keep(g().and_then(|_| dev.synchronize())),
    );
    rf?;
    if let Some(e) = err {
        return Err(e.into());
    }
    Ok((tf, tg))
}

impl Args {
    /// Every size at least 1, `--k` at most every `--l`, `--heads` dividing every `--d`, and
    /// the largest cell's tensors within the memory limit ([`crate::memory`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        for (flag, list) in [("--b", &self.b), ("--l", &self.l), ("--d", &self.d)] {
            if list.is_empty() {
                bail!("bench cap {flag}: expected at least one size");
            }
            if list.contains(&0) {
                bail!("bench cap {flag} 0: expected sizes of at least 1");
            }
        }
        for (flag, v) in [
            ("--k", self.k),
            ("--la", self.la),
            ("--lq", self.lq),
            ("--heads", self.heads),
            ("--reps", self.reps),
        ] {
            if v == 0 {
                bail!("bench cap {flag} 0: expected at least 1");
            }
        }
        if let Some(&l) = self.l.iter().find(|&&l| l < self.k) {
            bail!("bench cap --k {} exceeds --l {l}", self.k);
        }
        if let Some(&d) = self.d.iter().find(|&&d| d % self.heads != 0) {
            bail!("bench cap --heads {} does not divide --d {d}", self.heads);
        }
        let max = |v: &[usize]| *v.iter().max().expect("checked") as u128;
        let (b, l, d) = (max(&self.b), max(&self.l), max(&self.d));
        let (la, lq, h) = (self.la as u128, self.lq as u128, self.heads as u128);
        // Inputs and the layer's activations: tokens x D, and attention maps per head.
        let floats = b * ((l + la + lq) * d * 16 + h * (l + lq) * (l + la + lq) * 4);
        crate::memory::check(
            floats * 4,
            || format!("bench cap --b {b} --l {l} --d {d}: the inputs and the layer's activations"),
            "; lower --b, --l or --d",
        )
    }
}

/// Times each fused CAP op and the `CapLayer` forward against their references, rep by
/// rep alternately, and prints one table.
pub fn compare(args: &Args) -> anyhow::Result<()> {
    args.validate()?;
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("bench cap --device cuda")?,
        other => bail!("bench cap: device `{other}` is not cpu or cuda"),
    };
    let dt = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("bench cap: dtype `{other}` is not one of f32, f16, bf16"),
    };
    let k = args.k;
    println!(
        "bench cap: device {}, {} threads, dtype {:?}, k = {k}, La = {}, Lq = {}, heads = {}, best of {} reps",
        args.device,
        rayon::current_num_threads(),
        dt,
        args.la,
        args.lq,
        args.heads,
        args.reps
    );
    let mut table = Table::new(&["op", "B", "L", "D", "fused ms", "reference ms", "speedup"]);
    let mut seed = args.seed;
    let mut next = || {
        seed += 1;
        seed
    };
    for &b in &args.b {
        for &l in &args.l {
            if k > l {
                bail!("bench cap: k = {k} exceeds L = {l}");
            }
            for &d in &args.d {
                let p = rand_tensor(&[b, l, d], next(), dt, &dev)?;
                let h = rand_tensor(&[b, args.la, d], next(), dt, &dev)?;
                let ctx = Context::Tokens {
                    h_avl: &h,
                    mask: None,
                };
                let src = rand_tensor(&[b, l, d], next(), dt, &dev)?;
                let scores = rand_tensor(&[b, l], next(), DType::F32, &dev)?;
                let noise = dissonance_topk(&p, ctx, k)?.noise_idx;
                let (_, sal) = topk_rows(&scores, k)?;
                let mut add = |op: &str, f: Duration, r: Duration| {
                    table.row(vec![
                        op.to_string(),
                        b.to_string(),
                        l.to_string(),
                        d.to_string(),
                        ms(f),
                        ms(r),
                        format!("{:.1}x", r.as_secs_f64() / f.as_secs_f64()),
                    ]);
                };
                let (f, r) = timed_pair(
                    args.reps,
                    &dev,
                    || dissonance_topk(&p, ctx, k).map(|_| ()).map_err(Into::into),
                    || {
                        dissonance_topk_reference(&p, ctx, k)
                            .map(|_| ())
                            .map_err(Into::into)
                    },
                )?;
                add("dissonance_topk", f, r);
                let (f, r) = timed_pair(
                    args.reps,
                    &dev,
                    || {
                        gather_inject(&p, &src, &noise, &sal)
                            .map(|_| ())
                            .map_err(Into::into)
                    },
                    || {
                        gather_inject_reference(&p, &src, &noise, &sal)
                            .map(|_| ())
                            .map_err(Into::into)
                    },
                )?;
                add("gather_inject", f, r);
                let (f, r) = timed_pair(
                    args.reps,
                    &dev,
                    || topk_rows(&scores, k).map(|_| ()).map_err(Into::into),
                    || {
                        topk_rows_reference(&scores, k)
                            .map(|_| ())
                            .map_err(Into::into)
                    },
                )?;
                add("topk_rows", f, r);
                if !args.skip_layer {
                    let vm = VarMap::new();
                    let vb = VarBuilder::from_varmap(&vm, dt, &dev);
                    let cfg = CapConfig {
                        dim: d,
                        heads: args.heads,
                        k,
                    };
                    let fused = CapLayer::new(&cfg, vb.clone())?;
                    let reference = CapLayer::new(&cfg, vb)?.with_reference_ops(true);
                    let q = rand_tensor(&[b, args.lq, d], next(), dt, &dev)?;
                    let run_layer = |layer: &CapLayer| {
                        layer
                            .forward(&p, &h, None, &src, None, &q, None)
                            .map(|_| ())
                    };
                    let (f, r) = timed_pair(
                        args.reps,
                        &dev,
                        || run_layer(&fused),
                        || run_layer(&reference),
                    )?;
                    add("CapLayer forward", f, r);
                }
            }
        }
    }
    print!("{}", table.render());
    Ok(())
}
