//! Checkpoint reading and ONNX export.
pub mod torch_bin;
pub mod checkpoint;
pub mod hf_config;
pub mod lora;
pub mod mm_config;
pub mod rope_freq;
pub mod siglip_table;
pub mod source;
pub mod weight_names;
pub mod pipeline;
