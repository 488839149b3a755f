//! Plans of the streaming block top-k in `kernels/topk.cuh`, shared by its users
//! (`cosine_topk`, `dissonance_topk`, `topk_rows`).

use super::abi::{CAP_TOPK_THREADS, TOPK_MAXQ, TOPK_WARP_MAX_K, TOPK_WARP_MAX_L};
use super::launch::{to_u32, LaunchPlan, MAX_DYN_SMEM_BYTES};
use candle_core::{bail, Result};

/// Bytes of one (score f32, index u32) pair in shared memory.
const PAIR: u64 = 8;

/// Shared bytes `r2_stream_carve` takes for `nq` lists with running lists of `kp` entries
/// and tiles of `tile` (running list, tile and hit buffer per list; `r2_stream_bytes`).
pub fn stream_bytes(nq: u32, kp: u32, tile: u32) -> u64 {
    nq as u64 * (2 * kp as u64 + tile as u64) * PAIR
}

/// Largest tile of the one-block-per-row top-k kernels.
pub const MAX_TILE: u32 = 1024;
/// Largest k of the one-block-per-row top-k kernels (the running list, tile and hit buffer of
/// kp = 1024 entries fill most of the 48 KiB shared-memory budget).
pub const KMAX: usize = 1024;

/// Plan of one launch of a one-block-per-row top-k kernel (`dissonance_topk`, `topk_rows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopkPlan {
    /// The launch (grid.x = B).
    pub launch: LaunchPlan,
    /// Running-list length: next power of two >= k, at least 2.
    pub kp: u32,
    /// Tile length: a power of two >= kp, min(next_pow2(L), [`MAX_TILE`]) otherwise.
    pub tile: u32,
}

/// Plans B rows of L entries, top-k, for op `op` whose shared memory holds `extra_words`
/// 4-byte words before the hit counters and the streaming list.
pub fn row_topk_plan(
    op: &str,
    b: usize,
    l: usize,
    k: usize,
    extra_words: usize,
) -> Result<TopkPlan> {
    if b == 0 || l == 0 || k == 0 || k > l {
        bail!("{op} kernel: empty or invalid shape B = {b}, L = {l}, k = {k}");
    }
    if k > KMAX {
        bail!("{op} kernel: k = {k} exceeds the kernel's largest k = {KMAX}");
    }
    let kp = (k.next_power_of_two() as u32).max(2);
    let tile = (l.next_power_of_two() as u32).clamp(2, MAX_TILE).max(kp);
    let smem = (extra_words as u64 + 3 * TOPK_MAXQ as u64) * 4 + stream_bytes(1, kp, tile);
    if smem > MAX_DYN_SMEM_BYTES as u64 {
        bail!(
            "{op} kernel: {smem} bytes of shared memory needed (k = {k}, {extra_words} words of \
             anchor), the limit is {MAX_DYN_SMEM_BYTES}"
        );
    }
    Ok(TopkPlan {
        launch: LaunchPlan {
            grid: (to_u32(b, "B", op)?, 1, 1),
            block: (CAP_TOPK_THREADS, 1, 1),
            smem_bytes: smem as u32,
        },
        kp,
        tile,
    })
}

/// Whether rows of `l` entries, top-`k`, take the one-warp top-k of `kernels/topk.cuh`
/// (`r2_warp_topk`: registers and shuffles, no block barrier): `l <=`
/// [`TOPK_WARP_MAX_L`] and `k <=` [`TOPK_WARP_MAX_K`].
pub fn warp_rows(l: usize, k: usize) -> bool {
    l <= TOPK_WARP_MAX_L as usize && k <= TOPK_WARP_MAX_K as usize
}
