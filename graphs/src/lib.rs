//! Pure ONNX graph construction for Carrot: SigLIP, the projector and the Llama decoder.
//!
//! Nothing here opens a file or talks to ONNX Runtime. Weights arrive through
//! [`weights::WeightSource`]; large initializers leave through the external-data sink given to
//! the builder.

pub mod builder;
pub mod config;
mod eager_attention;
pub mod external;
pub mod gqa;
pub mod llama;
pub mod nn;
pub mod onnx;
pub mod projector;
pub mod quant;
pub mod siglip;
pub mod vision;
pub mod weights;
