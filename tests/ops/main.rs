//! The op tests, one module per op (`tests/ops/<op>.rs` beside `kernels/<op>.cu` and
//! `src/<family>/<op>/`), in ONE test target so the op tests link once.
//!
//! Test names starting with `emu_` run kernels through the CUDA emulator; `.ci/run` reruns
//! exactly those under ThreadSanitizer (`cargo test --tests emu_`).

mod common;
mod cosine_topk;
mod dissonance_topk;
mod gather_inject;
mod kernels_readme;
mod properties;
mod topk_rows;
