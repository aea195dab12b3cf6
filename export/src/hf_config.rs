//! Serde mirrors of Hugging Face `config.json` / `generation_config.json`, resolved once into the
//! `Option`-free configs of [`carrot_graphs::config`].
//!
//! Mirrors `LlamaConfig` (transformers `models/llama/configuration_llama.py`, both the
//! transformers 4 `rope_theta` + `rope_scaling` layout and the transformers 5 `rope_parameters`
//! layout), Bunny's `mm_*` keys (`bunny/model/multimodal_projector/builder.py`) and
//! `SiglipVisionConfig` (`models/siglip/configuration_siglip.py`).

use std::path::Path;

use carrot_graphs::config::{Llama3RopeScaling, RopeConfig, TextConfig};
use serde::Deserialize;
use serde_json::Value;

/// A config file that could not be read or is not usable; the message names the file.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: invalid JSON: {source}")]
    Json {
        file: String,
        source: serde_json::Error,
    },
    #[error("{file}: missing `{key}`")]
    Missing { file: String, key: &'static str },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: {what} is not supported{hint}")]
    Unsupported {
        file: String,
        what: String,
        hint: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(file: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(file: &str, what: impl Into<String>) -> Self {
        ConfigError::Unsupported {
            file: file.to_string(),
            what: what.into(),
            hint: String::new(),
        }
    }
}

/// Reads and parses a JSON file into `T`, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    parse_json(&text, &file)
}

/// Parses JSON text into `T`; `file` is only used in error messages.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|source| ConfigError::Json {
        file: file.to_string(),
        source,
    })
}

/// A token id field that is either one integer or a list (`eos_token_id: 128001` or `[…]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }

    pub fn first(&self) -> Option<i64> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfRopeParameters {
    pub rope_type: Option<String>,
    /// transformers < 4.45 spelled `rope_type` as `type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
}

/// The keys of a Carrot / Bunny / Llama `config.json` that the converter reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfModelConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub hidden_act: Option<String>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<HfRopeParameters>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub torch_dtype: Option<String>,
    /// transformers 5 renamed `torch_dtype` to `dtype`.
    pub dtype: Option<String>,

    // Bunny multimodal keys.
    pub mm_vision_tower: Option<String>,
    pub mm_projector_type: Option<String>,
    pub mm_hidden_size: Option<usize>,
    pub mm_vision_select_layer: Option<i64>,
    pub mm_vision_select_feature: Option<String>,
    pub image_aspect_ratio: Option<String>,
    pub tokenizer_model_max_length: Option<usize>,
    pub use_s2: Option<bool>,
    pub vision_config: Option<Value>,
}

impl HfModelConfig {
    /// Whether this config describes a Bunny-style vision-language model.
    pub fn is_multimodal(&self) -> bool {
        self.mm_vision_tower.is_some()
            || self.mm_projector_type.is_some()
            || self.mm_hidden_size.is_some()
    }

    /// The checkpoint's stored dtype as named in the config (`float16`, `bfloat16`, …).
    pub fn stored_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }
}

/// `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfGenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
}

/// Sampling defaults and special ids, from `generation_config.json` with `config.json` as fallback.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
}

impl GenerationDefaults {
    /// Merges `generation_config.json` (if any) over the ids in `config.json`.
    pub fn resolve(model: &HfModelConfig, generation: Option<&HfGenerationConfig>) -> Self {
        let g = generation.cloned().unwrap_or_default();
        let eos = g.eos_token_id.as_ref().or(model.eos_token_id.as_ref());
        let bos = g.bos_token_id.as_ref().or(model.bos_token_id.as_ref());
        GenerationDefaults {
            do_sample: g.do_sample,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            bos_token_id: bos.and_then(TokenIds::first),
            eos_token_ids: eos.map(TokenIds::to_vec).unwrap_or_default(),
            max_new_tokens: g.max_new_tokens,
            max_length: g.max_length,
        }
    }
}

fn require(value: Option<usize>, file: &str, key: &'static str) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::invalid(
            file,
            format!("`{key}` must be positive"),
        )),
        Some(v) => Ok(v),
        None => Err(ConfigError::Missing {
            file: file.to_string(),
            key,
        }),
    }
}

/// Resolves the Llama part of a `config.json`, as `LlamaConfig.__post_init__` does.
pub fn resolve_text_config(cfg: &HfModelConfig, file: &str) -> Result<TextConfig, ConfigError> {
    if let Some(act) = cfg.hidden_act.as_deref()
        && act != "silu"
        && act != "swish"
    {
        return Err(ConfigError::unsupported(
            file,
            format!("hidden_act `{act}` (the Llama MLP uses silu)"),
        ));
    }
    let hidden_size = require(cfg.hidden_size, file, "hidden_size")?;
    let num_attention_heads = require(cfg.num_attention_heads, file, "num_attention_heads")?;
    let num_kv_heads = match cfg.num_key_value_heads {
        None => num_attention_heads,
        Some(n) => require(Some(n), file, "num_key_value_heads")?,
    };
    if !num_attention_heads.is_multiple_of(num_kv_heads) {
        return Err(ConfigError::invalid(
            file,
            format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            ),
        ));
    }
    let head_dim = match cfg.head_dim {
        Some(d) => require(Some(d), file, "head_dim")?,
        None => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                return Err(ConfigError::invalid(
                    file,
                    format!(
                        "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"
                    ),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(ConfigError::invalid(
            file,
            format!("head_dim ({head_dim}) must be even for RoPE"),
        ));
    }
    let max_position_embeddings = cfg.max_position_embeddings.unwrap_or(2048);
    Ok(TextConfig {
        hidden_size,
        intermediate_size: require(cfg.intermediate_size, file, "intermediate_size")?,
        num_layers: require(cfg.num_hidden_layers, file, "num_hidden_layers")?,
        num_attention_heads,
        num_kv_heads,
        head_dim,
        vocab_size: require(cfg.vocab_size, file, "vocab_size")?,
        rms_norm_eps: cfg.rms_norm_eps.unwrap_or(1e-6),
        rope: resolve_rope(cfg, max_position_embeddings, file)?,
        max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
        attention_bias: cfg.attention_bias.unwrap_or(false),
        mlp_bias: cfg.mlp_bias.unwrap_or(false),
    })
}

/// transformers' default `rope_theta` when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// Resolves RoPE the way transformers 5 `convert_rope_params_to_dict` + `standardize_rope_params`
/// do: `rope_scaling` wins over `rope_parameters`; `rope_theta` inside the dict wins over the
/// top-level key; `type` is the old spelling of `rope_type`.
fn resolve_rope(
    cfg: &HfModelConfig,
    max_position_embeddings: usize,
    file: &str,
) -> Result<RopeConfig, ConfigError> {
    let params = match (&cfg.rope_scaling, &cfg.rope_parameters) {
        (Some(scaling), _) => scaling.clone(),
        (None, None) | (None, Some(Value::Null)) => HfRopeParameters::default(),
        (None, Some(value)) => {
            if value.get("rope_type").is_none()
                && value.get("type").is_none()
                && value.get("rope_theta").is_none()
            {
                let keys: Vec<&str> = value
                    .as_object()
                    .map(|m| m.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(ConfigError::unsupported(
                    file,
                    format!("per-layer-type `rope_parameters` ({})", keys.join(", ")),
                ));
            }
            serde_json::from_value(value.clone())
                .map_err(|e| ConfigError::invalid(file, format!("`rope_parameters`: {e}")))?
        }
    };
    let theta = params
        .rope_theta
        .or(cfg.rope_theta)
        .unwrap_or(DEFAULT_ROPE_THETA);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ConfigError::invalid(
            file,
            format!("rope_theta must be positive, got {theta}"),
        ));
    }
    if let Some(p) = params.partial_rotary_factor.or(cfg.partial_rotary_factor)
        && p != 1.0
    {
        return Err(ConfigError::unsupported(
            file,
            format!("partial_rotary_factor {p}"),
        ));
    }
    let rope_type = params
        .rope_type
        .as_deref()
        .or(params.legacy_type.as_deref())
        .unwrap_or("default");
    let llama3 = match rope_type {
        "default" => None,
        "llama3" => {
            let get = |v: Option<f64>, key: &'static str| {
                v.ok_or_else(|| {
                    ConfigError::invalid(file, format!("llama3 RoPE scaling needs `{key}`"))
                })
            };
            let scaling = Llama3RopeScaling {
                factor: get(params.factor, "factor")?,
                low_freq_factor: get(params.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: get(params.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: params
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings as f64),
            };
            if scaling.high_freq_factor == scaling.low_freq_factor {
                return Err(ConfigError::invalid(
                    file,
                    "llama3 RoPE scaling needs high_freq_factor != low_freq_factor",
                ));
            }
            Some(scaling)
        }
        other => {
            return Err(ConfigError::Unsupported {
                file: file.to_string(),
                what: format!("RoPE type `{other}`"),
                hint: " (only default and llama3 RoPE are)".to_string(),
            });
        }
    };
    Ok(RopeConfig { theta, llama3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &str) -> Result<TextConfig, ConfigError> {
        resolve_text_config(&parse_json(json, "config.json")?, "config.json")
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn defaults_follow_llama_config() {
        let t = text(&format!("{{{BASE}}}")).expect("minimal");
        assert_eq!((t.head_dim, t.num_kv_heads), (16, 4));
        assert_eq!(
            t.rope,
            RopeConfig {
                theta: 10_000.0,
                llama3: None
            }
        );
        assert_eq!((t.rms_norm_eps, t.max_position_embeddings), (1e-6, 2048));
        assert!(!t.tie_word_embeddings && !t.attention_bias && !t.mlp_bias);
        let t = text(&format!(
            r#"{{{BASE}, "head_dim": 32, "num_key_value_heads": 2, "attention_bias": true}}"#
        ))
        .expect("explicit");
        assert_eq!(
            (t.head_dim, t.num_kv_heads, t.attention_bias),
            (32, 2, true)
        );
    }

    #[test]
    fn both_rope_layouts_resolve_alike() {
        let v4 = text(&format!(
            r#"{{{BASE}, "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {{"type": "llama3",
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .expect("v4");
        let v5 = text(&format!(
            r#"{{{BASE}, "max_position_embeddings": 131072, "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0,
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .expect("v5");
        assert_eq!(v4.rope, v5.rope);
        let scaling = v5.rope.llama3.expect("llama3");
        assert_eq!(
            (
                v5.rope.theta,
                scaling.factor,
                scaling.original_max_position_embeddings
            ),
            (500000.0, 8.0, 8192.0)
        );
        let plain = text(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_type": "default", "rope_theta": 1e6}}}}"#
        ))
        .expect("default");
        assert_eq!(
            plain.rope,
            RopeConfig {
                theta: 1e6,
                llama3: None
            }
        );
        let null = text(&format!(
            r#"{{{BASE}, "rope_theta": 5e5, "rope_scaling": null}}"#
        ))
        .expect("null scaling");
        assert_eq!(
            null.rope,
            RopeConfig {
                theta: 5e5,
                llama3: None
            }
        );
    }

    #[test]
    fn unknown_rope_types_are_refused() {
        for kind in ["yarn", "dynamic", "linear", "longrope"] {
            let err = text(&format!(
                r#"{{{BASE}, "rope_scaling": {{"rope_type": "{kind}", "factor": 2.0}}}}"#
            ))
            .expect_err(kind)
            .to_string();
            assert!(
                err.contains(&format!("RoPE type `{kind}` is not supported")),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_and_inconsistent_keys() {
        let err = text(r#"{"hidden_size": 64}"#)
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("config.json: missing `num_attention_heads`"),
            "{err}"
        );
        let err = text(&format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#))
            .expect_err("gqa")
            .to_string();
        assert!(
            err.contains("not a multiple of num_key_value_heads"),
            "{err}"
        );
        let err = text(&format!(r#"{{{BASE}, "hidden_act": "gelu"}}"#))
            .expect_err("act")
            .to_string();
        assert!(err.contains("hidden_act `gelu`"), "{err}");
    }

    #[test]
    fn token_ids_and_generation_defaults() {
        let model: HfModelConfig =
            parse_json(r#"{"bos_token_id": 1, "eos_token_id": [2, 3]}"#, "c").expect("model");
        let generation: HfGenerationConfig = parse_json(
            r#"{"temperature": 0.2, "top_p": 0.9, "eos_token_id": 7, "max_new_tokens": 512}"#,
            "g",
        )
        .expect("gen");
        let d = GenerationDefaults::resolve(&model, Some(&generation));
        assert_eq!(
            (d.bos_token_id, d.eos_token_ids.as_slice()),
            (Some(1), &[7][..])
        );
        assert_eq!(
            (d.temperature, d.top_p, d.max_new_tokens),
            (Some(0.2), Some(0.9), Some(512))
        );
        let d = GenerationDefaults::resolve(&model, None);
        assert_eq!(d.eos_token_ids, vec![2, 3]);
    }
}
