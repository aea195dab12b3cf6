//! `carrot.json`: the manifest of an exported directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The manifest format this crate writes.
pub const FORMAT: &str = "carrot/1";
/// The major version this crate reads.
pub const FORMAT_MAJOR: u32 = 1;

#[derive(thiserror::Error, Debug)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid Carrot manifest: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error(
        "{path}: manifest format `{found}` is not supported (this build reads carrot/{FORMAT_MAJOR})"
    )]
    Version { path: String, found: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub exporter: Exporter,
    pub source: Source,
    /// `fp32`, `fp16`, `bf16`, `int4` or `int8`.
    pub dtype: String,
    /// `float32`, `float16` or `bfloat16`.
    pub activation_dtype: String,
    /// `portable` or `ort`.
    pub flavor: String,
    /// `concat` or `shared`.
    pub kv_cache: String,
    /// `all` or `last`.
    pub logits: String,
    pub graphs: Graphs,
    pub text: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<Vision>,
    pub prompt: Prompt,
    pub sampling_defaults: SamplingDefaults,
    /// Present when `kv_cache` is `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence: Option<usize>,
    /// Present when `dtype` is `int4` or `int8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
}

/// How a weight-only quantized export stores its matrices: codes of `bits` bits in blocks of
/// `block_size` consecutive input features, each block with a float32 scale and an unsigned zero
/// point (`w = (q − z) · s`, ONNX `DequantizeLinear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    /// 4 or 8.
    pub bits: u32,
    pub block_size: usize,
    /// What is quantized: `decoder_linears`, `lm_head`, `embed_tokens`.
    pub weights: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exporter {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub model: String,
    #[serde(default)]
    pub lora: Vec<String>,
    pub dtype_in: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graphs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<String>,
    pub embed: String,
    pub decoder: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Text {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vision {
    pub image_size: usize,
    pub num_image_tokens: usize,
    /// `pad` or anything else (no padding).
    pub image_aspect_ratio: String,
    pub pad_color: [u8; 3],
    /// `bicubic`.
    pub resample: String,
    pub rescale: f64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// `bunny-llama`, `chat-template` or `raw`.
    pub template: String,
    pub image_token: String,
    pub image_token_index: i64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub max_length: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    pub temperature: f64,
    pub top_p: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
}

impl Manifest {
    /// Read and validate `DIR/carrot.json`.
    pub fn read_dir(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(crate::names::MANIFEST_FILE);
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parse and validate manifest text; `path` is only used in messages.
    pub fn parse(text: &str, path: &str) -> Result<Manifest, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ManifestError::Parse {
                path: path.into(),
                source,
            })?;
        let format = value
            .get("format")
            .and_then(|f| f.as_str())
            .unwrap_or("")
            .to_string();
        let major = format
            .strip_prefix("carrot/")
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok());
        if major != Some(FORMAT_MAJOR) {
            return Err(ManifestError::Version {
                path: path.into(),
                found: format,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|source| ManifestError::Parse {
                path: path.into(),
                source,
            })?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    fn validate(&self, path: &str) -> Result<(), ManifestError> {
        let invalid = |reason: String| {
            Err(ManifestError::Invalid {
                path: path.into(),
                reason,
            })
        };
        if !matches!(
            self.activation_dtype.as_str(),
            "float32" | "float16" | "bfloat16"
        ) {
            return invalid(format!(
                "unknown activation_dtype `{}`",
                self.activation_dtype
            ));
        }
        if !matches!(self.kv_cache.as_str(), "concat" | "shared") {
            return invalid(format!("unknown kv_cache `{}`", self.kv_cache));
        }
        if self.kv_cache == "shared" && self.max_sequence.is_none() {
            return invalid("kv_cache `shared` needs max_sequence".into());
        }
        if !matches!(self.logits.as_str(), "all" | "last") {
            return invalid(format!("unknown logits `{}`", self.logits));
        }
        if !matches!(
            self.prompt.template.as_str(),
            "bunny-llama" | "chat-template" | "raw"
        ) {
            return invalid(format!(
                "unknown prompt.template `{}`",
                self.prompt.template
            ));
        }
        if self.vision.is_some() != self.graphs.vision.is_some() {
            return invalid(
                "`vision` and `graphs.vision` must be both present or both absent".into(),
            );
        }
        let t = &self.text;
        let mut sizes = vec![
            ("text.hidden_size", t.hidden_size),
            ("text.num_layers", t.num_layers),
            ("text.num_attention_heads", t.num_attention_heads),
            ("text.num_kv_heads", t.num_kv_heads),
            ("text.head_dim", t.head_dim),
            ("text.vocab_size", t.vocab_size),
            ("text.max_position_embeddings", t.max_position_embeddings),
            ("prompt.max_length", self.prompt.max_length),
        ];
        if let Some(v) = &self.vision {
            sizes.push(("vision.image_size", v.image_size));
            sizes.push(("vision.num_image_tokens", v.num_image_tokens));
        }
        if let Some(n) = self.max_sequence {
            sizes.push(("max_sequence", n));
        }
        if let Some((key, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return invalid(format!("{key} is 0"));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_kv_heads) {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_kv_heads {}",
                t.num_attention_heads, t.num_kv_heads
            ));
        }
        if let Some(v) = &self.vision
            && !(v.rescale.is_finite() && v.std.iter().all(|s| s.is_finite() && *s != 0.0))
        {
            return invalid("vision.rescale and vision.std must be finite, std non-zero".into());
        }
        if let Some(q) = &self.quantization
            && (!matches!(q.bits, 4 | 8) || q.block_size == 0)
        {
            return invalid(format!(
                "quantization: bits {} (4 or 8) and block_size {} (positive) are not usable",
                q.bits, q.block_size
            ));
        }
        Ok(())
    }

    /// Serialise with stable key order and a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "format": "carrot/1",
      "exporter": {"name": "carrot-export", "version": "0.1.0"},
      "source": {"model": "m", "lora": [], "dtype_in": "float16"},
      "dtype": "fp16", "activation_dtype": "float16",
      "flavor": "portable", "kv_cache": "concat", "logits": "all",
      "graphs": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
      "text": {"hidden_size": 4096, "num_layers": 32, "num_attention_heads": 32, "num_kv_heads": 8,
               "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072},
      "vision": {"image_size": 384, "num_image_tokens": 729, "image_aspect_ratio": "pad",
                 "pad_color": [127,127,127], "resample": "bicubic", "rescale": 0.00392156862745098,
                 "mean": [0.5,0.5,0.5], "std": [0.5,0.5,0.5]},
      "prompt": {"template": "bunny-llama", "image_token": "<image>",
                 "image_token_index": -200, "bos_token_id": 128000, "eos_token_ids": [128001,128008,128009],
                 "max_length": 2048},
      "sampling_defaults": {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512},
      "future_key": {"ignored": true}
    }"#;

    #[test]
    fn contract_example_parses_and_round_trips() {
        let m = Manifest::parse(EXAMPLE, "carrot.json").expect("example manifest");
        assert_eq!(m.text.num_kv_heads, 8);
        assert_eq!(m.vision.as_ref().map(|v| v.num_image_tokens), Some(729));
        let again = Manifest::parse(&m.to_json(), "again").expect("round trip");
        assert_eq!(again, m);
    }

    #[test]
    fn unknown_major_version_is_refused_with_both_versions() {
        let text = EXAMPLE.replace("carrot/1", "carrot/2");
        let err = Manifest::parse(&text, "x/carrot.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("carrot/2") && err.contains("carrot/1") && err.contains("x/carrot.json"),
            "{err}"
        );
    }

    #[test]
    fn zero_sizes_are_refused_naming_the_key() {
        for (from, to, key) in [
            (
                r#""image_size": 384"#,
                r#""image_size": 0"#,
                "vision.image_size",
            ),
            (
                r#""hidden_size": 4096"#,
                r#""hidden_size": 0"#,
                "text.hidden_size",
            ),
            (
                r#""num_kv_heads": 8"#,
                r#""num_kv_heads": 0"#,
                "text.num_kv_heads",
            ),
            (
                r#""max_length": 2048"#,
                r#""max_length": 0"#,
                "prompt.max_length",
            ),
        ] {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "{from} is in the example");
            let err = Manifest::parse(&text, "m/carrot.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("m/carrot.json"), "{err}");
        }
    }

    #[test]
    fn inconsistent_vision_is_refused() {
        let text = EXAMPLE.replace(r#""vision": "vision.onnx", "#, "");
        let err = Manifest::parse(&text, "m").unwrap_err().to_string();
        assert!(err.contains("graphs.vision"), "{err}");
    }
}
