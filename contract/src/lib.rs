//! The Carrot contract: what `carrot-export` writes and what any host may rely on.
//!
//! This crate is the single source of truth for graph input/output names and the `carrot.json`
//! manifest (see `contract.md`). The exporter writes it, the runtime and the tests read it.

pub mod manifest;
pub mod names;

pub use manifest::{Manifest, ManifestError};
