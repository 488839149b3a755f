//! The `r2scp` binary: help, bad flags, unreadable data, corrupt checkpoints. Every
//! failure must be one `error: ...` line on stderr with a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn r2scp(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r2scp"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run r2scp")
}

/// Assert a failure with exactly one stderr line starting with `error:`; returns it.
fn one_line_error(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr must be one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    lines[0].to_string()
}

const TINY: &str = r#"
batch_size = 16
eval_batch_size = 64
[stage1]
epochs = 1
[stage2]
epochs = 1
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

#[test]
fn help_explains_commands_and_options() {
    let d = tempfile::tempdir().unwrap();
    let out = r2scp(&["--help"], d.path());
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for w in ["train", "eval", "ablate"] {
        assert!(s.contains(w), "{w} not in help:\n{s}");
    }
    let out = r2scp(&["train", "--help"], d.path());
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for w in [
        "--config",
        "--data",
        "--resume",
        "--seed",
        "--lambda",
        "--no-retrieval",
        "--quiet",
    ] {
        assert!(s.contains(w), "{w} not in train help:\n{s}");
    }
    let out = r2scp(&["eval", "--help"], d.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--checkpoint"));
    for b in ["retrieve", "cap"] {
        let out = r2scp(&["bench", b, "--help"], d.path());
        assert!(out.status.success(), "bench {b} --help");
    }
    let out = r2scp(&["ablate", "--help"], d.path());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("--quick") && s.contains("--seeds"), "{s}");
}

#[test]
fn bad_flags_give_one_line() {
    let d = tempfile::tempdir().unwrap();
    let e = one_line_error(&r2scp(&["train", "--bogus"], d.path()));
    assert!(e.contains("--bogus"), "{e}");
    let out = r2scp(&["train", "--bogus"], d.path());
    assert_eq!(out.status.code(), Some(2));
    let e = one_line_error(&r2scp(&["train", "--seed", "abc"], d.path()));
    assert!(e.contains("abc"), "{e}");
    let e = one_line_error(&r2scp(&["train", "--missing-rate", "1.5"], d.path()));
    assert!(e.contains("missing_rate") && e.contains("1.5"), "{e}");
    one_line_error(&r2scp(&["frobnicate"], d.path()));
    one_line_error(&r2scp(&["bench", "retrieve", "--bogus"], d.path()));
    one_line_error(&r2scp(&["ablate", "--seeds", "0"], d.path()));
    one_line_error(&r2scp(&["eval"], d.path()));
    let e = one_line_error(&r2scp(&["train", "--name", "../x"], d.path()));
    assert!(e.contains("--name"), "{e}");
}

#[test]
fn bad_config_file_and_unreadable_data() {
    let d = tempfile::tempdir().unwrap();
    let e = one_line_error(&r2scp(&["train", "--config", "nope.toml"], d.path()));
    assert!(e.contains("nope.toml"), "{e}");
    std::fs::write(
        d.path().join("bad.toml"),
        "batch_size = 16\nlearning_rat = 3\n",
    )
    .unwrap();
    let e = one_line_error(&r2scp(&["train", "--config", "bad.toml"], d.path()));
    assert!(e.contains("learning_rat"), "{e}");
    let e = one_line_error(&r2scp(&["train", "--data", "no/such/dir"], d.path()));
    assert!(e.contains("no/such/dir"), "{e}");
    // a directory that exists but is not in the MUSIC-AVQA layout
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let e = one_line_error(&r2scp(&["train", "--data", "empty", "--quiet"], d.path()));
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn eval_of_missing_or_corrupt_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let e = one_line_error(&r2scp(&["eval", "--checkpoint", "nowhere"], d.path()));
    assert!(e.contains("nowhere"), "{e}");
    // garbage state file
    std::fs::create_dir_all(d.path().join("bad/checkpoint")).unwrap();
    std::fs::write(d.path().join("bad/checkpoint/state.json"), "{not json").unwrap();
    let e = one_line_error(&r2scp(&["eval", "--checkpoint", "bad"], d.path()));
    assert!(e.contains("state.json"), "{e}");

    // a real run, then its weights corrupted
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let out = r2scp(
        &["train", "--config", "tiny.toml", "--name", "t", "--quiet"],
        d.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = r2scp(&["eval", "--checkpoint", "runs/t"], d.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for w in [
        "missing audio",
        "missing visual",
        "complete",
        "Average",
        "Overall",
    ] {
        assert!(table.contains(w), "{w} missing from:\n{table}");
    }
    let ck = d.path().join("runs/t/checkpoint");
    let model = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-")
        })
        .expect("model file");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let e = one_line_error(&r2scp(&["eval", "--checkpoint", "runs/t"], d.path()));
    assert!(e.contains("model-"), "{e}");
    // resuming a run with corrupt weights fails the same way
    let e = one_line_error(&r2scp(
        &["train", "--resume", "--name", "t", "--quiet"],
        d.path(),
    ));
    assert!(e.contains("model-"), "{e}");
    // a fresh run into an existing run directory is refused
    let e = one_line_error(&r2scp(
        &["train", "--config", "tiny.toml", "--name", "t", "--quiet"],
        d.path(),
    ));
    assert!(e.contains("--resume"), "{e}");
}
