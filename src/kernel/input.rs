//! Kernel inputs from candle tensors: the address of a tensor's data on its device.

use super::launch::{AnyElem, Ptr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Result, Storage, StorageRef, Tensor};

/// The address of the first element of the contiguous tensor `t` (host memory for a CPU
/// tensor, which only the emulator reads; device memory for a CUDA tensor), with the storage
/// guard that keeps it alive and unchanged while the address is in use.
pub fn tensor_ptr<'t>(t: &'t Tensor, op: &str) -> Result<(Ptr<AnyElem>, StorageRef<'t>)> {
    let (guard, layout) = t.storage_and_layout();
    let Some((start, _)) = layout.contiguous_offsets() else {
        bail!("{op}: expected a contiguous input (the public op makes inputs contiguous)");
    };
    let addr = match &*guard {
        Storage::Cpu(s) => {
            macro_rules! at {
                ($v:expr) => {
                    $v[start..].as_ptr() as u64
                };
            }
            match s {
                CpuStorage::F32(v) => at!(v),
                CpuStorage::F16(v) => at!(v),
                CpuStorage::BF16(v) => at!(v),
                CpuStorage::U32(v) => at!(v),
                CpuStorage::U8(v) => at!(v),
                other => bail!(
                    "{op}: dtype {:?} has no kernel (f32, f16, bf16, u32)",
                    other.dtype()
                ),
            }
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => super::cuda::storage_ptr(s, layout, op)?.addr(),
        _ => bail!(
            "{op}: tensors on {:?} have no kernel",
            t.device().location()
        ),
    };
    Ok((Ptr::new(addr), guard))
}
