//! cosine_topk: fused CPU path, emulated CUDA kernel and the op on a CUDA device against the
//! candle reference.
//!
//! Test names starting with `emu_` run the kernels through the CUDA emulator; `.ci/run`
//! reruns exactly those under ThreadSanitizer. Names starting with `cuda_` run the public op
//! on CUDA device 0 (`super::executors`), or print that they were skipped.

use super::common::emu_cases;
use super::executors::{cosine_topk_cuda, cosine_topk_deferred_cuda, on_cuda};
use candle_core::{DType, Device, Tensor};
use r2scp::kernel::abi::COS_EPS;
use r2scp::retrieve::cosine_topk::kernel::{Kernel, KMAX};
use r2scp::retrieve::cosine_topk::tensor_core::TcOverrides;
use r2scp::retrieve::cosine_topk::{
    cosine_topk_deferred_emulated_with, cosine_topk_emulated_with, cosine_topk_reference_chunked,
    tensor_core,
};
use r2scp::retrieve::{
    cosine_topk, cosine_topk_deferred_emulated, cosine_topk_emulated, cosine_topk_reference,
    key_norms, PendingTopN,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Op = fn(
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    usize,
    Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)>;

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    b: usize,
    m: usize,
    d: usize,
    n: usize,
    kdt: DType,
    qdt: DType,
    exclude: Option<Vec<u32>>,
    norms: bool,
    dup: bool,
}

struct Data {
    q: Tensor,
    k: Tensor,
    kn: Option<Tensor>,
    ex: Option<Tensor>,
}

fn random_case(seed: u64, m_max: usize) -> Case {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let b = r.random_range(1..70usize);
    let m = match r.random_range(0..4) {
        0 => r.random_range(1..8usize),
        _ => r.random_range(1..=m_max),
    };
    let d = match r.random_range(0..3) {
        0 => r.random_range(1..9usize),
        1 => 2 * r.random_range(1..40usize),
        _ => 2 * r.random_range(1..40usize) + 1,
    };
    let kdt = [DType::F32, DType::F16, DType::BF16][r.random_range(0..3)];
    let qdt = if r.random_bool(0.5) { DType::F32 } else { kdt };
    let exclude = if m > 1 && r.random_bool(0.5) {
        Some(
            (0..b)
                .map(|_| {
                    if r.random_bool(0.7) {
                        r.random_range(0..m as u32)
                    } else {
                        u32::MAX
                    }
                })
                .collect(),
        )
    } else {
        None
    };
    let left = if exclude.is_some() { m - 1 } else { m };
    let n = match r.random_range(0..3) {
        0 => left,
        _ => r.random_range(1..=left.min(16)),
    };
    Case {
        seed,
        b,
        m,
        d,
        n,
        kdt,
        qdt,
        exclude,
        norms: r.random_bool(0.5),
        dup: r.random_bool(0.4),
    }
}

fn make_data(c: &Case) -> Data {
    let mut r = ChaCha8Rng::seed_from_u64(c.seed ^ 0x9e37_79b9);
    let mut kv: Vec<f32> = (0..c.m * c.d)
        .map(|_| r.random_range(-1.0..1.0f32))
        .collect();
    if c.dup && c.m > 1 {
        // duplicated rows (exact ties) and one zero row (scores 0)
        for _ in 0..(c.m / 3).max(1) {
            let src = r.random_range(0..c.m);
            let dst = r.random_range(0..c.m);
            let row: Vec<f32> = kv[src * c.d..(src + 1) * c.d].to_vec();
            kv[dst * c.d..(dst + 1) * c.d].copy_from_slice(&row);
        }
        let z = r.random_range(0..c.m);
        kv[z * c.d..(z + 1) * c.d].fill(0.0);
    }
    let qv: Vec<f32> = (0..c.b * c.d)
        .map(|_| r.random_range(-1.0..1.0f32))
        .collect();
    let k = Tensor::from_vec(kv, (c.m, c.d), &Device::Cpu)
        .unwrap()
        .to_dtype(c.kdt)
        .unwrap();
    let q = Tensor::from_vec(qv, (c.b, c.d), &Device::Cpu)
        .unwrap()
        .to_dtype(c.qdt)
        .unwrap();
    let kn = c.norms.then(|| key_norms(&k).unwrap());
    let ex = c
        .exclude
        .as_ref()
        .map(|e| Tensor::from_vec(e.clone(), c.b, &Device::Cpu).unwrap());
    Data { q, k, kn, ex }
}

/// Score of (query, row) in f64 from the same (dtype-rounded) inputs.
fn exact_score(q: &[Vec<f32>], k: &[Vec<f32>], qi: usize, row: usize) -> f64 {
    let (a, b) = (&q[qi], &k[row]);
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb + COS_EPS as f64)
}

const TOL: f32 = 2e-5;

fn compare(c: &Case, data: &Data, op: Op, what: &str) {
    let (s, i) = op(&data.q, &data.k, data.kn.as_ref(), c.n, data.ex.as_ref())
        .unwrap_or_else(|e| panic!("{what} failed on {c:?}: {e}"));
    let (rs, ri) =
        cosine_topk_reference(&data.q, &data.k, data.kn.as_ref(), c.n, data.ex.as_ref()).unwrap();
    assert_eq!(s.dims(), [c.b, c.n], "{what} {c:?}");
    assert_eq!(i.dims(), [c.b, c.n], "{what} {c:?}");
    assert_eq!(s.dtype(), DType::F32);
    assert_eq!(i.dtype(), DType::U32);
    let s = s.to_vec2::<f32>().unwrap();
    let i = i.to_vec2::<u32>().unwrap();
    let rs = rs.to_vec2::<f32>().unwrap();
    let ri = ri.to_vec2::<u32>().unwrap();
    let qf = data
        .q
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let kf = data
        .k
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for qi in 0..c.b {
        let ex = c.exclude.as_ref().map(|e| e[qi]).unwrap_or(u32::MAX);
        let mut seen = std::collections::HashSet::new();
        for j in 0..c.n {
            let (sc, ix) = (s[qi][j], i[qi][j]);
            assert!((ix as usize) < c.m, "{what} {c:?}: index {ix} out of range");
            assert_ne!(ix, ex, "{what} {c:?}: excluded row returned for query {qi}");
            assert!(
                seen.insert(ix),
                "{what} {c:?}: row {ix} twice for query {qi}"
            );
            assert!(
                (sc - rs[qi][j]).abs() <= TOL,
                "{what} {c:?}: q {qi} pos {j}: score {sc} vs reference {}",
                rs[qi][j]
            );
            let ex_sc = exact_score(&qf, &kf, qi, ix as usize);
            assert!(
                (sc as f64 - ex_sc).abs() <= TOL as f64,
                "{what} {c:?}: q {qi} row {ix}: score {sc} but exact {ex_sc}"
            );
            if j > 0 {
                let prev = s[qi][j - 1];
                assert!(prev >= sc, "{what} {c:?}: not descending at q {qi} pos {j}");
                if prev == sc {
                    assert!(i[qi][j - 1] < ix, "{what} {c:?}: tie not to lower index");
                }
            }
            // indices must agree exactly where the score is separated from its neighbours
            let sep_prev = j == 0 || rs[qi][j - 1] - rs[qi][j] > 2.0 * TOL;
            let sep_next = rs[qi]
                .get(j + 1)
                .map(|&nx| rs[qi][j] - nx > 2.0 * TOL)
                .unwrap_or(true);
            // the n-th entry must also be separated from the first one left out
            let m_rest_sep = if j + 1 == c.n {
                (0..c.m)
                    .filter(|&r| r as u32 != ex && !ri[qi].contains(&(r as u32)))
                    .all(|r| (exact_score(&qf, &kf, qi, r) as f32) < rs[qi][j] - 2.0 * TOL)
            } else {
                true
            };
            if sep_prev && sep_next && m_rest_sep {
                assert_eq!(ix, ri[qi][j], "{what} {c:?}: q {qi} pos {j} index");
            }
        }
    }
}

/// 260 random cases (M up to 2000, n up to M: above the kernels' [`KMAX`] the CUDA op takes
/// the CPU path).
fn random_cases(op: Op, what: &str) {
    let mut count = 0;
    for seed in 0..260u64 {
        let c = random_case(seed, 2000);
        let data = make_data(&c);
        compare(&c, &data, op, what);
        count += 1;
    }
    assert!(count >= 200);
}

#[test]
fn fused_cpu_matches_reference_random_cases() {
    random_cases(cosine_topk, "fused cpu");
}

#[test]
fn cuda_matches_reference_random_cases() {
    on_cuda("cuda_matches_reference_random_cases", || {
        random_cases(cosine_topk_cuda, "cuda")
    });
}

#[test]
fn fused_cpu_multi_chunk_banks() {
    multi_chunk_banks(cosine_topk, "fused cpu multi-chunk");
}

#[test]
fn cuda_multi_chunk_banks() {
    on_cuda("cuda_multi_chunk_banks", || {
        multi_chunk_banks(cosine_topk_cuda, "cuda multi-chunk")
    });
}

/// Large-ish banks spanning several of the fused path's chunks (and many kernel blocks),
/// B = 1 and B = 64.
fn multi_chunk_banks(op: Op, what: &str) {
    for (seed, b, m, d, kdt) in [
        (1u64, 1usize, 40_000usize, 96usize, DType::F32),
        (2, 64, 9_000, 64, DType::F16),
        (3, 5, 20_001, 33, DType::BF16),
    ] {
        let c = Case {
            seed,
            b,
            m,
            d,
            n: 8,
            kdt,
            qdt: DType::F32,
            exclude: Some((0..b as u32).map(|x| x * 7).collect()),
            norms: true,
            dup: true,
        };
        compare(&c, &make_data(&c), op, what);
    }
}

#[test]
fn fused_cpu_single_query_every_tail() {
    single_query_every_tail(cosine_topk, "fused cpu B=1");
}

#[test]
fn cuda_single_query_every_tail() {
    on_cuda("cuda_single_query_every_tail", || {
        single_query_every_tail(cosine_topk_cuda, "cuda B=1")
    });
}

/// B = 1 takes the CPU path's row-at-a-time kernel (32-element steps, then 8-element steps,
/// then a scalar tail): every tail combination, every key dtype, several chunks. On a
/// device: every D remainder against vector loads.
fn single_query_every_tail(op: Op, what: &str) {
    let mut seed = 100;
    for d in [1usize, 7, 8, 9, 31, 32, 33, 40, 63, 64, 65, 100, 257] {
        for kdt in [DType::F32, DType::F16, DType::BF16] {
            seed += 1;
            let c = Case {
                seed,
                b: 1,
                m: 3000 + d,
                d,
                n: 5,
                kdt,
                qdt: DType::F32,
                exclude: Some(vec![((d * 13) % (3000 + d)) as u32]),
                norms: d % 2 == 0,
                dup: true,
            };
            compare(&c, &make_data(&c), op, what);
        }
    }
}

fn cpu(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Shared checks on ties, zero vectors and non-contiguous inputs for any implementation.
fn semantics(op: Op, what: &str) {
    // all rows identical: ties go to the lower index, exclusion skips its row
    let k = cpu(vec![0.5; 10 * 3], (10, 3));
    let q = cpu(vec![1.0, 2.0, 3.0], (1, 3));
    let ex = Tensor::from_vec(vec![1u32], 1, &Device::Cpu).unwrap();
    let (_, i) = op(&q, &k, None, 4, Some(&ex)).unwrap();
    assert_eq!(
        i.to_vec2::<u32>().unwrap(),
        vec![vec![0, 2, 3, 4]],
        "{what}"
    );
    // zero query and zero key score exactly 0, never NaN
    let k = cpu(vec![0.0, 0.0, 1.0, 0.0, -1.0, 0.0], (3, 2));
    let q = cpu(vec![0.0, 0.0, 1.0, 0.0], (2, 2));
    let (s, i) = op(&q, &k, None, 3, None).unwrap();
    assert_eq!(
        s.to_vec2::<f32>().unwrap()[0],
        vec![0.0, 0.0, 0.0],
        "{what}"
    );
    assert_eq!(i.to_vec2::<u32>().unwrap()[0], vec![0, 1, 2], "{what}");
    let s1 = s.to_vec2::<f32>().unwrap()[1].clone();
    assert!((s1[0] - 1.0).abs() < 1e-6 && s1[1] == 0.0 && (s1[2] + 1.0).abs() < 1e-6);
    assert_eq!(i.to_vec2::<u32>().unwrap()[1], vec![1, 0, 2], "{what}");
    // non-contiguous queries and keys (transposed views) give the contiguous result
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let kt = cpu(
        (0..7 * 50).map(|_| r.random_range(-1.0..1.0)).collect(),
        (7, 50),
    );
    let qt = cpu(
        (0..7 * 3).map(|_| r.random_range(-1.0..1.0)).collect(),
        (7, 3),
    );
    let (k_nc, q_nc) = (kt.t().unwrap(), qt.t().unwrap());
    assert!(!k_nc.is_contiguous() && !q_nc.is_contiguous());
    let (s1, i1) = op(&q_nc, &k_nc, None, 5, None).unwrap();
    let (s2, i2) = op(
        &q_nc.contiguous().unwrap(),
        &k_nc.contiguous().unwrap(),
        None,
        5,
        None,
    )
    .unwrap();
    assert_eq!(
        i1.to_vec2::<u32>().unwrap(),
        i2.to_vec2::<u32>().unwrap(),
        "{what}"
    );
    close(&s1, &s2, what);
    // a non-contiguous key_norms / exclude view works too
    let kn2 = key_norms(&k_nc)
        .unwrap()
        .unsqueeze(1)
        .unwrap()
        .repeat((1, 2))
        .unwrap();
    let kn_nc = kn2.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
    let (s3, _) = op(&q_nc, &k_nc, Some(&kn_nc), 5, None).unwrap();
    close(&s1, &s3, what);
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() <= 1e-6, "{what}: {x} vs {y}");
    }
}

fn nan_is_error(op: Op, what: &str) {
    let mut k = vec![0.25f32; 6 * 4];
    k[4 * 4 + 2] = f32::NAN;
    let k = cpu(k, (6, 4));
    let q = cpu(vec![1.0; 4], (1, 4));
    let e = op(&q, &k, None, 2, None).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("row 4"), "{what}: {e}");
    let mut qv = vec![1.0f32; 8];
    qv[5] = f32::INFINITY;
    let e = op(&cpu(qv, (2, 4)), &k.narrow(0, 0, 4).unwrap(), None, 2, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("query 1"), "{what}: {e}");
}

fn error_paths(op: Op, what: &str) {
    let k = cpu(vec![1.0; 5 * 4], (5, 4));
    let q = cpu(vec![1.0; 2 * 4], (2, 4));
    let err = |r: r2scp::Result<(Tensor, Tensor)>, needle: &str| {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains(needle),
            "{what}: `{e}` should mention `{needle}`"
        );
    };
    err(op(&q, &k, None, 0, None), "n = 0");
    err(op(&q, &k, None, 6, None), "n = 6 exceeds the 5");
    let ex = Tensor::from_vec(vec![u32::MAX, 3u32], 2, &Device::Cpu).unwrap();
    err(
        op(&q, &k, None, 5, Some(&ex)),
        "n = 5 exceeds the 4 bank rows left after exclusion",
    );
    let bad_ex = Tensor::from_vec(vec![0u32, 5], 2, &Device::Cpu).unwrap();
    err(op(&q, &k, None, 1, Some(&bad_ex)), "exclude[1] = 5");
    let short_ex = Tensor::from_vec(vec![0u32], 1, &Device::Cpu).unwrap();
    err(
        op(&q, &k, None, 1, Some(&short_ex)),
        "exclude must be [B] = [2]",
    );
    let f_ex = Tensor::from_vec(vec![0f32, 1.0], 2, &Device::Cpu).unwrap();
    err(op(&q, &k, None, 1, Some(&f_ex)), "exclude must be u32");
    err(
        op(&cpu(vec![1.0; 6], (2, 3)), &k, None, 1, None),
        "D = 3 does not match",
    );
    err(
        op(&q.flatten_all().unwrap(), &k, None, 1, None),
        "queries must be [B, D]",
    );
    err(
        op(&q, &k.unsqueeze(0).unwrap(), None, 1, None),
        "keys must be [M, D]",
    );
    err(
        op(&q, &k.to_dtype(DType::F64).unwrap(), None, 1, None),
        "keys dtype F64",
    );
    err(
        op(&q.to_dtype(DType::U32).unwrap(), &k, None, 1, None),
        "queries dtype U32 is not a float dtype, expected f32 (or any float: convert with `queries.to_dtype(DType::F32)`)",
    );
    let kn = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    err(
        op(&q, &k, Some(&kn), 1, None),
        "key_norms must be [M] = [5]",
    );
    let kn = Tensor::ones(5, DType::F16, &Device::Cpu).unwrap();
    err(op(&q, &k, Some(&kn), 1, None), "key_norms must be f32");
    err(
        op(&cpu(vec![], (2, 0)), &cpu(vec![], (5, 0)), None, 1, None),
        "D >= 1",
    );
}

#[test]
fn fused_cpu_many_queries_semantics() {
    many_queries_semantics(cosine_topk, "fused cpu");
}

#[test]
fn emu_many_queries_semantics() {
    many_queries_semantics(cosine_topk_emulated, "emulated kernel");
}

#[test]
fn cuda_many_queries_semantics() {
    on_cuda("cuda_many_queries_semantics", || {
        many_queries_semantics(cosine_topk_cuda, "cuda")
    });
}

/// B >= 16 runs the CPU path's query-lane kernel (on a device: several queries per block):
/// ties, zero vectors, exclusion and NaN there too.
fn many_queries_semantics(op: Op, what: &str) {
    let b = 37;
    let k = cpu(vec![0.5; 40 * 5], (40, 5));
    let mut qv = vec![1.0f32; b * 5];
    qv[3 * 5..4 * 5].fill(0.0); // query 3 is a zero vector
    let q = cpu(qv, (b, 5));
    let ex: Vec<u32> = (0..b as u32)
        .map(|i| if i % 2 == 0 { i % 7 } else { u32::MAX })
        .collect();
    let ext = Tensor::from_vec(ex.clone(), b, &Device::Cpu).unwrap();
    let (s, i) = op(&q, &k, None, 6, Some(&ext)).unwrap();
    let (s, i) = (s.to_vec2::<f32>().unwrap(), i.to_vec2::<u32>().unwrap());
    for qi in 0..b {
        let want: Vec<u32> = (0..40u32).filter(|&r| r != ex[qi]).take(6).collect();
        assert_eq!(
            i[qi], want,
            "{what}: query {qi}: ties must go to the lower index"
        );
        let target = if qi == 3 { 0.0 } else { 1.0 };
        assert!(
            s[qi].iter().all(|&x| (x - target).abs() < 1e-5),
            "{what}: query {qi}: {:?}",
            s[qi]
        );
    }
    let mut kv = vec![0.25f32; 40 * 5];
    kv[33 * 5 + 1] = f32::NAN;
    let e = op(&q, &cpu(kv, (40, 5)), None, 3, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("row 33"), "{what}: {e}");
}

#[test]
fn fused_cpu_semantics() {
    semantics(cosine_topk, "fused cpu");
}

#[test]
fn reference_semantics() {
    semantics(cosine_topk_reference, "reference");
}

#[test]
fn fused_cpu_nan_is_error() {
    nan_is_error(cosine_topk, "fused cpu");
}

#[test]
fn reference_nan_is_error() {
    nan_is_error(cosine_topk_reference, "reference");
}

#[test]
fn fused_cpu_error_paths() {
    error_paths(cosine_topk, "fused cpu");
}

#[test]
fn reference_error_paths() {
    error_paths(cosine_topk_reference, "reference");
}

/// The reference with the bank cut into chunks of 1, 7 and 64 rows (the running top-n
/// merged chunk by chunk, as on CUDA) against the whole-bank reference: same scores, same
/// indices where separated, ties to the lower index; NaN and input errors unchanged.
fn reference_chunks_1(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_reference_chunked(q, k, kn, n, ex, 1)
}

fn reference_chunks_7(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_reference_chunked(q, k, kn, n, ex, 7)
}

fn reference_chunks_64(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_reference_chunked(q, k, kn, n, ex, 64)
}

#[test]
fn reference_in_chunks_matches_whole_bank() {
    for (op, what) in [
        (reference_chunks_1 as Op, "reference in chunks of 1"),
        (reference_chunks_7, "reference in chunks of 7"),
        (reference_chunks_64, "reference in chunks of 64"),
    ] {
        for seed in 0..60u64 {
            let c = random_case(seed, 300);
            compare(&c, &make_data(&c), op, what);
        }
        semantics(op, what);
        nan_is_error(op, what);
        error_paths(op, what);
    }
}

#[test]
fn cuda_semantics() {
    on_cuda("cuda_semantics", || semantics(cosine_topk_cuda, "cuda"));
}

#[test]
fn cuda_nan_is_error() {
    on_cuda("cuda_nan_is_error", || {
        nan_is_error(cosine_topk_cuda, "cuda")
    });
}

#[test]
fn cuda_error_paths() {
    on_cuda("cuda_error_paths", || error_paths(cosine_topk_cuda, "cuda"));
}

fn empty_batch_gives_empty_output(op: Op, what: &str) {
    let k = cpu(vec![1.0; 12], (3, 4));
    let q = cpu(vec![], (0, 4));
    let (s, i) = op(&q, &k, None, 2, None).unwrap();
    assert_eq!(s.dims(), [0, 2], "{what}");
    assert_eq!(i.dims(), [0, 2], "{what}");
}

#[test]
fn fused_cpu_empty_batch_gives_empty_output() {
    empty_batch_gives_empty_output(cosine_topk, "fused cpu");
}

#[test]
fn cuda_empty_batch_gives_empty_output() {
    on_cuda("cuda_empty_batch_gives_empty_output", || {
        empty_batch_gives_empty_output(cosine_topk_cuda, "cuda")
    });
}

#[test]
fn emu_matches_reference_random_cases() {
    let mut count = 0;
    let cases = emu_cases();
    for seed in 1000..1000 + cases {
        // M <= 700 < KMAX: n covers 1..=M (after exclusion) with no clamping.
        let c = random_case(seed, 700);
        assert!(c.n <= KMAX);
        let data = make_data(&c);
        compare(&c, &data, cosine_topk_emulated, "emulated kernel");
        count += 1;
    }
    assert!(count >= cases.min(200));
}

#[test]
fn emu_multi_block_banks() {
    multi_block_banks(cosine_topk_emulated, "emulated multi-block");
}

#[test]
fn cuda_multi_block_banks() {
    on_cuda("cuda_multi_block_banks", || {
        multi_block_banks(cosine_topk_cuda, "cuda multi-block")
    });
}

/// Banks spanning several blocks and tiles, n up to KMAX, so the device merge of
/// per-block candidates does real work; n > 256 makes the tiles follow kp.
fn multi_block_banks(op: Op, what: &str) {
    for (seed, b, m, d, n, kdt) in [
        (11u64, 1usize, 5000usize, 24usize, 8usize, DType::F32),
        (12, 9, 3001, 17, 256, DType::F16),
        (13, 17, 2600, 8, 100, DType::BF16),
        (14, 3, 4100, 12, 300, DType::F32),
        (15, 2, 6000, 5, KMAX, DType::F16),
    ] {
        let c = Case {
            seed,
            b,
            m,
            d,
            n,
            kdt,
            qdt: kdt,
            exclude: Some((0..b as u32).map(|x| x * 13).collect()),
            norms: false,
            dup: true,
        };
        compare(&c, &make_data(&c), op, what);
    }
}

#[test]
fn emu_semantics() {
    semantics(cosine_topk_emulated, "emulated kernel");
}

#[test]
fn emu_nan_is_error() {
    nan_is_error(cosine_topk_emulated, "emulated kernel");
}

#[test]
fn emu_error_paths() {
    error_paths(cosine_topk_emulated, "emulated kernel");
}

/// A deferred call: [`r2scp::retrieve::cosine_topk_deferred`]'s signature.
type DeferredOp =
    fn(&Tensor, &Tensor, Option<&Tensor>, usize, Option<&Tensor>) -> r2scp::Result<PendingTopN>;

#[test]
fn emu_deferred_calls_keep_errors_loud() {
    deferred_calls_keep_errors_loud(cosine_topk_deferred_emulated, "emulated kernel");
}

#[test]
fn cuda_deferred_calls_keep_errors_loud() {
    on_cuda("cuda_deferred_calls_keep_errors_loud", || {
        deferred_calls_keep_errors_loud(cosine_topk_deferred_cuda, "cuda")
    });
}

/// The no-sync contract (src/retrieve/cosine_topk/kernel.rs "NaN contract"): deferred calls
/// queue without reading anything back, each keeps its own error word, a failed call's scores
/// are all NaN until `check` turns the word into the CPU path's error, and a clean call's
/// unchecked results equal its checked ones. Device paths only (the fused CPU path's errors
/// are immediate and it has no error word); the pending results may stay on the device.
fn deferred_calls_keep_errors_loud(op: DeferredOp, what: &str) {
    let mut kv: Vec<f32> = (0..40 * 6).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    let good = cpu(kv.clone(), (40, 6));
    kv[23 * 6 + 1] = f32::NAN;
    let bad = cpu(kv, (40, 6));
    let q = cpu((0..3 * 6).map(|i| (i % 5) as f32 - 2.0).collect(), (3, 6));
    let ex_bad = Tensor::from_vec(vec![1u32, 40, u32::MAX], 3, &Device::Cpu).unwrap();
    let ex_ok = Tensor::from_vec(vec![1u32, 39, u32::MAX], 3, &Device::Cpu).unwrap();

    // Queued back to back, checked afterwards in another order.
    let nan = op(&q, &bad, None, 4, None).unwrap();
    let bad_ex = op(&q, &good, None, 4, Some(&ex_bad)).unwrap();
    let ok = op(&q, &good, None, 4, Some(&ex_ok)).unwrap();

    for (p, case) in [(&nan, "NaN key"), (&bad_ex, "bad exclusion")] {
        let (s, _) = p.unchecked();
        let s = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            s.iter().all(|x| x.is_nan()),
            "{what}, {case}: unchecked scores {s:?}"
        );
        let w = p.status().expect("device word").to_vec1::<u32>().unwrap();
        assert_ne!(w[0], 0, "{what}, {case}: error word {w:?}");
    }
    let w = ok.status().expect("device word").to_vec1::<u32>().unwrap();
    assert_eq!(w, [0, 0, 0], "{what}");
    let (us, ui) = ok.unchecked();
    let (us, ui) = (us.clone(), ui.clone());
    let (cs, ci) = ok.check().unwrap();
    close(&us, &cs, &format!("{what}: deferred unchecked vs checked"));
    assert_eq!(
        ui.to_vec2::<u32>().unwrap(),
        ci.to_vec2::<u32>().unwrap(),
        "{what}"
    );
    let (rs, ri) = cosine_topk_reference(&q, &good, None, 4, Some(&ex_ok)).unwrap();
    close(&cs, &rs, &format!("{what}: deferred vs reference"));
    assert_eq!(
        ci.to_vec2::<u32>().unwrap(),
        ri.to_vec2::<u32>().unwrap(),
        "{what}"
    );

    let e = bad_ex.check().unwrap_err().to_string();
    assert!(e.contains("exclude[1] = 40"), "{what}: {e}");
    let e = nan.check().unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("row 23"), "{what}: {e}");
}

// ---- The tensor-core path (kernels/cosine_topk_tc.cuh), forced whatever the batch ----------

fn tc(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_emulated_with(q, k, kn, n, ex, Kernel::TensorCore, TcOverrides::default())
}

fn bandwidth(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    cosine_topk_emulated_with(q, k, kn, n, ex, Kernel::Bandwidth, TcOverrides::default())
}

/// The tensor-core path rescores with the bandwidth kernel's f32 arithmetic, so on the same
/// executor both give the same rows and bit-identical scores, near-ties included.
fn assert_same(got: &(Tensor, Tensor), want: &(Tensor, Tensor), what: &str) {
    let (gs, gi) = (
        got.0.to_vec2::<f32>().unwrap(),
        got.1.to_vec2::<u32>().unwrap(),
    );
    let (ws, wi) = (
        want.0.to_vec2::<f32>().unwrap(),
        want.1.to_vec2::<u32>().unwrap(),
    );
    assert_eq!(gi, wi, "{what}: indices");
    for (a, b) in gs.iter().flatten().zip(ws.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: scores {a} vs {b}");
    }
}

/// A random case the tensor-core path takes: D a whole number of 16-byte chunks, n at most
/// what the emulator's shared memory serves. Banks up to 400 rows (several 128-row tiles, and
/// more than one chunk per query tile) keep the emulated launches short.
fn random_tc_case(seed: u64) -> Case {
    let mut c = random_case(seed, 400);
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x7c);
    let chunk = if c.kdt == DType::F32 { 4 } else { 8 };
    c.d = chunk * r.random_range(1..12usize);
    // The largest n whose threshold lists fit the emulator's 98 KiB of shared memory.
    c.n =
        c.n.min(tensor_core::max_n(r2scp::kernel::EMU_MAX_DYN_SMEM_BYTES));
    c
}

/// The bandwidth kernel is checked against the CPU reference above; the tensor-core path is
/// checked against the bandwidth kernel, bit for bit (rows and scores).
#[test]
fn emu_tc_matches_bandwidth_random_cases() {
    // Emulated tensor-core launches are slow (warp barriers in every WMMA call, several
    // seconds per case): a 42nd of the random-case count, 5 in the plain run, 2 under TSAN.
    let cases = (emu_cases() / 42).max(2);
    for seed in 5000..5000 + cases {
        let c = random_tc_case(seed);
        let d = make_data(&c);
        let got = tc(&d.q, &d.k, d.kn.as_ref(), c.n, d.ex.as_ref())
            .unwrap_or_else(|e| panic!("tensor-core path failed on {c:?}: {e}"));
        let want = bandwidth(&d.q, &d.k, d.kn.as_ref(), c.n, d.ex.as_ref()).unwrap();
        assert_eq!(got.0.dims(), [c.b, c.n], "{c:?}");
        assert_same(&got, &want, &format!("{c:?}"));
    }
}

/// (seed, key dtype, spread of the near-tied rows) of the near-tie banks.
const NEAR_TIES: [(u64, DType, f32); 3] = [
    (1, DType::BF16, 0.03),
    (2, DType::F16, 0.004),
    (3, DType::F32, 0.004),
];

/// `(queries [b, 64] f32, keys [320, 64] kdt, exclude [b])`: rows 40..260 lie within `spread`
/// of the queries' common direction (near-ties), the others far below.
fn near_tie_data(seed: u64, kdt: DType, spread: f32, b: usize) -> (Tensor, Tensor, Vec<u32>) {
    let (m, d) = (320usize, 64usize);
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let u: Vec<f32> = (0..d)
        .map(|_| r.random_range(0.5..1.0f32) * if r.random_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let mut kv = Vec::with_capacity(m * d);
    for row in 0..m {
        let s = if (40..260).contains(&row) {
            spread
        } else {
            1.0
        };
        kv.extend(u.iter().map(|&x| x + s * r.random_range(-1.0..1.0f32)));
    }
    let qv: Vec<f32> = (0..b * d)
        .map(|i| u[i % d] + 0.01 * r.random_range(-1.0..1.0f32))
        .collect();
    let ex = (0..b)
        .map(|i| [150u32, u32::MAX, 7, 259, 40][i % 5])
        .collect();
    (cpu(qv, (b, d)), cpu(kv, (m, d)).to_dtype(kdt).unwrap(), ex)
}

#[test]
fn fused_cpu_large_batch_near_ties() {
    large_batch_near_ties(cosine_topk, "fused cpu");
}

#[test]
fn cuda_large_batch_near_ties() {
    on_cuda("cuda_large_batch_near_ties", || {
        large_batch_near_ties(cosine_topk_cuda, "cuda")
    });
}

/// The near-tie banks with a batch large enough for the public op to pick an approximate
/// path on a device (the GEMM + select path by [`r2scp::retrieve::cosine_topk::kernel::choose`]:
/// B = 40, D = 64): the exact top n against the reference, however the GEMM rounds its
/// operands. (The emulated paths are held bit for bit to the bandwidth kernel by
/// `emu_tc_near_ties_at_the_boundary` and `emu_gemm_near_ties_at_the_boundary`.)
fn large_batch_near_ties(op: Op, what: &str) {
    let b = 40;
    for (seed, kdt, spread) in NEAR_TIES {
        let (q, k, ex) = near_tie_data(seed, kdt, spread, b);
        let c = Case {
            seed,
            b,
            m: k.dim(0).unwrap(),
            d: k.dim(1).unwrap(),
            n: 12,
            kdt,
            qdt: DType::F32,
            exclude: Some(ex.clone()),
            norms: false,
            dup: false,
        };
        let data = Data {
            q,
            k,
            kn: None,
            ex: Some(Tensor::from_vec(ex, b, &Device::Cpu).unwrap()),
        };
        compare(&c, &data, op, &format!("{what} {kdt:?} near-ties"));
    }
}

/// Many rows whose exact scores lie closer together than the tensor-core pass can tell apart
/// (its operands are rounded to bf16, f16 or tf32), with n cutting through them: the margin
/// makes the rescoring see every row that can be in the exact top n. Without it (margin 0)
/// the answer is the approximate top n, which differs: the test shows the rounding is there.
#[test]
fn emu_tc_near_ties_at_the_boundary() {
    for (seed, kdt, spread) in NEAR_TIES {
        let (n, b) = (12usize, 5usize);
        let (q, k, ex) = near_tie_data(seed, kdt, spread, b);
        let ex = Tensor::from_vec(ex, b, &Device::Cpu).unwrap();
        let want = bandwidth(&q, &k, None, n, Some(&ex)).unwrap();
        let got = tc(&q, &k, None, n, Some(&ex)).unwrap();
        assert_same(&got, &want, &format!("{kdt:?} near-ties"));
        let top = want.1.to_vec2::<u32>().unwrap();
        assert!(
            top.iter().flatten().all(|&i| (40..260).contains(&i)),
            "{kdt:?}: {top:?}"
        );
        let no_margin = TcOverrides {
            margin: Some(0.0),
            ..TcOverrides::default()
        };
        let approx =
            cosine_topk_emulated_with(&q, &k, None, n, Some(&ex), Kernel::TensorCore, no_margin)
                .unwrap();
        assert_ne!(
            approx.1.to_vec2::<u32>().unwrap(),
            top,
            "{kdt:?}: with margin 0 the approximate top n should differ from the exact one"
        );
    }
}

/// Candidate lists that overflow (capacity in the pass or in the rescoring) send their
/// queries to the bandwidth kernel: the answer is still exact. Each knob overflows for sure:
/// a chunk's first 64-row tile passes whole (its list is not full yet), more than capacity 1
/// or 40; margin 2 admits every row (scores lie in [-1, 1]) to a rescoring of capacity 16.
#[test]
fn emu_tc_overflow_falls_back_exactly() {
    for (seed, kdt, knobs) in [
        (
            21u64,
            DType::BF16,
            TcOverrides {
                capq: Some(1),
                ..TcOverrides::default()
            },
        ),
        (
            22,
            DType::F32,
            TcOverrides {
                capq: Some(40),
                ..TcOverrides::default()
            },
        ),
        (
            23,
            DType::F16,
            TcOverrides {
                cap: Some(16),
                margin: Some(2.0),
                ..TcOverrides::default()
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
        let d = make_data(&c);
        let got = cosine_topk_emulated_with(
            &d.q,
            &d.k,
            d.kn.as_ref(),
            c.n,
            d.ex.as_ref(),
            Kernel::TensorCore,
            knobs,
        )
        .unwrap();
        let want = bandwidth(&d.q, &d.k, d.kn.as_ref(), c.n, d.ex.as_ref()).unwrap();
        assert_same(&got, &want, &format!("{knobs:?}"));
    }
}

/// The tensor-core path rounds f32 operands to tf32 with `cvt.rna.tf32.f32` (nearest, ties away
/// from zero: the margin assumes half a tf32 ulp, 2^-11), and the emulator does it bit for bit
/// as the SASS ptxas 13.0 emits for it (FSETP |x| >= inf, IADD 0x1000, LOP3 & 0xffffe000):
/// overflow to infinity, infinities kept, a NaN's low 13 payload bits dropped.
#[test]
fn emu_tf32_rounding_is_cvt_rna() {
    use r2scp::kernel::emu::cvt_rna_tf32;
    let f = f32::from_bits;
    for (x, want) in [
        (1.0f32, 0x3f80_0000u32),
        (f(0x3f80_1000), 0x3f80_2000), // 1 + 2^-11: a tie, away from zero
        (f(0xbf80_1000), 0xbf80_2000), // its negative
        (f(0x3f80_0fff), 0x3f80_0000), // below the tie
        (f(0x3f80_1001), 0x3f80_2000), // above it
        (f(0x3f80_3000), 0x3f80_4000), // tie at an odd tf32 significand: still away
        (f(0x0000_1000), 0x0000_2000), // subnormal
        (f32::MAX, 0x7f80_0000),       // rounds up past the largest tf32: infinity
        (f32::INFINITY, 0x7f80_0000),
        (f32::NEG_INFINITY, 0xff80_0000),
        (f(0x7fc0_0001), 0x7fc0_0000), // NaN payload below bit 13 dropped
        (f(0x7f80_0001), 0x7f80_0000), // ... to infinity when nothing else is left
    ] {
        assert_eq!(cvt_rna_tf32(x), want, "{:#010x}", x.to_bits());
    }
}

/// The tensor-core pass's approximate scores rank well-separated rows exactly: every query
/// of a batch spanning both 16-row halves of the first mma tile and a second tile has 4
/// planted rows at cosines 0.9, 0.8, 0.7, 0.6 (the key is alpha q/|q| plus noise orthogonal to
/// q), every other row is random (cosines around 0 +- 0.13 at D = 64). With margin 0 the
/// rescoring keeps only rows at or above the approximate 4th best, so the answer is the
/// approximate top 4: a wrong fragment layout of ldmatrix or mma.sync (A, B or the
/// accumulators), or a wrong accumulator-to-(query, row) mapping in the filter, scrambles it.
#[test]
fn emu_tc_approximate_scores_rank_exactly() {
    let (b, d, per, extra) = (40usize, 64usize, 4usize, 140usize);
    let mut r = ChaCha8Rng::seed_from_u64(2020);
    let unit = |v: Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let qs: Vec<Vec<f32>> = (0..b)
        .map(|_| unit((0..d).map(|_| r.random_range(-1.0..1.0f32)).collect()))
        .collect();
    // (key row, Some((query, rank)) for a planted row)
    type Row = (Vec<f32>, Option<(usize, usize)>);
    let mut rows: Vec<Row> = Vec::new();
    for (qi, q) in qs.iter().enumerate() {
        for j in 0..per {
            let alpha = 0.9 - 0.1 * j as f32;
            let mut noise: Vec<f32> = (0..d).map(|_| r.random_range(-1.0..1.0f32)).collect();
            let dot: f32 = noise.iter().zip(q).map(|(a, b)| a * b).sum();
            noise.iter_mut().zip(q).for_each(|(x, y)| *x -= dot * y);
            let noise = unit(noise);
            let beta = (1.0 - alpha * alpha).sqrt();
            let k = q
                .iter()
                .zip(&noise)
                .map(|(a, n)| alpha * a + beta * n)
                .collect();
            rows.push((k, Some((qi, j))));
        }
    }
    for _ in 0..extra {
        rows.push((
            unit((0..d).map(|_| r.random_range(-1.0..1.0f32)).collect()),
            None,
        ));
    }
    // Shuffle, and remember where each planted row went.
    for i in (1..rows.len()).rev() {
        rows.swap(i, r.random_range(0..=i));
    }
    let m = rows.len();
    let mut want = vec![vec![0u32; per]; b];
    for (row, (_, tag)) in rows.iter().enumerate() {
        if let Some((qi, j)) = tag {
            want[*qi][*j] = row as u32;
        }
    }
    let kv: Vec<f32> = rows.iter().flat_map(|(k, _)| k.clone()).collect();
    let qv: Vec<f32> = qs.concat();
    let no_margin = TcOverrides {
        margin: Some(0.0),
        ..TcOverrides::default()
    };
    for kdt in [DType::BF16, DType::F16, DType::F32] {
        let k = cpu(kv.clone(), (m, d)).to_dtype(kdt).unwrap();
        let q = cpu(qv.clone(), (b, d));
        let (_, i) =
            cosine_topk_emulated_with(&q, &k, None, per, None, Kernel::TensorCore, no_margin)
                .unwrap();
        assert_eq!(i.to_vec2::<u32>().unwrap(), want, "{kdt:?}");
    }
}

#[test]
fn emu_tc_semantics() {
    for kdt in [DType::F32, DType::F16, DType::BF16] {
        // all rows identical: ties go to the lower index, exclusion skips its row
        let k = cpu(vec![0.5; 70 * 8], (70, 8)).to_dtype(kdt).unwrap();
        let q = cpu((0..3 * 8).map(|i| 1.0 + i as f32).collect(), (3, 8));
        let ex = Tensor::from_vec(vec![1u32, u32::MAX, 0], 3, &Device::Cpu).unwrap();
        let (_, i) = tc(&q, &k, None, 4, Some(&ex)).unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap(),
            vec![vec![0, 2, 3, 4], vec![0, 1, 2, 3], vec![1, 2, 3, 4]],
            "{kdt:?}"
        );
        // zero query and zero key score exactly 0, never NaN
        let mut kv = vec![0.0f32; 3 * 8];
        kv[8] = 1.0;
        kv[16] = -1.0;
        let k = cpu(kv, (3, 8)).to_dtype(kdt).unwrap();
        let mut qv = vec![0.0f32; 2 * 8];
        qv[8] = 1.0;
        let (s, i) = tc(&cpu(qv, (2, 8)), &k, None, 3, None).unwrap();
        let (s, i) = (s.to_vec2::<f32>().unwrap(), i.to_vec2::<u32>().unwrap());
        assert_eq!(
            (s[0].clone(), i[0].clone()),
            (vec![0.0; 3], vec![0, 1, 2]),
            "{kdt:?}"
        );
        assert_eq!(i[1], vec![1, 0, 2], "{kdt:?}");
        assert!((s[1][0] - 1.0).abs() < 1e-6 && s[1][1] == 0.0 && (s[1][2] + 1.0).abs() < 1e-6);
    }
}

#[test]
fn emu_tc_nan_is_error() {
    let mut k = vec![0.25f32; 70 * 8];
    k[44 * 8 + 2] = f32::NAN;
    let k = cpu(k, (70, 8));
    let e = tc(&cpu(vec![1.0; 8], (1, 8)), &k, None, 2, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("row 44"), "{e}");
    let mut qv = vec![1.0f32; 3 * 8];
    qv[8 + 5] = f32::INFINITY;
    let k = k.narrow(0, 0, 40).unwrap();
    let e = tc(&cpu(qv, (3, 8)), &k, None, 2, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("query 1"), "{e}");
}

/// A key with an infinite element has an infinite norm and, against a query that does not
/// zero that element, an infinite dot product: its exact score is inf / inf = NaN, an error on
/// every path. The tensor-core pass's fast filter must send such a row to its exact test
/// whatever the product's sign (a -inf product lies below every threshold), in a chunk's first
/// tile (the seed's) and in later ones. Random keys, so that the row is no near-tie of the top
/// n and only the pass can see it (an overflow would send the query to the exact fallback).
#[test]
fn emu_tc_infinite_keys_are_nan_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    for dtype in [DType::F32, DType::BF16] {
        for sign in [1f32, -1.0] {
            for row in [5usize, 200, 900] {
                let mut k: Vec<f32> = (0..1000 * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
                k[row * 8] = sign * f32::INFINITY;
                let k = cpu(k, (1000, 8)).to_dtype(dtype).unwrap();
                let q = cpu(vec![1.0; 2 * 8], (2, 8));
                let what = format!("{dtype:?} {sign} row {row}");
                let e = bandwidth(&q, &k, None, 3, None).unwrap_err().to_string();
                assert!(
                    e.contains("NaN") && e.contains(&format!("row {row}")),
                    "{what}: {e}"
                );
                let e = tc(&q, &k, None, 3, None).unwrap_err().to_string();
                assert!(
                    e.contains("NaN") && e.contains(&format!("row {row}")),
                    "{what}: {e}"
                );
            }
        }
    }
}

#[test]
fn emu_tc_refuses_what_it_cannot_take() {
    let k = cpu(vec![0.5; 20 * 12], (20, 12))
        .to_dtype(DType::BF16)
        .unwrap();
    let q = cpu(vec![1.0; 2 * 12], (2, 12));
    let e = tc(&q, &k, None, 2, None).unwrap_err().to_string();
    assert!(e.contains("D = 12") && e.contains("multiple of 8"), "{e}");
    let k = cpu(vec![0.5; 300 * 8], (300, 8));
    let q = cpu(vec![1.0; 8], (1, 8));
    let e = tc(&q, &k, None, tensor_core::NMAX + 1, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("n = {}", tensor_core::NMAX + 1)), "{e}");
    // Keys starting 4, 8 or 12 bytes past a 16-byte boundary (three of four consecutive f32
    // offsets): refused when forced, and the automatic choice (B = 40 >= 32, D = 32) runs the
    // bandwidth kernel instead, with the same answer.
    let mut r = ChaCha8Rng::seed_from_u64(77);
    let all = cpu(
        (0..101 * 32)
            .map(|_| r.random_range(-1.0..1.0f32))
            .collect(),
        (101 * 32, 1),
    );
    let qb = cpu(
        (0..40 * 32).map(|_| r.random_range(-1.0..1.0f32)).collect(),
        (40, 32),
    );
    let mut refused = 0;
    for off in 0..4 {
        let keys = all
            .narrow(0, off, 100 * 32)
            .unwrap()
            .reshape((100, 32))
            .unwrap();
        assert!(keys.is_contiguous());
        match tc(&qb, &keys, None, 3, None) {
            Err(e) => {
                assert!(e.to_string().contains("16-byte aligned"), "{e}");
                refused += 1;
                let auto = cosine_topk_emulated(&qb, &keys, None, 3, None).unwrap();
                assert_same(
                    &auto,
                    &bandwidth(&qb, &keys, None, 3, None).unwrap(),
                    "misaligned",
                );
            }
            Ok(got) => assert_same(
                &got,
                &bandwidth(&qb, &keys, None, 3, None).unwrap(),
                "aligned",
            ),
        }
    }
    assert_eq!(refused, 3);
}

#[test]
fn fused_cpu_misaligned_keys() {
    misaligned_keys(cosine_topk, "fused cpu");
}

#[test]
fn cuda_misaligned_keys() {
    on_cuda("cuda_misaligned_keys", || {
        misaligned_keys(cosine_topk_cuda, "cuda")
    });
}

/// Keys starting 0, 4, 8 and 12 bytes past their storage's start (views of one buffer), with
/// a batch the device dispatch gives an approximate path (B = 40, D = 32; the GEMM + select
/// path takes any alignment, the tensor-core path, when a table picks it, only 16-byte
/// aligned rows): every answer matches the reference. (`emu_tc_refuses_what_it_cannot_take`
/// holds the emulated fallback bit for bit to the bandwidth kernel.)
fn misaligned_keys(op: Op, what: &str) {
    let (b, m, d) = (40usize, 100usize, 32usize);
    let mut r = ChaCha8Rng::seed_from_u64(78);
    let all = cpu(
        (0..(m + 1) * d)
            .map(|_| r.random_range(-1.0..1.0f32))
            .collect(),
        ((m + 1) * d, 1),
    );
    let q = cpu(
        (0..b * d).map(|_| r.random_range(-1.0..1.0f32)).collect(),
        (b, d),
    );
    for off in 0..4 {
        let k = all.narrow(0, off, m * d).unwrap().reshape((m, d)).unwrap();
        let c = Case {
            seed: 78,
            b,
            m,
            d,
            n: 3,
            kdt: DType::F32,
            qdt: DType::F32,
            exclude: None,
            norms: false,
            dup: false,
        };
        let data = Data {
            q: q.clone(),
            k,
            kn: None,
            ex: None,
        };
        compare(&c, &data, op, &format!("{what} keys at offset {off}"));
    }
}

/// The tensor-core path keeps the bandwidth kernel's no-sync contract: its errors (a NaN score,
/// an `exclude` entry out of range, an exclusion with n = M, checked on the device) go to the
/// call's error word, a failed call's unchecked scores are all NaN (with and without an
/// overflow rerun), and `check` words the errors as the CPU path does.
#[test]
fn emu_tc_deferred_calls_keep_errors_loud() {
    // m = 60: n = M must fit the emulator's tensor-core limit (tensor_core::max_n).
    let (m, d) = (60usize, 32usize);
    let mut kv: Vec<f32> = (0..m * d).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    let good = cpu(kv.clone(), (m, d));
    kv[23 * d + 1] = f32::NAN;
    let bad = cpu(kv, (m, d));
    let q = cpu((0..3 * d).map(|i| (i % 5) as f32 - 2.0).collect(), (3, d));
    let ex = |v: Vec<u32>| Tensor::from_vec(v, 3, &Device::Cpu).unwrap();
    let (ex_bad, ex_ok, ex_few) = (
        ex(vec![1, 60, u32::MAX]),
        ex(vec![1, 59, u32::MAX]),
        ex(vec![u32::MAX, u32::MAX, 5]),
    );
    let run = |k: &Tensor, n: usize, e: Option<&Tensor>, knobs: TcOverrides| {
        cosine_topk_deferred_emulated_with(&q, k, None, n, e, Kernel::TensorCore, knobs).unwrap()
    };
    let plain = TcOverrides::default();
    let overflow = TcOverrides {
        capq: Some(1),
        ..TcOverrides::default()
    };
    // Queued back to back, checked afterwards.
    let nan = run(&bad, 4, None, plain);
    let nan_rerun = run(&bad, 4, None, overflow);
    let bad_ex = run(&good, 4, Some(&ex_bad), plain);
    let few = run(&good, m, Some(&ex_few), plain);
    let ok = run(&good, 4, Some(&ex_ok), plain);
    for (p, what) in [
        (&nan, "NaN key"),
        (&nan_rerun, "NaN key, overflow rerun"),
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
            "{what}: unchecked scores {s:?}"
        );
        let w = p.status().expect("device word").to_vec1::<u32>().unwrap();
        assert_ne!(w[0], 0, "{what}: error word {w:?}");
    }
    let w = ok.status().expect("device word").to_vec1::<u32>().unwrap();
    assert_eq!(w, [0, 0, 0]);
    let (cs, ci) = ok.check().unwrap();
    let want = bandwidth(&q, &good, None, 4, Some(&ex_ok)).unwrap();
    assert_same(&(cs, ci), &want, "tensor-core deferred vs bandwidth");

    let e = bad_ex.check().unwrap_err().to_string();
    assert!(e.contains("exclude[1] = 60"), "{e}");
    let e = few.check().unwrap_err().to_string();
    assert!(e.contains("n = 60") && e.contains("query 2"), "{e}");
    for p in [nan, nan_rerun] {
        let e = p.check().unwrap_err().to_string();
        assert!(e.contains("NaN") && e.contains("row 23"), "{e}");
    }
}

/// An empty batch seen through a narrowed view (candle keeps an offset past the empty storage).
fn empty_narrowed_batch_gives_empty_output(op: Op, what: &str) {
    let k = cpu(vec![0.5; 4 * 3], (4, 3));
    let q = cpu(vec![1.0; 2 * 3], (2, 3)).narrow(0, 2, 0).unwrap();
    let (s, i) = op(&q, &k, None, 2, None).unwrap();
    assert_eq!((s.dims(), i.dims()), (&[0, 2][..], &[0, 2][..]), "{what}");
}

#[test]
fn fused_cpu_empty_narrowed_batch_gives_empty_output() {
    empty_narrowed_batch_gives_empty_output(cosine_topk, "fused cpu");
}

#[test]
fn cuda_empty_narrowed_batch_gives_empty_output() {
    on_cuda("cuda_empty_narrowed_batch_gives_empty_output", || {
        empty_narrowed_batch_gives_empty_output(cosine_topk_cuda, "cuda")
    });
}

// The GEMM + select path and the exact stage it shares with the tensor-core path: a child
// module, so it reuses this file's cases and helpers.
#[path = "cosine_topk_gemm_select.rs"]
mod gemm_select;
