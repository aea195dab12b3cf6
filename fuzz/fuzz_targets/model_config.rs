//! A model's `config.json` (text config, Bunny `mm_*` keys, SigLIP `vision_config`) and a vision
//! tower's `preprocessor_config.json`, of arbitrary bytes.
#![no_main]

use carrot_export::hf_config::{HfModelConfig, parse_json, resolve_text_config};
use carrot_export::mm_config::resolve_mm_keys;
use carrot_export::siglip_config::siglip_from_value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = parse_json::<HfModelConfig>(text, "config.json") {
        let _ = resolve_text_config(&cfg, "config.json");
        let _ = cfg.is_multimodal();
        let _ = cfg.stored_dtype();
        let _ = resolve_mm_keys(&cfg, "config.json");
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = siglip_from_value(&value, "config.json");
        if let Some(vision) = value.get("vision_config") {
            let _ = siglip_from_value(vision, "config.json");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("preprocessor_config.json"), data).expect("write");
    for size in [384, 1] {
        let _ = carrot_export::preprocessor::read(Some(dir.path()), size);
    }
});
