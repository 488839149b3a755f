//! `report.md`, `results.json` and the PNG plots of a run, built from `metrics.jsonl` and
//! the checkpoint state.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::checkpoint::{atomic_write, write_json};
use super::eval::{format_table1, mean_acc, missing_avg};
use super::metrics::{read_metrics, Record};
use super::plot::{Figures, Labels, Series, NOT_DRAWN};
use super::stage::Stage;
use super::state::TrainState;

/// Write `results.json`, `report.md` and `plots/{loss,accuracy,router}.png` into `run_dir`
/// (the plots with the `cli` feature only; without it the report says they were not drawn).
pub fn write_run_report(run_dir: &Path, state: &TrainState) -> Result<()> {
    let metrics = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let plots = plot_run(&Figures::new(run_dir)?, &metrics)?;
    let test = state.test.clone().unwrap_or_default();
    write_json(
        &run_dir.join("results.json"),
        &serde_json::json!({
            "test": test,
            "test_average": mean_acc(&test),
            "test_missing_average": missing_avg(&test),
            "best_val": state.best_val,
            "secs": metrics.iter().filter_map(|r| r.secs).fold(0.0, f64::max),
        }),
    )?;
    let c = &state.config;
    let mut md = String::new();
    let _ = writeln!(md, "# r2scp run `{}`\n", run_dir.display());
    let _ = writeln!(
        md,
        "Data: {}. Seed {}. Model: dim {}, n = {}, k = {}, retrieval {}, CAP {}.",
        c.data
            .as_ref()
            .map_or("built-in synthetic set".to_string(), |d| d
                .display()
                .to_string()),
        c.seed,
        c.model.dim,
        c.model.n_retrieved,
        c.model.k_purge,
        on_off(c.model.use_retrieval),
        on_off(c.model.use_cap)
    );
    let _ = writeln!(
        md,
        "Training: stage I {} ({} epochs, lr {}), stage II {} ({} epochs, lr {}, patience {}), \
         ranking loss {} (lambda {}, margin {}), missing rate {} ({}), batch {}.\n",
        on_off(c.stage1_enabled),
        c.stage1.epochs,
        c.stage1.lr,
        on_off(c.stage2_enabled),
        c.stage2.epochs,
        c.stage2.lr,
        c.stage2.patience,
        on_off(c.rank_loss),
        c.lambda_rank,
        c.margin,
        c.missing_rate,
        c.missing_type,
        c.batch_size
    );
    if test.is_empty() {
        let _ = writeln!(md, "Training has not finished; no test results yet.\n");
    } else {
        let _ = writeln!(md, "## Test accuracy (%), Table 1 layout\n");
        md.push_str(&format_table1(&test));
        if let Some(m) = missing_avg(&test) {
            let _ = writeln!(
                md,
                "\nMean of the two missing settings (Table 3 metric): {:.2}%.",
                100.0 * m
            );
        }
        if let Some(b) = state.best_val {
            let _ = writeln!(
                md,
                "Best validation accuracy (epoch {}): {:.2}%.",
                state.best_epoch,
                100.0 * b
            );
        }
        md.push('\n');
    }
    md.push_str("## Plots\n\n");
    match plots {
        Some(links) => {
            for link in links {
                let _ = write!(md, "{link}\n\n");
            }
            md.push_str(
                "Router weights: mean expert weights alpha (Eq. 11) of the training batches \
                 during stage II (the paper's Figure 6).\n",
            );
        }
        None => {
            let _ = writeln!(md, "{NOT_DRAWN}");
        }
    }
    atomic_write(&run_dir.join("report.md"), md.as_bytes())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Global x of a record: stage I steps, then stage II steps after the last stage-I step.
fn global_steps(metrics: &[Record]) -> Vec<f64> {
    let s1_end = metrics
        .iter()
        .filter(|r| r.stage == Some(Stage::Experts))
        .map(|r| r.step)
        .max()
        .unwrap_or(0) as f64;
    metrics
        .iter()
        .map(|r| {
            if r.stage == Some(Stage::Mixing) {
                s1_end + r.step as f64
            } else {
                r.step as f64
            }
        })
        .collect()
}

/// Draws `loss`, `accuracy` and `router`; their markdown links in that order, or `None`
/// when the build does not draw.
fn plot_run(figures: &Figures, metrics: &[Record]) -> Result<Option<Vec<String>>> {
    let xs = global_steps(metrics);
    let pick =
        |f: &dyn Fn(&Record) -> Option<f64>, kind: &str, stage: Stage, setting: Option<&str>| {
            metrics
                .iter()
                .zip(&xs)
                .filter(|(r, _)| {
                    r.kind == kind
                        && r.stage == Some(stage)
                        && setting.is_none_or(|s| r.setting.as_deref() == Some(s))
                })
                .filter_map(|(r, x)| f(r).map(|y| (*x, y)))
                .collect::<Vec<_>>()
        };
    let loss = |r: &Record| r.loss;
    let acc = |r: &Record| r.acc.map(|a| 100.0 * a);
    let loss_link = figures.line_plot(
        "loss",
        Labels {
            title: "Training loss",
            x: "update",
            y: "loss",
        },
        &[
            Series::new(
                "stage I (sum of 3 expert losses)",
                pick(&loss, "train", Stage::Experts, None),
            ),
            Series::new(
                "stage II (task + lambda rank)",
                pick(&loss, "train", Stage::Mixing, None),
            ),
        ],
    )?;
    let mut acc_series = vec![
        Series::new(
            "train stage I (text expert)",
            pick(&acc, "train", Stage::Experts, None),
        ),
        Series::new("train stage II", pick(&acc, "train", Stage::Mixing, None)),
        Series::new(
            "val stage I (mean of experts)",
            pick(&acc, "val", Stage::Experts, None),
        ),
    ];
    for s in ["missing-audio", "missing-visual", "complete"] {
        acc_series.push(Series::new(
            format!("val {s}"),
            pick(&acc, "val", Stage::Mixing, Some(s)),
        ));
    }
    let accuracy_link = figures.line_plot(
        "accuracy",
        Labels {
            title: "Accuracy",
            x: "update",
            y: "accuracy (%)",
        },
        &acc_series,
    )?;
    let router = |i: usize| {
        metrics
            .iter()
            .filter(|r| r.kind == "train" && r.stage == Some(Stage::Mixing))
            .filter_map(|r| r.router.map(|w| (r.step as f64, w[i])))
            .collect::<Vec<_>>()
    };
    let router_link = figures.line_plot(
        "router",
        Labels {
            title: "Expert loads during stage II (router weights)",
            x: "stage II update",
            y: "mean weight",
        },
        &[
            Series::new("audio expert", router(0)),
            Series::new("visual expert", router(1)),
            Series::new("text expert", router(2)),
        ],
    )?;
    Ok([loss_link, accuracy_link, router_link]
        .into_iter()
        .collect())
}
