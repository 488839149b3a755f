//! Batching and missing-modality simulation: coverage, determinism, exact zeroing of a missing
//! modality (and the real values for present ones), masks, errors.

use candle_core::{Device, Tensor};
use r2scp::data::{
    batches, generate, Missing, MissingPolicy, MissingSim, MissingType, Modality, Splits,
    SyntheticConfig,
};

fn data() -> Splits {
    generate(&SyntheticConfig {
        n_train_clips: 60,
        n_val_clips: 10,
        n_test_clips: 10,
        n_prototypes: 8,
        ..SyntheticConfig::default()
    })
    .unwrap()
}

fn row3(t: &Tensor, i: usize) -> Vec<Vec<f32>> {
    t.get(i).unwrap().to_vec2::<f32>().unwrap()
}

fn row2(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i).unwrap().to_vec1::<f32>().unwrap()
}

/// Issue 19, case 6: every question used to be padded to the longest of all three splits
/// (one 2,000-word question made every batch 2,000 tokens wide); a batch is now as wide as
/// its own longest question.
#[test]
fn a_batch_is_padded_to_its_own_longest_question() {
    let s = data();
    let ds = &s.train;
    let lq = ds.dims().lq;
    let short: Vec<usize> = (0..ds.len()).filter(|&r| ds.question_len[r] < lq).collect();
    let longest = short.iter().map(|&r| ds.question_len[r]).max().unwrap();
    assert!(longest < lq, "the synthetic set has shorter questions");
    for rows in [&short[..], &short[..1]] {
        let b = ds
            .batch(rows, &MissingPolicy::Complete, &Device::Cpu)
            .unwrap();
        let want = rows.iter().map(|&r| ds.question_len[r]).max().unwrap();
        assert_eq!(b.question.dims(), &[rows.len(), want]);
        assert_eq!(b.question_mask.dims(), &[rows.len(), want]);
        let mask = b.question_mask.to_vec2::<f32>().unwrap();
        for (i, &r) in rows.iter().enumerate() {
            let real = mask[i].iter().filter(|&&m| m == 1.0).count();
            assert_eq!(real, ds.question_len[r]);
        }
    }
}

#[test]
fn batches_cover_every_question_once_in_seeded_order() {
    let s = data();
    let ds = &s.train;
    let dev = Device::Cpu;
    let collect = |seed: Option<u64>| -> Vec<usize> {
        let it = batches(ds, 32, seed, MissingPolicy::Complete, &dev);
        assert_eq!(it.size_hint().0, ds.len().div_ceil(32));
        it.flat_map(|b| b.unwrap().rows).collect()
    };
    let plain = collect(None);
    assert_eq!(plain, (0..ds.len()).collect::<Vec<_>>());
    let a = collect(Some(5));
    let b = collect(Some(5));
    let c = collect(Some(6));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, plain);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, plain);
    // remainder batch kept
    let sizes: Vec<usize> = batches(ds, 50, Some(1), MissingPolicy::Complete, &dev)
        .map(|b| b.unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), ds.len());
    assert_eq!(*sizes.last().unwrap(), ds.len() - 50 * (sizes.len() - 1));
}

#[test]
fn batch_contents_match_the_dataset_and_missing_modalities_are_zeroed() {
    let s = data();
    let ds = &s.train;
    let dev = Device::Cpu;
    let sim = MissingSim {
        rate: 0.5,
        kind: MissingType::Mixed,
        seed: 3,
    };
    let mut seen = [0usize; 3];
    for b in batches(ds, 16, Some(2), MissingPolicy::Simulated(sim), &dev) {
        let b = b.unwrap();
        let n = b.len();
        let dims = ds.dims();
        assert_eq!(b.audio.dims(), &[n, dims.la, dims.da]);
        assert_eq!(b.visual.dims(), &[n, dims.lv, dims.dv]);
        assert_eq!(b.audio_key.dims(), &[n, dims.dk]);
        // Padded to the batch's longest question.
        let lb = b.rows.iter().map(|&r| ds.question_len[r]).max().unwrap();
        assert!(lb <= dims.lq);
        assert_eq!(b.question.dims(), &[n, lb]);
        assert_eq!(b.question_mask.dims(), &[n, lb]);
        let q = b.question.to_vec2::<u32>().unwrap();
        let qm = b.question_mask.to_vec2::<f32>().unwrap();
        let ans = b.answer.to_vec1::<u32>().unwrap();
        let pa = b
            .present(Modality::Audio)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let pv = b
            .present(Modality::Visual)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..n {
            let r = b.rows[i];
            let c = ds.clip_of[r];
            assert_eq!(b.missing[i], sim.decide(r));
            assert_eq!(b.clip_ids[i], ds.clip_ids[c]);
            assert_eq!(b.qtypes[i], ds.qtypes[r]);
            assert_eq!(ans[i], ds.answers[r]);
            assert_eq!(
                q[i],
                ds.questions.get(r).unwrap().to_vec1::<u32>().unwrap()[..lb]
            );
            let len = ds.question_len[r];
            for (t, &m) in qm[i].iter().enumerate() {
                assert_eq!(m, if t < len { 1.0 } else { 0.0 });
                assert_eq!(q[i][t] == 0, t >= len);
            }
            seen[match b.missing[i] {
                Missing::None => 0,
                Missing::Audio => 1,
                Missing::Visual => 2,
            }] += 1;
            for (m, feat, key, src, src_key, present) in [
                (
                    Modality::Audio,
                    &b.audio,
                    &b.audio_key,
                    &ds.audio,
                    &ds.audio_key,
                    &pa,
                ),
                (
                    Modality::Visual,
                    &b.visual,
                    &b.visual_key,
                    &ds.visual,
                    &ds.visual_key,
                    &pv,
                ),
            ] {
                let got = row3(feat, i);
                let got_key = row2(key, i);
                if b.missing[i].is_missing(m) {
                    assert_eq!(present[i], 0.0);
                    assert!(
                        got.iter().flatten().all(|&x| x == 0.0),
                        "{m} features not zeroed"
                    );
                    assert!(got_key.iter().all(|&x| x == 0.0), "{m} key not zeroed");
                } else {
                    assert_eq!(present[i], 1.0);
                    assert_eq!(got, row3(src, c));
                    assert_eq!(got_key, row2(src_key, c));
                }
            }
        }
    }
    assert!(
        seen.iter().all(|&x| x > 10),
        "all three cases occur: {seen:?}"
    );
}

#[test]
fn eval_settings_drop_one_modality_for_everyone() {
    let s = data();
    let dev = Device::Cpu;
    for policy in MissingPolicy::EVAL_SETTINGS {
        for b in batches(&s.test, 7, None, policy, &dev) {
            let b = b.unwrap();
            let want = policy.decide(0);
            assert!(b.missing.iter().all(|&m| m == want));
            let a = b
                .audio
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let v = b
                .visual
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(a == 0.0, want == Missing::Audio, "{}", policy.name());
            assert_eq!(v == 0.0, want == Missing::Visual, "{}", policy.name());
        }
    }
    assert_eq!(
        MissingPolicy::EVAL_SETTINGS.map(|p| p.name()),
        ["missing-audio", "missing-visual", "complete"]
    );
}

#[test]
fn exclude_ids_name_each_samples_own_clip() {
    let s = data();
    let b = s
        .train
        .batch(&[0, 5, 9], &MissingPolicy::Complete, &Device::Cpu)
        .unwrap();
    let ex = b.exclude_ids();
    assert_eq!(ex, b.clip_ids.iter().map(|&c| Some(c)).collect::<Vec<_>>());
}

#[test]
fn bad_arguments_are_errors_naming_the_value() {
    let s = data();
    let dev = Device::Cpu;
    let mut it = batches(&s.train, 0, None, MissingPolicy::Complete, &dev);
    let e = it.next().unwrap().unwrap_err().to_string();
    assert!(e.contains("batch_size = 0"), "{e}");
    assert!(it.next().is_none());
    let bad = MissingPolicy::Simulated(MissingSim {
        rate: -0.1,
        kind: MissingType::Audio,
        seed: 0,
    });
    let e = batches(&s.train, 4, None, bad, &dev)
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("-0.1"), "{e}");
    let n = s.train.len();
    let e = s
        .train
        .batch(&[n], &MissingPolicy::Complete, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&n.to_string()), "{e}");
    assert!(s.train.batch(&[], &MissingPolicy::Complete, &dev).is_err());
}

#[test]
fn policies_serialise() {
    let p = MissingPolicy::Simulated(MissingSim {
        rate: 0.3,
        kind: MissingType::Visual,
        seed: 9,
    });
    let j = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<MissingPolicy>(&j).unwrap(), p);
    let a: MissingPolicy = serde_json::from_str(r#"{"all":"audio"}"#).unwrap();
    assert_eq!(a, MissingPolicy::All(Modality::Audio));
    assert_eq!("mixed".parse::<MissingType>().unwrap(), MissingType::Mixed);
    assert!("both".parse::<MissingType>().is_err());
}
