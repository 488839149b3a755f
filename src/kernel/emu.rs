//! The emulator launcher (feature `emulate`, test infrastructure, `doc(hidden)`).
//!
//! `build.rs` compiles `kernels/emu/<op>.cpp` (each includes the real `kernels/<op>.cu`
//! and registers its entry points with `R2EMU_ENTRY`) together with the CPU shim of the CUDA
//! execution model (`kernels/emu/cuda_emu.h`) into a static library. [`EmuLauncher`] runs a
//! plan's blocks one after another, one OS thread per CUDA thread, on host buffers; the op's
//! device path is the same code that drives the GPU (see [`super::Launcher`]).

use super::launch::{
    DevElem, KernelArgs, LaunchPlan, Launcher, Ptr, EMU_MAX_DYN_SMEM_BYTES, EMU_SM_COUNT,
};
use candle_core::{bail, Device, Result, Shape, Tensor};
use std::cell::UnsafeCell;
use std::ffi::{c_char, c_void, CString};

/// Launch plan in the C layout of `r2emu::Plan` (kernels/emu/cuda_emu.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EmuPlan {
    grid: [u32; 3],
    block: [u32; 3],
    smem_bytes: u32,
}

impl From<&LaunchPlan> for EmuPlan {
    fn from(p: &LaunchPlan) -> Self {
        EmuPlan {
            grid: [p.grid.0, p.grid.1, p.grid.2],
            block: [p.block.0, p.block.1, p.block.2],
            smem_bytes: p.smem_bytes,
        }
    }
}

extern "C" {
    /// kernels/emu/launch.cpp: runs registered entry `entry` with `args` (`args_size` bytes,
    /// checked against the C struct). 0 = ran; see [`launch_error`] for the other codes.
    fn r2emu_launch(
        entry: *const c_char,
        plan: EmuPlan,
        args: *const c_void,
        args_size: usize,
    ) -> i32;

    /// kernels/emu/launch.cpp: the emulated `cvt.rna.tf32.f32`.
    fn r2emu_cvt_rna_tf32(x: f32) -> u32;
}

/// The bits of `x` rounded to tf32 as the emulator rounds the tensor-core path's f32 operands:
/// `cvt.rna.tf32.f32` as ptxas lowers it (kernels/emu/cuda_emu.h, "Warp matrix
/// instructions"). Test infrastructure.
pub fn cvt_rna_tf32(x: f32) -> u32 {
    // SAFETY: a pure function of its argument.
    unsafe { r2emu_cvt_rna_tf32(x) }
}

fn launch_error(code: i32) -> &'static str {
    match code {
        1 => "no such entry point is registered",
        2 => "block size is not a multiple of 32 in 32..=1024",
        3 => "empty grid",
        4 => "argument struct size differs between Rust and C",
        _ => "unknown emulator error",
    }
}

/// A host buffer the emulated kernels write through a raw pointer.
pub struct HostBuf<T>(UnsafeCell<Vec<T>>);

impl<T: Clone> HostBuf<T> {
    fn get(&self) -> &Vec<T> {
        // SAFETY: emulated launches are synchronous and have returned before this borrow;
        // nothing else holds a reference into the vector.
        unsafe { &*self.0.get() }
    }
}

/// The emulator launcher: plans for [`EMU_SM_COUNT`] multiprocessors, host buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuLauncher;

impl Launcher for EmuLauncher {
    type Buf<T: DevElem> = HostBuf<T>;

    fn sm_count(&self) -> Result<u32> {
        Ok(EMU_SM_COUNT)
    }

    fn max_dyn_smem(&self) -> Result<u32> {
        Ok(EMU_MAX_DYN_SMEM_BYTES)
    }

    fn zeros<T: DevElem>(&self, n: usize) -> Result<HostBuf<T>> {
        Ok(HostBuf(UnsafeCell::new(vec![T::default(); n.max(1)])))
    }

    fn upload<T: DevElem>(&self, v: &[T]) -> Result<HostBuf<T>> {
        if v.is_empty() {
            return self.zeros(1);
        }
        Ok(HostBuf(UnsafeCell::new(v.to_vec())))
    }

    fn download<T: DevElem>(&self, buf: &HostBuf<T>) -> Result<Vec<T>> {
        Ok(buf.get().clone())
    }

    fn ptr<T: DevElem>(&self, buf: &HostBuf<T>) -> Ptr<T> {
        // SAFETY: only the address is taken; the kernels write through it during a launch,
        // while no Rust reference into the vector is alive.
        Ptr::new(unsafe { (*buf.0.get()).as_mut_ptr() } as u64)
    }

    unsafe fn launch<A: KernelArgs>(&self, entry: &str, plan: &LaunchPlan, args: &A) -> Result<()> {
        let name = CString::new(entry)
            .map_err(|_| candle_core::Error::Msg(format!("entry name {entry:?} has a NUL")))?;
        // SAFETY: `args` is the `#[repr(C)]` mirror of the entry's C struct (its size is
        // checked on the C side); the caller guarantees the buffers behind its pointers.
        let code = unsafe {
            r2emu_launch(
                name.as_ptr(),
                EmuPlan::from(plan),
                args as *const A as *const c_void,
                std::mem::size_of::<A>(),
            )
        };
        if code != 0 {
            bail!(
                "{entry} (emulated): launch of {plan:?} refused: {} (code {code})",
                launch_error(code)
            );
        }
        Ok(())
    }

    fn tensor_of<T: DevElem>(&self, buf: HostBuf<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let mut v = buf.0.into_inner();
        // Buffers are never empty; an empty shape takes a prefix of one element.
        v.truncate(shape.elem_count());
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
}
