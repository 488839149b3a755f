//! Which device path runs a `cosine_topk` call (issue 23, dispatch by measurement).
//!
//! In order:
//! 1. the override `R2SCP_COSINE_TOPK_PATH` = `bandwidth` | `tensor-core` | `gemm` |
//!    `gemm-fp32` forces a path (a path that cannot take a call runs the bandwidth kernel);
//! 2. the dispatch table of this GPU, measured by `r2scp tune --device cuda`: the cell nearest
//!    the call (same key dtype, nearest D, then nearest B, in log2) names the fastest path;
//! 3. without a table, the default rule [`super::kernel::choose`] (GEMM + select from 16
//!    queries and 32 dimensions, the bandwidth kernel below; the tensor-core kernel only when a
//!    table says it wins).
//!
//! Tables are keyed by GPU name and compute capability. The table of a GPU is looked for at
//! `R2SCP_DISPATCH_TABLE` (a file) if set, else in the user's cache directory
//! (`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on
//! Windows) as `r2scp/dispatch/<gpu>-sm<cc>.json`, else among the tables shipped in the crate
//! ([`SHIPPED`]). It is read once per process; a missing, corrupt or other-GPU table prints one
//! warning line (stderr) and the default rule applies.

use super::kernel::Kernel;
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The variable that forces a path.
pub const PATH_ENV: &str = "R2SCP_COSINE_TOPK_PATH";
/// The variable naming the table file to read (and `tune` to write) instead of the cache's.
pub const TABLE_ENV: &str = "R2SCP_DISPATCH_TABLE";
/// Format version of the table files.
pub const FORMAT: u32 = 1;
/// Largest table file read (bytes).
pub const MAX_TABLE_BYTES: u64 = 1 << 20;

/// Tables measured on real GPUs, shipped in the crate (JSON, the format of
/// [`DispatchTable::to_json`]); none has been measured yet (no GPU run since issue 23). Add
/// one with `include_str!` after a GPU lane run.
pub const SHIPPED: &[&str] = &[];

/// A GPU as the tables know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GpuId {
    /// The driver's name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (u32, u32),
}

impl GpuId {
    /// `9.0`.
    pub fn cc_string(&self) -> String {
        format!("{}.{}", self.cc.0, self.cc.1)
    }

    /// File stem of its table: the name in lower case, non-alphanumerics as `-`, and
    /// `-sm<major><minor>` (`nvidia-h200-sm90`).
    pub fn slug(&self) -> String {
        let mut s = String::new();
        for ch in self.name.chars() {
            if ch.is_ascii_alphanumeric() {
                s.push(ch.to_ascii_lowercase());
            } else if !s.ends_with('-') && !s.is_empty() {
                s.push('-');
            }
        }
        let s = s.trim_end_matches('-');
        format!("{s}-sm{}{}", self.cc.0, self.cc.1)
    }
}

/// One measured cell: the paths' times for keys of `dtype`, dimension `d`, `b` queries, a bank
/// of `m` rows, and the fastest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    pub d: usize,
    pub b: usize,
    pub m: usize,
    /// Median device time (CUDA events) per path name, milliseconds; paths that could not
    /// take the cell are absent.
    pub ms: BTreeMap<String, f64>,
    /// The fastest path's name.
    pub best: String,
}

/// A dispatch table: the cells `r2scp tune` measured on one GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchTable {
    /// [`FORMAT`].
    pub format: u32,
    /// GPU name as the driver reports it.
    pub gpu: String,
    /// Compute capability, `major.minor`.
    pub cc: String,
    /// r2scp version that measured it.
    pub r2scp: String,
    /// Results per query the cells were measured with.
    pub n: usize,
    pub cells: Vec<Cell>,
}

/// A key dtype's name in tables (`f32`, `f16`, `bf16`).
pub(crate) fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

impl DispatchTable {
    /// The table as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses and validates a table: the format, every cell's dtype and best path.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let t: DispatchTable =
            serde_json::from_str(text).map_err(|e| format!("not a dispatch table ({e})"))?;
        if t.format != FORMAT {
            return Err(format!("table format {} (expected {FORMAT})", t.format));
        }
        for c in &t.cells {
            if !["f32", "f16", "bf16"].contains(&c.dtype.as_str()) {
                return Err(format!(
                    "cell dtype `{}` (expected f32, f16 or bf16)",
                    c.dtype
                ));
            }
            Kernel::from_name(&c.best)
                .ok_or_else(|| format!("cell best path `{}` is not a path", c.best))?;
            if c.d == 0 || c.b == 0 {
                return Err(format!("cell with D = {}, B = {}", c.d, c.b));
            }
        }
        Ok(t)
    }

    /// Whether the table was measured on `gpu`.
    pub fn is_for(&self, gpu: &GpuId) -> bool {
        self.gpu == gpu.name && self.cc == gpu.cc_string()
    }

    /// The fastest path of the cell nearest a call of `b` queries, dimension `d`, keys of
    /// `dtype`: same dtype, nearest D in log2, then nearest B in log2 (the smaller on a tie);
    /// `None` when no cell has the dtype.
    pub fn pick(&self, b: usize, d: usize, dtype: DType) -> Option<Kernel> {
        let name = dtype_name(dtype);
        let dist = |x: usize, y: usize| ((x.max(1) as f64).log2() - (y.max(1) as f64).log2()).abs();
        self.cells
            .iter()
            .filter(|c| c.dtype == name)
            .min_by(|x, y| {
                let kx = (dist(x.d, d), dist(x.b, b), x.b);
                let ky = (dist(y.d, d), dist(y.b, b), y.b);
                kx.partial_cmp(&ky).unwrap_or(std::cmp::Ordering::Equal)
            })
            .and_then(|c| Kernel::from_name(&c.best))
    }

    /// The table as markdown: one row per cell, the paths' times and the fastest.
    pub fn markdown(&self) -> String {
        let mut paths: Vec<&str> = Vec::new();
        for c in &self.cells {
            for p in c.ms.keys() {
                if !paths.contains(&p.as_str()) {
                    paths.push(p);
                }
            }
        }
        let mut t = crate::bench::Table::new(
            &["keys", "D", "B", "M"]
                .iter()
                .copied()
                .chain(paths.iter().copied())
                .chain(["fastest"])
                .collect::<Vec<_>>(),
        );
        for c in &self.cells {
            let mut row = vec![
                c.dtype.clone(),
                c.d.to_string(),
                c.b.to_string(),
                c.m.to_string(),
            ];
            for p in &paths {
                row.push(c.ms.get(*p).map_or("-".into(), |v| format!("{v:.3}")));
            }
            row.push(c.best.clone());
            t.row(row);
        }
        format!(
            "Dispatch table for {} (sm {}), n = {}, r2scp {} (device ms per call, CUDA events):\n\n{}",
            self.gpu,
            self.cc,
            self.n,
            self.r2scp,
            t.render()
        )
    }
}

/// The user's cache directory, if the environment names one.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if cfg!(windows) {
        return var("LOCALAPPDATA");
    }
    if cfg!(target_os = "macos") {
        return var("HOME").map(|h| h.join("Library").join("Caches"));
    }
    var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))
}

/// Where the table of `gpu` is read from and written to: `R2SCP_DISPATCH_TABLE`, else
/// `<cache>/r2scp/dispatch/<slug>.json`.
pub fn table_path(gpu: &GpuId) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(TABLE_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    cache_dir().map(|d| {
        d.join("r2scp")
            .join("dispatch")
            .join(format!("{}.json", gpu.slug()))
    })
}

/// Writes `table` to `path` (directories created): to a temporary file beside it, then renamed
/// over it, so a crash never leaves half a table. A file already at `path` is replaced only
/// when it is a dispatch table (r2scp's own); anything else is left alone and is an error.
pub fn save_table(table: &DispatchTable, path: &Path) -> Result<(), String> {
    if path.exists() {
        let own = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() <= MAX_TABLE_BYTES)
            && std::fs::read_to_string(path)
                .ok()
                .is_some_and(|t| DispatchTable::from_json(&t).is_ok());
        if !own {
            return Err(format!(
                "{} exists and is not a dispatch table r2scp wrote; not overwriting it (remove it or choose another path)",
                path.display()
            ));
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, table.to_json()).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("moving {} to {}: {e}", tmp.display(), path.display())
    })
}

/// A table read for one GPU, or why the default rule applies (one line).
#[derive(Clone, Debug, PartialEq)]
pub enum Loaded {
    /// The GPU's table.
    Table(DispatchTable),
    /// No usable table: the warning to print.
    Default(String),
}

const DEFAULT_RULE: &str = "using the default rule (GEMM + select from B = 16 and D = 32, the bandwidth kernel below; run `r2scp tune --device cuda` to measure)";

/// Reads the table of `gpu` from `path` (when it exists), else from `shipped`.
pub fn load(gpu: &GpuId, path: Option<&Path>, shipped: &[&str]) -> Loaded {
    let who = format!("{} (sm {})", gpu.name, gpu.cc_string());
    if let Some(p) = path.filter(|p| p.exists()) {
        let text = match std::fs::metadata(p) {
            Ok(m) if m.len() > MAX_TABLE_BYTES => Err(format!(
                "{} bytes, more than a table's {MAX_TABLE_BYTES}",
                m.len()
            )),
            _ => std::fs::read_to_string(p).map_err(|e| e.to_string()),
        };
        return match text.and_then(|t| DispatchTable::from_json(&t)) {
            Err(e) => Loaded::Default(format!(
                "cosine_topk dispatch table {}: {e}; {DEFAULT_RULE}",
                p.display()
            )),
            Ok(t) if !t.is_for(gpu) => Loaded::Default(format!(
                "cosine_topk dispatch table {} was measured on {} (sm {}), this is {who}; {DEFAULT_RULE}",
                p.display(),
                t.gpu,
                t.cc
            )),
            Ok(t) => Loaded::Table(t),
        };
    }
    for text in shipped {
        if let Ok(t) = DispatchTable::from_json(text) {
            if t.is_for(gpu) {
                return Loaded::Table(t);
            }
        }
    }
    let looked = path.map_or_else(
        || "no cache directory (HOME unset)".to_string(),
        |p| p.display().to_string(),
    );
    Loaded::Default(format!(
        "no cosine_topk dispatch table for {who} ({looked}); {DEFAULT_RULE}"
    ))
}

/// The override in `value` (the contents of [`PATH_ENV`]): `Ok(None)` when empty, an error line
/// when it names no path.
pub fn parse_override(value: Option<&str>) -> Result<Option<Kernel>, String> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => Kernel::from_name(v).map(Some).ok_or_else(|| {
            format!(
                "{PATH_ENV} = `{v}` is not a path (expected one of {}); ignored",
                Kernel::ALL.map(|k| k.name()).join(", ")
            )
        }),
    }
}

/// The process's override (read once; a bad value prints one warning line and is ignored).
pub fn override_path() -> Option<Kernel> {
    static O: OnceLock<Option<Kernel>> = OnceLock::new();
    *O.get_or_init(|| {
        let v = std::env::var(PATH_ENV).ok();
        parse_override(v.as_deref()).unwrap_or_else(|w| {
            eprintln!("warning: r2scp: {w}");
            None
        })
    })
}

/// The table of `gpu`, read once per process (its warning printed once).
pub fn table_for(gpu: &GpuId) -> Option<Arc<DispatchTable>> {
    type Cache = Mutex<HashMap<GpuId, Option<Arc<DispatchTable>>>>;
    static C: OnceLock<Cache> = OnceLock::new();
    let mut map = match C.get_or_init(|| Mutex::new(HashMap::new())).lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    map.entry(gpu.clone())
        .or_insert_with(|| match load(gpu, table_path(gpu).as_deref(), SHIPPED) {
            Loaded::Table(t) => Some(Arc::new(t)),
            Loaded::Default(w) => {
                eprintln!("warning: r2scp: {w}");
                None
            }
        })
        .clone()
}

/// The path for one call of `b` queries, dimension `d`, keys of `dtype` on `gpu`: the override,
/// else the table, else [`super::kernel::choose`].
pub fn pick(gpu: &GpuId, b: usize, d: usize, dtype: DType) -> Kernel {
    if let Some(k) = override_path() {
        return k;
    }
    table_for(gpu)
        .and_then(|t| t.pick(b, d, dtype))
        .unwrap_or_else(|| super::kernel::choose(b, d, dtype))
}

/// The GPU of a candle CUDA device (asked of the driver once per CUDA context).
#[cfg(feature = "cuda")]
pub fn gpu_of(dev: &candle_core::cuda_backend::CudaDevice) -> candle_core::Result<GpuId> {
    type Cache = Mutex<HashMap<usize, GpuId>>;
    static C: OnceLock<Cache> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = Arc::as_ptr(&ctx) as usize;
    let cache = C.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(g) = cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(g);
    }
    let err = |e| candle_core::Error::Msg(format!("r2scp cuda: device query: {e:?}"));
    let name = ctx.name().map_err(err)?;
    let (ma, mi) = ctx.compute_capability().map_err(err)?;
    let g = GpuId {
        name,
        cc: (ma.max(0) as u32, mi.max(0) as u32),
    };
    if let Ok(mut m) = cache.lock() {
        m.insert(key, g.clone());
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200() -> GpuId {
        GpuId {
            name: "NVIDIA H200".into(),
            cc: (9, 0),
        }
    }

    fn table(gpu: &GpuId) -> DispatchTable {
        let cell = |dtype: &str, d, b, best: &str| Cell {
            dtype: dtype.into(),
            d,
            b,
            m: 1 << 20,
            ms: [("bandwidth".to_string(), 1.0), (best.to_string(), 0.5)]
                .into_iter()
                .collect(),
            best: best.into(),
        };
        DispatchTable {
            format: FORMAT,
            gpu: gpu.name.clone(),
            cc: gpu.cc_string(),
            r2scp: "test".into(),
            n: 8,
            cells: vec![
                cell("bf16", 256, 1, "bandwidth"),
                cell("bf16", 256, 64, "tensor-core"),
                cell("bf16", 1024, 64, "gemm"),
                cell("f32", 256, 64, "gemm-fp32"),
            ],
        }
    }

    #[test]
    fn slugs_and_names() {
        assert_eq!(h200().slug(), "nvidia-h200-sm90");
        let g = GpuId {
            name: "NVIDIA A100-SXM4-80GB ".into(),
            cc: (8, 0),
        };
        assert_eq!(g.slug(), "nvidia-a100-sxm4-80gb-sm80");
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
        }
        assert_eq!(Kernel::from_name("gemm-tf32"), None);
    }

    #[test]
    fn pick_takes_the_nearest_cell_of_the_dtype() {
        let t = table(&h200());
        assert_eq!(t.pick(1, 256, DType::BF16), Some(Kernel::Bandwidth));
        assert_eq!(t.pick(3, 256, DType::BF16), Some(Kernel::Bandwidth));
        // log2 distance: 8 is as far from 1 as from 64, the smaller cell wins the tie.
        assert_eq!(t.pick(8, 256, DType::BF16), Some(Kernel::Bandwidth));
        assert_eq!(t.pick(9, 256, DType::BF16), Some(Kernel::TensorCore));
        assert_eq!(t.pick(4096, 512, DType::BF16), Some(Kernel::TensorCore));
        assert_eq!(t.pick(4096, 768, DType::BF16), Some(Kernel::Gemm));
        assert_eq!(t.pick(2, 64, DType::F32), Some(Kernel::GemmFp32));
        assert_eq!(t.pick(64, 256, DType::F16), None);
    }

    #[test]
    fn tables_round_trip_and_validate() {
        let t = table(&h200());
        assert_eq!(DispatchTable::from_json(&t.to_json()).unwrap(), t);
        let mut bad = t.clone();
        bad.cells[0].best = "warp-speed".into();
        let e = DispatchTable::from_json(&bad.to_json()).unwrap_err();
        assert!(e.contains("warp-speed"), "{e}");
        let mut bad = t.clone();
        bad.format = 2;
        assert!(DispatchTable::from_json(&bad.to_json())
            .unwrap_err()
            .contains("format 2"));
        assert!(DispatchTable::from_json("{\"gpu\": 1}")
            .unwrap_err()
            .contains("not a dispatch table"));
        let md = t.markdown();
        assert!(
            md.contains("NVIDIA H200") && md.contains("tensor-core") && md.contains("| 1024"),
            "{md}"
        );
    }

    /// A missing, corrupt or other-GPU table: one warning line naming the file and the
    /// default rule; a good one loads; shipped tables stand in for a missing file.
    #[test]
    fn reader_warns_once_per_bad_table_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = h200();
        let warn = |l: Loaded| match l {
            Loaded::Default(w) => {
                assert!(!w.contains('\n'), "one line: {w}");
                assert!(w.contains("default rule"), "{w}");
                w
            }
            Loaded::Table(t) => panic!("expected a warning, loaded {t:?}"),
        };
        let missing = dir.path().join("none.json");
        let w = warn(load(&gpu, Some(&missing), &[]));
        assert!(
            w.contains("no cosine_topk dispatch table") && w.contains("none.json"),
            "{w}"
        );
        let w = warn(load(&gpu, None, &[]));
        assert!(w.contains("HOME unset"), "{w}");

        let corrupt = dir.path().join("corrupt.json");
        std::fs::write(&corrupt, "{\"format\": 1, \"gpu\": ").unwrap();
        let w = warn(load(&gpu, Some(&corrupt), &[]));
        assert!(
            w.contains("corrupt.json") && w.contains("not a dispatch table"),
            "{w}"
        );

        let a100 = GpuId {
            name: "NVIDIA A100-SXM4-80GB".into(),
            cc: (8, 0),
        };
        let other = dir.path().join("other.json");
        std::fs::write(&other, table(&a100).to_json()).unwrap();
        let w = warn(load(&gpu, Some(&other), &[]));
        assert!(w.contains("A100") && w.contains("H200"), "{w}");

        let good = dir.path().join("good.json");
        std::fs::write(&good, table(&gpu).to_json()).unwrap();
        assert_eq!(load(&gpu, Some(&good), &[]), Loaded::Table(table(&gpu)));
        // A shipped table of this GPU when no file exists; another GPU's is skipped.
        let shipped = [table(&a100).to_json(), table(&gpu).to_json()];
        let shipped: Vec<&str> = shipped.iter().map(String::as_str).collect();
        assert_eq!(
            load(&gpu, Some(&missing), &shipped),
            Loaded::Table(table(&gpu))
        );
        warn(load(&gpu, Some(&missing), &shipped[..1]));
    }

    #[test]
    fn saving_replaces_only_own_tables() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&h200());
        let p = dir.path().join("sub").join("t.json");
        save_table(&t, &p).unwrap();
        assert_eq!(load(&h200(), Some(&p), &[]), Loaded::Table(t.clone()));
        let mut t2 = t.clone();
        t2.cells.truncate(1);
        save_table(&t2, &p).unwrap();
        assert_eq!(load(&h200(), Some(&p), &[]), Loaded::Table(t2));
        // A file r2scp did not write stays as it was.
        let other = dir.path().join("notes.json");
        std::fs::write(&other, "my notes").unwrap();
        let e = save_table(&t, &other).unwrap_err();
        assert!(e.contains("not overwriting"), "{e}");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "my notes");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary left"
        );
    }

    #[test]
    fn override_values() {
        assert_eq!(parse_override(None), Ok(None));
        assert_eq!(parse_override(Some("  ")), Ok(None));
        assert_eq!(parse_override(Some("gemm")), Ok(Some(Kernel::Gemm)));
        assert_eq!(
            parse_override(Some("tensor-core")),
            Ok(Some(Kernel::TensorCore))
        );
        let e = parse_override(Some("fast")).unwrap_err();
        assert!(e.contains("`fast`"), "{e}");
        for k in Kernel::ALL {
            assert!(e.contains(k.name()), "{e}");
        }
    }
}
