//! CUDA path of `cosine_topk`: `kernels/cosine_topk.cu` launched with the plan of
//! [`super::kernel::plan`] (the same plan the emulator tests).

use super::kernel::{self, KMAX};
use super::{cpu, Checked};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Storage, Tensor};
use half::{bf16, f16};

fn cfg(p: &crate::launch::LaunchPlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: p.grid,
        block_dim: p.block,
        shared_mem_bytes: p.smem_bytes,
    }
}

fn wrap(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    dev: &CudaDevice,
) -> Storage {
    Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
}

fn wrap_u32(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    dev: &CudaDevice,
) -> Storage {
    Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
}

pub(crate) fn cosine_topk_cuda(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    c: &Checked,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = keys.device() else {
        bail!("cosine_topk: expected CUDA tensors");
    };
    if c.b == 0 {
        return Ok((
            Tensor::zeros((0, c.n), DType::F32, keys.device())?,
            Tensor::zeros((0, c.n), DType::U32, keys.device())?,
        ));
    }
    if c.n > KMAX {
        // Lists longer than the kernel's shared-memory running list: the fused CPU path.
        let (s, i) = cpu::cosine_topk_cpu(
            &queries.to_device(&Device::Cpu)?,
            &keys.to_device(&Device::Cpu)?,
            key_norms
                .map(|t| t.to_device(&Device::Cpu))
                .transpose()?
                .as_ref(),
            c,
        )?;
        return Ok((s.to_device(keys.device())?, i.to_device(keys.device())?));
    }
    let plan = kernel::plan(c.b, c.m, c.d, c.n, crate::cuda::sm_count(dev)?)?;
    let q = queries.to_dtype(DType::F32)?.contiguous()?;
    let kn = match key_norms {
        Some(t) => t.contiguous()?,
        None => super::key_norms(keys)?,
    };
    let ex = Tensor::from_vec(c.exclude.clone(), c.b, keys.device())?;
    let keys = keys.contiguous()?;
    let gx = plan.partial.grid.0 as usize;
    let kp = plan.kp as usize;
    let ncand = gx * kp;
    let cand_s = dev.alloc_zeros::<f32>(c.b * ncand)?;
    let cand_i = dev.alloc_zeros::<u32>(c.b * ncand)?;
    let err = dev.alloc_zeros::<u32>(3)?;
    let (b, m, d) = (c.b as u32, c.m as u32, c.d as u32);
    let stream = dev.cuda_stream();
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = keys.storage_and_layout();
        let (ns, nl) = kn.storage_and_layout();
        let (es, el) = ex.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(ns), Storage::Cuda(es)) =
            (&*qs, &*ks, &*ns, &*es)
        else {
            bail!("cosine_topk: all inputs must be on the CUDA device");
        };
        let off = |l: &candle_core::Layout| l.contiguous_offsets().unwrap_or((0, 0));
        let (q0, q1) = off(ql);
        let (k0, k1) = off(kl);
        let (n0, n1) = off(nl);
        let (e0, e1) = off(el);
        let qv = qs.as_cuda_slice::<f32>()?.slice(q0..q1);
        let nv = ns.as_cuda_slice::<f32>()?.slice(n0..n1);
        let ev = es.as_cuda_slice::<u32>()?.slice(e0..e1);
        let name = match keys.dtype() {
            DType::F32 => "cosine_topk_partial_f32",
            DType::F16 => "cosine_topk_partial_f16",
            DType::BF16 => "cosine_topk_partial_bf16",
            dt => bail!("cosine_topk: unsupported keys dtype {dt:?}"),
        };
        let func = crate::cuda::function(dev, name)?;
        let (kf32, kf16, kbf16) = match keys.dtype() {
            DType::F32 => (Some(ks.as_cuda_slice::<f32>()?.slice(k0..k1)), None, None),
            DType::F16 => (None, Some(ks.as_cuda_slice::<f16>()?.slice(k0..k1)), None),
            _ => (None, None, Some(ks.as_cuda_slice::<bf16>()?.slice(k0..k1))),
        };
        let mut lb = stream.launch_builder(&func);
        lb.arg(&qv);
        if let Some(k) = &kf32 {
            lb.arg(k);
        } else if let Some(k) = &kf16 {
            lb.arg(k);
        } else if let Some(k) = &kbf16 {
            lb.arg(k);
        }
        lb.arg(&nv);
        lb.arg(&ev);
        lb.arg(&b);
        lb.arg(&m);
        lb.arg(&d);
        lb.arg(&plan.qb);
        lb.arg(&plan.kp);
        lb.arg(&plan.chunk_rows);
        lb.arg(&cand_s);
        lb.arg(&cand_i);
        lb.arg(&err);
        // SAFETY: argument list matches `cosine_topk_partial_<dt>`; buffer sizes follow the plan.
        unsafe { lb.launch(cfg(&plan.partial)) }.w()?;
    }
    let e = dev.clone_dtoh(&err)?;
    if e[0] != 0 {
        bail!(
            "cosine_topk: NaN score for query {} at bank row {} (NaN or infinite input)",
            e[1],
            e[2]
        );
    }
    if !plan.needs_merge() {
        let s = Tensor::from_storage(wrap(cand_s, dev), (c.b, kp), BackpropOp::none(), false);
        let i = Tensor::from_storage(wrap_u32(cand_i, dev), (c.b, kp), BackpropOp::none(), false);
        return Ok((
            s.narrow(1, 0, c.n)?.contiguous()?,
            i.narrow(1, 0, c.n)?.contiguous()?,
        ));
    }
    let out_s = dev.alloc_zeros::<f32>(c.b * c.n)?;
    let out_i = dev.alloc_zeros::<u32>(c.b * c.n)?;
    let func = crate::cuda::function(dev, "cosine_topk_merge")?;
    let (ncand32, n32) = (ncand as u32, c.n as u32);
    let mut lb = stream.launch_builder(&func);
    lb.arg(&cand_s);
    lb.arg(&cand_i);
    lb.arg(&ncand32);
    lb.arg(&plan.kp);
    lb.arg(&n32);
    lb.arg(&out_s);
    lb.arg(&out_i);
    // SAFETY: argument list matches `cosine_topk_merge`; sizes B*ncand and B*n.
    unsafe { lb.launch(cfg(&plan.merge)) }.w()?;
    let s = Tensor::from_storage(wrap(out_s, dev), (c.b, c.n), BackpropOp::none(), false);
    let i = Tensor::from_storage(wrap_u32(out_i, dev), (c.b, c.n), BackpropOp::none(), false);
    Ok((s, i))
}
