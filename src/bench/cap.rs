//! `r2scp bench cap`: each fused CAP op and the whole `CapLayer` forward vs the reference
//! composition, one side-by-side table (implemented in [`crate::cap::bench`]).

pub use crate::cap::bench::{run, Args};
