//! The GEMM + select path of `cosine_topk` (issue 23): the dot products by cuBLAS, the
//! selection by r2scp's own kernel (`kernels/cosine_topk_gemm_select.cuh`), the exact answer
//! by the rescoring both approximate paths share (`rescore.rs`). One code for the CUDA device
//! and the emulator, where candle's CPU matmul stands in for cuBLAS
//! ([`crate::kernel::gemm::Gemm`]).
//!
//! Per call, all queued on the device's stream, nothing read back:
//! 1. `cosine_topk_prep_<dt>`: unit queries `q / |q|` in the GEMM's operand type ([B, D]),
//!    `COS_EPS / |q|`, the exclusion check, the per-call counters reset.
//! 2. Per chunk of [`GemmPlan::chunk_rows`] bank rows (sized so that the chunk's scores, and
//!    its keys when the GEMM reads them more than once, stay in L2): `cublasGemmEx` writes the
//!    chunk's `[B, chunk_rows]` f32 dot products into the workspace, then
//!    `cosine_topk_gemm_select` reads them once (from L2), scales by the key norms and keeps,
//!    per (query, split), a running top-n behind a threshold and the query's candidates.
//! 3. The exact stage (`rescore.rs`): rescoring in the canonical arithmetic, the device-side
//!    fallback for overflowed queries, NaN scores after a failed call.
//!
//! The answer equals the bandwidth kernel's bit for bit: the margin is twice a bound on
//! |approximate - exact score| ([`error_bound`], docs/DESIGN.md "GEMM + select path").
//! Workspace: [`GemmPlan::workspace_bytes`]. No B x M matrix, no host synchronisation.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{DeviceCall, DeviceTopN};
use super::rescore::{
    elt, error_bound_with, launch_exact, launch_prep, margin_of, plan_exact, CallInputs, ExactPlan,
    SharedScratch,
};
use crate::kernel::abi::{
    CosineTopkFallbackArgs, CosineTopkGemmSelectArgs, GS_MIN_BLOCKS, GS_NL_MAX, GS_THREADS,
    RS_MIN_BLOCKS,
};
use crate::kernel::gemm::{Gemm, GemmMath, ScoresGemm};
use crate::kernel::workspace::{at, Carve, Workspaces};
use crate::kernel::{entry, to_u32, KernelArgs, LaunchPlan, Launcher, Ptr};
use candle_core::{bail, DType, Result, Tensor};

/// Largest n the path serves (its running lists hold n rounded up to 32).
pub const NMAX: usize = GS_NL_MAX as usize;

/// Columns of a chunk one warp of the select kernel reads per step (32 lanes x 4).
pub const SELECT_STEP: u32 = 128;

/// Fewest columns per select unit and chunk (below it the list load and store per launch
/// costs more than the scan).
pub const MIN_SPAN: u32 = 512;

/// Warps per SM the select grid aims for (L2 latency is hidden by many loads in flight), or
/// fewer when the select's occupancy holds fewer: the grid is never more than one wave.
pub const SELECT_WARPS_PER_SM: u32 = 16;

/// Above this many queries the GEMM takes the bank chunk in more than one column tile, so the
/// chunk's keys count against L2 as well as its scores.
pub const ONE_TILE_QUERIES: usize = 256;

/// Operand rounding of the GEMM as the bound sees it: `(u_q, u_k, tau)`.
fn rounding(dtype: DType, math: GemmMath) -> Result<(f64, f64, f64)> {
    Ok(match (dtype, math) {
        // The unit query rounded to nearest bf16 / f16 by the prep kernel; keys exact.
        (DType::BF16, GemmMath::Half) => (2f64.powi(-8), 0.0, 2f64.powi(-120)),
        (DType::F16, GemmMath::Half) => (2f64.powi(-11), 0.0, 2f64.powi(-25)),
        // cuBLAS's tf32 conversion, read as truncation (< 2^-10 relative) of both operands;
        // the unit query's own f32 rounding on top.
        (DType::F32, GemmMath::Tf32) => (
            2f64.powi(-10) + 2f64.powi(-24),
            2f64.powi(-10),
            2f64.powi(-120),
        ),
        (DType::F32, GemmMath::F32) => (0.0, 0.0, 2f64.powi(-120)),
        (dt, m) => bail!("cosine_topk GEMM + select path: {m:?} GEMM on keys of dtype {dt:?}"),
    })
}

/// The GEMM precision the path uses for keys of `dtype`: f16/bf16 operands; for f32 keys
/// tf32 unless `fp32` (the `gemm-fp32` path).
pub fn math_for(dtype: DType, fp32: bool) -> GemmMath {
    match dtype {
        DType::F32 if fp32 => GemmMath::F32,
        DType::F32 => GemmMath::Tf32,
        _ => GemmMath::Half,
    }
}

/// Bound on |approximate score - exact score| of the GEMM + select path for dimension `d`,
/// keys of `dtype`, GEMM precision `math` (holds when `key_norms` are the keys' norms).
pub fn error_bound(d: usize, dtype: DType, math: GemmMath) -> Result<f64> {
    let (u_q, u_k, tau) = rounding(dtype, math)?;
    Ok(error_bound_with(d, u_q, u_k, tau))
}

/// The candidate margin: twice [`error_bound`], rounded up to f32.
pub fn margin(d: usize, dtype: DType, math: GemmMath) -> Result<f32> {
    Ok(margin_of(error_bound(d, dtype, math)?))
}

/// Test knobs (chunking, capacities, margin), to drive the chunk edges and the overflow
/// fallback. Test infrastructure.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmOverrides {
    /// Bank rows per chunk (rounded up to a multiple of [`SELECT_STEP`]).
    pub chunk_rows: Option<u32>,
    /// Select units per query.
    pub splits: Option<u32>,
    /// Candidate capacity per query.
    pub capq: Option<u32>,
    /// Rescoring capacity per query (a power of two >= n).
    pub cap: Option<u32>,
    /// Candidate margin instead of [`margin`].
    pub margin: Option<f32>,
    /// f32 keys through a plain f32 GEMM instead of tf32.
    pub fp32: bool,
}

/// Everything the launches of one call need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPlan {
    /// GEMM precision.
    pub math: GemmMath,
    /// Bank rows per chunk (a multiple of [`SELECT_STEP`]); also the row stride of the score
    /// buffer.
    pub chunk_rows: u32,
    /// Chunks (the last may be short).
    pub chunks: u32,
    /// Select units per query.
    pub splits: u32,
    /// Columns per unit and chunk (a multiple of [`SELECT_STEP`]).
    pub span: u32,
    /// Running-list length (n rounded up to 32).
    pub nl: u32,
    /// Candidate capacity per query.
    pub capq: u32,
    /// The candidate margin.
    pub margin: f32,
    /// One select launch (per chunk).
    pub select: LaunchPlan,
    /// Blocks per SM the select grid was sized for (at most one wave of them).
    pub select_per_sm: u32,
    /// The rescoring, fallback and finish.
    pub exact: ExactPlan,
}

impl GemmPlan {
    /// Workspace bytes of a call with B queries, keys of `dtype` and D dimensions: the
    /// unit queries `B D elt`, the chunk's scores `4 B chunk_rows`, the select lists
    /// `8 B splits nl`, the candidates `8 B capq`, the per-query words `12 B + 4 (1 + B)`, the
    /// exact fallback's candidates `8 B gy kp` (at most [`super::rescore::FALLBACK_BYTES`]),
    /// each rounded up to 256 bytes.
    pub fn workspace_bytes(&self, b: usize, d: usize, dtype: DType) -> Result<usize> {
        Ok(self.carve(b, d, dtype)?.0.bytes())
    }

    fn carve(
        &self,
        b: usize,
        d: usize,
        dtype: DType,
    ) -> Result<(Carve, SharedScratch, usize, usize, usize)> {
        let op_elt = match self.math {
            GemmMath::Half => elt(dtype)? as usize,
            _ => 4,
        };
        let mut c = Carve::new();
        let shared = SharedScratch::carve(&mut c, b, b * d * op_elt, self.capq, &self.exact);
        let scores = c.take::<f32>(b * self.chunk_rows as usize);
        let units = b * self.splits as usize * self.nl as usize;
        let list_s = c.take::<f32>(units);
        let list_i = c.take::<u32>(units);
        Ok((c, shared, scores, list_s, list_i))
    }
}

/// The device a plan is sized for.
#[derive(Clone, Copy)]
pub struct GemmGpu<'a> {
    /// Multiprocessors.
    pub sm_count: u32,
    /// L2 cache bytes.
    pub l2_bytes: u64,
    /// Blocks of `cosine_topk_gemm_select` with a plan that one multiprocessor holds
    /// ([`Launcher::resident_blocks`]).
    pub select_resident: &'a dyn Fn(&LaunchPlan) -> Result<u32>,
    /// The same for `cosine_topk_fallback_<dt>` ([`super::rescore::plan_exact`]).
    pub fallback_resident: &'a dyn Fn(&LaunchPlan) -> Result<u32>,
}

/// Plans one call: B queries, M bank rows, dimension D, top n, keys of `dtype`. Chunks: the
/// rows whose scores (4 B bytes per row), plus their keys when B > [`ONE_TILE_QUERIES`], fill
/// half the L2 (at least one select step); select units: [`SELECT_WARPS_PER_SM`] warps per SM
/// (fewer where the select's occupancy holds fewer: one wave), each at least [`MIN_SPAN`]
/// columns. Errors when n > [`NMAX`] or a size exceeds the 32-bit arguments.
pub fn plan(
    b: usize,
    m: usize,
    d: usize,
    n: usize,
    dtype: DType,
    gpu: &GemmGpu,
    ovr: &GemmOverrides,
) -> Result<GemmPlan> {
    const OP: &str = "cosine_topk GEMM + select path";
    if b == 0 || m == 0 || d == 0 || n == 0 {
        bail!("{OP}: empty shape B = {b}, M = {m}, D = {d}, n = {n}");
    }
    if n > NMAX {
        bail!("{OP}: n = {n} above its largest n = {NMAX}");
    }
    let math = math_for(dtype, ovr.fp32);
    let key_elt = elt(dtype)? as u64;
    for (what, v) in [("B", b), ("M", m), ("D", d)] {
        if v > i32::MAX as usize {
            bail!("{OP}: {what} = {v} exceeds a 32-bit BLAS size");
        }
    }
    let step = SELECT_STEP as u64;
    let m_pad = (m as u64).div_ceil(step) * step;
    let per_row = 4 * b as u64
        + if b > ONE_TILE_QUERIES {
            d as u64 * key_elt
        } else {
            0
        };
    let auto_rows = (gpu.l2_bytes / 2 / per_row) / step * step;
    let chunk_rows = match ovr.chunk_rows {
        Some(r) => (r.max(1) as u64).div_ceil(step) * step,
        None => auto_rows.max(step),
    }
    .min(m_pad);
    let chunk_rows = to_u32(chunk_rows as usize, "chunk rows", OP)?;
    let chunks = (m as u64).div_ceil(chunk_rows as u64) as u32;
    let nl = (n as u32).div_ceil(32) * 32;
    let warps = GS_THREADS / 32;
    let groups = to_u32(b, "B", OP)?.div_ceil(warps);
    let mut select = LaunchPlan {
        grid: (groups, 1, 1),
        block: (GS_THREADS, 1, 1),
        smem_bytes: warps * nl * 8,
    };
    // Blocks per SM: the target's, or what the occupancy allows; groups x splits blocks are
    // then at most one wave (each warp is one (query, split) unit, so B beyond a wave's warps
    // takes one split and more waves).
    let per_sm = (SELECT_WARPS_PER_SM / warps).min((gpu.select_resident)(&select)?.max(1));
    let wave = gpu.sm_count.max(1) as u64 * per_sm as u64;
    let max_splits = (chunk_rows / MIN_SPAN).max(1) as u64;
    let splits = match ovr.splits {
        Some(s) => (s.max(1) as u64).min((chunk_rows / SELECT_STEP) as u64),
        None => (wave / groups as u64).clamp(1, max_splits),
    } as u32;
    select.grid.0 = groups * splits;
    let span = chunk_rows.div_ceil(splits).div_ceil(SELECT_STEP) * SELECT_STEP;
    // Candidates per query: each unit's final list (n), the rows within the margin below the
    // running n-th of a random order, 16 n (1 + ln(M / n)), and 1024 of slack for near-ties;
    // never more than M (a row is appended at most once). More is an overflow: the query is
    // answered by the exact fallback.
    let steady = 16.0 * n as f64 * (1.0 + (m as f64 / n as f64).max(1.0).ln());
    let capq = match ovr.capq {
        Some(c) => c.max(1) as u64,
        None => (splits as u64 * n as u64 + steady.ceil() as u64 + 1024).min(m as u64),
    };
    let exact = plan_exact(b, m, n, gpu.sm_count, gpu.fallback_resident, ovr.cap)?;
    let margin = match ovr.margin {
        Some(mg) => mg,
        None => margin(d, dtype, math)?,
    };
    Ok(GemmPlan {
        math,
        chunk_rows,
        chunks,
        splits,
        span,
        nl,
        capq: to_u32(capq as usize, "capq", OP)?,
        margin,
        select,
        select_per_sm: per_sm,
        exact,
    })
}

/// Runs one call on `x` with the GEMM + select path (`q` [B, D] f32 contiguous, `keys` and
/// `key_norms` contiguous on `x`'s device, B >= 1): queues everything, returns the error word
/// unread.
pub(crate) fn run_on<L: Launcher + Gemm + Workspaces>(
    x: &L,
    c: &DeviceCall,
    q: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    ovr: &GemmOverrides,
) -> Result<DeviceTopN> {
    const OP: &str = "cosine_topk";
    let dtype = keys.dtype();
    let ex = super::kernel::device_exclude(c, keys.device())?;
    // The select kernel reads the norms 16 bytes at a time: a view that starts off a 16-byte
    // boundary is copied (device allocations are 256-byte aligned).
    let aligned = crate::kernel::tensor_ptr(key_norms, OP)?
        .0
        .addr()
        .is_multiple_of(16);
    let norms_copy = (!aligned).then(|| key_norms.copy()).transpose()?;
    let key_norms = norms_copy.as_ref().unwrap_or(key_norms);
    let (inp, _guards) = CallInputs::of(c, q, keys, key_norms, ex.as_ref())?;
    let p = plan_on(x, c, dtype, ovr)?;
    let (carve, shared, scores, list_s, list_i) = p.carve(c.b, c.d, dtype)?;
    let op_dtype = if p.math == GemmMath::Half {
        dtype
    } else {
        DType::F32
    };
    let (b, m, d, n) = (
        to_u32(c.b, "B", OP)?,
        to_u32(c.m, "M", OP)?,
        to_u32(c.d, "D", OP)?,
        to_u32(c.n, "n", OP)?,
    );
    let err = x.zeros::<u32>(3)?;
    let top = x.with_workspace(carve.bytes(), |ws| {
        launch_prep(x, c, &inp, op_dtype, b, d, ws, &shared, x.ptr(&err))?;
        for chunk in 0..p.chunks {
            let r0 = chunk * p.chunk_rows;
            let rows = p.chunk_rows.min(m - r0);
            let g = ScoresGemm {
                k: Ptr::new(
                    inp.keys.addr() + r0 as u64 * c.d as u64 * dtype.size_in_bytes() as u64,
                ),
                ldk: c.d,
                rows: rows as usize,
                a: at(ws, shared.qhat),
                lda: c.d,
                cols: c.b,
                depth: c.d,
                dtype: op_dtype,
                math: p.math,
                out: at(ws, scores),
                ldo: p.chunk_rows as usize,
            };
            // SAFETY: keys rows [r0, r0 + rows) of D elements, qhat B x D, scores B x
            // chunk_rows f32: inside the inputs and the carve.
            unsafe { x.gemm_scores(&g)? };
            let args = CosineTopkGemmSelectArgs {
                scores: at(ws, scores),
                ld: p.chunk_rows,
                qeps: at(ws, shared.qeps),
                key_norms: inp.key_norms,
                exclude: inp.exclude,
                b,
                r0,
                rows,
                n,
                nl: p.nl,
                splits: p.splits,
                span: p.span,
                first: (chunk == 0) as u32,
                last: (chunk + 1 == p.chunks) as u32,
                capq: p.capq,
                margin: p.margin,
                list_s: at(ws, list_s),
                list_i: at(ws, list_i),
                theta: at(ws, shared.theta),
                count: at(ws, shared.count),
                cand_s: at(ws, shared.cand_s),
                cand_i: at(ws, shared.cand_i),
                err: x.ptr(&err),
            };
            // SAFETY: scores B x chunk_rows, qeps/theta/count B, norms M, exclusions B (or
            // null), lists B x splits x nl, candidates B x capq, 3 error words.
            unsafe { x.launch(CosineTopkGemmSelectArgs::ENTRY, &p.select, &args)? };
        }
        launch_exact(x, c, &inp, &p.exact, p.capq, p.margin, ws, &shared, err)
    })?;
    Ok(DeviceTopN {
        scores: x.tensor_of(top.scores, (c.b, c.n))?,
        indices: x.tensor_of(top.indices, (c.b, c.n))?,
        status: x.tensor_of(top.err, 3)?,
    })
}

/// [`plan`] on launcher `x` for call `c` with keys of `dtype`: the device's multiprocessors,
/// L2 and the select and fallback entries' occupancy.
pub(crate) fn plan_on<L: Launcher + Gemm>(
    x: &L,
    c: &DeviceCall,
    dtype: DType,
    ovr: &GemmOverrides,
) -> Result<GemmPlan> {
    let fallback = entry::<CosineTopkFallbackArgs>(dtype)?;
    let gpu = GemmGpu {
        sm_count: x.sm_count()?,
        l2_bytes: x.l2_bytes()?,
        select_resident: &|p| x.resident_blocks(CosineTopkGemmSelectArgs::ENTRY, p, GS_MIN_BLOCKS),
        fallback_resident: &|p| x.resident_blocks(&fallback, p, RS_MIN_BLOCKS),
    };
    plan(c.b, c.m, c.d, c.n, dtype, &gpu, ovr)
}

/// Why the GEMM + select path cannot take this call, or `Ok` when it can.
pub(crate) fn eligible<L: Launcher + Gemm>(x: &L, c: &DeviceCall, dtype: DType) -> Result<()> {
    plan_on(x, c, dtype, &GemmOverrides::default()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{planned_resident_blocks, SmResources};

    /// The select's residency on an H200 as planned without the driver.
    fn select_sm90(p: &LaunchPlan) -> Result<u32> {
        Ok(planned_resident_blocks(
            &SmResources::SM_90,
            p.threads_per_block(),
            GS_MIN_BLOCKS,
            p.smem_bytes,
        ))
    }
    /// The fallback's.
    fn fallback_sm90(p: &LaunchPlan) -> Result<u32> {
        Ok(planned_resident_blocks(
            &SmResources::SM_90,
            p.threads_per_block(),
            RS_MIN_BLOCKS,
            p.smem_bytes,
        ))
    }
    const H200: &GemmGpu = &GemmGpu {
        sm_count: 132,
        l2_bytes: 50 << 20,
        select_resident: &select_sm90,
        fallback_resident: &fallback_sm90,
    };

    #[test]
    fn chunks_fit_half_the_l2() {
        let none = GemmOverrides::default();
        // B = 1024, D = 1024 bf16: scores 4 KiB and keys 2 KiB per row.
        let p = plan(1024, 1 << 20, 1024, 8, DType::BF16, H200, &none).unwrap();
        assert!(p.chunk_rows.is_multiple_of(SELECT_STEP));
        let per_row = 4 * 1024 + 2048;
        assert!(p.chunk_rows as u64 * per_row <= H200.l2_bytes / 2);
        assert!((p.chunk_rows + SELECT_STEP) as u64 * per_row > H200.l2_bytes / 2);
        assert_eq!(p.chunks, (1u32 << 20).div_ceil(p.chunk_rows));
        // B = 16: only the scores count; the splits fill 16 warps per SM.
        let p = plan(16, 10_000_000, 256, 8, DType::F32, H200, &none).unwrap();
        assert_eq!(p.math, GemmMath::Tf32);
        assert!(p.chunk_rows as u64 * 64 <= H200.l2_bytes / 2);
        assert!(16 * p.splits >= 132 * SELECT_WARPS_PER_SM);
        assert!(p.span >= MIN_SPAN && p.span.is_multiple_of(SELECT_STEP));
        assert!(p.span * p.splits >= p.chunk_rows);
        // A bank smaller than a chunk is one chunk.
        let p = plan(64, 1000, 64, 5, DType::F16, H200, &none).unwrap();
        assert_eq!((p.chunk_rows, p.chunks), (1024, 1));
        assert_eq!(p.capq, 1000);
    }

    /// Issue 20, item 1: the select grid is one wave of the blocks the multiprocessors hold
    /// (16 warps per SM when they hold 4 blocks or more, fewer when the occupancy says so).
    #[test]
    fn the_select_grid_is_one_wave_of_the_real_occupancy() {
        let none = GemmOverrides::default();
        // Without the driver the launch bound's 128 registers give 4 blocks: 16 warps.
        assert_eq!(
            select_sm90(
                &plan(16, 1 << 20, 256, 8, DType::BF16, H200, &none)
                    .unwrap()
                    .select
            )
            .unwrap(),
            4
        );
        for resident in [1u32, 2, 4, 6] {
            let gpu = GemmGpu {
                select_resident: &|_| Ok(resident),
                ..*H200
            };
            for b in [1usize, 5, 16, 64, 100, 1024] {
                let p = plan(b, 10_000_000, 256, 8, DType::BF16, &gpu, &none).unwrap();
                let per_sm = resident.min(SELECT_WARPS_PER_SM / 4);
                let groups = (b as u32).div_ceil(4);
                assert_eq!(p.select.grid.0, groups * p.splits);
                assert!(
                    p.select.grid.0 <= (132 * per_sm).max(groups),
                    "{resident} {b}: {:?}",
                    p.select
                );
                if groups * 2 <= 132 * per_sm {
                    assert!(
                        2 * p.select.grid.0 > 132 * per_sm,
                        "{resident} {b}: {:?}",
                        p.select
                    );
                }
            }
        }
    }

    #[test]
    fn workspace_stays_bounded_at_b1024_m10m() {
        let p = plan(
            1024,
            10_000_000,
            1024,
            8,
            DType::BF16,
            H200,
            &GemmOverrides::default(),
        )
        .unwrap();
        let bytes = p.workspace_bytes(1024, 1024, DType::BF16).unwrap();
        assert!(bytes < 200 << 20, "{bytes}");
        // f32 keys: the tf32 operands are 4 bytes.
        let p = plan(
            1024,
            10_000_000,
            1024,
            8,
            DType::F32,
            H200,
            &GemmOverrides::default(),
        )
        .unwrap();
        assert!(p.workspace_bytes(1024, 1024, DType::F32).unwrap() < 300 << 20);
    }

    #[test]
    fn margins_cover_each_precision() {
        // bf16 unit queries: 2 x 2^-8 at least; tf32 read as truncation of both operands.
        assert!(margin(256, DType::BF16, GemmMath::Half).unwrap() as f64 >= 2.0 * 2f64.powi(-8));
        let tf = margin(256, DType::F32, GemmMath::Tf32).unwrap() as f64;
        assert!(tf >= 4.0 * 2f64.powi(-10));
        assert!(margin(256, DType::F32, GemmMath::F32).unwrap() < tf as f32 / 10.0);
        assert!(margin(256, DType::F32, GemmMath::Half).is_err());
        assert_eq!(math_for(DType::F32, true), GemmMath::F32);
        assert_eq!(math_for(DType::BF16, true), GemmMath::Half);
    }

    #[test]
    fn knobs_and_limits() {
        let k = GemmOverrides {
            chunk_rows: Some(100),
            splits: Some(3),
            ..GemmOverrides::default()
        };
        let p = plan(5, 1000, 16, 4, DType::F32, H200, &k).unwrap();
        assert_eq!((p.chunk_rows, p.chunks, p.splits, p.span), (128, 8, 1, 128));
        let e = plan(5, 1000, 16, 257, DType::F32, H200, &k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n = 257"), "{e}");
        assert!(plan(0, 1000, 16, 4, DType::F32, H200, &k).is_err());
    }
}
