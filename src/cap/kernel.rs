//! Launch plans of `kernels/dissonance_topk.cu` and `kernels/gather_inject.cu`, used by the
//! CUDA path and by the emulator (so the tested configuration is the shipped one).
//!
//! - `dissonance_topk_<dt>` and `topk_rows_f32`: one block of [`THREADS`] threads per batch
//!   row; the row's entries stream through a shared tile of `tile` entries into a running
//!   top-`kp` list (kernels/topk.cuh).
//! - `gather_inject_{fwd,zero,scatter}_<dt>`: one warp per output row,
//!   [`ROWS_PER_BLOCK`] rows per block.

use crate::launch::{LaunchPlan, MAX_DYN_SMEM_BYTES};
use candle_core::{bail, Result};

/// Threads per block of the top-k kernels (2 warps: the rows are short, and the emulator
/// runs one OS thread per CUDA thread).
pub const THREADS: u32 = 64;
/// Largest streaming tile of the top-k kernels.
pub const MAX_TILE: u32 = 1024;
/// Largest k of the top-k kernels (the running list, tile and hit buffer of kp = 1024
/// entries fill most of the 48 KiB shared-memory budget).
pub const KMAX: usize = 1024;
/// Output rows per block of the injection kernels (one warp each).
pub const ROWS_PER_BLOCK: u32 = 2;

/// Plan of one top-k launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopkPlan {
    /// The launch (grid.x = B).
    pub launch: LaunchPlan,
    /// Running-list length: next power of two >= k, at least 2.
    pub kp: u32,
    /// Tile length: a power of two >= kp, min(next_pow2(L), [`MAX_TILE`]) otherwise.
    pub tile: u32,
}

fn to_u32(v: usize, what: &str, op: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("{op} kernel: {what} = {v} exceeds u32")))
}

fn topk_plan(op: &str, b: usize, l: usize, k: usize, extra_words: usize) -> Result<TopkPlan> {
    if b == 0 || l == 0 || k == 0 || k > l {
        bail!("{op} kernel: empty or invalid shape B = {b}, L = {l}, k = {k}");
    }
    if k > KMAX {
        bail!("{op} kernel: k = {k} exceeds the kernel's largest k = {KMAX}");
    }
    let kp = (k.next_power_of_two() as u32).max(2);
    let tile = (l.next_power_of_two() as u32).clamp(2, MAX_TILE).max(kp);
    // + hit counters (3 * R2_TOPK_MAXQ) + r2_stream_bytes(1, kp, tile) / 4
    let words = extra_words as u64 + 24 + 2 * (2 * kp as u64 + tile as u64);
    let smem = words * 4;
    if smem > MAX_DYN_SMEM_BYTES as u64 {
        bail!(
            "{op} kernel: {smem} bytes of shared memory needed (k = {k}, {extra_words} words of \
             anchor), the limit is {MAX_DYN_SMEM_BYTES}"
        );
    }
    Ok(TopkPlan {
        launch: LaunchPlan {
            grid: (to_u32(b, "B", op)?, 1, 1),
            block: (THREADS, 1, 1),
            smem_bytes: smem as u32,
        },
        kp,
        tile,
    })
}

/// Plan of `dissonance_topk_<dt>` for B rows, L tokens, dimension D, top-k. Shared memory
/// holds the anchor (D floats), a 32-float reduction buffer, the hit counters and the
/// streaming lists of kernels/topk.cuh (running list, tile, hit buffer).
pub fn dissonance_plan(b: usize, l: usize, d: usize, k: usize) -> Result<TopkPlan> {
    topk_plan("dissonance_topk", b, l, k, d + 32)
}

/// Plan of `topk_rows_f32` for B rows of L scores, top-k.
pub fn topk_rows_plan(b: usize, l: usize, k: usize) -> Result<TopkPlan> {
    topk_plan("topk_rows", b, l, k, 0)
}

/// Plan of the injection kernels over `rows` output rows (B*L forward / zero, B*Ls scatter).
pub fn inject_plan(rows: usize) -> Result<LaunchPlan> {
    if rows == 0 {
        bail!("gather_inject kernel: no rows to write");
    }
    let blocks = rows.div_ceil(ROWS_PER_BLOCK as usize);
    Ok(LaunchPlan {
        grid: (to_u32(blocks, "blocks", "gather_inject")?, 1, 1),
        block: (32 * ROWS_PER_BLOCK, 1, 1),
        smem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_rows_and_fit_smem() {
        let p = dissonance_plan(64, 60, 512, 5).expect("plan");
        assert_eq!(p.launch.grid, (64, 1, 1));
        assert_eq!((p.kp, p.tile), (8, 64));
        assert_eq!(p.launch.smem_bytes, (512 + 32 + 24 + 2 * (16 + 64)) * 4);
        let p = dissonance_plan(1, 3000, 64, 1000).expect("plan");
        assert_eq!((p.kp, p.tile), (1024, 1024));
        assert!(dissonance_plan(1, 3000, 64, 1025).is_err());
        assert!(dissonance_plan(1, 10, 20_000, 5).is_err());
        let p = topk_rows_plan(3, 1, 1).expect("plan");
        assert_eq!((p.kp, p.tile), (2, 2));
        assert_eq!(inject_plan(9).expect("plan").grid, (5, 1, 1));
        assert!(inject_plan(0).is_err());
    }
}
