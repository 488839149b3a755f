//! The op tests, one module per op (`tests/ops/<op>.rs` beside `kernels/<op>.cu` and
//! `src/<family>/<op>/`), in ONE test target so the op tests link once.
//!
//! Test names starting with `emu_` run kernels through the CUDA emulator; `.ci/run` reruns
//! exactly those under ThreadSanitizer (`cargo test --tests emu_`). Test names starting with
//! `cuda_` run the public ops on CUDA device 0 (`executors`), or print one line saying they
//! were skipped; `scripts/gpu-lane run` runs exactly those on a GPU machine. With feature
//! `cuda` this is the one test binary the GPU lane ships (each binary linked with candle's
//! CUDA kernels embeds about 55 MB of them).

mod common;
mod cosine_topk;
mod dissonance_topk;
mod executors;
mod gather_inject;
mod kernels_readme;
mod properties;
mod topk_rows;
