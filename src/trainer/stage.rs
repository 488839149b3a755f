//! [`Stage`]: the two training stages (paper section 3.5).
//!
//! On disk (`state.json`, `metrics.jsonl`) a stage is its number, `1` or `2`, and a
//! metrics line that belongs to no stage (the final test) has `0`: files written before the
//! enum existed load unchanged. Imports nothing from the rest of the crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Stage {
    /// Stage I: modality-specific expert pre-training, each expert with its own head.
    Experts = 1,
    /// Stage II: expert mixing; router, CMR/CAP parts and decoder trained, experts frozen.
    Mixing = 2,
}

impl Stage {
    /// Both stages in training order.
    pub const ALL: [Stage; 2] = [Stage::Experts, Stage::Mixing];

    /// The paper's stage number, 1 or 2 (the on-disk form).
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl From<Stage> for u8 {
    fn from(s: Stage) -> u8 {
        s.number()
    }
}

impl TryFrom<u8> for Stage {
    type Error = String;

    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(Stage::Experts),
            2 => Ok(Stage::Mixing),
            other => Err(format!("stage {other}: expected 1 or 2")),
        }
    }
}

/// `stage I` / `stage II`, as the progress lines print it.
impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Experts => "stage I",
            Stage::Mixing => "stage II",
        })
    }
}

/// Serde for an `Option<Stage>` stored as a number: `None` is `0`, a stage its number
/// (the `stage` field of a metrics line; the final test belongs to no stage).
pub mod number_or_zero {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Stage;

    /// Writes `0` for `None`, else the stage number.
    pub fn serialize<S: Serializer>(stage: &Option<Stage>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(stage.map_or(0, Stage::number))
    }

    /// Reads `0` as `None` and `1` / `2` as the stage; any other number is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Stage>, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(None),
            n => Stage::try_from(n)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_disk_form_is_the_stage_number() {
        assert_eq!(serde_json::to_string(&Stage::Experts).unwrap(), "1");
        assert_eq!(serde_json::to_string(&Stage::Mixing).unwrap(), "2");
        assert_eq!(serde_json::from_str::<Stage>("2").unwrap(), Stage::Mixing);
        let e = serde_json::from_str::<Stage>("3").unwrap_err().to_string();
        assert!(e.contains("stage 3: expected 1 or 2"), "{e}");
        assert!(Stage::Experts < Stage::Mixing);
        assert_eq!(Stage::Mixing.to_string(), "stage II");
    }
}
