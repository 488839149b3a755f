//! MemoryBank: the FAISS-style index (from_keys, with_ids, add, search -> ids, the rule for n,
//! query dtypes) and the model's row search (exclusion by clip id, negatives, gather, save/load).

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
    let r = b.search_rows(&q, 3, None).unwrap();
    let idx = r.indices.to_vec2::<u32>().unwrap();
    assert_eq!((idx[0][0], idx[1][0]), (4, 17));
    let own = [Some(1000 + 3 * 4), Some(1000 + 3 * 17)];
    let r = b.search_rows(&q, 3, Some(&own)).unwrap();
    let idx = r.indices.to_vec2::<u32>().unwrap();
    assert!(!idx[0].contains(&4) && !idx[1].contains(&17));
    // same as the reference with the row exclusion
    let ex = Tensor::from_vec(vec![4u32, 17], 2, &Device::Cpu).unwrap();
    let (_, ri) = cosine_topk_reference(&q, b.keys(), None, 3, Some(&ex)).unwrap();
    assert_eq!(idx, ri.to_vec2::<u32>().unwrap());
    // an id that is not in the bank, or None, excludes nothing
    let r = b.search_rows(&q, 3, Some(&[Some(7), None])).unwrap();
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
            .search_rows_negative(&q, 5, Some(&[Some(1000), Some(1006), Some(1003)]))
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
    let want = b
        .values()
        .unwrap()
        .get(9)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
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
            l.values()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.values()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let q = random((2, 7), 4);
        let (r1, r2) = (
            b.search_rows(&q, 4, None).unwrap(),
            l.search_rows(&q, 4, None).unwrap(),
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
    assert!(e.contains("id 2 appears twice"), "{e}");
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
    assert!(e.contains("keys must be [M, D]"), "{e}");
    let b = MemoryBank::new(keys, vals, vec![1, 2, 3, 4]).unwrap();
    assert_eq!(b.len(), 4);
    assert!(!b.is_empty());
    let q = random((2, 3), 5);
    let e = b.search_rows(&q, 1, Some(&[None])).unwrap_err().to_string();
    assert!(e.contains("exclude_ids has 1 entries for B = 2"), "{e}");
    let e = b
        .search_rows(&q, 4, Some(&[Some(1), None]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n = 4 exceeds the 3 bank rows left after exclusion"),
        "{e}"
    );
    let e = b
        .search_rows(&random((2, 5), 6), 1, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
}

// ---- FAISS-style index: from_keys / with_ids / add / search -> (scores, ids) ------------

use r2scp::bank::NO_ID;
use r2scp::retrieve::cosine_topk;

/// `search` returns the ids of the rows `cosine_topk` finds, with the same scores.
fn assert_search_is_topk(b: &MemoryBank, q: &Tensor, n: usize, what: &str) {
    let (s, ids) = b.search(q, n).unwrap();
    let (rs, rows) = cosine_topk(q, b.keys(), None, n, None).unwrap();
    let want: Vec<Vec<u32>> = rows
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&i| b.ids()[i as usize]).collect())
        .collect();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), want, "{what}");
    assert_eq!(
        s.to_vec2::<f32>().unwrap(),
        rs.to_vec2::<f32>().unwrap(),
        "{what}"
    );
}

#[test]
fn from_keys_search_returns_row_ids() {
    for kdt in [DType::F32, DType::F16, DType::BF16] {
        let keys = random((40, 8), 3).to_dtype(kdt).unwrap();
        let b = MemoryBank::from_keys(keys).unwrap();
        assert_eq!(b.ids(), (0..40).collect::<Vec<u32>>());
        assert!(b.values().is_none());
        assert_search_is_topk(&b, &random((5, 8), 4), 7, &format!("{kdt:?}"));
        let e = b.gather_values(&Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap());
        assert!(e.unwrap_err().to_string().contains("carries no values"));
    }
}

#[test]
fn with_ids_search_returns_user_ids() {
    let ids: Vec<u32> = (0..30).map(|i| 7919 * i + 13).collect();
    let b = MemoryBank::with_ids(random((30, 6), 5), ids).unwrap();
    assert_search_is_topk(&b, &random((4, 6), 6), 5, "with_ids");
    // a query that is a bank row finds that row's id first
    let (_, got) = b.search(&b.keys().narrow(0, 17, 1).unwrap(), 1).unwrap();
    assert_eq!(got.to_vec2::<u32>().unwrap(), [[7919 * 17 + 13]]);
}

#[test]
fn add_grows_the_bank_like_one_build() {
    let all = random((50, 9), 7);
    let mut grown = MemoryBank::from_keys(all.narrow(0, 0, 20).unwrap()).unwrap();
    grown.add(&all.narrow(0, 20, 25).unwrap()).unwrap();
    // f64 rows are stored in the bank's dtype
    grown
        .add(&all.narrow(0, 45, 5).unwrap().to_dtype(DType::F64).unwrap())
        .unwrap();
    let once = MemoryBank::from_keys(all).unwrap();
    assert_eq!(grown.len(), 50);
    assert_eq!(grown.ids(), once.ids());
    assert_eq!(grown.keys().dtype(), DType::F32);
    assert_eq!(
        grown.key_norms().to_vec1::<f32>().unwrap(),
        once.key_norms().to_vec1::<f32>().unwrap()
    );
    let q = random((6, 9), 8);
    let (a, b) = (grown.search(&q, 10).unwrap(), once.search(&q, 10).unwrap());
    assert_eq!(a.1.to_vec2::<u32>().unwrap(), b.1.to_vec2::<u32>().unwrap());
    assert_eq!(a.0.to_vec2::<f32>().unwrap(), b.0.to_vec2::<f32>().unwrap());
}

#[test]
fn add_refuses_taken_ids_and_leaves_the_bank_unchanged() {
    let mut b = MemoryBank::with_ids(random((3, 4), 9), vec![5, 6, 7]).unwrap();
    let e = b
        .add_with_ids(&random((2, 4), 10), &[8, 6])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "MemoryBank::add_with_ids: id 6 appears twice (rows 1 and 4); ids must be unique"
    );
    let e = b
        .add_with_ids(&random((2, 4), 10), &[8, NO_ID])
        .unwrap_err()
        .to_string();
    assert!(e.contains("reserved for NO_ID"), "{e}");
    let e = b.add_with_ids(&random((2, 5), 10), &[8, 9]).unwrap_err();
    assert!(
        e.to_string()
            .contains("keys have D = 5, the bank's keys D = 4"),
        "{e}"
    );
    let e = b.add_with_ids(&random((2, 4), 10), &[8]).unwrap_err();
    assert!(e.to_string().contains("1 ids given for R = 2"), "{e}");
    // sequential ids 3, 4 would collide with nothing here, but 5 is taken
    let e = b.add(&random((3, 4), 11)).unwrap_err().to_string();
    assert!(e.contains("id 5 appears twice"), "{e}");
    assert_eq!(b.len(), 3);
    assert_eq!(b.ids(), [5, 6, 7]);
    assert_eq!(b.keys().dim(0).unwrap(), 3);
    assert_eq!(b.row_of(8), None);
    b.add_with_ids(&random((2, 4), 12), &[8, 9]).unwrap();
    assert_eq!((b.len(), b.row_of(9)), (5, Some(4)));
    // non-float keys name the fix
    let e = b
        .add_with_ids(
            &Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap(),
            &[10],
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("convert with `keys.to_dtype(DType::F32)`"),
        "{e}"
    );
}

#[test]
fn add_to_a_bank_with_values() {
    let mut b = bank(10, 4, DType::F16);
    let e = b.add(&random((2, 4), 13)).unwrap_err().to_string();
    assert!(e.contains("add_with_values"), "{e}");
    let vals = random((2, 6), 14).reshape((2, 3, 2)).unwrap();
    b.add_with_values(&random((2, 4), 13), &vals, &[1, 2])
        .unwrap();
    assert_eq!(b.len(), 12);
    assert_eq!(b.keys().dtype(), DType::F16);
    let idx = Tensor::new(&[[11u32, 0]], &Device::Cpu).unwrap();
    let g = b.gather_values(&idx).unwrap();
    assert_eq!(
        g.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap(),
        vals.get(1).unwrap().to_vec2::<f32>().unwrap()
    );
    let e = b
        .add_with_values(&random((1, 4), 15), &random((1, 6), 16), &[3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("values must be [R = 1, [3, 2]...]"), "{e}");
    let mut plain = MemoryBank::from_keys(random((2, 4), 1)).unwrap();
    let e = plain
        .add_with_values(&random((1, 4), 15), &random((1, 6), 16), &[3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("carries no values"), "{e}");
}

#[test]
fn search_n_rule_is_faiss() {
    let b = MemoryBank::with_ids(random((4, 3), 17), vec![40, 41, 42, 43]).unwrap();
    let q = random((2, 3), 18);
    // n = 0: an error, as FAISS's IndexFlat::search (k > 0)
    let e = b.search(&q, 0).unwrap_err().to_string();
    assert_eq!(
        e,
        "MemoryBank::search: n = 0, expected n >= 1 (FAISS refuses k = 0 too)"
    );
    // n > M: the M rows, then NO_ID with score -inf
    let (s, ids) = b.search(&q, 6).unwrap();
    let (s4, ids4) = b.search(&q, 4).unwrap();
    let (s, ids, s4, ids4) = (
        s.to_vec2::<f32>().unwrap(),
        ids.to_vec2::<u32>().unwrap(),
        s4.to_vec2::<f32>().unwrap(),
        ids4.to_vec2::<u32>().unwrap(),
    );
    for r in 0..2 {
        assert_eq!(&ids[r][..4], &ids4[r][..]);
        assert_eq!(&s[r][..4], &s4[r][..]);
        assert_eq!(&ids[r][4..], &[NO_ID, NO_ID]);
        assert_eq!(&s[r][4..], &[f32::NEG_INFINITY, f32::NEG_INFINITY]);
    }
    // an empty bank returns only padding, after the query checks
    let empty =
        MemoryBank::from_keys(Tensor::zeros((0, 3), DType::BF16, &Device::Cpu).unwrap()).unwrap();
    assert!(empty.is_empty());
    let (s, ids) = empty.search(&q, 2).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), [[NO_ID; 2]; 2]);
    assert_eq!(s.to_vec2::<f32>().unwrap(), [[f32::NEG_INFINITY; 2]; 2]);
    let e = empty
        .search(&random((2, 5), 19), 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("query dimension D = 5 does not match the keys' D = 3"),
        "{e}"
    );
    // ... and grows from empty
    let mut grown = empty;
    grown.add(&random((3, 3), 20)).unwrap();
    assert_eq!(grown.ids(), [0, 1, 2]);
    assert_eq!(grown.keys().dtype(), DType::BF16);
}

#[test]
fn search_accepts_any_float_query_dtype() {
    for kdt in [DType::F32, DType::F16, DType::BF16] {
        let b = MemoryBank::from_keys(random((25, 16), 21).to_dtype(kdt).unwrap()).unwrap();
        // queries exactly representable in bf16 and f16, so every dtype is the same query
        let q = random((3, 16), 22)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let (want_s, want_i) = b.search(&q, 5).unwrap();
        for qdt in [DType::F16, DType::BF16, DType::F64] {
            let (s, i) = b.search(&q.to_dtype(qdt).unwrap(), 5).unwrap();
            assert_eq!(
                i.to_vec2::<u32>().unwrap(),
                want_i.to_vec2::<u32>().unwrap(),
                "{kdt:?} bank, {qdt:?} queries"
            );
            assert_eq!(
                s.to_vec2::<f32>().unwrap(),
                want_s.to_vec2::<f32>().unwrap(),
                "{kdt:?} bank, {qdt:?} queries"
            );
        }
        let e = b
            .search(&q.to_dtype(DType::U32).unwrap(), 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("queries dtype U32 is not a float dtype"), "{e}");
    }
}

#[test]
fn keys_of_any_float_dtype_build_a_bank() {
    let k64 = random((6, 4), 23).to_dtype(DType::F64).unwrap();
    let b = MemoryBank::from_keys(k64).unwrap();
    assert_eq!(b.keys().dtype(), DType::F32);
    let e = MemoryBank::from_keys(Tensor::zeros((6, 4), DType::U8, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "MemoryBank::from_keys: keys dtype U8 is not a float dtype, expected f32, f16 or bf16 (convert with `keys.to_dtype(DType::F32)`)"
    );
    let e = MemoryBank::with_ids(random((2, 4), 1), vec![1, NO_ID])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("id 4294967295 (row 1) is reserved for NO_ID"),
        "{e}"
    );
}

#[test]
fn save_load_a_bank_without_values() {
    let dir = tempfile::tempdir().unwrap();
    let b = MemoryBank::with_ids(random((9, 5), 24), (100..109).collect()).unwrap();
    let p = dir.path().join("plain.safetensors");
    b.save(&p).unwrap();
    let l = MemoryBank::load(&p, &Device::Cpu).unwrap();
    assert!(l.values().is_none());
    assert_eq!(l.ids(), b.ids());
    let q = random((2, 5), 25);
    assert_eq!(
        l.search(&q, 3).unwrap().1.to_vec2::<u32>().unwrap(),
        b.search(&q, 3).unwrap().1.to_vec2::<u32>().unwrap()
    );
}
