//! `adapter_config.json` (peft `LoraConfig`): rank, alpha, rsLoRA and the per-module
//! `rank_pattern` / `alpha_pattern`, matched as peft 0.21 `utils/other.py::get_pattern_key` does.

use std::fmt;
use std::path::Path;

use regex::Regex;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::lora::LoraError;

/// A JSON object read as a list of pairs, in file order (peft tries patterns in dict order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for PairsVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    pairs.push((k, v));
                }
                Ok(OrderedMap(pairs))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        deserializer.deserialize_any(PairsVisitor(std::marker::PhantomData))
    }
}

/// The keys of a peft `adapter_config.json` that matter for merging.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfAdapterConfig {
    pub peft_type: Option<String>,
    pub r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub use_rslora: Option<bool>,
    pub use_dora: Option<bool>,
    pub bias: Option<String>,
    pub lora_bias: Option<bool>,
    pub fan_in_fan_out: Option<bool>,
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    #[serde(default)]
    pub alpha_pattern: OrderedMap<f64>,
    pub target_modules: Option<Value>,
    pub target_parameters: Option<Vec<String>>,
    pub trainable_token_indices: Option<Value>,
    pub layer_replication: Option<Value>,
    pub use_qalora: Option<bool>,
    pub base_model_name_or_path: Option<String>,
}

/// A pattern of `rank_pattern` / `alpha_pattern`, compiled as peft matches it:
/// `re.match(rf"(.*\.)?({key})$", module_name)`.
#[derive(Debug, Clone)]
struct PatternKey {
    regex: Regex,
}

impl PatternKey {
    fn new(key: &str, file: &Path) -> Result<Self, LoraError> {
        let regex =
            Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| LoraError::Pattern {
                file: file.to_path_buf(),
                pattern: key.to_string(),
                message: e.to_string(),
            })?;
        Ok(PatternKey { regex })
    }
}

/// The first pattern (in file order) matching `module`, as peft's `get_pattern_key`.
fn pattern_value<V: Copy>(patterns: &[(PatternKey, V)], module: &str) -> Option<V> {
    patterns
        .iter()
        .find(|(p, _)| p.regex.is_match(module))
        .map(|(_, v)| *v)
}

/// Resolved adapter settings.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_bias: bool,
    rank_pattern: Vec<(PatternKey, usize)>,
    alpha_pattern: Vec<(PatternKey, f64)>,
}

impl LoraConfig {
    /// Checks an `adapter_config.json` and refuses what a plain merge cannot reproduce.
    pub fn resolve(raw: &HfAdapterConfig, file: &Path) -> Result<Self, LoraError> {
        let refuse = |what: String| LoraError::Refused {
            file: file.to_path_buf(),
            what,
        };
        match raw.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(refuse(format!(
                    "peft_type `{other}` is not supported (only LORA adapters are)"
                )));
            }
        }
        if raw.use_dora == Some(true) {
            return Err(refuse(
                "DoRA adapters are not supported (use_dora: true)".into(),
            ));
        }
        if let Some(bias) = raw.bias.as_deref()
            && bias != "none"
        {
            return Err(refuse(format!(
                "bias `{bias}` is not supported (only \"none\" is): the adapter trains base biases"
            )));
        }
        if let Some(modules) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(refuse(format!(
                "modules_to_save ({}) is not supported: those modules are saved whole, not as LoRA",
                modules.join(", ")
            )));
        }
        if let Some(params) = raw.target_parameters.as_ref().filter(|p| !p.is_empty()) {
            return Err(refuse(format!(
                "target_parameters ({}) is not supported",
                params.join(", ")
            )));
        }
        if raw
            .trainable_token_indices
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(refuse("trainable_token_indices is not supported".into()));
        }
        if raw.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse("layer_replication is not supported".into()));
        }
        if raw.use_qalora == Some(true) {
            return Err(refuse(
                "QALoRA adapters are not supported (use_qalora: true)".into(),
            ));
        }
        let r = raw.r.unwrap_or(8);
        if r == 0 {
            return Err(refuse("r must be positive".into()));
        }
        let rank_pattern = raw
            .rank_pattern
            .0
            .iter()
            .map(|(k, v)| Ok((PatternKey::new(k, file)?, *v)))
            .collect::<Result<Vec<_>, LoraError>>()?;
        let alpha_pattern = raw
            .alpha_pattern
            .0
            .iter()
            .map(|(k, v)| Ok((PatternKey::new(k, file)?, *v)))
            .collect::<Result<Vec<_>, LoraError>>()?;
        Ok(LoraConfig {
            r,
            lora_alpha: raw.lora_alpha.unwrap_or(8.0),
            use_rslora: raw.use_rslora.unwrap_or(false),
            lora_bias: raw.lora_bias.unwrap_or(false),
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Rank of a module (e.g. `model.layers.0.self_attn.q_proj`), `rank_pattern` applied.
    pub fn rank(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// Alpha of a module, `alpha_pattern` applied.
    pub fn alpha(&self, module: &str) -> f64 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, per module.
    pub fn scaling(&self, module: &str) -> f64 {
        let r = self.rank(module) as f64;
        let alpha = self.alpha(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<LoraConfig, LoraError> {
        let raw: HfAdapterConfig = serde_json::from_str(json).expect("json");
        LoraConfig::resolve(&raw, Path::new("adapter_config.json"))
    }

    #[test]
    fn scaling_plain_and_rslora() {
        let c = config(r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32}"#).expect("plain");
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 2.0);
        let c = config(r#"{"r": 16, "lora_alpha": 32, "use_rslora": true}"#).expect("rslora");
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 8.0);
    }

    #[test]
    fn patterns_match_like_peft_get_pattern_key() {
        let c = config(
            r#"{"r": 8, "lora_alpha": 16,
                "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.q_proj": 2, "layers\\.[23]\\..*v_proj": 6},
                "alpha_pattern": {"proj": 1}}"#,
        )
        .expect("patterns");
        // First match in file order wins, even over a more specific later key.
        assert_eq!(c.rank("model.layers.1.self_attn.q_proj"), 4);
        // A key matches a whole dotted suffix, not an arbitrary substring.
        assert_eq!(c.rank("model.layers.1.self_attn.xq_proj"), 8);
        assert_eq!(c.rank("model.layers.3.self_attn.v_proj"), 6);
        assert_eq!(c.rank("model.layers.13.self_attn.v_proj"), 8);
        assert_eq!(
            c.alpha("model.layers.0.self_attn.q_proj"),
            16.0,
            "`proj` is not a suffix after a dot"
        );
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 4.0);
    }

    #[test]
    fn refusals_name_the_feature() {
        let cases = [
            (r#"{"use_dora": true}"#, "DoRA adapters are not supported"),
            (r#"{"bias": "lora_only"}"#, "bias `lora_only`"),
            (
                r#"{"modules_to_save": ["lm_head", "embed_tokens"]}"#,
                "modules_to_save (lm_head, embed_tokens)",
            ),
            (r#"{"peft_type": "LOHA"}"#, "peft_type `LOHA`"),
            (r#"{"layer_replication": [[0, 2]]}"#, "layer_replication"),
            (r#"{"rank_pattern": {"(?<=x)q": 2}}"#, "pattern `(?<=x)q`"),
        ];
        for (json, needle) in cases {
            let err = config(json).expect_err(json).to_string();
            assert!(
                err.contains(needle) && err.contains("adapter_config.json"),
                "{err}"
            );
        }
        assert!(config(r#"{"bias": "none", "modules_to_save": null, "use_dora": false}"#).is_ok());
    }
}
