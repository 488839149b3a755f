//! Side-by-side benchmarks behind `r2scp bench` (`retrieve`, `cap`) and shared measuring
//! helpers.
//!
//! The two commands (their clap options and the tables they print) are application code,
//! built with the `cli` feature only. The helpers are library code, reused by every bench:
//! [`time_best`] (best-of-n wall time after a warm-up), [`time_best_pair`] (two variants
//! timed alternately), [`stream_read_gbps`] (this machine's streaming-read bandwidth, the
//! bound a bandwidth-limited kernel is judged against), [`device_copy_gbps`] (the same bound
//! on a GPU: a device-to-device copy), [`Table`] (one markdown table).

#[cfg(feature = "cli")]
pub mod cap;
#[cfg(feature = "cuda")]
pub mod cuda_events;
#[cfg(feature = "cli")]
pub mod retrieve;

use std::time::{Duration, Instant};

/// Runs `f` once to warm up, then `reps` times (at least 1); returns the best wall time
/// and the last result.
pub fn time_best<R>(reps: usize, mut f: impl FnMut() -> R) -> (Duration, R) {
    let mut last = f();
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        last = f();
        best = best.min(t.elapsed());
    }
    (best, last)
}

/// Runs `f` and `g` once each to warm up, then `reps` times (at least 1) alternately,
/// so both see the same machine state (other tenants, clock, memory); returns the best
/// wall time of each and `f`'s last result.
pub fn time_best_pair<R, S>(
    reps: usize,
    mut f: impl FnMut() -> R,
    mut g: impl FnMut() -> S,
) -> (Duration, Duration, R) {
    let mut last = f();
    std::hint::black_box(g());
    let (mut bf, mut bg) = (Duration::MAX, Duration::MAX);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        last = f();
        bf = bf.min(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(g());
        bg = bg.min(t.elapsed());
    }
    (bf, bg, last)
}

/// Wrapping sum of `v` read as little-endian u32 words (a short last word is zero-padded).
fn sum_bytes_scalar(v: &[u8]) -> u32 {
    v.chunks(4).fold(0u32, |s, c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        s.wrapping_add(u32::from_le_bytes(w))
    })
}

/// [`sum_bytes_scalar`] with four AVX2 accumulators over 128-byte steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_u32_avx2(v: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_si256(); 4];
    let chunks = v.chunks_exact(128);
    let rest = chunks.remainder();
    for c in chunks {
        let p = c.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm256_add_epi32(*acc, _mm256_loadu_si256(p.add(32 * j) as *const __m256i));
        }
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
    let mut out = [0u32; 8];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
    let tail = sum_bytes_scalar(rest);
    out.iter().fold(tail, |x, &y| x.wrapping_add(y))
}

/// Integer sum, so the probe's cost does not depend on what the bytes encode (f16 bit
/// patterns read as f32 could be denormals).
fn sum_bytes(v: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 checked above.
            return unsafe { sum_u32_avx2(v) };
        }
    }
    sum_bytes_scalar(v)
}

/// One streaming read of `bytes`: a parallel integer sum split across the rayon pool
/// (all threads), each thread reading contiguous stretches front to back. This is the
/// floor for any kernel that must read those bytes once.
pub fn stream_read(bytes: &[u8]) -> u32 {
    use rayon::prelude::*;
    let parts = rayon::current_num_threads().max(1) * 4;
    // Whole 128-byte steps per part, so the word boundaries match a sequential sum.
    let chunk = bytes.len().div_ceil(parts).next_multiple_of(128).max(128);
    bytes
        .par_chunks(chunk)
        .map(sum_bytes)
        .reduce(|| 0, u32::wrapping_add)
}

/// Streaming-read bandwidth in GB/s (1e9 bytes/s): the best of `reps` [`stream_read`]s
/// of a fresh `bytes`-sized buffer (use several times the last-level cache).
pub fn stream_read_gbps(bytes: usize, reps: usize) -> f64 {
    let n = bytes.max(4096);
    // Pseudo-random bytes: a short period would make whole pages identical, which a
    // hypervisor may merge into a few cached physical pages.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let buf: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    let (t, s) = time_best(reps, || stream_read(&buf));
    std::hint::black_box(s);
    n as f64 / t.as_secs_f64() / 1e9
}

/// Device-memory bandwidth in GB/s (1e9 bytes/s, bytes read + bytes written) of `dev`: the
/// best of `reps` device-to-device copies of a `bytes`-sized f32 buffer after a warm-up
/// (`Tensor::copy`, a `cuMemcpyDtoDAsync` on CUDA), each followed by a synchronize. On a GPU
/// this is the bound a kernel that reads the bank once is judged against (it counts the
/// write, as the baseline's PyTorch in-place scale did). `None` on the CPU, which has
/// [`stream_read_gbps`].
pub fn device_copy_gbps(
    dev: &candle_core::Device,
    bytes: usize,
    reps: usize,
) -> candle_core::Result<Option<f64>> {
    if dev.is_cpu() {
        return Ok(None);
    }
    let src = candle_core::Tensor::zeros(bytes.max(4096) / 4, candle_core::DType::F32, dev)?;
    let moved = 2.0 * (src.elem_count() * 4) as f64;
    let (t, last) = time_best(reps, || -> candle_core::Result<()> {
        let copy = src.copy()?;
        dev.synchronize()?;
        drop(copy);
        Ok(())
    });
    last?;
    Ok(Some(moved / t.as_secs_f64() / 1e9))
}

/// A markdown table printed to stdout.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends one row (missing cells print empty, extra cells are kept).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as markdown, columns padded to their widest cell.
    pub fn render(&self) -> String {
        let cols = self
            .rows
            .iter()
            .map(|r| r.len())
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let cell = |r: &[String], i: usize| r.get(i).cloned().unwrap_or_default();
        let width: Vec<usize> = (0..cols)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).len())
                    .chain([cell(&self.headers, i).len(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |r: &[String]| {
            let cells: Vec<String> = (0..cols)
                .map(|i| format!("{:<w$}", cell(r, i), w = width[i]))
                .collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut out = line(&self.headers);
        let sep: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("|-{}-|\n", sep.join("-|-")));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }

    /// Prints [`Table::render`] to stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// The environment variable naming the directory of the peer scripts (`faiss_peer.py`,
/// `torch_peer.py`); it overrides the search of [`peer_script`].
pub const SCRIPTS_ENV: &str = "R2SCP_SCRIPTS_DIR";

/// The path of peer script `name`: in `$R2SCP_SCRIPTS_DIR` when that is set (and nowhere
/// else); otherwise next to the running executable (the GPU lane's bundle puts it there),
/// then in `scripts/` of the checkout the executable was built in (found by walking up from
/// it: `target/release/r2scp` -> the checkout), then in `scripts/` of the checkout holding
/// the current directory. Never a path fixed at build time.
pub fn peer_script(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let dir = std::env::var_os(SCRIPTS_ENV).map(std::path::PathBuf::from);
    find_peer_script(name, dir.as_deref(), exe.as_deref(), cwd.as_deref())
}

/// [`peer_script`] with its inputs given: the override directory, the executable, the
/// current directory.
pub fn find_peer_script(
    name: &str,
    dir: Option<&std::path::Path>,
    exe: Option<&std::path::Path>,
    cwd: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    use std::path::Path;
    if let Some(d) = dir {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
        anyhow::bail!(
            "peer script {name} is not in {} ({SCRIPTS_ENV})",
            d.display()
        );
    }
    // A checkout: a directory with Cargo.toml and scripts/<name>.
    let in_checkout = |start: &Path| {
        start
            .ancestors()
            .map(|a| a.join("scripts").join(name))
            .find(|p| {
                p.is_file()
                    && p.parent()
                        .and_then(Path::parent)
                        .is_some_and(|root| root.join("Cargo.toml").is_file())
            })
    };
    let beside_exe = exe.and_then(Path::parent).map(|d| d.join(name));
    let found = beside_exe
        .filter(|p| p.is_file())
        .or_else(|| exe.and_then(Path::parent).and_then(in_checkout))
        .or_else(|| cwd.and_then(in_checkout));
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "peer script {name} found neither next to the executable, nor in the scripts/ of the \
             checkout it was built in or of the current directory's; set {SCRIPTS_ENV} to the \
             directory holding it"
        )
    })
}

/// Milliseconds with 3 significant-ish digits.
pub fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_scripts_are_found_from_the_executable_or_the_checkout_never_the_build_path() {
        let t = tempfile::tempdir().unwrap();
        let checkout = t.path().join("checkout");
        std::fs::create_dir_all(checkout.join("scripts")).unwrap();
        std::fs::create_dir_all(checkout.join("target/release")).unwrap();
        std::fs::write(checkout.join("Cargo.toml"), "").unwrap();
        std::fs::write(checkout.join("scripts/peer.py"), "").unwrap();
        let exe = checkout.join("target/release/r2scp");
        let want = checkout.join("scripts/peer.py");
        let elsewhere = t.path().join("bin/r2scp");
        let sub = checkout.join("data");
        std::fs::create_dir_all(&sub).unwrap();
        assert_eq!(
            find_peer_script("peer.py", None, Some(&exe), None).unwrap(),
            want
        );
        assert_eq!(
            find_peer_script("peer.py", None, Some(&elsewhere), Some(&sub)).unwrap(),
            want
        );
        let e = find_peer_script("peer.py", None, Some(&elsewhere), Some(t.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SCRIPTS_ENV), "{e}");
        let own = t.path().join("own");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("peer.py"), "").unwrap();
        assert_eq!(
            find_peer_script("peer.py", Some(&own), Some(&exe), None).unwrap(),
            own.join("peer.py")
        );
        assert!(find_peer_script("other.py", Some(&own), Some(&exe), None).is_err());
    }

    #[test]
    fn table_renders_aligned_markdown() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "| a   | bb  |\n|-----|-----|\n| xyz | 1   |\n");
    }

    #[test]
    fn bandwidth_is_positive() {
        assert!(stream_read_gbps(1 << 20, 1) > 0.0);
    }

    #[test]
    fn device_copy_probe_is_for_devices_only() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(device_copy_gbps(&cpu, 1 << 20, 1).unwrap(), None);
    }

    #[test]
    fn stream_read_sums_every_byte() {
        // Lengths around the 128-byte step and the per-thread split, with a ragged word.
        for len in [0usize, 1, 5, 127, 128, 129, 1000, 4099, 100_003] {
            let v: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut want = 0u32;
            for c in v.chunks(4) {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                want = want.wrapping_add(u32::from_le_bytes(w));
            }
            assert_eq!(stream_read(&v), want, "len {len}");
            assert_eq!(sum_bytes(&v), want, "len {len}");
        }
    }
}
