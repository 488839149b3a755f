//! The R2ScP model: modality encoders Phi_m, experts E_a/E_v/E_t with stage-I
//! heads, cross-modal retrieval (CMR), CAP purification, router and decoder.
//!
//! Entry points: [`R2scp::new`], [`R2scp::expert_logits`] (stage I),
//! [`R2scp::forward`] / [`R2scp::forward_with`] (stage II and evaluation).
//! Design choices the paper leaves open are in `docs/DESIGN.md` ("Model").
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use r2scp::data::{batches, generate, MissingPolicy, Modality, SyntheticConfig};
//! use r2scp::model::{Banks, ModelConfig, R2scp};
//!
//! let dev = Device::Cpu;
//! let splits = generate(&SyntheticConfig { n_train_clips: 32, n_val_clips: 4, n_test_clips: 8, ..Default::default() })?;
//! let varmap = VarMap::new();
//! let model = R2scp::new(&ModelConfig::default(), &splits.dims(), VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
//! let banks = Banks::from_dataset(&splits.train, &dev)?; // the memory banks: train split only
//! let missing_audio = MissingPolicy::All(Modality::Audio);
//! let batch = batches(&splits.test, 8, None, missing_audio, &dev).next().expect("a test batch")?;
//! let out = model.forward(&batch, &banks, false)?;
//! assert_eq!(out.logits.dims(), [8, splits.dims().n_answers]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod expert;

mod r2scp;
pub mod recovery;

pub use config::{Aggregate, CapAnchor, CapSettings, ModelConfig, RecoveryConfig, RetrievalQuery};
pub use r2scp::{
    is_expert_var, CapTrace, ExpertLogits, ForwardOptions, Output, R2scp, RankTerms,
    RetrievalTrace, EXPERT_PREFIX,
};
pub use recovery::Banks;
