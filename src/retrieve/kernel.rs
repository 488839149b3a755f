//! Launch plan of `kernels/cosine_topk.cu`, used by the CUDA path and the emulator.
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

use crate::launch::{LaunchPlan, MAX_DYN_SMEM_BYTES};

/// Threads per block of both kernels (4 warps).
pub const THREADS: u32 = 128;
/// Bank rows scored per tile (two groups of 32 rows per warp); also the candidate tile of
/// the merge.
pub const TILE: u32 = 256;
/// Largest n the kernels handle (the running list is `kp = next_pow2(n) <= KMAX`); the
/// CUDA op runs larger n on the fused CPU path. A running list longer than the tile is
/// fine: a tile then holds fewer hits than `kp`, so `r2_stream_flush` always takes its
/// sorted-hits path. At `kp = 1024` one query's lists take 18 KiB of shared memory.
pub const KMAX: usize = 1024;
/// Most queries one block scores together (each key row read once for all of them).
pub const QB_MAX: u32 = 8;

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

/// Bytes of one (score f32, index u32) pair in shared memory.
const PAIR: u32 = 8;

/// Shared bytes of the per-warp [32][33] f32 transpose buffers that make the partial
/// kernel's key loads coalesced (`R2_CT_TRANSPOSE_FLOATS` in kernels/cosine_topk.cu).
pub const TRANSPOSE_BYTES: u64 = (THREADS as u64 / 32) * 32 * 33 * 4;

/// Dynamic shared memory of the partial kernel for `qb` queries of dimension `d`:
/// the transpose buffers, the queries in f32, then per query the running list, tile and
/// hit buffer of (score, index) pairs (must match `r2_stream_bytes` in kernels/topk.cuh).
pub fn partial_smem(qb: u32, d: u32, kp: u32) -> u64 {
    TRANSPOSE_BYTES + qb as u64 * (d as u64 * 4 + stream_bytes(kp))
}

/// Shared bytes of one streaming top-kp list (`r2_stream_bytes(1, kp, TILE)`).
fn stream_bytes(kp: u32) -> u64 {
    (2 * kp + TILE) as u64 * PAIR as u64
}

/// Plans both launches for B queries, M bank rows, dimension D, top-n, on a device with
/// `sm_count` multiprocessors. Errors when n > [`KMAX`] or one query of dimension D
/// does not fit the shared-memory budget.
pub fn plan(
    b: usize,
    m: usize,
    d: usize,
    n: usize,
    sm_count: u32,
) -> candle_core::Result<CosinePlan> {
    if n == 0 || n > KMAX {
        candle_core::bail!("cosine_topk kernel: n = {n} outside 1..={KMAX}");
    }
    if b == 0 || m == 0 || d == 0 {
        candle_core::bail!("cosine_topk kernel: empty shape B = {b}, M = {m}, D = {d}");
    }
    let kp = (n.next_power_of_two() as u32).max(2);
    let d32 = u32::try_from(d)
        .map_err(|_| candle_core::Error::Msg(format!("cosine_topk kernel: D = {d} too large")))?;
    let mut qb = QB_MAX.min(b as u32);
    while qb > 1 && partial_smem(qb, d32, kp) > MAX_DYN_SMEM_BYTES as u64 {
        qb -= 1;
    }
    if partial_smem(qb, d32, kp) > MAX_DYN_SMEM_BYTES as u64 {
        let max_d =
            (MAX_DYN_SMEM_BYTES as u64).saturating_sub(TRANSPOSE_BYTES + stream_bytes(kp)) / 4;
        candle_core::bail!(
            "cosine_topk kernel: D = {d} too large for shared memory (max {max_d} with n = {n})"
        );
    }
    let gy = (b as u32).div_ceil(qb);
    let tiles = (m as u64).div_ceil(TILE as u64);
    let want = (4 * sm_count.max(1) as u64).div_ceil(gy as u64).max(1);
    let gx0 = want.min(tiles).max(1);
    let chunk_tiles = tiles.div_ceil(gx0);
    let chunk_rows = chunk_tiles * TILE as u64;
    let gx = (m as u64).div_ceil(chunk_rows);
    let chunk_rows = u32::try_from(chunk_rows)
        .map_err(|_| candle_core::Error::Msg(format!("cosine_topk kernel: M = {m} too large")))?;
    Ok(CosinePlan {
        partial: LaunchPlan {
            grid: (gx as u32, gy, 1),
            block: (THREADS, 1, 1),
            smem_bytes: partial_smem(qb, d32, kp) as u32,
        },
        merge: LaunchPlan {
            grid: (b as u32, 1, 1),
            block: (THREADS, 1, 1),
            smem_bytes: stream_bytes(kp) as u32,
        },
        qb,
        kp,
        chunk_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_bank_and_fits_smem() {
        for &(b, m, d, n) in &[
            (1, 1, 1, 1),
            (64, 1_000_000, 1024, 8),
            (3, 257, 33, 256),
            (70, 5000, 4000, 5),
            (5, 4000, 100, 257),
            (2, 100_000, 1024, 1000),
            (1, 700, 3, 700),
        ] {
            let p = plan(b, m, d, n, 132).unwrap();
            assert!(p.partial.smem_bytes <= MAX_DYN_SMEM_BYTES);
            assert!(p.merge.smem_bytes <= MAX_DYN_SMEM_BYTES);
            assert_eq!(p.chunk_rows % TILE, 0);
            let gx = p.partial.grid.0 as usize;
            assert!(gx * p.chunk_rows as usize >= m);
            assert!((gx - 1) * (p.chunk_rows as usize) < m, "no empty block");
            assert!(p.partial.grid.1 * p.qb >= b as u32);
            assert!(p.kp as usize >= n && p.kp.is_power_of_two());
        }
        assert!(plan(1, 10, 4, 0, 2).is_err());
        assert!(plan(1, 2000, 4, KMAX + 1, 2).is_err());
        assert!(plan(1, 10, 20_000, 4, 2).is_err());
    }
}
