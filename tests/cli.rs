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

// ---------------------------------------------------------------------------------------
// Issue 19: run directories, checkpoints and ablations that cannot destroy or mislead.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `r2scp` with extra environment variables.
fn r2scp_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2scp"));
    c.args(args).current_dir(cwd).env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run r2scp")
}

/// Assert success; returns stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "expected success, got {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` (relative path, bytes), sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A MUSIC-AVQA-layout set in `dir`: `train` / `val` / `test` videos `v<i>` with audio [2, 4]
/// and visual [3, 4] features, two questions each whose answer follows from the question
/// ("is the <x> playing" -> yes for cello and flute; "how many <x> are there" -> one, two
/// or three), so a tiny model learns them. Returns nothing; `edit` may change the entries
/// (split name, entries) before they are written.
fn write_avqa(dir: &Path, edit: impl Fn(&str, &mut Vec<serde_json::Value>)) {
    std::fs::create_dir_all(dir.join("audio")).unwrap();
    std::fs::create_dir_all(dir.join("visual")).unwrap();
    let instruments = ["cello", "flute", "violin", "drum", "piano", "guitar"];
    let mut vid = 0;
    for (split, n) in [("train", 24), ("val", 8), ("test", 8)] {
        let mut entries = Vec::new();
        for _ in 0..n {
            let v = format!("v{vid}");
            let f = |t: usize, d: usize, s: f32| {
                let x: Vec<f32> = (0..t * d)
                    .map(|j| ((vid * 7 + j) as f32 * 0.37 + s).sin())
                    .collect();
                candle_core::Tensor::from_vec(x, (t, d), &candle_core::Device::Cpu).unwrap()
            };
            f(2, 4, 0.1)
                .write_npy(dir.join(format!("audio/{v}.npy")))
                .unwrap();
            f(3, 4, 0.7)
                .write_npy(dir.join(format!("visual/{v}.npy")))
                .unwrap();
            let x = instruments[vid % instruments.len()];
            let yes = if x == "cello" || x == "flute" {
                "yes"
            } else {
                "no"
            };
            let count = ["one", "two", "three"][vid % 3];
            entries.push(serde_json::json!({
                "video_id": v, "question_id": format!("{vid}a"),
                "type": ["Audio-Visual", "Existential"],
                "question_content": "is the <Object> playing", "templ_values": [x], "anser": yes
            }));
            entries.push(serde_json::json!({
                "video_id": v, "question_id": format!("{vid}b"),
                "type": ["Visual", "Counting"],
                "question_content": format!("how many {} are there", ["a", "b", "c"][vid % 3]),
                "templ_values": [], "anser": count
            }));
            vid += 1;
        }
        edit(split, &mut entries);
        std::fs::write(
            dir.join(format!("avqa-{split}.json")),
            serde_json::to_string_pretty(&entries).unwrap(),
        )
        .unwrap();
    }
}

const TINY_AVQA: &str = r#"
batch_size = 8
eval_batch_size = 16
[stage1]
epochs = 3
[stage2]
epochs = 2
patience = 0
[model]
dim = 16
heads = 2
expert_layers = 1
"#;

/// Case 1: `--force` used to delete whatever sat at `<runs-dir>/<name>`, recursively.
#[test]
fn force_leaves_a_directory_without_the_run_marker_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let victim = d.path().join("sac/victim");
    std::fs::create_dir_all(victim.join("chapters")).unwrap();
    std::fs::write(victim.join("thesis.txt"), b"five years of work\n").unwrap();
    std::fs::write(victim.join("chapters/one.bin"), [0u8, 159, 255, 7]).unwrap();
    let before = tree(&victim);
    let e = one_line_error(&r2scp(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--runs-dir",
            "sac",
            "--name",
            "victim",
            "--force",
            "--quiet",
        ],
        d.path(),
    ));
    assert!(e.contains("sac/victim") && e.contains("--force"), "{e}");
    assert_eq!(
        tree(&victim),
        before,
        "--force changed a directory it did not create"
    );

    // The data set itself as the run directory (`--runs-dir` its parent, `--name` its name).
    let data = d.path().join("x/data");
    write_avqa(&data, |_, _| {});
    let before = tree(&data);
    let e = one_line_error(&r2scp(
        &[
            "train",
            "--data",
            "x/data",
            "--runs-dir",
            "x",
            "--name",
            "data",
            "--force",
            "--quiet",
        ],
        d.path(),
    ));
    assert!(e.contains("x/data"), "{e}");
    assert_eq!(tree(&data), before, "--force touched the data set");

    // A run r2scp created is replaced, and a file the user added to it stays.
    let args = [
        "train",
        "--config",
        "tiny.toml",
        "--name",
        "mine",
        "--quiet",
        "--threads",
        "1",
    ];
    ok(&r2scp(&args, d.path()));
    std::fs::write(d.path().join("runs/mine/notes.txt"), b"keep me").unwrap();
    one_line_error(&r2scp(&args, d.path()));
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&r2scp(&forced, d.path()));
    assert_eq!(
        std::fs::read(d.path().join("runs/mine/notes.txt")).unwrap(),
        b"keep me"
    );
    assert!(d.path().join("runs/mine/checkpoint/state.json").is_file());
}

/// Case 3: eval used to re-derive the answer ids from the data; renaming "yes" to
/// "affirmative" swapped the yes/no ids and AV-Ext fell from 79% to 21%, exit 0.
#[test]
fn eval_maps_answers_by_the_checkpoint_vocabularies_after_the_data_changed() {
    let d = tempfile::tempdir().unwrap();
    write_avqa(&d.path().join("data"), |_, _| {});
    std::fs::write(d.path().join("tiny.toml"), TINY_AVQA).unwrap();
    ok(&r2scp(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--data",
            "data",
            "--name",
            "t",
            "--quiet",
            "--threads",
            "1",
        ],
        d.path(),
    ));
    // Paths are stored absolute: eval works from another directory.
    let sub = d.path().join("elsewhere");
    std::fs::create_dir(&sub).unwrap();
    let before = r2scp(&["eval", "--checkpoint", "../runs/t", "--json"], &sub);
    let rows_before: serde_json::Value = serde_json::from_str(&ok(&before)).unwrap();
    assert!(
        String::from_utf8_lossy(&before.stderr).trim().is_empty(),
        "unchanged data needs no warning: {}",
        String::from_utf8_lossy(&before.stderr)
    );

    // Rename the answer "yes" everywhere; "affirmative" sorts first, so ids derived from
    // the data again would all shift by one.
    let mut n_yes = 0;
    for split in ["train", "val", "test"] {
        let p = d.path().join(format!("data/avqa-{split}.json"));
        let text = std::fs::read_to_string(&p).unwrap();
        if split == "test" {
            n_yes = text.matches("\"anser\": \"yes\"").count();
        }
        std::fs::write(
            &p,
            text.replace("\"anser\": \"yes\"", "\"anser\": \"affirmative\""),
        )
        .unwrap();
    }
    assert!(n_yes > 0);
    let after = r2scp(&["eval", "--checkpoint", "../runs/t", "--json"], &sub);
    let rows_after: serde_json::Value = serde_json::from_str(&ok(&after)).unwrap();
    let stderr = String::from_utf8_lossy(&after.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one warning line: {stderr}");
    assert!(
        lines[0].starts_with("warning: ")
            && lines[0].contains("fingerprint")
            && lines[0].contains(&format!("{n_yes} test questions"))
            && lines[0].contains("\"affirmative\""),
        "{stderr}"
    );
    // V-Count (index 2) questions are unchanged: the same answers, counted the same; AV-Ext
    // (index 4) keeps its total, its renamed answers counted wrong.
    for (a, b) in rows_before
        .as_array()
        .unwrap()
        .iter()
        .zip(rows_after.as_array().unwrap())
    {
        assert_eq!(a["n"], b["n"]);
        assert_eq!(
            a["per_type"][2], b["per_type"][2],
            "V-Count changed: {a} vs {b}"
        );
        assert_eq!(a["per_type"][4][1], b["per_type"][4][1]);
        assert!(b["per_type"][4][0].as_u64() <= a["per_type"][4][0].as_u64());
    }
}

/// Case 4: ablate reused every variant after half of avqa-train.json was deleted.
#[test]
fn ablate_reuses_a_variant_only_when_config_and_data_match() {
    let d = tempfile::tempdir().unwrap();
    write_avqa(&d.path().join("data"), |_, _| {});
    std::fs::write(
        d.path().join("tiny.toml"),
        TINY_AVQA.replace("epochs = 3", "epochs = 1"),
    )
    .unwrap();
    let args = [
        "ablate",
        "--config",
        "tiny.toml",
        "--data",
        "data",
        "--only",
        "strategy",
        "--out",
        "abl",
        "--quiet",
        "--threads",
        "1",
    ];
    let report = || std::fs::read_to_string(d.path().join("abl/report.md")).unwrap();
    let state_time = |v: &str| {
        std::fs::metadata(
            d.path()
                .join(format!("abl/seed0/{v}/checkpoint/state.json")),
        )
        .and_then(|m| m.modified())
        .unwrap()
    };
    ok(&r2scp(&args, d.path()));
    assert!(
        report().contains(
            "Reused from an earlier run of `ablate` (same config, same data fingerprint): none."
        ),
        "{}",
        report()
    );
    let t0 = state_time("full");
    ok(&r2scp(&args, d.path()));
    let r = report();
    assert!(
        r.contains("full (seed 0)") && r.contains("Trained by this run: none."),
        "{r}"
    );
    assert_eq!(
        state_time("full"),
        t0,
        "an unchanged variant was trained again"
    );
    // Half of the train questions deleted at the same path: nothing may be reused.
    let p = d.path().join("data/avqa-train.json");
    let mut v: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.truncate(v.len() / 2);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    ok(&r2scp(&args, d.path()));
    let r = report();
    assert!(
        r.contains(
            "Reused from an earlier run of `ablate` (same config, same data fingerprint): none."
        ),
        "{r}"
    );
    for v in ["full", "wo-stage1", "wo-stage2", "wo-rank"] {
        assert!(
            state_time(v) > t0,
            "{v} was not trained again on the changed data"
        );
    }
}

/// Case 5: a model tensor relabelled F32 -> I32 (same bytes, same shape) loaded and
/// evaluated with exit 0.
#[test]
fn a_checkpoint_tensor_with_the_wrong_dtype_is_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    ok(&r2scp(
        &["train", "--config", "tiny.toml", "--name", "t", "--quiet"],
        d.path(),
    ));
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
        .unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("\"F32\"").expect("an F32 tensor");
    bytes[8 + at..8 + at + 5].copy_from_slice(b"\"I32\"");
    std::fs::write(&model, &bytes).unwrap();
    let e = one_line_error(&r2scp(&["eval", "--checkpoint", "runs/t"], d.path()));
    assert!(
        e.contains("dtype") && e.contains("I32") && e.contains("F32"),
        "{e}"
    );
    assert!(e.contains("model-"), "{e}");
}

/// Case 6: one 2,000-word question padded every question to 2,000 tokens and training
/// aborted allocating 2 GB per attention map (exit 134).
#[test]
fn a_two_thousand_word_question_is_one_error_line() {
    let d = tempfile::tempdir().unwrap();
    write_avqa(&d.path().join("data"), |split, e| {
        if split == "test" {
            e[0]["question_content"] = serde_json::json!(vec!["word"; 2000].join(" "));
        }
    });
    let t0 = Instant::now();
    let out = r2scp(&["train", "--data", "data", "--quiet"], d.path());
    let e = one_line_error(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        e.contains("avqa-test.json") && e.contains("2000 words") && e.contains("64"),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        !d.path().join("runs").exists()
            || std::fs::read_dir(d.path().join("runs"))
                .unwrap()
                .next()
                .is_none(),
        "a failed new run left its directory"
    );
}

/// Case 7: absurd sizes aborted with exit 134 (allocation failure) instead of one line.
#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let limit = [("R2SCP_MEMORY_LIMIT", "8G")];
    for (name, toml, want) in [
        (
            "ffn",
            "[model]\nffn_mult = 1000000000000\n",
            "model.ffn_mult = 1000000000000",
        ),
        ("dim", "[model]\ndim = 1000000\n", "model.dim = 1000000"),
        (
            "layers",
            "[model]\nexpert_layers = 100000\n",
            "model.expert_layers = 100000",
        ),
    ] {
        std::fs::write(d.path().join(format!("{name}.toml")), toml).unwrap();
        let t0 = Instant::now();
        let out = r2scp_env(
            &["train", "--config", &format!("{name}.toml"), "--quiet"],
            d.path(),
            &limit,
        );
        let e = one_line_error(&out);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains(want) && e.contains("8.00 GiB"), "{e}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name}: {:?}",
            t0.elapsed()
        );
    }
    let e = one_line_error(&r2scp_env(
        &["train", "--train-clips", "1000000000000", "--quiet"],
        d.path(),
        &limit,
    ));
    assert!(
        e.contains("--train-clips") && e.contains("1000000000000"),
        "{e}"
    );
    let e = one_line_error(&r2scp_env(
        &["bench", "retrieve", "--m", "1000000000000", "--d", "1024"],
        d.path(),
        &limit,
    ));
    assert!(
        e.contains("--m 1000000000000") && e.contains("8.00 GiB"),
        "{e}"
    );
    assert!(
        !d.path().join("runs").exists(),
        "a refused run created its directory"
    );
}

/// Case 8: `--threads 100000` spent 92 s spawning threads and panicked; `bench retrieve
/// --d 0` panicked; `bench` accepted zero sizes and n > M.
#[test]
fn threads_and_bench_sizes_are_validated() {
    let d = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = r2scp(&["train", "--threads", "100000", "--quiet"], d.path());
    let e = one_line_error(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(e.contains("--threads 100000"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    for (flag, args) in [
        ("--d 0", vec!["--d", "0"]),
        ("--m 0", vec!["--m", "0"]),
        ("--b 0", vec!["--b", "0"]),
        ("--n 0", vec!["--n", "0"]),
        ("--reps 0", vec!["--reps", "0"]),
        (
            "--n 9 exceeds --m 5",
            vec!["--m", "5", "--d", "4", "--n", "9"],
        ),
    ] {
        let mut a = vec!["bench", "retrieve", "--quick"];
        a.extend(args);
        let out = r2scp(&a, d.path());
        let e = one_line_error(&out);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains(flag), "{flag}: {e}");
    }
    let e = one_line_error(&r2scp(&["bench", "cap", "--d", "0"], d.path()));
    assert!(e.contains("--d 0"), "{e}");
}

/// Runs `r2scp` and kills it after `limit`; returns its output, or `None` when it had to be
/// killed.
fn run_with_limit(args: &[&str], cwd: &Path, limit: Duration) -> Option<Output> {
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_r2scp"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

/// Case 9: an annotation file or a `--config` that is a FIFO with no writer blocked forever.
#[test]
fn fifos_in_place_of_annotations_or_config_do_not_block() {
    let d = tempfile::tempdir().unwrap();
    write_avqa(&d.path().join("data"), |_, _| {});
    let fifo = |p: &Path| {
        let _ = std::fs::remove_file(p);
        let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
        assert!(st.success());
    };
    fifo(&d.path().join("data/avqa-train.json"));
    fifo(&d.path().join("c.toml"));
    for args in [
        vec!["train", "--data", "data", "--quiet"],
        vec!["train", "--config", "c.toml", "--quiet"],
    ] {
        let out = run_with_limit(&args, d.path(), Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{args:?} blocked on a FIFO"));
        let e = one_line_error(&out);
        assert!(
            e.contains("FIFO") && e.contains("not a regular file"),
            "{e}"
        );
    }
}

/// Case 10: with RUST_BACKTRACE=1 model-config errors printed a whole backtrace on their
/// error line.
#[test]
fn errors_are_one_short_line_with_rust_backtrace_set() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("drop.toml"), "[model]\ndropout = -0.5\n").unwrap();
    for (args, want) in [
        (vec!["train", "-n", "0", "--quiet"], "n_retrieved = 0"),
        (vec!["train", "--dim", "0", "--quiet"], "dim = 0"),
        (
            vec!["train", "--config", "drop.toml", "--quiet"],
            "dropout = -0.5",
        ),
    ] {
        for bt in ["1", "full"] {
            let e = one_line_error(&r2scp_env(&args, d.path(), &[("RUST_BACKTRACE", bt)]));
            assert!(e.contains(want), "{e}");
            assert!(
                e.len() < 200 && !e.contains(".rs:") && !e.contains(" at /") && !e.contains("0: "),
                "backtrace on the error line: {e}"
            );
        }
    }
}

/// Misleading message: the unknown-answer error suggested `unknown_answer = map_to_unk`, a
/// key that did not exist.
#[test]
fn the_unknown_answer_error_suggests_a_key_that_works() {
    let d = tempfile::tempdir().unwrap();
    write_avqa(&d.path().join("data"), |split, e| {
        if split == "val" {
            e[1]["anser"] = serde_json::json!("seventeen");
        }
    });
    let e = one_line_error(&r2scp(&["train", "--data", "data", "--quiet"], d.path()));
    assert!(
        e.contains("seventeen") && e.contains("unknown_answer = \"map_to_unk\""),
        "{e}"
    );
    std::fs::write(
        d.path().join("unk.toml"),
        format!(
            "unknown_answer = \"map_to_unk\"\n{}",
            TINY_AVQA.replace("epochs = 3", "epochs = 1")
        ),
    )
    .unwrap();
    ok(&r2scp(
        &[
            "train",
            "--config",
            "unk.toml",
            "--data",
            "data",
            "--quiet",
            "--threads",
            "1",
        ],
        d.path(),
    ));
}

/// Misleading messages: `--seed` of 2^63 said "serialising the config: out-of-range value
/// for u64 type" and left an empty run directory; `n_retrieved` larger than the bank was
/// caught after stage I, naming an internal function; weight decay 1e300 and features of
/// 3.4e38 ended in "loss is NaN; lower the learning rate".
#[test]
fn seed_bank_size_weight_decay_and_feature_errors_name_the_cause() {
    let d = tempfile::tempdir().unwrap();
    let e = one_line_error(&r2scp(
        &["train", "--seed", "9223372036854775808", "--quiet"],
        d.path(),
    ));
    assert!(
        e.contains("--seed") && e.contains("9223372036854775807"),
        "{e}"
    );
    assert!(
        !d.path().join("runs").exists(),
        "the refused run left a directory"
    );

    std::fs::write(
        d.path().join("small.toml"),
        TINY.replace("n_train_clips = 40", "n_train_clips = 12"),
    )
    .unwrap();
    let t0 = Instant::now();
    let e = one_line_error(&r2scp(
        &[
            "train",
            "--config",
            "small.toml",
            "-n",
            "20",
            "--name",
            "n20",
            "--quiet",
        ],
        d.path(),
    ));
    assert!(
        e.contains("-n 20") && e.contains("12 train clips") && e.contains("at most 11"),
        "{e}"
    );
    assert!(
        !d.path().join("runs/n20").exists(),
        "stage I ran before the check"
    );
    assert!(t0.elapsed() < Duration::from_secs(20));

    let e = one_line_error(&r2scp(
        &["train", "--weight-decay", "1e300", "--quiet"],
        d.path(),
    ));
    assert!(
        e.contains("weight_decay = 1e300") && e.contains("lr x weight_decay"),
        "{e}"
    );

    write_avqa(&d.path().join("data"), |_, _| {});
    let big = vec![3.4e38f32; 8];
    candle_core::Tensor::from_vec(big, (2, 4), &candle_core::Device::Cpu)
        .unwrap()
        .write_npy(d.path().join("data/audio/v3.npy"))
        .unwrap();
    let e = one_line_error(&r2scp(&["train", "--data", "data", "--quiet"], d.path()));
    assert!(
        e.contains("audio/v3.npy") && e.contains("3.4e38") && e.contains("exceeds"),
        "{e}"
    );
}

/// Misleading message: `bench` found its Python peer scripts through the build machine's
/// checkout path, fixed at build time.
#[test]
fn bench_finds_peer_scripts_from_the_override_or_the_current_checkout() {
    let d = tempfile::tempdir().unwrap();
    // A stand-in peer, run by sh: prints a best time of 0.25 s.
    let fake = "echo '{\"best_seconds\": 0.25}'\n";
    let own = d.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::write(own.join("faiss_peer.py"), fake).unwrap();
    let args = [
        "bench",
        "retrieve",
        "--m",
        "64",
        "--d",
        "8",
        "--b",
        "1",
        "--n",
        "2",
        "--reps",
        "1",
        "--dtypes",
        "f32",
        "--skip-reference",
        "--faiss-python",
        "sh",
    ];
    let out = r2scp_env(
        &args,
        d.path(),
        &[("R2SCP_SCRIPTS_DIR", own.to_str().unwrap())],
    );
    let table = ok(&out);
    assert!(
        table
            .lines()
            .any(|l| l.contains("faiss IndexFlatIP") && l.contains("| 250 ")),
        "{table}"
    );
    // An installed binary outside any checkout, run inside a checkout: that checkout's
    // scripts/.
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = bin.join("r2scp");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_r2scp"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_r2scp"), &exe).unwrap();
    }
    let checkout = d.path().join("checkout");
    std::fs::create_dir_all(checkout.join("scripts")).unwrap();
    std::fs::create_dir_all(checkout.join("work")).unwrap();
    std::fs::write(checkout.join("Cargo.toml"), "[package]\nname = \"r2scp\"\n").unwrap();
    std::fs::write(
        checkout.join("scripts/faiss_peer.py"),
        fake.replace("0.25", "0.5"),
    )
    .unwrap();
    let out = Command::new(&exe)
        .args(args)
        .current_dir(checkout.join("work"))
        .env_remove("R2SCP_SCRIPTS_DIR")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let table = ok(&out);
    assert!(
        table
            .lines()
            .any(|l| l.contains("faiss IndexFlatIP") && l.contains("| 500 ")),
        "{table}"
    );
}
