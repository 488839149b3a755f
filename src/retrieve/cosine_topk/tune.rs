//! `r2scp tune --device cuda` (feature `cuda`): times every device path of `cosine_topk` that
//! can take each cell of a grid of key dtype x D x B on this GPU, with CUDA events, and builds
//! the GPU's dispatch table ([`super::dispatch`]).
//!
//! Per (dtype, D) one random bank of about [`TuneOptions::bank_bytes`] (at least four times the
//! L2, so the timed paths read HBM, not L2), then per B random queries; per path a checked
//! warm-up call, then `reps` timed calls (median device time). A path that cannot take a cell
//! (n, alignment, memory) is left out of it; a path whose warm-up takes more than
//! [`PRUNE_FACTOR`] times the cell's best so far (and over [`PRUNE_MIN_MS`]) is cut, so the
//! bandwidth kernel at B = 1024 does not spend the budget. Cells run in order until the time
//! budget is spent; the rest keep the default rule.
//!
//! The bandwidth kernel is also timed at each step size its plan can take ([`STEP_BYTES`],
//! `kernel::plan_with`), as `bandwidth kb=<bytes>` entries of the cell: the measurement the
//! plan's choice of step (issue 20, item 7: the most key bytes per stage on an SM) is to be
//! checked against. They are recorded, not dispatched: a cell's fastest path is chosen among
//! the paths ([`Kernel::from_name`]), and a bandwidth call runs its plan's step.

use super::dispatch::{dtype_name, Cell, DispatchTable, GpuId, FORMAT};
use super::kernel::{Kernel, Knobs};
use super::{cosine_topk_on_path_with, key_norms};
use crate::bench::cuda_events::time_events;
use candle_core::{bail, DType, Device, Result, Tensor};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A path whose warm-up is this many times slower than the cell's best so far is not timed.
pub const PRUNE_FACTOR: f64 = 4.0;
/// ... unless its warm-up is under this many milliseconds.
pub const PRUNE_MIN_MS: f64 = 2.0;
/// The bandwidth kernel's step sizes (key bytes per row and step) `tune` times.
pub const STEP_BYTES: [u32; 6] = [16, 32, 64, 128, 256, 512];

/// What `tune` measures.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneOptions {
    /// Key dtypes, in order.
    pub dtypes: Vec<DType>,
    /// Dimensions.
    pub ds: Vec<usize>,
    /// Batch sizes.
    pub bs: Vec<usize>,
    /// Results per query.
    pub n: usize,
    /// Bytes of keys per bank (the rows follow from D and the dtype; at least 4 x L2).
    pub bank_bytes: u64,
    /// Timed calls per path and cell (after one warm-up).
    pub reps: usize,
    /// Wall-time budget; cells left when it is spent are not measured.
    pub budget: Duration,
}

impl TuneOptions {
    /// The full grid: f32, bf16, f16 x D 64, 256, 1024 x B 1, 4, 8, 16, 32, 64, 256, 1024, n = 8,
    /// banks of 512 MiB, 5 timed calls, 3 minutes.
    pub fn full() -> Self {
        TuneOptions {
            dtypes: vec![DType::BF16, DType::F32, DType::F16],
            ds: vec![256, 1024, 64],
            bs: vec![1, 4, 8, 16, 32, 64, 256, 1024],
            n: 8,
            bank_bytes: 512 << 20,
            reps: 5,
            budget: Duration::from_secs(180),
        }
    }

    /// The GPU lane's grid: bf16 and f32 x D 256, 1024 x B 1, 8, 16, 64, 1024, 3 timed calls.
    pub fn quick() -> Self {
        TuneOptions {
            dtypes: vec![DType::BF16, DType::F32],
            ds: vec![256, 1024],
            bs: vec![1, 8, 16, 64, 1024],
            reps: 3,
            ..TuneOptions::full()
        }
    }

    /// Cells in the grid.
    pub fn cells(&self) -> usize {
        self.dtypes.len() * self.ds.len() * self.bs.len()
    }
}

/// Bank rows for dimension `d` and keys of `dtype`: `bank_bytes` of keys, at least four times
/// `l2_bytes` and 2^16 rows.
pub fn bank_rows(d: usize, dtype: DType, bank_bytes: u64, l2_bytes: u64) -> usize {
    let row = (d * dtype.size_in_bytes()).max(1) as u64;
    let rows = bank_bytes.max(4 * l2_bytes) / row;
    rows.max(1 << 16) as usize
}

/// The paths tried for keys of `dtype` (the plain-f32 GEMM only for f32 keys), fastest-expected
/// first so that the pruning sees a good time early.
pub fn paths_for(dtype: DType) -> Vec<Kernel> {
    Kernel::ALL
        .into_iter()
        .filter(|k| *k != Kernel::GemmFp32 || dtype == DType::F32)
        .collect()
}

/// The table entry of the bandwidth kernel run with `kb` key bytes per step.
pub fn step_name(kb: u32) -> String {
    format!("{} kb={kb}", Kernel::Bandwidth.name())
}

/// Measures the grid on `dev` (a CUDA device) and returns the GPU's table; `progress(done,
/// total, line)` reports each cell.
pub fn tune(
    dev: &Device,
    opts: &TuneOptions,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<DispatchTable> {
    let Device::Cuda(cuda) = dev else {
        bail!(
            "tune: measures the device paths of a CUDA device, got {:?}",
            dev.location()
        );
    };
    let gpu: GpuId = super::dispatch::gpu_of(cuda)?;
    let l2 = {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        cuda.cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| candle_core::Error::Msg(format!("tune: L2 size: {e:?}")))?
            .max(0) as u64
    };
    let t0 = Instant::now();
    let total = opts.cells();
    let mut done = 0;
    let mut cells = Vec::new();
    'grid: for &dt in &opts.dtypes {
        for &d in &opts.ds {
            if t0.elapsed() >= opts.budget {
                break 'grid;
            }
            let m = bank_rows(d, dt, opts.bank_bytes, l2);
            let keys = Tensor::rand(-1f32, 1f32, (m, d), dev)?.to_dtype(dt)?;
            let norms = key_norms(&keys)?;
            for &b in &opts.bs {
                if t0.elapsed() >= opts.budget {
                    progress(
                        done,
                        total,
                        "time budget spent: the remaining cells keep the default rule",
                    );
                    break 'grid;
                }
                let q = Tensor::randn(0f32, 1f32, (b, d), dev)?;
                let n = opts.n.min(m);
                let mut ms = BTreeMap::new();
                let mut best = f64::INFINITY;
                // Each path with its plan's knobs, then the bandwidth kernel's step sizes.
                let runs = paths_for(dt)
                    .into_iter()
                    .map(|k| (k, None))
                    .chain(STEP_BYTES.map(|kb| (Kernel::Bandwidth, Some(kb))));
                for (path, kb) in runs {
                    if kb.is_some() && !ms.contains_key(Kernel::Bandwidth.name()) {
                        continue; // the kernel's own plan was cut or could not take the cell
                    }
                    let knobs = Knobs {
                        kb,
                        ..Knobs::default()
                    };
                    let call =
                        || cosine_topk_on_path_with(&q, &keys, Some(&norms), n, None, path, knobs);
                    let w = Instant::now();
                    if call().and_then(|p| p.check()).is_err() {
                        continue; // the path (or step size) cannot take this cell
                    }
                    let warm = w.elapsed().as_secs_f64() * 1e3;
                    if warm > PRUNE_FACTOR * best && warm > PRUNE_MIN_MS {
                        continue;
                    }
                    let Some((t, last)) = time_events(dev, opts.reps, call)? else {
                        bail!("tune: no CUDA events on {:?}", dev.location());
                    };
                    last.check()?;
                    let med = t.device_median();
                    best = best.min(med);
                    let name = match kb {
                        Some(kb) => step_name(kb),
                        None => path.name().to_string(),
                    };
                    ms.insert(name, med);
                }
                let fastest = ms
                    .iter()
                    .filter(|(k, _)| Kernel::from_name(k).is_some())
                    .min_by(|a, b| a.1.total_cmp(b.1));
                let Some((fastest, _)) = fastest else {
                    bail!("tune: no path took B = {b}, D = {d}, {dt:?} keys");
                };
                let cell = Cell {
                    dtype: dtype_name(dt).to_string(),
                    d,
                    b,
                    m,
                    best: fastest.clone(),
                    ms: ms.clone(),
                };
                done += 1;
                progress(
                    done,
                    total,
                    &format!(
                        "{} D={d} B={b} M={m}: {} ({})",
                        cell.dtype,
                        cell.best,
                        ms.iter()
                            .map(|(k, v)| format!("{k} {v:.3} ms"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                cells.push(cell);
            }
        }
    }
    Ok(DispatchTable {
        format: FORMAT,
        gpu: gpu.name.clone(),
        cc: gpu.cc_string(),
        r2scp: env!("CARGO_PKG_VERSION").to_string(),
        n: opts.n,
        cells,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_and_banks() {
        assert_eq!(TuneOptions::full().cells(), 72);
        assert_eq!(TuneOptions::quick().cells(), 20);
        // 512 MiB of bf16 rows at D = 256, or 4 x a 50 MB L2, whichever is more.
        assert_eq!(bank_rows(256, DType::BF16, 512 << 20, 50 << 20), 1 << 20);
        assert_eq!(
            bank_rows(1024, DType::F32, 64 << 20, 50 << 20),
            200 * (1 << 20) / 4096
        );
        assert_eq!(bank_rows(8, DType::F32, 1 << 10, 0), 1 << 16);
        assert!(!paths_for(DType::BF16).contains(&Kernel::GemmFp32));
        assert_eq!(paths_for(DType::F32)[0], Kernel::Gemm);
        // Step-size entries are not paths: a table never dispatches to them.
        assert_eq!(step_name(64), "bandwidth kb=64");
        assert!(Kernel::from_name(&step_name(64)).is_none());
        assert!(STEP_BYTES.iter().all(|kb| kb.is_power_of_two()));
        assert_eq!(*STEP_BYTES.last().unwrap(), crate::kernel::abi::CT_KB_MAX);
    }
}
