//! Retrieval quality: how often the top-1 clip CMR retrieves for a test question shares
//! the question's answer, per missing setting.
//!
//! "Shares the answer" is read off the annotations, with no model involved: the top-1
//! bank clip (a training clip) counts when it was asked the identical question (same
//! token ids) and its answer there equals the query's. Queries whose top-1 clip was
//! never asked that question are not counted (`coverage` says how many were). The
//! search is the one the model makes ([`crate::model::recovery::search`]); it does not
//! depend on trained weights.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{ensure, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::{batches, Dataset, MissingPolicy, Modality, Splits};
use crate::model::recovery::search;
use crate::model::{Banks, RetrievalQuery};

/// Top-1 answer agreement of one missing setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalQuality {
    /// `missing-audio` or `missing-visual`.
    pub setting: String,
    /// Test questions searched for.
    pub queries: usize,
    /// Of those, questions whose top-1 clip was asked the same question.
    pub covered: usize,
    /// Of the covered, questions whose top-1 clip has the same answer.
    pub agree: usize,
}

impl RetrievalQuality {
    /// `agree / covered` in [0, 1]; `None` when nothing was covered.
    pub fn agreement(&self) -> Option<f64> {
        (self.covered > 0).then(|| self.agree as f64 / self.covered as f64)
    }

    /// `covered / queries` in [0, 1] (0 for no queries).
    pub fn coverage(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.covered as f64 / self.queries as f64
        }
    }
}

/// Answer of each (train clip row, question token ids) pair; the first occurrence wins.
fn answer_index(train: &Dataset) -> Result<HashMap<(u32, Vec<u32>), u32>> {
    let lq = train.questions.dim(1)?;
    let q = train.questions.flatten_all()?.to_vec1::<u32>()?;
    let mut idx = HashMap::with_capacity(train.len());
    for i in 0..train.len() {
        let toks = q[i * lq..(i + 1) * lq].to_vec();
        idx.entry((train.clip_of[i] as u32, toks))
            .or_insert(train.answers[i]);
    }
    Ok(idx)
}

/// Top-1 answer agreement on the test split for missing audio and missing visual,
/// searching with `query` (the model's `recovery.query`). The banks must be built from
/// `splits.train` (bank row = train clip row, checked through the clip ids).
pub fn measure(
    splits: &Splits,
    banks: &Banks,
    query: RetrievalQuery,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<RetrievalQuality>> {
    let train = &splits.train;
    for m in Modality::ALL {
        ensure!(
            banks.get(m).ids() == train.clip_ids.as_slice(),
            "retrieval quality: the {m} bank is not built from this train split"
        );
    }
    let answers = answer_index(train)?;
    let test = &splits.test;
    let lq = test.questions.dim(1)?;
    let qtok = test.questions.flatten_all()?.to_vec1::<u32>()?;
    let mut out = Vec::new();
    for m in Modality::ALL {
        let policy = MissingPolicy::All(m);
        let mut r = RetrievalQuality {
            setting: policy.name(),
            queries: 0,
            covered: 0,
            agree: 0,
        };
        for batch in batches(test, batch_size, None, policy, device) {
            let batch = batch?;
            let rows: Vec<u32> = (0..batch.len() as u32).collect();
            let ret = search(query, banks, &batch, m, &rows, 1, false)?;
            let top = ret.indices.flatten_all()?.to_vec1::<u32>()?;
            for (b, &clip) in top.iter().enumerate() {
                let qi = batch.rows[b];
                let toks = qtok[qi * lq..(qi + 1) * lq].to_vec();
                r.queries += 1;
                if let Some(&a) = answers.get(&(clip, toks)) {
                    r.covered += 1;
                    r.agree += (a == test.answers[qi]) as usize;
                }
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// Markdown section for `ablate`'s report: per variant with retrieval and per missing
/// setting, the mean ± std over seeds of the top-1 answer agreement (and its coverage).
/// `rows` holds (variant id, query mode, one `measure` result per seed).
pub fn report_section(rows: &[(String, RetrievalQuery, Vec<Vec<RetrievalQuality>>)]) -> String {
    let mut md = String::new();
    if rows.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "### Retrieval quality\n\nHow often the top-1 retrieved training clip was asked the same question \
         with the same answer (test questions, % mean ± std over seeds); in brackets the share of \
         questions whose top-1 clip was asked that question at all.\n\n\
         | variant | search | missing audio | missing visual |\n|---|---|---:|---:|"
    );
    for (id, query, per_seed) in rows {
        let cell = |setting: &str| -> String {
            let found: Vec<&RetrievalQuality> = per_seed
                .iter()
                .filter_map(|s| s.iter().find(|q| q.setting == setting))
                .collect();
            let agr: Vec<f64> = found
                .iter()
                .filter_map(|q| q.agreement())
                .map(|x| 100.0 * x)
                .collect();
            if agr.is_empty() {
                return "-".into();
            }
            let mean = agr.iter().sum::<f64>() / agr.len() as f64;
            let sd = if agr.len() > 1 {
                (agr.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (agr.len() - 1) as f64)
                    .sqrt()
            } else {
                0.0
            };
            let cov = 100.0 * found.iter().map(|q| q.coverage()).sum::<f64>() / found.len() as f64;
            format!("{mean:.2} ± {sd:.2} ({cov:.0}%)")
        };
        let _ = writeln!(
            md,
            "| {id} | {} | {} | {} |",
            query_name(*query),
            cell("missing-audio"),
            cell("missing-visual")
        );
    }
    md.push('\n');
    md
}

/// Short name of a query mode (as in the config file).
pub fn query_name(q: RetrievalQuery) -> &'static str {
    match q {
        RetrievalQuery::CrossKey => "cross_key",
        RetrievalQuery::SameKey => "same_key",
        RetrievalQuery::SameFeatures => "same_features",
        RetrievalQuery::SameKeyAndFeatures => "same_key_and_features",
    }
}
