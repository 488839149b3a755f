//! Run directories: the marker that says r2scp created a directory, and the lock that keeps
//! one process at a time in it (docs/DESIGN.md, "Run directories").
//!
//! A directory becomes a run (`train`) or an ablation output (`ablate`) when r2scp writes
//! [`MARKER`] into it, before anything else. Only a marked directory is ever cleared
//! (`--force`, or an ablation variant whose config changed), and only of the files r2scp
//! writes there ([`OUTPUTS`]); a directory that is not empty and has no marker is never
//! written into. The marker is also the lock: the process working in the directory holds an
//! exclusive OS lock on it (`flock` on Unix, through `std::fs::File::try_lock`) from before its
//! first write to its end, so a second process fails at once instead of mixing its files in.
//! The kernel drops the lock when the process dies, SIGKILL included.
//!
//! Directories written by r2scp before the marker existed ("legacy": a `checkpoint/state.json`
//! or a `config.toml` snapshot, for an ablation a `results.json` or `seed<N>/` runs) are
//! marked when they are resumed or ablated again, with one note on stderr; `--force` never
//! clears an unmarked directory.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::is_temp_name;
use super::config::SNAPSHOT_FILE;

/// The marker (and lock) file r2scp writes first into every directory it creates as a run.
pub const MARKER: &str = ".r2scp-run";

/// What r2scp writes into a run directory, the only entries it ever deletes there (plus
/// its own temporary files): anything else a user put in a run directory stays.
pub const OUTPUTS: [&str; 7] = [
    "checkpoint",
    "metrics.jsonl",
    "report.md",
    "results.json",
    "plots",
    "config.toml",
    "config.json",
];

/// What a marked directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// One training run (`r2scp train`, or an ablation variant).
    Train,
    /// The output of `r2scp ablate`.
    Ablate,
}

impl RunKind {
    fn as_str(self) -> &'static str {
        match self {
            RunKind::Train => "a training run",
            RunKind::Ablate => "an ablation output",
        }
    }
}

/// How a directory is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A new run: the directory must not exist, be empty, or be a marked run without a
    /// checkpoint; with `force`, a marked run's outputs are cleared first.
    Fresh {
        /// Clear a marked run that holds a checkpoint (`--force`).
        force: bool,
    },
    /// An existing run (`--resume`): marked, or a legacy run (marked now).
    Resume,
    /// Created if missing, else marked or legacy: an ablation's output directory and its
    /// variants, which `ablate` reuses or clears itself.
    Reuse,
}

/// The marker's content (informational: its presence is what marks the directory).
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    kind: RunKind,
    created_by: String,
}

/// A run directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    created: bool,
    _lock: File,
}

impl RunDir {
    /// Open (creating if asked) the run directory `path` of `kind` and lock it; `option`
    /// names the command-line option that chose the path (`--name`, `--out`) for errors.
    /// Fails at once, with one line, when another process holds it or when the directory
    /// is not one r2scp may write into.
    pub fn open(path: &Path, kind: RunKind, how: Open, option: &str) -> Result<RunDir> {
        let shown = path.display();
        let mut created = false;
        if fs::symlink_metadata(path).is_err() {
            if how == Open::Resume {
                bail!("run directory {shown} does not exist; there is nothing to --resume");
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            match fs::create_dir(path) {
                Ok(()) => created = true,
                // Another process created it just now; the lock decides below.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(anyhow!("creating {shown}: {e}")),
            }
        }
        if !path.is_dir() {
            bail!("{shown} exists and is not a directory; choose another {option}");
        }
        let marker = path.join(MARKER);
        // Listed once: a racing process writes the marker before anything else, so a
        // listing without it is of a directory no r2scp process has written into.
        let entries = entries(path)?;
        let marked = entries.iter().any(|e| e.as_os_str() == MARKER);
        if !marked {
            let legacy = entries.iter().any(|e| is_legacy_entry(path, e, kind));
            match how {
                Open::Resume if entries.is_empty() => {
                    bail!("{shown} is empty, not a run directory; there is nothing to --resume")
                }
                _ if entries.is_empty() => {}
                Open::Fresh { force } => bail!("{}", refusal(path, kind, force, legacy, option)),
                Open::Resume | Open::Reuse if legacy => {
                    if how == Open::Resume || kind == RunKind::Ablate {
                        eprintln!(
                            "note: {shown} was written by an older r2scp; marking it as {} ({MARKER})",
                            kind.as_str()
                        );
                    }
                }
                Open::Resume => bail!(
                    "{shown} is not a run directory r2scp created (no {MARKER} marker and no \
                     checkpoint); there is nothing to --resume"
                ),
                Open::Reuse => bail!(
                    "refusing to write into {shown}: it is not empty and is not {} r2scp \
                     created (no {MARKER} marker); choose another {option}",
                    kind.as_str()
                ),
            }
            write_marker(&marker, kind)?;
        }
        let lock = OpenOptions::new()
            .read(true)
            .open(&marker)
            .with_context(|| format!("opening {}", marker.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!(
                "{shown} is in use by another r2scp process (it holds the lock on {MARKER}); \
                 wait for it to finish or choose another {option}"
            ),
            Err(TryLockError::Error(e)) => bail!("cannot lock {}: {e}", marker.display()),
        }
        if let Some(other) = read_kind(&marker).filter(|k| *k != kind) {
            bail!(
                "{shown} is {}, not {}; choose another {option}",
                other.as_str(),
                kind.as_str()
            );
        }
        let dir = RunDir {
            path: path.to_path_buf(),
            created,
            _lock: lock,
        };
        if let Open::Fresh { force } = how {
            let has_checkpoint = path.join("checkpoint").join("state.json").exists();
            if has_checkpoint && !force {
                bail!(
                    "run directory {shown} already holds a checkpoint; use --resume to continue \
                     it, --force to replace it, or choose another {option}"
                );
            }
            if force {
                dir.clear()?;
            }
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this call created the directory (it did not exist before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Delete what r2scp writes in a run directory ([`OUTPUTS`], temporary files); the
    /// marker and anything else stay.
    pub fn clear(&self) -> Result<()> {
        for e in entries(&self.path)? {
            let name = e.to_string_lossy();
            if !(OUTPUTS.contains(&name.as_ref()) || is_temp_name(&name)) {
                continue;
            }
            let p = self.path.join(&e);
            let dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
            let r = if dir {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(())
    }

    /// Delete the directory entirely if this call created it and it holds only what r2scp
    /// wrote (used when a new run fails before its first checkpoint: it leaves nothing).
    pub fn remove_if_created(self) {
        if !self.created {
            return;
        }
        let Ok(list) = entries(&self.path) else {
            return;
        };
        let ours = |e: &std::ffi::OsString| {
            let n = e.to_string_lossy();
            n == MARKER || OUTPUTS.contains(&n.as_ref()) || is_temp_name(&n)
        };
        if list.iter().all(ours) {
            let _ = self.clear();
            let _ = fs::remove_file(self.path.join(MARKER));
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// The names in `dir`.
fn entries(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let rd = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    rd.map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))
}

/// An entry an older r2scp wrote into a run (`checkpoint/state.json`, the config
/// snapshot) or an ablation output (`results.json`, `seed<N>/` holding runs).
fn is_legacy_entry(dir: &Path, name: &std::ffi::OsStr, kind: RunKind) -> bool {
    let n = name.to_string_lossy();
    match kind {
        RunKind::Train => {
            (n == "checkpoint" && dir.join("checkpoint").join("state.json").is_file())
                || n == SNAPSHOT_FILE
        }
        RunKind::Ablate => {
            n == "results.json"
                || (n
                    .strip_prefix("seed")
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    && dir.join(name).is_dir())
        }
    }
}

/// The one-line refusal of a fresh run into an unmarked, non-empty directory.
fn refusal(path: &Path, kind: RunKind, force: bool, legacy: bool, option: &str) -> String {
    let shown = path.display();
    let what = if force {
        format!("refusing to replace {shown} with --force")
    } else {
        format!("refusing to write into {shown}")
    };
    if legacy {
        format!(
            "{what}: it looks like {} of an older r2scp but has no {MARKER} marker, so r2scp \
             will not delete or overwrite it; --resume it, delete it yourself, or choose another \
             {option} (nothing was changed)",
            kind.as_str()
        )
    } else {
        format!(
            "{what}: it is not empty and is not {} r2scp created (no {MARKER} marker); choose \
             another {option} (nothing was changed)",
            kind.as_str()
        )
    }
}

/// Create the marker (a racing process may have just created it: then it stays as is).
fn write_marker(marker: &Path, kind: RunKind) -> Result<()> {
    let mut f = match OpenOptions::new().write(true).create_new(true).open(marker) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(anyhow!("creating {}: {e}", marker.display())),
    };
    let m = Marker {
        kind,
        created_by: format!("r2scp {}", env!("CARGO_PKG_VERSION")),
    };
    let mut text = serde_json::to_string(&m)?;
    text.push('\n');
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", marker.display()))
}

/// The kind a marker records, if it can be read (a marker cut short by a crash marks the
/// directory all the same).
fn read_kind(marker: &Path) -> Option<RunKind> {
    let text = fs::read_to_string(marker).ok()?;
    serde_json::from_str::<Marker>(&text).ok().map(|m| m.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_fails_while_the_first_lives() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("runs").join("a");
        let first = RunDir::open(&p, RunKind::Train, Open::Fresh { force: false }, "--name")
            .expect("fresh");
        assert!(first.created());
        let e = RunDir::open(&p, RunKind::Train, Open::Resume, "--name")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use") && e.contains("--name"), "{e}");
        drop(first);
        RunDir::open(&p, RunKind::Train, Open::Resume, "--name").expect("free again");
    }

    #[test]
    fn unmarked_directories_are_never_written_into() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("thesis.txt"), b"years of work").unwrap();
        for how in [
            Open::Fresh { force: true },
            Open::Fresh { force: false },
            Open::Reuse,
        ] {
            let e = RunDir::open(&p, RunKind::Train, how, "--name")
                .unwrap_err()
                .to_string();
            assert!(e.contains("refusing") && e.contains("data"), "{e}");
        }
        let names: Vec<_> = entries(&p).unwrap();
        assert_eq!(names, vec![std::ffi::OsString::from("thesis.txt")]);
    }

    #[test]
    fn force_clears_only_what_r2scp_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        let r = RunDir::open(&p, RunKind::Train, Open::Fresh { force: false }, "--name").unwrap();
        fs::create_dir_all(p.join("checkpoint")).unwrap();
        fs::write(p.join("checkpoint/state.json"), b"{}").unwrap();
        fs::write(p.join("metrics.jsonl"), b"").unwrap();
        fs::write(p.join("notes.txt"), b"mine").unwrap();
        drop(r);
        let e = RunDir::open(&p, RunKind::Train, Open::Fresh { force: false }, "--name")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--resume") && e.contains("--force"), "{e}");
        let _r = RunDir::open(&p, RunKind::Train, Open::Fresh { force: true }, "--name").unwrap();
        let mut names: Vec<String> = entries(&p)
            .unwrap()
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [MARKER, "notes.txt"]);
    }

    #[test]
    fn legacy_runs_are_marked_on_resume_and_kinds_do_not_mix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("old");
        fs::create_dir_all(p.join("checkpoint")).unwrap();
        fs::write(p.join("checkpoint/state.json"), b"{}").unwrap();
        RunDir::open(&p, RunKind::Train, Open::Resume, "--name").expect("legacy resume");
        assert!(p.join(MARKER).is_file());
        let e = RunDir::open(&p, RunKind::Ablate, Open::Reuse, "--out")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is a training run") && e.contains("--out"),
            "{e}"
        );
    }
}
