//! MemoryBank: search with exclusion by clip id, negatives, gather, save/load.

use candle_core::{DType, Device, Tensor};
use r2scp::bank::MemoryBank;
use r2scp::retrieve::cosine_topk_reference;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: (usize, usize), seed: u64) -> Tensor {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bank(m: usize, dk: usize, kdt: DType) -> MemoryBank {
    let keys = random((m, dk), 1).to_dtype(kdt).unwrap();
    let values = random((m, 6), 2).reshape((m, 3, 2)).unwrap();
    let ids: Vec<u32> = (0..m as u32).map(|i| 1000 + 3 * i).collect();
    MemoryBank::new(keys, values, ids).unwrap()
}

#[test]
fn search_excludes_own_clip_by_id() {
    let b = bank(50, 16, DType::F32);
    // queries are bank rows 4 and 17 themselves
    let q = Tensor::cat(
        &[
            b.keys().narrow(0, 4, 1).unwrap(),
            b.keys().narrow(0, 17, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let r = b.search(&q, 3, None).unwrap();
    let idx = r.indices.to_vec2::<u32>().unwrap();
    assert_eq!((idx[0][0], idx[1][0]), (4, 17));
    let own = [Some(1000 + 3 * 4), Some(1000 + 3 * 17)];
    let r = b.search(&q, 3, Some(&own)).unwrap();
    let idx = r.indices.to_vec2::<u32>().unwrap();
    assert!(!idx[0].contains(&4) && !idx[1].contains(&17));
    // same as the reference with the row exclusion
    let ex = Tensor::from_vec(vec![4u32, 17], 2, &Device::Cpu).unwrap();
    let (_, ri) = cosine_topk_reference(&q, b.keys(), None, 3, Some(&ex)).unwrap();
    assert_eq!(idx, ri.to_vec2::<u32>().unwrap());
    // an id that is not in the bank, or None, excludes nothing
    let r = b.search(&q, 3, Some(&[Some(7), None])).unwrap();
    let idx = r.indices.to_vec2::<u32>().unwrap();
    assert_eq!((idx[0][0], idx[1][0]), (4, 17));
    assert_eq!(b.row_of(1000 + 3 * 17), Some(17));
    assert_eq!(b.row_of(1001), None);
}

#[test]
fn search_negative_returns_least_similar_ascending() {
    for kdt in [DType::F32, DType::F16, DType::BF16] {
        let b = bank(40, 9, kdt);
        let q = random((3, 9), 9);
        let r = b
            .search_negative(&q, 5, Some(&[Some(1000), Some(1006), Some(1003)]))
            .unwrap();
        let s = r.scores.to_vec2::<f32>().unwrap();
        let idx = r.indices.to_vec2::<u32>().unwrap();
        let ex = Tensor::from_vec(vec![0u32, 2, 1], 3, &Device::Cpu).unwrap();
        let (all_s, all_i) = cosine_topk_reference(&q, b.keys(), None, 39, Some(&ex)).unwrap();
        let all_s = all_s.to_vec2::<f32>().unwrap();
        let all_i = all_i.to_vec2::<u32>().unwrap();
        for qi in 0..3 {
            for j in 0..5 {
                // least similar first: the reference's tail, reversed
                let k = 38 - j;
                assert!(
                    (s[qi][j] - all_s[qi][k]).abs() < 1e-5,
                    "{kdt:?} q {qi} pos {j}"
                );
                if j > 0 {
                    assert!(s[qi][j] >= s[qi][j - 1]);
                }
            }
            if all_s[qi][38] < all_s[qi][37] - 1e-4 {
                assert_eq!(idx[qi][0], all_i[qi][38]);
            }
        }
        assert!(!idx[0].contains(&0) && !idx[1].contains(&2) && !idx[2].contains(&1));
    }
}

#[test]
fn gather_values_shape_and_content() {
    let b = bank(10, 4, DType::F32);
    let idx = Tensor::from_vec(vec![3u32, 0, 9, 3], (2, 2), &Device::Cpu).unwrap();
    let g = b.gather_values(&idx).unwrap();
    assert_eq!(g.dims(), [2, 2, 3, 2]);
    let want = b.values().get(9).unwrap().to_vec2::<f32>().unwrap();
    let got = g.get(1).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got, want);
    let bad = Tensor::from_vec(vec![10u32], (1, 1), &Device::Cpu).unwrap();
    let e = b.gather_values(&bad).unwrap_err().to_string();
    assert!(e.contains("index 10 out of range for M = 10"), "{e}");
    let e = b
        .gather_values(&Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, n]"), "{e}");
}

#[test]
fn save_load_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    for kdt in [DType::F32, DType::F16] {
        let b = bank(33, 7, kdt);
        let p = dir.path().join(format!("bank_{kdt:?}.safetensors"));
        b.save(&p).unwrap();
        let l = MemoryBank::load(&p, &Device::Cpu).unwrap();
        assert_eq!(l.ids(), b.ids());
        assert_eq!(l.keys().dtype(), kdt);
        assert_eq!(
            l.keys()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            b.keys()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
        assert_eq!(
            l.values().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.values().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let q = random((2, 7), 4);
        let (r1, r2) = (
            b.search(&q, 4, None).unwrap(),
            l.search(&q, 4, None).unwrap(),
        );
        assert_eq!(
            r1.indices.to_vec2::<u32>().unwrap(),
            r2.indices.to_vec2::<u32>().unwrap()
        );
    }
    let e = MemoryBank::load(&dir.path().join("missing.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn construction_and_search_errors() {
    let keys = random((4, 3), 1);
    let vals = random((4, 2), 2);
    let e = MemoryBank::new(keys.clone(), vals.clone(), vec![1, 2, 2, 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("clip id 2 appears twice"), "{e}");
    let e = MemoryBank::new(keys.clone(), vals.clone(), vec![1, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 ids given for M = 4"), "{e}");
    let e = MemoryBank::new(keys.clone(), random((5, 2), 3), vec![1, 2, 3, 4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("values must be [M = 4"), "{e}");
    let e = MemoryBank::new(keys.flatten_all().unwrap(), vals.clone(), vec![1, 2, 3, 4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("keys must be [M, Dk]"), "{e}");
    let b = MemoryBank::new(keys, vals, vec![1, 2, 3, 4]).unwrap();
    assert_eq!(b.len(), 4);
    assert!(!b.is_empty());
    let q = random((2, 3), 5);
    let e = b.search(&q, 1, Some(&[None])).unwrap_err().to_string();
    assert!(e.contains("exclude_ids has 1 entries for B = 2"), "{e}");
    let e = b
        .search(&q, 4, Some(&[Some(1), None]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n = 4 exceeds the 3 bank rows left after exclusion"),
        "{e}"
    );
    let e = b
        .search(&random((2, 5), 6), 1, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
}
