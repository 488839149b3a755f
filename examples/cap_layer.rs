//! CapLayer as a drop-in layer: a small candle model (CAP -> mean pool -> linear head) trained
//! for a few AdamW steps on a synthetic task where some retrieved tokens are noise.
//!
//! Run: `cargo run --release --example cap_layer` (CPU), or with `--features cuda` on a
//! machine with a GPU (it uses CUDA device 0 when available).

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use r2scp::cap::{CapConfig, CapLayer};

struct Model {
    cap: CapLayer,
    head: Linear,
}

impl Model {
    fn new(dim: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        let cap = CapLayer::new(
            &CapConfig {
                dim,
                heads: 4,
                k: 3,
            },
            vb.pp("cap"),
        )?;
        let head = linear(dim, classes, vb.pp("head"))?;
        Ok(Self { cap, head })
    }

    fn forward(
        &self,
        h_miss: &Tensor,
        h_avl: &Tensor,
        h_com: &Tensor,
        q: &Tensor,
    ) -> Result<Tensor> {
        let out = self
            .cap
            .forward(h_miss, h_avl, None, h_com, None, q, None)?;
        Ok(self.head.forward(&out.purified.mean(1)?)?)
    }
}

fn main() -> Result<()> {
    let dev = Device::cuda_if_available(0)?;
    let (b, l, la, lc, lq, dim, classes) = (16, 12, 8, 10, 6, 32, 4);
    println!("cap_layer example on {dev:?}");
    // class prototypes; clean tokens are noisy copies of the sample's prototype, 3 of the L
    // retrieved tokens per sample are pure noise.
    let protos = Tensor::randn(0f32, 1.0, (classes, dim), &dev)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % classes as u32).collect();
    let y = Tensor::from_vec(labels.clone(), b, &dev)?;
    let proto_b = protos.index_select(&y, 0)?.unsqueeze(1)?; // [B, 1, D]
    let around = |n: usize, s: f64| -> Result<Tensor> {
        Ok(proto_b.broadcast_add(&(Tensor::randn(0f32, 1.0, (b, n, dim), &dev)? * s)?)?)
    };
    let noise_rows = Tensor::randn(0f32, 3.0, (b, 3, dim), &dev)?;
    let h_miss = Tensor::cat(&[around(l - 3, 0.5)?, noise_rows], 1)?;
    let h_avl = around(la, 0.5)?;
    let h_com = around(lc, 0.5)?;
    let q = Tensor::randn(0f32, 1.0, (b, lq, dim), &dev)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Model::new(dim, classes, vb)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    let w_proj = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?
        .get("cap.w_proj.weight")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no cap.w_proj.weight"))?;
    let w0 = w_proj.as_tensor().copy()?;
    for step in 0..20 {
        let logits = model.forward(&h_miss, &h_avl, &h_com, &q)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&loss)?;
        if step % 5 == 0 || step == 19 {
            let acc = logits
                .argmax(D::Minus1)?
                .eq(&y)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            println!(
                "step {step:2}: loss {:.4}, train accuracy {acc:.2}",
                loss.to_scalar::<f32>()?
            );
        }
    }
    let moved = (w_proj.as_tensor() - w0)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!("W_proj moved by up to {moved:.2e} (straight-through gate from delta)");
    let out = model
        .cap
        .forward(&h_miss, &h_avl, None, &h_com, None, &q, None)?;
    println!(
        "noise indices of sample 0: {:?} (rows 9, 10, 11 are the injected noise)",
        out.noise_idx.get(0)?.to_vec1::<u32>()?
    );
    Ok(())
}
