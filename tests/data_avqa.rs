//! MUSIC-AVQA loader on a small fixture written in the real layout: happy path, both `type`
//! encodings, vocabularies, keys (provided and derived), and errors that name the file and the
//! problem.

use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use r2scp::data::{
    load_music_avqa, load_music_avqa_with, AvqaOptions, QuestionType, UnknownAnswer, Vocab,
};
use serde_json::{json, Value};
use tempfile::TempDir;

const TA: usize = 4;
const DA: usize = 6;
const TV: usize = 3;
const DV: usize = 10;

fn q(vid: &str, qid: u64, ty: Value, content: &str, templ: &str, ans: &str) -> Value {
    json!({
        "video_id": vid,
        "question_id": qid,
        "type": ty,
        "question_content": content,
        "templ_values": templ,
        "anser": ans,
    })
}

/// A deterministic matrix with a per-video offset so rows of different videos differ.
fn matrix(r: usize, c: usize, off: f32) -> Tensor {
    let v: Vec<f32> = (0..r * c).map(|i| off + i as f32 * 0.01).collect();
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Fixture: train videos v1, v2; val v3; test v4 and v1 (a video shared with train keeps its id).
fn fixture() -> TempDir {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("audio")).unwrap();
    fs::create_dir_all(d.join("visual")).unwrap();
    for (i, v) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
        matrix(TA, DA, i as f32)
            .write_npy(d.join(format!("audio/{v}.npy")))
            .unwrap();
        matrix(TV, DV, 10.0 + i as f32)
            .write_npy(d.join(format!("visual/{v}.npy")))
            .unwrap();
    }
    // the real files encode `type` and `templ_values` as strings
    let train = json!([
        q(
            "v1",
            1,
            json!("[\"Audio\", \"Counting\"]"),
            "How many instruments are sounding?",
            "[]",
            "two"
        ),
        q(
            "v1",
            2,
            json!("[\"Audio-Visual\", \"Temporal\"]"),
            "Where is the first sounding <Object>?",
            "[\"cello\"]",
            "left"
        ),
        q(
            "v2",
            3,
            json!(["Visual", "Location"]),
            "Is the <Object> on the <LR>?",
            "['violin', 'right']",
            "yes"
        ),
        q(
            "v2",
            4,
            json!(["Audio-Visual", "Existential"]),
            "Is the <Object> sounding?",
            "[\"piano\"]",
            "no"
        ),
    ]);
    let val = json!([q(
        "v3",
        5,
        json!("[\"Visual\", \"Counting\"]"),
        "How many <Object> are there?",
        "[\"cello\"]",
        "two"
    ),]);
    let test = json!([
        q(
            "v4",
            6,
            json!("[\"Audio-Visual\", \"Comparative\"]"),
            "Is the <Object> louder than the harp?",
            "[\"flute\"]",
            "yes"
        ),
        q(
            "v1",
            7,
            json!("[\"Audio\", \"Comparative\"]"),
            "Is the <Object> louder?",
            "[\"cello\"]",
            "left"
        ),
    ]);
    write_json(&d.join("avqa-train.json"), &train);
    write_json(&d.join("avqa-val.json"), &val);
    write_json(&d.join("avqa-test.json"), &test);
    tmp
}

fn err(dir: &Path) -> String {
    format!("{:#}", load_music_avqa(dir).unwrap_err())
}

#[test]
fn loads_fixture_with_vocabularies_types_and_features() {
    let tmp = fixture();
    let s = load_music_avqa(tmp.path()).unwrap();
    s.validate().unwrap();
    let d = s.dims();
    assert_eq!((d.la, d.da, d.lv, d.dv), (TA, DA, TV, DV));
    assert_eq!(d.dk, AvqaOptions::default().derived_key_dim);
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (4, 1, 2));
    assert_eq!(
        (s.train.n_clips(), s.val.n_clips(), s.test.n_clips()),
        (2, 1, 2)
    );
    // answers: sorted train answers
    assert_eq!(s.train.answer_vocab.tokens(), ["left", "no", "two", "yes"]);
    assert_eq!(s.train.answers, [2, 0, 3, 1]);
    assert_eq!(s.test.answers, [3, 0]);
    // types, from both encodings
    assert_eq!(
        s.train.qtypes,
        [
            QuestionType::AudioCounting,
            QuestionType::AvTemporal,
            QuestionType::VisualLocation,
            QuestionType::AvExistential
        ]
    );
    assert_eq!(s.test.qtypes[0], QuestionType::AvComparative);
    // questions: placeholders filled, lower-cased, punctuation stripped; unknown words -> <unk>
    let v = &s.train.vocab;
    assert_eq!(v.token(Vocab::PAD), Some("<pad>"));
    let q = s.train.questions.to_vec2::<u32>().unwrap();
    assert_eq!(
        v.decode(&q[2]),
        ["is", "the", "violin", "on", "the", "right"]
    );
    assert_eq!(
        v.decode(&q[1]),
        ["where", "is", "the", "first", "sounding", "cello"]
    );
    let tq = s.test.questions.to_vec2::<u32>().unwrap();
    // "is the flute louder than the harp": only "is", "the" occur in train questions
    assert_eq!(
        v.decode(&tq[0]),
        ["is", "the", "<unk>", "<unk>", "<unk>", "the", "<unk>"]
    );
    assert_eq!(d.lq, 7, "longest question over all splits");
    // features: clip rows in order of first appearance; shared video keeps its id
    assert_eq!(s.train.clip_names, ["v1", "v2"]);
    assert_eq!(s.test.clip_names, ["v4", "v1"]);
    assert_eq!(s.test.clip_ids[1], s.train.clip_ids[0]);
    assert_ne!(s.test.clip_ids[0], s.train.clip_ids[1]);
    assert_eq!(
        s.test.audio.get(0).unwrap().to_vec2::<f32>().unwrap(),
        matrix(TA, DA, 3.0).to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        s.train.visual.get(1).unwrap().to_vec2::<f32>().unwrap(),
        matrix(TV, DV, 11.0).to_vec2::<f32>().unwrap()
    );
    assert_eq!(s.train.clip_of, [0, 0, 1, 1]);
}

#[test]
fn derived_keys_are_deterministic_projections_of_the_mean() {
    let tmp = fixture();
    let a = load_music_avqa(tmp.path()).unwrap();
    let b = load_music_avqa(tmp.path()).unwrap();
    assert_eq!(
        a.train.audio_key.to_vec2::<f32>().unwrap(),
        b.train.audio_key.to_vec2::<f32>().unwrap()
    );
    // same video in two splits -> same key
    assert_eq!(
        a.test.visual_key.get(1).unwrap().to_vec1::<f32>().unwrap(),
        a.train.visual_key.get(0).unwrap().to_vec1::<f32>().unwrap()
    );
    // linear in the mean: key(v2) - key(v1) is the projection of a constant shift of 1.0
    let opts = AvqaOptions {
        derived_key_dim: 5,
        key_seed: 3,
        ..AvqaOptions::default()
    };
    let c = load_music_avqa_with(tmp.path(), &opts).unwrap();
    assert_eq!(c.dims().dk, 5);
    let k = c.train.audio_key.to_vec2::<f32>().unwrap();
    assert_ne!(
        k[0],
        a.train.audio_key.to_vec2::<f32>().unwrap()[0][..5].to_vec()
    );
    assert!(k[0].iter().zip(&k[1]).any(|(x, y)| (x - y).abs() > 1e-4));
}

#[test]
fn provided_keys_are_used_and_checked() {
    let tmp = fixture();
    let d = tmp.path();
    for m in ["audio", "visual"] {
        fs::create_dir_all(d.join(format!("keys/{m}"))).unwrap();
        for (i, v) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
            let k = Tensor::from_vec(vec![i as f32, 1.0, 2.0], 3, &Device::Cpu).unwrap();
            k.write_npy(d.join(format!("keys/{m}/{v}.npy"))).unwrap();
        }
    }
    let s = load_music_avqa(d).unwrap();
    assert_eq!(s.dims().dk, 3);
    assert_eq!(s.val.audio_key.to_vec2::<f32>().unwrap(), [[2.0, 1.0, 2.0]]);
    assert_eq!(
        s.test.visual_key.to_vec2::<f32>().unwrap()[0],
        [3.0, 1.0, 2.0]
    );
    // a key of the wrong dimension
    Tensor::from_vec(vec![1f32; 4], 4, &Device::Cpu)
        .unwrap()
        .write_npy(d.join("keys/visual/v3.npy"))
        .unwrap();
    let e = err(d);
    assert!(
        e.contains("v3.npy") && e.contains("key dimension 4 differs from 3"),
        "{e}"
    );
    // a missing key file
    fs::remove_file(d.join("keys/visual/v3.npy")).unwrap();
    let e = err(d);
    assert!(
        e.contains("keys/visual/v3.npy") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn only_one_modality_with_keys_derives_the_other_at_the_same_dimension() {
    let tmp = fixture();
    let d = tmp.path();
    fs::create_dir_all(d.join("keys/audio")).unwrap();
    for v in ["v1", "v2", "v3", "v4"] {
        Tensor::from_vec(vec![0.5f32; 7], (1, 7), &Device::Cpu)
            .unwrap()
            .write_npy(d.join(format!("keys/audio/{v}.npy")))
            .unwrap();
    }
    let s = load_music_avqa(d).unwrap();
    assert_eq!(s.train.visual_key.dims(), &[2, 7]);
    assert_eq!(s.train.audio_key.to_vec2::<f32>().unwrap()[0], vec![0.5; 7]);
}

#[test]
fn unknown_answers_error_by_default_or_map_to_unk() {
    let tmp = fixture();
    let d = tmp.path();
    let test = json!([q(
        "v4",
        9,
        json!(["Audio", "Counting"]),
        "How many?",
        "[]",
        "seven"
    )]);
    write_json(&d.join("avqa-test.json"), &test);
    let e = err(d);
    assert!(
        e.contains("avqa-test.json") && e.contains("question 9") && e.contains("\"seven\""),
        "{e}"
    );
    let opts = AvqaOptions {
        unknown_answer: UnknownAnswer::MapToUnk,
        ..AvqaOptions::default()
    };
    let s = load_music_avqa_with(d, &opts).unwrap();
    assert_eq!(s.train.answer_vocab.token(0), Some("<unk>"));
    assert_eq!(s.test.answers, [0]);
    assert_eq!(s.train.answer_vocab.id("two"), Some(3));
}

#[test]
fn malformed_json_and_bad_entries_name_file_and_problem() {
    let tmp = fixture();
    let d = tmp.path();
    let good = fs::read_to_string(d.join("avqa-val.json")).unwrap();
    fs::write(d.join("avqa-val.json"), "[{\"video_id\": ").unwrap();
    let e = err(d);
    assert!(
        e.contains("avqa-val.json") && e.contains("malformed JSON"),
        "{e}"
    );

    fs::write(d.join("avqa-val.json"), "{\"a\": 1}").unwrap();
    assert!(err(d).contains("expected a JSON list"));

    let cases = [
        (
            json!([{"video_id": "v3", "question_id": 5, "type": "[\"Visual\", \"Counting\"]",
                 "question_content": "How many?", "templ_values": "[]"}]),
            "anser",
        ),
        (
            json!([q(
                "v3",
                5,
                json!("[\"Visual\", \"Dancing\"]"),
                "How many?",
                "[]",
                "two"
            )]),
            "unknown question type",
        ),
        (
            json!([q("v3", 5, json!("not a list"), "How many?", "[]", "two")]),
            "\"type\"",
        ),
        (
            json!([q(
                "v3",
                5,
                json!(["Visual", "Counting"]),
                "Where is the <Object>?",
                "[]",
                "two"
            )]),
            "placeholders",
        ),
        (
            json!([q(
                "../v3",
                5,
                json!(["Visual", "Counting"]),
                "How many?",
                "[]",
                "two"
            )]),
            "plain file name",
        ),
    ];
    for (v, needle) in cases {
        write_json(&d.join("avqa-val.json"), &v);
        let e = err(d);
        assert!(
            e.contains("avqa-val.json") && e.contains(needle),
            "{needle}: {e}"
        );
    }
    fs::write(d.join("avqa-val.json"), good).unwrap();
    load_music_avqa(d).unwrap();

    fs::remove_file(d.join("avqa-test.json")).unwrap();
    let e = err(d);
    assert!(
        e.contains("avqa-test.json") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn missing_files_wrong_shapes_and_inconsistent_t_name_the_file() {
    let tmp = fixture();
    let d = tmp.path();
    fs::remove_file(d.join("visual/v3.npy")).unwrap();
    let e = err(d);
    assert!(
        e.contains("visual/v3.npy") && e.contains("not found"),
        "{e}"
    );

    matrix(TV, DV, 0.0)
        .reshape((TV, 2, 5))
        .unwrap()
        .write_npy(d.join("visual/v3.npy"))
        .unwrap();
    let e = err(d);
    assert!(
        e.contains("visual/v3.npy") && e.contains("[3, 2, 5]") && e.contains("[T, D]"),
        "{e}"
    );

    matrix(TV + 1, DV, 0.0)
        .write_npy(d.join("visual/v3.npy"))
        .unwrap();
    let e = err(d);
    assert!(
        e.contains("visual/v3.npy")
            && e.contains("[4, 10] differs from [3, 10]")
            && e.contains("v1.npy"),
        "{e}"
    );

    matrix(TV, DV, 0.0)
        .write_npy(d.join("visual/v3.npy"))
        .unwrap();
    matrix(TA, DA + 1, 0.0)
        .write_npy(d.join("audio/v4.npy"))
        .unwrap();
    let e = err(d);
    assert!(e.contains("audio/v4.npy") && e.contains("[4, 7]"), "{e}");

    fs::write(d.join("audio/v4.npy"), b"not an npy file").unwrap();
    let e = err(d);
    assert!(
        e.contains("audio/v4.npy") && e.contains("cannot read .npy"),
        "{e}"
    );

    let e = format!("{:#}", load_music_avqa(&d.join("nope")).unwrap_err());
    assert!(e.contains("nope") && e.contains("not a directory"), "{e}");
}

#[test]
fn f64_features_are_converted_to_f32() {
    let tmp = fixture();
    let d = tmp.path();
    matrix(TA, DA, 2.0)
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .write_npy(d.join("audio/v3.npy"))
        .unwrap();
    let s = load_music_avqa(d).unwrap();
    assert_eq!(s.val.audio.dtype(), candle_core::DType::F32);
    assert_eq!(
        s.val.audio.get(0).unwrap().to_vec2::<f32>().unwrap(),
        matrix(TA, DA, 2.0).to_vec2::<f32>().unwrap()
    );
}
