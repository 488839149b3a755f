//! How both fused CPU paths (`cpu.rs`, `qlanes.rs`) cut the bank into row chunks, and how a
//! chunk reports the first NaN score it met.

/// First NaN score met: (query, bank row).
pub(crate) type NanAt = (usize, usize);

/// Rows per chunk of about 128 KiB of keys (`elt` bytes per element, `d` per row), a
/// multiple of `multiple` (the micro-kernel's row block): a chunk stays in L2 while every
/// query of a block reads it.
pub(crate) fn chunk_rows_for(d: usize, elt: usize, multiple: usize) -> usize {
    let r = (128 * 1024) / (d * elt).max(1);
    (r.max(multiple) / multiple) * multiple
}
