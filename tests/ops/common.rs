//! Shared helpers of the op tests: random inputs, exact top-k, the dissonance and injection
//! cases, finite differences, error assertions, and the emulated-case count.

use candle_core::{DType, Device, Result, Tensor, Var};
use r2scp::cap::{dissonance_topk_reference, Context};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform(-1, 1) values, stored as `dtype`.
pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub fn tensor(v: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

pub fn tensor64(v: Vec<f64>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

pub fn to_f32_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_dtype(DType::F32)?.to_vec2::<f32>()
}

pub fn to_u32_rows(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    t.to_vec2::<u32>()
}

/// The exact expected top-k of `row` by the CAP order (larger first, ties to the lower index).
pub fn exact_topk(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        let (va, vb) = (row[a as usize], row[b as usize]);
        vb.partial_cmp(&va).unwrap().then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Checks a top-k answer `got` (indices) for one row against reference values `ref_row`:
/// position by position, the reference value at the chosen index equals the reference top-k
/// value within `tol`, and where the reference order is unambiguous (gaps > tol on both sides)
/// the index itself is exact. Indices must be distinct and in range.
pub fn check_topk_row(ref_row: &[f32], got: &[u32], k: usize, tol: f32, ctx: &str) {
    assert_eq!(got.len(), k, "{ctx}: wrong k");
    let want = exact_topk(ref_row, k);
    let mut sorted_vals: Vec<f32> = ref_row.to_vec();
    sorted_vals.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut seen = std::collections::HashSet::new();
    for j in 0..k {
        let gi = got[j] as usize;
        assert!(gi < ref_row.len(), "{ctx}: index {gi} out of range");
        assert!(seen.insert(gi), "{ctx}: index {gi} repeated");
        let gv = ref_row[gi];
        let wv = sorted_vals[j];
        assert!(
            (gv - wv).abs() <= tol,
            "{ctx}: position {j}: chose {gi} (ref value {gv}), reference top value {wv}"
        );
        let prev_gap = if j == 0 {
            f32::INFINITY
        } else {
            sorted_vals[j - 1] - wv
        };
        let next_gap = if j + 1 < sorted_vals.len() {
            wv - sorted_vals[j + 1]
        } else {
            f32::INFINITY
        };
        if prev_gap > tol && next_gap > tol {
            assert_eq!(
                got[j], want[j],
                "{ctx}: position {j}: unambiguous index differs"
            );
        }
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A random dissonance problem: P, context tokens or anchor, optional mask.
pub struct DisCase {
    pub b: usize,
    pub l: usize,
    pub la: usize,
    pub d: usize,
    pub k: usize,
    pub dtype: DType,
    pub p: Tensor,
    pub h: Tensor,
    pub anchor: Tensor,
    pub mask: Option<Tensor>,
    pub use_anchor: bool,
}

pub fn dis_case(seed: u64) -> Result<DisCase> {
    let mut r = rng(seed);
    let b = r.random_range(1..=5usize);
    let l = r.random_range(1..=40usize);
    let la = r.random_range(1..=20usize);
    let d = if seed.is_multiple_of(7) {
        r.random_range(100..=300usize)
    } else {
        r.random_range(1..=70usize)
    };
    let k = r.random_range(1..=l);
    let dtype = DTYPES[(seed % 3) as usize];
    let mut pv = rand_vec(&mut r, b * l * d);
    // ties: exact duplicate rows and zero rows
    if l > 1 && r.random_bool(0.5) {
        for _ in 0..r.random_range(1..=l) {
            let (bi, src, dst) = (
                r.random_range(0..b),
                r.random_range(0..l),
                r.random_range(0..l),
            );
            let row: Vec<f32> = pv[(bi * l + src) * d..(bi * l + src + 1) * d].to_vec();
            pv[(bi * l + dst) * d..(bi * l + dst + 1) * d].copy_from_slice(&row);
        }
    }
    if r.random_bool(0.2) {
        let (bi, i) = (r.random_range(0..b), r.random_range(0..l));
        pv[(bi * l + i) * d..(bi * l + i + 1) * d].fill(0.0);
    }
    // non-contiguous P for some cases: built as [B, D, L] and transposed
    let p = if seed.is_multiple_of(5) {
        let mut t = vec![0f32; b * l * d];
        for bi in 0..b {
            for i in 0..l {
                for c in 0..d {
                    t[(bi * d + c) * l + i] = pv[(bi * l + i) * d + c];
                }
            }
        }
        tensor(t, &[b, d, l], dtype)?.transpose(1, 2)?
    } else {
        tensor(pv, &[b, l, d], dtype)?
    };
    let h = tensor(rand_vec(&mut r, b * la * d), &[b, la, d], dtype)?;
    let anchor = tensor(rand_vec(&mut r, b * d), &[b, d], dtype)?;
    let mode = seed % 4;
    let mask = if mode == 1 || mode == 2 {
        let mut m: Vec<f32> = (0..b * la)
            .map(|_| if r.random_bool(0.7) { 1.0 } else { 0.0 })
            .collect();
        if r.random_bool(0.3) {
            let bi = r.random_range(0..b);
            m[bi * la..(bi + 1) * la].fill(0.0); // a row with no valid token
        }
        let m = Tensor::from_vec(m, (b, la), &Device::Cpu)?;
        Some(if mode == 2 { m.to_dtype(DType::U8)? } else { m })
    } else {
        None
    };
    Ok(DisCase {
        b,
        l,
        la,
        d,
        k,
        dtype,
        p,
        h,
        anchor,
        mask,
        use_anchor: mode == 3,
    })
}

impl DisCase {
    pub fn ctx(&self) -> Context<'_> {
        if self.use_anchor {
            Context::Anchor(&self.anchor)
        } else {
            Context::Tokens {
                h_avl: &self.h,
                mask: self.mask.as_ref(),
            }
        }
    }

    pub fn name(&self, seed: u64) -> String {
        format!(
            "seed {seed}: B={} L={} La={} D={} k={} {:?} anchor={} mask={}",
            self.b,
            self.l,
            self.la,
            self.d,
            self.k,
            self.dtype,
            self.use_anchor,
            self.mask.is_some()
        )
    }
}

/// Checks (delta, idx, mask) of an implementation against the reference for one case.
pub fn check_dissonance(
    c: &DisCase,
    name: &str,
    delta: &Tensor,
    idx: &Tensor,
    mask: &Tensor,
) -> Result<()> {
    let reference = dissonance_topk_reference(&c.p, c.ctx(), c.k)?;
    assert_eq!(delta.dims(), [c.b, c.l], "{name}");
    assert_eq!(delta.dtype(), DType::F32, "{name}");
    assert_eq!(idx.dims(), [c.b, c.k], "{name}");
    assert_eq!(mask.dims(), [c.b, c.l], "{name}");
    let (dv, rv) = (to_f32_rows(delta)?, to_f32_rows(&reference.delta)?);
    let iv = to_u32_rows(idx)?;
    let mv = to_f32_rows(mask)?;
    let tol = 2e-5;
    for bi in 0..c.b {
        let diff = max_abs_diff(&dv[bi], &rv[bi]);
        assert!(diff <= tol, "{name}: row {bi}: delta differs by {diff}");
        // own order: exact, ties to the lower index
        assert_eq!(
            iv[bi],
            exact_topk(&dv[bi], c.k),
            "{name}: row {bi}: order of own delta"
        );
        check_topk_row(
            &rv[bi],
            &iv[bi],
            c.k,
            2.0 * tol,
            &format!("{name}: row {bi}"),
        );
        let mut want = vec![0f32; c.l];
        for &i in &iv[bi] {
            want[i as usize] = 1.0;
        }
        assert_eq!(mv[bi], want, "{name}: row {bi}: noise mask");
    }
    Ok(())
}

/// A random injection problem: distinct noise indices per row, salient indices with repeats.
pub struct InjCase {
    pub b: usize,
    pub l: usize,
    pub ls: usize,
    pub d: usize,
    pub k: usize,
    pub h: Tensor,
    pub src: Tensor,
    pub noise: Tensor,
    pub sal: Tensor,
}

pub fn inj_case(seed: u64, dtype: DType) -> Result<InjCase> {
    let mut r = rng(1000 + seed);
    let b = r.random_range(1..=5usize);
    let l = r.random_range(1..=40usize);
    let ls = r.random_range(1..=30usize);
    let d = r.random_range(1..=80usize);
    let k = r.random_range(1..=l);
    let h = tensor(rand_vec(&mut r, b * l * d), &[b, l, d], dtype)?;
    let src = tensor(rand_vec(&mut r, b * ls * d), &[b, ls, d], dtype)?;
    let mut noise = Vec::with_capacity(b * k);
    let mut sal = Vec::with_capacity(b * k);
    for _ in 0..b {
        let mut perm: Vec<u32> = (0..l as u32).collect();
        perm.shuffle(&mut r);
        noise.extend_from_slice(&perm[..k]);
        for _ in 0..k {
            sal.push(r.random_range(0..ls as u32));
        }
    }
    let noise = Tensor::from_vec(noise, (b, k), &Device::Cpu)?;
    let sal = Tensor::from_vec(sal, (b, k), &Device::Cpu)?;
    Ok(InjCase {
        b,
        l,
        ls,
        d,
        k,
        h,
        src,
        noise,
        sal,
    })
}

/// Random cases per emulated-kernel test: 210, or `R2SCP_EMU_CASES` (the ThreadSanitizer run
/// in `.ci/run` trims it: TSAN slows the emulator about tenfold).
pub fn emu_cases() -> u64 {
    std::env::var("R2SCP_EMU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(210)
}

pub fn zeros(s: &[usize], dt: DType) -> Tensor {
    Tensor::zeros(s, dt, &Device::Cpu).expect("zeros")
}

pub fn u32s(v: Vec<u32>, s: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, s, &Device::Cpu).expect("u32 tensor")
}

pub fn expect_err<T, E: std::fmt::Display>(r: std::result::Result<T, E>, needle: &str) {
    match r {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not contain {needle:?}"
            );
            assert!(!msg.contains('\n'), "error {msg:?} is not one line");
        }
    }
}

pub const FD_EPS: f64 = 1e-6;

pub fn rand64(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-1.0f64..1.0)).collect()
}

pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Central differences of `f` at `x` for the coordinates in `which`.
pub fn fd(x: &[f64], which: &[usize], f: &dyn Fn(&[f64]) -> Result<f64>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(which.len());
    let mut y = x.to_vec();
    for &i in which {
        y[i] = x[i] + FD_EPS;
        let fp = f(&y)?;
        y[i] = x[i] - FD_EPS;
        let fm = f(&y)?;
        y[i] = x[i];
        out.push((fp - fm) / (2.0 * FD_EPS));
    }
    Ok(out)
}

pub fn assert_close(analytic: &[f64], numeric: &[f64], what: &str) {
    assert_eq!(analytic.len(), numeric.len(), "{what}");
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let tol = 1e-6 + 1e-5 * n.abs().max(a.abs());
        assert!(
            (a - n).abs() <= tol,
            "{what}[{i}]: analytic {a} vs finite difference {n}"
        );
    }
}

/// [`assert_close`] at f32 precision: gradients computed in f32 by two implementations
/// (different summation orders) agree to a few ulps of their scale.
pub fn assert_close_f32(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1.0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

pub fn grad_vec(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Vec<f64>> {
    match grads.get(v.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>(),
        None => Ok(vec![0.0; v.elem_count()]),
    }
}

/// `v` as a contiguous tensor of `shape` in `dtype` that starts `off` elements into its
/// storage (a narrowed view): its base address is 16-byte aligned or not depending on `off`.
pub fn at_offset(v: &[f32], off: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let mut all = vec![0.5f32; off];
    all.extend_from_slice(v);
    tensor(all, &[off + v.len()], dtype)?
        .narrow(0, off, v.len())?
        .reshape(shape)
}

/// Whether `t`'s first element is 16-byte aligned (the kernels' 16-byte load condition).
pub fn aligned16(t: &Tensor) -> bool {
    let (p, _g) = r2scp::kernel::tensor_ptr(t, "test").expect("contiguous tensor");
    p.addr().is_multiple_of(16)
}

/// The top-k of `row` with NaN ranked last (after -inf, by index), ties to the lower index:
/// the kernels' order.
pub fn nan_last_topk(row: &[f32], k: usize) -> Vec<u32> {
    let key = |i: u32| {
        let v = row[i as usize];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    };
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| key(b).partial_cmp(&key(a)).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx
}
