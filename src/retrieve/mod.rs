//! Cross-modal retrieval (CMR, paper section 3.2): fused cosine top-n over a memory bank.
//!
//! Score (paper Eq. 1): `S_i = (q . k_i) / (|q| |k_i| + COS_EPS)` with
//! [`COS_EPS`](crate::kernel::abi::COS_EPS) = 1e-8, computed in f32 whatever the storage
//! dtype. A zero query or key scores exactly 0, never NaN.
//!
//! Contract shared by [`fn@cosine_topk`] (fused: CPU path or CUDA kernel) and
//! [`cosine_topk_reference`] (plain candle ops):
//! - `queries` [B, D]: any float dtype (f32 and the keys' dtype as given, others converted
//!   to f32). `keys` [M, D]: f32, f16 or bf16.
//! - `key_norms` \[M\] f32: `|k_i|` precomputed once per bank (`None` = computed here);
//!   debug builds check them against the keys.
//! - `exclude` \[B\] u32: a bank row each query must skip (its own clip), `u32::MAX` = none.
//! - Output: `(scores [B, n] f32 sorted descending, indices [B, n] u32)` on the keys'
//!   device. Equal scores rank the lower index first.
//! - NaN policy: any NaN score (a NaN or an infinity in the inputs) is an **error** naming
//!   the query and bank row; it is never silently ordered.
//! - Errors (never panics): `n == 0`, `n` above the rows left after exclusion, rank,
//!   dimension, dtype and device mismatches, `exclude` rows out of range.
//! - No gradient: the scores are plain values (see [`fn@cosine_topk`] for scores that carry
//!   one).
//! - Non-contiguous inputs are accepted (copied to contiguous first).

#[doc(hidden)]
pub mod cosine_topk;

pub use cosine_topk::{
    cosine_topk, cosine_topk_deferred, cosine_topk_reference, key_norms, PendingTopN,
};
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub use cosine_topk::{cosine_topk_deferred_emulated, cosine_topk_emulated};
