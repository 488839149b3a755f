//! The one dense matrix product an op hands to a library: `out[j][r] = sum_d a[j][d] * k[r][d]`
//! with f32 output, through cuBLAS on a GPU (`cublasGemmEx` on candle's handle and stream) and
//! through candle's CPU matmul in the emulator (the stand-in that lets the emulated tests drive
//! the kernels around it).
//!
//! Precision ([`GemmMath`]): 16-bit operands are multiplied exactly and summed in f32;
//! [`GemmMath::Tf32`] rounds f32 operands to tf32 (10 explicit mantissa bits) on the tensor
//! cores; [`GemmMath::F32`] is plain f32. cuBLAS does not document whether its tf32
//! conversion rounds to nearest or truncates, so callers bound it as truncation (a relative
//! error below 2^-10), and the emulator truncates: it errs on the pessimistic side.

use super::launch::{AnyElem, Launcher, Ptr};
use candle_core::{bail, DType, Result};

/// How the products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmMath {
    /// f16 or bf16 operands (exact products), f32 sums.
    Half,
    /// f32 operands rounded to tf32 on the tensor cores, f32 sums.
    Tf32,
    /// f32 operands and sums.
    F32,
}

/// One product `out[j * ldo + r] = sum_{d < depth} a[j * lda + d] * k[r * ldk + d]` for
/// `j < cols`, `r < rows`: `k` is a row-major block of bank rows, `a` the row-major queries, in
/// the same storage type `dtype` (f32, f16 or bf16); `out` is f32.
#[derive(Clone, Copy, Debug)]
pub struct ScoresGemm {
    /// [rows, ldk] bank rows.
    pub k: Ptr<AnyElem>,
    pub ldk: usize,
    pub rows: usize,
    /// [cols, lda] queries.
    pub a: Ptr<AnyElem>,
    pub lda: usize,
    pub cols: usize,
    /// Summed length (D).
    pub depth: usize,
    /// Storage type of `k` and `a`.
    pub dtype: DType,
    pub math: GemmMath,
    /// [cols, ldo] f32 output.
    pub out: Ptr<f32>,
    pub ldo: usize,
}

impl ScoresGemm {
    /// Checks the shape against the storage type and the math, and that every size fits a
    /// 32-bit BLAS argument.
    pub fn check(&self) -> Result<()> {
        let ok = matches!(
            (self.dtype, self.math),
            (DType::F16 | DType::BF16, GemmMath::Half)
                | (DType::F32, GemmMath::Tf32 | GemmMath::F32)
        );
        if !ok {
            bail!(
                "gemm: {:?} math on {:?} operands (f16/bf16: Half; f32: Tf32 or F32)",
                self.math,
                self.dtype
            );
        }
        if self.ldk < self.depth || self.lda < self.depth || self.ldo < self.rows {
            bail!("gemm: leading dimensions {self:?} below the matrix sizes");
        }
        for (what, v) in [
            ("rows", self.rows),
            ("cols", self.cols),
            ("depth", self.depth),
            ("ldk", self.ldk),
            ("lda", self.lda),
            ("ldo", self.ldo),
        ] {
            if v == 0 || v > i32::MAX as usize {
                bail!("gemm: {what} = {v} outside 1..=2^31 - 1");
            }
        }
        Ok(())
    }
}

/// L2 size the emulator reports: small, so that emulated banks of a few hundred rows span
/// several chunks of an L2-sized plan.
pub const EMU_L2_BYTES: u64 = 256 << 10;

/// A launcher that can run [`ScoresGemm`] on its stream, ordered with its kernel launches.
pub trait Gemm: Launcher {
    /// L2 cache bytes of the device (plans size their chunks from it).
    fn l2_bytes(&self) -> Result<u64>;

    /// Queues the product.
    ///
    /// # Safety
    /// `k`, `a` and `out` must address live buffers of this launcher holding the extents the
    /// sizes and leading dimensions describe.
    unsafe fn gemm_scores(&self, g: &ScoresGemm) -> Result<()>;
}

/// A tf32 operand as the emulator models it: the low 13 mantissa bits cut (truncation, the
/// pessimistic reading of cuBLAS's undocumented conversion).
pub fn tf32_truncate(x: f32) -> f32 {
    if x.is_finite() {
        f32::from_bits(x.to_bits() & !0x1fff)
    } else {
        x
    }
}

#[cfg(feature = "emulate")]
impl Gemm for super::emu::EmuLauncher {
    fn l2_bytes(&self) -> Result<u64> {
        Ok(EMU_L2_BYTES)
    }

    unsafe fn gemm_scores(&self, g: &ScoresGemm) -> Result<()> {
        use candle_core::{Device, Tensor};
        g.check()?;
        // Rows of `len` elements at stride `ld` from a host address, widened to f32.
        let read = |p: Ptr<AnyElem>, n: usize, ld: usize| -> Vec<f32> {
            let mut v = Vec::with_capacity(n * g.depth);
            for j in 0..n {
                let at = p.addr() as usize + j * ld * g.dtype.size_in_bytes();
                // SAFETY: the caller guarantees `n` rows of stride `ld` at `p`.
                unsafe {
                    match g.dtype {
                        DType::F32 => v.extend(
                            std::slice::from_raw_parts(at as *const f32, g.depth)
                                .iter()
                                .map(|&x| {
                                    if g.math == GemmMath::Tf32 {
                                        tf32_truncate(x)
                                    } else {
                                        x
                                    }
                                }),
                        ),
                        DType::F16 => v.extend(
                            std::slice::from_raw_parts(at as *const half::f16, g.depth)
                                .iter()
                                .map(|x| x.to_f32()),
                        ),
                        _ => v.extend(
                            std::slice::from_raw_parts(at as *const half::bf16, g.depth)
                                .iter()
                                .map(|x| x.to_f32()),
                        ),
                    }
                }
            }
            v
        };
        let k = Tensor::from_vec(read(g.k, g.rows, g.ldk), (g.rows, g.depth), &Device::Cpu)?;
        let a = Tensor::from_vec(read(g.a, g.cols, g.lda), (g.cols, g.depth), &Device::Cpu)?;
        let prod = a.matmul(&k.t()?)?.to_vec2::<f32>()?; // [cols, rows]
        for (j, row) in prod.iter().enumerate() {
            // SAFETY: the caller guarantees `cols` rows of stride `ldo` f32 at `out`.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((g.out.addr() as *mut f32).add(j * g.ldo), g.rows)
            };
            dst.copy_from_slice(row);
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl Gemm for super::cuda::CudaLauncher<'_> {
    fn l2_bytes(&self) -> Result<u64> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let n = self
            .device()
            .cuda_stream()
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| candle_core::Error::Msg(format!("r2scp cuda: L2 size: {e}")))?;
        Ok(n.max(0) as u64)
    }

    unsafe fn gemm_scores(&self, g: &ScoresGemm) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        g.check()?;
        let (ty, compute) = match g.math {
            GemmMath::Half if g.dtype == DType::BF16 => (
                sys::cudaDataType_t::CUDA_R_16BF,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            GemmMath::Half => (
                sys::cudaDataType_t::CUDA_R_16F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            GemmMath::Tf32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            GemmMath::F32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let blas = self.device().cublas_handle();
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: out (rows x cols, ldo) = k^T (rows x depth) * a (depth x cols), k
        // read as its row-major transpose (depth x rows, ldk): the "TN" layout, both operands
        // contiguous along the summed dimension.
        // SAFETY: the caller guarantees the extents; alpha and beta are host f32 (the handle's
        // default host pointer mode); the handle is bound to the stream the kernels use.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                g.rows as i32,
                g.cols as i32,
                g.depth as i32,
                (&alpha) as *const f32 as *const _,
                g.k.addr() as *const _,
                ty,
                g.ldk as i32,
                g.a.addr() as *const _,
                ty,
                g.lda as i32,
                (&beta) as *const f32 as *const _,
                g.out.addr() as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                g.ldo as i32,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cosine_topk gemm: cublasGemmEx: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_truncation_keeps_ten_mantissa_bits() {
        let x = 1.0f32 + f32::EPSILON * 3.0;
        assert_eq!(tf32_truncate(x), 1.0);
        let y = f32::from_bits(1.5f32.to_bits() | 0x2000);
        assert_eq!(tf32_truncate(y), y);
        assert!(tf32_truncate(f32::NAN).is_nan());
        assert_eq!(tf32_truncate(-f32::INFINITY), -f32::INFINITY);
        // Relative error below 2^-10.
        let z = 1.9999999f32;
        assert!(((z - tf32_truncate(z)) / z) < 2f32.powi(-10));
    }

    #[test]
    fn checks_refuse_mismatched_math_and_sizes() {
        let g = ScoresGemm {
            k: Ptr::null(),
            ldk: 8,
            rows: 4,
            a: Ptr::null(),
            lda: 8,
            cols: 2,
            depth: 8,
            dtype: DType::BF16,
            math: GemmMath::Half,
            out: Ptr::null(),
            ldo: 4,
        };
        assert!(g.check().is_ok());
        let e = ScoresGemm {
            math: GemmMath::Tf32,
            ..g
        };
        assert!(e.check().unwrap_err().to_string().contains("Tf32"));
        let e = ScoresGemm { ldo: 3, ..g };
        assert!(e.check().is_err());
        let e = ScoresGemm { cols: 0, ..g };
        assert!(e.check().unwrap_err().to_string().contains("cols = 0"));
    }
}
