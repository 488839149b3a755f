//! Property test of the public ops: `retrieve::cosine_topk` and `cap::{dissonance_topk,
//! topk_rows, gather_inject}`.
//!
//! Each case draws shapes (zero-sized dims included), dtypes (valid and invalid), memory
//! layouts (contiguous, transposed, narrowed, broadcast views), k / n at 0, 1, the maximum,
//! one beyond it, a random valid value and `usize::MAX`, and NaN / ±Inf entries. The
//! documented contract (README "Ops", the ops' docs) decides here, from the inputs alone,
//! whether the call must fail; if so every executor must return an error whose text is one
//! line; if not it must return the documented result, checked against an oracle computed
//! here in f64 from the same (dtype-rounded) inputs, and against the op's `*_reference` where
//! the reference is defined (finite inputs for the CAP ops, whose references use NaN-unsafe
//! sorts and `0 * x` masking).
//!
//! Executors: the fused CPU path (300 cases per op, or `R2SCP_PROP_CASES`), the emulated
//! CUDA kernels (`emu_*` tests, rerun under ThreadSanitizer by `.ci/run`; 210 cases, or
//! `R2SCP_EMU_CASES`) and the public op on CUDA device 0 (`cuda_*` tests, see
//! `super::executors`; 300 cases, or `R2SCP_PROP_CASES`). Each property is a
//! `check_*(executors, cases)` function; an executor says which dtypes its device has kernels
//! for (f64 runs on the CPU only).

use super::common::emu_cases;
use super::executors::{
    cosine_topk_cuda, dissonance_topk_cuda, gather_inject_cuda, on_cuda, topk_rows_cuda,
};
use candle_core::{DType, Device, Tensor};
use r2scp::cap::{
    dissonance_topk, dissonance_topk_emulated, dissonance_topk_reference, gather_inject,
    gather_inject_emulated, gather_inject_reference, topk_rows, topk_rows_emulated,
    topk_rows_reference, Context,
};
use r2scp::retrieve::{cosine_topk, cosine_topk_emulated, cosine_topk_reference, key_norms};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Res<T> = r2scp::Result<T>;
type CosOp = fn(&Tensor, &Tensor, Option<&Tensor>, usize, Option<&Tensor>) -> Res<(Tensor, Tensor)>;
type DisOp = fn(&Tensor, Context, usize) -> Res<r2scp::cap::Dissonance>;
type RowsOp = fn(&Tensor, usize) -> Res<(Tensor, Tensor)>;
type InjOp = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Res<Tensor>;

/// One way to run an op: its name in failure messages, the function, whether it has f64
/// (the fused CPU path does; kernels do not, f64 is an error there), and whether it applies
/// the ranking ops' NaN policy (the public op: a NaN to rank is an error; the emulated kernel
/// alone ranks it as -inf).
struct Executor<O> {
    name: &'static str,
    op: O,
    f64: bool,
    nan_errors: bool,
}

const fn fused<O>(op: O) -> Executor<O> {
    Executor {
        name: "fused cpu",
        op,
        f64: true,
        nan_errors: true,
    }
}

const fn emulated<O>(op: O) -> Executor<O> {
    Executor {
        name: "emulated kernel",
        op,
        f64: false,
        nan_errors: false,
    }
}

/// The public op on CUDA device 0: the kernels have no f64.
const fn on_device<O>(op: O) -> Executor<O> {
    Executor {
        name: "cuda",
        op,
        f64: false,
        nan_errors: true,
    }
}

fn cases() -> u64 {
    std::env::var("R2SCP_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// The error text without the backtrace candle appends under `RUST_BACKTRACE`.
fn text(e: &r2scp::Error) -> String {
    e.to_string()
}

fn assert_one_line(e: &r2scp::Error, what: &str) {
    let t = text(e);
    assert!(
        !t.trim().is_empty() && !t.contains('\n'),
        "{what}: error is not one line: {t:?}"
    );
}

/// How a tensor's view is laid out in memory.
#[derive(Debug, Clone, Copy)]
enum View {
    Contiguous,
    /// The last two dims are swapped in storage.
    Transposed,
    /// Every row is a window of a wider row.
    Narrowed,
    /// The first dim has stride 0.
    Broadcast,
}

fn pick<T: Copy>(r: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[r.random_range(0..xs.len())]
}

fn random_view(r: &mut ChaCha8Rng) -> View {
    pick(
        r,
        &[
            View::Contiguous,
            View::Contiguous,
            View::Transposed,
            View::Narrowed,
            View::Broadcast,
        ],
    )
}

/// Values in [-1, 1]; with `special`, a few NaN / +Inf / -Inf entries.
fn values(r: &mut ChaCha8Rng, n: usize, special: bool) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    if special && n > 0 {
        for _ in 0..r.random_range(1..=2) {
            let i = r.random_range(0..n);
            v[i] = pick(r, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        }
    }
    v
}

/// A tensor of `shape` and `dtype` laid out as `view` (broadcast needs rank >= 2; it falls
/// back to contiguous otherwise). Values come from `vals` (f32) in the view's logical order.
///
/// A zero-element tensor is never narrowed: candle 0.11.1's `narrow` of an empty tensor
/// keeps a start offset past its (empty) storage, and candle's own `to_vec1`, `arg_sort`
/// and `contiguous` slicing then panic on it, before any r2scp code runs.
fn tensor(shape: &[usize], dtype: DType, view: View, vals: &[f32]) -> Tensor {
    let cpu = Device::Cpu;
    let view = match view {
        View::Narrowed if vals.is_empty() => View::Contiguous,
        v => v,
    };
    let rank = shape.len();
    let logical = Tensor::from_vec(vals.to_vec(), shape, &cpu).unwrap();
    let t = match view {
        View::Transposed if rank >= 2 => logical
            .transpose(rank - 2, rank - 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .transpose(rank - 2, rank - 1)
            .unwrap(),
        View::Narrowed if rank >= 1 => {
            let last = shape[rank - 1];
            let pad = Tensor::zeros(
                [&shape[..rank - 1], &[2usize][..]].concat(),
                DType::F32,
                &cpu,
            )
            .unwrap();
            Tensor::cat(&[&pad, &logical, &pad], rank - 1)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .narrow(rank - 1, 2, last)
                .unwrap()
        }
        View::Broadcast if rank >= 2 && shape[0] > 0 => {
            // every batch row equals the first one
            logical
                .narrow(0, 0, 1)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .broadcast_as(shape)
                .unwrap()
        }
        _ => logical.to_dtype(dtype).unwrap(),
    };
    assert_eq!(t.dims(), shape);
    t
}

/// The view's values as f64 in logical order (what the op sees, after dtype rounding).
fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<u32>().unwrap()
}

/// Top-k of `row` by value, larger first, NaN ranked as -inf, ties to the lower index.
fn oracle_topk(row: &[f64], k: usize) -> Vec<u32> {
    let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        key(row[b as usize])
            .partial_cmp(&key(row[a as usize]))
            .unwrap()
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// An index count: 0, 1, the maximum, one beyond it, a random valid one, or `usize::MAX`.
fn count(r: &mut ChaCha8Rng, max: usize) -> usize {
    match r.random_range(0..8) {
        0 => 0,
        1 => 1,
        2 | 3 => max,
        4 => max + 1,
        5 => usize::MAX,
        _ => r.random_range(1..=max.max(1)),
    }
}

fn same_nan_or_close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + b.abs())
}

// ---------------------------------------------------------------------------------------
// cosine_topk

#[test]
fn cosine_topk_property() {
    check_cosine_topk(&[fused(cosine_topk)], cases());
}

#[test]
fn cuda_cosine_topk_property() {
    on_cuda("cuda_cosine_topk_property", || {
        check_cosine_topk(&[on_device(cosine_topk_cuda)], cases())
    });
}

#[test]
fn emu_cosine_topk_property() {
    check_cosine_topk(&[emulated(cosine_topk_emulated)], emu_cases());
}

/// Every case of `cosine_topk` on each of `executors`.
fn check_cosine_topk(executors: &[Executor<CosOp>], n_cases: u64) {
    let mut outcomes = [0usize; 2];
    for seed in 0..n_cases {
        let r = &mut ChaCha8Rng::seed_from_u64(0xC05 ^ seed);
        let b = pick(r, &[0, 1, 2, 3, 7, 4]);
        let m = pick(r, &[0, 1, 2, 5, 40, 9, 17, 3]);
        let d = pick(r, &[0, 1, 3, 16, 8, 5, 2, 33]);
        let kdt = pick(
            r,
            &[
                DType::F32,
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::F32,
                DType::F16,
                DType::F64,
                DType::U32,
            ],
        );
        // queries of any float dtype: f32 and the keys' dtype as given, the others converted
        let qdt = pick(
            r,
            &[
                DType::F32,
                kdt,
                kdt,
                DType::F32,
                kdt,
                DType::F64,
                DType::BF16,
                DType::U32,
            ],
        );
        let special = r.random_bool(0.15);
        let q_special = special && r.random_bool(0.5);
        let qv = values(r, b * d, q_special);
        let kv = values(r, m * d, special);
        let q = tensor(&[b, d], qdt, random_view(r), &qv);
        let k = tensor(&[m, d], kdt, random_view(r), &kv);
        let exclude: Option<Vec<u32>> = r.random_bool(0.5).then(|| {
            (0..b)
                .map(|_| match r.random_range(0..20) {
                    0 => m as u32, // out of range (unless MAX)
                    1..=5 => u32::MAX,
                    _ => r.random_range(0..m.max(1) as u32),
                })
                .collect()
        });
        let ex_t = exclude
            .as_ref()
            .map(|e| Tensor::from_vec(e.clone(), b, &Device::Cpu).unwrap());
        let valid_dtypes = matches!(kdt, DType::F32 | DType::F16 | DType::BF16) && qdt.is_float();
        let norms = (valid_dtypes && d > 0 && r.random_bool(0.5))
            .then(|| key_norms(&k.contiguous().unwrap()).unwrap());
        let left_min = (0..b)
            .map(|qi| match exclude.as_ref().map(|e| e[qi]) {
                Some(x) if (x as usize) < m => m - 1,
                _ => m,
            })
            .min()
            .unwrap_or(m);
        let n = count(r, left_min);
        let ex_ok = exclude
            .as_ref()
            .is_none_or(|e| e.iter().all(|&x| x == u32::MAX || (x as usize) < m));
        let (qf, kf) = (
            f64s(&q.to_dtype(DType::F32).unwrap()),
            f64s(&k.to_dtype(DType::F32).unwrap()),
        );
        let row_bad = |v: &[f64], i: usize| v[i * d..(i + 1) * d].iter().any(|x| !x.is_finite());
        // A NaN score is an error even at a query's excluded row (README "Ops").
        let nan_score = (0..b).any(|qi| (0..m).any(|ri| row_bad(&qf, qi) || row_bad(&kf, ri)));
        let must_fail = !valid_dtypes
            || d == 0
            || !ex_ok
            || n == 0
            || n > left_min
            || (b == 0 && n > m)
            || nan_score;
        let what = format!("cosine_topk seed {seed}: B {b} M {m} D {d} n {n} keys {kdt:?} queries {qdt:?} exclude {exclude:?} special {special}");
        let reference = cosine_topk_reference(&q, &k, norms.as_ref(), n, ex_t.as_ref());
        for ex in executors {
            let (name, op) = (ex.name, ex.op);
            let got = op(&q, &k, norms.as_ref(), n, ex_t.as_ref());
            if must_fail {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("{name}: {what}: expected an error"));
                assert_one_line(&e, &what);
                outcomes[1] += 1;
                continue;
            }
            let (s, i) = got.unwrap_or_else(|e| panic!("{name}: {what}: {}", text(&e)));
            assert_eq!(
                (s.dims(), i.dims()),
                (&[b, n][..], &[b, n][..]),
                "{name}: {what}"
            );
            assert_eq!(
                (s.dtype(), i.dtype()),
                (DType::F32, DType::U32),
                "{name}: {what}"
            );
            let (s, i) = (f64s(&s), u32s(&i));
            let (rs, _) = reference
                .as_ref()
                .unwrap_or_else(|e| panic!("reference: {what}: {}", text(e)));
            let rs = f64s(rs);
            for qi in 0..b {
                let exact = |ri: usize| {
                    let (a, c) = (&qf[qi * d..(qi + 1) * d], &kf[ri * d..(ri + 1) * d]);
                    let dot: f64 = a.iter().zip(c).map(|(x, y)| x * y).sum();
                    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let nc = c.iter().map(|x| x * x).sum::<f64>().sqrt();
                    dot / (na * nc + 1e-8)
                };
                let ex = exclude.as_ref().map_or(u32::MAX, |e| e[qi]);
                let row = &i[qi * n..(qi + 1) * n];
                for j in 0..n {
                    let (sc, ix) = (s[qi * n + j], row[j]);
                    assert!(
                        (ix as usize) < m && ix != ex && !row[..j].contains(&ix),
                        "{name}: {what}: bad index {ix}"
                    );
                    assert!(
                        (sc - exact(ix as usize)).abs() <= 2e-5,
                        "{name}: {what}: score {sc} vs exact {}",
                        exact(ix as usize)
                    );
                    assert!(
                        (sc - rs[qi * n + j]).abs() <= 2e-5,
                        "{name}: {what}: score {sc} vs reference {}",
                        rs[qi * n + j]
                    );
                    if j > 0 {
                        let prev = s[qi * n + j - 1];
                        assert!(
                            prev > sc || (prev == sc && row[j - 1] < ix),
                            "{name}: {what}: order at {j}"
                        );
                    }
                }
                // top-n: nothing left out scores above the n-th
                if n > 0 {
                    let last = s[qi * n + n - 1];
                    for ri in (0..m).filter(|&ri| ri as u32 != ex && !row.contains(&(ri as u32))) {
                        assert!(
                            exact(ri) <= last + 4e-5,
                            "{name}: {what}: row {ri} ({}) left out above {last}",
                            exact(ri)
                        );
                    }
                }
            }
            outcomes[0] += 1;
        }
        if must_fail {
            let e = reference
                .err()
                .unwrap_or_else(|| panic!("reference: {what}: expected an error"));
            assert_one_line(&e, &what);
        }
    }
    println!(
        "cosine_topk: {} results checked, {} errors checked",
        outcomes[0], outcomes[1]
    );
    assert!(
        outcomes[0] >= n_cases as usize / 5 && outcomes[1] >= n_cases as usize / 5,
        "{outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// topk_rows

#[test]
fn topk_rows_property() {
    check_topk_rows(&[fused(topk_rows)], cases());
}

#[test]
fn cuda_topk_rows_property() {
    on_cuda("cuda_topk_rows_property", || {
        check_topk_rows(&[on_device(topk_rows_cuda)], cases())
    });
}

#[test]
fn emu_topk_rows_property() {
    check_topk_rows(&[emulated(topk_rows_emulated)], emu_cases());
}

/// Every case of `topk_rows` on each of `executors`.
fn check_topk_rows(executors: &[Executor<RowsOp>], n_cases: u64) {
    let mut outcomes = [0usize; 2];
    for seed in 0..n_cases {
        let r = &mut ChaCha8Rng::seed_from_u64(0x707 ^ seed);
        let b = pick(r, &[0, 1, 2, 5]);
        let l = pick(r, &[0, 1, 2, 7, 33]);
        let dt = pick(
            r,
            &[DType::F32, DType::F32, DType::F64, DType::F16, DType::U32],
        );
        // Executors without f64 (the emulated kernel) reject every F64 case; keep every other
        // one so the trimmed TSAN run (40 cases) still checks enough results.
        let dt = if dt == DType::F64 && executors.iter().all(|e| !e.f64) && seed % 2 == 0 {
            DType::F32
        } else {
            dt
        };
        let special = r.random_bool(0.3);
        let mut v = values(r, b * l, special);
        if r.random_bool(0.2) && v.len() > 1 {
            v[1] = v[0]; // an exact tie
        }
        let s = tensor(&[b, l], dt, random_view(r), &v);
        let k = count(r, l);
        let must_fail = !matches!(dt, DType::F32 | DType::F64) || k == 0 || k > l;
        let what = format!("topk_rows seed {seed}: B {b} L {l} k {k} {dt:?} special {special}");
        let sv = f64s(&s.to_dtype(DType::F64).unwrap());
        let has_nan = sv.iter().any(|x| x.is_nan());
        // candle's arg_sort (inside the reference) panics on NaN ("comparison function does
        // not correctly implement a total order"), so the reference only sees NaN-free rows.
        let reference = topk_rows_reference(&s, k);
        // the NaN policy: the first NaN in row-major order is the one named
        let first_nan = sv.iter().position(|x| x.is_nan()).map(|p| (p / l, p % l));
        if let (false, Some((bi, i))) = (must_fail, first_nan) {
            let e = reference.as_ref().err().map(text);
            let want =
                format!("topk_rows_reference: NaN score at row {bi}, column {i}; NaN has no rank");
            assert_eq!(e.as_deref(), Some(want.as_str()), "reference: {what}");
        }
        for ex in executors {
            let (name, op) = (ex.name, ex.op);
            let must_fail = must_fail || (!ex.f64 && dt == DType::F64);
            let got = op(&s, k);
            if must_fail {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("{name}: {what}: expected an error"));
                assert_one_line(&e, &what);
                outcomes[1] += 1;
                continue;
            }
            if let (true, Some((bi, i))) = (ex.nan_errors, first_nan) {
                let e = got.err().map(|e| text(&e));
                let want = format!("topk_rows: NaN score at row {bi}, column {i}; NaN has no rank");
                assert_eq!(e.as_deref(), Some(want.as_str()), "{name}: {what}");
                outcomes[1] += 1;
                continue;
            }
            let (vals, idx) = got.unwrap_or_else(|e| panic!("{name}: {what}: {}", text(&e)));
            assert_eq!(
                (vals.dims(), idx.dims()),
                (&[b, k][..], &[b, k][..]),
                "{name}: {what}"
            );
            assert_eq!(vals.dtype(), dt, "{name}: {what}");
            let (vals, idx) = (f64s(&vals), u32s(&idx));
            for bi in 0..b {
                let row = &sv[bi * l..(bi + 1) * l];
                let want = oracle_topk(row, k);
                assert_eq!(
                    &idx[bi * k..(bi + 1) * k],
                    &want[..],
                    "{name}: {what}: row {bi}"
                );
                for (j, &w) in want.iter().enumerate() {
                    let (g, x) = (vals[bi * k + j], row[w as usize]);
                    assert!(
                        g == x || (g.is_nan() && x.is_nan()),
                        "{name}: {what}: value {g} vs {x}"
                    );
                }
            }
            if !has_nan {
                let (_, ri) = reference
                    .as_ref()
                    .unwrap_or_else(|e| panic!("reference: {what}: {}", text(e)));
                assert_eq!(u32s(ri), idx, "reference: {what}");
            }
            outcomes[0] += 1;
        }
        if must_fail {
            assert_one_line(
                &reference
                    .err()
                    .unwrap_or_else(|| panic!("reference: {what}: expected an error")),
                &what,
            );
        }
    }
    println!(
        "topk_rows: {} results checked, {} errors checked",
        outcomes[0], outcomes[1]
    );
    // Two of five dtypes, k = 0 and k > L are errors, so results are the rarer outcome (7 of
    // the 40 cases of the trimmed TSAN run): the floor only guards against a generator that
    // degenerated into one outcome.
    assert!(
        outcomes[0] >= n_cases as usize / 8 && outcomes[1] >= n_cases as usize / 8,
        "{outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// dissonance_topk

#[test]
fn dissonance_topk_property() {
    check_dissonance_topk(&[fused(dissonance_topk)], cases());
}

#[test]
fn cuda_dissonance_topk_property() {
    on_cuda("cuda_dissonance_topk_property", || {
        check_dissonance_topk(&[on_device(dissonance_topk_cuda)], cases())
    });
}

#[test]
fn emu_dissonance_topk_property() {
    check_dissonance_topk(&[emulated(dissonance_topk_emulated)], emu_cases());
}

/// Every case of `dissonance_topk` on each of `executors`.
fn check_dissonance_topk(executors: &[Executor<DisOp>], n_cases: u64) {
    let mut outcomes = [0usize; 2];
    for seed in 0..n_cases {
        let r = &mut ChaCha8Rng::seed_from_u64(0xD15 ^ seed);
        let b = pick(r, &[0, 1, 2, 4, 3]);
        let l = pick(r, &[0, 1, 3, 9, 5, 6]);
        let d = pick(r, &[0, 1, 5, 16, 8, 3]);
        let la = pick(r, &[0, 1, 4, 2, 3]);
        let dt = pick(
            r,
            &[
                DType::F32,
                DType::F32,
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::F64,
                DType::U32,
            ],
        );
        let ctx_dt = if r.random_bool(0.9) {
            dt
        } else {
            pick(r, &[DType::F32, DType::F16])
        };
        let special = r.random_bool(0.2);
        let p = tensor(
            &[b, l, d],
            dt,
            random_view(r),
            &values(r, b * l * d, special),
        );
        let anchor = r.random_bool(0.4);
        let g = tensor(&[b, d], ctx_dt, random_view(r), &{
            let sp = special && r.random_bool(0.3);
            values(r, b * d, sp)
        });
        let h = tensor(&[b, la, d], ctx_dt, random_view(r), &{
            let sp = special && r.random_bool(0.3);
            values(r, b * la * d, sp)
        });
        let mask_dt = pick(r, &[DType::F32, DType::U8, DType::F16]);
        let mask = (!anchor && r.random_bool(0.5)).then(|| {
            // 0/1 weights; some rows without any valid token
            let mv: Vec<f32> = (0..b * la)
                .map(|_| if r.random_bool(0.6) { 1.0 } else { 0.0 })
                .collect();
            tensor(&[b, la], mask_dt, random_view(r), &mv)
        });
        let ctx = if anchor {
            Context::Anchor(&g)
        } else {
            Context::Tokens {
                h_avl: &h,
                mask: mask.as_ref(),
            }
        };
        let k = count(r, l);
        let float = |t: DType| matches!(t, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
        let must_fail = !float(dt)
            || ctx_dt != dt
            || k == 0
            || k > l
            || d == 0
            || (!anchor && la == 0)
            || (mask.is_some() && mask_dt == DType::F16);
        let what = format!(
            "dissonance_topk seed {seed}: B {b} L {l} D {d} La {la} k {k} {dt:?} ctx {ctx_dt:?} anchor {anchor} mask {:?} special {special}",
            mask.as_ref().map(|m| m.dtype())
        );
        let reference = dissonance_topk_reference(&p, ctx, k);
        // Where a NaN delta may come from: a non-finite value in P's row or in the context
        // row (tokens: any of the row's tokens, masked ones included, since the reference's
        // masked mean multiplies them by 0).
        let (pv_all, gv_all, hv_all) = (f64s(&p), f64s(&g), f64s(&h));
        let may_nan = |bi: usize, i: usize| {
            let p_bad = pv_all[(bi * l + i) * d..(bi * l + i + 1) * d]
                .iter()
                .any(|x| !x.is_finite());
            let ctx_bad = if anchor {
                gv_all[bi * d..(bi + 1) * d].iter().any(|x| !x.is_finite())
            } else {
                hv_all[bi * la * d..(bi + 1) * la * d]
                    .iter()
                    .any(|x| !x.is_finite())
            };
            p_bad || ctx_bad
        };
        // A NaN-delta error must name a (row, token) whose inputs are not all finite.
        let check_nan_error = |e: &r2scp::Error, op: &str, who: &str| {
            let t = text(e);
            let Some(rest) = t.strip_prefix(&format!("{op}: NaN delta at batch row ")) else {
                panic!("{who}: {what}: unexpected error {t:?}");
            };
            let nums: Vec<usize> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|x| !x.is_empty())
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            assert!(
                nums.len() == 2 && nums[0] < b && nums[1] < l && may_nan(nums[0], nums[1]),
                "{who}: {what}: {t:?} names a row whose inputs are finite"
            );
        };
        if !must_fail {
            if let Err(e) = &reference {
                check_nan_error(e, "dissonance_topk_reference", "reference");
            }
        }
        for ex in executors {
            let (name, op) = (ex.name, ex.op);
            let must_fail = must_fail || (!ex.f64 && dt == DType::F64);
            let got = op(&p, ctx, k);
            if must_fail {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("{name}: {what}: expected an error"));
                assert_one_line(&e, &what);
                outcomes[1] += 1;
                continue;
            }
            if ex.nan_errors {
                if let Err(e) = &got {
                    check_nan_error(e, "dissonance_topk", name);
                    outcomes[1] += 1;
                    continue;
                }
            }
            let out = got.unwrap_or_else(|e| panic!("{name}: {what}: {}", text(&e)));
            if ex.nan_errors {
                assert!(
                    !f64s(&out.delta).iter().any(|x| x.is_nan()),
                    "{name}: {what}: a NaN delta passed the NaN policy"
                );
            }
            assert_eq!(out.delta.dims(), [b, l], "{name}: {what}");
            assert_eq!(out.noise_idx.dims(), [b, k], "{name}: {what}");
            assert_eq!(out.noise_mask.dims(), [b, l], "{name}: {what}");
            // oracle delta in f64 from the rounded inputs
            let pv = f64s(&p);
            let gv: Vec<f64> = if anchor {
                f64s(&g)
            } else {
                let hv = f64s(&h);
                let mv = mask.as_ref().map(f64s);
                (0..b)
                    .flat_map(|bi| {
                        let w: Vec<f64> = (0..la)
                            .map(|t| mv.as_ref().map_or(1.0, |m| m[bi * la + t]))
                            .collect();
                        let total: f64 = w.iter().sum();
                        (0..d)
                            .map(|c| {
                                if total == 0.0 {
                                    0.0
                                } else {
                                    (0..la)
                                        .map(|t| w[t] * hv[(bi * la + t) * d + c])
                                        .sum::<f64>()
                                        / total
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let delta = f64s(&out.delta);
            let idx = u32s(&out.noise_idx);
            let nm = f64s(&out.noise_mask);
            let tol = if dt == DType::F64 { 1e-9 } else { 1e-4 };
            for bi in 0..b {
                let gb = &gv[bi * d..(bi + 1) * d];
                let ng = gb.iter().map(|x| x * x).sum::<f64>().sqrt();
                for i in 0..l {
                    let pr = &pv[(bi * l + i) * d..(bi * l + i + 1) * d];
                    let dot: f64 = pr.iter().zip(gb).map(|(x, y)| x * y).sum();
                    let np = pr.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let want = 1.0 - dot / (np * ng + 1e-8);
                    let got = delta[bi * l + i];
                    assert!(
                        same_nan_or_close(got, want, tol),
                        "{name}: {what}: delta[{bi}, {i}] {got} vs {want}"
                    );
                }
                let row = &delta[bi * l..(bi + 1) * l];
                assert_eq!(
                    &idx[bi * k..(bi + 1) * k],
                    &oracle_topk(row, k)[..],
                    "{name}: {what}: row {bi}"
                );
                for i in 0..l {
                    let want = if idx[bi * k..(bi + 1) * k].contains(&(i as u32)) {
                        1.0
                    } else {
                        0.0
                    };
                    assert_eq!(
                        nm[bi * l + i],
                        want,
                        "{name}: {what}: noise_mask[{bi}, {i}]"
                    );
                }
            }
            if !special {
                let rd = f64s(
                    &reference
                        .as_ref()
                        .unwrap_or_else(|e| panic!("reference: {what}: {}", text(e)))
                        .delta,
                );
                for (x, y) in delta.iter().zip(&rd) {
                    assert!(
                        same_nan_or_close(*x, *y, tol),
                        "reference: {what}: delta {x} vs {y}"
                    );
                }
            }
            outcomes[0] += 1;
        }
        if must_fail {
            assert_one_line(
                &reference
                    .err()
                    .unwrap_or_else(|| panic!("reference: {what}: expected an error")),
                &what,
            );
        }
    }
    println!(
        "dissonance_topk: {} results checked, {} errors checked",
        outcomes[0], outcomes[1]
    );
    assert!(
        outcomes[0] >= n_cases as usize / 5 && outcomes[1] >= n_cases as usize / 5,
        "{outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// gather_inject

#[test]
fn gather_inject_property() {
    check_gather_inject(&[fused(gather_inject)], cases());
}

#[test]
fn cuda_gather_inject_property() {
    on_cuda("cuda_gather_inject_property", || {
        check_gather_inject(&[on_device(gather_inject_cuda)], cases())
    });
}

#[test]
fn emu_gather_inject_property() {
    check_gather_inject(&[emulated(gather_inject_emulated)], emu_cases());
}

/// Every case of `gather_inject` on each of `executors`.
fn check_gather_inject(executors: &[Executor<InjOp>], n_cases: u64) {
    let mut outcomes = [0usize; 2];
    for seed in 0..n_cases {
        let r = &mut ChaCha8Rng::seed_from_u64(0x1D7 ^ seed);
        let b = pick(r, &[0, 1, 2, 4, 3]);
        let l = pick(r, &[0, 1, 3, 8, 5, 6]);
        let ls = pick(r, &[0, 1, 2, 6, 4, 3]);
        let d = pick(r, &[0, 1, 4, 3, 2, 7]);
        let dt = pick(
            r,
            &[
                DType::F32,
                DType::F32,
                DType::F32,
                DType::F16,
                DType::F16,
                DType::BF16,
                DType::F64,
                DType::U32,
            ],
        );
        let src_dt = if r.random_bool(0.9) {
            dt
        } else {
            pick(r, &[DType::F32, DType::BF16])
        };
        let special = r.random_bool(0.2);
        let h = tensor(
            &[b, l, d],
            dt,
            random_view(r),
            &values(r, b * l * d, special),
        );
        let src = tensor(
            &[b, ls, d],
            src_dt,
            random_view(r),
            &values(r, b * ls * d, special),
        );
        let k = match count(r, l) {
            usize::MAX => 3 * l + 2, // an index tensor cannot have usize::MAX columns
            k => k,
        };
        let mut noise: Vec<u32> = Vec::with_capacity(b * k);
        let mut sal: Vec<u32> = Vec::with_capacity(b * k);
        for _ in 0..b {
            let mut perm: Vec<u32> = (0..l as u32).collect();
            perm.shuffle(r);
            for j in 0..k {
                noise.push(
                    perm.get(j)
                        .copied()
                        .unwrap_or_else(|| r.random_range(0..l.max(1) as u32)),
                );
                sal.push(r.random_range(0..ls.max(1) as u32));
            }
        }
        let mut broken = false;
        if b * k > 0 && r.random_bool(0.1) {
            broken = true;
            let at = r.random_range(0..b * k);
            match r.random_range(0..4) {
                0 => noise[at] = l as u32,
                1 => noise[at] = u32::MAX,
                2 => sal[at] = ls as u32,
                _ if k >= 2 => noise[at - at % k + 1] = noise[at - at % k], // a repeat in a row
                _ => noise[at] = l as u32,
            }
        }
        let idx_dt = if r.random_bool(0.97) {
            DType::U32
        } else {
            DType::I64
        };
        let mk_idx = |v: &[u32], r: &mut ChaCha8Rng| {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            // exact as f32 only below 2^24; out-of-range markers are built directly
            if v.iter().all(|&x| x < (1 << 24)) {
                tensor(&[b, k], idx_dt, random_view(r), &f)
            } else {
                Tensor::from_vec(v.to_vec(), (b, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(idx_dt)
                    .unwrap()
            }
        };
        // the checks below read the indices back from the (possibly strided) views
        let noise_t = mk_idx(&noise, r);
        let sal_t = mk_idx(&sal, r);
        let noise_v = u32s(&noise_t.to_dtype(DType::U32).unwrap());
        let sal_v = u32s(&sal_t.to_dtype(DType::U32).unwrap());
        let in_range =
            noise_v.iter().all(|&n| (n as usize) < l) && sal_v.iter().all(|&s| (s as usize) < ls);
        let distinct = (0..b).all(|bi| {
            let row = &noise_v[bi * k..(bi + 1) * k];
            (0..k).all(|j| !row[..j].contains(&row[j]))
        });
        let float = matches!(dt, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
        let must_fail = !float
            || src_dt != dt
            || idx_dt != DType::U32
            || k == 0
            || k > l
            || !in_range
            || !distinct
            || d == 0;
        let what = format!("gather_inject seed {seed}: B {b} L {l} Ls {ls} D {d} k {k} {dt:?} src {src_dt:?} idx {idx_dt:?} broken {broken} special {special}");
        let reference = gather_inject_reference(&h, &src, &noise_t, &sal_t);
        for ex in executors {
            let (name, op) = (ex.name, ex.op);
            let must_fail = must_fail || (!ex.f64 && dt == DType::F64);
            let got = op(&h, &src, &noise_t, &sal_t);
            if must_fail {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("{name}: {what}: expected an error"));
                assert_one_line(&e, &what);
                outcomes[1] += 1;
                continue;
            }
            let out = got.unwrap_or_else(|e| panic!("{name}: {what}: {}", text(&e)));
            assert_eq!(
                (out.dims(), out.dtype()),
                (&[b, l, d][..], dt),
                "{name}: {what}"
            );
            let (hv, sv, ov) = (f64s(&h), f64s(&src), f64s(&out));
            let mut want = hv.clone();
            for bi in 0..b {
                for j in 0..k {
                    let (n, s) = (noise_v[bi * k + j] as usize, sal_v[bi * k + j] as usize);
                    want[(bi * l + n) * d..(bi * l + n + 1) * d]
                        .copy_from_slice(&sv[(bi * ls + s) * d..(bi * ls + s + 1) * d]);
                }
            }
            for (i, (g, w)) in ov.iter().zip(&want).enumerate() {
                assert!(
                    g == w || (g.is_nan() && w.is_nan()),
                    "{name}: {what}: out[{i}] {g} vs {w}"
                );
            }
            if !special {
                let rv = f64s(
                    reference
                        .as_ref()
                        .unwrap_or_else(|e| panic!("reference: {what}: {}", text(e))),
                );
                assert_eq!(rv, ov, "reference: {what}");
            }
            outcomes[0] += 1;
        }
        if must_fail {
            assert_one_line(
                &reference
                    .err()
                    .unwrap_or_else(|| panic!("reference: {what}: expected an error")),
                &what,
            );
        }
    }
    println!(
        "gather_inject: {} results checked, {} errors checked",
        outcomes[0], outcomes[1]
    );
    assert!(
        outcomes[0] >= n_cases as usize / 5 && outcomes[1] >= n_cases as usize / 5,
        "{outcomes:?}"
    );
}
