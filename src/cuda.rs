//! CUDA side of r2scp's own kernels (feature `cuda`).
//!
//! `build.rs` compiles every `kernels/*.cu` into one fatbin (SASS sm_80/86/89/90 + PTX
//! compute_80 unless `CUDA_COMPUTE_CAP` narrows it), embedded here. [`module`] loads it
//! once per CUDA context and caches it. If the driver cannot load it (driver older than
//! the toolkit, a GPU without matching SASS or PTX), the embedded source (headers
//! inlined) is compiled with NVRTC for the device's architecture; if that fails too the
//! error names the driver, toolkit and NVRTC versions.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, Result};
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

/// Number of streaming multiprocessors of `dev` (for launch plans).
pub fn sm_count(dev: &CudaDevice) -> Result<u32> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| candle_core::Error::Msg(format!("r2scp cuda: SM count: {e}")))?;
    Ok(n.max(1) as u32)
}
