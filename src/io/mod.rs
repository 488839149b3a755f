//! Bounded readers for every file r2scp reads from a user or from an earlier run.
//!
//! One contract for all of them (docs/DESIGN.md, "Bounded readers"):
//! - a size a file declares (an `.npy` header's shape and dtype, a safetensors header's
//!   length, shapes and offsets) is checked against the bytes actually present before
//!   anything is allocated from it;
//! - whole-file reads are capped per kind of file ([`MAX_ANNOTATION_BYTES`],
//!   [`MAX_STATE_BYTES`], [`MAX_CONFIG_BYTES`]) and every buffer sized from a file is
//!   reserved with `try_reserve`, so a file that is too large is an `Err`, never an abort;
//! - every error is one line that starts with the file's path and says what is wrong.
//!
//! Modules: [`npy`] (NumPy feature files), [`tensors`] (safetensors: memory bank and
//! checkpoints), [`json`] (annotation lists and the checkpoint state). TOML configs are read
//! with [`read_text_capped`] and parsed by `toml`, whose parser is bounded by the text.

pub mod json;
pub mod npy;
pub mod tensors;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Largest MUSIC-AVQA annotation file accepted (the released `avqa-train.json` is about
/// 10 MiB).
pub const MAX_ANNOTATION_BYTES: u64 = 256 * MIB;

/// Largest checkpoint `state.json` accepted (a real one is a few KiB).
pub const MAX_STATE_BYTES: u64 = 16 * MIB;

/// Largest TOML config accepted (a real one is about 1 KiB).
pub const MAX_CONFIG_BYTES: u64 = MIB;

/// Read all of `path` if it holds at most `cap` bytes; `what` names the kind of file in
/// errors ("config file", ...). The buffer is reserved fallibly from the file's length, and
/// the read stops at `cap + 1` bytes, so a file that grows while it is read (or a device
/// such as `/dev/zero`) is refused too.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let len = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot read {what}: {e}", path.display()))?
        .len();
    if len > cap {
        bail!(
            "{}: {what} is {len} bytes, more than the {cap} bytes accepted",
            path.display()
        );
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(len as usize).map_err(|_| {
        anyhow!(
            "{}: cannot allocate {len} bytes to read {what}",
            path.display()
        )
    })?;
    file.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| anyhow!("{}: cannot read {what}: {e}", path.display()))?;
    if buf.len() as u64 > cap {
        bail!(
            "{}: {what} holds more than the {cap} bytes accepted",
            path.display()
        );
    }
    Ok(buf)
}

/// Open `path` for reading if it is a regular file (symbolic links followed); `what` names
/// the kind of file in errors. A FIFO, socket, device or directory is refused before it is
/// opened: opening a FIFO that has no writer blocks forever, and a device has no length to
/// check a cap against. The opened file is checked again, so a path swapped between the two
/// checks is refused too (unless it is swapped for a FIFO in that instant, which then blocks
/// as any reader of a FIFO would).
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let not_regular = |kind: std::fs::FileType| {
        anyhow!(
            "{}: cannot read {what}: it is {}, not a regular file",
            path.display(),
            file_kind(kind)
        )
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow!("{}: cannot read {what}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let file =
        File::open(path).map_err(|e| anyhow!("{}: cannot read {what}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot read {what}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok(file)
}

/// "a directory", "a FIFO", ... for the error of [`open_regular`].
fn file_kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// [`read_capped`], then a UTF-8 check that names the first bad byte.
pub fn read_text_capped(path: &Path, cap: u64, what: &str) -> Result<String> {
    let bytes = read_capped(path, cap, what)?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: {what} is not UTF-8 text (bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A candle error as one line, without the backtrace candle appends (after a newline) to
/// its errors when `RUST_BACKTRACE` is set.
pub fn candle_text(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_text(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_text(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_text(inner)),
        e => one_line(&e.to_string()),
    }
}

/// An error chain as the one line `r2scp` prints after `error: `: each cause's text joined
/// by `": "` (as anyhow's `{:#}`), candle errors without their backtraces.
pub fn error_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| match c.downcast_ref::<candle_core::Error>() {
            Some(ce) => candle_text(ce),
            None => one_line(&c.to_string()),
        })
        .collect();
    parts.join(": ")
}

/// Collapse whitespace runs (newlines included) into single spaces.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A `Vec<T>` of `n` elements reserved fallibly; the error names the file and the size.
pub(crate) fn try_vec<T>(n: usize, path: &Path, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        anyhow!(
            "{}: cannot allocate {} bytes for {what}",
            path.display(),
            n.saturating_mul(std::mem::size_of::<T>())
        )
    })?;
    Ok(v)
}

/// `shape` as a product that could be a real array of `elem_bytes`-byte elements: the
/// element count, or `None` when the count times the element size overflows, or when the
/// dimensions with zeros counted as ones would (a zero-size array may not carry a dimension
/// no real array could have: later reshapes and products of its dims must not overflow).
pub(crate) fn checked_numel(shape: &[usize], elem_bytes: usize) -> Option<usize> {
    let mut numel = 1usize;
    let mut span = elem_bytes.max(1);
    for &d in shape {
        numel = numel.checked_mul(d)?;
        span = span.checked_mul(d.max(1))?;
    }
    (span <= isize::MAX as usize).then_some(numel)
}
