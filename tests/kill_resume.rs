//! Crash test: `r2scp train` killed with SIGKILL ten times in a row, at random moments and
//! in the middle of checkpoint writes, then resumed with `--resume`, ends with the same test
//! results, metrics lines and final weights as an uninterrupted run.
//!
//! Each process is let commit 0 or 1 new checkpoints (a fixed pattern that sums to 5 of the
//! run's 12 epochs, so the kills spread over both stages and the run cannot finish first,
//! on a fast or a loaded machine alike). Then even kills come at a random moment within the
//! next epoch (epoch length estimated from the uninterrupted run), odd kills when the k-th
//! new temporary checkpoint file (k in 1..=3) appears: `R2SCP_TEST_COMMIT_DELAY_MS` holds
//! each finished temporary file 30 ms before its rename, so those kills land between write
//! and commit.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use r2scp::trainer::checkpoint::{is_temp_name, load_tensors};
use r2scp::trainer::metrics::{read_metrics, Record};
use r2scp::trainer::state::read_state;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONFIG: &str = r#"seed = 11
batch_size = 16
eval_batch_size = 64
log_every = 2
[stage1]
epochs = 5
[stage2]
epochs = 7
patience = 0
[synthetic]
n_train_clips = 48
n_val_clips = 8
n_test_clips = 8
n_prototypes = 8
[model]
dim = 16
heads = 2
expert_layers = 1
"#;

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2scp"));
    c.args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn fresh_args(name: &str) -> Vec<String> {
    [
        "train",
        "--config",
        "c.toml",
        "--name",
        name,
        "--quiet",
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

fn resume_args(name: &str) -> Vec<String> {
    [
        "train",
        "--resume",
        "--name",
        name,
        "--quiet",
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

fn temp_files(ckpt: &Path) -> Vec<String> {
    fs::read_dir(ckpt)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_temp_name(n))
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until `child` exits or `deadline`; true when it exited.
fn exited_by(child: &mut Child, deadline: Instant) -> bool {
    loop {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait for the `k`-th temporary file in `ckpt` not in `stale`, or the child's exit; true
/// when the file appeared.
fn temp_file_seen(
    child: &mut Child,
    ckpt: &Path,
    stale: &[String],
    k: usize,
    limit: Instant,
) -> bool {
    let mut seen: Vec<String> = Vec::new();
    loop {
        for n in temp_files(ckpt) {
            if !seen.contains(&n) && !stale.contains(&n) {
                seen.push(n);
            }
        }
        if seen.len() >= k {
            return true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// (stage, epoch) of the last committed checkpoint, if any.
fn progress(ckpt: &Path) -> Option<(u8, usize)> {
    read_state(&ckpt.join("state.json"))
        .ok()
        .map(|s| (s.stage.number(), s.epoch))
}

fn det(path: &Path) -> Vec<Record> {
    read_metrics(path)
        .unwrap()
        .iter()
        .map(Record::deterministic)
        .collect()
}

#[test]
fn ten_sigkills_then_resume_match_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("c.toml"), CONFIG).unwrap();
    let t0 = Instant::now();
    let out = command(
        d,
        &fresh_args("ref")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ref_secs = t0.elapsed().as_secs_f64();

    let run = d.join("runs/killed");
    let ckpt = run.join("checkpoint");
    let epoch_secs = ref_secs / 12.0;
    let commits_before_kill = [0, 1, 0, 1, 1, 0, 1, 0, 1, 0];
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (mut mid_write, mut restarts_from_config) = (0, 0);
    let mut killed_at = Vec::new();
    let started = Instant::now();
    for (kill, &commits) in commits_before_kill.iter().enumerate() {
        let has_config = run.join("config.toml").is_file();
        if has_config && !ckpt.join("state.json").is_file() {
            restarts_from_config += 1;
        }
        // left by the previous kill; the resumed process deletes them
        let stale = temp_files(&ckpt);
        let args = if has_config {
            resume_args("killed")
        } else {
            fresh_args("killed")
        };
        let mut child = command(d, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .env("R2SCP_TEST_COMMIT_DELAY_MS", "30")
            .spawn()
            .unwrap();
        let limit = Instant::now() + Duration::from_secs_f64(ref_secs * 3.0 + 5.0);
        let mut exited = false;
        let mut at = progress(&ckpt);
        let mut seen = 0;
        while seen < commits && !exited {
            let now = progress(&ckpt);
            if now != at {
                seen += 1;
                at = now;
            }
            exited = child.try_wait().unwrap().is_some() || Instant::now() >= limit;
            std::thread::sleep(Duration::from_millis(1));
        }
        if !exited {
            exited = if kill % 2 == 1 {
                let k = rng.random_range(1..=3);
                !temp_file_seen(&mut child, &ckpt, &stale, k, limit)
            } else {
                let wait = rng.random_range(0.0..epoch_secs);
                exited_by(&mut child, Instant::now() + Duration::from_secs_f64(wait))
            };
        }
        if exited {
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
            }
            let out = child.wait_with_output().unwrap();
            panic!(
                "kill {kill}: the run exited ({:?}) before it was killed: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let during_write = temp_files(&ckpt).iter().any(|n| !stale.contains(n));
        mid_write += during_write as usize;
        killed_at.push(format!(
            "{}{}",
            progress(&ckpt).map_or("before any checkpoint".to_string(), |(s, e)| format!(
                "after s{s}e{e}"
            )),
            if during_write { " (mid-write)" } else { "" }
        ));
    }
    let out = command(
        d,
        &resume_args("killed")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "final resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let killed_secs = started.elapsed().as_secs_f64();
    println!(
        "uninterrupted run {ref_secs:.2} s; 10 kills and the final resume {killed_secs:.2} s \
         ({mid_write} kills mid-write, {restarts_from_config} restarts from config.toml); \
         kills: {}",
        killed_at.join(", ")
    );
    assert!(
        mid_write >= 3,
        "only {mid_write} kills landed during a checkpoint write"
    );
    assert!(
        killed_at.iter().any(|k| k.contains("after s2")),
        "no kill landed in stage II: {killed_at:?}"
    );
    assert!(
        temp_files(&ckpt).is_empty(),
        "temporary files left: {:?}",
        temp_files(&ckpt)
    );

    let reference = d.join("runs/ref");
    let sa = read_state(&reference.join("checkpoint/state.json")).unwrap();
    let sb = read_state(&ckpt.join("state.json")).unwrap();
    assert!(sa.finished && sb.finished);
    assert_eq!(sa.test, sb.test, "final test results differ");
    assert_eq!(sa.best_val, sb.best_val);
    assert_eq!(
        det(&reference.join("metrics.jsonl")),
        det(&run.join("metrics.jsonl")),
        "metrics.jsonl differs"
    );
    let wa = load_tensors(
        &reference.join("checkpoint").join(&sa.model_file),
        &Device::Cpu,
    )
    .unwrap();
    let wb = load_tensors(&ckpt.join(&sb.model_file), &Device::Cpu).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, a) in &wa {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = wb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "weights of {k} differ"
        );
    }
}

/// Issue 19, case 2: a run directory belongs to one process at a time. While a run is
/// alive, `--resume` of it (and a fresh run of its name) fails at once with one line; once
/// it is SIGKILLed the kernel drops its lock, and `--resume` continues it.
#[test]
fn a_live_run_is_locked_and_a_killed_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("c.toml"), CONFIG).unwrap();
    let fresh = fresh_args("held");
    let mut first = command(d, &fresh.iter().map(String::as_str).collect::<Vec<_>>())
        .env("R2SCP_TEST_COMMIT_DELAY_MS", "200")
        .spawn()
        .unwrap();
    let ckpt = d.join("runs/held/checkpoint");
    let t0 = Instant::now();
    while progress(&ckpt).is_none() {
        assert!(first.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    for args in [resume_args("held"), fresh_args("held")] {
        let t = Instant::now();
        let out = command(d, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains("in use"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "not at once");
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the run ended during the test"
    );
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let out = command(
        d,
        &resume_args("held")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "resume after SIGKILL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read_state(&ckpt.join("state.json")).unwrap().finished);
}

/// A run written before run directories were marked and checkpoints recorded their data
/// (as r2scp at 21834ae wrote it): `eval` works with one warning line, `--force` does not
/// delete it, `--resume` marks it with one note and records the data from then on.
#[test]
fn a_run_from_before_markers_and_fingerprints_still_evaluates_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("c.toml"), CONFIG).unwrap();
    let run = d.join("runs/old");
    let mut child = command(
        d,
        &fresh_args("old")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .spawn()
    .unwrap();
    // Let it commit a stage-II checkpoint, then stop it (as an interrupted old run).
    let t0 = Instant::now();
    while !matches!(progress(&run.join("checkpoint")), Some((2, _))) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Make it look like 21834ae wrote it: no marker, no data record.
    fs::remove_file(run.join(".r2scp-run")).unwrap();
    let sp = run.join("checkpoint/state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&sp).unwrap()).unwrap();
    st.as_object_mut().unwrap().remove("data");
    fs::write(&sp, serde_json::to_string_pretty(&st).unwrap()).unwrap();

    let out = command(d, &["eval", "--checkpoint", "runs/old"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: ") && err.contains("older r2scp"),
        "{err}"
    );

    let mut forced = fresh_args("old");
    forced.push("--force".into());
    let before = fs::read(&sp).unwrap();
    let out = command(d, &forced.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--resume it") && err.contains("runs/old"),
        "{err}"
    );
    assert_eq!(
        fs::read(&sp).unwrap(),
        before,
        "--force touched an unmarked run"
    );

    let out = command(
        d,
        &resume_args("old")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.lines().count(),
        2,
        "a marker note and a fingerprint note: {err}"
    );
    assert!(run.join(".r2scp-run").is_file());
    let st = read_state(&sp).unwrap();
    assert!(st.finished && st.data.is_some());
}
