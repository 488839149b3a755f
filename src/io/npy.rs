//! Bounded reader of NumPy `.npy` float arrays (format versions 1.0, 2.0 and 3.0).
//!
//! The header is parsed as the strict Python literal numpy writes
//! (`{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`): exactly the three keys,
//! each once; `descr` one of `<f2 <f4 <f8` (or big-endian `>`, or native `=`); a shape tuple
//! of at most [`MAX_RANK`] non-negative integers. The shape times the element size must
//! equal the bytes after the header exactly, checked with overflow-checked arithmetic before
//! the output is reserved (fallibly). Data is converted to f32 while it streams in, so the
//! reader holds at most the f32 result (two copies for a Fortran-order array of rank >= 2,
//! which is transposed to C order).

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, Result};
use half::f16;

use super::{checked_numel, try_vec};

/// Longest header accepted (numpy writes under 200 bytes; `np.load` refuses more than
/// 10,000 by default).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Highest rank accepted (numpy's own limit).
pub const MAX_RANK: usize = 64;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element type of a float `.npy` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyFloat {
    /// IEEE half (`f2`).
    F16,
    /// IEEE single (`f4`).
    F32,
    /// IEEE double (`f8`).
    F64,
}

impl NpyFloat {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyFloat::F16 => 2,
            NpyFloat::F32 => 4,
            NpyFloat::F64 => 8,
        }
    }
}

/// A parsed and size-checked `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: NpyFloat,
    /// Elements stored big-endian.
    pub big_endian: bool,
    /// Column-major data (`fortran_order: True`).
    pub fortran_order: bool,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Byte offset of the data (magic, version, length field and header).
    pub data_offset: usize,
    /// Number of elements (product of `shape`).
    pub numel: usize,
}

/// A float array read from `.npy`: `data` holds `shape.iter().product()` f32 values in C
/// (row-major) order, whatever the file's dtype, byte order and memory order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub data: Vec<f32>,
    /// The file's element type.
    pub dtype: NpyFloat,
}

/// Read the float `.npy` file at `path` as f32. Errors read
/// `"<path>: cannot read .npy: <problem>"`, one line.
pub fn read_f32(path: &Path) -> Result<NpyArray> {
    let fail = |msg: String| anyhow!("{}: cannot read .npy: {msg}", path.display());
    let file = super::open_regular(path, ".npy")?;
    let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let header = read_header(&mut r, file_len).map_err(fail)?;
    let mut data = try_vec::<f32>(header.numel, path, "the .npy data")?;
    read_elements(&mut r, &header, &mut data).map_err(fail)?;
    let data = if header.fortran_order && header.shape.len() >= 2 {
        let mut c = try_vec::<f32>(header.numel, path, "the .npy transpose")?;
        fortran_to_c(&data, &header.shape, &mut c);
        c
    } else {
        data
    };
    Ok(NpyArray {
        shape: header.shape,
        data,
        dtype: header.dtype,
    })
}

/// Read and check the header from the start of a file of `file_len` bytes; leaves `r` at
/// the first data byte. The error is the problem only (the caller adds the path).
pub fn read_header(r: &mut impl Read, file_len: u64) -> Result<NpyHeader, String> {
    let mut pre = [0u8; 8];
    read_exact(r, &mut pre, "magic and version", file_len)?;
    if &pre[..6] != MAGIC {
        return Err("not an .npy file (bad magic bytes)".into());
    }
    let (major, minor) = (pre[6], pre[7]);
    let (len_bytes, utf8) = match (major, minor) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => {
            return Err(format!(
                "format version {major}.{minor} is not supported (expected 1.0, 2.0 or 3.0)"
            ))
        }
    };
    let mut lb = [0u8; 4];
    read_exact(r, &mut lb[..len_bytes], "header length", file_len)?;
    let header_len = u32::from_le_bytes(lb) as usize;
    let data_offset = 8 + len_bytes + header_len;
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES} bytes accepted"
        ));
    }
    if data_offset as u64 > file_len {
        return Err(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        ));
    }
    let mut text = vec![0u8; header_len];
    read_exact(r, &mut text, "header", file_len)?;
    if !utf8 {
        if let Some(i) = text.iter().position(|b| !b.is_ascii()) {
            return Err(format!("header byte {i} is not ASCII"));
        }
    }
    let text = std::str::from_utf8(&text)
        .map_err(|e| format!("header is not UTF-8 (bad byte at {})", e.valid_up_to()))?;
    let fields = parse_dict(text)?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, val) in fields {
        let slot_taken = match (key.as_str(), val) {
            ("descr", PyVal::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", PyVal::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", PyVal::Tuple(t)) => shape.replace(t).is_some(),
            ("descr" | "fortran_order" | "shape", v) => {
                return Err(format!("header key '{key}' has {}", v.describe()))
            }
            _ => return Err(format!("unexpected header key {key:?}")),
        };
        if slot_taken {
            return Err(format!("header key '{key}' appears twice"));
        }
    }
    let descr = descr.ok_or("header has no 'descr'")?;
    let fortran_order = fortran.ok_or("header has no 'fortran_order'")?;
    let dims = shape.ok_or("header has no 'shape'")?;
    let (dtype, big_endian) = parse_descr(&descr)?;
    if dims.len() > MAX_RANK {
        return Err(format!(
            "shape has rank {}, more than the {MAX_RANK} accepted",
            dims.len()
        ));
    }
    let shape_txt = format!(
        "({})",
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut shape = Vec::with_capacity(dims.len());
    for d in &dims {
        match usize::try_from(*d) {
            Ok(d) => shape.push(d),
            Err(_) if *d < 0 => return Err(format!("shape {shape_txt} has a negative dimension")),
            Err(_) => return Err(format!("shape {shape_txt} has a dimension above 2^64")),
        }
    }
    let data_bytes = file_len - data_offset as u64;
    let numel = checked_numel(&shape, dtype.size()).ok_or_else(|| {
        format!("header declares shape {shape_txt} of {descr}, larger than any array can be (the file holds {data_bytes} bytes of data)")
    })?;
    let want = (numel as u64) * dtype.size() as u64;
    if want != data_bytes {
        return Err(format!(
            "header declares shape {shape_txt} of {descr} = {want} bytes but the file holds {data_bytes} bytes of data"
        ));
    }
    Ok(NpyHeader {
        dtype,
        big_endian,
        fortran_order,
        shape,
        data_offset,
        numel,
    })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str, file_len: u64) -> Result<(), String> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            format!("file ends inside the {what} ({file_len} bytes)")
        }
        _ => format!("reading the {what}: {e}"),
    })
}

fn parse_descr(d: &str) -> Result<(NpyFloat, bool), String> {
    let big = match d.as_bytes().first() {
        Some(b'<') => false,
        Some(b'>') => true,
        Some(b'=') => cfg!(target_endian = "big"),
        _ => {
            return Err(format!(
                "dtype {d:?} is not supported (expected '<f2', '<f4' or '<f8')"
            ))
        }
    };
    let t = match &d[1..] {
        "f2" => NpyFloat::F16,
        "f4" => NpyFloat::F32,
        "f8" => NpyFloat::F64,
        _ => {
            return Err(format!(
                "dtype {d:?} is not a float dtype (expected '<f2', '<f4' or '<f8')"
            ))
        }
    };
    Ok((t, big))
}

/// Stream `header.numel` elements into `out` as f32.
fn read_elements(r: &mut impl Read, h: &NpyHeader, out: &mut Vec<f32>) -> Result<(), String> {
    let size = h.dtype.size();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = h.numel;
    while left > 0 {
        let n = left.min(buf.len() / size);
        let chunk = &mut buf[..n * size];
        r.read_exact(chunk).map_err(|e| {
            format!(
                "data ends early ({e}) after {} of {} elements",
                h.numel - left,
                h.numel
            )
        })?;
        macro_rules! convert {
            ($n:literal, $f:expr) => {
                out.extend(chunk.chunks_exact($n).map(|b| {
                    let a: [u8; $n] = b.try_into().expect("chunks_exact");
                    $f(a)
                }))
            };
        }
        match (h.dtype, h.big_endian) {
            (NpyFloat::F16, false) => convert!(2, |a| f16::from_le_bytes(a).to_f32()),
            (NpyFloat::F16, true) => convert!(2, |a| f16::from_be_bytes(a).to_f32()),
            (NpyFloat::F32, false) => convert!(4, f32::from_le_bytes),
            (NpyFloat::F32, true) => convert!(4, f32::from_be_bytes),
            (NpyFloat::F64, false) => convert!(8, |a| f64::from_le_bytes(a) as f32),
            (NpyFloat::F64, true) => convert!(8, |a| f64::from_be_bytes(a) as f32),
        }
        left -= n;
    }
    Ok(())
}

/// Copy column-major `src` of `shape` into row-major `dst` (empty, with capacity).
fn fortran_to_c(src: &[f32], shape: &[usize], dst: &mut Vec<f32>) {
    let rank = shape.len();
    // Column-major strides: the first dimension is contiguous.
    let mut fstride = vec![1usize; rank];
    for i in 1..rank {
        fstride[i] = fstride[i - 1] * shape[i - 1];
    }
    // Walk the row-major index (last dimension fastest), tracking the column-major offset.
    let mut idx = vec![0usize; rank];
    let mut off = 0usize;
    for _ in 0..src.len() {
        dst.push(src[off]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            off += fstride[k];
            if idx[k] < shape[k] {
                break;
            }
            off -= fstride[k] * shape[k];
            idx[k] = 0;
        }
    }
}

/// A value in an `.npy` header dict.
enum PyVal {
    Str(String),
    Bool(bool),
    Tuple(Vec<i128>),
}

impl PyVal {
    fn describe(&self) -> String {
        match self {
            PyVal::Str(s) => format!("the string {s:?}"),
            PyVal::Bool(b) => format!("the boolean {b}"),
            PyVal::Tuple(_) => "a tuple".into(),
        }
    }
}

/// Parse `{'key': value, ...}` (trailing comma, spaces and newline allowed) where a value is
/// a quoted string, `True`/`False` or a tuple of integers.
fn parse_dict(s: &str) -> Result<Vec<(String, PyVal)>, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let val = match p.peek() {
            Some(b'\'' | b'"') => PyVal::Str(p.string()?),
            Some(b'(') => PyVal::Tuple(p.tuple()?),
            Some(b'T' | b'F') => PyVal::Bool(p.boolean()?),
            _ => return Err(format!("header value of '{key}' {}", p.unexpected())),
        };
        out.push((key, val));
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("header has text after the dict at byte {}", p.i));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += hit as usize;
        hit
    }
    fn unexpected(&self) -> String {
        match self.peek() {
            Some(c) => format!("has unexpected {:?} at header byte {}", c as char, self.i),
            None => "is cut off by the end of the header".into(),
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "header is not a dict literal: expected {:?}, {}",
                c as char,
                self.unexpected()
            ))
        }
    }
    fn string(&mut self) -> Result<String, String> {
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "header is not a dict literal: expected a quoted key, {}",
                    self.unexpected()
                ))
            }
        };
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == q {
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(s);
            }
            if c == b'\\' {
                return Err(format!("header string has an escape at byte {}", self.i));
            }
            self.i += 1;
        }
        Err("header string is not closed".into())
    }
    fn boolean(&mut self) -> Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!(
            "header is not a dict literal: expected True or False, {}",
            self.unexpected()
        ))
    }
    fn tuple(&mut self) -> Result<Vec<i128>, String> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(out);
            }
            if out.len() > MAX_RANK {
                return Err(format!("shape has more than {MAX_RANK} dimensions"));
            }
            out.push(self.int()?);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                // `(3)` is an int in Python, not a tuple.
                if out.len() == 1 {
                    return Err("shape (n) is not a tuple (numpy writes (n,))".into());
                }
                return Ok(out);
            }
        }
    }
    fn int(&mut self) -> Result<i128, String> {
        let neg = self.eat(b'-');
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        let digits = &self.s[start..self.i];
        if digits.is_empty() {
            return Err(format!("shape entry {}", self.unexpected()));
        }
        // 30 digits exceed 2^64 already; cap so the i128 cannot overflow either.
        let txt = std::str::from_utf8(&digits[..digits.len().min(30)]).expect("ASCII digits");
        let v: i128 = txt.parse().map_err(|e| format!("shape entry: {e}"))?;
        Ok(if neg { -v } else { v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend([1, 0]);
        v.extend((header.len() as u16).to_le_bytes());
        v.extend(header.as_bytes());
        v.extend(data);
        v
    }

    fn header(bytes: &[u8]) -> Result<NpyHeader, String> {
        read_header(&mut &bytes[..], bytes.len() as u64)
    }

    #[test]
    fn parses_numpy_and_candle_headers() {
        let data = [0u8; 24];
        for (h, shape) in [
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
                vec![2, 3],
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,3,), }",
                vec![2, 3],
            ),
            (
                "{'descr':'<f8','fortran_order':False,'shape':(3,)}    \n",
                vec![3],
            ),
            (
                "{\"descr\": \"<f2\", \"fortran_order\": True, \"shape\": (3, 4)}",
                vec![3, 4],
            ),
        ] {
            assert_eq!(header(&file(h, &data)).unwrap().shape, shape, "{h}");
        }
        let h = header(&file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
            &[0; 4],
        ))
        .unwrap();
        assert_eq!((h.shape.len(), h.numel), (0, 1));
    }

    #[test]
    fn rejects_sizes_that_disagree_with_the_file() {
        let e = header(&file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 100000), }",
            &[0; 64],
        ))
        .unwrap_err();
        assert!(
            e.contains("40000000000000 bytes") && e.contains("64 bytes"),
            "{e}"
        );
        for (h, needle) in [
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 4), }",
                "negative",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551616, 1), }",
                "above 2^64",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
                "larger than any array",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 18446744073709551615), }",
                "larger than any array",
            ),
            (
                "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }",
                "not a float dtype",
            ),
            (
                "{'descr': '|S4', 'fortran_order': False, 'shape': (2, 3), }",
                "not supported",
            ),
            (
                "{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
                "twice",
            ),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }",
                "fortran_order",
            ),
            ("{'descr': '<f4', 'shape': (2, 3), }", "no 'fortran_order'"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",
                "'x'",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (6), }",
                "not a tuple",
            ),
        ] {
            let e = header(&file(h, &[0; 24])).unwrap_err();
            assert!(e.contains(needle), "{h}: {e}");
        }
        let mut f = file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[0; 24],
        );
        f[8] = 0xff;
        f[9] = 0xff;
        assert!(header(&f).unwrap_err().contains("runs past the end"));
    }

    #[test]
    fn fortran_order_is_transposed_to_row_major() {
        // column-major [2, 3]: columns (0, 3), (1, 4), (2, 5)
        let src = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0];
        let mut dst = Vec::with_capacity(6);
        fortran_to_c(&src, &[2, 3], &mut dst);
        assert_eq!(dst, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // [2, 2, 2]: element (i, j, k) at i + 2j + 4k
        let src: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let mut dst = Vec::with_capacity(8);
        fortran_to_c(&src, &[2, 2, 2], &mut dst);
        assert_eq!(dst, [0.0, 4.0, 2.0, 6.0, 1.0, 5.0, 3.0, 7.0]);
    }
}
