//! Crash-safe checkpoint files.
//!
//! Every file is written to a temporary sibling, flushed with `fsync`, renamed over the
//! target and the directory is synced, so a reader sees either the old or the new file,
//! never a torn one. A checkpoint is a set of safetensors files plus `state.json`; the
//! state file is written last and names the tensor files of its generation, so it is the
//! commit point: an interruption between two writes leaves the previous generation intact.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Write `bytes` to `path` atomically (tmp + fsync + rename + directory fsync).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    commit(&tmp, path)
}

/// Save named tensors as safetensors at `path`, atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    commit(&tmp, path)
}

/// Load all tensors of a safetensors file onto `device` through the bounded reader
/// ([`crate::io::tensors`]); the error names the file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if std::fs::symlink_metadata(path).is_err() {
        bail!("checkpoint file {} does not exist", path.display());
    }
    crate::io::tensors::read(path, device)
        .map_err(|e| anyhow!("checkpoint file {}", one_line(&e.to_string())))
}

/// Serialize `value` as pretty JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    atomic_write(path, s.as_bytes())
}

/// Read and parse a JSON state file of at most [`crate::io::MAX_STATE_BYTES`]; errors name
/// the file and the parse problem.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    crate::io::json::read(path, crate::io::MAX_STATE_BYTES, "state file")
}

/// Truncate `path` to `len` bytes (used to drop metrics lines written after the last
/// checkpoint of an interrupted run). A missing file is created empty when `len == 0`.
pub fn truncate_file(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let cur = f.metadata()?.len();
    if cur < len {
        bail!(
            "{} is {cur} bytes, shorter than the {len} bytes the checkpoint recorded",
            path.display()
        );
    }
    f.set_len(len)
        .with_context(|| format!("truncating {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Collapse a multi-line message into one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    parent_dir(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

/// True for the name of a temporary file [`atomic_write`] or [`save_tensors`] writes
/// (`.<name>.tmp-<pid>`); one left behind by a killed process is safe to delete.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Delete the temporary files (see [`is_temp_name`]) a killed process left in `dir`; a
/// missing directory or a file that cannot be removed is left alone (they are never read).
pub fn remove_temp_files(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if is_temp_name(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Milliseconds to wait between a finished temporary file and its rename, read once from
/// `R2SCP_TEST_COMMIT_DELAY_MS` (unset: no wait). Only the crash test sets it, to widen the
/// window in which it kills a run in the middle of a checkpoint write.
fn commit_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("R2SCP_TEST_COMMIT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

fn commit(tmp: &Path, path: &Path) -> Result<()> {
    if let Some(d) = commit_delay() {
        std::thread::sleep(d);
    }
    fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // Persist the rename itself.
    if let Ok(d) = File::open(parent_dir(path)) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_roundtrip_and_corrupt_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.safetensors");
        let mut m = HashMap::new();
        m.insert(
            "w".to_string(),
            Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?,
        );
        save_tensors(&p, &m)?;
        let back = load_tensors(&p, &Device::Cpu)?;
        assert_eq!(back["w"].to_vec1::<f32>()?, vec![1.0, 2.0, 3.0]);
        fs::write(&p, b"garbage")?;
        let err = load_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("a.safetensors") && !err.contains('\n'),
            "{err}"
        );
        // no temp files left behind
        let n = fs::read_dir(dir.path())?.count();
        assert_eq!(n, 1);
        Ok(())
    }
}
