//! Runtime for exported Carrot graphs.

pub mod ort_lib;
pub mod preprocess;
pub mod prompt;
pub mod generate;
pub mod device;
pub mod engine;
pub mod providers;
pub mod pipeline;
pub mod demo;
pub mod serve;
