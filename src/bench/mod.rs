//! Side-by-side benchmarks behind `r2scp bench` (`retrieve`, `cap`) and shared measuring
//! helpers.
//!
//! Helpers reused by every bench: [`time_best`] (best-of-n wall time after a warm-up),
//! [`stream_read_gbps`] (this machine's streaming-read bandwidth, the bound a
//! bandwidth-limited kernel is judged against), [`Table`] (one markdown table).

pub mod cap;
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 4];
    let chunks = v.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        let p = c.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(p.add(8 * j)));
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

fn sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 checked above.
            return unsafe { sum_avx2(v) };
        }
    }
    v.iter().sum()
}

/// Streaming-read bandwidth in GB/s (1e9 bytes/s): the best of `reps` parallel sums of a
/// `bytes`-sized f32 buffer (use several times the last-level cache), split across the
/// rayon pool (all threads).
pub fn stream_read_gbps(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1024);
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let parts = rayon::current_num_threads().max(1) * 4;
    let chunk = n.div_ceil(parts);
    let (t, s) = time_best(reps, || buf.par_chunks(chunk).map(sum).sum::<f32>());
    std::hint::black_box(s);
    (n * 4) as f64 / t.as_secs_f64() / 1e9
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
    fn table_renders_aligned_markdown() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "| a   | bb  |\n|-----|-----|\n| xyz | 1   |\n");
    }

    #[test]
    fn bandwidth_is_positive() {
        assert!(stream_read_gbps(1 << 20, 1) > 0.0);
    }
}
