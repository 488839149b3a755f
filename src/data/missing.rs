//! Missing-modality simulation.
//!
//! Training uses a seeded per-sample mask ([`MissingSim`]: rate eta and a [`MissingType`]);
//! evaluation uses a fixed setting ([`MissingPolicy::Complete`] or [`MissingPolicy::All`]).
//!
//! The decision for a sample depends only on `(seed, question row)` through a SplitMix64 hash, so
//! it is the same whatever the batch size, shuffle order or device, and every epoch sees the same
//! mask for a given seed (pass a different seed, e.g. `seed + epoch`, for a fresh mask per epoch).

use crate::error::bail;
use candle_core::Result;
use serde::{Deserialize, Serialize};

use super::{Missing, MissingType, Modality};

/// Seeded per-sample missing-modality simulation.
///
/// A sample is dropped with probability `rate`; a dropped sample loses the modality named by
/// `kind` (for [`MissingType::Mixed`]: audio or visual with probability 1/2 each, decided by a
/// second independent hash draw).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MissingSim {
    /// Probability eta in `[0, 1]` that a sample has a missing modality.
    pub rate: f32,
    /// Which modality goes missing.
    pub kind: MissingType,
    /// Seed of the per-sample hash.
    pub seed: u64,
}

impl MissingSim {
    /// Check `rate` is finite and in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && (0.0..=1.0).contains(&self.rate)) {
            bail!(
                "MissingSim: rate = {} is outside [0, 1] (the missing rate eta)",
                self.rate
            );
        }
        Ok(())
    }

    /// The decision for question row `row` (deterministic in `(seed, row)`).
    pub fn decide(&self, row: usize) -> Missing {
        let h = splitmix64(self.seed ^ splitmix64(row as u64 ^ 0x6d69_7373_696e_6721));
        if unit(h) >= f64::from(self.rate) {
            return Missing::None;
        }
        match self.kind {
            MissingType::Audio => Missing::Audio,
            MissingType::Visual => Missing::Visual,
            MissingType::Mixed => {
                if unit(splitmix64(h)) < 0.5 {
                    Missing::Audio
                } else {
                    Missing::Visual
                }
            }
        }
    }
}

/// How the missing modality of each sample of a batch is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// Every sample complete (evaluation setting "complete").
    Complete,
    /// That modality missing for every sample (evaluation settings "missing audio"/"missing visual").
    All(Modality),
    /// Seeded per-sample simulation (training).
    Simulated(MissingSim),
}

impl MissingPolicy {
    /// The three evaluation settings of the paper's Table 1, in table order:
    /// missing audio, missing visual, complete.
    pub const EVAL_SETTINGS: [MissingPolicy; 3] = [
        MissingPolicy::All(Modality::Audio),
        MissingPolicy::All(Modality::Visual),
        MissingPolicy::Complete,
    ];

    /// Decision for question row `row`.
    pub fn decide(&self, row: usize) -> Missing {
        match self {
            MissingPolicy::Complete => Missing::None,
            MissingPolicy::All(m) => Missing::from(*m),
            MissingPolicy::Simulated(sim) => sim.decide(row),
        }
    }

    /// Check the parameters (the rate of a simulation).
    pub fn validate(&self) -> Result<()> {
        match self {
            MissingPolicy::Simulated(sim) => sim.validate(),
            _ => Ok(()),
        }
    }

    /// Short name: `"complete"`, `"missing-audio"`, `"missing-visual"`, or
    /// `"sim-<kind>-<rate>"`.
    pub fn name(&self) -> String {
        match self {
            MissingPolicy::Complete => "complete".to_string(),
            MissingPolicy::All(m) => format!("missing-{}", m.as_str()),
            MissingPolicy::Simulated(s) => format!("sim-{}-{}", s.kind.as_str(), s.rate),
        }
    }
}

/// SplitMix64 finaliser (Steele et al.), a fixed bijective mix of a 64-bit value.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Top 53 bits of `h` as a uniform value in `[0, 1)`.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_mixed_split_are_close_to_nominal() {
        for (rate, kind) in [
            (0.3, MissingType::Audio),
            (0.5, MissingType::Visual),
            (0.7, MissingType::Mixed),
        ] {
            let sim = MissingSim {
                rate,
                kind,
                seed: 11,
            };
            let n = 20_000;
            let d: Vec<Missing> = (0..n).map(|r| sim.decide(r)).collect();
            let miss = d.iter().filter(|m| **m != Missing::None).count() as f32 / n as f32;
            assert!(
                (miss - rate).abs() < 0.02,
                "{kind:?}: rate {miss} vs {rate}"
            );
            let audio = d.iter().filter(|m| **m == Missing::Audio).count();
            let visual = d.iter().filter(|m| **m == Missing::Visual).count();
            match kind {
                MissingType::Audio => assert_eq!(visual, 0),
                MissingType::Visual => assert_eq!(audio, 0),
                MissingType::Mixed => {
                    let frac = audio as f32 / (audio + visual) as f32;
                    assert!((frac - 0.5).abs() < 0.03, "mixed audio share {frac}");
                }
            }
        }
    }

    #[test]
    fn decisions_depend_on_seed_and_row_only() {
        let a = MissingSim {
            rate: 0.5,
            kind: MissingType::Mixed,
            seed: 1,
        };
        let b = MissingSim { seed: 2, ..a };
        let da: Vec<_> = (0..200).map(|r| a.decide(r)).collect();
        let da2: Vec<_> = (0..200).map(|r| a.decide(r)).collect();
        let db: Vec<_> = (0..200).map(|r| b.decide(r)).collect();
        assert_eq!(da, da2);
        assert_ne!(da, db);
        assert!(MissingSim { rate: 0.0, ..a }.decide(7) == Missing::None);
        assert!(
            MissingSim {
                rate: 1.0,
                kind: MissingType::Audio,
                seed: 3
            }
            .decide(7)
                == Missing::Audio
        );
    }

    #[test]
    fn invalid_rate_is_an_error_naming_it() {
        let e = MissingPolicy::Simulated(MissingSim {
            rate: 1.5,
            kind: MissingType::Audio,
            seed: 0,
        })
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("1.5"), "{e}");
        assert!(MissingPolicy::Simulated(MissingSim {
            rate: f32::NAN,
            kind: MissingType::Audio,
            seed: 0
        })
        .validate()
        .is_err());
    }
}
