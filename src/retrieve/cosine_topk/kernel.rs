//! Launch plan and device path of `kernels/cosine_topk.cu`, one code for the CUDA device and
//! the emulator (both through [`Launcher`]).
//!
//! Two kernels:
//! 1. `cosine_topk_partial_<dt>`: grid `(gx, gy)`. Block `(x, y)` scores bank rows
//!    `[x * chunk_rows, (x + 1) * chunk_rows)` for queries `[y * qb, (y + 1) * qb)`, tile
//!    by tile ([`TILE`] rows, [`THREADS`] threads), keeping a running top-`kp` per query
//!    in shared memory. It writes `kp` candidates per (query, block) to a scratch buffer
//!    of `B * gx * kp` (score, index) pairs: independent of M, never a B x M matrix.
//! 2. `cosine_topk_merge`: one block per query merges its `gx * kp` candidates into
//!    the final top-n with the same block top-k machinery (skipped when gx = 1, see
//!    [`CosinePlan::needs_merge`]).
//!
//! These are the bandwidth kernels ([`Kernel::Bandwidth`]); large batches take the
//! tensor-core path of `tensor_core.rs` ([`Kernel::TensorCore`]) by the rule [`choose`].
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::Checked;
use super::tensor_core::{self, TcOverrides};
use crate::kernel::abi::{
    CosineTopkMergeArgs, CosineTopkPartialArgs, CT_QB_MAX, CT_THREADS, CT_TILE, ERR_NAN_SCORE,
    TOPK_MAXQ,
};
use crate::kernel::{
    entry, to_u32, AnyElem, KernelArgs, LaunchPlan, Launcher, Ptr, MAX_DYN_SMEM_BYTES,
};
use candle_core::{bail, DType, Result, Tensor};

/// Threads per block of both kernels (4 warps).
pub const THREADS: u32 = CT_THREADS;
/// Bank rows scored per tile (two groups of 32 rows per warp); also the candidate tile of
/// the merge.
pub const TILE: u32 = CT_TILE;
/// Largest n the kernels handle (the running list is `kp = next_pow2(n) <= KMAX`); the
/// CUDA op runs larger n on the fused CPU path. A running list longer than the tile is
/// fine: a tile then holds fewer hits than `kp`, so `r2_stream_flush` always takes its
/// sorted-hits path. At `kp = 1024` one query's lists take 18 KiB of shared memory.
pub const KMAX: usize = 1024;
/// Most queries one block scores together (each key row read once for all of them).
pub const QB_MAX: u32 = CT_QB_MAX;
// A block keeps one streaming top-k list per query (kernels/topk.cuh holds TOPK_MAXQ).
const _: () = assert!(QB_MAX <= TOPK_MAXQ);

/// Everything both launches of one `cosine_topk` call need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CosinePlan {
    /// Launch of the partial (scoring) kernel.
    pub partial: LaunchPlan,
    /// Launch of the merge kernel.
    pub merge: LaunchPlan,
    /// Queries per block of the partial kernel.
    pub qb: u32,
    /// Running-list length: the next power of two >= n (>= 2).
    pub kp: u32,
    /// Bank rows per block of the partial kernel (a multiple of [`TILE`]).
    pub chunk_rows: u32,
}

impl CosinePlan {
    /// False when one block covers the whole bank (gx = 1): its sorted candidates are
    /// already the answer and the merge launch is skipped (the first n are taken).
    pub fn needs_merge(&self) -> bool {
        self.partial.grid.0 > 1
    }
}

/// Shared bytes of the per-warp \[32\]\[33\] f32 transpose buffers that make the partial
/// kernel's key loads coalesced (`R2_CT_TRANSPOSE_FLOATS` in kernels/cosine_topk.cu).
pub const TRANSPOSE_BYTES: u64 = (THREADS as u64 / 32) * 32 * 33 * 4;

/// Dynamic shared memory of the partial kernel for `qb` queries of dimension `d`:
/// the transpose buffers, the queries in f32, then per query the running list, tile and
/// hit buffer of (score, index) pairs (must match `r2_stream_bytes` in kernels/topk.cuh).
pub fn partial_smem(qb: u32, d: u32, kp: u32) -> u64 {
    TRANSPOSE_BYTES + qb as u64 * (d as u64 * 4 + stream_bytes(kp))
}

/// Shared bytes of one streaming top-kp list over tiles of [`TILE`].
fn stream_bytes(kp: u32) -> u64 {
    crate::kernel::topk::stream_bytes(1, kp, TILE)
}

/// Plans both launches for B queries, M bank rows, dimension D, top-n, on a device with
/// `sm_count` multiprocessors. Errors when n > [`KMAX`] or one query of dimension D
/// does not fit the shared-memory budget.
pub fn plan(b: usize, m: usize, d: usize, n: usize, sm_count: u32) -> Result<CosinePlan> {
    const OP: &str = "cosine_topk";
    if n == 0 || n > KMAX {
        bail!("{OP} kernel: n = {n} outside 1..={KMAX}");
    }
    if b == 0 || m == 0 || d == 0 {
        bail!("{OP} kernel: empty shape B = {b}, M = {m}, D = {d}");
    }
    let kp = (n.next_power_of_two() as u32).max(2);
    let d32 = to_u32(d, "D", OP)?;
    let mut qb = QB_MAX.min(b as u32);
    while qb > 1 && partial_smem(qb, d32, kp) > MAX_DYN_SMEM_BYTES as u64 {
        qb -= 1;
    }
    if partial_smem(qb, d32, kp) > MAX_DYN_SMEM_BYTES as u64 {
        let max_d =
            (MAX_DYN_SMEM_BYTES as u64).saturating_sub(TRANSPOSE_BYTES + stream_bytes(kp)) / 4;
        bail!("{OP} kernel: D = {d} too large for shared memory (max {max_d} with n = {n})");
    }
    let gy = to_u32(b, "B", OP)?.div_ceil(qb);
    let tiles = (m as u64).div_ceil(TILE as u64);
    let want = (4 * sm_count.max(1) as u64).div_ceil(gy as u64).max(1);
    let gx0 = want.min(tiles).max(1);
    let chunk_tiles = tiles.div_ceil(gx0);
    let chunk_rows = chunk_tiles * TILE as u64;
    let gx = (m as u64).div_ceil(chunk_rows);
    let chunk_rows = u32::try_from(chunk_rows)
        .map_err(|_| candle_core::Error::Msg(format!("{OP} kernel: M = {m} too large")))?;
    Ok(CosinePlan {
        partial: LaunchPlan {
            grid: (gx as u32, gy, 1),
            block: (THREADS, 1, 1),
            smem_bytes: partial_smem(qb, d32, kp) as u32,
        },
        merge: LaunchPlan {
            grid: (to_u32(b, "B", OP)?, 1, 1),
            block: (THREADS, 1, 1),
            smem_bytes: stream_bytes(kp) as u32,
        },
        qb,
        kp,
        chunk_rows,
    })
}

/// The device addresses of one call's inputs (all contiguous, on the launcher's device).
struct Inputs {
    /// [B, D] f32.
    q: Ptr<f32>,
    /// [M, D] in `key_dtype`.
    keys: Ptr<AnyElem>,
    key_dtype: DType,
    /// [M] f32.
    key_norms: Ptr<f32>,
}

/// The top-n of one call: `[B, row_len]` buffers whose first `n` columns are the answer.
struct TopN<L: Launcher> {
    scores: L::Buf<f32>,
    indices: L::Buf<u32>,
    row_len: usize,
}

/// Runs the partial and (when needed) the merge kernel of one call on `x`. The NaN flag is
/// read back (a device synchronisation) so that a NaN input is an error of this call.
fn launch_all<L: Launcher>(x: &L, c: &Checked, inp: &Inputs) -> Result<TopN<L>> {
    const OP: &str = "cosine_topk";
    let p = plan(c.b, c.m, c.d, c.n, x.sm_count()?)?;
    let gx = p.partial.grid.0 as usize;
    let kp = p.kp as usize;
    let ncand = gx * kp;
    let exclude = x.upload(&c.exclude)?;
    let cand_s = x.zeros::<f32>(c.b * ncand)?;
    let cand_i = x.zeros::<u32>(c.b * ncand)?;
    let err = x.zeros::<u32>(3)?;
    let args = CosineTopkPartialArgs {
        q: inp.q,
        keys: inp.keys,
        key_norms: inp.key_norms,
        exclude: x.ptr(&exclude),
        b: to_u32(c.b, "B", OP)?,
        m: to_u32(c.m, "M", OP)?,
        d: to_u32(c.d, "D", OP)?,
        qb: p.qb,
        kp: p.kp,
        chunk_rows: p.chunk_rows,
        cand_s: x.ptr(&cand_s),
        cand_i: x.ptr(&cand_i),
        err: x.ptr(&err),
    };
    // SAFETY: queries B*D, keys M*D, norms M, exclusions B, candidates B*gx*kp, 3 error
    // words: the extents the partial kernel indexes for this plan.
    unsafe {
        x.launch(
            &entry::<CosineTopkPartialArgs>(inp.key_dtype)?,
            &p.partial,
            &args,
        )?
    };
    let e = x.download(&err)?;
    if e[0] == ERR_NAN_SCORE {
        return Err(crate::check::nan_score(OP, e[1] as usize, e[2] as usize));
    }
    if !p.needs_merge() {
        return Ok(TopN {
            scores: cand_s,
            indices: cand_i,
            row_len: kp,
        });
    }
    let out_s = x.zeros::<f32>(c.b * c.n)?;
    let out_i = x.zeros::<u32>(c.b * c.n)?;
    let args = CosineTopkMergeArgs {
        cand_s: x.ptr(&cand_s),
        cand_i: x.ptr(&cand_i),
        ncand: to_u32(ncand, "candidates", OP)?,
        kp: p.kp,
        n: to_u32(c.n, "n", OP)?,
        out_s: x.ptr(&out_s),
        out_i: x.ptr(&out_i),
    };
    // SAFETY: candidates B*ncand, outputs B*n.
    unsafe { x.launch(CosineTopkMergeArgs::ENTRY, &p.merge, &args)? };
    Ok(TopN {
        scores: out_s,
        indices: out_i,
        row_len: c.n,
    })
}

/// The kernel that runs one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `cosine_topk_partial` + `cosine_topk_merge` (this file): CUDA cores, each key read once
    /// per block of up to [`QB_MAX`] queries; bound by memory bandwidth for small batches.
    Bandwidth,
    /// `cosine_topk_tc_*` (`tensor_core.rs`): the dot products on the tensor cores, exact
    /// rescoring of the candidates; for large batches.
    TensorCore,
}

/// Smallest batch given to the tensor-core path: 16 queries with f16/bf16 keys, 32 with f32
/// keys (the tf32 pass does half the f16 rate and its rescoring reads f32 rows).
pub fn tc_min_batch(dtype: DType) -> usize {
    if dtype == DType::F32 {
        32
    } else {
        16
    }
}

/// Smallest D given to the tensor-core path (below it the per-score filter costs more than
/// the dot product it saves).
pub const TC_MIN_D: usize = 32;

/// The dispatch rule: [`Kernel::TensorCore`] from [`tc_min_batch`] queries and [`TC_MIN_D`]
/// dimensions on, else [`Kernel::Bandwidth`]. Where the tensor-core path cannot take a call
/// (n above its limit, rows not 16-byte aligned, shared or candidate memory over budget) the
/// bandwidth kernel runs. The crossover behind the numbers is a prediction (docs/DESIGN.md,
/// "Tensor-core path"), unmeasured.
pub fn choose(b: usize, d: usize, dtype: DType) -> Kernel {
    if b >= tc_min_batch(dtype) && d >= TC_MIN_D {
        Kernel::TensorCore
    } else {
        Kernel::Bandwidth
    }
}

/// Runs one call on `x` with inputs on its device (n <= [`KMAX`]): the CUDA path and,
/// with the emulator, `cosine_topk_emulated`. The kernel is [`choose`]'s.
pub(crate) fn run_on<L: Launcher>(
    x: &L,
    c: &Checked,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
) -> Result<(Tensor, Tensor)> {
    run_with(x, c, queries, keys, key_norms, None)
}

/// [`run_on`] with the kernel forced (`Some`, with the tensor-core test knobs): a forced
/// tensor-core call that the path cannot take is an error instead of a bandwidth run.
pub(crate) fn run_with<L: Launcher>(
    x: &L,
    c: &Checked,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    force: Option<(Kernel, TcOverrides)>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "cosine_topk";
    if c.b == 0 {
        return Ok((
            Tensor::zeros((0, c.n), DType::F32, keys.device())?,
            Tensor::zeros((0, c.n), DType::U32, keys.device())?,
        ));
    }
    let q = queries.to_dtype(DType::F32)?.contiguous()?;
    let keys = keys.contiguous()?;
    let kn = key_norms.contiguous()?;
    let kernel = force.map_or_else(|| choose(c.b, c.d, keys.dtype()), |f| f.0);
    if kernel == Kernel::TensorCore {
        let addr = crate::kernel::tensor_ptr(&keys, OP)?.0.addr();
        match tensor_core::eligible(x, c, addr, keys.dtype()) {
            Ok(()) => {
                let ovr = force.map(|f| f.1).unwrap_or_default();
                let exact = |sub: &Checked, qs: &Tensor| run_bandwidth(x, sub, qs, &keys, &kn);
                return tensor_core::run_on(x, c, &q, &keys, &kn, &ovr, &exact);
            }
            Err(e) if force.is_some() => return Err(e),
            Err(_) => {}
        }
    }
    run_bandwidth(x, c, &q, &keys, &kn)
}

/// The bandwidth kernels on `q` [B, D] f32 contiguous and contiguous `keys`, `kn`.
fn run_bandwidth<L: Launcher>(
    x: &L,
    c: &Checked,
    q: &Tensor,
    keys: &Tensor,
    kn: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "cosine_topk";
    let (qp, _q) = crate::kernel::tensor_ptr(q, OP)?;
    let (kp, _k) = crate::kernel::tensor_ptr(keys, OP)?;
    let (np, _n) = crate::kernel::tensor_ptr(kn, OP)?;
    let inputs = Inputs {
        q: Ptr::new(qp.addr()),
        keys: kp,
        key_dtype: keys.dtype(),
        key_norms: Ptr::new(np.addr()),
    };
    let top = launch_all(x, c, &inputs)?;
    let s = x.tensor_of(top.scores, (c.b, top.row_len))?;
    let i = x.tensor_of(top.indices, (c.b, top.row_len))?;
    if top.row_len == c.n {
        return Ok((s, i));
    }
    Ok((
        s.narrow(1, 0, c.n)?.contiguous()?,
        i.narrow(1, 0, c.n)?.contiguous()?,
    ))
}

/// The CUDA path: n <= [`KMAX`] on the GPU; larger n on the fused CPU path (the bank is
/// copied to the host).
#[cfg(feature = "cuda")]
pub(crate) fn cosine_topk_cuda(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    c: &Checked,
) -> Result<(Tensor, Tensor)> {
    use candle_core::Device;
    let Device::Cuda(dev) = keys.device() else {
        bail!("cosine_topk: expected CUDA tensors");
    };
    if c.n > KMAX {
        // Lists longer than the kernel's shared-memory running list: the fused CPU path.
        let cpu = Device::Cpu;
        let (s, i) = super::cpu::cosine_topk_cpu(
            &queries.to_device(&cpu)?,
            &keys.to_device(&cpu)?,
            Some(&key_norms.to_device(&cpu)?),
            c,
        )?;
        return Ok((s.to_device(keys.device())?, i.to_device(keys.device())?));
    }
    run_on(
        &crate::kernel::cuda::CudaLauncher::new(dev),
        c,
        queries,
        keys,
        key_norms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_rule() {
        // Large batches and dimensions go to the tensor cores...
        assert_eq!(choose(1024, 1024, DType::BF16), Kernel::TensorCore);
        assert_eq!(choose(64, 256, DType::F16), Kernel::TensorCore);
        assert_eq!(choose(16, 32, DType::BF16), Kernel::TensorCore);
        assert_eq!(choose(32, 1024, DType::F32), Kernel::TensorCore);
        // ...small ones stay on the bandwidth kernel: fewer queries than the threshold of the
        // dtype (f32's is higher), or too few dimensions.
        assert_eq!(choose(15, 1024, DType::BF16), Kernel::Bandwidth);
        assert_eq!(choose(31, 1024, DType::F32), Kernel::Bandwidth);
        assert_eq!(choose(16, 1024, DType::F32), Kernel::Bandwidth);
        assert_eq!(choose(1, 256, DType::F16), Kernel::Bandwidth);
        assert_eq!(choose(4096, 31, DType::BF16), Kernel::Bandwidth);
        assert_eq!(tc_min_batch(DType::F32), 32);
        assert_eq!(tc_min_batch(DType::F16), 16);
    }
}
