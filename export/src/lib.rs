//! Checkpoint reading and ONNX export.
pub mod checkpoint;
pub mod hf_config;
pub mod lora;
pub mod lora_config;
pub mod lora_merge;
pub mod mm_config;
pub mod pipeline;
pub mod preprocessor;
pub mod rope_freq;
pub mod siglip_config;
pub mod siglip_table;
pub mod sink;
pub mod source;
pub mod tensor_dtype;
pub mod torch_bin;
pub mod weight_names;
