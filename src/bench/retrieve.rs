//! `r2scp bench retrieve`: fused `cosine_topk` vs the candle reference (and, optionally,
//! FAISS `IndexFlatIP` through `scripts/faiss_peer.py` on the CPU, PyTorch through
//! `scripts/torch_peer.py` on either device) in ONE side-by-side table, with the device's
//! memory bandwidth measured in the same run.
//!
//! Columns: time (best of `--reps`), queries/s, effective GB/s (bank bytes read / time),
//! ratio to the reference (reference time / this time; > 1 is faster), and "of stream
//! read": the time of a plain parallel streaming read of the same bank bytes over this
//! time (meaningful at B = 1, where the op is bound by reading the bank once). On the CPU
//! that read runs alternately with the fused op, rep by rep, over the bank's own memory,
//! so both see the same pages and the same moment of a shared machine; a single probe
//! of a separate buffer at the start drifted by +-30% against the op on this VM.
//!
//! On CUDA that column is "of HBM bandwidth": the effective GB/s over the bandwidth of a
//! 1 GiB device-to-device copy (bytes read + written) probed at the start of the run
//! ([`device_copy_gbps`]); a kernel that reads the bank once at that rate shows 100%.
//! Per-cell errors (a peer that fails, a reference that cannot run) print one line and the
//! run goes on.
//!
//! On CUDA every r2scp row also has "device ms": the best CUDA-event time of the queued call
//! (events on candle's stream around `cosine_topk_deferred`, as the PyTorch peer times with
//! `torch.cuda.Event`), beside "ms", the best host wall time of the call and its wait; GB/s,
//! queries/s and the ratios then use the device time. The fused row names the path the
//! dispatcher chose (`fused (gemm)`), and one row per device path (`path bandwidth`,
//! `path tensor-core`, `path gemm`, `path gemm-fp32`; `--paths` picks them) shows which path
//! wins the cell; a path that cannot take a cell prints one line instead.

use super::{
    device_copy_gbps, fmt_ms, stream_read, stream_read_gbps, time_best, time_best_pair, Table,
};
use crate::retrieve::cosine_topk::cosine_topk_on_path;
use crate::retrieve::cosine_topk::kernel::Kernel;
use crate::retrieve::{
    cosine_topk, cosine_topk_deferred, cosine_topk_reference, key_norms, PendingTopN,
};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Storage, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of `r2scp bench retrieve`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Small sizes (M in {20k, 100k}, D in {64, 256}) for a quick look.
    #[arg(long)]
    pub quick: bool,
    /// Bank sizes M (comma list). Default 100000,1000000 (quick: 20000,100000).
    #[arg(long, value_delimiter = ',')]
    pub m: Option<Vec<usize>>,
    /// Dimensions D (comma list). Default 256,1024 (quick: 64,256).
    #[arg(long, value_delimiter = ',')]
    pub d: Option<Vec<usize>>,
    /// Query batch sizes B (comma list).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub b: Vec<usize>,
    /// Results per query.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Key dtypes (comma list of f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
    pub dtypes: Vec<String>,
    /// Timed repetitions per cell (best is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Skip the candle reference (it materialises and sorts the B x M matrix).
    #[arg(long)]
    pub skip_reference: bool,
    /// Python with faiss-cpu and numpy (e.g. `.venv-faiss/bin/python`): adds FAISS
    /// IndexFlatIP rows for f32 keys, run by `scripts/faiss_peer.py` on the same data.
    #[arg(long)]
    pub faiss_python: Option<PathBuf>,
    /// Python with PyTorch and numpy (the GPU machine's `python3`, or a venv with the CPU
    /// wheel): adds a PyTorch row per cell (`q @ keys.T` then `topk(n)` on the normalised
    /// bank, same data and dtype, same device), run by `scripts/torch_peer.py`.
    #[arg(long)]
    pub torch_python: Option<PathBuf>,
    /// Device: `cpu` or `cuda` (needs the `cuda` feature and a GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of the random bank and queries.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Device paths timed one row each on CUDA (comma list of bandwidth, tensor-core, gemm,
    /// gemm-fp32; `all`; `none`). Ignored on the CPU.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub paths: Vec<String>,
}

/// The device paths `--paths` names.
fn paths_of(names: &[String]) -> anyhow::Result<Vec<Kernel>> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "all" => out.extend(Kernel::ALL),
            "none" => {}
            other => out.push(Kernel::from_name(other).with_context(|| {
                format!(
                    "bench retrieve: --paths `{other}` is not one of all, none, {}",
                    Kernel::ALL.map(|k| k.name()).join(", ")
                )
            })?),
        }
    }
    out.dedup();
    Ok(out)
}

/// Best device time (CUDA events) and best host time of `reps` runs of the queued call `f`
/// after a warm-up, its last result checked; `None` on the CPU.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn device_best(
    dev: &Device,
    reps: usize,
    f: impl FnMut() -> crate::Result<PendingTopN>,
) -> candle_core::Result<Option<(Duration, Duration)>> {
    #[cfg(feature = "cuda")]
    {
        let Some((t, last)) = crate::bench::cuda_events::time_events(dev, reps, f)? else {
            return Ok(None);
        };
        last.check()?;
        let best = |v: &[f64]| {
            Duration::from_secs_f64(v.iter().copied().fold(f64::INFINITY, f64::min) / 1e3)
        };
        Ok(Some((best(&t.device_ms), best(&t.host_ms))))
    }
    #[cfg(not(feature = "cuda"))]
    Ok(None)
}

/// The path the dispatcher picks for a call on `dev` (CUDA only).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn auto_path(dev: &Device, b: usize, d: usize, dt: DType) -> Option<&'static str> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        let gpu = crate::retrieve::cosine_topk::dispatch::gpu_of(c).ok()?;
        return Some(crate::retrieve::cosine_topk::dispatch::pick(&gpu, b, d, dt).name());
    }
    None
}

impl Args {
    /// The sizes of every cell (defaults applied): M, D.
    fn sizes(&self) -> (Vec<usize>, Vec<usize>) {
        let ms = self.m.clone().unwrap_or(if self.quick {
            vec![20_000, 100_000]
        } else {
            vec![100_000, 1_000_000]
        });
        let ds = self.d.clone().unwrap_or(if self.quick {
            vec![64, 256]
        } else {
            vec![256, 1024]
        });
        (ms, ds)
    }

    /// Every size at least 1, `--n` at most every `--m`, and the largest cell's bank (and
    /// the reference's B x M scores) within the memory limit ([`crate::memory`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        let (ms, ds) = self.sizes();
        for (flag, list) in [("--m", &ms), ("--d", &ds), ("--b", &self.b)] {
            if list.is_empty() {
                bail!("bench retrieve {flag}: expected at least one size");
            }
            if list.contains(&0) {
                bail!("bench retrieve {flag} 0: expected sizes of at least 1");
            }
        }
        for (flag, v) in [("--n", self.n), ("--reps", self.reps)] {
            if v == 0 {
                bail!("bench retrieve {flag} 0: expected at least 1");
            }
        }
        if let Some(&m) = ms.iter().find(|&&m| m < self.n) {
            bail!(
                "bench retrieve --n {} exceeds --m {m}: a search returns at most M results",
                self.n
            );
        }
        let (m, d, b) = (
            *ms.iter().max().expect("checked") as u128,
            *ds.iter().max().expect("checked") as u128,
            *self.b.iter().max().expect("checked") as u128,
        );
        // f32 keys on the host and as a tensor, one converted copy, and the reference's
        // B x M scores and their sort.
        let reference = if self.skip_reference {
            0
        } else {
            2 * b * m * 4
        };
        crate::memory::check(
            3 * m * d * 4 + reference,
            || {
                format!(
                    "bench retrieve --m {m} --d {d} --b {b}: the bank (M x D f32 keys, their copies{})",
                    if self.skip_reference {
                        ""
                    } else {
                        " and the reference's B x M scores"
                    }
                )
            },
            "; lower --m or --d",
        )
    }
}

fn dtype_of(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("bench retrieve: dtype `{other}` is not one of f32, f16, bf16"),
    })
}

fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// Runs `f` with the raw bytes of a contiguous CPU tensor (f32, f16 or bf16), or `None`
/// for any other tensor (CUDA, or another dtype).
fn with_cpu_bytes<R>(t: &Tensor, f: impl FnOnce(Option<&[u8]>) -> R) -> anyhow::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(c), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(f(None));
    };
    let bytes: &[u8] = match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&c.as_slice::<f32>()?[a..b]),
        DType::F16 => bytemuck::cast_slice(&c.as_slice::<half::f16>()?[a..b]),
        DType::BF16 => bytemuck::cast_slice(&c.as_slice::<half::bf16>()?[a..b]),
        _ => return Ok(f(None)),
    };
    Ok(f(Some(bytes)))
}

fn sync(dev: &Device) -> anyhow::Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Runs FAISS on raw little-endian f32 files; returns its best search time.
#[allow(clippy::too_many_arguments)]
fn faiss_time(
    python: &PathBuf,
    keys: &[f32],
    queries: &[f32],
    m: usize,
    d: usize,
    b: usize,
    n: usize,
    reps: usize,
) -> anyhow::Result<Duration> {
    let dir = tempfile_dir("faiss")?;
    let kp = dir.join("keys.f32");
    let qp = dir.join("queries.f32");
    std::fs::write(&kp, bytemuck::cast_slice::<f32, u8>(keys))?;
    std::fs::write(&qp, bytemuck::cast_slice::<f32, u8>(queries))?;
    let script = peer_script("faiss_peer.py")?;
    let out = Command::new(python)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .env("OMP_NUM_THREADS", rayon::current_num_threads().to_string())
        .arg(&script)
        .args(["--keys", &kp.display().to_string()])
        .args(["--queries", &qp.display().to_string()])
        .args(["--m", &m.to_string(), "--d", &d.to_string()])
        .args(["--b", &b.to_string(), "--n", &n.to_string()])
        .args(["--reps", &reps.to_string()])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "faiss_peer.py failed ({}): {}",
            out.status,
            last_line(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("faiss_peer.py printed `{stdout}`"))?;
    let secs = v["best_seconds"]
        .as_f64()
        .context("faiss_peer.py output lacks best_seconds")?;
    Ok(Duration::from_secs_f64(secs))
}

fn tempfile_dir(peer: &str) -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("r2scp-{peer}-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(base)
}

/// A peer script ([`super::peer_script`]).
fn peer_script(name: &str) -> anyhow::Result<PathBuf> {
    super::peer_script(name)
}

/// The last non-empty line of a peer's stderr (its one-line error), or `(no stderr)`.
fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no stderr)")
        .trim()
        .to_string()
}

/// The PyTorch peer's best times for one (M, D) bank, keyed by (dtype name, B): one
/// `scripts/torch_peer.py` run over every dtype and batch size (the bank is written once).
#[allow(clippy::too_many_arguments)]
fn torch_times(
    python: &Path,
    device: &str,
    keys: &[f32],
    queries: &[(usize, Vec<f32>)],
    m: usize,
    d: usize,
    dtypes: &[String],
    n: usize,
    reps: usize,
) -> anyhow::Result<HashMap<(String, usize), Duration>> {
    let dir = tempfile_dir("torch")?;
    let result = (|| {
        let kp = dir.join("keys.f32");
        std::fs::write(&kp, bytemuck::cast_slice::<f32, u8>(keys))
            .with_context(|| format!("writing {}", kp.display()))?;
        for (b, qv) in queries {
            let qp = dir.join(format!("queries{b}.f32"));
            std::fs::write(&qp, bytemuck::cast_slice::<f32, u8>(qv))
                .with_context(|| format!("writing {}", qp.display()))?;
        }
        let bs: Vec<String> = queries.iter().map(|(b, _)| b.to_string()).collect();
        let script = peer_script("torch_peer.py")?;
        let out = Command::new(python)
            .arg(&script)
            .args(["--keys", &kp.display().to_string()])
            .args([
                "--queries-prefix",
                &dir.join("queries").display().to_string(),
            ])
            .args(["--m", &m.to_string(), "--d", &d.to_string()])
            .args(["--b", &bs.join(","), "--dtypes", &dtypes.join(",")])
            .args(["--n", &n.to_string(), "--reps", &reps.to_string()])
            .args(["--device", device])
            .args(["--threads", &rayon::current_num_threads().to_string()])
            .output()
            .with_context(|| format!("running {} {}", python.display(), script.display()))?;
        if !out.status.success() {
            bail!(
                "torch_peer.py failed ({}): {}",
                out.status,
                last_line(&out.stderr)
            );
        }
        parse_torch_lines(&String::from_utf8_lossy(&out.stdout))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `torch_peer.py`'s JSON lines (`{"dtype": "f32", "B": 64, "best_seconds": ...}`).
fn parse_torch_lines(stdout: &str) -> anyhow::Result<HashMap<(String, usize), Duration>> {
    let mut times = HashMap::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("torch_peer.py printed `{line}`, expected one JSON object"))?;
        let (Some(dt), Some(b), Some(secs)) = (
            v["dtype"].as_str(),
            v["B"].as_u64(),
            v["best_seconds"].as_f64(),
        ) else {
            bail!("torch_peer.py printed `{line}`, expected dtype, B and best_seconds");
        };
        if !(secs.is_finite() && secs > 0.0) {
            bail!("torch_peer.py printed best_seconds = {secs}, expected a positive time");
        }
        times.insert((dt.to_string(), b as usize), Duration::from_secs_f64(secs));
    }
    Ok(times)
}

/// Times the fused `cosine_topk` against its reference (and FAISS when asked) for every
/// size and dtype, with the bank's streaming-read time beside it, and prints one table.
pub fn compare(args: &Args) -> anyhow::Result<()> {
    args.validate()?;
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("bench retrieve --device cuda")?,
        other => bail!("bench retrieve: device `{other}` is not cpu or cuda"),
    };
    let (ms, ds) = args.sizes();
    let dtypes: Vec<DType> = args
        .dtypes
        .iter()
        .map(|s| dtype_of(s))
        .collect::<anyhow::Result<_>>()?;
    let threads = rayon::current_num_threads();
    let hbm = device_copy_gbps(&dev, 1 << 30, 10).context("bench retrieve: bandwidth probe")?;
    match hbm {
        Some(bw) => println!(
            "bench retrieve: device {}, n = {}, best of {} reps; device-to-device copy of 1 GiB {bw:.0} GB/s (read + write; \"of HBM bandwidth\" = GB/s over it)",
            args.device, args.n, args.reps
        ),
        None => println!(
            "bench retrieve: device {}, {threads} threads, n = {}, best of {} reps; streaming read of a 512 MiB buffer {:.1} GB/s (\"of stream read\" uses the bank's own bytes, read alternately with the op)",
            args.device,
            args.n,
            args.reps,
            stream_read_gbps(512 << 20, 5)
        ),
    }
    let paths = paths_of(&args.paths)?;
    let mut headers = vec!["M", "D", "B", "keys", "impl", "ms"];
    if hbm.is_some() {
        headers.push("device ms");
    }
    headers.extend([
        "queries/s",
        "GB/s",
        "vs reference",
        if hbm.is_some() {
            "of HBM bandwidth"
        } else {
            "of stream read"
        },
    ]);
    let mut table = Table::new(&headers);
    for &m in &ms {
        for &d in &ds {
            let kv = random_f32(m * d, args.seed);
            let queries: Vec<(usize, Vec<f32>)> = args
                .b
                .iter()
                .map(|&b| (b, random_f32(b * d, args.seed + 1 + b as u64)))
                .collect();
            let torch = match &args.torch_python {
                None => HashMap::new(),
                Some(py) => {
                    let n = args.n.min(m);
                    match torch_times(
                        py,
                        &args.device,
                        &kv,
                        &queries,
                        m,
                        d,
                        &args.dtypes,
                        n,
                        args.reps,
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            println!("torch failed at M={m} D={d}: {}", crate::io::error_line(&e));
                            HashMap::new()
                        }
                    }
                }
            };
            for (&dt, dt_name) in dtypes.iter().zip(&args.dtypes) {
                let keys = Tensor::from_slice(&kv, (m, d), &dev)?.to_dtype(dt)?;
                let norms = key_norms(&keys)?;
                let bank_bytes = (m * d * dt.size_in_bytes()) as f64;
                for (b, qv) in &queries {
                    let b = *b;
                    let q = Tensor::from_slice(qv, (b, d), &dev)?;
                    let n = args.n.min(m);
                    let fused = || {
                        let r = cosine_topk(&q, &keys, Some(&norms), n, None);
                        let _ = sync(&dev);
                        r
                    };
                    let (t_fused, t_read) = with_cpu_bytes(&keys, |bytes| match bytes {
                        Some(bytes) => {
                            let (t, r, _) = time_best_pair(args.reps, fused, || stream_read(bytes));
                            (t, Some(r))
                        }
                        None => (time_best(args.reps, fused).0, None),
                    })?;
                    let t_ref = if args.skip_reference {
                        None
                    } else {
                        let (t, r) = time_best(args.reps.min(2), || {
                            let r = cosine_topk_reference(&q, &keys, Some(&norms), n, None);
                            let _ = sync(&dev);
                            r
                        });
                        match r {
                            Ok(_) => Some(t),
                            Err(e) => {
                                println!("reference failed at M={m} D={d} B={b}: {e}");
                                None
                            }
                        }
                    };
                    // Device time (CUDA events) of the queued call, beside the host time above.
                    let t_dev = match device_best(&dev, args.reps, || {
                        cosine_topk_deferred(&q, &keys, Some(&norms), n, None)
                    }) {
                        Ok(t) => t.map(|(d, _)| d),
                        Err(e) => {
                            println!(
                                "fused device timing failed at M={m} D={d} B={b}: {}",
                                crate::io::candle_text(&e)
                            );
                            None
                        }
                    };
                    // `host` is the best wall time (call and wait), `device` the best CUDA-event
                    // time; rates and ratios use the device time when there is one.
                    let mut add = |name: &str, host: Option<Duration>, device: Option<Duration>| {
                        let Some(t) = device.or(host) else { return };
                        let s = t.as_secs_f64();
                        let gbps = bank_bytes / s / 1e9;
                        let mut row = vec![
                            m.to_string(),
                            d.to_string(),
                            b.to_string(),
                            format!("{dt:?}").to_lowercase(),
                            name.to_string(),
                            host.map_or_else(|| "-".into(), fmt_ms),
                        ];
                        if hbm.is_some() {
                            row.push(device.map_or_else(|| "-".into(), fmt_ms));
                        }
                        row.extend([
                            format!("{:.0}", b as f64 / s),
                            format!("{gbps:.1}"),
                            t_ref
                                .map(|r| format!("{:.2}x", r.as_secs_f64() / s))
                                .unwrap_or_else(|| "-".into()),
                            match (hbm, t_read) {
                                (Some(bw), _) => format!("{:.0}%", 100.0 * gbps / bw),
                                (None, Some(r)) => {
                                    format!("{:.0}%", 100.0 * r.as_secs_f64() / s)
                                }
                                (None, None) => "-".into(),
                            },
                        ]);
                        table.row(row);
                    };
                    let fused_name = match auto_path(&dev, b, d, dt) {
                        Some(p) => format!("fused ({p})"),
                        None => "fused".to_string(),
                    };
                    add(&fused_name, Some(t_fused), t_dev);
                    if let Some(t) = t_ref {
                        add("reference", Some(t), None);
                    }
                    if hbm.is_some() {
                        for &path in &paths {
                            if path == Kernel::GemmFp32 && dt != DType::F32 {
                                continue; // the same GEMM as `gemm` for 16-bit keys
                            }
                            let call =
                                || cosine_topk_on_path(&q, &keys, Some(&norms), n, None, path);
                            match device_best(&dev, args.reps, call) {
                                Ok(Some((dv, host))) => {
                                    add(&format!("path {}", path.name()), Some(host), Some(dv))
                                }
                                Ok(None) => {}
                                Err(e) => println!(
                                    "path {} cannot take M={m} D={d} B={b}: {}",
                                    path.name(),
                                    crate::io::candle_text(&e)
                                ),
                            }
                        }
                    }
                    if let (Some(py), DType::F32) = (&args.faiss_python, dt) {
                        match faiss_time(py, &kv, qv, m, d, b, n, args.reps) {
                            Ok(t) => add("faiss IndexFlatIP", Some(t), None),
                            Err(e) => println!(
                                "faiss failed at M={m} D={d} B={b}: {}",
                                crate::io::error_line(&e)
                            ),
                        }
                    }
                    if let Some(&t) = torch.get(&(dt_name.clone(), b)) {
                        // The peer times with CUDA events on a GPU, with a host clock on the CPU.
                        if hbm.is_some() {
                            add("torch q@keys.T+topk", None, Some(t));
                        } else {
                            add("torch q@keys.T+topk", Some(t), None);
                        }
                    }
                }
            }
        }
    }
    table.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_lines_parse_per_cell_and_reject_bad_output() {
        let t = parse_torch_lines(
            "{\"dtype\": \"f32\", \"B\": 1, \"best_seconds\": 0.002, \"M\": 10, \"D\": 4}\n\n{\"dtype\": \"bf16\", \"B\": 64, \"best_seconds\": 0.5}\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[&("f32".to_string(), 1)], Duration::from_millis(2));
        assert_eq!(t[&("bf16".to_string(), 64)], Duration::from_millis(500));
        let e = parse_torch_lines("Traceback (most recent call last):").unwrap_err();
        assert!(e.to_string().contains("expected one JSON object"), "{e}");
        let e = parse_torch_lines("{\"dtype\": \"f32\", \"B\": 1}").unwrap_err();
        assert!(e.to_string().contains("best_seconds"), "{e}");
        let e =
            parse_torch_lines("{\"dtype\": \"f32\", \"B\": 1, \"best_seconds\": -1}").unwrap_err();
        assert!(e.to_string().contains("positive"), "{e}");
    }

    #[test]
    fn paths_parse() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(paths_of(&v(&["all"])).unwrap(), Kernel::ALL.to_vec());
        assert!(paths_of(&v(&["none"])).unwrap().is_empty());
        assert_eq!(
            paths_of(&v(&["gemm", "bandwidth"])).unwrap(),
            vec![Kernel::Gemm, Kernel::Bandwidth]
        );
        let e = paths_of(&v(&["gemm", "fast"])).unwrap_err().to_string();
        assert!(e.contains("`fast`") && e.contains("tensor-core"), "{e}");
    }

    #[test]
    fn peer_error_is_the_last_stderr_line() {
        assert_eq!(
            last_line(b"warning: x\ntorch_peer: RuntimeError: out of memory\n\n"),
            "torch_peer: RuntimeError: out of memory"
        );
        assert_eq!(last_line(b""), "(no stderr)");
    }
}
