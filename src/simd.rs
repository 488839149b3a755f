//! x86 vector code shared by the fused CPU paths: run-time ISA probes and the AVX2/FMA/F16C
//! dot-product micro-kernels that read f32, f16 and bf16 rows (converted to f32 in
//! registers). Callers check [`has_avx2`] before calling into [`avx`].

/// The query-lane kernel uses AVX-512 (F, BW, VL) when the CPU has it and
/// `R2SCP_NO_AVX512` is unset; otherwise AVX2/FMA/F16C; otherwise portable code.
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static STATE: AtomicU8 = AtomicU8::new(0);
        match STATE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let yes = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && has_avx2()
                    && std::env::var_os("R2SCP_NO_AVX512").is_none();
                STATE.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
                yes
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
        _mm_cvtss_f32(s)
    }

    macro_rules! block_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name<const QB: usize, const KB: usize>(
                q: &[*const f32; QB],
                k: &[*const $kt; KB],
                d: usize,
            ) -> [[f32; KB]; QB] {
                let mut acc = [[_mm256_setzero_ps(); KB]; QB];
                let d8 = d & !7;
                let mut i = 0;
                while i < d8 {
                    let mut kv = [_mm256_setzero_ps(); KB];
                    for j in 0..KB {
                        kv[j] = $load(k[j].add(i));
                    }
                    for qi in 0..QB {
                        let qv = _mm256_loadu_ps(q[qi].add(i));
                        for j in 0..KB {
                            acc[qi][j] = _mm256_fmadd_ps(qv, kv[j], acc[qi][j]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0f32; KB]; QB];
                for qi in 0..QB {
                    for j in 0..KB {
                        let mut s = hsum(acc[qi][j]);
                        for t in d8..d {
                            s += *q[qi].add(t) * (*k[j].add(t)).to_f32();
                        }
                        out[qi][j] = s;
                    }
                }
                out
            }
        };
    }
    macro_rules! convert_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            /// `dst[i] = src[i] as f32`, 8 at a time.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(src: &[$kt], dst: &mut [f32]) {
                let n = src.len().min(dst.len());
                let n8 = n & !7;
                let mut i = 0;
                while i < n8 {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), $load(src.as_ptr().add(i)));
                    i += 8;
                }
                for j in n8..n {
                    dst[j] = src[j].to_f32();
                }
            }
        };
    }
    macro_rules! row_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            /// One row, 32 elements a step into 4 accumulators: the row is read in
            /// address order, so consecutive rows form one sequential stream.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(q: *const f32, k: *const $kt, d: usize) -> f32 {
                let mut a = [_mm256_setzero_ps(); 4];
                let d32 = d & !31;
                let mut i = 0;
                while i < d32 {
                    for (j, acc) in a.iter_mut().enumerate() {
                        let o = i + 8 * j;
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(o)), $load(k.add(o)), *acc);
                    }
                    i += 32;
                }
                let d8 = d & !7;
                while i < d8 {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), $load(k.add(i)), a[0]);
                    i += 8;
                }
                let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                let mut out = hsum(s);
                for t in d8..d {
                    out += *q.add(t) * (*k.add(t)).to_f32();
                }
                out
            }
        };
    }
    row_impl!(row_f32, f32, load_f32);
    row_impl!(row_f16, f16, load_f16);
    row_impl!(row_bf16, bf16, load_bf16);

    convert_impl!(convert_f16, f16, load_f16);
    convert_impl!(convert_bf16, bf16, load_bf16);

    block_impl!(block_f32, f32, load_f32);
    block_impl!(block_f16, f16, load_f16);
    block_impl!(block_bf16, bf16, load_bf16);

    // `to_f32` for the scalar tails inside the macro.
    trait ToF32 {
        fn to_f32(self) -> f32;
    }
    impl ToF32 for f32 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl ToF32 for f16 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }
    impl ToF32 for bf16 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }
}
