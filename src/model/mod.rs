//! The R2ScP model: modality encoders Phi_m, experts E_a/E_v/E_t with stage-I
//! heads, cross-modal retrieval (CMR), CAP purification, router and decoder.
//!
//! Entry points: [`R2scp::new`], [`R2scp::expert_logits`] (stage I),
//! [`R2scp::forward`] / [`R2scp::forward_with`] (stage II and evaluation).
//! Design choices the paper leaves open are in `docs/DESIGN.md` ("Model").

pub mod config;
pub mod expert;

mod r2scp;
pub mod recovery;

pub use config::{Aggregate, CapSettings, ModelConfig, RecoveryConfig, RetrievalQuery};
pub use r2scp::{
    is_expert_var, CapTrace, ExpertLogits, ForwardOptions, Output, R2scp, RankTerms,
    RetrievalTrace, EXPERT_PREFIX,
};
pub use recovery::Banks;
