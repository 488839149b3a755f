//! Evaluation per missing setting and per question type, and the paper's Table 1 layout.

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::loss::{argmax_rows, cross_entropy_per_sample};
use crate::data::{batches, Dataset, MissingPolicy, Modality, QuestionType};
use crate::model::{Banks, R2scp};

/// How predictions are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Predictor {
    /// The full model: experts, CMR/CAP, router and decoder ([`R2scp::forward`]).
    Full,
    /// Average of the stage-I expert heads' probabilities over the experts that can run
    /// (text-fused always, audio/visual when present): Table 3 "w/o stage II".
    Experts,
}

/// Accuracy of one evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Setting name: `missing-audio`, `missing-visual`, `complete` or `sim-...`.
    pub setting: String,
    /// Questions evaluated.
    pub n: usize,
    /// Correct answers.
    pub correct: usize,
    /// (correct, total) per question type, indexed by [`QuestionType::index`].
    pub per_type: [(usize, usize); 9],
    /// Mean task loss.
    pub loss: f64,
    /// Mean router weights (audio, visual, text); zeros for [`Predictor::Experts`].
    pub router: [f64; 3],
}

impl EvalResult {
    /// Overall accuracy in [0, 1] (0 for an empty set).
    pub fn acc(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }

    /// Accuracy of question type `t`, `None` when the set has no such question.
    pub fn type_acc(&self, t: QuestionType) -> Option<f64> {
        let (c, n) = self.per_type[t.index()];
        (n > 0).then(|| c as f64 / n as f64)
    }
}

/// Table-1 setting label.
pub fn setting_label(p: &MissingPolicy) -> String {
    match p {
        MissingPolicy::All(Modality::Audio) => "missing audio (A○ V● Q●)".into(),
        MissingPolicy::All(Modality::Visual) => "missing visual (A● V○ Q●)".into(),
        MissingPolicy::Complete => "complete (A● V● Q●)".into(),
        other => other.name(),
    }
}

fn softmax_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)
}

/// Evaluate `model` on every question of `ds` with missing modalities from `policy`.
pub fn evaluate(
    model: &R2scp,
    ds: &Dataset,
    banks: &Banks,
    policy: MissingPolicy,
    batch_size: usize,
    predictor: Predictor,
    device: &Device,
) -> Result<EvalResult> {
    let mut r = EvalResult {
        setting: policy.name(),
        n: 0,
        correct: 0,
        per_type: [(0, 0); 9],
        loss: 0.0,
        router: [0.0; 3],
    };
    let mut loss_sum = 0f64;
    for batch in batches(ds, batch_size, None, policy, device) {
        let batch = batch?;
        let (logits, router) = match predictor {
            Predictor::Full => {
                let out = model.forward(&batch, banks, false)?;
                (out.logits, Some(out.router_weights))
            }
            Predictor::Experts => {
                let el = model.expert_logits(&batch, false)?;
                let pa = el.audio_present.unsqueeze(1)?;
                let pv = el.visual_present.unsqueeze(1)?;
                let sum = ((softmax_rows(&el.text)?
                    + softmax_rows(&el.audio)?.broadcast_mul(&pa)?)?
                    + softmax_rows(&el.visual)?.broadcast_mul(&pv)?)?;
                let cnt = ((pa + pv)? + 1.0)?;
                let probs = sum.broadcast_div(&cnt)?;
                (probs.clamp(1e-12, 1.0)?.log()?, None)
            }
        };
        let ce = cross_entropy_per_sample(&logits, &batch.answer)?;
        loss_sum += ce.sum_all()?.to_scalar::<f32>()? as f64;
        let pred = argmax_rows(&logits)?;
        let ans = batch.answer.to_vec1::<u32>()?;
        for ((p, a), t) in pred.iter().zip(&ans).zip(&batch.qtypes) {
            let ok = p == a;
            r.n += 1;
            r.correct += ok as usize;
            let e = &mut r.per_type[t.index()];
            e.0 += ok as usize;
            e.1 += 1;
        }
        if let Some(w) = router {
            let s = w.sum(0)?.to_vec1::<f32>()?;
            for (acc, v) in r.router.iter_mut().zip(s) {
                *acc += v as f64;
            }
        }
    }
    if r.n > 0 {
        r.loss = loss_sum / r.n as f64;
        for v in r.router.iter_mut() {
            *v /= r.n as f64;
        }
    }
    Ok(r)
}

/// Evaluate the three Table-1 settings (missing audio, missing visual, complete).
pub fn evaluate_table(
    model: &R2scp,
    ds: &Dataset,
    banks: &Banks,
    batch_size: usize,
    predictor: Predictor,
    device: &Device,
) -> Result<Vec<EvalResult>> {
    MissingPolicy::EVAL_SETTINGS
        .iter()
        .map(|p| evaluate(model, ds, banks, *p, batch_size, predictor, device))
        .collect()
}

/// Mean over the missing-audio and missing-visual settings (Table 3's metric); `None`
/// unless both are present.
pub fn missing_avg(rows: &[EvalResult]) -> Option<f64> {
    let a = rows.iter().find(|r| r.setting == "missing-audio")?;
    let v = rows.iter().find(|r| r.setting == "missing-visual")?;
    Some((a.acc() + v.acc()) / 2.0)
}

/// Mean overall accuracy over all rows (Table 1's "Average" row).
pub fn mean_acc(rows: &[EvalResult]) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter().map(EvalResult::acc).sum::<f64>() / rows.len() as f64
}

/// Markdown table in the paper's Table 1 layout: one row per setting plus "Average", a
/// column per question type (only types present in the data) and "Overall" (accuracy in %).
pub fn format_table1(rows: &[EvalResult]) -> String {
    let types: Vec<QuestionType> = QuestionType::ALL
        .iter()
        .copied()
        .filter(|t| rows.iter().any(|r| r.per_type[t.index()].1 > 0))
        .collect();
    let mut s = String::from("| Setting |");
    for t in &types {
        s.push_str(&format!(" {} |", t.as_str()));
    }
    s.push_str(" Overall |\n|---|");
    for _ in &types {
        s.push_str("---:|");
    }
    s.push_str("---:|\n");
    let label = |name: &str| -> String {
        match name {
            "missing-audio" => setting_label(&MissingPolicy::All(Modality::Audio)),
            "missing-visual" => setting_label(&MissingPolicy::All(Modality::Visual)),
            "complete" => setting_label(&MissingPolicy::Complete),
            o => o.to_string(),
        }
    };
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.2}", 100.0 * x));
    for r in rows {
        s.push_str(&format!("| {} |", label(&r.setting)));
        for t in &types {
            s.push_str(&format!(" {} |", pct(r.type_acc(*t))));
        }
        s.push_str(&format!(" {} |\n", pct(Some(r.acc()))));
    }
    if rows.len() > 1 {
        s.push_str("| Average |");
        for t in &types {
            let v: Vec<f64> = rows.iter().filter_map(|r| r.type_acc(*t)).collect();
            let m = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            s.push_str(&format!(" {} |", pct(m)));
        }
        s.push_str(&format!(" {} |\n", pct(Some(mean_acc(rows)))));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        let mut a = EvalResult {
            setting: "missing-audio".into(),
            n: 4,
            correct: 2,
            per_type: [(0, 0); 9],
            loss: 0.0,
            router: [0.0; 3],
        };
        a.per_type[QuestionType::AudioCounting.index()] = (1, 2);
        a.per_type[QuestionType::AvTemporal.index()] = (1, 2);
        let mut c = a.clone();
        c.setting = "complete".into();
        c.correct = 4;
        c.per_type[QuestionType::AudioCounting.index()] = (2, 2);
        c.per_type[QuestionType::AvTemporal.index()] = (2, 2);
        let t = format_table1(&[a, c]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].contains("A-Count") && lines[0].contains("AV-Temp"));
        assert!(!lines[0].contains("V-Loc"));
        assert!(lines[2].contains("50.00"));
        assert!(lines[4].starts_with("| Average") && lines[4].contains("75.00"));
    }
}
