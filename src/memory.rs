//! How much memory r2scp may use, and refusing work that would need more before anything
//! is allocated: a config asking for `dim = 10^6` or `n_train_clips = 10^12` is one error
//! line naming the option, not an allocation failure that aborts the process.
//!
//! The limit is the smallest of: the machine's physical memory (`MemTotal` in
//! `/proc/meminfo`), the cgroup's memory limit (`memory.max`, cgroup v2), and
//! `R2SCP_MEMORY_LIMIT` (bytes, or a number with a `K`, `M`, `G` or `T` suffix, binary
//! units) when set. Where none of the first two can be read (not Linux), 1 TiB is assumed.
//! Estimates are of the large buffers only (docs/DESIGN.md, "Run directories"); the limit
//! exists to catch sizes that cannot fit, not to pack a machine to the last byte.

use anyhow::{bail, Result};

/// The environment variable that lowers the limit.
pub const LIMIT_ENV: &str = "R2SCP_MEMORY_LIMIT";

/// The limit assumed where the machine's memory cannot be read.
pub const UNKNOWN_MACHINE_BYTES: u64 = 1 << 40;

/// The memory limit in bytes and what it is ("this machine's memory", ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// Where it comes from, for error messages.
    pub source: String,
}

/// The current limit (see the module docs). An unparsable `R2SCP_MEMORY_LIMIT` is an error.
pub fn limit() -> Result<Limit> {
    let mut best = match machine_bytes() {
        Some(b) => Limit {
            bytes: b,
            source: "this machine's memory".into(),
        },
        None => Limit {
            bytes: UNKNOWN_MACHINE_BYTES,
            source: "the 1 TiB assumed where the machine's memory cannot be read".into(),
        },
    };
    if let Some(b) = cgroup_bytes() {
        if b < best.bytes {
            best = Limit {
                bytes: b,
                source: "this cgroup's memory limit".into(),
            };
        }
    }
    if let Ok(v) = std::env::var(LIMIT_ENV) {
        let b = parse_size(&v).ok_or_else(|| {
            anyhow::anyhow!(
                "{LIMIT_ENV}={v:?}: expected a number of bytes, optionally with a K, M, G or T suffix"
            )
        })?;
        if b < best.bytes {
            best = Limit {
                bytes: b,
                source: LIMIT_ENV.to_string(),
            };
        }
    }
    Ok(best)
}

/// Fails with `"<what> needs about <X>, more than <limit> (<Y>)<advice>"` when `need`
/// bytes exceed the limit.
pub fn check(need: u128, what: impl FnOnce() -> String, advice: &str) -> Result<()> {
    check_against(&limit()?, need, what, advice)
}

/// [`check`] against a given limit.
pub fn check_against(
    l: &Limit,
    need: u128,
    what: impl FnOnce() -> String,
    advice: &str,
) -> Result<()> {
    if need > l.bytes as u128 {
        bail!(
            "{} needs about {}, more than {} ({}){advice}",
            what(),
            fmt_bytes(need),
            l.source,
            fmt_bytes(l.bytes as u128)
        );
    }
    Ok(())
}

/// `MemTotal` of `/proc/meminfo`.
fn machine_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// cgroup v2 `memory.max` of this process's cgroup (`max` = no limit).
fn cgroup_bytes() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = format!("/sys/fs/cgroup{}/memory.max", rel.trim_end_matches('/'));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `"123"`, `"8G"`, `"512M"`, `"1.5T"` (binary units) -> bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    let b = v * mult as f64;
    (v.is_finite() && v >= 0.0 && b < u64::MAX as f64).then_some(b as u64)
}

/// Bytes in binary units with three significant digits: `"23.4 GiB"`, `"1.1 PiB"`.
pub fn fmt_bytes(b: u128) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("8Q"), None);
        assert_eq!(fmt_bytes(512), "512 bytes");
        assert_eq!(fmt_bytes(3 << 30), "3.00 GiB");
        assert_eq!(fmt_bytes(1u128 << 50), "1.00 PiB");
        assert_eq!(fmt_bytes(150 << 20), "150 MiB");
    }

    #[test]
    fn the_limit_is_positive() {
        let l = limit().unwrap();
        assert!(l.bytes > 0, "{l:?}");
    }
}
