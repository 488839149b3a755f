//! The launch plans of `cosine_topk` for the cells of the H200 baseline
//! (`../shared/gpu/H200-baseline-2026-11-29.md`, n = 8) on an A100 (sm_80) and an H100/H200
//! (sm_90), as the plans count resident blocks without a driver (the launch bounds'
//! registers, a static shared-memory allowance): what `scripts/sass-report` checks against
//! ptxas's figures and predicts times from. One line per (architecture, cell, path), fields
//! `key=value`.
//!
//! `cargo run --example launch_plans`

use candle_core::{DType, Result};
use r2scp::kernel::abi::{CT_MIN_BLOCKS, TC_MIN_BLOCKS};
use r2scp::kernel::{planned_resident_blocks, LaunchPlan, SmResources};
use r2scp::retrieve::cosine_topk::kernel::{self, choose, partial_entry, Gpu, Kernel, Problem};
use r2scp::retrieve::cosine_topk::tensor_core;

/// (M, D, B, key dtype) of the baseline's cells.
const CELLS: [(usize, usize, usize, DType); 14] = [
    (1_000_000, 256, 1, DType::F32),
    (1_000_000, 256, 1, DType::BF16),
    (1_000_000, 256, 64, DType::F32),
    (1_000_000, 256, 1024, DType::F32),
    (1_000_000, 256, 1024, DType::BF16),
    (1_000_000, 1024, 1, DType::F32),
    (1_000_000, 1024, 64, DType::BF16),
    (1_000_000, 1024, 1024, DType::F32),
    (1_000_000, 1024, 1024, DType::BF16),
    (10_000_000, 256, 1, DType::F32),
    (10_000_000, 256, 1, DType::BF16),
    (10_000_000, 256, 16, DType::F32),
    (10_000_000, 256, 64, DType::F16),
    (10_000_000, 256, 256, DType::BF16),
];

fn dt(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

fn main() -> Result<()> {
    let n = 8;
    for (arch, sm, sm_count) in [
        (80, SmResources::SM_80, 108u32),
        (90, SmResources::SM_90, 132),
    ] {
        let max_dyn_smem = sm.smem - 2048;
        for (m, d, b, dtype) in CELLS {
            let cell = format!("m={m} d={d} b={b} dtype={}", dt(dtype));
            let chosen = match choose(b, d, dtype) {
                Kernel::Bandwidth => "bandwidth",
                Kernel::TensorCore => "tensor_core",
            };
            let resident = |_: &str, p: &LaunchPlan| {
                Ok(planned_resident_blocks(
                    &sm,
                    p.threads_per_block(),
                    CT_MIN_BLOCKS,
                    p.smem_bytes,
                ))
            };
            let gpu = Gpu {
                sm_count,
                max_dyn_smem,
                resident: &resident,
            };
            let p = kernel::plan(&Problem { b, m, d, n, dtype }, &gpu)?;
            println!(
                "plan sm={arch} {cell} n={n} path=bandwidth chosen={} entry={} threads={} min_blocks={CT_MIN_BLOCKS} dyn_smem={} grid={}x{} resident={} kb={} chunk_rows={}",
                chosen == "bandwidth",
                partial_entry(&p.config, dtype)?,
                p.partial.threads_per_block(),
                p.partial.smem_bytes,
                p.partial.grid.0,
                p.partial.grid.1,
                p.resident,
                p.kb,
                p.chunk_rows,
            );
            let tc_resident = |p: &LaunchPlan| {
                Ok(planned_resident_blocks(
                    &sm,
                    p.threads_per_block(),
                    TC_MIN_BLOCKS,
                    p.smem_bytes,
                ))
            };
            match tensor_core::plan(b, m, d, n, dtype, sm_count, max_dyn_smem, &tc_resident) {
                Ok(t) => println!(
                    "plan sm={arch} {cell} n={n} path=tensor_core chosen={} entry=cosine_topk_tc_{} threads={} min_blocks={TC_MIN_BLOCKS} dyn_smem={} grid={}x{} resident={} d_pad={} chunk_rows={} capq={}",
                    chosen == "tensor_core",
                    dt(dtype),
                    t.pass.threads_per_block(),
                    t.pass.smem_bytes,
                    t.pass.grid.0,
                    t.pass.grid.1,
                    tc_resident(&t.pass)?,
                    t.d_pad,
                    t.chunk_rows,
                    t.capq,
                ),
                Err(e) => println!("plan sm={arch} {cell} n={n} path=tensor_core none=\"{e}\""),
            }
        }
    }
    Ok(())
}
