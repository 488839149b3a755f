//! cosine_topk: fused CPU path, emulated CUDA kernel and the op on a CUDA device against the
//! candle reference.
//!
//! Test names starting with `emu_` run the kernels through the CUDA emulator; `.ci/run`
//! reruns exactly those under ThreadSanitizer. Names starting with `cuda_` run the public op
//! on CUDA device 0 (`super::executors`), or print that they were skipped.

use super::common::emu_cases;
use super::executors::{cosine_topk_cuda, on_cuda};
use candle_core::{DType, Device, Tensor};
use r2scp::kernel::abi::COS_EPS;
use r2scp::retrieve::cosine_topk::cosine_topk_reference_chunked;
use r2scp::retrieve::cosine_topk::kernel::KMAX;
use r2scp::retrieve::{cosine_topk, cosine_topk_emulated, cosine_topk_reference, key_norms};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Op = fn(
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    usize,
    Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)>;

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
    let err = |r: candle_core::Result<(Tensor, Tensor)>, needle: &str| {
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
        op(
            &q.to_dtype(DType::BF16).unwrap(),
            &k.to_dtype(DType::F16).unwrap(),
            None,
            1,
            None,
        ),
        "queries dtype BF16",
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
) -> candle_core::Result<(Tensor, Tensor)> {
    cosine_topk_reference_chunked(q, k, kn, n, ex, 1)
}

fn reference_chunks_7(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    cosine_topk_reference_chunked(q, k, kn, n, ex, 7)
}

fn reference_chunks_64(
    q: &Tensor,
    k: &Tensor,
    kn: Option<&Tensor>,
    n: usize,
    ex: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
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
