//! criterion: fused `cosine_topk` vs the candle reference on the CPU.
//! `cargo bench --bench retrieve`. The side-by-side table with bandwidth and FAISS ratios
//! is `r2scp bench retrieve` (see BENCHMARKS.md).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use r2scp::retrieve::{cosine_topk, cosine_topk_reference, key_norms};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (m, d, n) = (100_000usize, 256usize, 8usize);
    let keys32 = Tensor::randn(0f32, 1.0, (m, d), &dev).expect("keys");
    for dt in [DType::F32, DType::F16] {
        let keys = keys32.to_dtype(dt).expect("dtype");
        let norms = key_norms(&keys).expect("norms");
        let mut g = c.benchmark_group(format!("cosine_topk_m{m}_d{d}_{dt:?}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes((m * d * dt.size_in_bytes()) as u64));
        for b in [1usize, 64] {
            let q = Tensor::randn(0f32, 1.0, (b, d), &dev).expect("queries");
            g.bench_with_input(BenchmarkId::new("fused", b), &b, |bn, _| {
                bn.iter(|| cosine_topk(&q, &keys, Some(&norms), n, None).expect("fused"))
            });
            g.bench_with_input(BenchmarkId::new("reference", b), &b, |bn, _| {
                bn.iter(|| {
                    cosine_topk_reference(&q, &keys, Some(&norms), n, None).expect("reference")
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
