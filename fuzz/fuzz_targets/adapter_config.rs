//! A LoRA `adapter_config.json` of arbitrary bytes: resolved, then queried per module.
#![no_main]

use std::path::Path;

use carrot_export::hf_config::parse_json;
use carrot_export::lora_config::{HfAdapterConfig, LoraConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = parse_json::<HfAdapterConfig>(text, "adapter_config.json") else {
        return;
    };
    let Ok(cfg) = LoraConfig::resolve(&raw, Path::new("adapter_config.json")) else {
        return;
    };
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.31.mlp.down_proj",
        "q_proj",
        "",
    ] {
        let _ = cfg.rank(module);
        let _ = cfg.alpha(module);
        let _ = cfg.scaling(module);
    }
});
