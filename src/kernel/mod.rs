//! What every kernel needs and no op owns: the host/device ABI ([`abi`]), launch plans
//! ([`LaunchPlan`]), and the two launchers that run a plan: a CUDA device (feature `cuda`,
//! `kernel::cuda`) and the CPU emulation of the CUDA execution model used by the tests
//! (feature `emulate`, `kernel::emu`).
//!
//! Dependencies point one way: the ops (`crate::retrieve`, `crate::cap`) use this module; it
//! uses none of them. An op's device code is written once against [`Launcher`]: it allocates
//! its outputs, fills its argument struct with [`Ptr`]s and launches entry points by name, and
//! the same code runs on a GPU and, in `cargo test`, in the emulator.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub mod emu;
pub mod gemm;
mod input;
mod launch;
pub mod topk;
pub mod workspace;

pub use input::tensor_ptr;
pub use launch::*;

/// The Rust side of `r2_abi!` (the C side is in build.rs): constants become `pub const`,
/// kernel argument structs become `#[repr(C)]` structs with [`KernelArgs`].
macro_rules! r2_abi {
    (
        consts {
            $(
                $(#[doc = $cdoc:literal])*
                $cname:ident : $cty:ident = $cval:literal;
            )*
        }
        structs {
            $(
                $(#[doc = $sdoc:literal])*
                $sname:ident ($entry:literal) {
                    $(
                        $(#[doc = $fdoc:literal])*
                        $fname:ident : $fkind:ident $($felem:ident)?
                    ),* $(,)?
                }
            )*
        }
    ) => {
        $(
            $(#[doc = $cdoc])*
            pub const $cname: $cty = $cval;
        )*
        $(
            $(#[doc = $sdoc])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug)]
            pub struct $sname {
                $(
                    $(#[doc = $fdoc])*
                    pub $fname: r2_abi!(@ty $fkind $($felem)?),
                )*
            }
            impl $crate::kernel::KernelArgs for $sname {
                const ENTRY: &'static str = $entry;
            }
            // SAFETY: `#[repr(C)]`, only u64-sized pointers and 4-byte scalars, mirrored field
            // for field by the C struct build.rs generates from the same declaration.
            #[cfg(feature = "cuda")]
            unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for $sname {}
        )*
    };
    (@ty ptr $e:ident) => { $crate::kernel::Ptr<r2_abi!(@elem $e)> };
    (@ty mut_ptr $e:ident) => { $crate::kernel::Ptr<r2_abi!(@elem $e)> };
    (@ty u32) => { u32 };
    (@ty f32) => { f32 };
    (@elem f32) => { f32 };
    (@elem u32) => { u32 };
    (@elem elem) => { $crate::kernel::AnyElem };
}

/// Constants and kernel argument structs shared with `kernels/` (declared once, in
/// `src/kernel/abi.rs`; build.rs writes the C mirror `r2_abi.h` from the same text).
pub mod abi {
    include!("abi.rs");
}
