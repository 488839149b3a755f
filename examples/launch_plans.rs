//! The launch plans of `cosine_topk` for the cells of the H200 baseline
//! (`../shared/gpu/H200-baseline-2026-11-29.md`, n = 8) and for the cells behind the default
//! rule's crossovers (docs/DESIGN.md, "Dispatch by measurement"), on an A100 (sm_80) and an
//! H100/H200 (sm_90), as the plans count resident blocks without a driver (the launch bounds'
//! registers, a static shared-memory allowance): what `scripts/sass-report` checks against
//! ptxas's figures and predicts times from (`--predict`; the GEMM + select path's times through
//! `scripts/cosine_topk_predict.py`). One line per (architecture, cell, launch), fields
//! `key=value`: every kernel of the three device paths (bandwidth: partial + merge; tensor
//! core: pass; GEMM + select: select; and the exact stage both approximate paths share: prep,
//! rescore, fallback, finish). `resident` is the count a plan sized its grid from (absent
//! where the grid follows the data alone).
//!
//! `cargo run --example launch_plans`

use candle_core::{DType, Result};
use r2scp::kernel::abi::{
    CosineTopkFallbackArgs, CosineTopkFinishArgs, CosineTopkGemmSelectArgs, CosineTopkMergeArgs,
    CosineTopkPrepArgs, CosineTopkRescoreArgs, CT_MIN_BLOCKS, GS_MIN_BLOCKS, RS_MIN_BLOCKS,
    RS_THREADS, TC_MIN_BLOCKS,
};
use r2scp::kernel::{entry, planned_resident_blocks, KernelArgs, LaunchPlan, SmResources};
use r2scp::retrieve::cosine_topk::gemm_select::{self, GemmGpu, GemmOverrides};
use r2scp::retrieve::cosine_topk::kernel::{self, choose, partial_entry, Gpu, Problem};
use r2scp::retrieve::cosine_topk::tensor_core;

/// (M, D, B, key dtype) of the baseline's cells.
const BASELINE: [(usize, usize, usize, DType); 14] = [
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

/// The cells around the default rule's thresholds (B = 16 at D = 256, D = 32 at B = 1024).
const CROSSOVER: [(usize, usize, usize, DType); 9] = [
    (1_000_000, 256, 4, DType::BF16),
    (1_000_000, 256, 8, DType::BF16),
    (1_000_000, 256, 16, DType::BF16),
    (1_000_000, 256, 32, DType::BF16),
    (1_000_000, 256, 64, DType::BF16),
    (1_000_000, 8, 1024, DType::BF16),
    (1_000_000, 16, 1024, DType::BF16),
    (1_000_000, 32, 1024, DType::BF16),
    (1_000_000, 64, 1024, DType::BF16),
];

fn dt(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

/// `threads=.. min_blocks=.. dyn_smem=.. grid=XxY` of one launch.
fn launch(p: &LaunchPlan, min_blocks: u32) -> String {
    format!(
        "threads={} min_blocks={min_blocks} dyn_smem={} grid={}x{}",
        p.threads_per_block(),
        p.smem_bytes,
        p.grid.0,
        p.grid.1
    )
}

fn main() -> Result<()> {
    let n = 8;
    for (arch, sm, sm_count, l2_bytes) in [
        (80, SmResources::SM_80, 108u32, 40u64 << 20),
        (90, SmResources::SM_90, 132, 50 << 20),
    ] {
        let max_dyn_smem = sm.smem - 2048;
        let resident = move |min_blocks: u32| {
            move |p: &LaunchPlan| -> Result<u32> {
                Ok(planned_resident_blocks(
                    &sm,
                    p.threads_per_block(),
                    min_blocks,
                    p.smem_bytes,
                ))
            }
        };
        let cells = BASELINE
            .iter()
            .map(|c| ("baseline", c))
            .chain(CROSSOVER.iter().map(|c| ("crossover", c)));
        for (set, &(m, d, b, dtype)) in cells {
            let cell = format!(
                "sm={arch} set={set} m={m} d={d} b={b} dtype={} n={n}",
                dt(dtype)
            );
            let chosen = choose(b, d, dtype).name();

            // The bandwidth kernel: partial (one wave) and merge.
            let partial_resident = resident(CT_MIN_BLOCKS);
            let bw = kernel::plan(
                &Problem { b, m, d, n, dtype },
                &Gpu {
                    sm_count,
                    max_dyn_smem,
                    resident: &|_: &str, p: &LaunchPlan| partial_resident(p),
                },
            )?;
            println!(
                "plan {cell} path=bandwidth chosen={} role=partial entry={} {} resident={} kb={} chunk_rows={}",
                chosen == "bandwidth",
                partial_entry(&bw.config, dtype)?,
                launch(&bw.partial, CT_MIN_BLOCKS),
                bw.resident,
                bw.kb,
                bw.chunk_rows,
            );
            println!(
                "plan {cell} path=bandwidth chosen={} role=merge entry={} {} candidates={}",
                chosen == "bandwidth",
                CosineTopkMergeArgs::ENTRY,
                launch(&bw.merge, 1),
                bw.partial.grid.1 * bw.kp,
            );

            // The tensor-core pass (opt-in: never `chosen` by the default rule).
            let tc_resident = resident(TC_MIN_BLOCKS);
            match tensor_core::plan(b, m, d, n, dtype, sm_count, max_dyn_smem, &tc_resident) {
                Ok(t) => println!(
                    "plan {cell} path=tensor-core chosen={} role=pass entry=cosine_topk_tc_{} {} resident={} d_pad={} chunk_rows={} capq={}",
                    chosen == "tensor-core",
                    dt(dtype),
                    launch(&t.pass, TC_MIN_BLOCKS),
                    tc_resident(&t.pass)?,
                    t.d_pad,
                    t.chunk_rows,
                    t.capq,
                ),
                Err(e) => println!("plan {cell} path=tensor-core none=\"{e}\""),
            }

            // GEMM + select: the select launch per chunk.
            let select_resident = resident(GS_MIN_BLOCKS);
            let fallback_resident = resident(RS_MIN_BLOCKS);
            let gpu = GemmGpu {
                sm_count,
                l2_bytes,
                select_resident: &select_resident,
                fallback_resident: &fallback_resident,
            };
            let g = gemm_select::plan(b, m, d, n, dtype, &gpu, &GemmOverrides::default())?;
            println!(
                "plan {cell} path=gemm chosen={} role=select entry={} {} resident={} chunk_rows={} chunks={} splits={} span={} capq={} math={:?}",
                chosen == "gemm",
                CosineTopkGemmSelectArgs::ENTRY,
                launch(&g.select, GS_MIN_BLOCKS),
                g.select_per_sm,
                g.chunk_rows,
                g.chunks,
                g.splits,
                g.span,
                g.capq,
                g.math,
            );

            // The exact stage of both approximate paths (the same plan for either).
            let x = g.exact;
            let prep_rows = b as u32; // the GEMM path's; the pass's are whole query tiles
            let prep = LaunchPlan {
                grid: (prep_rows.div_ceil(RS_THREADS / 32), 1, 1),
                block: (RS_THREADS, 1, 1),
                smem_bytes: 0,
            };
            println!(
                "plan {cell} path=exact chosen={} role=prep entry={} {}",
                chosen != "bandwidth",
                entry::<CosineTopkPrepArgs>(dtype)?,
                launch(&prep, 1),
            );
            println!(
                "plan {cell} path=exact chosen={} role=rescore entry={} {} kp={} cap={}",
                chosen != "bandwidth",
                entry::<CosineTopkRescoreArgs>(dtype)?,
                launch(&x.rescore, RS_MIN_BLOCKS),
                x.kp,
                x.cap,
            );
            println!(
                "plan {cell} path=exact chosen={} role=fallback entry={} {} resident={} chunk_rows={}",
                chosen != "bandwidth",
                entry::<CosineTopkFallbackArgs>(dtype)?,
                launch(&x.fallback, RS_MIN_BLOCKS),
                fallback_resident(&x.fallback)?,
                x.chunk_rows,
            );
            println!(
                "plan {cell} path=exact chosen={} role=finish entry={} {}",
                chosen != "bandwidth",
                CosineTopkFinishArgs::ENTRY,
                launch(&x.finish, RS_MIN_BLOCKS),
            );
        }
    }
    Ok(())
}
