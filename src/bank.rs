//! The memory bank searched by cross-modal retrieval (paper section 3.2), usable as a flat
//! cosine index in the manner of FAISS's `IndexFlatIP` + `IndexIDMap`.

use crate::error::{bail, Error, Result};
use crate::retrieve::cosine_topk::deferred_trusted;
use crate::retrieve::key_norms;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The id [`MemoryBank::search`] returns in the slots past the bank's rows (FAISS's `-1`
/// label, as a u32); never a row's id.
pub const NO_ID: u32 = u32::MAX;

/// Result of [`MemoryBank::search_rows`] / [`MemoryBank::search_rows_negative`]: `scores`
/// [B, n] f32 (Eq. 1 cosine similarity) and `indices` [B, n] u32 bank **rows** (for
/// [`MemoryBank::gather_values`]). Ties go to the lower row.
#[derive(Clone, Debug)]
pub struct Retrieved {
    /// Eq. 1 cosine similarity of each retrieved row, [B, n] f32.
    pub scores: Tensor,
    /// Bank rows, [B, n] u32.
    pub indices: Tensor,
}

/// A flat cosine index: M rows of keys [M, D] (f32, f16 or bf16) with their f32 norms
/// computed once, one unique u32 id per row, and optionally values [M, ...] (any dtype and
/// trailing shape) carried along for the rows a search finds.
///
/// As in FAISS: build it from keys ([`MemoryBank::from_keys`], ids 0..M;
/// [`MemoryBank::with_ids`]; [`MemoryBank::new`] with values), grow it with
/// [`MemoryBank::add`] / [`add_with_ids`](MemoryBank::add_with_ids) /
/// [`add_with_values`](MemoryBank::add_with_values), and [`search`](MemoryBank::search) it for
/// `(scores, ids)`. The R2ScP model searches by rows instead
/// ([`search_rows`](MemoryBank::search_rows), skipping each query's own clip) and gathers the
/// values of the rows found ([`gather_values`](MemoryBank::gather_values)).
///
/// Dtypes: keys are stored as given (f32, f16, bf16; f64 keys are stored as f32); queries
/// may be any float dtype (see [`cosine_topk`](crate::cosine_topk)). Scores carry no
/// gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use r2scp::MemoryBank;
///
/// let dev = Device::Cpu;
/// let mut bank = MemoryBank::from_keys(Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?)?; // ids 0, 1
/// bank.add(&Tensor::new(&[[1f32, 1.]], &dev)?)?; // id 2
/// let queries = Tensor::new(&[[0.9f32, 1.0]], &dev)?;
/// let (scores, ids) = bank.search(&queries, 2)?;
/// assert_eq!(ids.to_vec2::<u32>()?, [[2, 1]]);
/// assert!(scores.to_vec2::<f32>()?[0][0] > 0.99);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBank {
    keys: Tensor,
    key_norms: Tensor,
    values: Option<Tensor>,
    ids: Vec<u32>,
    /// `ids` as u32 \[M\] on the keys' device, to map search rows to ids there.
    ids_tensor: Tensor,
    row_of: HashMap<u32, u32>,
}

/// Keys as the bank stores them: rank 2, f32|f16|bf16 as given, f64 as f32; anything else
/// is an error naming the fix.
fn bank_keys(op: &str, keys: Tensor) -> Result<Tensor> {
    if keys.rank() != 2 {
        bail!("{op}: keys must be [M, D], got shape {:?}", keys.dims());
    }
    match keys.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(keys),
        DType::F64 => Ok(keys.to_dtype(DType::F32)?),
        dt => bail!(
            "{op}: keys dtype {dt:?} is not a float dtype, expected f32, f16 or bf16 (convert with `keys.to_dtype(DType::F32)`)"
        ),
    }
}

impl MemoryBank {
    /// A plain index (FAISS `IndexFlatIP` with cosine scores): keys [M, D], ids 0..M, no
    /// values. `M = 0` (keys [0, D]) gives an empty bank to [`add`](MemoryBank::add) to.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let bank = r2scp::MemoryBank::from_keys(Tensor::zeros((3, 8), candle_core::DType::F16, &Device::Cpu)?)?;
    /// assert_eq!((bank.len(), bank.dim(), bank.ids()), (3, 8, &[0u32, 1, 2][..]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_keys(keys: Tensor) -> Result<Self> {
        let keys = bank_keys("MemoryBank::from_keys", keys)?;
        let ids = (0..keys.dim(0)? as u32).collect();
        Self::build("MemoryBank::from_keys", keys, None, None, ids)
    }

    /// An index with your ids (FAISS `IndexIDMap`): keys [M, D] and M unique ids (not
    /// [`NO_ID`]); [`search`](MemoryBank::search) returns these ids.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let keys = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
    /// let bank = r2scp::MemoryBank::with_ids(keys, vec![70, 42])?;
    /// let (_, ids) = bank.search(&Tensor::new(&[[0f32, 1.]], &Device::Cpu)?, 1)?;
    /// assert_eq!(ids.to_vec2::<u32>()?, [[42]]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_ids(keys: Tensor, ids: Vec<u32>) -> Result<Self> {
        let keys = bank_keys("MemoryBank::with_ids", keys)?;
        Self::build("MemoryBank::with_ids", keys, None, None, ids)
    }

    /// The R2ScP bank: keys [M, D], values [M, ...] (the features a search retrieves) and M
    /// unique clip ids (not [`NO_ID`]), all on one device. Computes the key norms once.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let keys = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
    /// let values = Tensor::arange(0f32, 12., &dev)?.reshape((3, 2, 2))?; // 2 tokens of 2 per row
    /// let bank = r2scp::MemoryBank::new(keys, values, vec![10, 11, 12])?;
    /// // the 2 rows nearest to clip 10's key, skipping clip 10 itself
    /// let q = bank.keys().narrow(0, 0, 1)?;
    /// let found = bank.search_rows(&q, 2, Some(&[Some(10)]))?;
    /// assert_eq!(found.indices.to_vec2::<u32>()?, [[2, 1]]);
    /// assert_eq!(bank.gather_values(&found.indices)?.dims(), [1, 2, 2, 2]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(keys: Tensor, values: Tensor, ids: Vec<u32>) -> Result<Self> {
        let keys = bank_keys("MemoryBank::new", keys)?;
        Self::build("MemoryBank::new", keys, None, Some(values), ids)
    }

    /// Checks and assembles a bank; computes the norms when `key_norms` is None.
    fn build(
        op: &str,
        keys: Tensor,
        key_norms: Option<Tensor>,
        values: Option<Tensor>,
        ids: Vec<u32>,
    ) -> Result<Self> {
        if !matches!(keys.dtype(), DType::F32 | DType::F16 | DType::BF16) || keys.rank() != 2 {
            bail!(
                "{op}: keys must be f32, f16 or bf16 [M, D], got {:?} {:?}",
                keys.dtype(),
                keys.dims()
            );
        }
        let m = keys.dim(0)?;
        if keys.dim(1)? == 0 {
            bail!("{op}: keys must have D >= 1, got shape {:?}", keys.dims());
        }
        if let Some(values) = &values {
            if values.rank() == 0 || values.dim(0)? != m {
                bail!(
                    "{op}: values must be [M = {m}, ...], got shape {:?}",
                    values.dims()
                );
            }
            if !keys.device().same_device(values.device()) {
                bail!(
                    "{op}: keys on {:?} but values on {:?}",
                    keys.device().location(),
                    values.device().location()
                );
            }
        }
        if ids.len() != m {
            bail!("{op}: {} ids given for M = {m} bank rows", ids.len());
        }
        let key_norms = match key_norms {
            Some(kn) => {
                if kn.dims() != [m] || kn.dtype() != DType::F32 {
                    bail!(
                        "{op}: key_norms must be f32 [{m}], got {:?} {:?}",
                        kn.dtype(),
                        kn.dims()
                    );
                }
                kn
            }
            None => crate::retrieve::key_norms(&keys)?,
        };
        let row_of = HashMap::with_capacity(m);
        let ids_tensor = Tensor::from_vec(Vec::<u32>::new(), 0, keys.device())?;
        let mut bank = MemoryBank {
            keys,
            key_norms,
            values,
            ids: Vec::with_capacity(m),
            ids_tensor,
            row_of,
        };
        bank.index_ids(op, &ids)?;
        bank.ids_tensor = Tensor::from_slice(&bank.ids, m, bank.keys.device())?;
        Ok(bank)
    }

    /// Appends `ids` to the id map, refusing [`NO_ID`], repeats and ids already present;
    /// on error nothing is added.
    fn index_ids(&mut self, op: &str, ids: &[u32]) -> Result<()> {
        let start = self.ids.len();
        let mut fresh: HashMap<u32, u32> = HashMap::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let row = (start + i) as u32;
            if id == NO_ID {
                bail!("{op}: id {NO_ID} (row {row}) is reserved for NO_ID, the padding of search results");
            }
            if let Some(prev) = self.row_of.get(&id).or_else(|| fresh.get(&id)) {
                bail!("{op}: id {id} appears twice (rows {prev} and {row}); ids must be unique");
            }
            fresh.insert(id, row);
        }
        self.row_of.extend(fresh);
        self.ids.extend_from_slice(ids);
        Ok(())
    }

    /// Number of bank rows M.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the bank has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Key dimension D.
    pub fn dim(&self) -> usize {
        self.keys.dims()[1]
    }

    /// Keys [M, D].
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// Key norms \[M\] f32.
    pub fn key_norms(&self) -> &Tensor {
        &self.key_norms
    }

    /// Values [M, ...], if the bank carries any ([`MemoryBank::new`]).
    pub fn values(&self) -> Option<&Tensor> {
        self.values.as_ref()
    }

    /// The id of each row.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Bank row holding id `id`, if any.
    pub fn row_of(&self, id: u32) -> Option<usize> {
        self.row_of.get(&id).map(|&r| r as usize)
    }

    /// Appends rows with ids `len()..len() + R` (FAISS's sequential ids; a bank from
    /// [`from_keys`](MemoryBank::from_keys) keeps id = row). `keys` [R, D] of any float
    /// dtype, converted to the bank's dtype and moved to its device. Errors when the bank
    /// holds values (use [`add_with_values`](MemoryBank::add_with_values)) or one of these ids
    /// is taken (use [`add_with_ids`](MemoryBank::add_with_ids)).
    ///
    /// Each call copies the bank (candle tensors are immutable): add in batches, not row by
    /// row.
    pub fn add(&mut self, keys: &Tensor) -> Result<()> {
        let r = keys.dims().first().copied().unwrap_or(0);
        let start = self.len() as u64;
        if start + r as u64 > NO_ID as u64 {
            bail!("MemoryBank::add: ids {start}.. would reach {NO_ID} (NO_ID)");
        }
        let ids: Vec<u32> = (start as u32..(start + r as u64) as u32).collect();
        self.append("MemoryBank::add", keys, None, &ids)
    }

    /// Appends rows `keys` [R, D] with your `ids` (R unique ids, none already in the bank),
    /// as [`add`](MemoryBank::add) does otherwise.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let mut bank = r2scp::MemoryBank::with_ids(Tensor::new(&[[1f32, 0.]], &dev)?, vec![7])?;
    /// bank.add_with_ids(&Tensor::new(&[[0f64, 1.]], &dev)?, &[9])?; // f64 rows become f32
    /// assert_eq!((bank.len(), bank.row_of(9)), (2, Some(1)));
    /// assert!(bank.add_with_ids(&Tensor::new(&[[1f32, 1.]], &dev)?, &[7]).is_err()); // id 7 is taken
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_with_ids(&mut self, keys: &Tensor, ids: &[u32]) -> Result<()> {
        self.append("MemoryBank::add_with_ids", keys, None, ids)
    }

    /// Appends rows to a bank that carries values: `keys` [R, D], `values` [R, ...] (the
    /// trailing shape and dtype of the bank's values; moved to its device) and R new ids.
    pub fn add_with_values(&mut self, keys: &Tensor, values: &Tensor, ids: &[u32]) -> Result<()> {
        self.append("MemoryBank::add_with_values", keys, Some(values), ids)
    }

    fn append(
        &mut self,
        op: &str,
        keys: &Tensor,
        values: Option<&Tensor>,
        ids: &[u32],
    ) -> Result<()> {
        match (&self.values, values) {
            (Some(_), None) => bail!(
                "{op}: this bank carries values [M, ...]: add rows with `add_with_values(keys, values, ids)`"
            ),
            (None, Some(_)) => bail!(
                "{op}: this bank carries no values (built by `from_keys` or `with_ids`): add rows with `add` or `add_with_ids`"
            ),
            _ => {}
        }
        let dev = self.keys.device().clone();
        let keys = bank_keys(op, keys.clone())?;
        let (r, d) = keys.dims2()?;
        if d != self.dim() {
            bail!(
                "{op}: keys have D = {d}, the bank's keys D = {}",
                self.dim()
            );
        }
        if ids.len() != r {
            bail!("{op}: {} ids given for R = {r} new rows", ids.len());
        }
        let new_values = match (&self.values, values) {
            (Some(have), Some(v)) => {
                if v.rank() == 0 || v.dim(0)? != r || v.dims()[1..] != have.dims()[1..] {
                    bail!(
                        "{op}: values must be [R = {r}, {:?}...] like the bank's {:?}, got shape {:?}",
                        &have.dims()[1..],
                        have.dims(),
                        v.dims()
                    );
                }
                if v.dtype() != have.dtype() {
                    bail!(
                        "{op}: values dtype {:?} differs from the bank's {:?}",
                        v.dtype(),
                        have.dtype()
                    );
                }
                Some(Tensor::cat(&[have, &v.to_device(&dev)?], 0)?)
            }
            _ => None,
        };
        let keys = keys.to_device(&dev)?.to_dtype(self.keys.dtype())?;
        let norms = key_norms(&keys)?;
        // Ids last: a failure above leaves the bank as it was.
        let m = self.len();
        self.index_ids(op, ids)?;
        let grown = (|| -> Result<(Tensor, Tensor, Tensor)> {
            Ok((
                Tensor::cat(&[&self.keys, &keys], 0)?,
                Tensor::cat(&[&self.key_norms, &norms], 0)?,
                Tensor::from_slice(&self.ids, self.ids.len(), &dev)?,
            ))
        })();
        match grown {
            Ok((k, kn, idt)) => {
                self.keys = k;
                self.key_norms = kn;
                self.ids_tensor = idt;
                if new_values.is_some() {
                    self.values = new_values;
                }
                Ok(())
            }
            Err(e) => {
                for id in &self.ids[m..] {
                    self.row_of.remove(id);
                }
                self.ids.truncate(m);
                Err(e)
            }
        }
    }

    /// FAISS-style search: for queries [B, D] (any float dtype, on the bank's device) the
    /// `n` most similar rows, as `(scores [B, n] f32 descending, ids [B, n] u32)`: the rows'
    /// ids, not their positions. Ties go to the lower row.
    ///
    /// The rule for `n` is FAISS's (`IndexFlat::search`):
    /// - `n = 0` is an error (FAISS throws unless k > 0);
    /// - `n > M` pads: slots past the bank's M rows hold id [`NO_ID`] (FAISS's label -1) and
    ///   score `-inf` (FAISS writes the lowest float; no cosine is -inf, so a padded slot
    ///   cannot be mistaken for a real one). An empty bank returns only padding.
    ///
    /// A NaN score (a NaN or infinite query or key) is an error naming the query and row.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let bank = r2scp::MemoryBank::with_ids(Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?, vec![5, 6])?;
    /// let (scores, ids) = bank.search(&Tensor::new(&[[1f32, 0.5]], &dev)?, 3)?;
    /// assert_eq!(ids.to_vec2::<u32>()?, [[5, 6, r2scp::bank::NO_ID]]);
    /// assert_eq!(scores.to_vec2::<f32>()?[0][2], f32::NEG_INFINITY);
    /// assert!(bank.search(&Tensor::new(&[[1f32, 0.5]], &dev)?, 0).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn search(&self, queries: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "MemoryBank::search";
        let b = self.query_batch(OP, queries)?;
        if n == 0 {
            bail!("{OP}: n = 0, expected n >= 1 (FAISS refuses k = 0 too)");
        }
        let m = self.len();
        let dev = self.keys.device();
        let real = n.min(m);
        let (mut scores, mut ids) = if real > 0 {
            let (s, rows) = self.top_rows(OP, queries, real, None)?;
            let ids = self
                .ids_tensor
                .index_select(&rows.flatten_all()?, 0)?
                .reshape((b, real))?;
            (s, ids)
        } else {
            self.check_queries(OP, queries)?;
            (
                Tensor::zeros((b, 0), DType::F32, dev)?,
                Tensor::zeros((b, 0), DType::U32, dev)?,
            )
        };
        if n > real {
            let pad = (b, n - real);
            scores = Tensor::cat(&[&scores, &Tensor::full(f32::NEG_INFINITY, pad, dev)?], 1)?;
            ids = Tensor::cat(&[&ids, &Tensor::full(NO_ID, pad, dev)?], 1)?;
        }
        Ok((scores, ids))
    }

    /// The checks `cosine_topk` would make of `queries`, for the empty bank it is not called
    /// on: rank 2, the bank's D, a float dtype, the bank's device.
    fn check_queries(&self, op: &str, queries: &Tensor) -> Result<()> {
        let (_, d) = queries.dims2()?;
        if d != self.dim() {
            bail!(
                "{op}: query dimension D = {d} does not match the keys' D = {}",
                self.dim()
            );
        }
        if !queries.dtype().is_float() {
            bail!(
                "{op}: queries dtype {:?} is not a float dtype, expected f32 (or any float)",
                queries.dtype()
            );
        }
        crate::check::check_device((queries, "queries"), (&self.keys, "keys"), op)?;
        Ok(())
    }

    fn exclude_tensor(
        &self,
        op: &str,
        b: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> Result<Option<Tensor>> {
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

    fn query_batch(&self, op: &str, queries: &Tensor) -> Result<usize> {
        if queries.rank() != 2 {
            bail!(
                "{op}: queries must be [B, D], got shape {:?}",
                queries.dims()
            );
        }
        Ok(queries.dim(0)?)
    }

    /// `cosine_topk` over the bank with its own (trusted) norms.
    fn top_rows(
        &self,
        op: &'static str,
        queries: &Tensor,
        n: usize,
        exclude: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        deferred_trusted(op, queries, &self.keys, Some(&self.key_norms), n, exclude)?.check()
    }

    /// Top-n most similar **rows** for queries [B, D] (any float dtype), for
    /// [`gather_values`](MemoryBank::gather_values). `exclude_ids[b] = Some(id)` skips that
    /// id's row for query b (its own clip; an id not in the bank excludes nothing). Unlike
    /// [`search`](MemoryBank::search), `n` above the rows left after exclusion is an error
    /// (the contract of [`cosine_topk`](crate::cosine_topk), whose errors these are).
    pub fn search_rows(
        &self,
        queries: &Tensor,
        n: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> Result<Retrieved> {
        const OP: &str = "MemoryBank::search_rows";
        let b = self.query_batch(OP, queries)?;
        let ex = self.exclude_tensor(OP, b, exclude_ids)?;
        let (scores, indices) = self.top_rows(OP, queries, n, ex.as_ref())?;
        Ok(Retrieved { scores, indices })
    }

    /// Top-n LEAST similar rows (negatives for the ranking loss), least similar first;
    /// scores are the true Eq. 1 similarities (ascending). Same exclusion rule and errors as
    /// [`search_rows`](MemoryBank::search_rows). Implemented by searching with negated
    /// queries.
    pub fn search_rows_negative(
        &self,
        queries: &Tensor,
        n: usize,
        exclude_ids: Option<&[Option<u32>]>,
    ) -> Result<Retrieved> {
        const OP: &str = "MemoryBank::search_rows_negative";
        let b = self.query_batch(OP, queries)?;
        let ex = self.exclude_tensor(OP, b, exclude_ids)?;
        let neg = queries.neg()?;
        let (scores, indices) = self.top_rows(OP, &neg, n, ex.as_ref())?;
        Ok(Retrieved {
            scores: scores.neg()?,
            indices,
        })
    }

    /// Values gathered at `indices` [B, n] u32 (bank rows) -> [B, n, ...value dims].
    /// Errors when the bank carries no values or an index is not a row.
    pub fn gather_values(&self, indices: &Tensor) -> Result<Tensor> {
        const OP: &str = "MemoryBank::gather_values";
        let Some(values) = &self.values else {
            bail!("{OP}: this bank carries no values (built by `from_keys` or `with_ids`)");
        };
        if indices.rank() != 2 || indices.dtype() != DType::U32 {
            bail!(
                "{OP}: indices must be u32 [B, n], got {:?} {:?}",
                indices.dtype(),
                indices.dims()
            );
        }
        let (b, n) = indices.dims2()?;
        let m = self.len();
        let flat = indices.flatten_all()?;
        if let Some(&bad) = flat.to_vec1::<u32>()?.iter().find(|&&r| r as usize >= m) {
            bail!("{OP}: index {bad} out of range for M = {m} rows");
        }
        let flat = flat.to_device(values.device())?;
        let g = values.index_select(&flat, 0)?;
        let mut shape = vec![b, n];
        shape.extend_from_slice(&values.dims()[1..]);
        Ok(g.reshape(shape)?)
    }

    /// A copy of the bank on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(MemoryBank {
            keys: self.keys.to_device(device)?,
            key_norms: self.key_norms.to_device(device)?,
            values: self
                .values
                .as_ref()
                .map(|v| v.to_device(device))
                .transpose()?,
            ids: self.ids.clone(),
            ids_tensor: self.ids_tensor.to_device(device)?,
            row_of: self.row_of.clone(),
        })
    }

    /// Saves keys, key_norms, ids (u32 \[M\]) and the values, if any, to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        map.insert("keys".to_string(), self.keys.clone());
        map.insert("key_norms".to_string(), self.key_norms.clone());
        if let Some(values) = &self.values {
            map.insert("values".to_string(), values.clone());
        }
        map.insert(
            "ids".to_string(),
            Tensor::from_vec(self.ids.clone(), self.ids.len(), &Device::Cpu)?,
        );
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::msg(format!("MemoryBank::save {}: {e}", path.display())))
    }

    /// Loads a bank written by [`MemoryBank::save`] onto `device` through the bounded
    /// safetensors reader (every size in the header is checked against the file before
    /// anything is allocated). The stored key norms must match the keys (relative
    /// difference at most 1e-4), so a corrupted norm cannot skew retrieval silently. Every
    /// error names the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let fail = |msg: String| Error::msg(format!("MemoryBank::load {msg}"));
        let at = |msg: String| fail(format!("{}: {msg}", path.display()));
        let mut st =
            crate::io::tensors::read(path, device).map_err(|e| fail(crate::io::error_line(&e)))?;
        let mut get = |name: &str| {
            st.remove(name)
                .ok_or_else(|| at(format!("no tensor `{name}`")))
        };
        let keys = get("keys")?;
        let norms = get("key_norms")?;
        let ids_t = get("ids")?;
        let values = st.remove("values");
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
        let bank = Self::build("MemoryBank", keys, Some(norms), values, ids)
            .map_err(|e| at(e.message().to_string()))?;
        let fresh = key_norms(&bank.keys).map_err(|e| at(e.message().to_string()))?;
        let stored = bank.key_norms.to_vec1::<f32>()?;
        for (row, (s, f)) in stored.iter().zip(fresh.to_vec1::<f32>()?).enumerate() {
            // NaN in either fails this test: a bank file with a NaN key is refused here.
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
