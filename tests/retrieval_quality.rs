//! Retrieval quality (`r2scp::trainer::retrieval_quality`): the top-1 answer agreement is
//! 1 when every test clip has an exact copy in the bank, drops when the answers do not
//! match, and every search mode beats chance on the synthetic set.

use candle_core::Device;
use r2scp::data::{generate, Splits, SyntheticConfig};
use r2scp::model::{Banks, RetrievalQuery};
use r2scp::trainer::retrieval_quality::{measure, RetrievalQuality};

const MODES: [RetrievalQuery; 4] = [
    RetrievalQuery::CrossKey,
    RetrievalQuery::SameKey,
    RetrievalQuery::SameFeatures,
    RetrievalQuery::SameKeyAndFeatures,
];

fn small() -> Splits {
    generate(&SyntheticConfig {
        seed: 3,
        n_train_clips: 60,
        n_val_clips: 8,
        n_test_clips: 8,
        n_prototypes: 12,
        ..Default::default()
    })
    .expect("synthetic data")
}

fn agreement(q: &[RetrievalQuality], setting: &str) -> f64 {
    q.iter()
        .find(|x| x.setting == setting)
        .and_then(RetrievalQuality::agreement)
        .expect("setting measured")
}

#[test]
fn exact_copies_agree_and_wrong_answers_do_not() {
    let mut s = small();
    // The test split becomes a copy of the train split under new clip ids: the
    // same-view search finds each clip's twin (cosine 1), asked the same questions.
    s.test = s.train.clone();
    for id in s.test.clip_ids.iter_mut() {
        *id += 100_000;
    }
    let dev = Device::Cpu;
    let banks = Banks::from_dataset(&s.train, &dev).unwrap();
    for q in [
        RetrievalQuery::SameFeatures,
        RetrievalQuery::SameKey,
        RetrievalQuery::SameKeyAndFeatures,
    ] {
        let r = measure(&s, &banks, q, 32, &dev).unwrap();
        assert_eq!(r.len(), 2);
        for x in &r {
            assert_eq!(x.queries, s.test.len());
            assert_eq!(
                x.covered, x.queries,
                "{q:?} {}: every twin covered",
                x.setting
            );
            assert_eq!(x.agree, x.queries, "{q:?} {}: every twin agrees", x.setting);
        }
    }
    // Rotate the test answers among the answer classes: the twins now disagree.
    let n_ans = s.test.answer_vocab.len() as u32;
    for a in s.test.answers.iter_mut() {
        *a = (*a + 1) % n_ans;
    }
    let r = measure(&s, &banks, RetrievalQuery::SameFeatures, 32, &dev).unwrap();
    for x in &r {
        assert_eq!(x.agree, 0, "{}: rotated answers still agree", x.setting);
        assert_eq!(x.agreement(), Some(0.0));
    }
}

#[test]
fn every_search_beats_chance_on_the_synthetic_set() {
    let s = generate(&SyntheticConfig::default()).expect("synthetic data");
    let dev = Device::Cpu;
    let banks = Banks::from_dataset(&s.train, &dev).unwrap();
    for q in MODES {
        let r = measure(&s, &banks, q, 256, &dev).unwrap();
        for setting in ["missing-audio", "missing-visual"] {
            let a = agreement(&r, setting);
            let cov = r.iter().find(|x| x.setting == setting).unwrap().coverage();
            println!("{q:?} {setting}: top-1 answer agreement {a:.3} (coverage {cov:.2})");
            // Answers of one question have at most 17 classes; chance is far below 0.3.
            assert!(a > 0.3, "{q:?} {setting}: agreement {a}");
        }
    }
}
