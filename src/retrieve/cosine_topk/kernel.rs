//! Launch plan and device path of `kernels/cosine_topk.cu`, one code for the CUDA device and
//! the emulator (both through [`Launcher`]).
//!
//! Two kernels, queued back to back with no host round trip between or inside them:
//! 1. `cosine_topk_partial_<cfg>_<dt>`: grid `(gx, gy)`. Block `(x, y)` scores bank rows
//!    `[y * chunk_rows, (y + 1) * chunk_rows)` for the `qb` queries `[x * qb, (x + 1) * qb)` of
//!    its configuration ([`CONFIGS`]), streaming the keys through a 3-stage `cp.async`
//!    pipeline into shared memory and keeping a running top-`kp` per query there. It writes
//!    `kp` candidates per (query, block): `B * gy * kp` pairs, never a B x M matrix. The grid
//!    fills the GPU once (a persistent grid sized from the shared-memory occupancy).
//! 2. `cosine_topk_merge`: one block per query merges its `gy * kp` candidates into the top n,
//!    and writes NaN scores if the partial kernel set the error word.
//!
//! **NaN contract (no synchronisation inside the op).** Input errors that need the data (a NaN
//! score, an `exclude` entry out of range, an exclusion with n = M) are found on the device and
//! written to a 3-word error word of the call, `[code, detail, detail]`; the exclusion vector is
//! read by the kernels where it lies (never uploaded, never read back). The call queues both
//! kernels and returns `DeviceTopN` at once. Checked callers read the word once, after both
//! kernels (`cosine_topk`: one synchronisation per call, where the old path synchronised between
//! the kernels and uploaded the exclusions); unchecked callers (`cosine_topk_deferred`) read it
//! when they choose, and meanwhile every score of a failed call is NaN, so a consumer of the
//! scores sees the failure.
//!
//! These are the bandwidth kernels ([`Kernel::Bandwidth`]). Larger batches take the GEMM +
//! select path of `gemm_select.rs` ([`Kernel::Gemm`]) by the default rule [`choose`], or the
//! path the GPU's measured dispatch table names (`dispatch.rs`; the tensor-core path of
//! `tensor_core.rs`, [`Kernel::TensorCore`], only so), all under the same contract (one error
//! word per call, exclusions checked on the device, NaN scores after a failure, nothing read
//! back).
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{DeviceCall, DeviceTopN};
use super::gemm_select::{self, GemmOverrides};
use super::tensor_core::{self, TcOverrides};
use crate::kernel::abi::{
    CosineTopkMergeArgs, CosineTopkPartialArgs, CT_KB_MAX, CT_MERGE_TILE, CT_MIN_BLOCKS, CT_QB_MAX,
    CT_QN_SLICES, CT_STAGES, CT_THREADS, CT_TILE_ROWS,
};
use crate::kernel::gemm::Gemm;
use crate::kernel::workspace::Workspaces;
use crate::kernel::{entry, to_u32, KernelArgs, LaunchPlan, Launcher, Ptr};
use candle_core::{bail, DType, Result, Tensor};

/// Threads per block of both kernels (4 warps).
pub const THREADS: u32 = CT_THREADS;
/// Bank rows per tile of the partial kernel (scores offered to the lists together).
pub const TILE_ROWS: u32 = CT_TILE_ROWS;
/// Largest n the kernels handle (the running list is `kp = next_pow2(n) <= KMAX`); the
/// CUDA op runs larger n on the fused CPU path.
pub const KMAX: usize = 1024;
/// Most queries one partial block scores together.
pub const QB_MAX: u32 = CT_QB_MAX;
/// Most candidates per query the merge reads (`gy * kp`): caps `gy` for large n, so one
/// merge block never streams more than 128 Ki candidates.
pub const MERGE_CANDIDATES_MAX: u64 = 1 << 17;

/// One compiled configuration of the partial kernel (`cosine_topk_partial_<tag>_<dtype>`; the
/// lane layout is `CtCfg` in kernels/cosine_topk.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialConfig {
    /// Entry-name tag.
    pub tag: &'static str,
    /// Queries per block.
    pub qb: u32,
    /// Smallest hit buffer per query: a tile needs at most `ceil(TILE_ROWS / hb)` rounds.
    pub hb_min: u32,
}

/// The configurations, fewest queries first: q1 (one row per lane), q8 / q16 / q32 (4 lanes
/// per row group, 2 / 4 / 8 queries and 4 rows per lane).
pub const CONFIGS: [PartialConfig; 4] = [
    PartialConfig {
        tag: "q1",
        qb: 1,
        hb_min: TILE_ROWS,
    },
    PartialConfig {
        tag: "q8",
        qb: 8,
        hb_min: 64,
    },
    PartialConfig {
        tag: "q16",
        qb: 16,
        hb_min: 32,
    },
    PartialConfig {
        tag: "q32",
        qb: QB_MAX,
        hb_min: 16,
    },
];

// The partial kernels keep each query's |q| slices in its hit buffer (hb >= hb_min floats of
// score and as many of row, 2 * hb floats) before the first tile's hits arrive.
const _: () = {
    let mut i = 0;
    while i < CONFIGS.len() {
        assert!(2 * CONFIGS[i].hb_min >= CT_QN_SLICES);
        i += 1;
    }
};

/// What one call asks of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Queries.
    pub b: usize,
    /// Bank rows.
    pub m: usize,
    /// Dimension.
    pub d: usize,
    /// Results per query.
    pub n: usize,
    /// Key dtype (f32, f16 or bf16). Key and query rows are 16-byte aligned (`D * key bytes %
    /// 16 == 0`, aligned base addresses): the op stages other inputs (`staged`).
    pub dtype: DType,
}

/// The device a plan is sized for.
pub struct Gpu<'a> {
    /// Multiprocessors.
    pub sm_count: u32,
    /// Most dynamic shared memory per block ([`Launcher::max_dyn_smem`]).
    pub max_dyn_smem: u32,
    /// Blocks of `entry` launched with a plan that one multiprocessor holds
    /// ([`Launcher::resident_blocks`]).
    pub resident: &'a dyn Fn(&str, &LaunchPlan) -> Result<u32>,
}

/// Everything both launches of one `cosine_topk` call need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CosinePlan {
    /// Launch of the partial (scoring) kernel: grid (query groups, bank chunks).
    pub partial: LaunchPlan,
    /// Launch of the merge kernel (one block per query).
    pub merge: LaunchPlan,
    /// The partial kernel's configuration.
    pub config: PartialConfig,
    /// Running-list length: the next power of two >= n (>= 2).
    pub kp: u32,
    /// Hit-buffer length per query (a power of two >= kp).
    pub hb: u32,
    /// Key bytes per row and pipeline step (a power of two, 16 to [`CT_KB_MAX`]).
    pub kb: u32,
    /// Blocks of the partial kernel one multiprocessor holds (the grid is one wave of them).
    pub resident: u32,
    /// Bank rows per block (a multiple of [`TILE_ROWS`]).
    pub chunk_rows: u32,
}

/// Dynamic shared memory of the partial kernel: [`CT_STAGES`] stages of (keys `TILE_ROWS x
/// (kb + 16)`, queries `qb x (kb / key_bytes * 4 + 16)` in f32, norms `TILE_ROWS x 4`), then the
/// running lists (`qb x kp`) and hit buffers (`qb x hb`) of (score, row) pairs. Must match the
/// carving in kernels/cosine_topk.cu.
pub fn partial_smem(qb: u32, kb: u32, key_bytes: u32, kp: u32, hb: u32) -> u64 {
    let tr = TILE_ROWS as u64;
    let dk = (kb / key_bytes) as u64;
    let stage = tr * (kb as u64 + 16) + qb as u64 * (dk * 4 + 16) + tr * 4;
    CT_STAGES as u64 * stage + qb as u64 * (kp as u64 + hb as u64) * 8
}

/// Dynamic shared memory of the merge: the running list, tile and hit buffer of
/// kernels/topk.cuh's streaming top-kp (`r2_stream_bytes`).
pub fn merge_smem(kp: u32) -> u64 {
    crate::kernel::topk::stream_bytes(1, kp, CT_MERGE_TILE)
}

/// Entry point of the partial kernel for `config` and keys of `dtype`.
pub fn partial_entry(config: &PartialConfig, dtype: DType) -> Result<String> {
    Ok(entry::<CosineTopkPartialArgs>(dtype)?.replacen(
        CosineTopkPartialArgs::ENTRY,
        &format!("{}_{}", CosineTopkPartialArgs::ENTRY, config.tag),
        1,
    ))
}

/// Plans both launches. The configuration is the one with the fewest queries per block that
/// covers B (q32 above 32, with more query groups), or a smaller one when its running lists
/// do not fit next to the pipeline. The key bytes per step are the power of two (16 to
/// [`CT_KB_MAX`], at most the row; 64 or more when that fits: HBM moves 64-byte bursts) that
/// keeps the most key bytes per stage on a multiprocessor (`resident blocks x kb`; on ties
/// more blocks, to hide latency), with at least two resident blocks when any kb gives two (one
/// block idles its multiprocessor at every barrier); shared memory within `gpu.max_dyn_smem`,
/// the device's opt-in limit. The grid is one wave of the resident blocks. Errors when
/// n > [`KMAX`] or a shape is empty.
pub fn plan(p: &Problem, gpu: &Gpu) -> Result<CosinePlan> {
    plan_with(p, gpu, None)
}

/// [`plan`] with the key bytes per step forced (`forced`: a power of two from 16 to
/// [`CT_KB_MAX`], at most the row rounded up to a power of two, else an error; the
/// configuration is the one [`plan`] would take if it fits, else a smaller one): how `tune`
/// times the bandwidth kernel's step sizes ([`Knobs::kb`]).
pub fn plan_with(p: &Problem, gpu: &Gpu, forced: Option<u32>) -> Result<CosinePlan> {
    const OP: &str = "cosine_topk";
    let Problem { b, m, d, n, .. } = *p;
    if n == 0 || n > KMAX {
        bail!("{OP} kernel: n = {n} outside 1..={KMAX}");
    }
    if b == 0 || m == 0 || d == 0 {
        bail!("{OP} kernel: empty shape B = {b}, M = {m}, D = {d}");
    }
    let dtype = p.dtype;
    let key_bytes = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        dt => bail!("{OP} kernel: keys of dtype {dt:?} (f32, f16, bf16)"),
    };
    let kp = (n.next_power_of_two() as u32).max(2);
    let row_bytes = (d as u64 * key_bytes as u64).div_ceil(16) * 16;
    let kb_max = (row_bytes.next_power_of_two() as u32).clamp(16, CT_KB_MAX);
    if let Some(k) = forced {
        if !k.is_power_of_two() || !(16..=kb_max).contains(&k) {
            crate::error::bail!(
                "{OP} kernel: {k} key bytes per step, expected a power of two from 16 to {kb_max} (D = {d}, {dtype:?} keys)"
            );
        }
    }
    let wanted = CONFIGS
        .iter()
        .position(|c| c.qb as usize >= b)
        .unwrap_or(CONFIGS.len() - 1);
    let mut chosen = None;
    for config in CONFIGS[..=wanted].iter().rev() {
        let hb = kp.max(config.hb_min);
        // Candidate (kb, shared memory, resident blocks) and its rank: (two blocks or more,
        // key bytes per stage on an SM, blocks), the largest wins.
        type Rank = (bool, u64, u32);
        let mut best: Option<(Rank, u32, u64, u32)> = None;
        let (kb_top, kb_min) = match forced {
            Some(k) => (k, k),
            None => (kb_max, kb_max.min(64)),
        };
        let mut kb = kb_top;
        // Down to 64 bytes (HBM's burst), or further while nothing fits; a forced kb alone.
        while kb >= 16 && (kb >= kb_min || (best.is_none() && forced.is_none())) {
            let smem = partial_smem(config.qb, kb, key_bytes, kp, hb);
            if smem <= gpu.max_dyn_smem as u64 {
                let launch = LaunchPlan {
                    grid: (1, 1, 1),
                    block: (THREADS, 1, 1),
                    smem_bytes: smem as u32,
                };
                let resident = (gpu.resident)(&partial_entry(config, dtype)?, &launch)?.max(1);
                let key = (resident >= 2, resident as u64 * kb as u64, resident);
                if best.is_none_or(|b| key > b.0) {
                    best = Some((key, kb, smem, resident));
                }
            }
            kb /= 2;
        }
        if let Some((_, kb, smem, resident)) = best {
            chosen = Some((*config, hb, kb, smem, resident));
            break;
        }
    }
    let Some((config, hb, kb, smem, resident)) = chosen else {
        bail!("{OP} kernel: no configuration fits shared memory (n = {n})");
    };
    let gx = to_u32(b, "B", OP)?.div_ceil(config.qb);
    // One wave: the query groups of a chunk side by side, never more blocks than the
    // multiprocessors hold at once.
    let slots = gpu.sm_count.max(1) as u64 * resident as u64;
    let tiles = (m as u64).div_ceil(TILE_ROWS as u64);
    let want = (slots / gx as u64).max(1);
    let cap = (MERGE_CANDIDATES_MAX / kp as u64).max(1);
    let gy0 = want.min(tiles).min(cap).max(1);
    let chunk_rows = tiles.div_ceil(gy0) * TILE_ROWS as u64;
    let gy = (m as u64).div_ceil(chunk_rows);
    let chunk_rows = u32::try_from(chunk_rows)
        .map_err(|_| candle_core::Error::Msg(format!("{OP} kernel: M = {m} too large")))?;
    Ok(CosinePlan {
        partial: LaunchPlan {
            grid: (gx, gy as u32, 1),
            block: (THREADS, 1, 1),
            smem_bytes: smem as u32,
        },
        merge: LaunchPlan {
            grid: (to_u32(b, "B", OP)?, 1, 1),
            block: (THREADS, 1, 1),
            smem_bytes: merge_smem(kp) as u32,
        },
        config,
        kp,
        hb,
        kb,
        resident,
        chunk_rows,
    })
}

/// The device path that runs one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `cosine_topk_partial` + `cosine_topk_merge` (this file): CUDA cores, each key read once
    /// per block of up to [`QB_MAX`] queries; bound by memory bandwidth for small batches.
    Bandwidth,
    /// `cosine_topk_tc_*` (`tensor_core.rs`): the dot products on the tensor cores, exact
    /// rescoring of the candidates; opt-in (a dispatch table or the override).
    TensorCore,
    /// cuBLAS GEMM + `cosine_topk_gemm_select` (`gemm_select.rs`), exact rescoring of the
    /// candidates; f32 keys through tf32.
    Gemm,
    /// [`Kernel::Gemm`] with f32 keys through a plain f32 GEMM (16-bit keys: the same as
    /// [`Kernel::Gemm`]).
    GemmFp32,
}

impl Kernel {
    /// Every path, in the order `tune` measures them.
    pub const ALL: [Kernel; 4] = [
        Kernel::Gemm,
        Kernel::GemmFp32,
        Kernel::Bandwidth,
        Kernel::TensorCore,
    ];

    /// The path's name in dispatch tables, `R2SCP_COSINE_TOPK_PATH` and benchmark rows.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Bandwidth => "bandwidth",
            Kernel::TensorCore => "tensor-core",
            Kernel::Gemm => "gemm",
            Kernel::GemmFp32 => "gemm-fp32",
        }
    }

    /// The path named `name` ([`Kernel::name`]).
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Smallest batch the default rule gives to the GEMM + select path (predicted crossover with
/// the bandwidth kernel, docs/DESIGN.md "GEMM + select path": below it the bandwidth kernel
/// reads the bank once with fewer launches).
pub const GEMM_MIN_B: usize = 16;

/// Smallest D the default rule gives to the GEMM + select path: below about 32 dimensions the
/// select's 8 bytes of L2 traffic per score (the GEMM's write, the select's read) cost more
/// than the bandwidth kernel's D fused multiply-adds per score (docs/DESIGN.md).
pub const GEMM_MIN_D: usize = 32;

/// Smallest D the tensor-core path serves well (below it the per-score filter costs more than
/// the dot product it saves); used when a table or the override asks for it.
pub const TC_MIN_D: usize = 32;

/// The default dispatch rule, used where no measured table covers the GPU (issue 23): the
/// GEMM + select path from [`GEMM_MIN_B`] queries and [`GEMM_MIN_D`] dimensions on, else the
/// bandwidth kernel. The tensor-core kernel is never the default: it is chosen only by a
/// dispatch table that measured it faster, or by the override (`dispatch.rs`). Where the
/// chosen path cannot take a call (n above its limit, rows not aligned, memory over budget)
/// the bandwidth kernel runs. The crossovers are predictions (docs/DESIGN.md, "GEMM + select
/// path"), unmeasured.
pub fn choose(b: usize, d: usize, _dtype: DType) -> Kernel {
    if b >= GEMM_MIN_B && d >= GEMM_MIN_D {
        Kernel::Gemm
    } else {
        Kernel::Bandwidth
    }
}

/// How a call's path is picked.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pick {
    /// This path if it can take the call, else the bandwidth kernel.
    Prefer(Kernel),
    /// This path or an error (tests, `tune`, benchmark rows), with the test knobs.
    Force(Kernel, Knobs),
}

/// Knobs of the device paths for tests and `tune`. Test infrastructure.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Knobs {
    /// The tensor-core path's.
    pub tc: TcOverrides,
    /// The GEMM + select path's.
    pub gemm: GemmOverrides,
    /// The bandwidth kernel's key bytes per step instead of the plan's ([`plan_with`]).
    pub kb: Option<u32>,
}

/// Runs one call on `x` with inputs on its device (n <= [`KMAX`]) on [`choose`]'s path:
/// queues the kernels and returns without reading the error word. The emulator's default.
pub(crate) fn run_on<L: Launcher + Gemm + Workspaces>(
    x: &L,
    c: &DeviceCall,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
) -> Result<DeviceTopN> {
    let pick = Pick::Prefer(choose(c.b, c.d, keys.dtype()));
    run_with(x, c, queries, keys, key_norms, pick)
}

/// Runs one call on the path `pick` names: queued, the error word unread. A forced path that
/// cannot take the call is an error; a preferred one falls back to the bandwidth kernel.
pub(crate) fn run_with<L: Launcher + Gemm + Workspaces>(
    x: &L,
    c: &DeviceCall,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    pick: Pick,
) -> Result<DeviceTopN> {
    const OP: &str = "cosine_topk";
    let dev = keys.device();
    if c.b == 0 {
        return Ok(DeviceTopN {
            scores: Tensor::zeros((0, c.n), DType::F32, dev)?,
            indices: Tensor::zeros((0, c.n), DType::U32, dev)?,
            status: Tensor::zeros(3, DType::U32, dev)?,
        });
    }
    let q = queries.to_dtype(DType::F32)?.contiguous()?;
    let keys = keys.contiguous()?;
    let kn = key_norms.contiguous()?;
    let (kernel, knobs, forced) = match pick {
        Pick::Prefer(k) => (k, Knobs::default(), false),
        Pick::Force(k, knobs) => (k, knobs, true),
    };
    let dtype = keys.dtype();
    let taken = match kernel {
        Kernel::Bandwidth => Ok(()),
        Kernel::TensorCore => {
            let addr = crate::kernel::tensor_ptr(&keys, OP)?.0.addr();
            tensor_core::eligible(x, c, addr, dtype)
        }
        Kernel::Gemm | Kernel::GemmFp32 => gemm_select::eligible(x, c, dtype),
    };
    match (taken, kernel) {
        (Ok(()), Kernel::TensorCore) => tensor_core::run_on(x, c, &q, &keys, &kn, &knobs.tc),
        (Ok(()), Kernel::Gemm | Kernel::GemmFp32) => {
            let ovr = GemmOverrides {
                fp32: knobs.gemm.fp32 || kernel == Kernel::GemmFp32,
                ..knobs.gemm
            };
            gemm_select::run_on(x, c, &q, &keys, &kn, &ovr)
        }
        (Err(e), _) if forced => Err(e),
        _ => run_bandwidth(x, c, &q, &keys, &kn, knobs.kb),
    }
}

/// The exclusions of a call on `dev`, contiguous (a copy only when the caller passed them
/// on another device).
pub(crate) fn device_exclude(c: &DeviceCall, dev: &candle_core::Device) -> Result<Option<Tensor>> {
    match &c.exclude {
        Some(e) => Ok(Some(e.to_device(dev)?.contiguous()?)),
        None => Ok(None),
    }
}

/// Inputs whose rows are not all 16-byte aligned (`D * elt % 16 != 0`, or a base address off a
/// 16-byte boundary, e.g. a narrowed view), copied once, on the device and without a
/// synchronisation, to fresh tensors with D rounded up to 16 bytes of zeros: the partial
/// kernel then copies 16-byte chunks with cp.async as for aligned inputs (the old element-copy
/// path was synchronous and 4-8x slower). The zero columns change no bit of any score: the
/// kernel already reads a row to its 16-byte boundary, where they add exact zeros to the dot
/// product and to |q|. Returns `(q, keys, D')`; the copies cost one read and one write of the
/// bank per call (and its memory while the call runs).
fn staged(q: &Tensor, keys: &Tensor, d: usize) -> Result<(Tensor, Tensor, usize)> {
    let per16 = 16 / keys.dtype().size_in_bytes();
    let pad = d.next_multiple_of(per16) - d;
    let copy = |t: &Tensor| -> Result<Tensor> {
        if pad == 0 {
            t.force_contiguous()
        } else {
            t.pad_with_zeros(1, 0, pad)?.contiguous()
        }
    };
    Ok((copy(q)?, copy(keys)?, d + pad))
}

/// The bandwidth kernels on `q` [B, D] f32 contiguous (B >= 1) and contiguous `keys`, `kn`:
/// queues the partial and the merge kernel (staging misaligned rows first, [`staged`]); `kb`
/// forces the key bytes per step ([`plan_with`]).
fn run_bandwidth<L: Launcher>(
    x: &L,
    c: &DeviceCall,
    q: &Tensor,
    keys: &Tensor,
    kn: &Tensor,
    kb: Option<u32>,
) -> Result<DeviceTopN> {
    const OP: &str = "cosine_topk";
    let aligned = {
        let (q_ptr, _q) = crate::kernel::tensor_ptr(q, OP)?;
        let (k_ptr, _k) = crate::kernel::tensor_ptr(keys, OP)?;
        crate::kernel::rows_vec16(
            c.d,
            keys.dtype().size_in_bytes(),
            &[q_ptr.addr(), k_ptr.addr()],
        )
    };
    let (q, keys, d) = if aligned {
        (q.clone(), keys.clone(), c.d)
    } else {
        staged(q, keys, c.d)?
    };
    let ex = device_exclude(c, keys.device())?;
    let (q_ptr, _q) = crate::kernel::tensor_ptr(&q, OP)?;
    let (k_ptr, _k) = crate::kernel::tensor_ptr(&keys, OP)?;
    let (norm_ptr, _n) = crate::kernel::tensor_ptr(kn, OP)?;
    let ex_ptr = match &ex {
        Some(t) => Some(crate::kernel::tensor_ptr(t, OP)?),
        None => None,
    };
    if !crate::kernel::rows_vec16(
        d,
        keys.dtype().size_in_bytes(),
        &[q_ptr.addr(), k_ptr.addr()],
    ) {
        bail!("{OP}: internal error: staged rows are not 16-byte aligned");
    }
    let resident = |e: &str, p: &LaunchPlan| x.resident_blocks(e, p, CT_MIN_BLOCKS);
    let p = plan_with(
        &Problem {
            b: c.b,
            m: c.m,
            d,
            n: c.n,
            dtype: keys.dtype(),
        },
        &Gpu {
            sm_count: x.sm_count()?,
            max_dyn_smem: x.max_dyn_smem()?,
            resident: &resident,
        },
        kb,
    )?;
    let gy = p.partial.grid.1 as usize;
    let ncand = gy * p.kp as usize;
    let cand_s = x.zeros::<f32>(c.b * ncand)?;
    let cand_i = x.zeros::<u32>(c.b * ncand)?;
    let err = x.zeros::<u32>(3)?;
    let args = CosineTopkPartialArgs {
        q: Ptr::new(q_ptr.addr()),
        keys: k_ptr,
        key_norms: Ptr::new(norm_ptr.addr()),
        exclude: ex_ptr
            .as_ref()
            .map_or_else(Ptr::null, |(p, _)| Ptr::new(p.addr())),
        b: to_u32(c.b, "B", OP)?,
        m: to_u32(c.m, "M", OP)?,
        d: to_u32(d, "D", OP)?,
        n: to_u32(c.n, "n", OP)?,
        kp: p.kp,
        hb: p.hb,
        kb: p.kb,
        chunk_rows: p.chunk_rows,
        cand_s: x.ptr(&cand_s),
        cand_i: x.ptr(&cand_i),
        err: x.ptr(&err),
    };
    let name = partial_entry(&p.config, keys.dtype())?;
    // SAFETY: queries B*D, keys M*D (D the staged row length), norms M, exclusions B (or null),
    // candidates B*gy*kp, 3 error words: the extents the partial kernel indexes for this plan.
    unsafe { x.launch(&name, &p.partial, &args)? };
    let out_s = x.zeros::<f32>(c.b * c.n)?;
    let out_i = x.zeros::<u32>(c.b * c.n)?;
    let args = CosineTopkMergeArgs {
        cand_s: x.ptr(&cand_s),
        cand_i: x.ptr(&cand_i),
        ncand: to_u32(ncand, "candidates", OP)?,
        kp: p.kp,
        n: to_u32(c.n, "n", OP)?,
        err: x.ptr(&err),
        out_s: x.ptr(&out_s),
        out_i: x.ptr(&out_i),
    };
    // SAFETY: candidates B*ncand, 3 error words, outputs B*n.
    unsafe { x.launch(CosineTopkMergeArgs::ENTRY, &p.merge, &args)? };
    Ok(DeviceTopN {
        scores: x.tensor_of(out_s, (c.b, c.n))?,
        indices: x.tensor_of(out_i, (c.b, c.n))?,
        status: x.tensor_of(err, 3)?,
    })
}

/// The CUDA path: n <= [`KMAX`] on the GPU, on the path `dispatch::pick` names for this GPU,
/// with no synchronisation; larger n on the fused CPU path (the bank is copied to the host,
/// the exclusions read; errors are immediate).
#[cfg(feature = "cuda")]
pub(crate) fn cosine_topk_cuda(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: &Tensor,
    c: &DeviceCall,
) -> Result<DeviceTopN> {
    use candle_core::Device;
    let Device::Cuda(dev) = keys.device() else {
        bail!("cosine_topk: expected CUDA tensors");
    };
    if c.n > KMAX {
        // Lists longer than the kernel's shared-memory running list: the fused CPU path.
        let cpu = Device::Cpu;
        let ex = match &c.exclude {
            Some(e) => Some(e.to_device(&cpu)?),
            None => None,
        };
        let qc = queries.to_device(&cpu)?;
        let kc = keys.to_device(&cpu)?;
        let nc = key_norms.to_device(&cpu)?;
        let checked = super::contract::check("cosine_topk", &qc, &kc, Some(&nc), c.n, ex.as_ref())?;
        let (s, i) = super::cpu::cosine_topk_cpu(&qc, &kc, Some(&nc), &checked)?;
        return Ok(DeviceTopN {
            scores: s.to_device(keys.device())?,
            indices: i.to_device(keys.device())?,
            status: Tensor::zeros(3, DType::U32, keys.device())?,
        });
    }
    let gpu = super::dispatch::gpu_of(dev)?;
    let pick = Pick::Prefer(super::dispatch::pick(&gpu, c.b, c.d, keys.dtype()));
    run_with(
        &crate::kernel::cuda::CudaLauncher::new(dev),
        c,
        queries,
        keys,
        key_norms,
        pick,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{planned_resident_blocks, SmResources};

    /// The partial kernels' residency as planned without the driver on `sm`.
    fn on(sm: SmResources) -> impl Fn(&str, &LaunchPlan) -> Result<u32> {
        move |_: &str, p: &LaunchPlan| {
            Ok(planned_resident_blocks(
                &sm,
                p.threads_per_block(),
                CT_MIN_BLOCKS,
                p.smem_bytes,
            ))
        }
    }

    /// Issue 20, items 1 and 7: the partial kernel sizes its steps from the device's opt-in
    /// shared memory (whole 256-byte pieces of a 1 KiB row on an H200 instead of 64 bytes under
    /// a 47 KiB budget) and its grid is one wave of the blocks the multiprocessors hold.
    #[test]
    fn plan_uses_the_opt_in_shared_memory_and_one_wave() {
        let h200 = on(SmResources::SM_90);
        let gpu = Gpu {
            sm_count: 132,
            max_dyn_smem: 227 * 1024 - 1024,
            resident: &h200,
        };
        let prob = |b, m, d, dtype| Problem {
            b,
            m,
            d,
            n: 8,
            dtype,
        };
        let p = plan(&prob(1, 10_000_000, 256, DType::F32), &gpu).unwrap();
        assert_eq!((p.config.tag, p.kb, p.resident), ("q1", 256, 2));
        assert!(p.partial.smem_bytes > 48 * 1024);
        assert_eq!(p.partial.blocks(), 264);
        let p = plan(&prob(1, 10_000_000, 256, DType::BF16), &gpu).unwrap();
        assert_eq!((p.kb, p.resident), (256, 2));
        // Many queries: more blocks on a tie of bytes per multiprocessor.
        let p = plan(&prob(64, 1 << 20, 1024, DType::BF16), &gpu).unwrap();
        assert_eq!((p.config.tag, p.kb, p.resident), ("q32", 64, 4));
        for (b, m, d) in [
            (1, 1000, 256),
            (7, 1 << 20, 100),
            (64, 1 << 20, 256),
            (1000, 5000, 64),
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let p = plan(&prob(b, m, d, dtype), &gpu).unwrap();
                let slots = 132 * p.resident as u64;
                assert!(
                    p.partial.blocks() <= slots.max(p.partial.grid.0 as u64),
                    "{b} {m} {d}: {:?}",
                    p.partial
                );
                assert!(p.kb.is_power_of_two() && p.kb <= CT_KB_MAX);
                assert_eq!(on(SmResources::SM_90)("", &p.partial).unwrap(), p.resident);
            }
        }
        // The emulator's (and sm_86's) 98 KiB keep the 47 KiB-era steps.
        let small = on(SmResources::SM_86);
        let gpu = Gpu {
            sm_count: 2,
            max_dyn_smem: 98 * 1024,
            resident: &small,
        };
        let p = plan(&prob(1, 1000, 256, DType::F32), &gpu).unwrap();
        assert_eq!((p.kb, p.resident), (64, 2));
    }

    /// `tune`'s knob: a forced step size is planned alone (same configuration when it fits),
    /// and one the kernel cannot take is an error naming the range.
    #[test]
    fn forced_step_sizes() {
        let h200 = on(SmResources::SM_90);
        let gpu = Gpu {
            sm_count: 132,
            max_dyn_smem: 227 * 1024 - 1024,
            resident: &h200,
        };
        let prob = Problem {
            b: 1,
            m: 10_000_000,
            d: 256,
            n: 8,
            dtype: DType::F32,
        };
        let auto = plan(&prob, &gpu).unwrap();
        assert_eq!(plan_with(&prob, &gpu, Some(auto.kb)).unwrap(), auto);
        for kb in [16, 32, 64, 128, 512] {
            let p = plan_with(&prob, &gpu, Some(kb)).unwrap();
            assert_eq!((p.kb, p.config.tag), (kb, "q1"));
            assert!(p.partial.blocks() <= 132 * p.resident as u64);
        }
        for kb in [8, 48, 1024] {
            let e = plan_with(&prob, &gpu, Some(kb)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{kb} key bytes")) && e.contains("16 to 512"),
                "{e}"
            );
        }
        // A 64-byte row (D = 16 f32) has nothing above 64.
        let short = Problem { d: 16, ..prob };
        assert!(plan_with(&short, &gpu, Some(128)).is_err());
        assert_eq!(plan_with(&short, &gpu, Some(32)).unwrap().kb, 32);
    }

    #[test]
    fn dispatch_rule() {
        // From 16 queries and 32 dimensions the GEMM + select path, whatever the dtype...
        assert_eq!(choose(1024, 1024, DType::BF16), Kernel::Gemm);
        assert_eq!(choose(16, 32, DType::F32), Kernel::Gemm);
        assert_eq!(choose(64, 256, DType::F16), Kernel::Gemm);
        // ...below either, the bandwidth kernel; the tensor-core kernel never by default.
        assert_eq!(choose(15, 1024, DType::BF16), Kernel::Bandwidth);
        assert_eq!(choose(1, 256, DType::F16), Kernel::Bandwidth);
        assert_eq!(choose(4096, 31, DType::BF16), Kernel::Bandwidth);
        for b in [1, 8, 16, 64, 1024, 1 << 16] {
            for d in [8, 32, 256, 4096] {
                for dt in [DType::F32, DType::F16, DType::BF16] {
                    assert_ne!(choose(b, d, dt), Kernel::TensorCore);
                }
            }
        }
    }
}
