//! kernels/README.md cannot go stale: its file table lists exactly the files under kernels/,
//! every entry point and every `r2_*` helper it names exists, every entry point and every
//! header helper is named; and every op has its four files (`kernels/<op>.cu`,
//! `kernels/emu/<op>.cpp`, `src/<family>/<op>/`, `tests/ops/<op>.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir`, as paths relative to `kernels/`.
fn files(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).expect("read kernels/").flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, base, out);
        } else {
            let rel = p.strip_prefix(base).expect("under kernels/");
            out.insert(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// Identifiers in `text` that start with `prefix` (letters, digits, `_`).
fn idents_with(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find(prefix) {
        let s = i + off;
        let before_ok = s == 0 || !(b[s - 1].is_ascii_alphanumeric() || b[s - 1] == b'_');
        let mut e = s + prefix.len();
        while e < b.len() && (b[e].is_ascii_alphanumeric() || b[e] == b'_') {
            e += 1;
        }
        if before_ok {
            out.insert(text[s..e].to_string());
        }
        i = e.max(s + 1);
    }
    out
}

/// The rows of the README's file table: (file, description).
fn table_rows(readme: &str) -> Vec<(String, String)> {
    readme
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            if cols.len() >= 4 && cols[1].starts_with('`') && cols[1].ends_with('`') {
                Some((cols[1].trim_matches('`').to_string(), cols[2].to_string()))
            } else {
                None
            }
        })
        .collect()
}

/// Base names of the entry points `R2_ENTRY(<name>[_##SUFFIX], ...)` of a `.cu` source.
fn entry_bases(src: &str) -> BTreeSet<String> {
    src.match_indices("R2_ENTRY(")
        .filter(|(i, _)| !src[..*i].ends_with("define "))
        .map(|(i, m)| {
            let rest = &src[i + m.len()..];
            let end = rest.find([',', ')']).unwrap_or(rest.len());
            rest[..end].trim().trim_end_matches("_##SUFFIX").to_string()
        })
        .filter(|n| !n.is_empty() && n != "NAME")
        .collect()
}

#[test]
fn kernels_readme_lists_what_exists() {
    let kdir = root().join("kernels");
    let readme = std::fs::read_to_string(kdir.join("README.md")).expect("kernels/README.md");
    let rows = table_rows(&readme);
    let listed: BTreeSet<String> = rows.iter().map(|(f, _)| f.clone()).collect();
    let mut present = BTreeSet::new();
    files(&kdir, &kdir, &mut present);
    present.remove("README.md");
    assert_eq!(
        listed, present,
        "kernels/README.md file table vs the files under kernels/"
    );

    // Every entry point is named in its file's row.
    for (file, desc) in &rows {
        if !file.ends_with(".cu") {
            continue;
        }
        let src = std::fs::read_to_string(kdir.join(file)).expect("kernel source");
        for base in entry_bases(&src) {
            assert!(
                desc.contains(&base),
                "kernels/README.md row of {file} does not name entry point {base}"
            );
        }
    }

    // Every r2_* helper the README names exists, and every header helper is named.
    let mut sources = String::new();
    for f in &present {
        sources.push_str(&std::fs::read_to_string(kdir.join(f)).expect("kernel file"));
    }
    let defined = idents_with(&sources, "r2_");
    for name in idents_with(&readme, "r2_") {
        assert!(
            defined.contains(&name),
            "kernels/README.md names `{name}`, which no file under kernels/ has"
        );
    }
    for (file, desc) in &rows {
        if !file.ends_with(".cuh") {
            continue;
        }
        let src = std::fs::read_to_string(kdir.join(file)).expect("header");
        for line in src.lines().filter(|l| l.contains("__device__")) {
            for name in idents_with(line, "r2_") {
                if line.contains(&format!("{name}(")) {
                    assert!(
                        desc.contains(&name),
                        "kernels/README.md row of {file} does not name helper {name}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_op_has_its_four_files() {
    let r = root();
    let mut ops = Vec::new();
    for e in std::fs::read_dir(r.join("kernels"))
        .expect("kernels/")
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "cu") {
            ops.push(p.file_stem().expect("stem").to_string_lossy().to_string());
        }
    }
    assert!(ops.len() >= 4, "ops found: {ops:?}");
    for op in ops {
        assert!(
            r.join("kernels/emu").join(format!("{op}.cpp")).is_file(),
            "kernels/emu/{op}.cpp is missing"
        );
        assert!(
            r.join("tests/ops").join(format!("{op}.rs")).is_file(),
            "tests/ops/{op}.rs is missing"
        );
        let families = ["retrieve", "cap"];
        assert!(
            families
                .iter()
                .any(|f| r.join("src").join(f).join(&op).join("mod.rs").is_file()),
            "src/<family>/{op}/mod.rs is missing (families: {families:?})"
        );
    }
}
