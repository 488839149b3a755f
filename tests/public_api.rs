//! The library as an outside crate sees it: only what the rendered docs show (`prelude`,
//! the root re-exports, [`r2scp::Error`]), built without the `cli` feature in CI's
//! `--no-default-features` clippy and test runs. Retrieval end to end, the error contract
//! under `RUST_BACKTRACE=1` (one line; the backtrace on request), the debug-build key-norm
//! check and the no-gradient rule of retrieval scores.
//!
//! Every test first calls [`backtraces_on`]: the standard library decides once per process
//! whether backtraces are captured, so the variables must be set before any error exists.

use candle_core::{DType, Device, Tensor, Var, D};
use r2scp::prelude::*;
use std::backtrace::BacktraceStatus;
use std::sync::Once;

fn backtraces_on() {
    static ON: Once = Once::new();
    ON.call_once(|| {
        // Set before any thread of this test binary captures a backtrace (every test calls
        // this first, and `Once` holds the others until it returns).
        std::env::set_var("RUST_BACKTRACE", "1");
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
    });
}

fn rand(shape: (usize, usize), seed: u64) -> Tensor {
    // a small LCG: the test needs no RNG crate, as an outside user's would not
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn retrieval_from_the_docs() -> Result<(), Box<dyn std::error::Error>> {
    backtraces_on();
    let dev = Device::Cpu;
    let keys = rand((500, 32), 1).to_dtype(DType::F16)?;
    let mut bank = MemoryBank::from_keys(keys.narrow(0, 0, 400)?)?;
    bank.add(&keys.narrow(0, 400, 100)?)?;
    assert_eq!(bank.len(), 500);
    // f32 queries on an f16 bank: each key finds itself
    let queries = keys.narrow(0, 123, 4)?.to_dtype(DType::F32)?;
    let (scores, ids) = bank.search(&queries, 3)?;
    assert_eq!(
        ids.to_vec2::<u32>()?
            .iter()
            .map(|r| r[0])
            .collect::<Vec<_>>(),
        [123, 124, 125, 126]
    );
    for row in scores.to_vec2::<f32>()? {
        assert!((row[0] - 1.0).abs() < 1e-3 && row[0] >= row[1] && row[1] >= row[2]);
    }
    // the op on the same tensors, skipping each query's own row
    let norms = key_norms(&keys)?;
    let exclude = Tensor::new(&[123u32, 124, 125, 126], &dev)?;
    let (_, rows) = cosine_topk(&queries, &keys, Some(&norms), 2, Some(&exclude))?;
    let rows = rows.to_vec2::<u32>()?;
    let ids = ids.to_vec2::<u32>()?;
    for q in 0..4 {
        assert_eq!(rows[q], ids[q][1..], "query {q}: the next two rows");
    }
    // more than the bank holds: FAISS's padding
    let small = MemoryBank::with_ids(keys.narrow(0, 0, 2)?, vec![9, 8])?;
    let (s, ids) = small.search(&queries, 3)?;
    assert_eq!(ids.to_vec2::<u32>()?[0][2], NO_ID);
    assert_eq!(s.to_vec2::<f32>()?[0][2], f32::NEG_INFINITY);
    Ok(())
}

/// Each case: an r2scp call that must fail, and a word its message must hold.
fn error_cases() -> Vec<(&'static str, r2scp::Result<()>, &'static str)> {
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    let keys = rand((6, 4), 2);
    let q = rand((2, 4), 3);
    let nan_q = t(vec![f32::NAN, 0., 0., 0.], &[1, 4]);
    let u32_t = |s: &[usize]| Tensor::zeros(s, DType::U32, &dev).unwrap();
    let bank = MemoryBank::new(keys.clone(), rand((6, 2), 4), (10..16).collect()).unwrap();
    let plain = MemoryBank::from_keys(keys.clone()).unwrap();
    let p = rand((2, 12), 5).reshape((2, 3, 4)).unwrap();
    let h = rand((2, 8), 6).reshape((2, 2, 4)).unwrap();
    let tok = Context::Tokens {
        h_avl: &h,
        mask: None,
    };
    let mut nan_p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    nan_p[5] = f32::NAN;
    let nan_p = t(nan_p, &[2, 3, 4]);
    let scores = rand((2, 5), 7);
    let nan_scores = t(vec![0.1, f32::NAN, 0.3], &[1, 3]);
    let idx = |v: Vec<u32>| Tensor::from_vec(v, (2, 2), &dev).unwrap();
    let src = rand((2, 8), 8).reshape((2, 2, 4)).unwrap();
    let unit = |r: r2scp::Result<(Tensor, Tensor)>| r.map(|_| ());
    let mut grow = plain.clone();
    let dir = std::env::temp_dir().join(format!("r2scp-public-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    vec![
        (
            "cosine_topk n = 0",
            unit(cosine_topk(&q, &keys, None, 0, None)),
            "n = 0",
        ),
        (
            "cosine_topk n > M",
            unit(cosine_topk(&q, &keys, None, 7, None)),
            "n = 7",
        ),
        (
            "cosine_topk D",
            unit(cosine_topk(&rand((2, 3), 9), &keys, None, 1, None)),
            "D = 3",
        ),
        (
            "cosine_topk rank 1 queries",
            unit(cosine_topk(&q.flatten_all().unwrap(), &keys, None, 1, None)),
            "[B, D]",
        ),
        (
            "cosine_topk rank 3 keys",
            unit(cosine_topk(&q, &keys.unsqueeze(0).unwrap(), None, 1, None)),
            "[M, D]",
        ),
        (
            "cosine_topk f64 keys",
            unit(cosine_topk(
                &q,
                &keys.to_dtype(DType::F64).unwrap(),
                None,
                1,
                None,
            )),
            "F64",
        ),
        (
            "cosine_topk u32 queries",
            unit(cosine_topk(&u32_t(&[2, 4]), &keys, None, 1, None)),
            "U32",
        ),
        (
            "cosine_topk norms shape",
            unit(cosine_topk(&q, &keys, Some(&t(vec![1.; 5], &[5])), 1, None)),
            "key_norms",
        ),
        (
            "cosine_topk norms dtype",
            unit(cosine_topk(&q, &keys, Some(&u32_t(&[6])), 1, None)),
            "key_norms",
        ),
        (
            "cosine_topk exclude range",
            unit(cosine_topk(
                &q,
                &keys,
                None,
                1,
                Some(&Tensor::new(&[0u32, 6], &dev).unwrap()),
            )),
            "exclude[1] = 6",
        ),
        (
            "cosine_topk exclude dtype",
            unit(cosine_topk(
                &q,
                &keys,
                None,
                1,
                Some(&t(vec![0., 1.], &[2])),
            )),
            "exclude",
        ),
        (
            "cosine_topk exclude shape",
            unit(cosine_topk(&q, &keys, None, 1, Some(&u32_t(&[3])))),
            "exclude",
        ),
        (
            "cosine_topk NaN",
            unit(cosine_topk(&nan_q, &keys, None, 1, None)),
            "NaN",
        ),
        (
            "cosine_topk D = 0",
            unit(cosine_topk(
                &Tensor::zeros((2, 0), DType::F32, &dev).unwrap(),
                &Tensor::zeros((3, 0), DType::F32, &dev).unwrap(),
                None,
                1,
                None,
            )),
            "D >= 1",
        ),
        (
            "cosine_topk_deferred",
            cosine_topk_deferred(&q, &keys, None, 9, None)
                .and_then(|p| p.check())
                .map(|_| ()),
            "n = 9",
        ),
        (
            "key_norms rank",
            key_norms(&q.flatten_all().unwrap()).map(|_| ()),
            "[M, D]",
        ),
        (
            "key_norms dtype",
            key_norms(&u32_t(&[2, 2])).map(|_| ()),
            "U32",
        ),
        (
            "from_keys rank",
            MemoryBank::from_keys(q.flatten_all().unwrap()).map(|_| ()),
            "[M, D]",
        ),
        (
            "from_keys dtype",
            MemoryBank::from_keys(u32_t(&[2, 2])).map(|_| ()),
            "U32",
        ),
        (
            "with_ids repeat",
            MemoryBank::with_ids(q.clone(), vec![1, 1]).map(|_| ()),
            "twice",
        ),
        (
            "with_ids count",
            MemoryBank::with_ids(q.clone(), vec![1]).map(|_| ()),
            "1 ids",
        ),
        (
            "with_ids NO_ID",
            MemoryBank::with_ids(q.clone(), vec![1, NO_ID]).map(|_| ()),
            "NO_ID",
        ),
        (
            "new values",
            MemoryBank::new(keys.clone(), rand((5, 2), 1), (0..6).collect()).map(|_| ()),
            "values",
        ),
        ("search n = 0", unit(bank.search(&q, 0)), "n = 0"),
        ("search D", unit(bank.search(&rand((2, 5), 1), 1)), "D = 5"),
        ("search NaN", unit(bank.search(&nan_q, 1)), "NaN"),
        (
            "search_rows n",
            bank.search_rows(&q, 6, Some(&[Some(10), None])).map(|_| ()),
            "n = 6",
        ),
        (
            "search_rows exclude",
            bank.search_rows(&q, 1, Some(&[None])).map(|_| ()),
            "exclude_ids",
        ),
        (
            "gather_values none",
            plain.gather_values(&idx(vec![0, 1, 2, 3])).map(|_| ()),
            "no values",
        ),
        (
            "gather_values range",
            bank.gather_values(&idx(vec![0, 1, 2, 6])).map(|_| ()),
            "index 6",
        ),
        ("add D", grow.add(&rand((1, 5), 1)), "D = 5"),
        (
            "add with values",
            bank.clone().add(&rand((1, 4), 1)),
            "add_with_values",
        ),
        (
            "load missing",
            MemoryBank::load(&dir.join("missing.safetensors"), &dev).map(|_| ()),
            "missing.safetensors",
        ),
        (
            "load garbage",
            MemoryBank::load(&garbage, &dev).map(|_| ()),
            "garbage.safetensors",
        ),
        (
            "dissonance k = 0",
            dissonance_topk(&p, tok, 0).map(|_| ()),
            "k = 0",
        ),
        (
            "dissonance k > L",
            dissonance_topk(&p, tok, 4).map(|_| ()),
            "k = 4",
        ),
        (
            "dissonance rank",
            dissonance_topk(&scores, tok, 1).map(|_| ()),
            "rank 3",
        ),
        (
            "dissonance dtype",
            dissonance_topk(
                &p,
                Context::Tokens {
                    h_avl: &h.to_dtype(DType::F16).unwrap(),
                    mask: None,
                },
                1,
            )
            .map(|_| ()),
            "dtype",
        ),
        (
            "dissonance anchor",
            dissonance_topk(&p, Context::Anchor(&scores), 1).map(|_| ()),
            "anchor",
        ),
        (
            "dissonance NaN",
            dissonance_topk(&nan_p, tok, 1).map(|_| ()),
            "NaN delta",
        ),
        ("topk_rows k = 0", unit(topk_rows(&scores, 0)), "k = 0"),
        ("topk_rows k > L", unit(topk_rows(&scores, 6)), "k = 6"),
        ("topk_rows rank", unit(topk_rows(&p, 1)), "rank 2"),
        (
            "topk_rows dtype",
            unit(topk_rows(&u32_t(&[2, 2]), 1)),
            "U32",
        ),
        (
            "topk_rows NaN",
            unit(topk_rows(&nan_scores, 1)),
            "NaN score",
        ),
        (
            "gather_inject repeat",
            gather_inject(&p, &src, &idx(vec![0, 0, 1, 2]), &idx(vec![0, 1, 0, 1])).map(|_| ()),
            "twice",
        ),
        (
            "gather_inject range",
            gather_inject(&p, &src, &idx(vec![0, 1, 1, 2]), &idx(vec![0, 2, 0, 1])).map(|_| ()),
            "out of range",
        ),
        (
            "gather_inject dtype",
            gather_inject(
                &p,
                &src.to_dtype(DType::F16).unwrap(),
                &idx(vec![0, 1, 1, 2]),
                &idx(vec![0, 1, 0, 1]),
            )
            .map(|_| ()),
            "dtype",
        ),
    ]
}

/// Item 7 of issue 21: with `RUST_BACKTRACE=1` every error displays as one line, and the
/// backtrace is there for whoever asks (`Error::backtrace`, `{:?}`).
#[test]
fn errors_are_one_line_under_rust_backtrace() {
    backtraces_on();
    // the environment took: candle's own errors now carry a multi-line backtrace
    let candle_err = Tensor::zeros(3, DType::F32, &Device::Cpu)
        .unwrap()
        .reshape(4)
        .unwrap_err();
    assert!(
        candle_err.to_string().lines().count() > 1,
        "RUST_BACKTRACE=1 did not reach candle: {candle_err}"
    );
    let cases = error_cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (what, r, needle) in cases {
        let e = r.expect_err(what);
        let line = e.to_string();
        assert!(!line.contains('\n'), "{what}: not one line: {line:?}");
        assert!(line.contains(needle), "{what}: {line:?} lacks {needle:?}");
        assert_eq!(
            e.backtrace().status(),
            BacktraceStatus::Captured,
            "{what}: no backtrace"
        );
        let debug = format!("{e:?}");
        assert!(
            debug.starts_with(&line)
                && debug.contains("Stack backtrace:")
                && debug.lines().count() > 3,
            "{what}: {{:?}} should add the backtrace"
        );
        // `?` into candle (and from there into any candle code) keeps the one line
        let as_candle = candle_core::Error::from(e);
        assert_eq!(as_candle.to_string(), line, "{what}: as a candle error");
    }
}

/// Item 5: precomputed key norms that do not belong to the keys are refused in debug builds
/// (release builds trust them: the check rereads the bank).
#[cfg(debug_assertions)]
#[test]
fn wrong_key_norms_are_refused_in_debug_builds() {
    backtraces_on();
    let keys = rand((5, 3), 11);
    let q = rand((2, 3), 12);
    let mut norms = key_norms(&keys).unwrap().to_vec1::<f32>().unwrap();
    assert!(cosine_topk(
        &q,
        &keys,
        Some(&Tensor::new(norms.as_slice(), &Device::Cpu).unwrap()),
        2,
        None
    )
    .is_ok());
    norms[3] *= 0.4; // cosines above 1 otherwise
    let bad = Tensor::new(norms.as_slice(), &Device::Cpu).unwrap();
    let e = cosine_topk(&q, &keys, Some(&bad), 2, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cosine_topk: key_norms[3] = ") && e.contains("is not the norm of key row 3"),
        "{e}"
    );
    let e = cosine_topk_deferred(&q, &keys, Some(&bad), 2, None).unwrap_err();
    assert!(e.to_string().contains("key_norms[3]"), "{e}");
}

/// Item 5: the scores of a search carry no gradient; the documented recipe gives one.
#[test]
fn retrieval_scores_have_no_gradient() {
    backtraces_on();
    let keys = rand((8, 4), 13);
    let q = Var::from_tensor(&rand((2, 4), 14)).unwrap();
    let (scores, rows) = cosine_topk(q.as_tensor(), &keys, None, 3, None).unwrap();
    let grads = scores.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(q.as_tensor()).is_none(),
        "retrieval scores carried a gradient"
    );
    // the recipe from `cosine_topk`'s docs: gather the rows, recompute Eq. 1
    let k = keys
        .index_select(&rows.flatten_all().unwrap(), 0)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let dots = k
        .broadcast_mul(&q.as_tensor().unsqueeze(1).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let kn = k.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
    let qn = q
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap();
    let s = (dots / (kn.broadcast_mul(&qn).unwrap() + 1e-8).unwrap()).unwrap();
    let diff = (&s - &scores).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    let grads = s.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(q.as_tensor()).is_some());
}
