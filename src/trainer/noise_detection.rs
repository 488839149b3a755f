//! CAP's noise detection on the synthetic set: how many of the rows phase 1 picks
//! (`noise_idx`) are noise tokens, per missing setting.
//!
//! A recovered token is noise when fewer than half of the clips retrieved for it render the
//! query clip's own scene content at its position ([`crate::data::TokenContent`]: the
//! generator's record of what each token renders). For every test question with a modality missing,
//! the model's own retrieval (the bank rows of its positive search) and its CAP's
//! `noise_idx` are read off one evaluation forward; precision = noise tokens among the
//! picked ones, recall = picked noise tokens among all noise tokens, chance = the share of
//! noise tokens (the precision of a random pick). Only variants with retrieval and CAP
//! have both; on real data nothing records which tokens are noise, so nothing is measured.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::load_tensors;
use super::config::TrainConfig;
use super::state::{checkpoint_dir, read_state};
use super::training::Session;
use crate::data::{batches, generate_with_meta, noise_tokens, MissingPolicy, Modality};
use crate::data::{Splits, SyntheticMeta};
use crate::model::{is_expert_var, Banks, R2scp};

/// Noise detection of one missing setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoiseDetection {
    /// `missing-audio` or `missing-visual`.
    pub setting: String,
    /// Recovered sequences (test questions with that modality missing).
    pub rows: usize,
    /// Recovered tokens (rows x L).
    pub tokens: usize,
    /// Of those, noise tokens.
    pub noise: usize,
    /// Tokens CAP picked (rows x k).
    pub picked: usize,
    /// Of those, noise tokens.
    pub hits: usize,
}

impl NoiseDetection {
    /// hits / picked (None when nothing was picked).
    pub fn precision(&self) -> Option<f64> {
        (self.picked > 0).then(|| self.hits as f64 / self.picked as f64)
    }

    /// hits / noise (None when there is no noise token).
    pub fn recall(&self) -> Option<f64> {
        (self.noise > 0).then(|| self.hits as f64 / self.noise as f64)
    }

    /// noise / tokens: the expected precision of k tokens picked at random.
    pub fn chance(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.noise as f64 / self.tokens as f64)
    }
}

/// Detection of one run at stage-II initialisation and after training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetectionPair {
    /// With the stage-I experts and every stage-II var at its seeded initial value.
    pub init: Vec<NoiseDetection>,
    /// With the run's final weights.
    pub trained: Vec<NoiseDetection>,
}

/// Noise detection of `model` on the test split of the synthetic set `splits` (whose
/// token content is `meta`), for missing audio and missing visual. The banks must be
/// built from `splits.train`. The model needs retrieval and CAP on.
pub fn measure(
    model: &R2scp,
    splits: &Splits,
    meta: &SyntheticMeta,
    banks: &Banks,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<NoiseDetection>> {
    let cfg = model.config();
    ensure!(
        cfg.use_retrieval && cfg.use_cap,
        "noise detection needs retrieval and CAP (use_retrieval = {}, use_cap = {})",
        cfg.use_retrieval,
        cfg.use_cap
    );
    let test = &splits.test;
    let (train_c, test_c) = (&meta.train_content, &meta.test_content);
    let dims = splits.dims();
    ensure!(
        train_c.audio.len() == splits.train.n_clips() * dims.la
            && test_c.visual.len() == test.n_clips() * dims.lv,
        "noise detection: the token content does not describe these splits"
    );
    for m in Modality::ALL {
        ensure!(
            banks.get(m).ids() == splits.train.clip_ids.as_slice(),
            "noise detection: the {m} bank is not built from this train split"
        );
    }
    let mut out = Vec::new();
    for m in Modality::ALL {
        let l = match m {
            Modality::Audio => dims.la,
            Modality::Visual => dims.lv,
        };
        // retrieved clips: what their tokens render; the query: what its scene holds
        let (train_codes, test_codes): (&[u32], &[u32]) = match m {
            Modality::Audio => (&train_c.audio, &test_c.audio_scene),
            Modality::Visual => (&train_c.visual, &test_c.visual_scene),
        };
        let policy = MissingPolicy::All(m);
        let mut r = NoiseDetection {
            setting: policy.name(),
            ..Default::default()
        };
        for batch in batches(test, batch_size, None, policy, device) {
            let batch = batch?;
            let o = model.forward(&batch, banks, false)?;
            let ret = o
                .retrieval
                .iter()
                .find(|t| t.modality == m && !t.negative)
                .context("noise detection: the forward made no retrieval")?;
            let cap = o
                .cap
                .iter()
                .find(|t| t.modality == m && !t.negative)
                .context("noise detection: the forward made no CAP purification")?;
            if ret.rows != cap.rows {
                bail!("noise detection: retrieval and CAP purified different rows");
            }
            let found = rows_of(&ret.indices)?;
            let picked = rows_of(&cap.noise_idx)?;
            for (j, &br) in ret.rows.iter().enumerate() {
                let clip = test.clip_of[batch.rows[br]];
                let own = &test_codes[clip * l..(clip + 1) * l];
                let retrieved: Vec<&[u32]> = found[j]
                    .iter()
                    .map(|&c| &train_codes[c as usize * l..(c as usize + 1) * l])
                    .collect();
                let noise = noise_tokens(own, &retrieved);
                r.rows += 1;
                r.tokens += l;
                r.noise += noise.iter().filter(|x| **x).count();
                r.picked += picked[j].len();
                r.hits += picked[j].iter().filter(|&&i| noise[i as usize]).count();
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn rows_of(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(t.to_device(&Device::Cpu)?.to_vec2::<u32>()?)
}

/// The synthetic set of `cfg` with its token content (`None` for real data).
pub fn synthetic_with_meta(cfg: &TrainConfig) -> Result<Option<(Splits, SyntheticMeta)>> {
    if cfg.data.is_some() {
        return Ok(None);
    }
    Ok(Some(generate_with_meta(&cfg.synthetic)?))
}

/// [`DetectionPair`] of the finished stage-II run in `run_dir`, whose stage II started
/// from the stage-I weights file `stage1_file`; `data` is its synthetic set.
pub fn measure_run(
    run_dir: &Path,
    stage1_file: &Path,
    data: &(Splits, SyntheticMeta),
    device: &Device,
) -> Result<DetectionPair> {
    let ck = checkpoint_dir(run_dir);
    let st = read_state(&ck.join("state.json"))?;
    let cfg = &st.config;
    let s = Session::from_splits(cfg, data.0.clone(), device)?;
    s.model.set_experts_frozen(cfg.stage1_enabled);
    // Initialisation: the stage-I experts, every other var as seeded.
    let stage1 = load_tensors(stage1_file, device)?;
    let mut experts: HashMap<String, Tensor> = HashMap::new();
    for name in s.weights()?.keys().filter(|n| is_expert_var(n)) {
        let t = stage1
            .get(name)
            .with_context(|| format!("{} has no var {name}", stage1_file.display()))?;
        experts.insert(name.clone(), t.clone());
    }
    set_weights(&s, &experts)?;
    s.model.set_experts_frozen(cfg.stage1_enabled);
    let bs = cfg.eval_batch_size;
    let at_init = measure(&s.model, &s.splits, &data.1, &s.banks, bs, device)?;
    s.load_weights(&ck.join(&st.model_file))?;
    s.model.set_experts_frozen(cfg.stage1_enabled);
    let trained = measure(&s.model, &s.splits, &data.1, &s.banks, bs, device)?;
    Ok(DetectionPair {
        init: at_init,
        trained,
    })
}

/// Sets the vars named in `w` (the others keep their values).
fn set_weights(s: &Session, w: &HashMap<String, Tensor>) -> Result<()> {
    let data = s
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    for (name, var) in data.iter() {
        if let Some(t) = w.get(name) {
            var.set(t)?;
        }
    }
    Ok(())
}

/// Markdown section for `ablate`'s report: per variant with retrieval and CAP and per
/// missing setting, precision and recall of `noise_idx` at initialisation and after
/// training, and chance (mean over seeds, in %). `rows` holds (variant id, label, one
/// pair per seed).
pub fn report_section(rows: &[(String, String, Vec<DetectionPair>)]) -> String {
    let mut md = String::new();
    if rows.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "### CAP noise detection\n\nPrecision and recall of CAP's `noise_idx` on the test split \
         (% mean over seeds): a picked token is a hit when it is a noise token, i.e. fewer than \
         half of the clips retrieved for it show the query's own content at that position \
         (docs/DATA.md); chance is the share of noise tokens, the precision of a random pick.\n\n\
         | variant | setting | chance | precision at init | precision trained | recall at init | recall trained |\n\
         |---|---|---:|---:|---:|---:|---:|"
    );
    for (id, label, per_seed) in rows {
        for setting in ["missing-audio", "missing-visual"] {
            let pick = |init: bool, f: fn(&NoiseDetection) -> Option<f64>| -> String {
                let v: Vec<f64> = per_seed
                    .iter()
                    .filter_map(|p| {
                        let side = if init { &p.init } else { &p.trained };
                        side.iter().find(|d| d.setting == setting).and_then(f)
                    })
                    .map(|x| 100.0 * x)
                    .collect();
                if v.is_empty() {
                    "-".into()
                } else {
                    format!("{:.1}", v.iter().sum::<f64>() / v.len() as f64)
                }
            };
            let _ = writeln!(
                md,
                "| {id} ({label}) | {setting} | {} | {} | {} | {} | {} |",
                pick(false, NoiseDetection::chance),
                pick(true, NoiseDetection::precision),
                pick(false, NoiseDetection::precision),
                pick(true, NoiseDetection::recall),
                pick(false, NoiseDetection::recall)
            );
        }
    }
    md.push('\n');
    md
}
