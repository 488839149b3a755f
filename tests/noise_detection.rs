//! What a noise detector can reach on the synthetic set: the noise tokens of the test
//! split's recovered sequences (`data::noise_tokens`, docs/DATA.md) under the default
//! search and the paper's, and how many of them any signal inside the retrieval could
//! point at. Printed with `--nocapture`; figures in docs/DESIGN.md ("CAP that finds the
//! noise") come from `cargo test --release --test noise_detection -- --nocapture`.

use candle_core::Device;
use r2scp::data::{
    batches, generate_with_meta, noise_tokens, MissingPolicy, Modality, SyntheticConfig,
};
use r2scp::model::{recovery::search, Banks, RetrievalQuery};

/// One synthetic set with its token content and banks.
struct Data {
    cfg: SyntheticConfig,
    splits: r2scp::data::Splits,
    meta: r2scp::data::SyntheticMeta,
    banks: Banks,
}

/// Per missing setting: (chance, share of noise tokens where a majority of the n
/// retrieved clips show the same (wrong) content, share of noise tokens that show an
/// instrument the query's available modality cannot have (missing audio: a class that is
/// not in the picture; a picture cannot contradict sound, since silent sources are
/// visible), precision of picking the k = 2 positions where the retrieved
/// clips disagree most, precision of the 2 positions most often noise).
fn bounds(data: &Data, query: RetrievalQuery, m: Modality) -> anyhow::Result<[f64; 5]> {
    let Data {
        cfg,
        splits,
        meta,
        banks,
    } = data;
    let dev = Device::Cpu;
    let (l, train_c, test_c) = match m {
        Modality::Audio => (
            cfg.la,
            &meta.train_content.audio,
            &meta.test_content.audio_scene,
        ),
        Modality::Visual => (
            cfg.lv,
            &meta.train_content.visual,
            &meta.test_content.visual_scene,
        ),
    };
    let (k, n) = (2, 3);
    let (mut rows, mut noise_n, mut agreed, mut hits) = (0usize, 0usize, 0usize, 0usize);
    let mut visible = 0usize;
    let mut per_pos = vec![0usize; l];
    for batch in batches(&splits.test, 128, None, MissingPolicy::All(m), &dev) {
        let batch = batch?;
        let all: Vec<u32> = (0..batch.len() as u32).collect();
        let found = search(query, banks, &batch, m, &all, n, false)?
            .indices
            .to_vec2::<u32>()?;
        for (j, cands) in found.iter().enumerate() {
            let clip = splits.test.clip_of[batch.rows[j]];
            let own = &test_c[clip * l..(clip + 1) * l];
            let got: Vec<&[u32]> = cands
                .iter()
                .map(|&c| &train_c[c as usize * l..(c as usize + 1) * l])
                .collect();
            let noise = noise_tokens(own, &got);
            let distinct = |i: usize| {
                let mut v: Vec<u32> = got.iter().map(|r| r[i]).collect();
                v.sort_unstable();
                v.dedup();
                v.len()
            };
            rows += 1;
            for i in (0..l).filter(|&i| noise[i]) {
                noise_n += 1;
                per_pos[i] += 1;
                let codes: Vec<u32> = got.iter().map(|r| r[i]).collect();
                let top = codes
                    .iter()
                    .map(|c| codes.iter().filter(|d| *d == c).count())
                    .max()
                    .unwrap_or(0);
                agreed += usize::from(2 * top > n);
                if m == Modality::Audio {
                    // classes in the query's picture (visual code = 1 + class, 0 = empty)
                    let seen: Vec<u32> = meta.test_content.visual_scene
                        [clip * cfg.lv..(clip + 1) * cfg.lv]
                        .iter()
                        .filter(|&&v| v > 0)
                        .map(|v| v - 1)
                        .collect();
                    // audio code = 1 + 4 class + loudness - 1; 0 = silence
                    let unseen = |c: u32| c > 0 && !seen.contains(&((c - 1) / 4));
                    let wrong = codes.iter().filter(|&&c| unseen(c)).count();
                    visible += usize::from(2 * wrong > n);
                }
            }
            let mut order: Vec<usize> = (0..l).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(distinct(i))); // stable: ties to the lower index
            hits += order[..k].iter().filter(|&&i| noise[i]).count();
        }
    }
    let mut pos: Vec<usize> = per_pos.clone();
    pos.sort_unstable_by(|a, b| b.cmp(a));
    Ok([
        noise_n as f64 / (rows * l) as f64,
        agreed as f64 / noise_n.max(1) as f64,
        visible as f64 / noise_n.max(1) as f64,
        hits as f64 / (rows * k) as f64,
        pos[..k].iter().sum::<usize>() as f64 / (rows * k) as f64,
    ])
}

#[test]
fn the_default_search_leaves_noise_that_phase_one_cannot_see() -> anyhow::Result<()> {
    for seed in [0, 1] {
        let cfg = SyntheticConfig {
            seed,
            ..Default::default()
        };
        let (splits, meta) = generate_with_meta(&cfg)?;
        let banks = Banks::from_dataset(&splits.train, &Device::Cpu)?;
        let data = Data {
            cfg,
            splits,
            meta,
            banks,
        };
        for (query, name) in [
            (
                RetrievalQuery::SameKeyAndFeatures,
                "default (same_key_and_features)",
            ),
            (RetrievalQuery::CrossKey, "paper (cross_key)"),
        ] {
            for m in Modality::ALL {
                let [chance, agreed, visible, disagreement, prior] = bounds(&data, query, m)?;
                println!(
                    "seed {seed}, {name}, missing {m}: noise share (chance) {:.1}%, noise where most \
                     clips agree {:.1}%, noise contradicting the available modality {:.1}%, precision@2 of clip disagreement {:.1}%, of the \
                     positional prior {:.1}%",
                    100.0 * chance,
                    100.0 * agreed,
                    100.0 * visible,
                    100.0 * disagreement,
                    100.0 * prior
                );
                assert!((0.05..0.7).contains(&chance), "noise share {chance}");
                if m == Modality::Visual {
                    assert_eq!(visible, 0.0, "a picture cannot contradict a sound");
                }
                if query == RetrievalQuery::SameKeyAndFeatures {
                    // The default search finds clips that look like the query's available
                    // modality; what they get wrong they mostly get wrong together, and
                    // the available modality cannot see most of it.
                    assert!(agreed > 0.7, "seed {seed} {m}: agreed {agreed}");
                    assert!(visible < 0.25, "seed {seed} {m}: visible {visible}");
                    assert!(
                        disagreement < 1.5 * chance,
                        "seed {seed} {m}: {disagreement} vs chance {chance}"
                    );
                }
            }
        }
    }
    Ok(())
}
