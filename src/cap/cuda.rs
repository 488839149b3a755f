//! CUDA paths of the CAP ops (feature `cuda`): `kernels/dissonance_topk.cu` and
//! `kernels/gather_inject.cu`, launched with the plans of [`super::kernel`] (the plans the
//! emulator tests) through the module loader of [`crate::cuda`].

use super::dissonance::{store_side, Dims, Side};
use super::inject::{InjectPlan, Part};
use super::kernel::{dissonance_plan, inject_plan, topk_rows_plan};
use crate::launch::LaunchPlan;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

fn cfg(p: &LaunchPlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: p.grid,
        block_dim: p.block,
        shared_mem_bytes: p.smem_bytes,
    }
}

fn offsets(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{op}: expected a contiguous input (the public op makes inputs contiguous)"),
    }
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        dt => bail!("{op}: dtype {dt:?} has no CUDA kernel (f32, f16, bf16; f64 runs on CPU)"),
    })
}

/// The CUDA storage of an index tensor (u32, contiguous) with its offsets.
fn index_storage<'a>(
    t: &'a Tensor,
    op: &str,
) -> Result<(candle_core::StorageRef<'a>, (usize, usize))> {
    let (s, l) = t.storage_and_layout();
    let o = offsets(l, op)?;
    if !matches!(&*s, Storage::Cuda(_)) {
        bail!("{op}: index tensor is not on the CUDA device");
    }
    Ok((s, o))
}

fn cuda_of<'a>(s: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("{op}: expected CUDA storage"),
    }
}

/// `dissonance_topk_<dt>`: returns delta [B, L] f32 and stores (indices, mask) in `side`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dissonance_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
    anchor: bool,
    dims: Dims,
    side: &Side,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "dissonance_topk";
    let dev = s1.device().clone();
    let Dims { b, l, la, d, k } = dims;
    let plan = dissonance_plan(b, l, d, k)?;
    let (mask32, has_mask) = match mask {
        Some((ms, ml)) => (ms.to_dtype(ml, DType::F32)?, 1u32),
        None => (
            CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(1)?, dev.clone()),
            0u32,
        ),
    };
    let mask_v = mask32.as_cuda_slice::<f32>()?;
    let delta = dev.alloc_zeros::<f32>(b * l)?;
    let idx = dev.alloc_zeros::<u32>(b * k)?;
    let nmask = dev.alloc_zeros::<f32>(b * l)?;
    let (p0, p1) = offsets(l1, OP)?;
    let (c0, c1) = offsets(l2, OP)?;
    let func = crate::cuda::function(
        &dev,
        &format!("dissonance_topk_{}", suffix(s1.dtype(), OP)?),
    )?;
    let stream = dev.cuda_stream();
    let (l32, la32, d32, k32) = (l as u32, la as u32, d as u32, k as u32);
    let anchor32 = anchor as u32;
    macro_rules! launch {
        ($t:ty) => {{
            let pv = s1.as_cuda_slice::<$t>()?.slice(p0..p1);
            let cv = s2.as_cuda_slice::<$t>()?.slice(c0..c1);
            let mut lb = stream.launch_builder(&func);
            lb.arg(&pv);
            lb.arg(&cv);
            lb.arg(mask_v);
            lb.arg(&has_mask);
            lb.arg(&anchor32);
            lb.arg(&l32);
            lb.arg(&la32);
            lb.arg(&d32);
            lb.arg(&k32);
            lb.arg(&plan.kp);
            lb.arg(&plan.tile);
            lb.arg(&delta);
            lb.arg(&idx);
            lb.arg(&nmask);
            // SAFETY: the argument list matches `dissonance_topk_<dt>`; buffers follow the plan.
            unsafe { lb.launch(cfg(&plan.launch)) }.w()?;
        }};
    }
    match s1.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    store_side(
        side,
        Storage::Cuda(CudaStorage::wrap_cuda_slice(idx, dev.clone())),
        Storage::Cuda(CudaStorage::wrap_cuda_slice(nmask, dev.clone())),
    )?;
    Ok((
        CudaStorage::wrap_cuda_slice(delta, dev),
        Shape::from((b, l)),
    ))
}

/// `topk_rows_f32`: (values, indices) storages of shape [B, k].
pub(crate) fn topk_rows_fwd(
    s: &CudaStorage,
    layout: &Layout,
    b: usize,
    l: usize,
    k: usize,
) -> Result<(Storage, Storage)> {
    const OP: &str = "topk_rows";
    if s.dtype() != DType::F32 {
        bail!("{OP}: dtype {:?} has no CUDA kernel (f32)", s.dtype());
    }
    let dev = s.device().clone();
    let plan = topk_rows_plan(b, l, k)?;
    let (o0, o1) = offsets(layout, OP)?;
    let sv = s.as_cuda_slice::<f32>()?.slice(o0..o1);
    let vals = dev.alloc_zeros::<f32>(b * k)?;
    let idx = dev.alloc_zeros::<u32>(b * k)?;
    let func = crate::cuda::function(&dev, "topk_rows_f32")?;
    let stream = dev.cuda_stream();
    let (l32, k32) = (l as u32, k as u32);
    let mut lb = stream.launch_builder(&func);
    lb.arg(&sv);
    lb.arg(&l32);
    lb.arg(&k32);
    lb.arg(&plan.kp);
    lb.arg(&plan.tile);
    lb.arg(&vals);
    lb.arg(&idx);
    // SAFETY: the argument list matches `topk_rows_f32`; buffers follow the plan.
    unsafe { lb.launch(cfg(&plan.launch)) }.w()?;
    Ok((
        Storage::Cuda(CudaStorage::wrap_cuda_slice(vals, dev.clone())),
        Storage::Cuda(CudaStorage::wrap_cuda_slice(idx, dev)),
    ))
}

/// `gather_inject_fwd_<dt>`: the injected copy of h, [B, L, D].
pub(crate) fn inject_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    noise_t: &Tensor,
    sal_t: &Tensor,
    p: &InjectPlan,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "gather_inject";
    let dev = s1.device().clone();
    let plan = inject_plan(p.b * p.l)?;
    let (h0, h1) = offsets(l1, OP)?;
    let (r0, r1) = offsets(l2, OP)?;
    let (ns, (n0, n1)) = index_storage(noise_t, OP)?;
    let (ss, (q0, q1)) = index_storage(sal_t, OP)?;
    let nv = cuda_of(&ns, OP)?.as_cuda_slice::<u32>()?.slice(n0..n1);
    let sv = cuda_of(&ss, OP)?.as_cuda_slice::<u32>()?.slice(q0..q1);
    let func = crate::cuda::function(
        &dev,
        &format!("gather_inject_fwd_{}", suffix(s1.dtype(), OP)?),
    )?;
    let stream = dev.cuda_stream();
    let (b32, l32, ls32, d32, k32) = (p.b as u32, p.l as u32, p.ls as u32, p.d as u32, p.k as u32);
    macro_rules! launch {
        ($t:ty) => {{
            let hv = s1.as_cuda_slice::<$t>()?.slice(h0..h1);
            let rv = s2.as_cuda_slice::<$t>()?.slice(r0..r1);
            let out = dev.alloc_zeros::<$t>(p.b * p.l * p.d)?;
            let mut lb = stream.launch_builder(&func);
            lb.arg(&hv);
            lb.arg(&rv);
            lb.arg(&nv);
            lb.arg(&sv);
            lb.arg(&b32);
            lb.arg(&l32);
            lb.arg(&ls32);
            lb.arg(&d32);
            lb.arg(&k32);
            lb.arg(&out);
            // SAFETY: the argument list matches `gather_inject_fwd_<dt>`; indices were
            // validated on the host; buffers follow the plan.
            unsafe { lb.launch(cfg(&plan)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match s1.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    };
    Ok((out, Shape::from((p.b, p.l, p.d))))
}

/// `gather_inject_zero_<dt>` (grad_h) or `gather_inject_scatter_<dt>` (grad_src).
pub(crate) fn inject_bwd(
    s: &CudaStorage,
    l: &Layout,
    noise_t: &Tensor,
    sal_t: &Tensor,
    p: &InjectPlan,
    part: Part,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "gather_inject backward";
    let dev = s.device().clone();
    let (g0, g1) = offsets(l, OP)?;
    let (ns, (n0, n1)) = index_storage(noise_t, OP)?;
    let (ss, (q0, q1)) = index_storage(sal_t, OP)?;
    let nv = cuda_of(&ns, OP)?.as_cuda_slice::<u32>()?.slice(n0..n1);
    let sv = cuda_of(&ss, OP)?.as_cuda_slice::<u32>()?.slice(q0..q1);
    let sfx = suffix(s.dtype(), OP)?;
    let stream = dev.cuda_stream();
    let (b32, l32, ls32, d32, k32) = (p.b as u32, p.l as u32, p.ls as u32, p.d as u32, p.k as u32);
    let rows = match part {
        Part::ZeroRows => p.l,
        Part::ScatterRows => p.ls,
    };
    let plan = inject_plan(p.b * rows)?;
    let func = match part {
        Part::ZeroRows => crate::cuda::function(&dev, &format!("gather_inject_zero_{sfx}"))?,
        Part::ScatterRows => crate::cuda::function(&dev, &format!("gather_inject_scatter_{sfx}"))?,
    };
    macro_rules! launch {
        ($t:ty) => {{
            let gv = s.as_cuda_slice::<$t>()?.slice(g0..g1);
            let out = dev.alloc_zeros::<$t>(p.b * rows * p.d)?;
            let mut lb = stream.launch_builder(&func);
            lb.arg(&gv);
            lb.arg(&nv);
            if part == Part::ScatterRows {
                lb.arg(&sv);
            }
            lb.arg(&b32);
            lb.arg(&l32);
            if part == Part::ScatterRows {
                lb.arg(&ls32);
            }
            lb.arg(&d32);
            lb.arg(&k32);
            lb.arg(&out);
            // SAFETY: the argument list matches the chosen entry; indices were validated on
            // the host; buffers follow the plan.
            unsafe { lb.launch(cfg(&plan)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match s.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    };
    Ok((out, Shape::from((p.b, rows, p.d))))
}
