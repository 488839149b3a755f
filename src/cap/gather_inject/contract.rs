//! Validation of one `gather_inject` call: shapes, dtypes and every index, on the host,
//! before any kernel runs.

use crate::check::{
    check_device, check_dims2, check_dtype, check_like, dims3, middle_dim, CAP_FLOATS,
};
use candle_core::{bail, DType, Device, Result, Tensor};

pub(crate) const OP: &str = "gather_inject";

/// Validated sizes and host copies of the indices.
#[derive(Clone, Debug)]
pub(crate) struct Injection {
    pub b: usize,
    pub l: usize,
    pub ls: usize,
    pub d: usize,
    pub k: usize,
    /// [B*k] noise (target) rows.
    pub noise: Vec<u32>,
    /// [B*k] salient (source) rows.
    pub sal: Vec<u32>,
}

/// Validates shapes, dtypes and every index (range, and no duplicate noise index within a
/// batch row) on the host, before any kernel runs.
pub(crate) fn validate(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<Injection> {
    let (b, l, d) = dims3((h, "h"), OP)?;
    let ls = middle_dim((src, "src"), "Ls", b, d, OP)?;
    check_dtype(h.dtype(), &CAP_FLOATS, "h", "f32, f16, bf16 or f64", OP)?;
    check_like((src, "src"), (h, "h"), OP)?;
    check_device((noise_idx, "noise_idx"), (h, "h"), OP)?;
    check_device((salient_idx, "salient_idx"), (h, "h"), OP)?;
    let k = match noise_idx.dims() {
        &[nb, k] if nb == b => k,
        s => bail!("{OP}: noise_idx has shape {s:?}, expected [B, k] with B = {b}"),
    };
    check_dims2((salient_idx, "salient_idx"), "[B, k]", b, k, OP)?;
    for (name, t) in [("noise_idx", noise_idx), ("salient_idx", salient_idx)] {
        if t.dtype() != DType::U32 {
            bail!("{OP}: {name} has dtype {:?}, expected u32", t.dtype());
        }
    }
    if k == 0 {
        bail!("{OP}: k = 0, expected 1 <= k <= L = {l}");
    }
    if k > l {
        bail!("{OP}: k = {k} noise indices per row exceed the L = {l} rows of h");
    }
    // Rows of zero width would make the CPU path chunk by 0 (a panic), as in dissonance_topk.
    if d == 0 {
        bail!("{OP}: h has feature dim D = 0, expected D >= 1");
    }
    let host = |t: &Tensor| -> Result<Vec<u32>> {
        t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()
    };
    let noise = host(noise_idx)?;
    let sal = host(salient_idx)?;
    let mut seen = vec![usize::MAX; l];
    for bi in 0..b {
        for j in 0..k {
            let n = noise[bi * k + j] as usize;
            if n >= l {
                bail!("{OP}: noise_idx[{bi}, {j}] = {n} is out of range, expected < L = {l}");
            }
            if seen[n] == bi {
                bail!("{OP}: noise_idx row {bi} holds index {n} twice; noise indices must be distinct");
            }
            seen[n] = bi;
            let s = sal[bi * k + j] as usize;
            if s >= ls {
                bail!("{OP}: salient_idx[{bi}, {j}] = {s} is out of range, expected < Ls = {ls}");
            }
        }
    }
    Ok(Injection {
        b,
        l,
        ls,
        d,
        k,
        noise,
        sal,
    })
}
