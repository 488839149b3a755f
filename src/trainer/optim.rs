//! AdamW with named parameters and persistent moments, plus the learning-rate schedule.
//!
//! candle-nn's `AdamW` keeps its moment estimates private, so a resumed run could not
//! continue bit-for-bit where the interrupted one stopped. This optimizer keeps every
//! parameter under its `VarMap` name, exposes the first/second moments as named tensors
//! (`m.<name>`, `v.<name>`) for the checkpoint, and restores them on resume.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (decoupled weight decay, Loshchilov & Hutter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Peak learning rate; the schedule scales it per step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters of rank >= 2 (not to biases,
    /// norm gains or other vectors).
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this value (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over a named subset of a `VarMap`.
///
/// Parameters are kept sorted by name so that every reduction (the gradient norm) runs in
/// a fixed order: with a fixed thread count, two runs from the same state produce
/// bit-identical parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    step: u64,
    lr: f64,
}

impl AdamW {
    /// Optimizer over the vars of `varmap` whose name satisfies `trainable` (e.g.
    /// `|n| !n.starts_with("expert.")` for stage II). Errors when nothing is selected.
    pub fn from_varmap(
        varmap: &VarMap,
        trainable: impl Fn(&str) -> bool,
        params: AdamWParams,
    ) -> Result<Self> {
        let mut named: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("AdamW: VarMap lock poisoned".into()))?;
            data.iter()
                .filter(|(n, _)| trainable(n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        if named.is_empty() {
            bail!(
                "AdamW: no trainable variables selected out of {} in the VarMap",
                varmap.all_vars().len()
            );
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(named, params)
    }

    /// Optimizer over explicitly named vars (names must be unique).
    pub fn new(mut named: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for w in named.windows(2) {
            if w[0].0 == w[1].0 {
                bail!("AdamW: duplicate parameter name {:?}", w[0].0);
            }
        }
        let mut slots = Vec::with_capacity(named.len());
        for (name, var) in named {
            if var.dtype() != DType::F32 {
                bail!(
                    "AdamW: parameter {name:?} has dtype {:?}, expected f32",
                    var.dtype()
                );
            }
            let m = var.as_tensor().zeros_like()?;
            let v = var.as_tensor().zeros_like()?;
            let decay = var.as_tensor().rank() >= 2;
            slots.push(Slot {
                name,
                var,
                m,
                v,
                decay,
            });
        }
        Ok(Self {
            slots,
            params,
            step: 0,
            lr: params.lr,
        })
    }

    /// Names of the optimized parameters, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Current learning rate (set per step by the schedule).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Set the learning rate used by the next updates.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Hyper-parameters.
    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    /// `loss.backward()` then one update; returns the global gradient norm before clipping.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<f64> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// One update from `grads`; parameters without a gradient keep their value and moments.
    /// Returns the global gradient L2 norm (before clipping).
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            bail!("AdamW: gradient norm is {norm} at step {}", self.step + 1);
        }
        let clip = if self.params.grad_clip > 0.0 && norm > self.params.grad_clip {
            self.params.grad_clip / norm
        } else {
            1.0
        };
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
        let lr = self.lr;
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = if clip != 1.0 { (g * clip)? } else { g.clone() };
            let m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let upd = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + p.eps)?)?;
            let theta = s.var.as_tensor();
            let theta = if s.decay && p.weight_decay > 0.0 {
                (theta * (1.0 - lr * p.weight_decay))?
            } else {
                theta.clone()
            };
            let next = (theta - (upd * lr)?)?;
            s.var.set(&next)?;
            s.m = m;
            s.v = v;
        }
        Ok(norm)
    }

    /// Moments as named tensors: `m.<param>` and `v.<param>`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the update counter.
    /// Every optimized parameter must have both moments with its own shape, in f32.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in self.slots.iter_mut() {
            for (key, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let k = format!("{key}.{}", s.name);
                let Some(t) = tensors.get(&k) else {
                    bail!("AdamW state: missing tensor {k:?}");
                };
                if t.dims() != s.var.as_tensor().dims() {
                    bail!(
                        "AdamW state: {k:?} has shape {:?}, expected {:?}",
                        t.dims(),
                        s.var.as_tensor().dims()
                    );
                }
                if t.dtype() != DType::F32 {
                    bail!("AdamW state: {k:?} has dtype {:?}, expected F32", t.dtype());
                }
                *dst = t.to_device(s.var.as_tensor().device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half-cosine from the peak to `min_lr_frac * peak`.
    Cosine,
    /// Straight line from the peak to `min_lr_frac * peak`.
    Linear,
    /// Constant after warmup.
    Constant,
}

/// Linear warmup then decay, as a function of the update index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Number of warmup updates (lr rises linearly from peak/warmup to peak).
    pub warmup: u64,
    /// Total number of updates the schedule spans (decay ends there).
    pub total: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_frac: f64,
    /// Decay shape.
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate for update `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step.saturating_sub(self.warmup)) as f64 / span as f64).min(1.0);
        let lo = self.peak * self.min_frac;
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak + (lo - self.peak) * t,
            Decay::Cosine => lo + 0.5 * (self.peak - lo) * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_shape() {
        let s = Schedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
            min_frac: 0.1,
            decay: Decay::Cosine,
        };
        assert!((s.lr(0) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 1.0).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!(s.lr(9) < 1.0 && s.lr(9) > 0.1);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(9) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimizes_quadratic_and_roundtrips_state() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[3f32, -2.0]], &dev)?)?;
        let mut opt = AdamW::new(
            vec![("x".into(), x.clone())],
            AdamWParams {
                lr: 0.1,
                weight_decay: 0.0,
                grad_clip: 0.0,
                ..Default::default()
            },
        )?;
        for _ in 0..200 {
            let loss = x.as_tensor().sqr()?.sum_all()?;
            opt.backward_step(&loss)?;
        }
        let v = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        let st = opt.state_tensors();
        assert!(st.contains_key("m.x") && st.contains_key("v.x"));
        let mut opt2 = AdamW::new(vec![("x".into(), x.clone())], *opt.params())?;
        opt2.load_state(&st, opt.step_count())?;
        assert_eq!(opt2.step_count(), 200);
        let mut bad = st.clone();
        bad.remove("v.x");
        assert!(opt2.load_state(&bad, 1).is_err());
        // Dtypes are checked like shapes (issue 19, case 5).
        let mut bad = st.clone();
        bad.insert("m.x".into(), st["m.x"].to_dtype(DType::F16)?);
        let e = opt2.load_state(&bad, 1).unwrap_err().to_string();
        assert!(e.contains("m.x") && e.contains("F16"), "{e}");
        Ok(())
    }
}
