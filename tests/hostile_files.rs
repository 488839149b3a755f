//! Mutation tests of the bounded readers (`src/io`, docs/DESIGN.md "Bounded readers").
//!
//! Each test writes valid files with the crate's own writers, then applies a few hundred
//! seeded mutations (truncation at every header byte, bit flips, byte overwrites with
//! non-UTF-8 bytes, insertions and deletions, huge / negative / overflowing shape fields,
//! wrong dtype strings, inconsistent length fields, duplicated keys, deep nesting, oversized
//! lists) and requires of every case: `Ok`, or an `Err` whose one-line text names the file;
//! never a panic, and never a single allocation request above 1 GiB (the allocator of this
//! test binary refuses and records such requests; an infallible allocation it refuses
//! aborts the binary, which fails the test too).
//!
//! Run with `--nocapture` to see the per-reader case counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use r2scp::bank::MemoryBank;
use r2scp::data::load_music_avqa;
use r2scp::trainer::checkpoint::{load_tensors, save_tensors, write_json};
use r2scp::trainer::state::read_state;
use r2scp::trainer::{EvalResult, TrainConfig, TrainState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------
// The allocator: refuses (and records) any single request above 1 GiB.

const REQUEST_CAP: usize = 1 << 30;
/// A request of exactly this size is the allocator's self-test; it is refused but counted
/// apart, so the self-test cannot disturb the other tests' counts.
const SELF_TEST_SIZE: usize = REQUEST_CAP + 4099;

static REFUSED: AtomicUsize = AtomicUsize::new(0);
static REFUSED_LARGEST: AtomicUsize = AtomicUsize::new(0);
static SELF_TEST_REFUSED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Largest request made by this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn admit(size: usize) -> bool {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    if size <= REQUEST_CAP {
        return true;
    }
    if size == SELF_TEST_SIZE {
        SELF_TEST_REFUSED.fetch_add(1, Relaxed);
    } else {
        REFUSED.fetch_add(1, Relaxed);
        REFUSED_LARGEST.fetch_max(size, Relaxed);
    }
    false
}

struct CappedAlloc;

// SAFETY: every call is forwarded to the system allocator unchanged, or answered with null
// (allowed by the GlobalAlloc contract: allocation failure).
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if admit(l.size()) {
            System.alloc(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if admit(l.size()) {
            System.alloc_zeroed(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if admit(new) {
            System.realloc(p, l, new)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

#[test]
fn the_allocator_refuses_requests_above_one_gib() {
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve_exact(SELF_TEST_SIZE).is_err());
    assert!(SELF_TEST_REFUSED.load(Relaxed) >= 1);
    LARGEST.with(|l| assert!(l.get() >= SELF_TEST_SIZE));
    let mut w: Vec<u8> = Vec::new();
    w.try_reserve_exact(1 << 20).expect("1 MiB is admitted");
}

// ---------------------------------------------------------------------------------------
// Cases and the harness.

struct Case {
    what: String,
    bytes: Vec<u8>,
}

/// Builds the mutation cases of one reader from its valid base files.
struct Mutations {
    rng: ChaCha8Rng,
    cases: Vec<Case>,
}

const SPECIAL_BYTES: [u8; 12] = [
    0x00, 0xff, 0x80, 0xc3, 0xfe, 0xc0, b'\'', b'"', b'(', b'[', b'-', b'9',
];

impl Mutations {
    fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            cases: Vec::new(),
        }
    }

    fn push(&mut self, what: impl Into<String>, bytes: Vec<u8>) {
        self.cases.push(Case {
            what: what.into(),
            bytes,
        });
    }

    /// Truncations at each of `at` (clamped to the file).
    fn truncations(&mut self, tag: &str, base: &[u8], at: impl IntoIterator<Item = usize>) {
        for n in at {
            if n < base.len() {
                self.push(format!("{tag}: truncated to {n} bytes"), base[..n].to_vec());
            }
        }
    }

    /// A random position, inside `0..head` with probability 3/4 (where the sizes are).
    fn pos(&mut self, len: usize, head: usize) -> usize {
        if self.rng.random_bool(0.75) && head > 0 {
            self.rng.random_range(0..head.min(len))
        } else {
            self.rng.random_range(0..len)
        }
    }

    /// `n` flips of 1-3 random bits each, `n` overwrites with special bytes (non-UTF-8,
    /// quotes, digits), `n / 4` single-byte insertions and deletions, and appended junk.
    fn random_edits(&mut self, tag: &str, base: &[u8], head: usize, n: usize) {
        for _ in 0..n {
            let mut b = base.to_vec();
            let flips = self.rng.random_range(1..=3);
            let mut at = Vec::new();
            for _ in 0..flips {
                let i = self.pos(b.len(), head);
                b[i] ^= 1 << self.rng.random_range(0..8);
                at.push(i);
            }
            self.push(format!("{tag}: bit flips at {at:?}"), b);
        }
        for _ in 0..n {
            let mut b = base.to_vec();
            let i = self.pos(b.len(), head);
            let v = SPECIAL_BYTES[self.rng.random_range(0..SPECIAL_BYTES.len())];
            b[i] = v;
            self.push(format!("{tag}: byte {i} set to {v:#04x}"), b);
        }
        for _ in 0..n / 4 {
            let mut b = base.to_vec();
            let i = self.pos(b.len(), head);
            b.remove(i);
            self.push(format!("{tag}: byte {i} deleted"), b);
            let mut b = base.to_vec();
            let i = self.pos(b.len(), head);
            let v = SPECIAL_BYTES[self.rng.random_range(0..SPECIAL_BYTES.len())];
            b.insert(i, v);
            self.push(format!("{tag}: byte {v:#04x} inserted at {i}"), b);
        }
        for junk in [&b"\0"[..], b"\xff\xfe\xfd\xfc", b"{}"] {
            let mut b = base.to_vec();
            b.extend_from_slice(junk);
            self.push(format!("{tag}: {} junk bytes appended", junk.len()), b);
        }
        self.push(format!("{tag}: empty file"), Vec::new());
    }

    /// Text substitutions: each `(from, to)` replaces the first `from` of `base`.
    fn substitutions(&mut self, tag: &str, base: &[u8], subs: &[(&str, String)]) {
        for (from, to) in subs {
            let b = replace_first(base, from.as_bytes(), to.as_bytes())
                .unwrap_or_else(|| panic!("{tag}: pattern {from:?} not in the base file"));
            self.push(format!("{tag}: {from:?} -> {}", clip(to)), b);
        }
    }
}

fn replace_first(base: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let i = base.windows(from.len()).position(|w| w == from)?;
    let mut out = base[..i].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&base[i + from.len()..]);
    Some(out)
}

fn clip(s: &str) -> String {
    if s.len() > 60 {
        format!(
            "{:?}... ({} bytes)",
            &s[..s.floor_char_boundary_compat(40)],
            s.len()
        )
    } else {
        format!("{s:?}")
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Positions right before and after every structural character of a text file.
fn token_boundaries(base: &[u8], structural: &[u8]) -> Vec<usize> {
    let mut at: Vec<usize> = base
        .iter()
        .enumerate()
        .filter(|(_, c)| structural.contains(c))
        .flat_map(|(i, _)| [i, i + 1])
        .collect();
    at.dedup();
    at
}

/// What one reader did over its cases.
struct Tally {
    reader: &'static str,
    cases: usize,
    ok: usize,
    err: usize,
    largest_request: usize,
    secs: f64,
}

/// Run every case: write it to `target`, call `read`, and check the outcome. `names_file`
/// says whether an error text names the file (or, for the data-set loader, a file of the
/// data set). Panics (with every failing case listed) if a case panicked, returned a
/// multi-line error or one that names no file, or if any request above 1 GiB was refused.
fn run_cases(
    reader: &'static str,
    cases: Vec<Case>,
    target: &Path,
    read: impl Fn() -> Result<(), String>,
    names_file: impl Fn(&str) -> bool,
) -> Tally {
    let refused_before = REFUSED.load(Relaxed);
    LARGEST.with(|l| l.set(0));
    let start = Instant::now();
    let (mut ok, mut err) = (0, 0);
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        fs::write(target, &c.bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(&read)) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                err += 1;
                if e.contains('\n') || !names_file(&e) {
                    failures.push(format!("case {i} ({}): bad error text: {e}", c.what));
                }
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("case {i} ({}): PANIC {msg}", c.what));
            }
        }
    }
    let t = Tally {
        reader,
        cases: cases.len(),
        ok,
        err,
        largest_request: LARGEST.with(|l| l.get()),
        secs: start.elapsed().as_secs_f64(),
    };
    println!(
        "{}: {} cases ({} ok, {} errors), largest single allocation request {} bytes, {:.2} s",
        t.reader, t.cases, t.ok, t.err, t.largest_request, t.secs
    );
    assert!(failures.is_empty(), "{reader}:\n{}", failures.join("\n"));
    assert_eq!(
        REFUSED.load(Relaxed),
        refused_before,
        "{reader}: allocation requests above 1 GiB were refused (largest {} bytes)",
        REFUSED_LARGEST.load(Relaxed)
    );
    assert!(t.largest_request <= REQUEST_CAP);
    t
}

fn as_text<T>(r: anyhow::Result<T>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| r2scp::io::error_line(&e))
}

// ---------------------------------------------------------------------------------------
// .npy

/// An `.npy` file as numpy writes it: header padded with spaces to a multiple of 64 bytes
/// and ended by a newline; version 1.0 (u16 length) or 2.0 (u32 length).
fn npy_bytes(descr: &str, fortran: bool, shape: &[usize], data: &[u8], version: u8) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("{},", shape[0]),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let fortran = if fortran { "True" } else { "False" };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({dims}), }}");
    let pre = if version == 1 { 10 } else { 12 };
    while !(pre + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    npy_with_header(&h, data, version, h.len())
}

/// An `.npy` file with `header` and a length field of `declared` (which may lie).
fn npy_with_header(header: &str, data: &[u8], version: u8, declared: usize) -> Vec<u8> {
    let mut v = b"\x93NUMPY".to_vec();
    v.extend([version, 0]);
    if version == 1 {
        v.extend((declared as u16).to_le_bytes());
    } else {
        v.extend((declared as u32).to_le_bytes());
    }
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

fn npy_header_end(b: &[u8]) -> usize {
    if b[6] == 1 {
        10 + u16::from_le_bytes([b[8], b[9]]) as usize
    } else {
        12 + u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize
    }
}

/// Values 0.5 * i, as f32 bytes.
fn f32_data(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (0.5 * i as f32).to_le_bytes())
        .collect()
}

#[test]
fn npy_reader_reads_every_layout_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    // candle's writer
    let t = Tensor::from_vec(
        (0..12).map(|i| i as f32).collect::<Vec<_>>(),
        (3, 4),
        &Device::Cpu,
    )
    .unwrap();
    t.write_npy(&p).unwrap();
    let a = r2scp::io::npy::read_f32(&p).unwrap();
    assert_eq!(
        (a.shape.as_slice(), a.data),
        (
            &[3, 4][..],
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        )
    );
    // f64, big-endian f32, f16, v2.0 header, Fortran order
    let f64_data: Vec<u8> = (0..6).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let be: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_be_bytes()).collect();
    let f16_data: Vec<u8> = (0..6)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    for (bytes, want) in [
        (
            npy_bytes("<f8", false, &[2, 3], &f64_data, 1),
            vec![0., 1., 2., 3., 4., 5.],
        ),
        (
            npy_bytes(">f4", false, &[2, 3], &be, 1),
            vec![0., 1., 2., 3., 4., 5.],
        ),
        (
            npy_bytes("<f2", false, &[2, 3], &f16_data, 2),
            vec![0., 1., 2., 3., 4., 5.],
        ),
        // column-major [2, 3] holding rows (0 1 2) (3 4 5)
        (
            npy_bytes(
                "<f8",
                true,
                &[2, 3],
                &[0., 3., 1., 4., 2., 5.]
                    .iter()
                    .flat_map(|x: &f64| x.to_le_bytes())
                    .collect::<Vec<_>>(),
                1,
            ),
            vec![0., 1., 2., 3., 4., 5.],
        ),
    ] {
        fs::write(&p, &bytes).unwrap();
        let a = r2scp::io::npy::read_f32(&p).unwrap();
        assert_eq!((a.shape.as_slice(), a.data), (&[2, 3][..], want));
    }
}

#[test]
fn npy_reader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("feature.npy");
    let bases = [
        (
            "f32 [4, 6]",
            npy_bytes("<f4", false, &[4, 6], &f32_data(24), 1),
        ),
        (
            "f64 [3, 5] fortran",
            npy_bytes(
                "<f8",
                true,
                &[3, 5],
                &(0..15)
                    .flat_map(|i| (i as f64).to_le_bytes())
                    .collect::<Vec<_>>(),
                1,
            ),
        ),
        (
            "f16 [7] v2.0",
            npy_bytes(
                "<f2",
                false,
                &[7],
                &(0..7)
                    .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
                    .collect::<Vec<_>>(),
                2,
            ),
        ),
        (
            ">f4 [2, 3, 2]",
            npy_bytes(
                ">f4",
                false,
                &[2, 3, 2],
                &(0..12)
                    .flat_map(|i| (i as f32).to_be_bytes())
                    .collect::<Vec<_>>(),
                1,
            ),
        ),
    ];
    let mut m = Mutations::new(13);
    for (tag, base) in &bases {
        let end = npy_header_end(base);
        m.truncations(tag, base, (0..=end + 1).chain([base.len() - 1]));
        m.random_edits(tag, base, end, 40);
        // length field: zero, short, long, past the file, the maximum
        let lens: [u64; 7] = [
            0,
            1,
            (end - 11) as u64,
            (end - 9) as u64,
            base.len() as u64,
            65535,
            u32::MAX as u64,
        ];
        for l in lens {
            let mut b = base.clone();
            if b[6] == 1 {
                b[8..10].copy_from_slice(&(l.min(65535) as u16).to_le_bytes());
            } else {
                b[8..12].copy_from_slice(&(l as u32).to_le_bytes());
            }
            m.push(format!("{tag}: header length field {l}"), b);
        }
        for (maj, min) in [(0, 0), (1, 1), (2, 0), (3, 0), (4, 0), (255, 255)] {
            let mut b = base.clone();
            b[6] = maj;
            b[7] = min;
            m.push(format!("{tag}: version {maj}.{min}"), b);
        }
    }
    // Header substitutions on the f32 [4, 6] base, each with the length field recomputed
    // (the header is otherwise consistent) and with the old length (it is not).
    let base = &bases[0].1;
    let end = npy_header_end(base);
    let header = std::str::from_utf8(&base[10..end]).unwrap().to_string();
    let data = &base[end..];
    let subs: Vec<(&str, String)> = vec![
        ("(4, 6)", "(100000000, 100000)".into()),
        ("(4, 6)", "(-1, 6)".into()),
        ("(4, 6)", "(-4, -6)".into()),
        ("(4, 6)", "(18446744073709551615, 6)".into()),
        ("(4, 6)", "(18446744073709551616, 1)".into()),
        (
            "(4, 6)",
            "(99999999999999999999999999999999999999999999, 1)".into(),
        ),
        ("(4, 6)", "(0, 18446744073709551615)".into()),
        ("(4, 6)", "(4294967296, 4294967296)".into()),
        ("(4, 6)", "(4611686018427387904,)".into()),
        ("(4, 6)", "(2305843009213693952, 2)".into()),
        ("(4, 6)", "(24,)".into()),
        ("(4, 6)", "(6, 4)".into()),
        ("(4, 6)", "(4, 6, 1)".into()),
        ("(4, 6)", "()".into()),
        ("(4, 6)", "(24)".into()),
        ("(4, 6)", "[4, 6]".into()),
        ("(4, 6)", "(4., 6)".into()),
        ("(4, 6)", "(4,, 6)".into()),
        ("(4, 6)", format!("({})", vec!["1"; 70].join(", "))),
        ("(4, 6)", format!("({}24)", "1, ".repeat(63))),
        ("'<f4'", "'<i4'".into()),
        ("'<f4'", "'<f3'".into()),
        ("'<f4'", "'|S10'".into()),
        ("'<f4'", "'<c8'".into()),
        ("'<f4'", "'float32'".into()),
        ("'<f4'", "''".into()),
        ("'<f4'", "'<f8'".into()),
        ("'<f4'", "'<f2'".into()),
        ("'<f4'", "'<u1'".into()),
        ("'<f4'", "[('a', '<f4')]".into()),
        ("'<f4'", "'<f4\\'".into()),
        ("False", "True".into()),
        ("False", "'False'".into()),
        ("False", "0".into()),
        ("False", "None".into()),
        ("False", "Falsey".into()),
        ("{'descr'", "{'descr': '<f8', 'descr'".into()),
        ("{'descr'", "{'shape': (1,), 'descr'".into()),
        ("{'descr'", "{'fortran_order': True, 'descr'".into()),
        ("'descr'", "'desc'".into()),
        ("'shape': (4, 6), ", "".into()),
        ("'fortran_order': False, ", "".into()),
        ("'shape'", "'shape\u{e9}'".into()),
        ("{", "".into()),
        ("}", "".into()),
        ("}", "} junk".into()),
        ("}", "}}".into()),
        ("'descr'", "\"descr\"".into()),
        ("'descr'", "'descr".into()),
    ];
    for (from, to) in &subs {
        let h = header.replacen(from, to, 1);
        assert_ne!(h, header, "{from}");
        let what = format!("header {from:?} -> {}", clip(to));
        m.push(
            format!("{what} (length recomputed)"),
            npy_with_header(&h, data, 1, h.len()),
        );
        m.push(
            format!("{what} (stale length)"),
            npy_with_header(&h, data, 1, header.len()),
        );
    }
    // non-UTF-8 and non-ASCII bytes inside the header
    for (i, bad) in [(12usize, 0xffu8), (20, 0xc3), (30, 0x80), (end - 2, 0xe9)] {
        let mut b = base.clone();
        b[i] = bad;
        m.push(format!("header byte {i} set to {bad:#04x}"), b);
    }
    // the issue's case: 40 TB declared, 64 bytes present
    m.push(
        "shape (100000000, 100000) of <f4 over 64 bytes",
        npy_bytes("<f4", false, &[100_000_000, 100_000], &[0u8; 64], 1),
    );
    let t = run_cases(
        "npy",
        m.cases,
        &target,
        || {
            let a = r2scp::io::npy::read_f32(&target).map_err(|e| r2scp::io::error_line(&e))?;
            assert_eq!(
                a.data.len(),
                a.shape.iter().product::<usize>(),
                "Ok with a wrong element count"
            );
            Ok(())
        },
        |e| e.contains(&target.display().to_string()),
    );
    assert!(
        t.cases >= 300 && t.ok >= 1 && t.err >= 250,
        "{} cases, {} ok, {} errors",
        t.cases,
        t.ok,
        t.err
    );
}

// ---------------------------------------------------------------------------------------
// The annotation JSON (through the whole MUSIC-AVQA loader).

fn write_avqa_fixture(d: &Path) {
    fs::create_dir_all(d.join("audio")).unwrap();
    fs::create_dir_all(d.join("visual")).unwrap();
    for (i, v) in ["v1", "v2", "v3"].iter().enumerate() {
        let a = Tensor::from_vec(vec![i as f32 + 0.5; 4 * 3], (4, 3), &Device::Cpu).unwrap();
        a.write_npy(d.join(format!("audio/{v}.npy"))).unwrap();
        let b = Tensor::from_vec(vec![i as f32 - 0.25; 3 * 5], (3, 5), &Device::Cpu).unwrap();
        b.write_npy(d.join(format!("visual/{v}.npy"))).unwrap();
    }
    fs::write(d.join("avqa-train.json"), TRAIN_JSON).unwrap();
    fs::write(
        d.join("avqa-val.json"),
        r#"[{"video_id": "v2", "question_id": 10, "type": "[\"Audio\", \"Counting\"]", "question_content": "How many instruments are sounding?", "templ_values": "[]", "anser": "two"}]"#,
    )
    .unwrap();
    fs::write(
        d.join("avqa-test.json"),
        r#"[{"video_id": "v3", "question_id": 11, "type": ["Visual", "Location"], "question_content": "Is the <Object> on the <LR>?", "templ_values": ["cello", "left"], "anser": "yes"}]"#,
    )
    .unwrap();
}

const TRAIN_JSON: &str = r#"[
{"video_id": "v1", "question_id": 1, "type": "[\"Audio\", \"Counting\"]", "question_content": "How many instruments are sounding?", "templ_values": "[]", "question_deleted": 0, "anser": "two"},
{"video_id": "v1", "question_id": 2, "type": "['Audio-Visual', 'Temporal']", "question_content": "Where is the first sounding <Object>?", "templ_values": "['cello']", "anser": "left"},
{"video_id": "v2", "question_id": 3, "type": ["Visual", "Location"], "question_content": "Is the <Object> on the <LR>?", "templ_values": ["violin", "right"], "anser": "yes"}
]
"#;

#[test]
fn annotation_loader_survives_mutations() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_avqa_fixture(d);
    load_music_avqa(d).expect("the fixture is valid");
    let target = d.join("avqa-train.json");
    let base = TRAIN_JSON.as_bytes();
    let mut m = Mutations::new(7);
    m.truncations("train json", base, token_boundaries(base, b"{}[],:\"\n"));
    m.random_edits("train json", base, base.len(), 60);
    let many = |n: usize, item: &str| vec![item; n].join(",");
    let subs: Vec<(&str, String)> = vec![
        (r#""anser": "two""#, r#""anser": "two", "anser": "three""#.into()),
        (r#""video_id": "v1""#, r#""video_id": "v1", "video_id": "v2""#.into()),
        (r#""anser": "two""#, r#""anser": """#.into()),
        (r#""anser": "two""#, r#""anser": null"#.into()),
        (r#""anser": "two""#, r#""anser": ["two"]"#.into()),
        (r#""anser": "two""#, r#""anser": 1e999"#.into()),
        (r#""anser": "two""#, r#""anser": 2"#.into()),
        (r#""question_id": 1"#, r#""question_id": -1"#.into()),
        (r#""question_id": 1"#, r#""question_id": 18446744073709551616"#.into()),
        (r#""question_id": 1"#, r#""question_id": 1.5e308"#.into()),
        (r#""video_id": "v1""#, r#""video_id": "../v1""#.into()),
        (r#""video_id": "v1""#, r#""video_id": "v9""#.into()),
        (r#""video_id": "v1""#, r#""video_id": """#.into()),
        (r#""video_id": "v1""#, r#""video_id": "v\u0000""#.into()),
        (r#""video_id": "v1""#, r#""video_id": {"a": 1}"#.into()),
        (r#""type": "[\"Audio\", \"Counting\"]""#, r#""type": "[\"Audio\", \"Counting\"""#.into()),
        (r#""type": "[\"Audio\", \"Counting\"]""#, r#""type": "[\"Audio\"]""#.into()),
        (r#""type": "[\"Audio\", \"Counting\"]""#, r#""type": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]""#.into()),
        (r#""type": "[\"Audio\", \"Counting\"]""#, format!(r#""type": "[{}]""#, many(70000, "\\\"a\\\""))),
        (r#""type": "[\"Audio\", \"Counting\"]""#, r#""type": 3"#.into()),
        (r#""type": ["Visual", "Location"]"#, format!(r#""type": [{}]"#, many(70000, "0"))),
        (r#""type": ["Visual", "Location"]"#, format!(r#""type": {}{}"#, "[".repeat(200), "]".repeat(200))),
        (r#""templ_values": ["violin", "right"]"#, format!(r#""templ_values": [{}]"#, many(70000, "\"violin\""))),
        (r#""templ_values": ["violin", "right"]"#, format!(r#""templ_values": [{}]"#, many(1000, "\"violin\""))),
        (r#""templ_values": ["violin", "right"]"#, r#""templ_values": ["violin"]"#.into()),
        (r#""templ_values": "['cello']""#, r#""templ_values": "['cello'""#.into()),
        (r#""question_content": "How many instruments are sounding?""#, format!(r#""question_content": "{}""#, "word ".repeat(200_000))),
        (r#""question_content": "How many instruments are sounding?""#, r#""question_content": """#.into()),
        (r#""question_content": "How many instruments are sounding?""#, r#""question_content": "\ud800""#.into()),
        ("[\n{", "{\"a\": [\n{".into()),
        ("[\n{", "{".into()),
        ("]\n", "]]\n".into()),
        ("]\n", "],\n".into()),
        ("]\n", "] []\n".into()),
        ("]\n", format!(",{}]\n", many(100_000, "0"))),
        ("]\n", format!(",{}]\n", many(100_000, "{}"))),
    ];
    m.substitutions("train json", base, &subs);
    let cases_json = m.cases.len();
    // a few feature-file cases through the loader: the error must name the .npy
    let good_npy = fs::read(d.join("audio/v1.npy")).unwrap();
    let t = run_cases(
        "annotation json (load_music_avqa)",
        m.cases,
        &target,
        || as_text(load_music_avqa(d)),
        |e| {
            e.contains(&target.display().to_string())
                || e.contains(&d.join("avqa-").display().to_string())
                || e.contains(&d.join("audio").display().to_string())
        },
    );
    fs::write(&target, TRAIN_JSON).unwrap();
    let mut n = Mutations::new(8);
    n.push(
        "40 TB header",
        npy_bytes("<f4", false, &[100_000_000, 100_000], &[0u8; 64], 1),
    );
    n.truncations("audio npy", &good_npy, [0, 5, 9, 40, good_npy.len() - 1]);
    n.push("int dtype", npy_bytes("<i4", false, &[4, 3], &[0u8; 48], 1));
    n.push("rank 3", npy_bytes("<f4", false, &[2, 2, 3], &[0u8; 48], 1));
    n.push(
        "NaN",
        npy_bytes("<f4", false, &[4, 3], &f32::NAN.to_le_bytes().repeat(12), 1),
    );
    let npy_target = d.join("audio/v1.npy");
    run_cases(
        "feature .npy (load_music_avqa)",
        n.cases,
        &npy_target,
        || as_text(load_music_avqa(d)),
        |e| e.contains(&npy_target.display().to_string()),
    );
    assert!(
        cases_json >= 300 && t.err >= 250,
        "{} cases, {} errors",
        t.cases,
        t.err
    );
}

// ---------------------------------------------------------------------------------------
// safetensors: checkpoint files and the memory bank.

/// Header text and data of a safetensors file.
fn st_split(b: &[u8]) -> (String, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (
        String::from_utf8(b[8..8 + n].to_vec()).unwrap(),
        b[8 + n..].to_vec(),
    )
}

fn st_join(header: &str, data: &[u8], declared: u64) -> Vec<u8> {
    let mut v = declared.to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

/// The header entry of tensor `name`: (dtype, shape, offsets) as compact JSON text.
fn st_entry(header: &str, name: &str) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_str(header).unwrap();
    let e = &v[name];
    (
        e["dtype"].as_str().unwrap().to_string(),
        e["shape"].to_string(),
        e["data_offsets"].to_string(),
    )
}

/// Byte range of tensor `name` in the data section.
fn st_range(header: &str, name: &str) -> std::ops::Range<usize> {
    let v: serde_json::Value = serde_json::from_str(header).unwrap();
    let o = &v[name]["data_offsets"];
    o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize
}

/// Every mutation family on a safetensors file, with the format-aware ones aimed at the
/// header entry of tensor `first`.
fn safetensors_mutations(seed: u64, base: &[u8], first: &str) -> Vec<Case> {
    let mut m = Mutations::new(seed);
    let (header, data) = st_split(base);
    let (dtype, shape, offsets) = st_entry(&header, first);
    let (dtype, shape, offsets) = (dtype.as_str(), shape.as_str(), offsets.as_str());
    let n = header.len();
    m.truncations("file", base, (0..=8 + n + 1).chain([base.len() - 1]));
    m.random_edits("file", base, 8 + n, 60);
    for l in [
        0u64,
        1,
        2,
        n as u64 - 1,
        n as u64 + 1,
        base.len() as u64 - 8,
        base.len() as u64,
        100_000_001,
        1 << 40,
        1 << 63,
        u64::MAX,
    ] {
        let mut b = base.to_vec();
        b[..8].copy_from_slice(&l.to_le_bytes());
        m.push(format!("header length field {l}"), b);
    }
    let shape_pat = format!(r#""shape":{shape}"#);
    let dtype_pat = format!(r#""dtype":"{dtype}""#);
    let off_pat = format!(r#""data_offsets":{offsets}"#);
    let name_pat = format!(r#""{first}":"#);
    let entry_start = format!(r#""{first}":{{"#);
    let mut subs: Vec<(&str, String)> = Vec::new();
    for s in [
        "[100000000,100000]", "[-1,4]", "[18446744073709551615,2]", "[18446744073709551616]",
        "[0,18446744073709551615]", "[4294967296,4294967296]", "[2305843009213693952,2]", "[]",
        "\"3\"", "[3.5]", "null", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]",
    ] {
        subs.push((shape_pat.as_str(), format!(r#""shape":{s}"#)));
    }
    subs.push((
        shape_pat.as_str(),
        format!(r#""shape":[{}]"#, vec!["0"; 200_000].join(",")),
    ));
    for d in [
        "F33", "I8", "F4", "BOOL", "F8_E4M3", "U64", "", "C64", "F64", "F16", "U16", "F6_E2M3",
    ] {
        subs.push((dtype_pat.as_str(), format!(r#""dtype":"{d}""#)));
    }
    subs.push((dtype_pat.as_str(), r#""dtype":null"#.into()));
    for o in [
        "[0,999999999999]",
        "[5,3]",
        "[0,18446744073709551615]",
        "[1,49]",
        "[0]",
        "[0,1,2]",
        "[-8,40]",
        "[0,1e3]",
    ] {
        subs.push((off_pat.as_str(), format!(r#""data_offsets":{o}"#)));
    }
    subs.push((
        name_pat.as_str(),
        r#""__metadata__":{"format":1},"X":"#.replace("X", first),
    ));
    subs.push((
        name_pat.as_str(),
        r#""__metadata__":{"format":"pt"},"X":"#.replace("X", first),
    ));
    subs.push((
        name_pat.as_str(),
        r#""__metadata__":[],"X":"#.replace("X", first),
    ));
    subs.push((
        name_pat.as_str(),
        format!(
            r#""__metadata__":{{"a":{}{}}},"{first}":"#,
            "[".repeat(300),
            "]".repeat(300)
        ),
    ));
    subs.push((entry_start.as_str(), format!(r#""{first}":{{"extra":1,"#)));
    subs.push((name_pat.as_str(), format!(r#""{first}\u0000":"#)));
    let dup = {
        // the first entry's text, repeated under the same name at the front
        let i = header.find(&entry_start).unwrap();
        let j = i + header[i..].find('}').unwrap() + 1;
        format!("{{{},", &header[i..j])
    };
    subs.push(("{", dup));
    subs.push(("{", "[".into()));
    subs.push(("{", "{{".into()));
    for (from, to) in &subs {
        let h = header.replacen(from, to, 1);
        assert_ne!(h, header, "{from} not in {header}");
        let what = format!("header {from:?} -> {}", clip(to));
        m.push(
            format!("{what} (length recomputed)"),
            st_join(&h, &data, h.len() as u64),
        );
        m.push(
            format!("{what} (stale length)"),
            st_join(&h, &data, n as u64),
        );
    }
    // a non-UTF-8 byte inside the first tensor name
    let i = header.find(&name_pat).unwrap() + 1;
    let mut b = base.to_vec();
    b[8 + i] = 0xff;
    m.push("non-UTF-8 byte in a tensor name", b);
    // data too long / too short for the header
    let mut b = base.to_vec();
    b.extend([0u8; 4]);
    m.push("4 bytes after the last tensor", b);
    m.push("last 4 data bytes missing", base[..base.len() - 4].to_vec());
    m.cases
}

fn checkpoint_tensors() -> HashMap<String, Tensor> {
    let cpu = Device::Cpu;
    let mut t = HashMap::new();
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    t.insert(
        "a.weight".to_string(),
        Tensor::from_vec(w, (3, 4), &cpu).unwrap(),
    );
    t.insert(
        "b.bias".to_string(),
        Tensor::from_vec(vec![1f32; 5], 5, &cpu).unwrap(),
    );
    t.insert(
        "c.half".to_string(),
        Tensor::ones((2, 2, 2), DType::F16, &cpu).unwrap(),
    );
    t
}

#[test]
fn checkpoint_tensor_reader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("model-s1e1.safetensors");
    save_tensors(&target, &checkpoint_tensors()).unwrap();
    let base = fs::read(&target).unwrap();
    let back = load_tensors(&target, &Device::Cpu).unwrap();
    assert_eq!(
        back["a.weight"].to_vec2::<f32>().unwrap()[2],
        [2.0, 2.25, 2.5, 2.75]
    );
    let (header, _) = st_split(&base);
    assert_eq!(st_entry(&header, "a.weight").1, "[3,4]", "{header}");
    let cases = safetensors_mutations(21, &base, "a.weight");
    let t = run_cases(
        "checkpoint safetensors (load_tensors)",
        cases,
        &target,
        || {
            let m = load_tensors(&target, &Device::Cpu).map_err(|e| r2scp::io::error_line(&e))?;
            for (k, v) in &m {
                assert_eq!(v.elem_count(), v.dims().iter().product::<usize>(), "{k}");
            }
            Ok(())
        },
        |e| e.contains(&target.display().to_string()),
    );
    assert!(
        t.cases >= 300 && t.err >= 250,
        "{} cases, {} errors",
        t.cases,
        t.err
    );
}

#[test]
fn memory_bank_reader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bank.safetensors");
    let cpu = Device::Cpu;
    let keys = Tensor::from_vec(
        (0..15).map(|i| (i as f32 * 0.7).sin()).collect::<Vec<_>>(),
        (5, 3),
        &cpu,
    )
    .unwrap();
    let values = Tensor::from_vec(
        (0..20).map(|i| i as f32).collect::<Vec<_>>(),
        (5, 2, 2),
        &cpu,
    )
    .unwrap();
    let bank = MemoryBank::new(keys, values, vec![10, 11, 12, 13, 14]).unwrap();
    bank.save(&target).unwrap();
    let base = fs::read(&target).unwrap();
    let back = MemoryBank::load(&target, &cpu).unwrap();
    assert_eq!(back.ids(), bank.ids());
    let (h, data) = st_split(&base);
    assert_eq!(
        st_entry(&h, "ids"),
        ("U32".to_string(), "[5]".to_string(), st_entry(&h, "ids").2)
    );
    let mut cases = safetensors_mutations(22, &base, "ids");
    cases.extend(
        safetensors_mutations(23, &base, "keys")
            .into_iter()
            .step_by(4),
    );
    // bank-level consistency: duplicate ids, a stored norm that does not match its key
    let ids = st_range(&h, "ids");
    let mut d = data.clone();
    d[ids.start + 4..ids.start + 8].copy_from_slice(&10u32.to_le_bytes());
    cases.push(Case {
        what: "duplicate clip id".into(),
        bytes: st_join(&h, &d, h.len() as u64),
    });
    let norms = st_range(&h, "key_norms");
    for bad in [2.5f32, f32::NAN, -1.0, f32::INFINITY] {
        let mut d = data.clone();
        d[norms.start + 4..norms.start + 8].copy_from_slice(&bad.to_le_bytes());
        cases.push(Case {
            what: format!("key norm {bad} that does not match its key"),
            bytes: st_join(&h, &d, h.len() as u64),
        });
    }
    let t = run_cases(
        "memory bank safetensors (MemoryBank::load)",
        cases,
        &target,
        || {
            let b = MemoryBank::load(&target, &cpu).map_err(|e| e.to_string())?;
            assert_eq!(b.keys().dim(0).unwrap(), b.len());
            Ok(())
        },
        |e| e.contains(&target.display().to_string()),
    );
    assert!(
        t.cases >= 300 && t.err >= 250,
        "{} cases, {} errors",
        t.cases,
        t.err
    );
    // the consistency checks themselves: these files are valid safetensors
    let mut d = st_split(&base).1;
    d[norms.start + 4..norms.start + 8].copy_from_slice(&2.5f32.to_le_bytes());
    fs::write(&target, st_join(&h, &d, h.len() as u64)).unwrap();
    let e = MemoryBank::load(&target, &cpu).unwrap_err().to_string();
    assert!(
        e.contains("key norm 2.5 of row 1 does not match its key"),
        "{e}"
    );
    let mut d = st_split(&base).1;
    d[ids.start + 4..ids.start + 8].copy_from_slice(&10u32.to_le_bytes());
    fs::write(&target, st_join(&h, &d, h.len() as u64)).unwrap();
    let e = MemoryBank::load(&target, &cpu).unwrap_err().to_string();
    assert!(
        e.contains("id 10 appears twice") && e.contains("bank.safetensors"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// The checkpoint state JSON.

fn sample_state() -> TrainState {
    let mut config = TrainConfig {
        batch_size: 16,
        ..Default::default()
    };
    config.apply_seed();
    let row = |s: &str| EvalResult {
        setting: s.to_string(),
        n: 48,
        correct: 30,
        per_type: [(3, 5); 9],
        loss: 1.25,
        router: [0.25, 0.5, 0.25],
    };
    TrainState {
        format: r2scp::trainer::state::STATE_FORMAT,
        config,
        stage: r2scp::trainer::Stage::Mixing,
        epoch: 3,
        step: 120,
        stage_done: false,
        best_val: Some(0.625),
        best_epoch: 2,
        bad_epochs: 1,
        metrics_len: 4096,
        model_file: "model-s2e3.safetensors".into(),
        optim_file: Some("optim-s2e3.safetensors".into()),
        best_file: Some("best-s2e2.safetensors".into()),
        next_seeds: [1, 2, 3],
        finished: false,
        test: Some(vec![row("missing-audio"), row("complete")]),
        test_extra: None,
        data: Some(r2scp::trainer::state::DataRecord {
            fingerprint: "fnv1a128:6c62272e07bb014262b821756295c58d".into(),
            dims: r2scp::data::DataDims {
                la: 8,
                da: 64,
                lv: 9,
                dv: 96,
                lq: 13,
                dk: 48,
                vocab_size: 5,
                n_answers: 3,
            },
            words: r2scp::data::Vocab::question(["how", "many", "cellos"].map(String::from)),
            answers: r2scp::data::Vocab::new(["no", "two", "yes"].map(String::from).to_vec())
                .unwrap(),
        }),
    }
}

#[test]
fn state_json_reader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("state.json");
    write_json(&target, &sample_state()).unwrap();
    let base = fs::read(&target).unwrap();
    let st = read_state(&target).unwrap();
    assert_eq!((st.stage.number(), st.epoch, st.step), (2, 3, 120));
    let text = String::from_utf8(base.clone()).unwrap();
    let mut m = Mutations::new(31);
    let lines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
    m.truncations(
        "state",
        &base,
        lines
            .iter()
            .copied()
            .chain(token_boundaries(&base, b"{}[]").into_iter().take(60)),
    );
    m.random_edits("state", &base, base.len(), 60);
    let subs: Vec<(&str, String)> = vec![
        ("\"format\": 1", "\"format\": 2".into()),
        ("\"stage\": 2", "\"stage\": 7".into()),
        ("\"stage\": 2", "\"stage\": 2, \"stage\": 1".into()),
        ("\"stage\": 2", "\"stage\": 256".into()),
        ("\"stage\": 2", "\"stage\": -1".into()),
        ("\"epoch\": 3", "\"epoch\": 18446744073709551616".into()),
        ("\"epoch\": 3", "\"epoch\": 1e400".into()),
        ("\"epoch\": 3", "\"epoch\": 3.5".into()),
        ("\"batch_size\": 16", "\"batch_size\": 0".into()),
        (
            "\"batch_size\": 16",
            "\"batch_size\": 16, \"batch_size\": 8".into(),
        ),
        ("\"eval_batch_size\": 128", "\"eval_batch_size\": 0".into()),
        (
            "\"metrics_len\": 4096",
            "\"metrics_len\": 18446744073709551615".into(),
        ),
        (
            "\"model_file\": \"model-s2e3.safetensors\"",
            "\"model_file\": \"../../x.safetensors\"".into(),
        ),
        (
            "\"model_file\": \"model-s2e3.safetensors\"",
            "\"model_file\": \"/etc/passwd\"".into(),
        ),
        (
            "\"model_file\": \"model-s2e3.safetensors\"",
            "\"model_file\": \"\"".into(),
        ),
        (
            "\"model_file\": \"model-s2e3.safetensors\"",
            "\"model_file\": \"model-\\ud800\"".into(),
        ),
        (
            "\"optim_file\": \"optim-s2e3.safetensors\"",
            "\"optim_file\": \"..\"".into(),
        ),
        (
            "\"next_seeds\": [",
            format!("\"next_seeds\": [{},", vec!["1"; 100_000].join(",")),
        ),
        (
            "\"test\": [",
            format!("\"test\": [{}", "{\"setting\": \"x\"},".repeat(10)),
        ),
        (
            "\"per_type\": [",
            format!("\"per_type\": [{}", "[1, 2],".repeat(100_000)),
        ),
        ("\"router\": [", format!("\"router\": {}", "[".repeat(300))),
        (
            "\"setting\": \"complete\"",
            format!("\"setting\": \"{}\"", "x".repeat(1 << 20)),
        ),
        ("{", "[".into()),
        ("{", "{\"format\": 1,".into()),
        ("\"finished\": false", "\"finished\": 0".into()),
        ("\"best_val\": 0.625", "\"best_val\": NaN".into()),
    ];
    m.substitutions("state", &base, &subs);
    let t = run_cases(
        "state json (read_state)",
        m.cases,
        &target,
        || as_text(read_state(&target)),
        |e| e.contains(&target.display().to_string()),
    );
    assert!(
        t.cases >= 300 && t.err >= 200,
        "{} cases, {} errors",
        t.cases,
        t.err
    );
}

// ---------------------------------------------------------------------------------------
// The TOML config.

const CONFIG: &str = r#"seed = 3
batch_size = 16
eval_batch_size = 64
missing_rate = 0.5
missing_type = "mixed"
decay = "cosine"

[stage1]
epochs = 1
lr = 0.002

[stage2]
epochs = 2
patience = 0

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
fn toml_config_reader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("config.toml");
    fs::write(&target, CONFIG).unwrap();
    let c = TrainConfig::from_toml_file(&target).unwrap();
    assert_eq!((c.seed, c.model.dim, c.stage2.epochs), (3, 16, 2));
    let base = CONFIG.as_bytes();
    let mut m = Mutations::new(41);
    m.truncations("config", base, token_boundaries(base, b"=[]\n\"."));
    m.random_edits("config", base, base.len(), 80);
    let subs: Vec<(&str, String)> = vec![
        ("epochs = 1", "epochs = -1".into()),
        ("epochs = 1", "epochs = 99999999999999999999".into()),
        ("epochs = 1", "epochs = 1.5".into()),
        ("epochs = 1", "epochs = \"1\"".into()),
        ("epochs = 1", "epochs = 1\nepochs = 2".into()),
        ("dim = 16", "dim = 1e400".into()),
        ("dim = 16", "dim = 18446744073709551615".into()),
        ("[model]", "[model]\n[model]".into()),
        ("[model]", "[stage1]".into()),
        ("[model]", "[[model]]".into()),
        ("[model]", "[model.x.y.z]".into()),
        (
            "seed = 3",
            format!("seed = {}{}", "[".repeat(300), "]".repeat(300)),
        ),
        (
            "seed = 3",
            format!("seed = [{}]", vec!["1"; 100_000].join(",")),
        ),
        ("seed = 3", format!("seed = \"{}\"", "x".repeat(1 << 19))),
        (
            "seed = 3",
            format!(
                "x = {{ {} }}",
                (0..5000)
                    .map(|i| format!("k{i} = {i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("seed = 3", "seed = 3\nbogus = 1".into()),
        ("missing_rate = 0.5", "missing_rate = nan".into()),
        ("missing_rate = 0.5", "missing_rate = inf".into()),
        ("\"mixed\"", "\"mixed\u{0}\"".into()),
        ("\"mixed\"", "'''mixed".into()),
        ("\"cosine\"", "\"cosine\" \"linear\"".into()),
    ];
    m.substitutions("config", base, &subs);
    // non-UTF-8 inside a string value
    let i = CONFIG.find("mixed").unwrap();
    let mut b = base.to_vec();
    b[i] = 0xff;
    m.push("non-UTF-8 byte in a string", b);
    let t = run_cases(
        "toml config (TrainConfig::from_toml_file)",
        m.cases,
        &target,
        || as_text(TrainConfig::from_toml_file(&target)),
        |e| e.contains(&target.display().to_string()),
    );
    assert!(
        t.cases >= 300 && t.err >= 150,
        "{} cases, {} errors",
        t.cases,
        t.err
    );
}

#[test]
fn oversized_files_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    // sparse files: the size is declared by the file system, no bytes are written
    let big = |name: &str, len: u64| -> PathBuf {
        let p = dir.path().join(name);
        fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    };
    let p = big("config.toml", r2scp::io::MAX_CONFIG_BYTES + 1);
    let e = format!("{:#}", TrainConfig::from_toml_file(&p).unwrap_err());
    assert!(
        e.contains("config.toml") && e.contains("more than the"),
        "{e}"
    );
    let p = big("state.json", r2scp::io::MAX_STATE_BYTES + 1);
    let e = format!("{:#}", read_state(&p).unwrap_err());
    assert!(
        e.contains("state.json") && e.contains("more than the"),
        "{e}"
    );
    let d = dir.path().join("data");
    write_avqa_fixture(&d);
    fs::File::options()
        .write(true)
        .open(d.join("avqa-val.json"))
        .unwrap()
        .set_len(r2scp::io::MAX_ANNOTATION_BYTES + 1)
        .unwrap();
    let e = format!("{:#}", load_music_avqa(&d).unwrap_err());
    assert!(
        e.contains("avqa-val.json") && e.contains("more than the"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Issue 19: files that are not what they claim to be.

/// Runs `f` on another thread; `None` when it has not returned within `secs` (the thread is
/// left blocked: the test fails anyway).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs)).ok()
}

/// Case 9: reading an annotation file, a config or a state file that is a FIFO with no
/// writer blocked forever; every whole-file reader now takes regular files only.
#[test]
fn fifos_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = |name: &str| -> PathBuf {
        let p = dir.path().join(name);
        let _ = fs::remove_file(&p);
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .expect("mkfifo");
        assert!(st.success());
        p
    };
    let p = fifo("c.toml");
    let e = within(10, move || {
        format!("{:#}", TrainConfig::from_toml_file(&p).unwrap_err())
    })
    .expect("a FIFO config blocked");
    assert!(e.contains("c.toml") && e.contains("FIFO"), "{e}");
    let p = fifo("state.json");
    let e = within(10, move || format!("{:#}", read_state(&p).unwrap_err()))
        .expect("a FIFO state file blocked");
    assert!(e.contains("state.json") && e.contains("FIFO"), "{e}");
    let d = dir.path().join("data");
    write_avqa_fixture(&d);
    fs::remove_file(d.join("avqa-val.json")).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(d.join("avqa-val.json"))
        .status()
        .unwrap();
    assert!(st.success());
    let e = within(10, move || {
        format!("{:#}", load_music_avqa(&d).unwrap_err())
    })
    .expect("a FIFO annotation file blocked");
    assert!(
        e.contains("avqa-val.json") && e.contains("not a regular file"),
        "{e}"
    );
    let p = fifo("m.safetensors");
    let e = within(10, move || {
        format!("{:#}", load_tensors(&p, &Device::Cpu).unwrap_err())
    })
    .expect("a FIFO checkpoint blocked");
    assert!(e.contains("m.safetensors"), "{e}");
}

/// Case 6: a question of 2,000 words is refused when the data is loaded, naming the file,
/// the question and the limit (it used to set the padded length of every question).
#[test]
fn an_overlong_question_is_refused_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    write_avqa_fixture(&d);
    let long = vec!["word"; 2000].join(" ");
    fs::write(
        d.join("avqa-test.json"),
        format!(
            r#"[{{"video_id": "v3", "question_id": 77, "type": ["Visual", "Location"], "question_content": "{long}", "anser": "yes"}}]"#
        ),
    )
    .unwrap();
    let e = format!("{:#}", load_music_avqa(&d).unwrap_err());
    assert!(
        e.contains("avqa-test.json") && e.contains("question 77") && e.contains("2000 words"),
        "{e}"
    );
}

/// Case 5: a checkpoint tensor whose dtype is relabelled (F32 bytes marked I32, same shape,
/// a valid file) loaded and evaluated; dtypes are now checked like shapes.
#[test]
fn a_checkpoint_tensor_relabelled_to_another_dtype_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::default();
    cfg.synthetic.n_train_clips = 12;
    cfg.synthetic.n_val_clips = 4;
    cfg.synthetic.n_test_clips = 4;
    cfg.synthetic.n_prototypes = 4;
    cfg.model.dim = 8;
    cfg.model.heads = 2;
    cfg.model.expert_layers = 1;
    let s = r2scp::trainer::Session::new(&cfg, &Device::Cpu).unwrap();
    let p = dir.path().join("model.safetensors");
    s.save_weights(&p).unwrap();
    s.load_weights(&p).expect("its own file loads");
    let mut bytes = fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("\"F32\"").unwrap();
    bytes[8 + at..8 + at + 5].copy_from_slice(b"\"I32\"");
    fs::write(&p, &bytes).unwrap();
    let e = format!("{:#}", s.load_weights(&p).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("dtype I32") && e.contains("F32"),
        "{e}"
    );
}
