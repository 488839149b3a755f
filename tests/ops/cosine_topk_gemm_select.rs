//! The GEMM + select path of cosine_topk (`kernels/cosine_topk_gemm_select.cuh`,
//! `src/retrieve/cosine_topk/gemm_select.rs`) and the exact stage it shares with the
//! tensor-core path (`kernels/cosine_topk_rescore.cuh`, `rescore.rs`), forced whatever the
//! batch, against the bandwidth kernel on the same executor, bit for bit (rows and scores):
//! the rescoring uses the bandwidth kernel's arithmetic. Executors: the emulator (`emu_gemm_*`:
//! candle's CPU matmul stands in for cuBLAS, tf32 read as truncation) and CUDA device 0
//! (`cuda_gemm_*`: cuBLAS; `skipped` without a device). Small chunks (the test knobs) put
//! chunk borders inside small banks.

use super::super::executors::{cosine_topk_cuda_on_path, on_cuda, to_cuda};
use super::*;
use r2scp::retrieve::cosine_topk::cosine_topk_on_path_with;
use r2scp::retrieve::cosine_topk::gemm_select::GemmOverrides;
use r2scp::retrieve::cosine_topk::kernel::Knobs;

/// One call on one path with knobs (the public op's arguments, CPU tensors in and out).
type PathOp = fn(
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    usize,
    Option<&Tensor>,
    Kernel,
    Knobs,
) -> r2scp::Result<(Tensor, Tensor)>;

fn emu_path(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
    path: Kernel,
    knobs: Knobs,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_on_path_with(q, k, kn, n, ex, path, knobs)?.check()
}

fn knobs(g: GemmOverrides) -> Knobs {
    Knobs {
        gemm: g,
        ..Knobs::default()
    }
}

/// The GEMM path with `g` against the bandwidth kernel, both on `op`'s executor.
fn gemm_vs_bandwidth(op: PathOp, c: &Case, d: &Data, g: GemmOverrides, what: &str) {
    let path = if g.fp32 {
        Kernel::GemmFp32
    } else {
        Kernel::Gemm
    };
    let got = op(
        &d.q,
        &d.k,
        d.kn.as_ref(),
        c.n,
        d.ex.as_ref(),
        path,
        knobs(g),
    )
    .unwrap_or_else(|e| panic!("{what}: GEMM path failed on {c:?} {g:?}: {e}"));
    let want = op(
        &d.q,
        &d.k,
        d.kn.as_ref(),
        c.n,
        d.ex.as_ref(),
        Kernel::Bandwidth,
        Knobs::default(),
    )
    .unwrap();
    assert_eq!(got.0.dims(), [c.b, c.n], "{what} {c:?}");
    assert_same(&got, &want, &format!("{what} {c:?} {g:?}"));
}

/// Random cases (banks up to 600 rows, n up to 256), chunks of 128 to 384 rows or the plan's,
/// 1 to 3 select units per query, f32 keys through tf32 and through f32.
fn random_cases(op: PathOp, what: &str, cases: u64) {
    for seed in 7000..7000 + cases {
        let mut c = random_case(seed, 600);
        c.n = c.n.min(256);
        let g = GemmOverrides {
            chunk_rows: [None, Some(128), Some(256), Some(384)][(seed % 4) as usize],
            splits: [None, Some(1), Some(2), Some(3)][((seed / 4) % 4) as usize],
            fp32: c.kdt == DType::F32 && seed % 3 == 0,
            ..GemmOverrides::default()
        };
        gemm_vs_bandwidth(op, &c, &make_data(&c), g, what);
    }
}

#[test]
fn emu_gemm_matches_bandwidth_random_cases() {
    // Emulated calls of both paths take seconds each (every rescoring block runs 128 emulated
    // threads): 7 cases in the plain run, 2 under TSAN.
    random_cases(emu_path, "emulated", (emu_cases() / 30).max(2));
}

#[test]
fn cuda_gemm_matches_bandwidth_random_cases() {
    on_cuda("cuda_gemm_matches_bandwidth_random_cases", || {
        random_cases(cosine_topk_cuda_on_path, "cuda", 60)
    });
}

/// `b` queries and `m` random keys (`d` = 24) with the rows `copies` set to the first query
/// itself (so for it they score the same, at the top).
fn bank_with_copies(seed: u64, b: usize, m: usize, kdt: DType, copies: &[usize]) -> Data {
    let d = 24;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut kv: Vec<f32> = (0..m * d).map(|_| r.random_range(-1.0..1.0f32)).collect();
    let qv: Vec<f32> = (0..b * d).map(|_| r.random_range(-1.0..1.0f32)).collect();
    for &row in copies {
        kv[row * d..(row + 1) * d].copy_from_slice(&qv[..d]);
    }
    Data {
        q: cpu(qv, (b, d)),
        k: cpu(kv, (m, d)).to_dtype(kdt).unwrap(),
        kn: None,
        ex: None,
    }
}

/// Chunk borders: M not a multiple of the chunk, n close to the chunk, equal scores on both
/// sides of a border (the lower row first), the best row excluded at a border, and a NaN in a
/// later chunk (the error names its query and row).
fn chunk_edges(op: PathOp, what: &str) {
    let g = |rows: u32, splits: u32| GemmOverrides {
        chunk_rows: Some(rows),
        splits: Some(splits),
        ..GemmOverrides::default()
    };
    // M = 3 chunks + 37 rows, exclusions at the borders and the last row.
    let c = Case {
        seed: 31,
        b: 5,
        m: 3 * 128 + 37,
        d: 24,
        n: 9,
        kdt: DType::BF16,
        qdt: DType::F32,
        exclude: Some(vec![127, 128, 420, u32::MAX, 256]),
        norms: true,
        dup: true,
    };
    gemm_vs_bandwidth(
        op,
        &c,
        &make_data(&c),
        g(128, 1),
        &format!("{what} ragged M"),
    );
    // n just below, at and above the chunk, and two chunks' worth.
    for n in [127usize, 128, 129, 250] {
        let c = Case {
            seed: 32 + n as u64,
            b: 3,
            m: 600,
            d: 16,
            n,
            kdt: DType::F16,
            qdt: DType::F32,
            exclude: Some(vec![0, 599, u32::MAX]),
            norms: false,
            dup: true,
        };
        gemm_vs_bandwidth(
            op,
            &c,
            &make_data(&c),
            g(128, 2),
            &format!("{what} n = {n}"),
        );
    }
    // Equal scores across the borders 127 | 128 and 255 | 256 (and inside a chunk).
    for kdt in [DType::F32, DType::BF16] {
        let copies = [128usize, 127, 255, 256, 40];
        let mut data = bank_with_copies(33, 4, 300, kdt, &copies);
        let c = Case {
            seed: 33,
            b: 4,
            m: 300,
            d: 24,
            n: 6,
            kdt,
            qdt: DType::F32,
            exclude: None,
            norms: false,
            dup: false,
        };
        gemm_vs_bandwidth(op, &c, &data, g(128, 1), &format!("{what} ties {kdt:?}"));
        let (_, i) = op(
            &data.q,
            &data.k,
            None,
            5,
            None,
            Kernel::Gemm,
            knobs(g(128, 1)),
        )
        .unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap()[0],
            vec![40, 127, 128, 255, 256],
            "{what}"
        );
        // The lowest copy excluded at the border: the next copies move up.
        let ex = vec![127u32, u32::MAX, 128, 5];
        data.ex = Some(Tensor::from_vec(ex.clone(), 4, &Device::Cpu).unwrap());
        let c = Case {
            exclude: Some(ex),
            ..c
        };
        gemm_vs_bandwidth(
            op,
            &c,
            &data,
            g(128, 3),
            &format!("{what} excluded tie {kdt:?}"),
        );
        let (_, i) = op(
            &data.q,
            &data.k,
            None,
            4,
            data.ex.as_ref(),
            Kernel::Gemm,
            knobs(g(128, 1)),
        )
        .unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap()[0],
            vec![40, 128, 255, 256],
            "{what}"
        );
    }
    // A NaN key in the third chunk.
    let mut kv: Vec<f32> = (0..400 * 8).map(|i| ((i * 13 % 17) as f32) - 8.0).collect();
    kv[300 * 8 + 3] = f32::NAN;
    let q = cpu((0..3 * 8).map(|i| (i % 7) as f32 - 3.0).collect(), (3, 8));
    let e = op(
        &q,
        &cpu(kv, (400, 8)),
        None,
        4,
        None,
        Kernel::Gemm,
        knobs(g(128, 1)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("NaN") && e.contains("row 300"), "{what}: {e}");
}

#[test]
fn emu_gemm_chunk_edges() {
    chunk_edges(emu_path, "emulated");
}

#[test]
fn cuda_gemm_chunk_edges() {
    on_cuda("cuda_gemm_chunk_edges", || {
        chunk_edges(cosine_topk_cuda_on_path, "cuda")
    });
}

/// Candidates that overflow (capacity 1 or 40 in the select, 16 in the rescoring with a margin
/// that admits every row) send their queries to the device-side exact fallback: the answer is
/// still the bandwidth kernel's. The fallback keys on the same rows in every chunk size.
fn overflow_falls_back_exactly(op: PathOp, what: &str) {
    for (seed, kdt, g) in [
        (
            41u64,
            DType::BF16,
            GemmOverrides {
                capq: Some(1),
                chunk_rows: Some(128),
                ..GemmOverrides::default()
            },
        ),
        (
            42,
            DType::F32,
            GemmOverrides {
                capq: Some(40),
                ..GemmOverrides::default()
            },
        ),
        (
            43,
            DType::F16,
            GemmOverrides {
                cap: Some(16),
                margin: Some(2.0),
                splits: Some(2),
                ..GemmOverrides::default()
            },
        ),
    ] {
        let c = Case {
            seed,
            b: 19,
            m: 300,
            d: 32,
            n: 9,
            kdt,
            qdt: DType::F32,
            exclude: Some((0..19u32).map(|x| x * 15).collect()),
            norms: true,
            dup: true,
        };
        gemm_vs_bandwidth(op, &c, &make_data(&c), g, &format!("{what} overflow"));
    }
}

#[test]
fn emu_gemm_overflow_falls_back_exactly() {
    overflow_falls_back_exactly(emu_path, "emulated");
}

#[test]
fn cuda_gemm_overflow_falls_back_exactly() {
    on_cuda("cuda_gemm_overflow_falls_back_exactly", || {
        overflow_falls_back_exactly(cosine_topk_cuda_on_path, "cuda")
    });
}

/// Rows closer together than the GEMM's operands can tell apart (bf16, f16, tf32), n cutting
/// through them: with the margin the exact top n. `margin_matters`: with margin 0 the answer
/// is the approximate top n, which differs (shown in the emulator, whose rounding is fixed).
fn near_ties(op: PathOp, what: &str, margin_matters: bool) {
    for (seed, kdt, spread) in NEAR_TIES {
        let (n, b) = (12usize, 5usize);
        let (q, k, ex) = near_tie_data(seed, kdt, spread, b);
        let ex = Tensor::from_vec(ex, b, &Device::Cpu).unwrap();
        let g = GemmOverrides {
            chunk_rows: Some(128),
            ..GemmOverrides::default()
        };
        let want = op(
            &q,
            &k,
            None,
            n,
            Some(&ex),
            Kernel::Bandwidth,
            Knobs::default(),
        )
        .unwrap();
        let got = op(&q, &k, None, n, Some(&ex), Kernel::Gemm, knobs(g)).unwrap();
        assert_same(&got, &want, &format!("{what} {kdt:?} near-ties"));
        if margin_matters {
            let g0 = GemmOverrides {
                margin: Some(0.0),
                ..g
            };
            let approx = op(&q, &k, None, n, Some(&ex), Kernel::Gemm, knobs(g0)).unwrap();
            assert_ne!(
                approx.1.to_vec2::<u32>().unwrap(),
                want.1.to_vec2::<u32>().unwrap(),
                "{what} {kdt:?}: with margin 0 the approximate top n should differ"
            );
        }
    }
}

#[test]
fn emu_gemm_near_ties_at_the_boundary() {
    near_ties(emu_path, "emulated", true);
}

#[test]
fn cuda_gemm_near_ties_at_the_boundary() {
    on_cuda("cuda_gemm_near_ties_at_the_boundary", || {
        near_ties(cosine_topk_cuda_on_path, "cuda", false)
    });
}

/// A deferred call on one path (CPU tensors in; the pending result may live on the device).
type DeferredPathOp = fn(&Tensor, &Tensor, usize, Option<&Tensor>, Knobs) -> PendingTopN;

fn emu_deferred(q: &Tensor, k: &Tensor, n: usize, ex: Option<&Tensor>, kb: Knobs) -> PendingTopN {
    cosine_topk_on_path_with(q, k, None, n, ex, Kernel::Gemm, kb).unwrap()
}

fn cuda_deferred(q: &Tensor, k: &Tensor, n: usize, ex: Option<&Tensor>, kb: Knobs) -> PendingTopN {
    let ex = ex.map(|e| to_cuda(e).unwrap());
    let (q, k) = (to_cuda(q).unwrap(), to_cuda(k).unwrap());
    cosine_topk_on_path_with(&q, &k, None, n, ex.as_ref(), Kernel::Gemm, kb).unwrap()
}

/// The no-sync contract on the GEMM path: calls queue back to back, each keeps its own error
/// word (NaN score, bad exclusion, n = M with an exclusion, also with an overflow answered by
/// the fallback), a failed call's unchecked scores are all NaN, a clean call's checked answer
/// is the bandwidth kernel's (with and without an overflow).
fn deferred_errors(op: DeferredPathOp, bandwidth_op: PathOp, what: &str) {
    let (m, d) = (200usize, 32usize);
    let mut kv: Vec<f32> = (0..m * d).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    let good = cpu(kv.clone(), (m, d));
    kv[173 * d + 1] = f32::NAN;
    let bad = cpu(kv, (m, d));
    let q = cpu((0..3 * d).map(|i| (i % 5) as f32 - 2.0).collect(), (3, d));
    let ex = |v: Vec<u32>| Tensor::from_vec(v, 3, &Device::Cpu).unwrap();
    let (ex_bad, ex_ok, ex_few) = (
        ex(vec![1, 200, u32::MAX]),
        ex(vec![1, 199, u32::MAX]),
        ex(vec![u32::MAX, u32::MAX, 5]),
    );
    let plain = knobs(GemmOverrides {
        chunk_rows: Some(128),
        ..GemmOverrides::default()
    });
    let overflow = knobs(GemmOverrides {
        capq: Some(1),
        ..GemmOverrides::default()
    });
    let nan = op(&q, &bad, 4, None, plain);
    let nan_fallback = op(&q, &bad, 4, None, overflow);
    let bad_ex = op(&q, &good, 4, Some(&ex_bad), plain);
    let few = op(&q, &good, m, Some(&ex_few), plain);
    let ok = op(&q, &good, 4, Some(&ex_ok), plain);
    let ok_fallback = op(&q, &good, 4, Some(&ex_ok), overflow);
    for (p, case) in [
        (&nan, "NaN key"),
        (&nan_fallback, "NaN key, overflow"),
        (&bad_ex, "bad exclusion"),
        (&few, "n = M with an exclusion"),
    ] {
        let s = p
            .unchecked()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            s.iter().all(|x| x.is_nan()),
            "{what}, {case}: unchecked scores {s:?}"
        );
        let w = p.status().expect("device word").to_vec1::<u32>().unwrap();
        assert_ne!(w[0], 0, "{what}, {case}: error word {w:?}");
    }
    let want = bandwidth_op(
        &q,
        &good,
        None,
        4,
        Some(&ex_ok),
        Kernel::Bandwidth,
        Knobs::default(),
    )
    .unwrap();
    for (p, case) in [(ok, "clean"), (ok_fallback, "clean, overflow")] {
        let w = p.status().expect("device word").to_vec1::<u32>().unwrap();
        assert_eq!(w, [0, 0, 0], "{what}, {case}");
        let (s, i) = p.check().unwrap();
        let got = (
            s.to_device(&Device::Cpu).unwrap(),
            i.to_device(&Device::Cpu).unwrap(),
        );
        assert_same(
            &got,
            &want,
            &format!("{what}, {case}: deferred vs bandwidth"),
        );
    }
    let e = bad_ex.check().unwrap_err().to_string();
    assert!(e.contains("exclude[1] = 200"), "{what}: {e}");
    let e = few.check().unwrap_err().to_string();
    assert!(
        e.contains("n = 200") && e.contains("query 2"),
        "{what}: {e}"
    );
    for p in [nan, nan_fallback] {
        let e = p.check().unwrap_err().to_string();
        assert!(e.contains("NaN") && e.contains("row 173"), "{what}: {e}");
    }
}

#[test]
fn emu_gemm_deferred_calls_keep_errors_loud() {
    deferred_errors(emu_deferred, emu_path, "emulated");
}

#[test]
fn cuda_gemm_deferred_calls_keep_errors_loud() {
    on_cuda("cuda_gemm_deferred_calls_keep_errors_loud", || {
        deferred_errors(cuda_deferred, cosine_topk_cuda_on_path, "cuda")
    });
}

/// The default rule sends a batch of 16 queries with 32 dimensions to the GEMM path
/// (`kernel::choose`, unit-tested in kernel.rs): the public emulated op then answers as the
/// bandwidth kernel does, at every key dtype.
#[test]
fn emu_gemm_is_the_default_from_b16() {
    for kdt in [DType::F32, DType::F16, DType::BF16] {
        let c = Case {
            seed: 51,
            b: 16,
            m: 300,
            d: 32,
            n: 7,
            kdt,
            qdt: DType::F32,
            exclude: Some((0..16u32).map(|x| x * 17).collect()),
            norms: false,
            dup: true,
        };
        let d = make_data(&c);
        let auto = cosine_topk_emulated(&d.q, &d.k, None, c.n, d.ex.as_ref()).unwrap();
        let want = bandwidth(&d.q, &d.k, None, c.n, d.ex.as_ref()).unwrap();
        assert_same(&auto, &want, &format!("{kdt:?} default path"));
    }
}

/// Inputs the select's 16-byte loads and the rescoring's cannot take as they are: keys 4 bytes
/// past a 16-byte boundary, key norms likewise (copied by the host to an aligned buffer), and an
/// odd D (rows of the keys and queries misaligned: element loads in the exact dot).
fn unaligned_inputs(op: PathOp, what: &str) {
    let (b, m) = (6usize, 500usize);
    let mut r = ChaCha8Rng::seed_from_u64(61);
    for d in [32usize, 33] {
        let all = cpu(
            (0..(m + 1) * d)
                .map(|_| r.random_range(-1.0..1.0f32))
                .collect(),
            ((m + 1) * d, 1),
        );
        let keys = all.narrow(0, 1, m * d).unwrap().reshape((m, d)).unwrap();
        let q = cpu(
            (0..b * d).map(|_| r.random_range(-1.0..1.0f32)).collect(),
            (b, d),
        );
        let kn_all = key_norms(
            &all.narrow(0, 0, (m + 1) * d)
                .unwrap()
                .reshape((m + 1, d))
                .unwrap(),
        )
        .unwrap();
        let kn = key_norms(&keys).unwrap();
        // The same norms, seen through a view one element into a longer buffer.
        let kn_view = Tensor::cat(&[&kn_all.narrow(0, 0, 1).unwrap(), &kn], 0)
            .unwrap()
            .narrow(0, 1, m)
            .unwrap();
        let g = knobs(GemmOverrides {
            chunk_rows: Some(128),
            ..GemmOverrides::default()
        });
        let want = op(
            &q,
            &keys,
            Some(&kn),
            7,
            None,
            Kernel::Bandwidth,
            Knobs::default(),
        )
        .unwrap();
        let got = op(&q, &keys, Some(&kn_view), 7, None, Kernel::Gemm, g).unwrap();
        assert_same(&got, &want, &format!("{what} D = {d} unaligned"));
    }
}

#[test]
fn emu_gemm_unaligned_inputs() {
    unaligned_inputs(emu_path, "emulated");
}

#[test]
fn cuda_gemm_unaligned_inputs() {
    on_cuda("cuda_gemm_unaligned_inputs", || {
        unaligned_inputs(cosine_topk_cuda_on_path, "cuda")
    });
}
