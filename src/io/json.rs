//! Bounded JSON readers: typed files ([`read`]) and top-level lists read element by element
//! ([`read_list`]).
//!
//! serde_json itself bounds nesting (depth 128) and never pre-allocates from the input
//! (JSON declares no sizes), so after the file-size cap the remaining risk is expansion: a
//! byte of JSON can become a 32-byte `Value`, and a list of `n` elements one allocation of
//! up to `64 n` bytes. [`read_list`] therefore never holds the whole document as `Value`s:
//! each top-level element is built on its own, within [`MAX_ELEMENT_NODES`] nodes, handed
//! to the caller and dropped.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::read_capped;

/// Most JSON values (scalars, lists, objects, keys) one element of a [`read_list`] file may
/// hold. A MUSIC-AVQA question has about 20.
pub const MAX_ELEMENT_NODES: usize = 1 << 16;

/// Parse the file at `path` (at most `cap` bytes) as a `T`; `what` names the kind of file.
/// Errors: `"<path>: not a valid <what>: <serde message with line and column>"`.
pub fn read<T: DeserializeOwned>(path: &Path, cap: u64, what: &str) -> Result<T> {
    let bytes = read_capped(path, cap, what)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{}: not a valid {what}: {e}", path.display()))
}

/// Read a file (at most `cap` bytes) holding one JSON list; `each(index, element)` turns
/// every element into a `T` as soon as it is parsed (its error is returned as is, so it
/// should name the file). Elements are `Value`s of at most [`MAX_ELEMENT_NODES`] nodes with
/// no duplicate object keys. Syntax errors read `"<path>: malformed JSON: <message>"`;
/// a top level that is not a list reads `"... expected a JSON list ..."`.
pub fn read_list<T>(
    path: &Path,
    cap: u64,
    what: &str,
    each: impl FnMut(usize, Value) -> Result<T>,
) -> Result<Vec<T>> {
    let bytes = read_capped(path, cap, what)?;
    parse_list(path, &bytes, each)
}

/// [`read_list`] on bytes already read from `path` (through [`read_capped`]), for a caller
/// that needs the bytes too (the data fingerprint hashes them).
pub fn parse_list<T>(
    path: &Path,
    bytes: &[u8],
    each: impl FnMut(usize, Value) -> Result<T>,
) -> Result<Vec<T>> {
    let failed = RefCell::new(None);
    let seed = ListSeed {
        each: RefCell::new(each),
        failed: &failed,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|_| v));
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    parsed.map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))
}

/// Parse `text` as one JSON value of at most [`MAX_ELEMENT_NODES`] nodes with no duplicate
/// object keys (for JSON nested in a string field, such as MUSIC-AVQA's `"type"`).
pub fn from_str_bounded(text: &str) -> serde_json::Result<Value> {
    let budget = Cell::new(MAX_ELEMENT_NODES);
    let mut de = serde_json::Deserializer::from_str(text);
    let v = BoundedValue { budget: &budget }.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

struct ListSeed<'f, F> {
    each: RefCell<F>,
    failed: &'f RefCell<Option<anyhow::Error>>,
}

impl<'de, T, F: FnMut(usize, Value) -> Result<T>> DeserializeSeed<'de> for ListSeed<'_, F> {
    type Value = Vec<T>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T, F: FnMut(usize, Value) -> Result<T>> Visitor<'de> for ListSeed<'_, F> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        let each = &mut *self.each.borrow_mut();
        loop {
            let budget = Cell::new(MAX_ELEMENT_NODES);
            let Some(v) = seq.next_element_seed(BoundedValue { budget: &budget })? else {
                return Ok(out);
            };
            match each(out.len(), v) {
                Ok(t) => out.push(t),
                Err(e) => {
                    *self.failed.borrow_mut() = Some(e);
                    // The caller reports the stored error; this one only stops the parse.
                    return Err(de::Error::custom("element rejected"));
                }
            }
        }
    }
}

/// A `serde_json::Value` built within a node budget, rejecting duplicate object keys.
struct BoundedValue<'b> {
    budget: &'b Cell<usize>,
}

impl BoundedValue<'_> {
    fn take<E: de::Error>(&self) -> Result<(), E> {
        match self.budget.get().checked_sub(1) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "list element has more than {MAX_ELEMENT_NODES} values"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(BoundedValue {
            budget: self.budget,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            self.take()?;
            if !seen.insert(k.clone()) {
                return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
            }
            let v = map.next_value_seed(BoundedValue {
                budget: self.budget,
            })?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}
