//! Two processes on one run directory (issue 19, case 2): two `train` with the same
//! `--name`, two `ablate` with the same `--out`. One wins; the other exits 1 at once with
//! one error line, and nothing in the winner's directory is touched: the winner's files are
//! those of the same run made alone.
//!
//! Before the run directory was locked, both trainers exited 0 with one `metrics.jsonl`
//! holding both seeds' lines while `config.toml` and `report.md` named one of them.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = r#"
batch_size = 16
eval_batch_size = 64
log_every = 2
[stage1]
epochs = 2
[stage2]
epochs = 2
patience = 0
[synthetic]
n_train_clips = 40
n_val_clips = 8
n_test_clips = 8
n_prototypes = 8
[model]
dim = 16
heads = 2
expert_layers = 1
"#;

/// `r2scp args` in `dir`, one thread; each checkpoint write held back `delay_ms` so that
/// the first process is still running when the second starts.
fn spawn(dir: &Path, args: &[&str], delay_ms: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_r2scp"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .env("R2SCP_TEST_COMMIT_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run r2scp")
}

/// Waits until `p` exists (the first process has started writing), at most 60 s.
fn wait_for(p: &Path, first: &mut Child) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first process ended before writing {}",
            p.display()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The second process: must fail with exit 1 and one `error:` line saying the directory
/// is in use, while the first still runs. Returns its run time.
fn loser(second: Child, first: &mut Child, option: &str) -> Duration {
    let t0 = Instant::now();
    let out: Output = second.wait_with_output().unwrap();
    let secs = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(1), "the second process: {err}");
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("in use") && lines[0].contains(option),
        "{err}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first process finished before the second failed: not a race"
    );
    secs
}

fn winner(first: Child) {
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the first process: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lines of a metrics file without their wall-clock fields.
fn metrics(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("secs");
            o.remove("samples_per_s");
            v
        })
        .collect()
}

fn state(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn two_trainers_on_one_run_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("c.toml"), TINY).unwrap();
    let train = |name: &str, seed: &str| {
        [
            "train",
            "--config",
            "c.toml",
            "--name",
            name,
            "--seed",
            seed,
            "--quiet",
            "--threads",
            "1",
        ]
        .map(String::from)
    };
    let a = train("same", "1");
    let mut first = spawn(d, &a.each_ref().map(String::as_str), 150);
    wait_for(&d.join("runs/same/config.toml"), &mut first);
    let b = train("same", "2");
    let second = spawn(d, &b.each_ref().map(String::as_str), 0);
    let secs = loser(second, &mut first, "--name");
    winner(first);
    println!("second trainer refused after {secs:?}");
    assert!(secs < Duration::from_secs(5), "not at once: {secs:?}");

    // The same run, alone.
    let r = train("alone", "1");
    let out = spawn(d, &r.each_ref().map(String::as_str), 0)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    let (won, alone) = (d.join("runs/same"), d.join("runs/alone"));
    assert_eq!(
        metrics(&won.join("metrics.jsonl")),
        metrics(&alone.join("metrics.jsonl"))
    );
    let (sw, sa) = (
        state(&won.join("checkpoint/state.json")),
        state(&alone.join("checkpoint/state.json")),
    );
    assert_eq!(sw["config"], sa["config"]);
    assert_eq!(sw["test"], sa["test"]);
    assert_eq!(sw["config"]["seed"], 1);
    assert_eq!(
        std::fs::read_to_string(won.join("config.toml")).unwrap(),
        std::fs::read_to_string(alone.join("config.toml")).unwrap()
    );
}

#[test]
fn two_ablates_on_one_out() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("c.toml"), TINY.replace("epochs = 2", "epochs = 1")).unwrap();
    let ablate = |seed: &str| {
        [
            "ablate",
            "--config",
            "c.toml",
            "--only",
            "strategy",
            "--out",
            "abl",
            "--seed",
            seed,
            "--quiet",
            "--threads",
            "1",
        ]
        .map(String::from)
    };
    let a = ablate("0");
    let mut first = spawn(d, &a.each_ref().map(String::as_str), 100);
    wait_for(&d.join("abl/seed0"), &mut first);
    let b = ablate("7");
    let second = spawn(d, &b.each_ref().map(String::as_str), 0);
    let secs = loser(second, &mut first, "--out");
    winner(first);
    println!("second ablate refused after {secs:?}");
    assert!(secs < Duration::from_secs(5), "not at once: {secs:?}");

    let out = d.join("abl");
    assert!(
        !out.join("seed7").exists(),
        "the second ablate wrote its seed"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 4, "{results:?}");
    for r in results {
        assert_eq!(r["seed"], 0);
        let v = r["id"].as_str().unwrap();
        let st = state(&out.join(format!("seed0/{v}/checkpoint/state.json")));
        assert_eq!(st["config"]["seed"], 0, "{v}");
        assert_eq!(st["test"], r["test"], "{v}");
        let toml = std::fs::read_to_string(out.join(format!("seed0/{v}/config.toml"))).unwrap();
        assert!(toml.starts_with("seed = 0\n"), "{v}: {toml}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Seeds: [0]"), "{report}");
}
