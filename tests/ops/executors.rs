//! How an op test runs the op it checks: one test body, several executors (candle's
//! `test_device!` pattern).
//!
//! A test body takes the op as a function with the public op's signature and runs it on CPU
//! tensors. The executors are:
//! - the fused CPU path: the public op itself (`r2scp::retrieve::cosine_topk`, ...);
//! - the reference: the op's `*_reference` (plain candle ops);
//! - the emulated kernel: the op's `*_emulated` (the CUDA kernels on CPU threads);
//! - CUDA: the functions below. Each copies its inputs to CUDA device 0 (keeping their
//!   layout: a transposed or broadcast view stays one), runs the **public op** there, and
//!   copies the outputs back (a deferred call's pending result stays there until read). Whatever kernel the op picks on the device (today's, or a new
//!   one behind a dispatcher) is what the test checks, with no test change.
//!
//! A CUDA test (name `cuda_*`) runs its body through [`on_cuda`]: without a device (no GPU,
//! no driver, or a build without the `cuda` feature) it prints one line saying it was
//! skipped, and passes. The tensors copied there and back stay in candle's autograd graph, so
//! a gradient test through a CUDA executor runs the op's CUDA backward.

use candle_core::{Device, Result, Tensor};
use r2scp::cap::{Context, Dissonance};
use std::sync::OnceLock;

/// CUDA device 0, opened once per test process (every CUDA test shares it: candle treats
/// two `Device::new_cuda(0)` handles as different devices), or why it cannot be opened.
fn cuda_device() -> &'static std::result::Result<Device, String> {
    static DEV: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    DEV.get_or_init(|| {
        Device::new_cuda(0).map_err(|e| {
            // candle's error text may carry a backtrace after a newline: keep one line.
            r2scp::io::candle_text(&e)
        })
    })
}

/// Runs `body` with CUDA device 0, or prints `skipped <test>: ...` (one line) and returns.
pub fn on_cuda(test: &str, body: impl FnOnce()) {
    match cuda_device() {
        Ok(_) => body(),
        Err(why) => println!("skipped {test}: no CUDA device 0 ({why})"),
    }
}

/// The shared CUDA device; an error (not a panic) when there is none, so an executor called
/// outside [`on_cuda`] fails like an op.
fn cuda() -> Result<Device> {
    cuda_device()
        .clone()
        .map_err(|e| candle_core::Error::Msg(format!("no CUDA device 0: {e}")))
}

/// `t` on CUDA device 0, same shape, strides and offset.
///
/// A zero-element tensor whose copy fails (the driver refuses a zero-byte allocation, which
/// candle 0.11 asks for) becomes a zero-element view of a one-element device buffer: the
/// same shape and dtype, as the launchers' own outputs are made (`kernel::Launcher::zeros`).
pub fn to_cuda(t: &Tensor) -> Result<Tensor> {
    let dev = cuda()?;
    match t.to_device(&dev) {
        Err(_) if t.elem_count() == 0 => Tensor::zeros(1, t.dtype(), &dev)?
            .narrow(0, 0, 0)?
            .reshape(t.dims()),
        r => r,
    }
}

/// `t` back on the CPU.
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)
}

fn opt_to_cuda(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    t.map(to_cuda).transpose()
}

/// `r2scp::retrieve::cosine_topk` on CUDA device 0.
pub fn cosine_topk_cuda(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> r2scp::Result<(Tensor, Tensor)> {
    let (s, i) = r2scp::retrieve::cosine_topk(
        &to_cuda(queries)?,
        &to_cuda(keys)?,
        opt_to_cuda(key_norms)?.as_ref(),
        n,
        opt_to_cuda(exclude)?.as_ref(),
    )?;
    Ok((to_host(&s)?, to_host(&i)?))
}

/// `r2scp::retrieve::cosine_topk_deferred` on CUDA device 0. The pending result stays on the
/// device: a test reads its scores, indices and error word there (each read one copy back),
/// as a caller batching its checks would.
pub fn cosine_topk_deferred_cuda(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> r2scp::Result<r2scp::retrieve::PendingTopN> {
    r2scp::retrieve::cosine_topk_deferred(
        &to_cuda(queries)?,
        &to_cuda(keys)?,
        opt_to_cuda(key_norms)?.as_ref(),
        n,
        opt_to_cuda(exclude)?.as_ref(),
    )
}

/// `r2scp::retrieve::cosine_topk::cosine_topk_on_path_with` on CUDA device 0: one device path
/// forced (an error where it cannot take the call), with the approximate paths' test knobs.
pub fn cosine_topk_cuda_on_path(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    path: r2scp::retrieve::cosine_topk::kernel::Kernel,
    knobs: r2scp::retrieve::cosine_topk::kernel::Knobs,
) -> r2scp::Result<(Tensor, Tensor)> {
    let (s, i) = r2scp::retrieve::cosine_topk::cosine_topk_on_path_with(
        &to_cuda(queries)?,
        &to_cuda(keys)?,
        opt_to_cuda(key_norms)?.as_ref(),
        n,
        opt_to_cuda(exclude)?.as_ref(),
        path,
        knobs,
    )?
    .check()?;
    Ok((to_host(&s)?, to_host(&i)?))
}

/// `r2scp::cap::dissonance_topk` on CUDA device 0.
pub fn dissonance_topk_cuda(p: &Tensor, ctx: Context, k: usize) -> r2scp::Result<Dissonance> {
    let p = to_cuda(p)?;
    let out = match ctx {
        Context::Anchor(g) => r2scp::cap::dissonance_topk(&p, Context::Anchor(&to_cuda(g)?), k)?,
        Context::Tokens { h_avl, mask } => {
            let h = to_cuda(h_avl)?;
            let m = opt_to_cuda(mask)?;
            r2scp::cap::dissonance_topk(
                &p,
                Context::Tokens {
                    h_avl: &h,
                    mask: m.as_ref(),
                },
                k,
            )?
        }
    };
    Ok(Dissonance {
        delta: to_host(&out.delta)?,
        noise_idx: to_host(&out.noise_idx)?,
        noise_mask: to_host(&out.noise_mask)?,
    })
}

/// `r2scp::cap::topk_rows` on CUDA device 0.
pub fn topk_rows_cuda(scores: &Tensor, k: usize) -> r2scp::Result<(Tensor, Tensor)> {
    let (v, i) = r2scp::cap::topk_rows(&to_cuda(scores)?, k)?;
    Ok((to_host(&v)?, to_host(&i)?))
}

/// `r2scp::cap::gather_inject` on CUDA device 0.
pub fn gather_inject_cuda(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> r2scp::Result<Tensor> {
    Ok(to_host(&r2scp::cap::gather_inject(
        &to_cuda(h)?,
        &to_cuda(src)?,
        &to_cuda(noise_idx)?,
        &to_cuda(salient_idx)?,
    )?)?)
}
