//! Bunny's multimodal keys (`mm_*`, `image_aspect_ratio`, `tokenizer_model_max_length`),
//! resolved against the vision and text configs.
//!
//! Mirrors `bunny/model/multimodal_projector/builder.py` (`mm_projector_type`) and Bunny's
//! `image_aspect_ratio == "pad"` handling in its image processing.

use std::fmt;

use carrot_graphs::config::{ProjectorConfig, TextConfig, VisionConfig};

use crate::hf_config::{ConfigError, HfModelConfig};
use crate::siglip_config::SiglipParams;

/// How Bunny prepares an image before resizing (`image_aspect_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageAspectRatio {
    /// `"pad"`: pad to a square with the mean colour, then resize.
    Pad,
    /// Anything else (Bunny's default is `"square"`): resize directly.
    Square,
}

impl ImageAspectRatio {
    pub fn manifest_name(self) -> &'static str {
        match self {
            ImageAspectRatio::Pad => "pad",
            ImageAspectRatio::Square => "square",
        }
    }
}

/// Bunny settings that affect how a host feeds the model, not the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmSettings {
    pub image_aspect_ratio: ImageAspectRatio,
    /// The merged sequence is truncated to this length when set.
    pub tokenizer_model_max_length: Option<usize>,
}

/// Everything a multimodal export needs besides the language model.
#[derive(Debug, Clone, PartialEq)]
pub struct MultimodalConfig {
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    pub settings: MmSettings,
}

/// What kind of checkpoint a `config.json` describes.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelKind {
    /// Carrot / Bunny: SigLIP + projector + Llama.
    Multimodal(Box<MultimodalConfig>),
    /// A plain Llama checkpoint.
    TextOnly,
}

impl ModelKind {
    pub fn multimodal(&self) -> Option<&MultimodalConfig> {
        match self {
            ModelKind::Multimodal(m) => Some(m),
            ModelKind::TextOnly => None,
        }
    }
}

/// Maps `mm_vision_select_layer` (an index into `hidden_states`, which has `num_layers + 1`
/// entries, the embeddings first) onto the number of encoder layers to run.
pub fn layers_used(select_layer: i64, num_layers: usize, file: &str) -> Result<usize, ConfigError> {
    let count = num_layers as i64 + 1;
    let index = if select_layer < 0 {
        count + select_layer
    } else {
        select_layer
    };
    if index < 1 || index > num_layers as i64 {
        return Err(ConfigError::invalid(
            file,
            format!(
                "mm_vision_select_layer {select_layer} is out of range for a {num_layers}-layer vision tower"
            ),
        ));
    }
    Ok(index as usize)
}

/// The Bunny projector type (`mm_projector_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorKind {
    /// Number of linear layers (`mlpNx_gelu` → N, `linear` → 1).
    pub depth: usize,
}

impl ProjectorKind {
    pub fn parse(name: &str, file: &str) -> Result<Self, ConfigError> {
        if name == "linear" {
            return Ok(ProjectorKind { depth: 1 });
        }
        let depth = name
            .strip_prefix("mlp")
            .and_then(|rest| rest.strip_suffix("x_gelu"))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1);
        match depth {
            Some(depth) => Ok(ProjectorKind { depth }),
            None => Err(ConfigError::Unsupported {
                file: file.to_string(),
                what: format!("mm_projector_type `{name}`"),
                hint: " (only `linear` and `mlpNx_gelu` are)".to_string(),
            }),
        }
    }
}

/// Checks the Bunny keys that need no vision config and returns the projector kind and settings.
pub fn resolve_mm_keys(
    cfg: &HfModelConfig,
    file: &str,
) -> Result<(ProjectorKind, MmSettings), ConfigError> {
    if cfg.use_s2 == Some(true) {
        return Err(ConfigError::Invalid {
            file: file.to_string(),
            message: "S2 multi-scale vision (use_s2) is not supported yet".to_string(),
        });
    }
    if let Some(feature) = cfg.mm_vision_select_feature.as_deref()
        && feature != "patch"
    {
        return Err(ConfigError::unsupported(
            file,
            format!("mm_vision_select_feature `{feature}`"),
        ));
    }
    let kind = ProjectorKind::parse(cfg.mm_projector_type.as_deref().unwrap_or("linear"), file)?;
    let image_aspect_ratio = match cfg.image_aspect_ratio.as_deref() {
        Some("pad") => ImageAspectRatio::Pad,
        _ => ImageAspectRatio::Square,
    };
    Ok((
        kind,
        MmSettings {
            image_aspect_ratio,
            tokenizer_model_max_length: cfg.tokenizer_model_max_length,
        },
    ))
}

/// Resolves the multimodal part once the SigLIP parameters are known.
pub fn resolve_multimodal(
    cfg: &HfModelConfig,
    text: &TextConfig,
    siglip: SiglipParams,
    file: &str,
) -> Result<MultimodalConfig, ConfigError> {
    let (kind, settings) = resolve_mm_keys(cfg, file)?;
    let layers = layers_used(
        cfg.mm_vision_select_layer.unwrap_or(-2),
        siglip.num_layers,
        file,
    )?;
    let in_features = cfg.mm_hidden_size.unwrap_or(siglip.hidden_size);
    if in_features != siglip.hidden_size {
        return Err(ConfigError::invalid(
            file,
            format!(
                "mm_hidden_size ({in_features}) differs from the vision tower's hidden_size ({})",
                siglip.hidden_size
            ),
        ));
    }
    Ok(MultimodalConfig {
        vision: VisionConfig {
            tower: siglip,
            layers_used: layers,
        },
        projector: ProjectorConfig {
            depth: kind.depth,
            in_features,
            out_features: text.hidden_size,
        },
        settings,
    })
}

impl fmt::Display for ProjectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.depth == 1 {
            write!(f, "linear")
        } else {
            write!(f, "mlp{}x_gelu", self.depth)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf_config::parse_json;
    use carrot_graphs::config::{Activation, RopeConfig};

    fn cfg(json: &str) -> HfModelConfig {
        parse_json(json, "config.json").expect("parse")
    }

    fn siglip() -> SiglipParams {
        SiglipParams {
            hidden_size: 24,
            intermediate_size: 48,
            num_layers: 3,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 60,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            activation: Activation::GeluTanh,
        }
    }

    fn text() -> TextConfig {
        TextConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_attention_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 1e4,
                llama3: None,
            },
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        }
    }

    #[test]
    fn projector_types() {
        assert_eq!(
            ProjectorKind::parse("mlp2x_gelu", "c").expect("2x").depth,
            2
        );
        assert_eq!(
            ProjectorKind::parse("mlp3x_gelu", "c").expect("3x").depth,
            3
        );
        assert_eq!(
            ProjectorKind::parse("linear", "c").expect("linear").depth,
            1
        );
        for bad in [
            "ldpnetv2",
            "identity",
            "mlpx_gelu",
            "mlp0x_gelu",
            "mlp2x_relu",
        ] {
            let err = ProjectorKind::parse(bad, "config.json")
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains(&format!("mm_projector_type `{bad}` is not supported")),
                "{err}"
            );
        }
    }

    #[test]
    fn resolves_carrot_keys() {
        let c = cfg(
            r#"{"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 24, "image_aspect_ratio": "pad",
            "tokenizer_model_max_length": 2048, "use_s2": false}"#,
        );
        let mm = resolve_multimodal(&c, &text(), siglip(), "config.json").expect("mm");
        assert_eq!(mm.vision.layers_used, 2, "hidden_states[-2] of 3 layers");
        assert_eq!(
            mm.projector,
            ProjectorConfig {
                depth: 2,
                in_features: 24,
                out_features: 32
            }
        );
        assert_eq!(mm.settings.image_aspect_ratio, ImageAspectRatio::Pad);
        assert_eq!(mm.settings.tokenizer_model_max_length, Some(2048));
        let c = cfg(r#"{"mm_vision_select_layer": -1}"#);
        let mm = resolve_multimodal(&c, &text(), siglip(), "config.json").expect("mm");
        assert_eq!((mm.vision.layers_used, mm.projector.depth), (3, 1));
        assert_eq!(mm.settings.image_aspect_ratio, ImageAspectRatio::Square);
    }

    #[test]
    fn refusals() {
        let err = resolve_multimodal(
            &cfg(r#"{"use_s2": true}"#),
            &text(),
            siglip(),
            "config.json",
        )
        .expect_err("s2");
        assert!(
            err.to_string()
                .contains("S2 multi-scale vision (use_s2) is not supported yet"),
            "{err}"
        );
        let err = resolve_multimodal(
            &cfg(r#"{"mm_hidden_size": 3456}"#),
            &text(),
            siglip(),
            "config.json",
        )
        .expect_err("size");
        assert!(err.to_string().contains("mm_hidden_size (3456)"), "{err}");
        for layer in [-5, 0, 4] {
            let c = cfg(&format!(r#"{{"mm_vision_select_layer": {layer}}}"#));
            assert!(
                resolve_multimodal(&c, &text(), siglip(), "config.json").is_err(),
                "{layer}"
            );
        }
        assert_eq!(layers_used(1, 3, "c").expect("1"), 1);
    }
}
