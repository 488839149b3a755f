//! criterion benches of the CAP ops: fused CPU path vs plain-candle reference
//! (`cargo bench --bench cap`). The full side-by-side table is `r2scp bench cap`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use r2scp::cap::{
    dissonance_topk, dissonance_topk_reference, gather_inject, gather_inject_reference, topk_rows,
    topk_rows_reference, CapConfig, CapLayer, Context, PaperInputs,
};

fn rand(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
}

fn cap_ops(c: &mut Criterion) {
    let k = 5;
    for &(b, l, d) in &[(1usize, 60usize, 512usize), (64, 60, 512), (64, 180, 1024)] {
        let p = rand(&[b, l, d]);
        let h = rand(&[b, 60, d]);
        let src = rand(&[b, l, d]);
        let scores = rand(&[b, l]);
        let ctx = Context::Tokens {
            h_avl: &h,
            mask: None,
        };
        let noise = dissonance_topk(&p, ctx, k).expect("dissonance").noise_idx;
        let (_, sal) = topk_rows(&scores, k).expect("topk");
        let tag = format!("B{b}_L{l}_D{d}");
        let mut g = c.benchmark_group(format!("cap/{tag}"));
        g.sample_size(20);
        g.bench_function("dissonance_topk/fused", |bn| {
            bn.iter(|| dissonance_topk(&p, ctx, k).expect("op"))
        });
        g.bench_function("dissonance_topk/reference", |bn| {
            bn.iter(|| dissonance_topk_reference(&p, ctx, k).expect("op"))
        });
        g.bench_function("gather_inject/fused", |bn| {
            bn.iter(|| gather_inject(&p, &src, &noise, &sal).expect("op"))
        });
        g.bench_function("gather_inject/reference", |bn| {
            bn.iter(|| gather_inject_reference(&p, &src, &noise, &sal).expect("op"))
        });
        g.bench_function("topk_rows/fused", |bn| {
            bn.iter(|| topk_rows(&scores, k).expect("op"))
        });
        g.bench_function("topk_rows/reference", |bn| {
            bn.iter(|| topk_rows_reference(&scores, k).expect("op"))
        });
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        // the paper's switches (straight-through term included), as in `r2scp bench cap`
        let cfg = CapConfig::paper(d, 8, k);
        let fused = CapLayer::new(&cfg, vb.clone()).expect("layer");
        let reference = CapLayer::new(&cfg, vb)
            .expect("layer")
            .with_reference_ops(true);
        let q = rand(&[b, 12, d]);
        let inputs = PaperInputs {
            h_miss: &p,
            h_avl: &h,
            avl_mask: None,
            h_com: &src,
            com_mask: None,
            q: &q,
            q_mask: None,
        };
        g.bench_function("cap_layer/fused", |bn| {
            bn.iter(|| fused.forward_paper(&inputs).expect("layer"))
        });
        g.bench_function("cap_layer/reference", |bn| {
            bn.iter(|| reference.forward_paper(&inputs).expect("layer"))
        });
        g.finish();
    }
}

criterion_group!(benches, cap_ops);
criterion_main!(benches);
