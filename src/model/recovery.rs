//! Retrieval-based recovery: the banks CMR searches ([`Banks`]), how it searches them
//! ([`search`]), how the n candidates become H_miss ([`RecoveryHead::combine`]) and the
//! per-sample retrieval statistics the reliability gate and the router see. The paper's
//! plain version (cross-modal key search, mean of Eq. 4, no gate, no router statistics) is
//! [`RecoveryConfig::paper`]; the choices and their measurements are in `docs/DESIGN.md`
//! ("Safe retrieval").

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::config::{Aggregate, RecoveryConfig, RetrievalQuery};
use crate::bank::{MemoryBank, Retrieved};
use crate::data::{Batch, Dataset, Modality};

/// Retrieval statistics per recovered sample fed to the gate: top-1 similarity, mean
/// similarity, top-1 minus n-th similarity, agreement of the n candidates (mean pairwise
/// cosine of their mean-pooled expert tokens; 1 for n = 1).
pub const GATE_STATS: usize = 4;

/// Router statistics per modality: recovered flag, the [`GATE_STATS`] and the gate value
/// (1 without a gate). A present modality's row is all zeros.
pub const ROUTER_STATS: usize = GATE_STATS + 2;

/// Banks searched by the available modality itself, for [`RetrievalQuery::SameKey`] and
/// [`RetrievalQuery::SameFeatures`]. Index = the MISSING modality (0 audio, 1 visual);
/// values are that modality's bank values, keys describe the other (available) modality
/// of the same clips, so a hit's row is also its row in `Banks::get(missing)`.
#[derive(Clone, Debug)]
pub struct SameViewBanks {
    by_key: [MemoryBank; 2],
    by_features: [MemoryBank; 2],
    by_both: [MemoryBank; 2],
    /// Per available modality (0 audio, 1 visual): (mean [F], 1 / std [F]) of the
    /// flattened raw tokens over the bank rows (F = L * D_raw).
    stats: [(Tensor, Tensor); 2],
}

fn mod_index(m: Modality) -> usize {
    match m {
        Modality::Audio => 0,
        Modality::Visual => 1,
    }
}

/// Rows of x [C, F] scaled to unit norm (a zero row stays zero).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-8)?)
}

/// [unit(key); unit(features)]: its cosine is the mean of the two cosines.
fn both(key: &Tensor, feats: &Tensor) -> Result<Tensor> {
    Tensor::cat(
        &[unit_rows(&key.to_dtype(DType::F32)?)?, unit_rows(feats)?],
        1,
    )
}

/// [C, L, D] -> [C, L * D] f32 standardised with (mean, inv_std) [L * D].
fn standardise(raw: &Tensor, stats: &(Tensor, Tensor)) -> Result<Tensor> {
    raw.to_dtype(DType::F32)?
        .flatten_from(1)?
        .broadcast_sub(&stats.0)?
        .broadcast_mul(&stats.1)
}

impl SameViewBanks {
    /// From the training split (the rows of the plain banks, in the same order).
    pub fn from_dataset(train: &Dataset, device: &Device) -> Result<Self> {
        let mut stats = Vec::new();
        let mut feats = Vec::new();
        for raw in [&train.audio, &train.visual] {
            let x = raw.to_dtype(DType::F32)?.flatten_from(1)?; // [C, F]
            let mean = x.mean(0)?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?;
            // Constant features get std 1 (they then contribute 0 after centring).
            let inv = var
                .sqrt()?
                .maximum(1e-6f32)?
                .recip()?
                .mul(&var.ge(1e-12f32)?.to_dtype(DType::F32)?)?
                .add(&var.lt(1e-12f32)?.to_dtype(DType::F32)?)?;
            let st = (mean.to_device(device)?, inv.to_device(device)?);
            feats.push(standardise(&raw.to_device(device)?, &st)?);
            stats.push(st);
        }
        let ids = train.clip_ids.clone();
        let values = [
            train.audio.to_device(device)?,
            train.visual.to_device(device)?,
        ];
        let keys = [
            train.audio_key.to_device(device)?,
            train.visual_key.to_device(device)?,
        ];
        // Missing m is found through the other modality o = 1 - m.
        let by_key = [
            MemoryBank::new(keys[1].clone(), values[0].clone(), ids.clone())?,
            MemoryBank::new(keys[0].clone(), values[1].clone(), ids.clone())?,
        ];
        let by_features = [
            MemoryBank::new(feats[1].clone(), values[0].clone(), ids.clone())?,
            MemoryBank::new(feats[0].clone(), values[1].clone(), ids.clone())?,
        ];
        let by_both = [
            MemoryBank::new(both(&keys[1], &feats[1])?, values[0].clone(), ids.clone())?,
            MemoryBank::new(both(&keys[0], &feats[0])?, values[1].clone(), ids)?,
        ];
        let [sa, sv]: [(Tensor, Tensor); 2] = stats
            .try_into()
            .map_err(|_| candle_core::Error::Msg("SameViewBanks: two modalities".into()))?;
        Ok(Self {
            by_key,
            by_features,
            by_both,
            stats: [sa, sv],
        })
    }

    /// Copies on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |b: &[MemoryBank; 2]| -> Result<[MemoryBank; 2]> {
            Ok([b[0].to_device(device)?, b[1].to_device(device)?])
        };
        let st = |s: &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            Ok((s.0.to_device(device)?, s.1.to_device(device)?))
        };
        Ok(Self {
            by_key: mv(&self.by_key)?,
            by_features: mv(&self.by_features)?,
            by_both: mv(&self.by_both)?,
            stats: [st(&self.stats[0])?, st(&self.stats[1])?],
        })
    }
}

/// A saved model config (JSON object) written before `recovery` existed described the
/// paper's plain retrieval: give it `recovery = paper` explicitly, so that such a
/// checkpoint loads as what it was and `ablate` never reuses it as a safe-retrieval run.
/// A config written before `cap` existed ran the paper's CAP: it gets
/// `cap = CapSettings::paper()`; one written before `cap.max_purge_share` replaced
/// `k_purge` tokens whatever the length: it gets `max_purge_share = 1`; one written before
/// `cap.anchor` scored against H_avl: it gets `anchor = available`.
/// Likewise a `recovery` table written before `complete_ensemble` existed gets
/// `complete_ensemble = false` (complete samples answered from the real pair only).
/// Anything else (including a non-object) is left unchanged.
pub fn upgrade_legacy_config(model: &mut serde_json::Value) {
    if let Some(obj) = model.as_object_mut() {
        if !obj.contains_key("recovery") {
            if let Ok(v) = serde_json::to_value(RecoveryConfig::paper()) {
                obj.insert("recovery".into(), v);
            }
        }
        // Before `cap`: the paper's CAP as first implemented (straight-through gate on).
        if !obj.contains_key("cap") {
            if let Ok(v) = serde_json::to_value(super::config::CapSettings::paper()) {
                obj.insert("cap".into(), v);
            }
        }
        // Before `max_purge_share`: k_purge tokens whatever the length. Before `anchor`:
        // phase 1 scored against H_avl.
        if let Some(cap) = obj.get_mut("cap").and_then(|c| c.as_object_mut()) {
            cap.entry("max_purge_share")
                .or_insert(serde_json::Value::from(1.0));
            cap.entry("anchor")
                .or_insert(serde_json::Value::from("available"));
        }
        if let Some(rec) = obj.get_mut("recovery").and_then(|r| r.as_object_mut()) {
            rec.entry("complete_ensemble")
                .or_insert(serde_json::Value::Bool(false));
        }
    }
}

/// The query of `batch` rows `rows` for recovering missing `m` under `query`, and the
/// bank it is compared with. Never reads the missing modality.
fn query_and_bank<'a>(
    query: RetrievalQuery,
    banks: &'a Banks,
    batch: &Batch,
    m: Modality,
    rows: &[u32],
) -> Result<(Tensor, &'a MemoryBank)> {
    let dev = batch.audio.device();
    let idx = crate::nn::index_tensor(rows, dev)?;
    let avl = m.other();
    let key = match avl {
        Modality::Audio => &batch.audio_key,
        Modality::Visual => &batch.visual_key,
    };
    let (q, bank) = match query {
        RetrievalQuery::CrossKey => (key.index_select(&idx, 0)?, banks.get(m)),
        RetrievalQuery::SameKey => (
            key.index_select(&idx, 0)?,
            &banks.same_view.by_key[mod_index(m)],
        ),
        RetrievalQuery::SameFeatures | RetrievalQuery::SameKeyAndFeatures => {
            let raw = match avl {
                Modality::Audio => &batch.audio,
                Modality::Visual => &batch.visual,
            };
            let st = &banks.same_view.stats[mod_index(avl)];
            let raw = raw.index_select(&idx, 0)?.to_device(st.0.device())?;
            let f = st.0.dim(0)?;
            if raw.elem_count() != rows.len() * f {
                crate::error::bail!(
                    "recovery: the batch's {avl} tokens {:?} do not match the bank's {f} features per clip",
                    raw.dims()
                );
            }
            let feats = standardise(&raw, st)?;
            if query == RetrievalQuery::SameFeatures {
                (feats, &banks.same_view.by_features[mod_index(m)])
            } else {
                let k = key.index_select(&idx, 0)?.to_device(st.0.device())?;
                (both(&k, &feats)?, &banks.same_view.by_both[mod_index(m)])
            }
        }
    };
    Ok((q.to_device(bank.keys().device())?, bank))
}

/// CMR search for batch rows `rows` missing `m`: the n most (or, with `negative`, least)
/// similar bank rows, each sample's own clip excluded. The returned rows index
/// `banks.get(m)` for every query mode. Scores [R, n] f32, indices [R, n] u32.
pub fn search(
    query: RetrievalQuery,
    banks: &Banks,
    batch: &Batch,
    m: Modality,
    rows: &[u32],
    n: usize,
    negative: bool,
) -> Result<Retrieved> {
    let (q, bank) = query_and_bank(query, banks, batch, m, rows)?;
    let excl: Vec<Option<u32>> = rows
        .iter()
        .map(|&r| Some(batch.clip_ids[r as usize]))
        .collect();
    if negative {
        Ok(bank.search_rows_negative(&q, n, Some(&excl))?)
    } else {
        Ok(bank.search_rows(&q, n, Some(&excl))?)
    }
}

/// The learned parts of safe recovery for one missing modality (stage II vars under
/// `recover.{m}`): the softmax temperature and the reliability gate, each only when on.
#[derive(Debug, Clone)]
pub struct RecoveryHead {
    cfg: RecoveryConfig,
    log_tau: Option<Tensor>,
    gate: Option<(Linear, Linear)>,
}

/// What [`RecoveryHead::combine`] returns.
#[derive(Debug, Clone)]
pub struct Combined {
    /// H_miss [R, L, D].
    pub h: Tensor,
    /// The candidates' combination before the reliability gate [R, L, D] (= `h` without
    /// a gate): what the retrieved clips say, token by token.
    pub mixed: Tensor,
    /// Router statistics [R, ROUTER_STATS] f32 (recovered flag first); constants.
    pub router_stats: Tensor,
}

impl RecoveryHead {
    /// Initial softmax temperature: cosine gaps between the top candidates are a few
    /// hundredths, so tau must be of that order for the weights to differ at all.
    pub const TAU_INIT: f64 = 0.1;

    /// Vars `log_tau` (`[1]`, softmax) and `gate.fc1` (GATE_STATS -> 16), `gate.fc2` (16 -> 1)
    /// under `vb`; fc2 starts at zero, so the gate starts at 0.5 for every sample.
    pub fn new(cfg: &RecoveryConfig, vb: VarBuilder) -> Result<Self> {
        let log_tau = (cfg.aggregate == Aggregate::Softmax)
            .then(|| vb.get_with_hints(1, "log_tau", Init::Const(Self::TAU_INIT.ln())))
            .transpose()?;
        let gate = if cfg.gate {
            let g = vb.pp("gate");
            let fc1 = candle_nn::linear(GATE_STATS, 16, g.pp("fc1"))?;
            let w = g
                .pp("fc2")
                .get_with_hints((1, 16), "weight", Init::Const(0.0))?;
            let b = g.pp("fc2").get_with_hints(1, "bias", Init::Const(0.0))?;
            Some((fc1, Linear::new(w, Some(b))))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            log_tau,
            gate,
        })
    }

    /// Per-sample statistics [R, GATE_STATS] of scores [R, n] and candidate tokens
    /// h [R, n, L, D] (detached: they only describe the retrieval).
    pub fn stats(scores: &Tensor, h: &Tensor) -> Result<Tensor> {
        let (r, n) = scores.dims2()?;
        let scores = scores.to_dtype(DType::F32)?;
        let top1 = scores.narrow(1, 0, 1)?;
        let mean = scores.mean_keepdim(1)?;
        let spread = (&top1 - scores.narrow(1, n - 1, 1)?)?;
        let agree = if n == 1 {
            Tensor::ones((r, 1), DType::F32, scores.device())?
        } else {
            let p = h.detach().mean(2)?; // [R, n, D]
            let p = p.broadcast_div(&(p.sqr()?.sum_keepdim(2)?.sqrt()? + 1e-8)?)?;
            let g = p.matmul(&p.transpose(1, 2)?)?; // [R, n, n]
            let off = (g.sum((1, 2))? - p.sqr()?.sum((1, 2))?)?; // all pairs minus the diagonal
            (off / (n * (n - 1)) as f64)?.unsqueeze(1)?
        };
        Tensor::cat(&[top1, mean, spread, agree], 1)
    }

    /// H_miss from candidate tokens h [R, n, L, D] with similarities scores [R, n]:
    /// mean (Eq. 4) or similarity softmax, then the gate towards the null tokens
    /// `null` [L, D] when on.
    pub fn combine(&self, h: &Tensor, scores: &Tensor, null: &Tensor) -> Result<Combined> {
        let (r, n, l, d) = h.dims4()?;
        let scores = scores.to_dtype(DType::F32)?.to_device(h.device())?;
        let stats = Self::stats(&scores, h)?;
        let mixed = match &self.log_tau {
            None => h.mean(1)?,
            Some(lt) => {
                let w = candle_nn::ops::softmax(
                    &scores.broadcast_div(&lt.exp()?.reshape((1, 1))?)?,
                    D::Minus1,
                )?; // [R, n]
                h.broadcast_mul(&w.reshape((r, n, 1, 1))?)?.sum(1)?
            }
        };
        let (h_miss, g) = match &self.gate {
            None => (mixed.clone(), Tensor::ones((r, 1), DType::F32, h.device())?),
            Some((fc1, fc2)) => {
                let g = candle_nn::ops::sigmoid(&fc2.forward(&fc1.forward(&stats)?.gelu()?)?)?; // [R, 1]
                let g3 = g.reshape((r, 1, 1))?;
                let null = null.unsqueeze(0)?.broadcast_as((r, l, d))?;
                let h =
                    (mixed.broadcast_mul(&g3)? + null.broadcast_mul(&g3.affine(-1.0, 1.0)?)?)?;
                (h, g.detach())
            }
        };
        let flag = Tensor::ones((r, 1), DType::F32, h.device())?;
        Ok(Combined {
            h: h_miss,
            mixed,
            router_stats: Tensor::cat(&[flag, stats, g], 1)?,
        })
    }

    /// Whether the router takes the statistics.
    pub fn router_stats(&self) -> bool {
        self.cfg.router_stats
    }
}

/// The two memory banks CMR searches, built from the TRAIN split only.
/// `audio`: keys = audio unified keys [C, Dk], values = raw audio [C, La, Da];
/// `visual`: keys = visual keys [C, Dk], values = raw visual [C, Lv, Dv]; ids = clip ids.
#[derive(Clone, Debug)]
pub struct Banks {
    /// Bank recovering a missing audio modality.
    pub audio: MemoryBank,
    /// Bank recovering a missing visual modality.
    pub visual: MemoryBank,
    /// The same clips keyed by the other (available) modality, for same-view search.
    pub(crate) same_view: SameViewBanks,
}

impl Banks {
    /// Both banks from one (training) split, on `device`.
    pub fn from_dataset(train: &Dataset, device: &Device) -> Result<Self> {
        let audio = MemoryBank::new(
            train.audio_key.to_device(device)?,
            train.audio.to_device(device)?,
            train.clip_ids.clone(),
        )?;
        let visual = MemoryBank::new(
            train.visual_key.to_device(device)?,
            train.visual.to_device(device)?,
            train.clip_ids.clone(),
        )?;
        let same_view = SameViewBanks::from_dataset(train, device)?;
        Ok(Self {
            audio,
            visual,
            same_view,
        })
    }

    /// The bank holding modality `m`.
    pub fn get(&self, m: Modality) -> &MemoryBank {
        match m {
            Modality::Audio => &self.audio,
            Modality::Visual => &self.visual,
        }
    }

    /// Copies of both banks on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            audio: self.audio.to_device(device)?,
            visual: self.visual.to_device(device)?,
            same_view: self.same_view.to_device(device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn upgraded(mut v: serde_json::Value) -> ModelConfig {
        upgrade_legacy_config(&mut v);
        serde_json::from_value(v).expect("model config")
    }

    #[test]
    fn legacy_configs_read_as_what_they_ran() {
        let current = serde_json::to_value(ModelConfig::default()).unwrap();
        assert_eq!(upgraded(current.clone()), ModelConfig::default());
        // Before `recovery`: the paper's plain retrieval.
        let mut v = current.clone();
        v.as_object_mut().unwrap().remove("recovery");
        assert_eq!(upgraded(v).recovery, RecoveryConfig::paper());
        // Before `cap`: the paper's CAP (straight-through gate on), as it ran.
        let mut v = current.clone();
        v.as_object_mut().unwrap().remove("cap");
        assert_eq!(upgraded(v).cap, crate::model::CapSettings::paper());
        // Before `anchor`: scored against H_avl, the rest as written.
        let mut v = current.clone();
        v["cap"].as_object_mut().unwrap().remove("anchor");
        assert_eq!(
            upgraded(v).cap,
            crate::model::CapSettings {
                anchor: crate::model::CapAnchor::Available,
                ..crate::model::CapSettings::default()
            }
        );
        // Before `complete_ensemble`: the real pair only, the rest as written.
        let mut v = current;
        v["recovery"]
            .as_object_mut()
            .unwrap()
            .remove("complete_ensemble");
        let r = upgraded(v).recovery;
        assert!(!r.complete_ensemble);
        assert_eq!(
            r,
            RecoveryConfig {
                complete_ensemble: false,
                ..RecoveryConfig::default()
            }
        );
    }
}
