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

/// Issue 13: a `.npy` whose header claims shape (100000000, 100000) f32 (40 TB) over 64
/// bytes of data used to abort the process inside candle's reader
/// (`memory allocation of 40000000000000 bytes failed`, no `error:` line).
#[test]
fn forty_terabyte_npy_header_is_one_error_line_within_a_second() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    std::fs::create_dir_all(data.join("audio")).unwrap();
    std::fs::create_dir_all(data.join("visual")).unwrap();
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut h =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 100000), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    npy.extend((h.len() as u16).to_le_bytes());
    npy.extend(h.as_bytes());
    npy.extend([0u8; 64]);
    std::fs::write(data.join("audio/v1.npy"), &npy).unwrap();
    candle_core::Tensor::zeros((3, 5), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap()
        .write_npy(data.join("visual/v1.npy"))
        .unwrap();
    let q = r#"[{"video_id": "v1", "question_id": 1, "type": ["Audio", "Counting"], "question_content": "How many instruments are sounding?", "anser": "two"}]"#;
    for split in ["train", "val", "test"] {
        std::fs::write(data.join(format!("avqa-{split}.json")), q).unwrap();
    }
    let t0 = std::time::Instant::now();
    let out = r2scp(&["train", "--data", "data", "--quiet"], d.path());
    let secs = t0.elapsed().as_secs_f64();
    let e = one_line_error(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("audio/v1.npy") && e.contains("40000000000000 bytes") && e.contains("64 bytes"),
        "{e}"
    );
    println!("40 TB header: exit 1 after {secs:.3} s: {e}");
    assert!(secs < 1.0, "took {secs:.2} s");
}
