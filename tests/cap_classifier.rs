//! CAP in a classifier (the noisy-token task of `examples/cap_classifier.rs`): with the
//! default settings, the rows CAP's phase 1 picks after training hit the foreign tokens
//! at least 70% of the time (chance 50%), no less than at initialisation.

#[path = "../examples/cap_classifier.rs"]
#[allow(dead_code)]
mod example;

use candle_core::Device;
use example::{run_task, TaskOptions};

#[test]
fn cap_finds_the_foreign_tokens_with_default_settings() -> anyhow::Result<()> {
    let r = run_task(&TaskOptions::default(), &Device::Cpu)?;
    println!("{r:?}");
    assert!(
        r.trained.hit_share >= 0.70,
        "trained hit share {:.3} < 0.70",
        r.trained.hit_share
    );
    assert!(
        r.trained.hit_share >= r.init.hit_share - 0.02,
        "training lowered the hit share: {:.3} -> {:.3}",
        r.init.hit_share,
        r.trained.hit_share
    );
    assert!(
        r.trained.accuracy > r.init.accuracy + 0.2,
        "the classifier did not learn: accuracy {:.3} -> {:.3}",
        r.init.accuracy,
        r.trained.accuracy
    );
    Ok(())
}
