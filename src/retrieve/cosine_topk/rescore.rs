//! What the two approximate device paths share (`kernels/cosine_topk_rescore.cuh`): the unit
//! queries before the approximate scores, and after them the exact answer, queued with no host
//! round trip. The tensor-core pass (`tensor_core.rs`) and the GEMM + select path
//! (`gemm_select.rs`) each fill a query's candidate list (approximate score >= a lower bound
//! of the n-th best approximate score, less the margin); then:
//! 1. `cosine_topk_rescore_<dt>` (one block per query): the exact top n of the candidates
//!    within the margin of the n-th best approximate score, or, when the candidates overflowed
//!    their capacity, the query joins the device's flagged list;
//! 2. `cosine_topk_fallback_<dt>`: the exact top kp of each flagged query over bank chunks
//!    (blocks with nothing to do exit at once: one launch of `RS_SLOTS x gy` short blocks per
//!    call);
//! 3. `cosine_topk_finish`: the flagged queries' rows, then NaN scores if the call failed.
//!
//! So a call never reads anything back: the flags stay on the device, behind the error word,
//! which the caller reads when it checks (issue 20, item 6). Scratch buffers come from the
//! device's workspace ([`crate::kernel::workspace`]); the prep kernel resets the counters
//! they need, so nothing is zero-filled per call but the outputs and the error word.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::DeviceCall;
use crate::kernel::abi::{
    CosineTopkFallbackArgs, CosineTopkFinishArgs, CosineTopkPrepArgs, CosineTopkRescoreArgs,
    CT_THREADS, GS_NL_MAX, RS_MIN_BLOCKS, RS_SLOTS, RS_THREADS, TC_NL_MAX, TC_RESCORE_TILE,
};
use crate::kernel::workspace::{at, Carve};
use crate::kernel::{entry, to_u32, AnyElem, KernelArgs, LaunchPlan, Launcher, Ptr};
use candle_core::{DType, Result, StorageRef, Tensor};

/// f32 unit roundoff.
pub const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// Bound on |approximate score - exact score| for dimension `d` when the unit query's operand
/// carries a relative rounding `u_q`, each key element `u_k`, and flushed subnormal operands
/// an absolute `tau` per element (docs/DESIGN.md, "Tensor-core path" and "GEMM + select
/// path"): `(1 + 2^-10) (u_q + u_k + u_q u_k + tau sqrt(d) (1 + u_k) + (5 d + 16) u)`, the last
/// term covering f32 rounding in the accumulation (a truncating adder: 2 d u), the exact path's
/// sequential sum (d u), the norms and the divisions.
pub fn error_bound_with(d: usize, u_q: f64, u_k: f64, tau: f64) -> f64 {
    let d = d as f64;
    let operands = u_q + u_k + u_q * u_k + tau * d.sqrt() * (1.0 + u_k);
    (1.0 + 2f64.powi(-10)) * (operands + (5.0 * d + 16.0) * U32)
}

/// Twice `bound`, rounded up to f32: the candidate margin.
pub fn margin_of(bound: f64) -> f32 {
    let m = 2.0 * bound;
    let f = m as f32;
    if (f as f64) < m {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

/// Bytes of one element of an operand of `dtype` (f32 operands stay f32).
pub fn elt(dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(4),
        DType::F16 | DType::BF16 => Ok(2),
        dt => crate::error::bail!("cosine_topk: no kernel for keys of dtype {dt:?}"),
    }
}

/// Largest n the exact stage serves: the larger of the two approximate paths' limits (the
/// GEMM + select path's `GS_NL_MAX`; the tensor-core pass's `TC_NL_MAX` is below it, and its
/// own plan refuses the n between).
pub const NMAX: usize = GS_NL_MAX as usize;
const _: () = assert!(TC_NL_MAX <= GS_NL_MAX);

/// Most bytes of exact fallback candidates (`B x gy x kp` pairs) a call keeps in its workspace:
/// bounds the chunks a flagged query is split into.
pub const FALLBACK_BYTES: u64 = 32 << 20;

/// The launches after the approximate pass, and their sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactPlan {
    /// `cosine_topk_rescore_*`: one block per query.
    pub rescore: LaunchPlan,
    /// `cosine_topk_fallback_*`: grid (min(`RS_SLOTS`, B), gy), one wave of the blocks the
    /// multiprocessors hold.
    pub fallback: LaunchPlan,
    /// `cosine_topk_finish`: grid (min(`RS_SLOTS`, B)).
    pub finish: LaunchPlan,
    /// Running-list length of the rescoring and the fallback (next power of two >= n).
    pub kp: u32,
    /// Most candidates within the margin rescored per query (a power of two >= kp).
    pub cap: u32,
    /// Streaming tile of the fallback and the finish (a power of two >= kp, >= `CT_THREADS`).
    pub tile: u32,
    /// Bank rows per fallback block.
    pub chunk_rows: u32,
}

impl ExactPlan {
    /// Bank chunks per flagged query.
    pub fn gy(&self) -> u32 {
        self.fallback.grid.1
    }
}

/// Plans the exact stage for B queries, M bank rows, top n (n <= [`NMAX`]), on `sm_count`
/// multiprocessors, each holding `fallback_resident(plan)` blocks of the fallback kernel
/// ([`Launcher::resident_blocks`] of `cosine_topk_fallback_<dt>`); `cap` overrides the
/// rescoring capacity (a power of two >= kp).
pub fn plan_exact(
    b: usize,
    m: usize,
    n: usize,
    sm_count: u32,
    fallback_resident: &dyn Fn(&LaunchPlan) -> Result<u32>,
    cap: Option<u32>,
) -> Result<ExactPlan> {
    const OP: &str = "cosine_topk exact rescoring";
    if b == 0 || m == 0 || n == 0 || n > NMAX {
        crate::error::bail!(
            "{OP}: B = {b}, M = {m}, n = {n} (expected B, M >= 1, 1 <= n <= {NMAX})"
        );
    }
    let kp = (n.next_power_of_two() as u32).max(2);
    let cap = match cap {
        Some(c) if !c.is_power_of_two() || c < kp => {
            crate::error::bail!("{OP}: rescoring capacity {c} must be a power of two >= {kp}")
        }
        Some(c) => c,
        None => ((8 * n + 64).next_power_of_two() as u32).max(kp),
    };
    let tile = kp.max(CT_THREADS);
    let rescore_smem = crate::kernel::topk::stream_bytes(1, kp, TC_RESCORE_TILE) + cap as u64 * 8;
    let stream_smem = crate::kernel::topk::stream_bytes(1, kp, tile);
    // Fewer fallback slots than queries would idle; more than RS_SLOTS flagged queries take turns.
    let slots = RS_SLOTS.min(to_u32(b, "B", OP)?);
    let mut fallback = LaunchPlan {
        grid: (slots, 1, 1),
        block: (CT_THREADS, 1, 1),
        smem_bytes: stream_smem as u32,
    };
    // The slots x gy blocks are one wave of what the multiprocessors hold (a flagged query's
    // chunks run side by side), within the candidate budget.
    let wave = sm_count.max(1) as u64 * fallback_resident(&fallback)?.max(1) as u64;
    let tiles = (m as u64).div_ceil(tile as u64);
    let budget = (FALLBACK_BYTES / (b as u64 * kp as u64 * 8)).max(1);
    let gy = (wave / slots as u64)
        .min(tiles)
        .min(budget)
        .clamp(1, 65_535);
    let chunk_rows = tiles.div_ceil(gy) * tile as u64;
    let gy = (m as u64).div_ceil(chunk_rows);
    fallback.grid.1 = gy as u32;
    Ok(ExactPlan {
        rescore: LaunchPlan {
            grid: (to_u32(b, "B", OP)?, 1, 1),
            block: (CT_THREADS, 1, 1),
            smem_bytes: rescore_smem as u32,
        },
        fallback,
        finish: LaunchPlan {
            grid: (slots, 1, 1),
            block: (CT_THREADS, 1, 1),
            smem_bytes: stream_smem as u32,
        },
        kp,
        cap,
        tile,
        chunk_rows: u32::try_from(chunk_rows)
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: M = {m} too large")))?,
    })
}

/// [`plan_exact`] on launcher `x` for call `c` with keys of `dtype`: the device's
/// multiprocessors and the fallback entry's occupancy.
pub(crate) fn plan_exact_on<L: Launcher>(
    x: &L,
    c: &DeviceCall,
    dtype: DType,
    cap: Option<u32>,
) -> Result<ExactPlan> {
    let fallback = entry::<CosineTopkFallbackArgs>(dtype)?;
    plan_exact(
        c.b,
        c.m,
        c.n,
        x.sm_count()?,
        &|p| x.resident_blocks(&fallback, p, RS_MIN_BLOCKS),
        cap,
    )
}

/// The inputs of one call on the device (all contiguous, on the launcher's device).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallInputs {
    /// [B, D] f32.
    pub q: Ptr<f32>,
    /// [M, D] in `key_dtype`.
    pub keys: Ptr<AnyElem>,
    pub key_dtype: DType,
    /// \[M\] f32.
    pub key_norms: Ptr<f32>,
    /// \[B\] u32 excluded rows (`u32::MAX` = none), or null: no exclusion.
    pub exclude: Ptr<u32>,
    /// Key and query rows are 16-byte aligned (`kernel::rows_vec16`).
    pub vec16: bool,
}

impl CallInputs {
    /// The addresses of a call's contiguous inputs on the launcher's device (`ex`: the
    /// exclusions there, or none), with the storage guards that keep them valid while in use.
    pub fn of<'t>(
        c: &DeviceCall,
        q: &'t Tensor,
        keys: &'t Tensor,
        key_norms: &'t Tensor,
        ex: Option<&'t Tensor>,
    ) -> Result<(Self, Vec<StorageRef<'t>>)> {
        const OP: &str = "cosine_topk";
        let dtype = keys.dtype();
        let (qp, gq) = crate::kernel::tensor_ptr(q, OP)?;
        let (kp, gk) = crate::kernel::tensor_ptr(keys, OP)?;
        let (np, gn) = crate::kernel::tensor_ptr(key_norms, OP)?;
        let mut guards = vec![gq, gk, gn];
        let exclude = match ex {
            Some(t) => {
                let (p, g) = crate::kernel::tensor_ptr(t, OP)?;
                guards.push(g);
                Ptr::new(p.addr())
            }
            None => Ptr::null(),
        };
        let inp = CallInputs {
            q: Ptr::new(qp.addr()),
            keys: kp,
            key_dtype: dtype,
            key_norms: Ptr::new(np.addr()),
            exclude,
            vec16: crate::kernel::rows_vec16(c.d, dtype.size_in_bytes(), &[kp.addr()])
                && crate::kernel::rows_vec16(c.d, 4, &[qp.addr()]),
        };
        Ok((inp, guards))
    }
}

/// Where the shared scratch buffers of one call lie in its workspace (byte offsets).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SharedScratch {
    pub qhat: usize,
    pub qeps: usize,
    pub theta: usize,
    pub count: usize,
    pub cand_s: usize,
    pub cand_i: usize,
    pub flagged: usize,
    pub fb_s: usize,
    pub fb_i: usize,
}

impl SharedScratch {
    /// Reserves the shared buffers for B queries, `qhat_bytes` of unit queries, `capq`
    /// candidates per query and the exact plan `p`.
    pub fn carve(c: &mut Carve, b: usize, qhat_bytes: usize, capq: u32, p: &ExactPlan) -> Self {
        let fb = b * p.gy() as usize * p.kp as usize;
        SharedScratch {
            qhat: c.take::<u8>(qhat_bytes),
            qeps: c.take::<f32>(b),
            theta: c.take::<u32>(b),
            count: c.take::<u32>(b),
            cand_s: c.take::<f32>(b * capq as usize),
            cand_i: c.take::<u32>(b * capq as usize),
            flagged: c.take::<u32>(1 + b),
            fb_s: c.take::<f32>(fb),
            fb_i: c.take::<u32>(fb),
        }
    }
}

/// Queues `cosine_topk_prep_<dt>`: `rows` rows (>= B) of `d_pad` unit-query columns in the
/// operand type `dt` at `qhat`, and the per-call resets.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_prep<L: Launcher>(
    x: &L,
    c: &DeviceCall,
    inp: &CallInputs,
    dt: DType,
    rows: u32,
    d_pad: u32,
    ws: Ptr<u8>,
    s: &SharedScratch,
    err: Ptr<u32>,
) -> Result<()> {
    const OP: &str = "cosine_topk";
    let warps = RS_THREADS / 32;
    let plan = LaunchPlan {
        grid: (rows.div_ceil(warps), 1, 1),
        block: (RS_THREADS, 1, 1),
        smem_bytes: 0,
    };
    let args = CosineTopkPrepArgs {
        q: inp.q,
        exclude: inp.exclude,
        b: to_u32(c.b, "B", OP)?,
        m: to_u32(c.m, "M", OP)?,
        d: to_u32(c.d, "D", OP)?,
        n: to_u32(c.n, "n", OP)?,
        d_pad,
        rows,
        qhat: at(ws, s.qhat),
        qeps: at(ws, s.qeps),
        theta: at(ws, s.theta),
        count: at(ws, s.count),
        flagged: at(ws, s.flagged),
        err,
    };
    // SAFETY: queries B*D; exclusions B (or null); qhat rows*d_pad elements of `dt`; qeps,
    // theta, count B; flagged 1 + B; 3 error words: the carve's extents.
    unsafe { x.launch(&entry::<CosineTopkPrepArgs>(dt)?, &plan, &args) }
}

/// The outputs of one approximate-path call, nothing read back: `[B, n]` results and the
/// \[3\] error word.
pub(crate) struct ExactTopN<L: Launcher> {
    pub scores: L::Buf<f32>,
    pub indices: L::Buf<u32>,
    pub err: L::Buf<u32>,
}

/// Queues the rescoring, the fallback and the finish after an approximate pass that filled
/// the candidates of `s` (capacity `capq` per query) with margin `margin`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_exact<L: Launcher>(
    x: &L,
    c: &DeviceCall,
    inp: &CallInputs,
    p: &ExactPlan,
    capq: u32,
    margin: f32,
    ws: Ptr<u8>,
    s: &SharedScratch,
    err: L::Buf<u32>,
) -> Result<ExactTopN<L>> {
    const OP: &str = "cosine_topk";
    let dt = inp.key_dtype;
    let (b, m, d, n) = (
        to_u32(c.b, "B", OP)?,
        to_u32(c.m, "M", OP)?,
        to_u32(c.d, "D", OP)?,
        to_u32(c.n, "n", OP)?,
    );
    let out_s = x.zeros::<f32>(c.b * c.n)?;
    let out_i = x.zeros::<u32>(c.b * c.n)?;
    let rescore = CosineTopkRescoreArgs {
        q: inp.q,
        keys: inp.keys,
        key_norms: inp.key_norms,
        count: at(ws, s.count),
        cand_s: at(ws, s.cand_s),
        cand_i: at(ws, s.cand_i),
        b,
        d,
        n,
        kp: p.kp,
        capq,
        cap: p.cap,
        margin,
        vec16: inp.vec16 as u32,
        out_s: x.ptr(&out_s),
        out_i: x.ptr(&out_i),
        flagged: at(ws, s.flagged),
        err: x.ptr(&err),
    };
    // SAFETY: queries B*D, keys M*D, norms M, counts B, candidates B*capq, outputs B*n,
    // flagged 1 + B, 3 error words.
    unsafe { x.launch(&entry::<CosineTopkRescoreArgs>(dt)?, &p.rescore, &rescore)? };
    let fallback = CosineTopkFallbackArgs {
        q: inp.q,
        keys: inp.keys,
        key_norms: inp.key_norms,
        exclude: inp.exclude,
        m,
        d,
        kp: p.kp,
        tile: p.tile,
        vec16: inp.vec16 as u32,
        chunk_rows: p.chunk_rows,
        flagged: at(ws, s.flagged),
        fb_s: at(ws, s.fb_s),
        fb_i: at(ws, s.fb_i),
        err: x.ptr(&err),
    };
    // SAFETY: queries B*D, keys M*D, norms M, exclusions B (or null), flagged 1 + B, fallback
    // candidates B*gy*kp, 3 error words.
    unsafe {
        x.launch(
            &entry::<CosineTopkFallbackArgs>(dt)?,
            &p.fallback,
            &fallback,
        )?
    };
    let finish = CosineTopkFinishArgs {
        flagged: at(ws, s.flagged),
        fb_s: at(ws, s.fb_s),
        fb_i: at(ws, s.fb_i),
        gy: p.gy(),
        kp: p.kp,
        tile: p.tile,
        b,
        n,
        err: x.ptr(&err),
        out_s: x.ptr(&out_s),
        out_i: x.ptr(&out_i),
    };
    // SAFETY: flagged 1 + B, fallback candidates B*gy*kp, 3 error words, outputs B*n.
    unsafe { x.launch(CosineTopkFinishArgs::ENTRY, &p.finish, &finish)? };
    Ok(ExactTopN {
        scores: out_s,
        indices: out_i,
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_round_up_and_grow_with_d() {
        let m = margin_of(error_bound_with(64, 2f64.powi(-8), 0.0, 0.0));
        assert!(m as f64 >= 2.0 * 2f64.powi(-8));
        assert!(
            margin_of(error_bound_with(4096, 0.0, 0.0, 0.0))
                > margin_of(error_bound_with(64, 0.0, 0.0, 0.0))
        );
        // The f32 term alone at D = 1024: 2 (1 + 2^-10)(5136 u).
        let f = margin_of(error_bound_with(1024, 0.0, 0.0, 0.0)) as f64;
        assert!((f - 2.0 * (1.0 + 2f64.powi(-10)) * 5136.0 * U32).abs() < 1e-9);
    }

    /// The fallback's residency on an H200 as planned without the driver.
    fn sm90(p: &LaunchPlan) -> Result<u32> {
        Ok(crate::kernel::planned_resident_blocks(
            &crate::kernel::SmResources::SM_90,
            p.threads_per_block(),
            RS_MIN_BLOCKS,
            p.smem_bytes,
        ))
    }

    #[test]
    fn exact_plan_sizes() {
        let p = plan_exact(1024, 1 << 20, 8, 132, &sm90, None).unwrap();
        assert_eq!((p.kp, p.cap, p.tile), (8, 128, CT_THREADS));
        assert_eq!(p.rescore.grid.0, 1024);
        assert_eq!(p.fallback.grid.0, RS_SLOTS);
        // Chunks of whole tiles covering the bank, within the candidate budget.
        assert!(p.chunk_rows as u64 * p.gy() as u64 >= 1 << 20);
        assert!(1024 * p.gy() as u64 * p.kp as u64 * 8 <= FALLBACK_BYTES);
        let p = plan_exact(1024, 1 << 20, 256, 132, &sm90, None).unwrap();
        assert_eq!((p.kp, p.tile), (256, 256));
        assert!(1024 * p.gy() as u64 * 256 * 8 <= FALLBACK_BYTES);
        let p = plan_exact(3, 100, 5, 2, &sm90, Some(16)).unwrap();
        assert_eq!(
            (p.cap, p.gy(), p.fallback.grid.0, p.finish.grid.0),
            (16, 1, 3, 3)
        );
        assert!(plan_exact(3, 100, 5, 2, &sm90, Some(12)).is_err());
        assert!(plan_exact(3, 100, NMAX + 1, 2, &sm90, None).is_err());
    }

    /// Issue 20, item 1, for the fallback (a persistent grid: its blocks take the flagged
    /// queries in turns): slots x gy blocks are one wave of the blocks the multiprocessors
    /// hold, as the occupancy says, not a fixed count per SM.
    #[test]
    fn the_fallback_grid_is_one_wave_of_the_real_occupancy() {
        for resident in [1u32, 3, 4, 12] {
            for (b, m) in [(1usize, 1usize << 20), (16, 1 << 20), (1024, 10 << 20)] {
                let p = plan_exact(b, m, 8, 132, &|_| Ok(resident), None).unwrap();
                let blocks = p.fallback.grid.0 * p.fallback.grid.1;
                assert!(blocks <= 132 * resident, "{resident} {b} {m}: {blocks}");
                // A bank of many tiles fills at least half of it (chunks of whole tiles).
                if b <= 16 {
                    assert!(2 * blocks >= 132 * resident, "{resident} {b} {m}: {blocks}");
                }
            }
        }
        // The residency asked is the fallback's: its block and shared memory.
        let seen = std::cell::Cell::new(None);
        plan_exact(
            64,
            1 << 20,
            40,
            132,
            &|p| {
                seen.set(Some(*p));
                sm90(p)
            },
            None,
        )
        .unwrap();
        let p = seen.get().unwrap();
        assert_eq!(p.block.0, CT_THREADS);
        assert_eq!(
            p.smem_bytes as u64,
            crate::kernel::topk::stream_bytes(1, 64, CT_THREADS)
        );
    }
}
