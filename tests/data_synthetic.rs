//! Synthetic generator: determinism, shapes, config handling, and the statistical properties the
//! paper's claims rely on (cross-modal retrieval by unified key finds same-prototype clips far above
//! chance, but not always).

use std::time::Instant;

use r2scp::data::{generate, generate_with_meta, Dataset, QuestionType, SyntheticConfig};

/// Cosine similarity matrix rows of `q [nq, d]` against `k [nk, d]`, returning for each query the
/// indices of the `n` most similar keys (ties to the lower index), skipping `exclude[i]`.
fn topn(q: &[Vec<f32>], k: &[Vec<f32>], n: usize, exclude: &[Option<usize>]) -> Vec<Vec<usize>> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-8;
    let kn: Vec<f32> = k.iter().map(|v| norm(v)).collect();
    q.iter()
        .zip(exclude)
        .map(|(qv, ex)| {
            let qn = norm(qv);
            let mut s: Vec<(f32, usize)> = k
                .iter()
                .enumerate()
                .filter(|(j, _)| Some(*j) != *ex)
                .map(|(j, kv)| {
                    (
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() / (qn * kn[j]),
                        j,
                    )
                })
                .collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            s.into_iter().take(n).map(|x| x.1).collect()
        })
        .collect()
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn small() -> SyntheticConfig {
    SyntheticConfig {
        n_train_clips: 300,
        n_val_clips: 40,
        n_test_clips: 60,
        n_prototypes: 24,
        ..SyntheticConfig::default()
    }
}

fn same_data(a: &Dataset, b: &Dataset) -> bool {
    a.audio.to_vec3::<f32>().unwrap() == b.audio.to_vec3::<f32>().unwrap()
        && a.visual.to_vec3::<f32>().unwrap() == b.visual.to_vec3::<f32>().unwrap()
        && a.audio_key.to_vec2::<f32>().unwrap() == b.audio_key.to_vec2::<f32>().unwrap()
        && a.questions.to_vec2::<u32>().unwrap() == b.questions.to_vec2::<u32>().unwrap()
        && a.answers == b.answers
        && a.qtypes == b.qtypes
        && a.clip_of == b.clip_of
}

#[test]
fn default_config_generates_quickly_with_documented_shapes() {
    let cfg = SyntheticConfig::default();
    let t0 = Instant::now();
    let s = generate(&cfg).unwrap();
    let dt = t0.elapsed();
    eprintln!("default synthetic generation: {:.3} s", dt.as_secs_f64());
    assert!(dt.as_secs_f64() < 20.0, "generation took {dt:?}");
    s.validate().unwrap();
    let d = s.dims();
    eprintln!("default dims: {d:?}");
    assert_eq!(
        (d.la, d.da, d.lv, d.dv, d.dk),
        (cfg.la, cfg.da, cfg.lv, cfg.dv, cfg.dk)
    );
    assert_eq!(s.train.n_clips(), cfg.n_train_clips);
    assert_eq!(s.val.n_clips(), cfg.n_val_clips);
    assert_eq!(s.test.n_clips(), cfg.n_test_clips);
    assert_eq!(s.train.len(), cfg.n_train_clips * cfg.questions_per_clip);
    assert_eq!(d.n_answers, s.train.answer_vocab.len());
    assert_eq!(d.vocab_size, s.train.vocab.len());
    // every type is asked, none dominates
    let counts = s.train.qtype_counts();
    let n = s.train.len() as f32;
    for (t, c) in QuestionType::ALL.iter().zip(counts) {
        let f = c as f32 / n;
        eprintln!("{t}: share {f:.3}");
        assert!(f > 0.08 && f < 0.15, "{t}: share {f}");
    }
    // clip ids are unique across splits
    let mut ids: Vec<u32> = [&s.train, &s.val, &s.test]
        .iter()
        .flat_map(|d| d.clip_ids.clone())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        cfg.n_train_clips + cfg.n_val_clips + cfg.n_test_clips
    );
}

#[test]
fn generation_is_deterministic_and_splits_are_independent_streams() {
    let a = generate(&small()).unwrap();
    let b = generate(&small()).unwrap();
    assert!(same_data(&a.train, &b.train) && same_data(&a.test, &b.test));
    let c = generate(&SyntheticConfig { seed: 1, ..small() }).unwrap();
    assert!(!same_data(&a.train, &c.train));
    // changing the test size leaves train and val untouched
    let d = generate(&SyntheticConfig {
        n_test_clips: 7,
        ..small()
    })
    .unwrap();
    assert!(same_data(&a.train, &d.train) && same_data(&a.val, &d.val));
    assert_eq!(d.test.n_clips(), 7);
}

#[test]
fn question_answer_pairs_are_consistent_text() {
    let s = generate(&small()).unwrap();
    let ds = &s.train;
    let q = ds.questions.to_vec2::<u32>().unwrap();
    let mut yes_no = [0usize; 2];
    assert_eq!(q.len(), ds.len());
    for (i, qi) in q.iter().enumerate() {
        let words = ds.vocab.decode(qi);
        assert_eq!(words.len(), ds.question_len[i]);
        assert!(!words.iter().any(|w| w.starts_with('<')), "{words:?}");
        let a = ds.answer_vocab.token(ds.answers[i]).unwrap();
        match ds.qtypes[i] {
            QuestionType::AudioCounting
            | QuestionType::VisualCounting
            | QuestionType::AvCounting => {
                assert!(a.parse::<u32>().is_ok(), "{words:?} -> {a}")
            }
            QuestionType::VisualLocation => {}
            QuestionType::AvLocation | QuestionType::AvTemporal => {
                assert!(["left", "middle", "right"].contains(&a), "{words:?} -> {a}")
            }
            QuestionType::AvExistential | QuestionType::AvComparative => {
                assert!(a == "yes" || a == "no", "{words:?} -> {a}");
                yes_no[usize::from(a == "no")] += 1;
            }
            QuestionType::AudioComparative => {}
        }
    }
    assert!(
        yes_no[0] > 0 && yes_no[1] > 0,
        "yes/no both occur: {yes_no:?}"
    );
}

#[test]
fn cross_modal_retrieval_finds_same_prototype_far_above_chance_but_imperfectly() {
    let cfg = SyntheticConfig::default();
    let (s, meta) = generate_with_meta(&cfg).unwrap();
    let chance = 1.0 / cfg.n_prototypes as f32;
    let n = 5;
    let train_a = rows(&s.train.audio_key);
    let train_v = rows(&s.train.visual_key);
    // (a) val queries against the train bank, both directions
    for (q, bank, name) in [
        (rows(&s.val.audio_key), &train_v, "audio->visual"),
        (rows(&s.val.visual_key), &train_a, "visual->audio"),
    ] {
        let none = vec![None; q.len()];
        let hits = topn(&q, bank, n, &none);
        let mut top1 = 0usize;
        let mut at_n = 0usize;
        for (i, h) in hits.iter().enumerate() {
            let p = meta.val_prototypes[i];
            top1 += usize::from(meta.train_prototypes[h[0]] == p);
            at_n += h.iter().filter(|&&j| meta.train_prototypes[j] == p).count();
        }
        let p1 = top1 as f32 / q.len() as f32;
        let pn = at_n as f32 / (q.len() * n) as f32;
        eprintln!("{name}: precision@1 {p1:.3}, precision@{n} {pn:.3} (chance {chance:.3})");
        assert!(p1 > 10.0 * chance && p1 > 0.4, "{name}: precision@1 {p1}");
        assert!(
            pn < 0.98,
            "{name}: precision@{n} {pn}: retrieval should also return irrelevant candidates"
        );
    }
    // (b) train queries against the train bank with self-exclusion never return the clip itself
    let q = &train_a[..200];
    let ex: Vec<Option<usize>> = (0..200).map(Some).collect();
    let hits = topn(q, &train_v, n, &ex);
    let mut top1 = 0;
    for (i, h) in hits.iter().enumerate() {
        assert!(!h.contains(&i));
        top1 += usize::from(meta.train_prototypes[h[0]] == meta.train_prototypes[i]);
    }
    let p1 = top1 as f32 / 200.0;
    eprintln!("train self-excluded audio->visual precision@1 {p1:.3}");
    assert!(p1 > 10.0 * chance, "self-excluded precision@1 {p1}");
}

#[test]
fn config_round_trips_through_toml_and_json_and_rejects_bad_values() {
    let cfg = SyntheticConfig {
        seed: 7,
        la: 10,
        ..SyntheticConfig::default()
    };
    let t = toml::to_string(&cfg).unwrap();
    assert_eq!(toml::from_str::<SyntheticConfig>(&t).unwrap(), cfg);
    let j = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<SyntheticConfig>(&j).unwrap(), cfg);
    // partial configs take defaults
    let p: SyntheticConfig = toml::from_str("seed = 3\nn_train_clips = 50").unwrap();
    assert_eq!(
        p,
        SyntheticConfig {
            seed: 3,
            n_train_clips: 50,
            ..SyntheticConfig::default()
        }
    );
    assert!(toml::from_str::<SyntheticConfig>("n_trian_clips = 5").is_err());
    for (bad, needle) in [
        (
            SyntheticConfig {
                variation: 1.5,
                ..small()
            },
            "variation = 1.5",
        ),
        (
            SyntheticConfig {
                max_sources: 4,
                ..small()
            },
            "max_sources = 4",
        ),
        (SyntheticConfig { la: 2, ..small() }, "la = 2"),
        (
            SyntheticConfig {
                n_instruments: 13,
                ..small()
            },
            "n_instruments = 13",
        ),
        (
            SyntheticConfig {
                key_noise: f32::NAN,
                ..small()
            },
            "key_noise",
        ),
    ] {
        let e = generate(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn sizes_are_configurable() {
    let cfg = SyntheticConfig {
        n_train_clips: 20,
        n_val_clips: 3,
        n_test_clips: 4,
        questions_per_clip: 5,
        la: 5,
        da: 16,
        lv: 4,
        dv: 8,
        dk: 12,
        latent_dim: 8,
        n_instruments: 3,
        max_sources: 2,
        ..SyntheticConfig::default()
    };
    let s = generate(&cfg).unwrap();
    let d = s.dims();
    assert_eq!((d.la, d.da, d.lv, d.dv, d.dk), (5, 16, 4, 8, 12));
    assert_eq!(s.test.len(), 20);
    assert_eq!(s.train.audio.dims(), &[20, 5, 16]);
    assert_eq!(s.train.answer_vocab.len(), 6 + 3 + 3);
}
