//! A per-device byte arena that ops carve their scratch buffers from, reused call after call
//! instead of a fresh (and zero-filled) allocation per buffer per call.
//!
//! An op computes its [`Carve`] (the bytes of every scratch buffer, each 256-byte aligned),
//! then runs its launches inside [`Workspaces::with_workspace`], which hands out the arena's
//! base address: the arena grows to the largest request seen and never shrinks (until
//! [`release_workspaces`]). Nothing in it is zeroed: the kernels reset what they count.
//!
//! Ownership and ordering. On CUDA the arena belongs to one (candle device, host thread) pair:
//! candle's default stream is the per-thread stream, so two threads using one device enqueue
//! on two streams and must not share scratch memory. Within a thread every launch goes to one
//! stream, so a later call's kernels run after an earlier call's: reuse needs no
//! synchronisation, and growing the arena frees the old one in stream order
//! (`cuMemFreeAsync`). The closure runs with the arena borrowed: an op must not ask for a
//! workspace inside it. In the emulator the arena is a thread-local host buffer.

use super::launch::{Launcher, Ptr};
use candle_core::Result;

/// Alignment of every buffer carved from a workspace.
pub const WORKSPACE_ALIGN: usize = 256;

/// Byte offsets of the scratch buffers of one call, in the order they were asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carve {
    bytes: usize,
}

impl Carve {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves `n` elements of `T` (at least one) and returns their byte offset.
    pub fn take<T>(&mut self, n: usize) -> usize {
        let at = self.bytes.next_multiple_of(WORKSPACE_ALIGN);
        self.bytes = at + n.max(1) * std::mem::size_of::<T>();
        at
    }

    /// Bytes the layout needs.
    pub fn bytes(&self) -> usize {
        self.bytes.next_multiple_of(WORKSPACE_ALIGN)
    }
}

/// The buffer of `T` at byte offset `at` of the workspace at `base`.
pub fn at<T>(base: Ptr<u8>, at: usize) -> Ptr<T> {
    Ptr::new(base.addr() + at as u64)
}

/// A launcher whose device keeps a reusable scratch arena.
pub trait Workspaces: Launcher {
    /// Runs `f` with the base address of at least `bytes` bytes of this device's arena (grown
    /// first if needed; contents unspecified, 256-byte aligned on CUDA, 16 in the emulator).
    fn with_workspace<R>(&self, bytes: usize, f: impl FnOnce(Ptr<u8>) -> Result<R>) -> Result<R>;
}

/// Frees this thread's arenas on every device (they are allocated again when next needed).
pub fn release_workspaces() {
    #[cfg(feature = "cuda")]
    cuda_arena::ARENAS.with(|a| a.borrow_mut().clear());
    #[cfg(feature = "emulate")]
    EMU_ARENA.with(|a| *a.borrow_mut() = Vec::new());
}

#[cfg(feature = "emulate")]
thread_local! {
    /// The emulator's arena: 16-byte words, so every carved buffer is 16-byte aligned.
    static EMU_ARENA: std::cell::RefCell<Vec<u128>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(feature = "emulate")]
impl Workspaces for super::emu::EmuLauncher {
    fn with_workspace<R>(&self, bytes: usize, f: impl FnOnce(Ptr<u8>) -> Result<R>) -> Result<R> {
        EMU_ARENA.with(|a| {
            let mut v = a.try_borrow_mut().map_err(|_| {
                candle_core::Error::Msg("workspace requested inside a workspace call".into())
            })?;
            let words = bytes.div_ceil(16).max(1);
            if v.len() < words {
                // Fresh words are filled with 0xFF (NaN / u32::MAX), like the emulator's shared
                // memory, so a kernel that reads scratch it never wrote goes wrong visibly.
                v.resize(words, u128::MAX);
            }
            f(Ptr::new(v.as_mut_ptr() as u64))
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda_arena {
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::DeviceId;
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        /// This thread's arena per candle CUDA device.
        pub(super) static ARENAS: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    }
}

#[cfg(feature = "cuda")]
impl Workspaces for super::cuda::CudaLauncher<'_> {
    fn with_workspace<R>(&self, bytes: usize, f: impl FnOnce(Ptr<u8>) -> Result<R>) -> Result<R> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let dev = self.device();
        cuda_arena::ARENAS.with(|a| {
            let mut map = a.try_borrow_mut().map_err(|_| {
                candle_core::Error::Msg("workspace requested inside a workspace call".into())
            })?;
            let want = bytes.max(WORKSPACE_ALIGN);
            let grow = map.get(&dev.id()).is_none_or(|s| s.len() < want);
            if grow {
                // Geometric growth: a call that needs a little more does not reallocate each time.
                let have = map.get(&dev.id()).map_or(0, |s| s.len());
                let len = want.max(have + have / 2);
                // SAFETY: the arena's contents are unspecified by contract; every kernel writes
                // what it reads (counters are reset by the ops' first kernel).
                let slice = unsafe { dev.alloc::<u8>(len) }?;
                map.insert(dev.id(), slice);
            }
            let slice = map.get(&dev.id()).expect("arena inserted above");
            let base = slice.device_ptr(&dev.cuda_stream()).0;
            f(Ptr::new(base))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_aligns_every_buffer() {
        let mut c = Carve::new();
        assert_eq!(c.take::<f32>(3), 0);
        assert_eq!(c.take::<u32>(1), 256);
        assert_eq!(c.take::<u8>(0), 512);
        assert_eq!(c.take::<f32>(100), 768);
        assert_eq!(c.bytes(), 768 + 512);
        assert_eq!(at::<f32>(Ptr::new(4096), 768).addr(), 4096 + 768);
    }
}
