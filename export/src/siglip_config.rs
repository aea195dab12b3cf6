//! SigLIP vision configs: a `SiglipModel` config (its `vision_config`), a `SiglipVisionModel`
//! config, or a bare `vision_config` object, with `SiglipVisionConfig`'s defaults
//! (transformers `models/siglip/configuration_siglip.py`).

use carrot_graphs::config::Activation;
use serde::Deserialize;
use serde_json::Value;

use crate::hf_config::ConfigError;

/// `SiglipVisionConfig` (the `vision_config` of a `SiglipModel`, or a `SiglipVisionModel` config).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfSiglipVisionConfig {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_channels: Option<usize>,
    pub image_size: Option<Value>,
    pub patch_size: Option<Value>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
    pub vision_config: Option<Value>,
}

fn square_size(
    value: &Option<Value>,
    default: usize,
    file: &str,
    key: &str,
) -> Result<usize, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            file,
            format!("`{key}` must be a positive integer or a square [n, n]"),
        )
    };
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .ok_or_else(bad),
        Some(Value::Array(items)) => {
            let dims: Vec<u64> = items.iter().filter_map(Value::as_u64).collect();
            match dims.as_slice() {
                [h, w] if h == w && *h > 0 && items.len() == 2 => Ok(*h as usize),
                [h, w] if items.len() == 2 => Err(ConfigError::unsupported(
                    file,
                    format!("non-square `{key}` {h}x{w}"),
                )),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// Maps a transformers `hidden_act` name onto a graph activation.
pub fn activation(name: &str, file: &str) -> Result<Activation, ConfigError> {
    match name {
        "gelu_pytorch_tanh" | "gelu_python_tanh" | "gelu_new" | "gelu_fast" => {
            Ok(Activation::GeluTanh)
        }
        "gelu" | "gelu_python" => Ok(Activation::GeluErf),
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => Err(ConfigError::unsupported(
            file,
            format!("vision hidden_act `{other}`"),
        )),
    }
}

/// The SigLIP vision hyper-parameters, before the feature layer is chosen.
pub type SiglipParams = carrot_graphs::config::SiglipTower;

/// Parses a SigLIP config: a `SiglipModel` config (uses its `vision_config`), a
/// `SiglipVisionModel` config, or a bare `vision_config` object. Missing keys take
/// `SiglipVisionConfig`'s defaults, as the published configs rely on them.
pub fn siglip_from_value(value: &Value, file: &str) -> Result<SiglipParams, ConfigError> {
    let raw: HfSiglipVisionConfig = serde_json::from_value(value.clone())
        .map_err(|e| ConfigError::invalid(file, e.to_string()))?;
    if let Some(inner) = &raw.vision_config {
        if raw
            .model_type
            .as_deref()
            .is_some_and(|t| t == "siglip_vision_model")
        {
            return Err(ConfigError::invalid(
                file,
                "a siglip_vision_model config holding a vision_config",
            ));
        }
        return siglip_from_value(inner, file);
    }
    if let Some(t) = raw.model_type.as_deref()
        && !matches!(t, "siglip_vision_model" | "siglip")
    {
        return Err(ConfigError::unsupported(
            file,
            format!("vision tower model_type `{t}` (only SigLIP is)"),
        ));
    }
    let params = SiglipParams {
        hidden_size: raw.hidden_size.unwrap_or(768),
        intermediate_size: raw.intermediate_size.unwrap_or(3072),
        num_layers: raw.num_hidden_layers.unwrap_or(12),
        num_attention_heads: raw.num_attention_heads.unwrap_or(12),
        num_channels: raw.num_channels.unwrap_or(3),
        image_size: square_size(&raw.image_size, 224, file, "image_size")?,
        patch_size: square_size(&raw.patch_size, 16, file, "patch_size")?,
        layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-6),
        activation: activation(
            raw.hidden_act.as_deref().unwrap_or("gelu_pytorch_tanh"),
            file,
        )?,
    };
    if !params
        .hidden_size
        .is_multiple_of(params.num_attention_heads)
    {
        return Err(ConfigError::invalid(
            file,
            format!(
                "vision hidden_size ({}) is not a multiple of num_attention_heads ({})",
                params.hidden_size, params.num_attention_heads
            ),
        ));
    }
    if params.patch_size > params.image_size {
        return Err(ConfigError::invalid(
            file,
            "vision patch_size is larger than image_size",
        ));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siglip_activation_and_image_size() {
        let v = serde_json::json!({"hidden_act": "quick_gelu", "image_size": [56, 56], "patch_size": 14,
            "hidden_size": 16, "num_attention_heads": 2});
        let p = siglip_from_value(&v, "c").expect("params");
        assert_eq!((p.activation, p.image_size), (Activation::QuickGelu, 56));
        let v = serde_json::json!({"image_size": [56, 28]});
        assert!(
            siglip_from_value(&v, "c")
                .expect_err("non-square")
                .to_string()
                .contains("non-square")
        );
        let v = serde_json::json!({"hidden_act": "relu"});
        assert!(siglip_from_value(&v, "c").is_err());
        let v = serde_json::json!({"model_type": "clip_vision_model"});
        assert!(
            siglip_from_value(&v, "c")
                .expect_err("clip")
                .to_string()
                .contains("only SigLIP")
        );
    }
}
