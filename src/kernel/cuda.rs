//! The CUDA launcher (feature `cuda`): r2scp's kernels on candle's CUDA device.
//!
//! `build.rs` compiles every `kernels/*.cu` into one fatbin (SASS sm_80/86/89/90 + PTX
//! compute_80 unless `CUDA_COMPUTE_CAP` narrows it), embedded here. [`module`] loads it
//! once per CUDA context and caches it. If the driver cannot load it (driver older than
//! the toolkit, a GPU without matching SASS or PTX), the embedded source (headers
//! inlined) is compiled with NVRTC for the device's architecture; if that fails too the
//! error names the driver, toolkit and NVRTC versions.
//!
//! Kernel arguments are raw device addresses ([`Ptr`]) taken from candle storages. candle
//! runs one stream per device and every launch here goes to that stream, so stream order
//! alone orders the kernels against the candle ops that produce and consume the buffers.

use super::launch::{AnyElem, DevElem, KernelArgs, LaunchPlan, Launcher, Ptr, SmResources};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The fatbin of all kernels, built by `build.rs`.
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/r2scp_kernels.fatbin"));
/// All kernel sources in one NVRTC-ready translation unit (local headers inlined).
pub static NVRTC_SOURCE: &str = include_str!(concat!(env!("OUT_DIR"), "/r2scp_kernels_nvrtc.cu"));
/// `nvcc --version` release line of the toolkit that built [`FATBIN`].
pub const TOOLKIT_VERSION: &str = env!("R2SCP_NVCC_VERSION");

type Cache = Mutex<HashMap<usize, Arc<CudaModule>>>;

fn cache() -> &'static Cache {
    static C: OnceLock<Cache> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// CUDA driver version as "major.minor" (e.g. "12.4").
pub fn driver_version() -> String {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: plain out-parameter call into the driver API.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return format!("unknown ({r:?})");
    }
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

fn nvrtc_version() -> String {
    let (mut a, mut b): (std::ffi::c_int, std::ffi::c_int) = (0, 0);
    // SAFETY: plain out-parameter call into NVRTC.
    let r = unsafe { candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    if r != candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return "unavailable".to_string();
    }
    format!("{a}.{b}")
}

/// The r2scp kernel module of `dev`'s context: the embedded fatbin, or NVRTC's build of
/// the embedded source when the fatbin does not load. Loaded once per context.
pub fn module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let key = Arc::as_ptr(&ctx) as usize;
    let mut map = match cache().lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    if let Some(m) = map.get(&key) {
        return Ok(m.clone());
    }
    let m = match ctx.load_module(Ptx::from_binary(FATBIN.to_vec())) {
        Ok(m) => m,
        Err(fat_err) => {
            let (maj, min) = ctx.compute_capability().map_err(|e| {
                candle_core::Error::Msg(format!("r2scp cuda: compute capability: {e}"))
            })?;
            let mut include_paths = Vec::new();
            for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
                if let Ok(root) = std::env::var(var) {
                    include_paths.push(format!("{root}/include"));
                }
            }
            let opts = CompileOptions {
                options: vec![
                    format!("--gpu-architecture=compute_{maj}{min}"),
                    "-std=c++17".into(),
                    "-DR2_NVRTC=1".into(),
                ],
                include_paths,
                ..Default::default()
            };
            let ptx = match compile_ptx_with_opts(NVRTC_SOURCE, opts) {
                Ok(p) => p,
                Err(nvrtc_err) => bail!(
                    "r2scp cuda: the embedded kernels do not load on this GPU (sm_{maj}{min}): {fat_err}; \
                     the NVRTC fallback failed too: {nvrtc_err}. Driver {} (CUDA driver API), kernels built \
                     with toolkit {TOOLKIT_VERSION}, NVRTC {}. Update the driver to one that supports the \
                     toolkit, or rebuild with CUDA_COMPUTE_CAP={maj}{min} and a toolkit the driver supports.",
                    driver_version(),
                    nvrtc_version()
                ),
            };
            ctx.load_module(ptx).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "r2scp cuda: NVRTC-built kernels do not load either: {e} (fatbin error: {fat_err}; \
                     driver {}, toolkit {TOOLKIT_VERSION}, NVRTC {})",
                    driver_version(),
                    nvrtc_version()
                ))
            })?
        }
    };
    map.insert(key, m.clone());
    Ok(m)
}

/// Kernel entry `name` of the r2scp module on `dev`.
pub fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    module(dev)?
        .load_function(name)
        .map_err(|e| candle_core::Error::Msg(format!("r2scp cuda: kernel `{name}` not found: {e}")))
}

/// Device attribute `attr` of `dev` (a non-negative count).
fn device_attribute(dev: &CudaDevice, attr: sys::CUdevice_attribute, what: &str) -> Result<u32> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(attr)
        .map_err(|e| candle_core::Error::Msg(format!("r2scp cuda: {what}: {e}")))?;
    Ok(n.max(0) as u32)
}

/// Raises `func`'s dynamic shared-memory limit to `bytes` when they are above the 48 KiB every
/// entry may use without opting in.
fn allow_dyn_smem(func: &CudaFunction, entry: &str, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| {
            candle_core::Error::Msg(format!(
                "r2scp cuda: {entry}: {bytes} bytes of shared memory refused: {e}"
            ))
        })?;
    }
    Ok(())
}

/// Number of streaming multiprocessors of `dev` (for launch plans).
pub fn sm_count(dev: &CudaDevice) -> Result<u32> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| candle_core::Error::Msg(format!("r2scp cuda: SM count: {e}")))?;
    Ok(n.max(1) as u32)
}

impl From<LaunchPlan> for LaunchConfig {
    fn from(p: LaunchPlan) -> Self {
        LaunchConfig {
            grid_dim: p.grid,
            block_dim: p.block,
            shared_mem_bytes: p.smem_bytes,
        }
    }
}

/// The launcher of a CUDA device: buffers are `CudaSlice`s, entry points come from
/// [`function`].
pub struct CudaLauncher<'a> {
    dev: &'a CudaDevice,
}

impl<'a> CudaLauncher<'a> {
    /// The launcher of `dev`.
    pub fn new(dev: &'a CudaDevice) -> Self {
        Self { dev }
    }

    /// The device.
    pub fn device(&self) -> &'a CudaDevice {
        self.dev
    }
}

impl Launcher for CudaLauncher<'_> {
    type Buf<T: DevElem> = CudaSlice<T>;

    fn sm_count(&self) -> Result<u32> {
        sm_count(self.dev)
    }

    fn smem_per_sm(&self) -> Result<u32> {
        device_attribute(
            self.dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "shared memory per SM",
        )
    }

    fn max_dyn_smem(&self) -> Result<u32> {
        let n = device_attribute(
            self.dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "shared memory limit",
        )?;
        Ok(n.saturating_sub(1024))
    }

    fn sm_resources(&self) -> Result<SmResources> {
        use sys::CUdevice_attribute as A;
        Ok(SmResources {
            regs: device_attribute(
                self.dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR,
                "registers per SM",
            )?,
            threads: device_attribute(
                self.dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
                "threads per SM",
            )?,
            blocks: device_attribute(
                self.dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR,
                "blocks per SM",
            )?,
            smem: self.smem_per_sm()?,
            smem_reserved: device_attribute(
                self.dev,
                A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
                "reserved shared memory per block",
            )?,
        })
    }

    /// The driver's occupancy query for the entry as ptxas compiled it (its real registers and
    /// static shared memory), with `plan`'s block and dynamic shared memory; asked once per
    /// context, entry, block size and shared memory (plans ask it for several candidates on
    /// every call).
    fn resident_blocks(&self, entry: &str, plan: &LaunchPlan, _min_blocks: u32) -> Result<u32> {
        type Key = (usize, String, u32, u32);
        static CACHE: OnceLock<Mutex<HashMap<Key, u32>>> = OnceLock::new();
        let ctx = Arc::as_ptr(self.dev.cuda_stream().context()) as usize;
        let key = (
            ctx,
            entry.to_string(),
            plan.threads_per_block(),
            plan.smem_bytes,
        );
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(&n) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(n);
        }
        let func = function(self.dev, entry)?;
        allow_dyn_smem(&func, entry, plan.smem_bytes)?;
        let n = func
            .occupancy_max_active_blocks_per_multiprocessor(
                plan.threads_per_block(),
                plan.smem_bytes as usize,
                None,
            )
            .map_err(|e| {
                candle_core::Error::Msg(format!("r2scp cuda: {entry}: occupancy query: {e}"))
            })?
            .max(1);
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, n);
        Ok(n)
    }

    fn zeros<T: DevElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        // Never zero-sized: a null device pointer is not a valid argument.
        self.dev.alloc_zeros::<T>(n.max(1))
    }

    fn upload<T: DevElem>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            return self.zeros(1);
        }
        self.dev.clone_htod(v)
    }

    fn download<T: DevElem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.dev.clone_dtoh(buf)
    }

    fn ptr<T: DevElem>(&self, buf: &CudaSlice<T>) -> Ptr<T> {
        Ptr::new(buf.device_ptr(&self.dev.cuda_stream()).0)
    }

    unsafe fn launch<A: KernelArgs>(&self, entry: &str, plan: &LaunchPlan, args: &A) -> Result<()> {
        let func = function(self.dev, entry)?;
        // Above 48 KiB a block's dynamic shared memory needs the entry's opt-in.
        allow_dyn_smem(&func, entry, plan.smem_bytes)?;
        let stream = self.dev.cuda_stream();
        let mut lb = stream.launch_builder(&func);
        lb.arg(args);
        // SAFETY: the caller guarantees the pointers in `args` cover what the kernel indexes;
        // `args` is the `#[repr(C)]` mirror of the struct the entry point takes by value.
        unsafe { lb.launch(LaunchConfig::from(*plan)) }.w()?;
        Ok(())
    }

    fn tensor_of<T: DevElem>(&self, buf: CudaSlice<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let storage = CudaStorage::wrap_cuda_slice(buf, self.dev.clone());
        let t = Tensor::from_storage(
            Storage::Cuda(storage),
            shape.clone(),
            BackpropOp::none(),
            false,
        );
        // Buffers are never zero-sized on the device; an empty shape takes a prefix of one.
        if t.elem_count() != shape.elem_count() {
            bail!("internal error: device buffer does not match shape {shape:?}");
        }
        Ok(t)
    }
}

/// The device address of the first element of `s` seen through the contiguous layout `l`.
pub fn storage_ptr(s: &CudaStorage, l: &Layout, op: &str) -> Result<Ptr<AnyElem>> {
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("{op}: expected a contiguous input (the public op makes inputs contiguous)");
    };
    let stream = s.device().cuda_stream();
    macro_rules! addr {
        ($t:ty) => {{
            let v = s.as_cuda_slice::<$t>()?;
            v.device_ptr(&stream).0 + (start * std::mem::size_of::<$t>()) as u64
        }};
    }
    let a = match s.dtype() {
        DType::F32 => addr!(f32),
        DType::F16 => addr!(half::f16),
        DType::BF16 => addr!(half::bf16),
        DType::U32 => addr!(u32),
        DType::U8 => addr!(u8),
        dt => bail!("{op}: dtype {dt:?} has no kernel (f32, f16, bf16, u32)"),
    };
    Ok(Ptr::new(a))
}
