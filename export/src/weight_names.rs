//! Canonical weight names (the ones graph code asks for), their expected shapes, and how they
//! map onto the keys of each checkpoint layout.
//!
//! Canonical names are the Llama keys as stored (`model.layers.0.self_attn.q_proj.weight`,
//! `lm_head.weight`), the `SiglipVisionModel` keys (`vision_model.encoder.layers.0.mlp.fc1.bias`)
//! and the projector keys without Bunny's `model.` (`mm_projector.0.weight`).

use std::collections::HashMap;

use carrot_graphs::config::{ProjectorConfig, TextConfig, VisionConfig};

/// Prefix of the SigLIP weights inside a merged Bunny/Carrot checkpoint.
pub const MERGED_VISION_PREFIX: &str = "model.vision_tower.vision_tower.";
/// Prefix of the projector weights inside a merged Bunny/Carrot checkpoint.
pub const MERGED_PROJECTOR_PREFIX: &str = "model.";

/// Every tensor a text export reads, with its shape, in the order graph code reads them.
pub fn text_tensors(cfg: &TextConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for layer in 0..cfg.num_layers {
        let attn = format!("model.layers.{layer}.self_attn");
        let mlp = format!("model.layers.{layer}.mlp");
        out.push((
            format!("model.layers.{layer}.input_layernorm.weight"),
            vec![h],
        ));
        for (name, rows, cols) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            out.push((format!("{attn}.{name}.weight"), vec![rows, cols]));
            if cfg.attention_bias {
                out.push((format!("{attn}.{name}.bias"), vec![rows]));
            }
        }
        out.push((
            format!("model.layers.{layer}.post_attention_layernorm.weight"),
            vec![h],
        ));
        for (name, rows, cols) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            out.push((format!("{mlp}.{name}.weight"), vec![rows, cols]));
            if cfg.mlp_bias {
                out.push((format!("{mlp}.{name}.bias"), vec![rows]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    out
}

/// The SigLIP tensors a vision export reads (only the `layers_used` encoder layers).
pub fn vision_tensors(cfg: &VisionConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.tower.hidden_size;
    let p = cfg.tower.patch_size;
    let mut out = vec![
        (
            "vision_model.embeddings.patch_embedding.weight".to_string(),
            vec![h, cfg.tower.num_channels, p, p],
        ),
        (
            "vision_model.embeddings.patch_embedding.bias".to_string(),
            vec![h],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".to_string(),
            vec![cfg.num_image_tokens(), h],
        ),
    ];
    for layer in 0..cfg.layers_used {
        let key = format!("vision_model.encoder.layers.{layer}");
        for norm in ["layer_norm1", "layer_norm2"] {
            out.push((format!("{key}.{norm}.weight"), vec![h]));
            out.push((format!("{key}.{norm}.bias"), vec![h]));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{key}.self_attn.{proj}.weight"), vec![h, h]));
            out.push((format!("{key}.self_attn.{proj}.bias"), vec![h]));
        }
        out.push((
            format!("{key}.mlp.fc1.weight"),
            vec![cfg.tower.intermediate_size, h],
        ));
        out.push((
            format!("{key}.mlp.fc1.bias"),
            vec![cfg.tower.intermediate_size],
        ));
        out.push((
            format!("{key}.mlp.fc2.weight"),
            vec![h, cfg.tower.intermediate_size],
        ));
        out.push((format!("{key}.mlp.fc2.bias"), vec![h]));
    }
    out
}

/// The projector tensors: linears at `mm_projector.{0,2,4,…}` (GELUs sit at the odd indices).
pub fn projector_tensors(cfg: &ProjectorConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for j in 0..cfg.depth {
        let input = if j == 0 {
            cfg.in_features
        } else {
            cfg.out_features
        };
        out.push((
            format!("mm_projector.{}.weight", 2 * j),
            vec![cfg.out_features, input],
        ));
        out.push((
            format!("mm_projector.{}.bias", 2 * j),
            vec![cfg.out_features],
        ));
    }
    out
}

/// Where a canonical tensor lives in a merged Bunny/Carrot checkpoint (also the module naming
/// LoRA adapters use). A `linear` projector is a bare `nn.Linear`, so `mm_projector.0.weight`
/// also has the alternative `model.mm_projector.weight`.
pub fn merged_keys(canonical: &str) -> Vec<String> {
    if canonical.starts_with("vision_model.") {
        vec![format!("{MERGED_VISION_PREFIX}{canonical}")]
    } else if let Some(rest) = canonical.strip_prefix("mm_projector.") {
        let mut keys = vec![format!("{MERGED_PROJECTOR_PREFIX}{canonical}")];
        if let Some(param) = rest.strip_prefix("0.") {
            keys.push(format!("{MERGED_PROJECTOR_PREFIX}mm_projector.{param}"));
        }
        keys
    } else {
        vec![canonical.to_string()]
    }
}

/// The canonical name of a merged-layout key (inverse of [`merged_keys`]).
pub fn canonical_of_merged(key: &str) -> String {
    if let Some(rest) = key.strip_prefix(MERGED_VISION_PREFIX) {
        return rest.to_string();
    }
    if let Some(rest) = key.strip_prefix("model.mm_projector.") {
        return match rest {
            "weight" | "bias" => format!("mm_projector.0.{rest}"),
            _ => format!("mm_projector.{rest}"),
        };
    }
    key.to_string()
}

/// Key renaming of `non_lora_trainables.bin`, as Bunny's loader does it: drop `base_model.`,
/// then, when some key starts with `model.model.`, one leading `model.` from every key.
/// Returns (renamed key → stored key).
pub fn bunny_non_lora_names<'a>(keys: impl Iterator<Item = &'a str>) -> HashMap<String, String> {
    let stripped: Vec<(String, String)> = keys
        .map(|k| {
            (
                k.strip_prefix("base_model.").unwrap_or(k).to_string(),
                k.to_string(),
            )
        })
        .collect();
    let nested = stripped.iter().any(|(k, _)| k.starts_with("model.model."));
    stripped
        .into_iter()
        .map(|(k, original)| {
            let renamed = if nested {
                k.strip_prefix("model.").map(str::to_string).unwrap_or(k)
            } else {
                k
            };
            (renamed, original)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use carrot_graphs::config::{Activation, RopeConfig, SiglipTower};

    #[test]
    fn projector_names_skip_the_gelus() {
        let cfg = ProjectorConfig {
            depth: 2,
            in_features: 8,
            out_features: 16,
        };
        let names: Vec<_> = projector_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| format!("{n}{s:?}"))
            .collect();
        assert_eq!(
            names,
            [
                "mm_projector.0.weight[16, 8]",
                "mm_projector.0.bias[16]",
                "mm_projector.2.weight[16, 16]",
                "mm_projector.2.bias[16]"
            ]
        );
    }

    #[test]
    fn merged_mapping_round_trips() {
        for canonical in [
            "vision_model.encoder.layers.3.mlp.fc1.bias",
            "mm_projector.2.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            let keys = merged_keys(canonical);
            assert_eq!(canonical_of_merged(&keys[0]), canonical);
        }
        assert_eq!(
            merged_keys("mm_projector.0.bias"),
            ["model.mm_projector.0.bias", "model.mm_projector.bias"]
        );
        assert_eq!(
            canonical_of_merged("model.mm_projector.weight"),
            "mm_projector.0.weight"
        );
        assert_eq!(
            merged_keys("vision_model.embeddings.patch_embedding.weight"),
            ["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"]
        );
    }

    #[test]
    fn non_lora_trainables_are_renamed_as_bunny_does() {
        let keys = [
            "base_model.model.model.mm_projector.0.weight",
            "base_model.model.model.mm_projector.2.bias",
        ];
        let names = bunny_non_lora_names(keys.iter().copied());
        assert_eq!(
            names.get("model.mm_projector.0.weight").map(String::as_str),
            Some(keys[0])
        );
        assert_eq!(
            names.get("model.mm_projector.2.bias").map(String::as_str),
            Some(keys[1])
        );
        // Without a `model.model.` key only `base_model.` is dropped.
        let names = bunny_non_lora_names(["base_model.model.mm_projector.0.weight"].into_iter());
        assert!(names.contains_key("model.mm_projector.0.weight"));
    }

    #[test]
    fn text_and_vision_counts() {
        let text = TextConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_attention_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 1e4,
                llama3: None,
            },
            max_position_embeddings: 32,
            tie_word_embeddings: false,
            attention_bias: true,
            mlp_bias: false,
        };
        let t = text_tensors(&text);
        assert_eq!(t.len(), 1 + 2 * (2 + 4 * 2 + 3) + 2);
        assert!(t.contains(&("model.layers.1.self_attn.k_proj.weight".into(), vec![4, 8])));
        assert!(t.contains(&("model.layers.0.self_attn.o_proj.bias".into(), vec![8])));
        let vision = VisionConfig {
            tower: SiglipTower {
                hidden_size: 8,
                intermediate_size: 12,
                num_layers: 3,
                num_attention_heads: 2,
                num_channels: 3,
                image_size: 30,
                patch_size: 14,
                layer_norm_eps: 1e-6,
                activation: Activation::GeluTanh,
            },
            layers_used: 2,
        };
        let v = vision_tensors(&vision);
        assert_eq!(v.len(), 3 + 2 * 16);
        assert!(v.contains(&(
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![4, 8]
        )));
        assert!(
            !v.iter()
                .any(|(n, _)| n.starts_with("vision_model.encoder.layers.2."))
        );
    }
}
