//! CapLayer in the paper's four-input form: a small candle model (CAP -> mean pool ->
//! linear head) trained for a few AdamW steps on a synthetic task where 3 of the 12
//! retrieved tokens of every sample are pure noise. Prints accuracy and the precision and
//! recall of CAP's `noise_idx` (k = 3) against the 3 noise rows, at initialisation and
//! after training, with the straight-through gate off (the default) and on.
//!
//! Run: `cargo run --release --example cap_layer` (CPU), or with `--features cuda` on a
//! machine with a GPU (it uses CUDA device 0 when available).

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use r2scp::cap::{CapConfig, CapLayer, PaperInputs};

const NOISE_ROWS: usize = 3;

struct Model {
    cap: CapLayer,
    head: Linear,
}

struct Data {
    h_miss: Tensor,
    h_avl: Tensor,
    h_com: Tensor,
    q: Tensor,
    y: Tensor,
}

impl Model {
    fn new(cfg: &CapConfig, classes: usize, vb: VarBuilder) -> Result<Self> {
        let cap = CapLayer::new(cfg, vb.pp("cap"))?;
        let head = linear(cfg.dim, classes, vb.pp("head"))?;
        Ok(Self { cap, head })
    }

    /// (logits, noise_idx).
    fn forward(&self, x: &Data) -> Result<(Tensor, Tensor)> {
        let out = self.cap.forward_paper(&PaperInputs {
            h_miss: &x.h_miss,
            h_avl: &x.h_avl,
            avl_mask: None,
            h_com: &x.h_com,
            com_mask: None,
            q: &x.q,
            q_mask: None,
        })?;
        Ok((self.head.forward(&out.purified.mean(1)?)?, out.noise_idx))
    }
}

/// (accuracy, precision, recall) of the model on `x`, whose last NOISE_ROWS rows of
/// `h_miss` are the noise.
fn score(model: &Model, x: &Data, l: usize) -> Result<(f32, f64, f64)> {
    let (logits, noise) = model.forward(x)?;
    let acc = logits
        .argmax(D::Minus1)?
        .eq(&x.y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    let picked = noise.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
    let hits: usize = picked
        .iter()
        .map(|r| r.iter().filter(|&&i| i as usize >= l - NOISE_ROWS).count())
        .sum();
    let total: usize = picked.iter().map(Vec::len).sum();
    let precision = hits as f64 / total as f64;
    let recall = hits as f64 / (picked.len() * NOISE_ROWS) as f64;
    Ok((acc, precision, recall))
}

fn main() -> Result<()> {
    let dev = Device::cuda_if_available(0)?;
    let (b, l, la, lc, lq, dim, classes) = (16, 12, 8, 10, 6, 32, 4);
    println!("cap_layer example on {dev:?}");
    // class prototypes; clean tokens are noisy copies of the sample's prototype, the last 3
    // of the L retrieved tokens per sample are pure noise.
    let protos = Tensor::randn(0f32, 1.0, (classes, dim), &dev)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % classes as u32).collect();
    let y = Tensor::from_vec(labels, b, &dev)?;
    let proto_b = protos.index_select(&y, 0)?.unsqueeze(1)?; // [B, 1, D]
    let around = |n: usize, s: f64| -> Result<Tensor> {
        Ok(proto_b.broadcast_add(&(Tensor::randn(0f32, 1.0, (b, n, dim), &dev)? * s)?)?)
    };
    let noise_rows = Tensor::randn(0f32, 3.0, (b, NOISE_ROWS, dim), &dev)?;
    let data = Data {
        h_miss: Tensor::cat(&[around(l - NOISE_ROWS, 0.5)?, noise_rows], 1)?,
        h_avl: around(la, 0.5)?,
        h_com: around(lc, 0.5)?,
        q: Tensor::randn(0f32, 1.0, (b, lq, dim), &dev)?,
        y,
    };
    println!(
        "precision / recall of noise_idx (k = {NOISE_ROWS}) against the {NOISE_ROWS} noise rows \
         (chance {:.0}% / {:.0}%)",
        100.0 * NOISE_ROWS as f64 / l as f64,
        100.0 * NOISE_ROWS as f64 / l as f64
    );
    for st in [false, true] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = CapConfig::new(dim, 4, NOISE_ROWS).with_straight_through(st);
        let model = Model::new(&cfg, classes, vb)?;
        let (a0, p0, r0) = score(&model, &data, l)?;
        let mut opt = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: 3e-3,
                ..Default::default()
            },
        )?;
        for _ in 0..20 {
            let (logits, _) = model.forward(&data)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &data.y)?;
            opt.backward_step(&loss)?;
        }
        let (a1, p1, r1) = score(&model, &data, l)?;
        println!(
            "straight-through {:>3}: initialisation accuracy {:.2}, precision {:.0}%, recall {:.0}%; \
             after 20 AdamW steps accuracy {:.2}, precision {:.0}%, recall {:.0}%",
            if st { "on" } else { "off" },
            a0,
            100.0 * p0,
            100.0 * r0,
            a1,
            100.0 * p1,
            100.0 * r1
        );
    }
    Ok(())
}
