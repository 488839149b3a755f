//! The memory bank searched by cross-modal retrieval (paper section 3.2).
//!
//! A [`MemoryBank`] holds M rows: keys [M, Dk] (f32, f16 or bf16) with their f32 norms
//! \[M\] computed once at construction, values [M, ...] (any dtype and trailing shape) and
//! one clip id per row (unique). [`MemoryBank::search`] runs [`fn@crate::retrieve::cosine_topk`]
//! with the precomputed norms, skipping the row whose id a query names (its own clip).

use crate::io::candle_text;
use crate::retrieve::{cosine_topk, key_norms};
use candle_core::{bail, DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Result of a bank search: `scores` [B, n] f32 (Eq. 1 cosine similarity) and `indices`
/// [B, n] u32 bank rows. `search` lists rows most similar first; `search_negative` least
/// similar first. Ties go to the lower row.
#[derive(Clone, Debug)]
pub struct Retrieved {
    /// Eq. 1 cosine similarity of each retrieved row, [B, n] f32.
    pub scores: Tensor,
    /// Bank rows, [B, n] u32.
    pub indices: Tensor,
}

/// Keys (with precomputed norms), values and per-row clip ids; see the module docs.
#[derive(Clone, Debug)]
pub struct MemoryBank {
    keys: Tensor,
    key_norms: Tensor,
    values: Tensor,
    ids: Vec<u32>,
    row_of: HashMap<u32, u32>,
}

impl MemoryBank {
    /// Builds a bank from keys [M, Dk] (f32|f16|bf16), values [M, ...] and M unique clip
    /// ids, all on one device. Computes the key norms once.
    pub fn new(keys: Tensor, values: Tensor, ids: Vec<u32>) -> candle_core::Result<Self> {
        let norms = {
            if keys.rank() != 2 {
                bail!(
                    "MemoryBank::new: keys must be [M, Dk], got shape {:?}",
                    keys.dims()
                );
            }
            key_norms(&keys)?
        };
        Self::with_norms(keys, norms, values, ids)
    }

    fn with_norms(
        keys: Tensor,
        key_norms: Tensor,
        values: Tensor,
        ids: Vec<u32>,
    ) -> candle_core::Result<Self> {
        if keys.rank() != 2 {
            bail!(
                "MemoryBank: keys must be [M, Dk], got shape {:?}",
                keys.dims()
            );
        }
        if !matches!(keys.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            bail!(
                "MemoryBank: keys dtype {:?} unsupported, expected f32, f16 or bf16",
                keys.dtype()
            );
        }
        let m = keys.dim(0)?;
        if values.rank() == 0 || values.dim(0)? != m {
            bail!(
                "MemoryBank: values must be [M = {m}, ...], got shape {:?}",
                values.dims()
            );
        }
        if ids.len() != m {
            bail!("MemoryBank: {} ids given for M = {m} bank rows", ids.len());
        }
        if key_norms.dims() != [m] || key_norms.dtype() != DType::F32 {
            bail!(
                "MemoryBank: key_norms must be f32 [{m}], got {:?} {:?}",
                key_norms.dtype(),
                key_norms.dims()
            );
        }
        if !keys.device().same_device(values.device()) {
            bail!(
                "MemoryBank: keys on {:?} but values on {:?}",
                keys.device().location(),
                values.device().location()
            );
        }
        let mut row_of = HashMap::with_capacity(m);
        for (row, &id) in ids.iter().enumerate() {
            if let Some(prev) = row_of.insert(id, row as u32) {
                bail!("MemoryBank: clip id {id} appears twice (rows {prev} and {row}); ids must be unique");
            }
        }
        Ok(MemoryBank {
            keys,
            key_norms,
            values,
            ids,
            row_of,
        })
    }

    /// Number of bank rows M.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the bank has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keys [M, Dk].
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// Key norms \[M\] f32.
    pub fn key_norms(&self) -> &Tensor {
        &self.key_norms
    }

    /// Values [M, ...].
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// Clip id of each row.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Bank row holding clip `id`, if any.
    pub fn row_of(&self, id: u32) -> Option<usize> {
        self.row_of.get(&id).map(|&r| r as usize)
    }

    fn exclude_tensor(
        &self,
        op: &str,
        b: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(ex) = exclude_ids else {
            return Ok(None);
        };
        if ex.len() != b {
            bail!(
                "{op}: exclude_ids has {} entries for B = {b} queries",
                ex.len()
            );
        }
        let rows: Vec<u32> = ex
            .iter()
            .map(|id| {
                id.and_then(|id| self.row_of.get(&id).copied())
                    .unwrap_or(u32::MAX)
            })
            .collect();
        Ok(Some(Tensor::from_vec(rows, b, self.keys.device())?))
    }

    fn query_batch(&self, op: &str, queries: &Tensor) -> candle_core::Result<usize> {
        if queries.rank() != 2 {
            bail!(
                "{op}: queries must be [B, Dk], got shape {:?}",
                queries.dims()
            );
        }
        queries.dim(0)
    }

    /// Top-n most similar rows for queries [B, Dk] (f32 or the keys' dtype).
    /// `exclude_ids[b] = Some(clip id)` skips that clip's row for query b (an id not in
    /// the bank excludes nothing). Errors as [`fn@crate::retrieve::cosine_topk`], e.g. when n exceeds the rows
    /// left after exclusion.
    pub fn search(
        &self,
        queries: &Tensor,
        n: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> candle_core::Result<Retrieved> {
        let b = self.query_batch("MemoryBank::search", queries)?;
        let ex = self.exclude_tensor("MemoryBank::search", b, exclude_ids)?;
        let (scores, indices) =
            cosine_topk(queries, &self.keys, Some(&self.key_norms), n, ex.as_ref())?;
        Ok(Retrieved { scores, indices })
    }

    /// Top-n LEAST similar rows (negatives for the ranking loss), least similar first;
    /// scores are the true Eq. 1 similarities (ascending). Same exclusion rule as
    /// [`MemoryBank::search`]. Implemented by searching with negated queries.
    pub fn search_negative(
        &self,
        queries: &Tensor,
        n: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> candle_core::Result<Retrieved> {
        let b = self.query_batch("MemoryBank::search_negative", queries)?;
        let ex = self.exclude_tensor("MemoryBank::search_negative", b, exclude_ids)?;
        let neg = queries.neg()?;
        let (scores, indices) =
            cosine_topk(&neg, &self.keys, Some(&self.key_norms), n, ex.as_ref())?;
        Ok(Retrieved {
            scores: scores.neg()?,
            indices,
        })
    }

    /// Values gathered at `indices` [B, n] u32 (bank rows) -> [B, n, ...value dims].
    pub fn gather_values(&self, indices: &Tensor) -> candle_core::Result<Tensor> {
        if indices.rank() != 2 || indices.dtype() != DType::U32 {
            bail!(
                "MemoryBank::gather_values: indices must be u32 [B, n], got {:?} {:?}",
                indices.dtype(),
                indices.dims()
            );
        }
        let (b, n) = indices.dims2()?;
        let m = self.len();
        let flat = indices.flatten_all()?;
        if let Some(&bad) = flat.to_vec1::<u32>()?.iter().find(|&&r| r as usize >= m) {
            bail!("MemoryBank::gather_values: index {bad} out of range for M = {m} rows");
        }
        let flat = flat.to_device(self.values.device())?;
        let g = self.values.index_select(&flat, 0)?;
        let mut shape = vec![b, n];
        shape.extend_from_slice(&self.values.dims()[1..]);
        g.reshape(shape)
    }

    /// A copy of the bank on `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(MemoryBank {
            keys: self.keys.to_device(device)?,
            key_norms: self.key_norms.to_device(device)?,
            values: self.values.to_device(device)?,
            ids: self.ids.clone(),
            row_of: self.row_of.clone(),
        })
    }

    /// Saves keys, key_norms, values and ids (u32 \[M\]) to a safetensors file.
    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        let mut map = HashMap::new();
        map.insert("keys".to_string(), self.keys.clone());
        map.insert("key_norms".to_string(), self.key_norms.clone());
        map.insert("values".to_string(), self.values.clone());
        map.insert(
            "ids".to_string(),
            Tensor::from_vec(self.ids.clone(), self.ids.len(), &Device::Cpu)?,
        );
        candle_core::safetensors::save(&map, path).map_err(|e| {
            candle_core::Error::Msg(format!("MemoryBank::save {}: {e}", path.display()))
        })
    }

    /// Loads a bank written by [`MemoryBank::save`] onto `device` through the bounded
    /// safetensors reader ([`crate::io::tensors`]: every size in the header is checked
    /// against the file before anything is allocated). The stored key norms must match the
    /// keys (relative difference at most 1e-4), so a corrupted norm cannot skew retrieval
    /// silently. Every error names the file.
    pub fn load(path: &Path, device: &Device) -> candle_core::Result<Self> {
        let fail = |msg: String| candle_core::Error::Msg(format!("MemoryBank::load {msg}"));
        let at = |msg: String| fail(format!("{}: {msg}", path.display()));
        let mut st =
            crate::io::tensors::read(path, device).map_err(|e| fail(crate::io::error_line(&e)))?;
        let mut get = |name: &str| {
            st.remove(name)
                .ok_or_else(|| at(format!("no tensor `{name}`")))
        };
        let keys = get("keys")?;
        let norms = get("key_norms")?;
        let values = get("values")?;
        let ids_t = get("ids")?;
        if let Some(extra) = st.keys().next() {
            return Err(at(format!("unexpected tensor `{extra}`")));
        }
        if ids_t.dtype() != DType::U32 || ids_t.rank() != 1 {
            return Err(at(format!(
                "`ids` must be u32 [M], got {:?} {:?}",
                ids_t.dtype(),
                ids_t.dims()
            )));
        }
        let ids = ids_t.to_vec1::<u32>()?;
        let bank = Self::with_norms(keys, norms, values, ids).map_err(|e| at(candle_text(&e)))?;
        let fresh = key_norms(&bank.keys).map_err(|e| at(candle_text(&e)))?;
        let stored = bank.key_norms.to_vec1::<f32>()?;
        for (row, (s, f)) in stored.iter().zip(fresh.to_vec1::<f32>()?).enumerate() {
            // NaN in either fails this test.
            let close = (s - f).abs() <= 1e-4 * f.abs().max(1.0);
            if !close {
                return Err(at(format!(
                    "stored key norm {s} of row {row} does not match its key (norm {f})"
                )));
            }
        }
        Ok(bank)
    }
}
