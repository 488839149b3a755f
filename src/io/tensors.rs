//! Bounded safetensors reader (memory bank and checkpoint files).
//!
//! The header is validated by the `safetensors` crate's own `Metadata` checks (offsets start
//! at 0 and are contiguous, every tensor's byte range equals dtype size x shape, with
//! overflow-checked arithmetic) after this module has checked what that crate leaves to the
//! caller: the 8-byte header length against the file length before the header is read,
//! duplicate tensor names (serde maps keep the last silently), the end of the last tensor
//! against the file length, dtypes candle stores natively, and shapes whose dims (zeros
//! counted as ones) could not describe a real array. Tensor bytes are then streamed from the
//! file straight into one fallibly reserved buffer per tensor: no memory map (a file
//! truncated while mapped kills the process with SIGBUS) and no second copy of the file.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde::de;

use super::{checked_numel, try_vec};

/// Longest header accepted: the `safetensors` crate's own limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Read every tensor of the safetensors file at `path` onto `device`. Errors read
/// `"<path>: not a valid safetensors file: <problem>"`, one line.
pub fn read(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let fail = |msg: String| anyhow!("{}: not a valid safetensors file: {msg}", path.display());
    let file = super::open_regular(path, "safetensors file")?;
    let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let infos = read_header(&mut r, file_len).map_err(fail)?;
    let mut out = HashMap::with_capacity(infos.len());
    for (name, info) in infos {
        let t = read_tensor(&mut r, &info, device, path)
            .map_err(|e| fail(format!("tensor `{name}`: {}", super::error_line(&e))))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Read and validate the header of a file of `file_len` bytes; leaves `r` at the first data
/// byte. Returns the tensors ordered by offset. The error is the problem only.
pub fn read_header(r: &mut impl Read, file_len: u64) -> Result<Vec<(String, TensorInfo)>, String> {
    if file_len < 8 {
        return Err(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        ));
    }
    let mut nb = [0u8; 8];
    r.read_exact(&mut nb)
        .map_err(|e| format!("reading the header length: {e}"))?;
    let n = u64::from_le_bytes(nb);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {n} exceeds the {MAX_HEADER_BYTES} bytes accepted"
        ));
    }
    if n > file_len - 8 {
        return Err(format!(
            "header length {n} runs past the end of the {file_len}-byte file"
        ));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header)
        .map_err(|e| format!("reading the {n}-byte header: {e}"))?;
    let text = std::str::from_utf8(&header)
        .map_err(|e| format!("header is not UTF-8 (bad byte at {})", e.valid_up_to()))?;
    let Header { meta, tensors: raw } =
        serde_json::from_str(text).map_err(|e| format!("header: {e}"))?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, info) in raw {
        let bytes = checked_numel(&info.shape, info.dtype.bitsize().div_ceil(8))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| {
                format!(
                    "tensor `{name}`: shape {:?} of {:?} is larger than any array can be",
                    info.shape, info.dtype
                )
            })?;
        let (s, e) = info.data_offsets;
        if e.checked_sub(s) != Some(bytes) {
            return Err(format!(
                "tensor `{name}`: shape {:?} of {:?} needs {bytes} bytes but its data_offsets [{s}, {e}) do not span that",
                info.shape, info.dtype
            ));
        }
        tensors.push((name, info));
    }
    tensors.sort_by_key(|(_, i)| i.data_offsets);
    // The crate's own validation: offsets contiguous from 0, sizes = dtype x shape.
    let meta = Metadata::new(meta, tensors.clone()).map_err(|e| e.to_string())?;
    let end = 8 + n + meta.data_len() as u64;
    if end != file_len {
        return Err(format!(
            "the header's tensors end at byte {end} but the file has {file_len} bytes"
        ));
    }
    Ok(tensors)
}

/// The next tensor's bytes from `r` (positioned at its first byte) as a `device` tensor.
fn read_tensor(
    r: &mut impl Read,
    info: &TensorInfo,
    device: &Device,
    path: &Path,
) -> Result<Tensor> {
    let shape = info.shape.as_slice();
    let numel: usize = shape.iter().product();
    macro_rules! load {
        ($t:ty, $n:literal) => {{
            let mut v = try_vec::<$t>(numel, path, "a tensor")?;
            read_le(r, numel, &mut v, <$t>::from_le_bytes as fn([u8; $n]) -> $t)?;
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }};
    }
    let t = match info.dtype {
        Dtype::F64 => load!(f64, 8),
        Dtype::F32 => load!(f32, 4),
        Dtype::F16 => load!(f16, 2),
        Dtype::BF16 => load!(bf16, 2),
        Dtype::U32 => load!(u32, 4),
        Dtype::U8 => load!(u8, 1),
        Dtype::I64 => load!(i64, 8),
        Dtype::I32 => load!(i32, 4),
        Dtype::I16 => load!(i16, 2),
        other => {
            return Err(anyhow!(
                "dtype {other:?} is not supported (expected F64, F32, F16, BF16, U32, U8, I64, I32 or I16)"
            ))
        }
    };
    Ok(t.to_device(device)?)
}

/// Append `n` little-endian elements read from `r` to `out` (capacity reserved).
fn read_le<T, const N: usize>(
    r: &mut impl Read,
    n: usize,
    out: &mut Vec<T>,
    conv: fn([u8; N]) -> T,
) -> Result<()> {
    let mut buf = vec![0u8; (64 * 1024 / N) * N];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() / N);
        let chunk = &mut buf[..k * N];
        r.read_exact(chunk)
            .map_err(|e| anyhow!("data ends early ({e})"))?;
        out.extend(
            chunk
                .chunks_exact(N)
                .map(|b| conv(b.try_into().expect("chunks_exact"))),
        );
        left -= k;
    }
    Ok(())
}

/// Most dimensions a tensor in a header may have (numpy's limit; candle needs far fewer).
const MAX_RANK: usize = 64;

/// The header's JSON object: optional `__metadata__` (string to string) and one entry per
/// tensor, names unique. Built with typed visitors so that no list grows past what it may
/// hold (a shape past [`MAX_RANK`] dims is refused while it is read).
struct Header {
    meta: Option<HashMap<String, String>>,
    tensors: Vec<(String, TensorInfo)>,
}

impl<'de> de::Deserialize<'de> for Header {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut seen = HashSet::new();
                let mut h = Header {
                    meta: None,
                    tensors: Vec::new(),
                };
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
                    }
                    if k == "__metadata__" {
                        h.meta = Some(map.next_value()?);
                    } else {
                        let e: Entry = map.next_value()?;
                        h.tensors.push((
                            k,
                            TensorInfo {
                                dtype: e.dtype,
                                shape: e.shape.0,
                                data_offsets: e.data_offsets,
                            },
                        ));
                    }
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// One tensor entry of a header.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dtype: Dtype,
    shape: Shape,
    data_offsets: (usize, usize),
}

/// A shape of at most [`MAX_RANK`] dims.
struct Shape(Vec<usize>);

impl<'de> de::Deserialize<'de> for Shape {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of at most 64 dimensions")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Shape, A::Error> {
                let mut dims = Vec::new();
                while let Some(d) = seq.next_element::<usize>()? {
                    if dims.len() == MAX_RANK {
                        return Err(de::Error::custom(format_args!(
                            "shape has more than {MAX_RANK} dimensions"
                        )));
                    }
                    dims.push(d);
                }
                Ok(Shape(dims))
            }
        }
        d.deserialize_seq(V)
    }
}
