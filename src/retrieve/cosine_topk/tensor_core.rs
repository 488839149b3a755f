//! The tensor-core path of `cosine_topk` for large batches: launch plan and device path of
//! `kernels/cosine_topk_tc.cuh`, one code for the CUDA device and the emulator (both through
//! [`Launcher`]). `kernel.rs` and `dispatch.rs` decide when it runs (opt-in: a measured
//! dispatch table or the override).
//!
//! Launches, all queued, nothing read back:
//! 1. `cosine_topk_prep_<dt>` (`rescore.rs`): unit queries `q / |q|` in the operand type
//!    (bf16, f16, or f32 read as tf32), zero-padded to `[query tiles x TC_BQ, d_pad]`,
//!    `COS_EPS / |q|`, the per-call counters reset.
//! 2. `cosine_topk_tc_<dt>`: grid `(query tiles, bank chunks)`. A block keeps its query tile and
//!    streams its chunk of the bank through the tensor cores (ldmatrix + mma.sync, f32
//!    accumulation); each tile of scores is filtered in registers against the query's running
//!    n-th best less [`margin`], and what passes is appended to the query's candidate list
//!    (`[B, capq]` in the workspace). The B x M scores never reach global memory. The grid is
//!    one wave of the pass's real occupancy ([`plan`]).
//! 3. The exact stage shared with the GEMM + select path (`rescore.rs`): the exact f32 score
//!    (the bandwidth kernel's arithmetic) of every candidate within [`margin`] of the n-th best
//!    approximate score and the top n of those; queries whose candidates overflowed are
//!    answered by the device-side exact fallback; a failed call's scores turn NaN.
//!
//! The result equals the bandwidth kernel's: the margin is twice a bound on |approximate -
//! exact score| (docs/DESIGN.md, "Tensor-core path"), so every row of the exact top n is
//! rescored. Errors follow the bandwidth kernel's no-sync contract (`kernel.rs`, "NaN
//! contract"): the kernels report into the call's error word, which nothing reads before the
//! caller's check. Scratch buffers come from the device's workspace.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{DeviceCall, DeviceTopN};
use super::rescore::{
    elt, error_bound_with, launch_exact, launch_prep, margin_of, plan_exact_on, CallInputs,
    SharedScratch,
};
use crate::error::bail;
use crate::kernel::abi::{
    CosineTopkTcArgs, TC_BK, TC_BQ, TC_HITS, TC_MIN_BLOCKS, TC_NL_MAX, TC_SLICE_BYTES, TC_STAGES,
    TC_THREADS,
};
use crate::kernel::workspace::{at, Carve, Workspaces};
use crate::kernel::{entry, to_u32, LaunchPlan, Launcher};
use candle_core::{DType, Result, Tensor};

/// Largest n the tensor-core path serves (its threshold lists hold the next power of two
/// >= n, and the first tile's 128 scores of a query seed them).
pub const NMAX: usize = TC_NL_MAX as usize;

/// Most bytes the candidate lists (`B x capq` pairs) may take; above it the op keeps the
/// bandwidth kernel.
pub const MAX_CANDIDATE_BYTES: u64 = 2 << 30;

/// Bound on |approximate score - exact score| of the tensor-core pass for dimension `d` and
/// keys of `dtype` (docs/DESIGN.md, "Tensor-core path": operand rounding of the unit query
/// and, for f32 keys, of the key to tf32; subnormal flushing of f16 operands; f32 rounding in
/// the norms, the accumulation (with truncating adds) and the exact path). Holds when
/// `key_norms` are the keys' norms as [`super::key_norms`] computes them.
pub fn error_bound(d: usize, dtype: DType) -> Result<f64> {
    let (u_q, u_k, tau) = match dtype {
        DType::BF16 => (2f64.powi(-8), 0.0, 2f64.powi(-120)),
        DType::F16 => (2f64.powi(-11), 0.0, 2f64.powi(-25)),
        DType::F32 => (2f64.powi(-11), 2f64.powi(-11), 2f64.powi(-120)),
        dt => bail!("cosine_topk tensor-core path: no kernel for keys of dtype {dt:?}"),
    };
    Ok(error_bound_with(d, u_q, u_k, tau))
}

/// The candidate margin: twice [`error_bound`], rounded up to f32.
pub fn margin(d: usize, dtype: DType) -> Result<f32> {
    Ok(margin_of(error_bound(d, dtype)?))
}

/// Elements of one k-slice (a stage row: 32 16-bit or 16 f32 elements).
pub fn slice_len(dtype: DType) -> Result<u32> {
    Ok(TC_SLICE_BYTES / elt(dtype)?)
}

/// Threshold-list length of the pass for top-n: the next power of two >= n, at least 32 (the
/// lists are sorted by a bitonic network and updated 32 entries per lane pass).
pub fn list_len(n: usize) -> u32 {
    (n.next_power_of_two() as u32).max(32)
}

/// Dynamic shared memory of the pass for threshold lists of `nl` entries: 128 bytes of
/// alignment slack, `TC_STAGES` stages of `(TC_BQ + TC_BK)` rows of `TC_SLICE_BYTES` and
/// `TC_BK` key norms, the lists `[TC_BQ][nl]` f32, per query 3 filter constants, the
/// `TC_HITS` hit buffer, its count and eps / |q| (kernels/cosine_topk_tc.cuh).
pub fn pass_smem(nl: u32) -> u64 {
    let q = TC_BQ as u64;
    let stage = (TC_BQ + TC_BK) as u64 * TC_SLICE_BYTES as u64 + TC_BK as u64 * 4;
    128 + TC_STAGES as u64 * stage + q * nl as u64 * 4 + q * (3 + TC_HITS as u64 + 2) * 4
}

/// The largest n whose pass fits `max_smem` bytes of dynamic shared memory (0: none).
pub fn max_n(max_smem: u32) -> usize {
    let mut nl = TC_NL_MAX;
    while nl >= 32 {
        if pass_smem(nl) <= max_smem as u64 {
            return nl as usize;
        }
        nl /= 2;
    }
    0
}

/// The pass of one call (the prep and the exact stage are planned in `rescore.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcPlan {
    /// `cosine_topk_tc`: grid (query tiles, bank chunks).
    pub pass: LaunchPlan,
    /// Row length of the unit queries (D rounded up to a k-slice).
    pub d_pad: u32,
    /// Threshold-list length ([`list_len`]).
    pub nl: u32,
    /// Bank rows per block of the pass (a multiple of `TC_BK`).
    pub chunk_rows: u32,
    /// Candidate capacity per query.
    pub capq: u32,
}

impl TcPlan {
    /// Rows of the unit-query buffer (query tiles x `TC_BQ`).
    pub fn query_rows(&self) -> u32 {
        self.pass.grid.0 * TC_BQ
    }
}

/// Plans the pass for B queries, M bank rows, dimension D, top-n, keys of `dtype`, on
/// a device with `sm_count` multiprocessors and `max_smem` bytes of opt-in shared memory per
/// block; `resident(pass)` is how many blocks of the pass (its block and shared memory) one
/// multiprocessor holds ([`Launcher::resident_blocks`]). The pass's grid is one wave: query
/// tiles x bank chunks <= `sm_count x resident`. Errors (naming the limit) when the shape is
/// outside what the path serves: n above [`NMAX`], D not a whole number of 16-byte chunks,
/// shared memory or candidate memory over budget.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    b: usize,
    m: usize,
    d: usize,
    n: usize,
    dtype: DType,
    sm_count: u32,
    max_smem: u32,
    resident: &dyn Fn(&LaunchPlan) -> Result<u32>,
) -> Result<TcPlan> {
    const OP: &str = "cosine_topk tensor-core path";
    if b == 0 || m == 0 || d == 0 || n == 0 {
        bail!("{OP}: empty shape B = {b}, M = {m}, D = {d}, n = {n}");
    }
    if n > NMAX {
        bail!("{OP}: n = {n} above its largest n = {NMAX}");
    }
    let e = elt(dtype)?;
    if !d.is_multiple_of((16 / e) as usize) {
        bail!(
            "{OP}: D = {d} is not a multiple of {} ({dtype:?} rows are copied in 16-byte chunks)",
            16 / e
        );
    }
    let (b32, m32, d32) = (
        to_u32(b, "B", OP)?,
        to_u32(m, "M", OP)?,
        to_u32(d, "D", OP)?,
    );
    let slice = slice_len(dtype)?;
    let d_pad = d32.div_ceil(slice) * slice;
    let nl = list_len(n);
    let smem = pass_smem(nl);
    if smem > max_smem as u64 {
        bail!("{OP}: {smem} bytes of shared memory for n = {n}, the device allows {max_smem}");
    }
    let gq = b32.div_ceil(TC_BQ);
    let tiles = m32.div_ceil(TC_BK);
    let mut pass = LaunchPlan {
        grid: (gq, 1, 1),
        block: (TC_THREADS, 1, 1),
        smem_bytes: smem as u32,
    };
    // One wave: never more blocks than the multiprocessors hold at once (a lone second wave
    // would double the time), the chunks of a query tile side by side.
    let slots = sm_count.max(1) * resident(&pass)?.max(1);
    let gc0 = (slots / gq).max(1).min(tiles).min(65_535);
    let chunk_rows = tiles.div_ceil(gc0) * TC_BK;
    let gc = m32.div_ceil(chunk_rows);
    pass.grid.1 = gc;
    // Candidates per query: a chunk's first tile passes its rows at or above the n-th best
    // of a subset of them (the seed), then the running threshold lets through about
    // ratio * n * (1 + ln(M / n)) rows for random order (ratio: rows within the margin of the
    // n-th best per row above it; 16 leaves room for dense near-ties). More is an overflow:
    // the query is answered by the exact fallback on the device (rescore.rs).
    let first = gc as u64 * TC_BK as u64 * (n as u64).div_ceil(TC_BK as u64);
    let steady = 16.0 * n as f64 * (1.0 + (m as f64 / n as f64).max(1.0).ln());
    let capq = (first + steady.ceil() as u64 + 1024).min(m as u64);
    if b as u64 * capq * 8 > MAX_CANDIDATE_BYTES {
        bail!(
            "{OP}: {} bytes of candidate lists (B = {b}, {capq} per query), the budget is {MAX_CANDIDATE_BYTES}",
            b as u64 * capq * 8
        );
    }
    Ok(TcPlan {
        pass,
        d_pad,
        nl,
        chunk_rows,
        capq: capq as u32,
    })
}

/// [`plan`] on launcher `x` for call `c` with keys of `dtype`: the device's multiprocessors,
/// shared-memory limit and the pass entry's occupancy.
pub(crate) fn plan_on<L: Launcher>(x: &L, c: &DeviceCall, dtype: DType) -> Result<TcPlan> {
    let pass_entry = entry::<CosineTopkTcArgs>(dtype)?;
    plan(
        c.b,
        c.m,
        c.d,
        c.n,
        dtype,
        x.sm_count()?,
        x.max_dyn_smem()?,
        &|p| x.resident_blocks(&pass_entry, p, TC_MIN_BLOCKS),
    )
}

/// Test knobs of the tensor-core path (capacities and margin), to drive its overflow
/// fallback and to show that the margin is needed. Test infrastructure.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcOverrides {
    /// Candidate capacity per query instead of the plan's.
    pub capq: Option<u32>,
    /// Rescoring capacity per query (a power of two >= n) instead of the plan's.
    pub cap: Option<u32>,
    /// Candidate margin instead of [`margin`].
    pub margin: Option<f32>,
}

/// Why the tensor-core path cannot take this call, or `Ok` when it can: the plan's limits and
/// the 16-byte alignment of the keys (cp.async).
pub(crate) fn eligible<L: Launcher>(
    x: &L,
    c: &DeviceCall,
    keys_addr: u64,
    dtype: DType,
) -> Result<()> {
    plan_on(x, c, dtype)?;
    plan_exact_on(x, c, dtype, None)?;
    if !keys_addr.is_multiple_of(16) {
        bail!("cosine_topk tensor-core path: keys at {keys_addr:#x} are not 16-byte aligned");
    }
    Ok(())
}

/// Runs one call on `x` with the tensor-core path (`q` [B, D] f32 contiguous, `keys` and
/// `key_norms` contiguous, all on `x`'s device; B >= 1) under the no-sync contract (module
/// doc): everything queued, the error word returned unread.
pub(crate) fn run_on<L: Launcher + Workspaces>(
    x: &L,
    c: &DeviceCall,
    q: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    ovr: &TcOverrides,
) -> Result<DeviceTopN> {
    const OP: &str = "cosine_topk";
    let dev = keys.device();
    let dt = keys.dtype();
    let ex = super::kernel::device_exclude(c, dev)?;
    let (inp, _guards) = CallInputs::of(c, q, keys, key_norms, ex.as_ref())?;
    let mut p = plan_on(x, c, dt)?;
    if let Some(capq) = ovr.capq {
        p.capq = capq.max(1);
    }
    let exact = plan_exact_on(x, c, dt, ovr.cap)?;
    let margin = match ovr.margin {
        Some(m) => m,
        None => margin(c.d, dt)?,
    };
    let (b, m, d, n) = (
        to_u32(c.b, "B", OP)?,
        to_u32(c.m, "M", OP)?,
        to_u32(c.d, "D", OP)?,
        to_u32(c.n, "n", OP)?,
    );
    let qhat_bytes = p.query_rows() as usize * p.d_pad as usize * elt(dt)? as usize;
    let mut carve = Carve::new();
    let s = SharedScratch::carve(&mut carve, c.b, qhat_bytes, p.capq, &exact);
    let err = x.zeros::<u32>(3)?;
    let top = x.with_workspace(carve.bytes(), |ws| {
        launch_prep(x, c, &inp, dt, p.query_rows(), p.d_pad, ws, &s, x.ptr(&err))?;
        let pass = CosineTopkTcArgs {
            qhat: at::<u8>(ws, s.qhat).erase(),
            qeps: at(ws, s.qeps),
            keys: inp.keys,
            key_norms: inp.key_norms,
            exclude: inp.exclude,
            b,
            m,
            d,
            d_pad: p.d_pad,
            n,
            nl: p.nl,
            chunk_rows: p.chunk_rows,
            capq: p.capq,
            margin,
            theta: at(ws, s.theta),
            count: at(ws, s.count),
            cand_s: at(ws, s.cand_s),
            cand_i: at(ws, s.cand_i),
            err: x.ptr(&err),
        };
        // SAFETY: qhat query_rows*d_pad, qeps/exclude (or null)/theta/count B, keys M*D
        // (16-byte aligned, checked by `eligible`), norms M, candidates B*capq, 3 error words.
        unsafe { x.launch(&entry::<CosineTopkTcArgs>(dt)?, &p.pass, &pass)? };
        launch_exact(x, c, &inp, &exact, p.capq, margin, ws, &s, err)
    })?;
    Ok(DeviceTopN {
        scores: x.tensor_of(top.scores, (c.b, c.n))?,
        indices: x.tensor_of(top.indices, (c.b, c.n))?,
        status: x.tensor_of(top.err, 3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_bounds_the_operand_rounding() {
        // bf16 queries carry 8 significant bits: at least 2 * 2^-8 for any D.
        for d in [8, 256, 1024] {
            let m = margin(d, DType::BF16).unwrap() as f64;
            assert!(m >= 2.0 * 2f64.powi(-8), "D = {d}: {m}");
            assert!(margin(d, DType::F16).unwrap() < margin(d, DType::BF16).unwrap());
        }
        // tf32 rounds both operands.
        assert!(margin(64, DType::F32).unwrap() as f64 >= 4.0 * 2f64.powi(-11));
        // The f32 terms grow with D.
        assert!(margin(4096, DType::F16).unwrap() > margin(64, DType::F16).unwrap());
        assert!(margin(8, DType::U32).is_err());
    }

    /// The pass's residency on an H200 as planned without the driver.
    fn sm90(p: &LaunchPlan) -> Result<u32> {
        Ok(crate::kernel::planned_resident_blocks(
            &crate::kernel::SmResources::SM_90,
            p.threads_per_block(),
            TC_MIN_BLOCKS,
            p.smem_bytes,
        ))
    }

    #[test]
    fn plan_shapes_and_limits() {
        let p = plan(1024, 1 << 20, 1024, 8, DType::BF16, 132, 227 * 1024, &sm90).unwrap();
        assert_eq!(p.pass.grid.0, 8);
        assert_eq!(p.pass.block.0, TC_THREADS);
        // Two blocks per SM (128 registers a thread, 75 KB of shared memory): one wave of
        // 264 slots, chunks of whole tiles covering the bank.
        assert_eq!(sm90(&p.pass).unwrap(), 2);
        let blocks = p.pass.grid.0 * p.pass.grid.1;
        assert!(blocks <= 2 * 132 && blocks > 2 * 132 - 8, "{blocks}");
        assert_eq!(p.chunk_rows % TC_BK, 0);
        assert!(p.chunk_rows as u64 * p.pass.grid.1 as u64 >= 1 << 20);
        assert!((p.chunk_rows as u64) * (p.pass.grid.1 as u64 - 1) < 1 << 20);
        assert_eq!((p.d_pad, p.nl), (1024, 32));
        assert_eq!(p.pass.smem_bytes as u64, pass_smem(32));
        assert_eq!(p.query_rows(), 1024);
        // D padded to a k-slice: 32 16-bit or 16 f32 elements.
        let d_pad = |d, dt| plan(64, 1000, d, 5, dt, 2, 98 * 1024, &sm90).unwrap().d_pad;
        assert_eq!(d_pad(40, DType::F16), 64);
        assert_eq!(d_pad(40, DType::F32), 48);
        assert_eq!(d_pad(36, DType::F32), 48);
        // Limits: 16-byte rows, n, shared memory, candidate memory.
        let e = plan(64, 1000, 36, 5, DType::BF16, 2, 98 * 1024, &sm90)
            .unwrap_err()
            .to_string();
        assert!(e.contains("D = 36") && e.contains("multiple of 8"), "{e}");
        let e = plan(64, 1000, 64, NMAX + 1, DType::F32, 2, 227 * 1024, &sm90)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("n = {}", NMAX + 1)), "{e}");
        assert!(plan(64, 1000, 64, 64, DType::F32, 2, 98 * 1024, &sm90).is_ok());
        assert_eq!(max_n(98 * 1024), 64);
        assert_eq!(max_n(227 * 1024), NMAX);
        let e = plan(64, 1000, 64, 65, DType::F32, 2, 98 * 1024, &sm90)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shared memory") && e.contains("n = 65"), "{e}");
        let e = plan(
            1 << 20,
            1 << 24,
            64,
            NMAX,
            DType::F32,
            132,
            227 * 1024,
            &sm90,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("candidate lists"), "{e}");
    }

    /// Issue 20, item 1: the grid never plans more blocks than the multiprocessors hold (the
    /// old pass planned 4 per SM where its shared memory allowed 3: 528 blocks on 396 slots).
    #[test]
    fn the_pass_grid_is_one_wave_of_the_real_occupancy() {
        for resident in 1..=4u32 {
            for b in [64, 1000, 1024, 3000] {
                for m in [1000usize, 1 << 20, 10 << 20] {
                    let p = plan(b, m, 256, 8, DType::BF16, 132, 227 * 1024, &|_| {
                        Ok(resident)
                    })
                    .unwrap();
                    let blocks = p.pass.grid.0 * p.pass.grid.1;
                    let gq = p.pass.grid.0;
                    assert!(
                        blocks <= (132 * resident).max(gq),
                        "{resident} {b} {m}: {blocks}"
                    );
                }
            }
        }
        // The residency the plan is given is the pass's: its block and shared memory.
        let seen = std::cell::Cell::new(None);
        plan(1024, 1 << 20, 256, 40, DType::F16, 132, 227 * 1024, &|p| {
            seen.set(Some(*p));
            sm90(p)
        })
        .unwrap();
        let p = seen.get().unwrap();
        assert_eq!(
            (p.block.0, p.smem_bytes as u64),
            (TC_THREADS, pass_smem(64))
        );
    }

    #[test]
    fn small_banks_get_one_block_per_tile_at_most() {
        let p = plan(16, 100, 64, 3, DType::BF16, 132, 98 * 1024, &sm90).unwrap();
        assert_eq!(p.pass.grid, (1, 1, 1));
        assert_eq!(p.chunk_rows, TC_BK);
        // A query emits each row at most once: capq never exceeds M.
        assert_eq!(p.capq, 100);
        let p = plan(16, 300, 64, 3, DType::BF16, 132, 98 * 1024, &sm90).unwrap();
        assert_eq!((p.pass.grid, p.chunk_rows), ((1, 3, 1), TC_BK));
    }
}
