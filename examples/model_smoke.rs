//! Model smoke run: two-stage training of `r2scp::model::R2scp` on the built-in
//! synthetic data with a plain AdamW loop, then test accuracy in the three
//! evaluation settings. This is a check that the model can learn, not the trainer
//! (that is `r2scp train`).
//!
//! Usage: `cargo run --release --example model_smoke -- [retrieval 0|1] [cap 0|1]
//! [stage1 epochs] [stage2 epochs] [seed] [k] [n] [com_adapter 0|1]
//! [stage-I cache file]`; with a cache file that exists, stage I is loaded from it
//! instead of trained (it is written after stage I otherwise)., all optional (defaults
//! 1 1 4 4 0 and the `ModelConfig` defaults for k and n).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use r2scp::data::{
    batches, generate, Batch, MissingPolicy, MissingSim, MissingType, Modality, SyntheticConfig,
};
use r2scp::model::{is_expert_var, Banks, ForwardOptions, ModelConfig, R2scp};
use std::time::Instant;

/// Per-sample cross-entropy [B] of logits [B, A] against targets [B] u32.
fn ce_rows(logits: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    lsm.gather(&target.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Mean of v [B] weighted by w [B] (0/1).
fn wmean(v: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let den = w.sum_all()?.to_scalar::<f32>()?.max(1.0);
    (v * w)?.sum_all()? / den as f64
}

fn accuracy(logits: &Tensor, target: &Tensor) -> candle_core::Result<(usize, usize)> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let t = target.to_vec1::<u32>()?;
    Ok((pred.iter().zip(&t).filter(|(a, b)| a == b).count(), t.len()))
}

fn arg(i: usize, default: u64) -> Result<u64> {
    match std::env::args().nth(i) {
        Some(s) => s
            .parse()
            .with_context(|| format!("argument {i}: {s:?} is not a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let use_retrieval = arg(1, 1)? != 0;
    let use_cap = arg(2, 1)? != 0;
    let e1 = arg(3, 4)? as usize;
    let e2 = arg(4, 4)? as usize;
    let seed = arg(5, 0)?;
    let k_purge = arg(6, ModelConfig::default().k_purge as u64)? as usize;
    let n_retrieved = arg(7, ModelConfig::default().n_retrieved as u64)? as usize;
    let com_adapter = arg(8, ModelConfig::default().com_adapter as u64)? != 0;
    let cache = std::env::args().nth(9).map(std::path::PathBuf::from);
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let splits = generate(&SyntheticConfig {
        seed,
        ..Default::default()
    })?;
    let dims = splits.dims();
    println!("data {:?} in {:.1}s", dims, t0.elapsed().as_secs_f32());
    let cfg = ModelConfig {
        use_retrieval,
        use_cap,
        seed,
        k_purge,
        n_retrieved,
        com_adapter,
        ..Default::default()
    };
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = R2scp::new(&cfg, &dims, vb)?;
    let banks = Banks::from_dataset(&splits.train, &dev)?;
    let all = varmap.all_vars();
    println!(
        "{} vars, {} params",
        all.len(),
        all.iter().map(|v| v.elem_count()).sum::<usize>()
    );
    let bs = 64;
    let sim = MissingPolicy::Simulated(MissingSim {
        rate: 0.5,
        kind: MissingType::Mixed,
        seed,
    });

    // Stage I: every var (the stage-II vars get no gradient from expert_logits).
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let cached = cache.as_ref().is_some_and(|p| p.exists());
    if let (true, Some(p)) = (cached, cache.as_ref()) {
        varmap.load(p)?;
        println!("stage I loaded from {}", p.display());
    }
    for ep in 0..if cached { 0 } else { e1 } {
        let t = Instant::now();
        let (mut la, mut n) = (0f32, 0usize);
        let mut acc = [0usize; 3];
        let mut tot = [0usize; 3];
        for b in batches(&splits.train, bs, Some(seed + ep as u64), sim, &dev) {
            let b: Batch = b?;
            let el = model.expert_logits(&b, true)?;
            let loss = ((wmean(&ce_rows(&el.audio, &b.answer)?, &el.audio_present)?
                + wmean(&ce_rows(&el.visual, &b.answer)?, &el.visual_present)?)?
                + ce_rows(&el.text, &b.answer)?.mean_all()?)?;
            opt.backward_step(&loss)?;
            la += loss.to_scalar::<f32>()?;
            n += 1;
            for (i, l) in [&el.audio, &el.visual, &el.text].iter().enumerate() {
                let (c, t) = accuracy(l, &b.answer)?;
                acc[i] += c;
                tot[i] += t;
            }
        }
        println!(
            "stage1 ep {ep} loss {:.3} train acc a {:.3} v {:.3} t {:.3} ({:.1}s)",
            la / n as f32,
            acc[0] as f32 / tot[0] as f32,
            acc[1] as f32 / tot[1] as f32,
            acc[2] as f32 / tot[2] as f32,
            t.elapsed().as_secs_f32()
        );
    }

    if let (false, Some(p)) = (cached, cache.as_ref()) {
        varmap.save(p)?;
    }

    // Stage II: experts frozen, only non-expert vars optimised.
    model.set_experts_frozen(true);
    let data = varmap.data().lock().expect("varmap lock");
    let stage2: Vec<_> = data
        .iter()
        .filter(|(k, _)| !is_expert_var(k))
        .map(|(_, v)| v.clone())
        .collect();
    drop(data);
    let mut opt = AdamW::new(
        stage2,
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let lambda = 0.1;
    for ep in 0..e2 {
        let t = Instant::now();
        let (mut la, mut n, mut c, mut tt) = (0f32, 0usize, 0usize, 0usize);
        for b in batches(&splits.train, bs, Some(1000 + seed + ep as u64), sim, &dev) {
            let b: Batch = b?;
            let out = model.forward_with(
                &b,
                &banks,
                ForwardOptions {
                    train: true,
                    rank_terms: use_retrieval,
                },
            )?;
            let mut loss = ce_rows(&out.logits, &b.answer)?.mean_all()?;
            if let Some(r) = &out.rank {
                let y = b.answer.index_select(&r.rows_t, 0)?;
                let gt = ce_rows(&r.logits_gt, &y)?;
                let pos = ce_rows(&r.logits_pos, &y)?;
                let neg = ce_rows(&r.logits_neg, &y)?;
                let lp = (&gt - &pos)?.relu()?.mean_all()?;
                let ln = (&pos - &neg)?.relu()?.mean_all()?;
                loss = (loss + ((lp + ln)? * lambda)?)?;
            }
            opt.backward_step(&loss)?;
            la += loss.to_scalar::<f32>()?;
            n += 1;
            let (cc, t2) = accuracy(&out.logits, &b.answer)?;
            c += cc;
            tt += t2;
        }
        let mut miss_acc = Vec::new();
        for m in Modality::ALL {
            let (mut cm, mut tm) = (0, 0);
            for b in batches(&splits.val, 256, None, MissingPolicy::All(m), &dev) {
                let b = b?;
                let (cc, t2) = accuracy(&model.forward(&b, &banks, false)?.logits, &b.answer)?;
                cm += cc;
                tm += t2;
            }
            miss_acc.push(cm as f32 / tm as f32);
        }
        println!(
            "stage2 ep {ep} loss {:.3} train acc {:.3} val acc missing a {:.3} v {:.3} ({:.1}s)",
            la / n as f32,
            c as f32 / tt as f32,
            miss_acc[0],
            miss_acc[1],
            t.elapsed().as_secs_f32()
        );
    }

    for policy in MissingPolicy::EVAL_SETTINGS {
        let (mut c, mut t) = (0, 0);
        let mut alpha_sum = Tensor::zeros(3, DType::F32, &dev)?;
        for b in batches(&splits.test, 256, None, policy, &dev) {
            let b = b?;
            let out = model.forward(&b, &banks, false)?;
            let (cc, tt) = accuracy(&out.logits, &b.answer)?;
            c += cc;
            t += tt;
            alpha_sum = (alpha_sum + out.router_weights.sum(0)?)?;
        }
        let alpha = (alpha_sum / t as f64)?.to_vec1::<f32>()?;
        println!(
            "test {:?}: acc {:.4} ({c}/{t}) router a/v/t {:.2} {:.2} {:.2}",
            policy,
            c as f32 / t as f32,
            alpha[0],
            alpha[1],
            alpha[2]
        );
    }
    println!("total {:.1}s", t0.elapsed().as_secs_f32());
    Ok(())
}
