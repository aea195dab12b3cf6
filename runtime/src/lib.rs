//! Runtime for exported Carrot graphs: ONNX Runtime sessions with the KV cache kept where they run,
//! SigLIP preprocessing, Bunny prompts, generation and perplexity. The `carrot` command is the
//! `carrot` crate.

pub mod device;
pub mod engine;
pub mod generate;
mod host_rows;
pub mod kv_shared;
pub mod memory;
pub mod ort_lib;
pub mod perplexity;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod providers;
