//! Seeded parameter initialisation.
//!
//! candle's CPU random generator cannot be seeded (`Device::Cpu.set_seed` errors), so a
//! `VarBuilder::from_varmap` initialises every run differently. [`seeded_var_builder`]
//! returns a `VarBuilder` over a `VarMap` whose new variables are drawn on the host from a
//! ChaCha8 stream seeded by `(seed, variable name)`, honouring the requested `Init`
//! (constant, normal, uniform, Kaiming). The values therefore depend only on the seed and
//! the name, not on construction order, thread count or device.

use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, Init, NormalOrUniform};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A `VarMap` backend with seeded initialisation (see the module docs).
#[derive(Clone)]
pub struct SeededVarMap {
    map: VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// Wrap `map`; new variables are created in it.
    pub fn new(map: VarMap, seed: u64) -> Self {
        Self { map, seed }
    }
}

/// FNV-1a of a string, mixed with a seed (stable across platforms and Rust versions).
pub fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Values for `shape` drawn according to `init` from a ChaCha8 stream seeded with `seed`.
pub fn init_values(shape: &Shape, init: Init, seed: u64) -> Result<Vec<f32>> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Result<Vec<f32>> {
        let d = Normal::new(mean, std.max(0.0))
            .map_err(|e| candle_core::Error::Msg(format!("init: normal({mean}, {std}): {e}")))?;
        Ok((0..n).map(|_| d.sample(rng) as f32).collect())
    };
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
            .collect()
    };
    Ok(match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev)?,
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan: usize = FanInOut::for_shape(&fan, shape);
            if fan == 0 {
                bail!("init: Kaiming init of shape {shape:?} has fan 0");
            }
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(&mut rng, -b, b)
                }
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std)?,
            }
        }
    })
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededVarMap: lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                bail!(
                    "SeededVarMap: {name} requested with shape {s:?} but exists with {:?}",
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let vals = init_values(&s, h, name_seed(self.seed, name))?;
        let t = Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededVarMap: lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => bail!("SeededVarMap: no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` (f32) creating seeded variables in `map` (see the module docs).
pub fn seeded_var_builder(map: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap::new(map.clone(), seed)),
        DType::F32,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_any_order() -> Result<()> {
        let dev = Device::Cpu;
        let build = |order: &[&str], seed: u64| -> Result<VarMap> {
            let m = VarMap::new();
            let vb = seeded_var_builder(&m, seed, &dev);
            for n in order {
                let _ = candle_nn::linear(8, 4, vb.pp(*n))?;
            }
            Ok(m)
        };
        let a = build(&["x", "y"], 7)?;
        let b = build(&["y", "x"], 7)?;
        let c = build(&["x", "y"], 8)?;
        let get = |m: &VarMap, n: &str| -> Result<Vec<f32>> {
            let d = m.data().lock().expect("lock");
            d[n].as_tensor().flatten_all()?.to_vec1::<f32>()
        };
        assert_eq!(get(&a, "x.weight")?, get(&b, "x.weight")?);
        assert_eq!(get(&a, "y.bias")?, get(&b, "y.bias")?);
        assert_ne!(get(&a, "x.weight")?, get(&c, "x.weight")?);
        // Kaiming-normal std for fan_in 8 with ReLU gain: sqrt(2)/sqrt(8) = 0.5
        let w = get(&a, "x.weight")?;
        assert!(w.iter().all(|v| v.abs() < 3.0));
        Ok(())
    }
}
