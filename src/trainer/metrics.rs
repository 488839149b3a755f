//! `metrics.jsonl`: one JSON object per line, appended as training goes.
//!
//! Kinds: `"train"` (mean over a logging window of updates), `"val"` (end-of-epoch
//! validation), `"test"` (final evaluation, one line per missing setting). Everything
//! except `secs` and `samples_per_s` is a deterministic function of the config and seed,
//! so an interrupted-and-resumed run writes the same lines as an uninterrupted one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::stage::{self, Stage};

/// One metrics line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `"train"`, `"val"` or `"test"`.
    pub kind: String,
    /// Training stage; `None` for a final test evaluation (`1`, `2` or `0` on disk).
    #[serde(with = "stage::number_or_zero")]
    pub stage: Option<Stage>,
    /// Epoch within the stage (1-based).
    pub epoch: usize,
    /// Updates done in this stage so far.
    pub step: u64,
    /// Total loss (mean over the window).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    /// Accuracy in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub acc: Option<f64>,
    /// Learning rate at the last update of the window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Mean router weights (audio, visual, text) over the window / evaluation set.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub router: Option<[f64; 3]>,
    /// Missing setting of an evaluation line (`"missing_audio"`, `"missing_visual"`,
    /// `"complete"`, `"simulated"`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub setting: Option<String>,
    /// Named scalars: loss parts (`task`, `rank_pos`, `rank_neg`), per-expert accuracies
    /// (`acc_audio` ...), per-question-type accuracies (`qt.<type>`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub extra: BTreeMap<String, f64>,
    /// Wall-clock seconds since the (possibly resumed) process started; not deterministic.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secs: Option<f64>,
    /// Training throughput; not deterministic.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub samples_per_s: Option<f64>,
}

impl Record {
    /// Copy without the wall-clock fields, for comparing runs.
    pub fn deterministic(&self) -> Record {
        Record {
            secs: None,
            samples_per_s: None,
            ..self.clone()
        }
    }
}

/// Appending writer; each line is flushed and synced so that its byte length can be
/// recorded in the checkpoint.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Open (create) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Append one record.
    pub fn write(&mut self, r: &Record) -> Result<()> {
        let mut s = serde_json::to_string(r)?;
        s.push('\n');
        self.file
            .write_all(s.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }

    /// Current file length in bytes (after syncing).
    pub fn len(&mut self) -> Result<u64> {
        self.file.sync_data()?;
        Ok(self.file.metadata()?.len())
    }

    /// True when nothing has been written.
    pub fn is_empty(&mut self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Read every record of a metrics file; errors name the file and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1))?;
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_roundtrip() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("m.jsonl");
        let mut w = MetricsWriter::open(&p)?;
        let mut r = Record {
            kind: "train".into(),
            stage: Some(Stage::Mixing),
            epoch: 1,
            step: 10,
            loss: Some(1.5),
            router: Some([0.2, 0.3, 0.5]),
            secs: Some(3.0),
            ..Default::default()
        };
        r.extra.insert("task".into(), 1.25);
        w.write(&r)?;
        assert!(w.len()? > 0);
        let back = read_metrics(&p)?;
        assert_eq!(back, vec![r.clone()]);
        assert_eq!(back[0].deterministic().secs, None);
        Ok(())
    }

    #[test]
    fn stage_keeps_its_numeric_form() -> Result<()> {
        // Lines as every version wrote them: the final test has stage 0.
        let test_line = r#"{"kind":"test","stage":0,"epoch":0,"step":0,"acc":0.5}"#;
        let r: Record = serde_json::from_str(test_line)?;
        assert_eq!(r.stage, None);
        assert_eq!(serde_json::to_string(&r)?, test_line);
        let train_line = r#"{"kind":"train","stage":1,"epoch":1,"step":3}"#;
        let r: Record = serde_json::from_str(train_line)?;
        assert_eq!(r.stage, Some(Stage::Experts));
        assert_eq!(serde_json::to_string(&r)?, train_line);
        let bad = r#"{"kind":"train","stage":3,"epoch":1,"step":3}"#;
        let e = serde_json::from_str::<Record>(bad).unwrap_err().to_string();
        assert!(e.contains("stage 3: expected 1 or 2"), "{e}");
        Ok(())
    }
}
