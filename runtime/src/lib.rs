//! Runtime for exported Carrot graphs.

pub mod demo;
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
pub mod serve;
