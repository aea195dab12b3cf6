//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.{safetensors,bin}`, merged into
//! base weights as `W += s · (B @ A)` in float32.
//!
//! Mirrors peft 0.21 `tuners/lora/layer.py` (`update_layer`, `get_delta_weight`) and
//! `utils/other.py::get_pattern_key` for `rank_pattern` / `alpha_pattern`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::hf_config::{ConfigError, read_json};

/// A LoRA adapter that cannot be used; the message names the file, and the tensor when there is one.
#[derive(thiserror::Error, Debug)]
pub enum LoraError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] CheckpointError),
    #[error("{file}: {what}")]
    Refused { file: PathBuf, what: String },
    #[error("{dir}: no adapter weights (looked for adapter_model.safetensors and adapter_model.bin)")]
    NoWeights { dir: PathBuf },
    #[error("{file}: unexpected tensor `{key}` (only lora_A / lora_B weights are understood)")]
    UnexpectedKey { file: PathBuf, key: String },
    #[error("{file}: module `{module}` has {present} but no {missing}")]
    Incomplete { file: PathBuf, module: String, present: &'static str, missing: &'static str },
    #[error("{file}: adapter tensor `{key}` targets `{target}`, which is not in the model")]
    NoTarget { file: PathBuf, key: String, target: String },
    #[error("{file}: tensor `{key}` has shape {actual:?}, expected {expected}")]
    Shape { file: PathBuf, key: String, expected: String, actual: Vec<usize> },
    #[error("{file}: pattern `{pattern}` is not a usable regular expression: {message}")]
    Pattern { file: PathBuf, pattern: String, message: String },
}

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
        let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| LoraError::Pattern {
            file: file.to_path_buf(),
            pattern: key.to_string(),
            message: e.to_string(),
        })?;
        Ok(PatternKey { regex })
    }
}

/// The first pattern (in file order) matching `module`, as peft's `get_pattern_key`.
fn pattern_value<V: Copy>(patterns: &[(PatternKey, V)], module: &str) -> Option<V> {
    patterns.iter().find(|(p, _)| p.regex.is_match(module)).map(|(_, v)| *v)
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
        let refuse = |what: String| LoraError::Refused { file: file.to_path_buf(), what };
        match raw.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => return Err(refuse(format!("peft_type `{other}` is not supported (only LORA adapters are)"))),
        }
        if raw.use_dora == Some(true) {
            return Err(refuse("DoRA adapters are not supported (use_dora: true)".into()));
        }
        if let Some(bias) = raw.bias.as_deref()
            && bias != "none"
        {
            return Err(refuse(format!("bias `{bias}` is not supported (only \"none\" is): the adapter trains base biases")));
        }
        if let Some(modules) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(refuse(format!(
                "modules_to_save ({}) is not supported: those modules are saved whole, not as LoRA",
                modules.join(", ")
            )));
        }
        if let Some(params) = raw.target_parameters.as_ref().filter(|p| !p.is_empty()) {
            return Err(refuse(format!("target_parameters ({}) is not supported", params.join(", "))));
        }
        if raw.trainable_token_indices.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse("trainable_token_indices is not supported".into()));
        }
        if raw.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse("layer_replication is not supported".into()));
        }
        if raw.use_qalora == Some(true) {
            return Err(refuse("QALoRA adapters are not supported (use_qalora: true)".into()));
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
        if self.use_rslora { alpha / r.sqrt() } else { alpha / r }
    }
}

/// The tensors one LoRA module contributes.
#[derive(Debug, Clone)]
struct LoraModule {
    a_key: String,
    b_key: String,
    b_bias_key: Option<String>,
    scaling: f64,
}

/// One adapter directory, opened: config checked, tensor names indexed, weights read on demand.
#[derive(Debug)]
pub struct LoraAdapter {
    dir: PathBuf,
    weights_file: PathBuf,
    config: LoraConfig,
    modules: BTreeMap<String, LoraModule>,
    weights: Checkpoint,
}

const PEFT_PREFIX: &str = "base_model.model.";

/// Splits an adapter tensor name into (module, part): `…q_proj.lora_A.weight` →
/// (`…q_proj`, `lora_A.weight`); the adapter name in `lora_A.default.weight` is dropped.
fn split_adapter_key(key: &str) -> Option<(&str, &'static str)> {
    let key = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    for (part, canonical) in [("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight")] {
        let marker = format!(".{part}.");
        if let Some(pos) = key.find(&marker) {
            let module = &key[..pos];
            let rest = &key[pos + marker.len()..];
            let is_weight = rest == "weight" || rest.strip_suffix(".weight").is_some_and(|n| !n.contains('.'));
            let is_bias = rest == "bias" || rest.strip_suffix(".bias").is_some_and(|n| !n.contains('.'));
            if is_weight {
                return Some((module, canonical));
            }
            if is_bias && part == "lora_B" {
                return Some((module, "lora_B.bias"));
            }
        }
    }
    None
}

impl LoraAdapter {
    /// Opens `dir/adapter_config.json` and `dir/adapter_model.{safetensors,bin}`.
    pub fn open(dir: &Path) -> Result<Self, LoraError> {
        let config_path = dir.join("adapter_config.json");
        let raw: HfAdapterConfig = read_json(&config_path)?;
        let config = LoraConfig::resolve(&raw, &config_path)?;
        let weights_file = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| LoraError::NoWeights { dir: dir.to_path_buf() })?;
        let weights = Checkpoint::open_files(&weights_file, std::slice::from_ref(&weights_file))?;
        Self::from_parts(dir, weights_file, config, weights)
    }

    fn from_parts(dir: &Path, weights_file: PathBuf, config: LoraConfig, weights: Checkpoint) -> Result<Self, LoraError> {
        let mut found: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
        for key in weights.keys() {
            let Some((module, part)) = split_adapter_key(key) else {
                return Err(LoraError::UnexpectedKey { file: weights_file.clone(), key: key.to_string() });
            };
            let slot = match part {
                "lora_A.weight" => 0,
                "lora_B.weight" => 1,
                _ => 2,
            };
            found.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b, bias]) in found {
            let incomplete = |present, missing| LoraError::Incomplete {
                file: weights_file.clone(),
                module: module.clone(),
                present,
                missing,
            };
            let (a_key, b_key) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some(_), None) => return Err(incomplete("lora_A", "lora_B")),
                (None, _) => return Err(incomplete("lora_B", "lora_A")),
            };
            if bias.is_some() && !config.lora_bias {
                return Err(LoraError::UnexpectedKey { file: weights_file.clone(), key: bias.unwrap_or_default() });
            }
            if config.lora_bias && bias.is_none() {
                return Err(incomplete("lora_bias: true", "lora_B.bias"));
            }
            let rank = config.rank(&module);
            let a_shape = &weights.info(&a_key)?.shape;
            let b_shape = &weights.info(&b_key)?.shape;
            let shape_err = |key: &str, expected: String, actual: &Vec<usize>| LoraError::Shape {
                file: weights_file.clone(),
                key: key.to_string(),
                expected,
                actual: actual.clone(),
            };
            if a_shape.len() != 2 || a_shape[0] != rank {
                return Err(shape_err(&a_key, format!("[{rank}, in_features] (r = {rank})"), a_shape));
            }
            if b_shape.len() != 2 || b_shape[1] != rank {
                return Err(shape_err(&b_key, format!("[out_features, {rank}] (r = {rank})"), b_shape));
            }
            let scaling = config.scaling(&module);
            modules.insert(module, LoraModule { a_key, b_key, b_bias_key: bias, scaling });
        }
        Ok(LoraAdapter { dir: dir.to_path_buf(), weights_file, config, modules, weights })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapted modules (`model.layers.0.self_attn.q_proj`, …), sorted.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The merge factor of a module.
    pub fn scaling(&self, module: &str) -> Option<f64> {
        self.modules.get(module).map(|m| m.scaling)
    }

    /// The weight name a module adapts: `<module>.weight`.
    pub fn target_weights(&self) -> impl Iterator<Item = String> + '_ {
        self.modules.keys().map(|m| format!("{m}.weight"))
    }

    /// Checks up front that every adapted module exists in the model with a matching shape.
    /// `shape_of` gives the shape of a model tensor by name, `None` when there is no such tensor.
    pub fn check_targets(&self, shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> Result<(), LoraError> {
        for (module, m) in &self.modules {
            let target = format!("{module}.weight");
            let Some(shape) = shape_of(&target) else {
                return Err(LoraError::NoTarget { file: self.weights_file.clone(), key: m.a_key.clone(), target });
            };
            let a = &self.weights.info(&m.a_key)?.shape;
            let b = &self.weights.info(&m.b_key)?.shape;
            if shape.len() != 2 {
                return Err(LoraError::Shape {
                    file: self.weights_file.clone(),
                    key: m.a_key.clone(),
                    expected: format!("a 2-D target, but `{target}` is {shape:?}"),
                    actual: a.clone(),
                });
            }
            if a[1] != shape[1] {
                return Err(LoraError::Shape {
                    file: self.weights_file.clone(),
                    key: m.a_key.clone(),
                    expected: format!("[{}, {}] to match `{target}` {shape:?}", a[0], shape[1]),
                    actual: a.clone(),
                });
            }
            if b[0] != shape[0] {
                return Err(LoraError::Shape {
                    file: self.weights_file.clone(),
                    key: m.b_key.clone(),
                    expected: format!("[{}, {}] to match `{target}` {shape:?}", shape[0], b[1]),
                    actual: b.clone(),
                });
            }
            if m.b_bias_key.is_some() {
                let bias = format!("{module}.bias");
                if shape_of(&bias).is_none() {
                    return Err(LoraError::NoTarget {
                        file: self.weights_file.clone(),
                        key: m.b_bias_key.clone().unwrap_or_default(),
                        target: bias,
                    });
                }
            }
        }
        Ok(())
    }

    /// Merges this adapter into `w` (the weight `<module>.weight`, shape `[out, in]`) when it
    /// adapts that module; returns whether it did.
    pub fn merge(&mut self, weight_key: &str, w: &mut [f32], shape: &[usize]) -> Result<bool, LoraError> {
        let Some(module) = weight_key.strip_suffix(".weight") else { return Ok(false) };
        let Some(m) = self.modules.get(module).cloned() else { return Ok(false) };
        let (a_shape, a) = self.weights.load_f32(&m.a_key)?;
        let (b_shape, b) = self.weights.load_f32(&m.b_key)?;
        let (out, inp) = match shape {
            [o, i] if w.len() == o * i => (*o, *i),
            _ => {
                return Err(LoraError::Shape {
                    file: self.weights_file.clone(),
                    key: weight_key.to_string(),
                    expected: "a 2-D weight".to_string(),
                    actual: shape.to_vec(),
                });
            }
        };
        let rank = a_shape[0];
        if a_shape != [rank, inp] || b_shape != [out, rank] {
            return Err(LoraError::Shape {
                file: self.weights_file.clone(),
                key: format!("{} / {}", m.a_key, m.b_key),
                expected: format!("[r, {inp}] and [{out}, r] for `{weight_key}`"),
                actual: [a_shape, b_shape].concat(),
            });
        }
        merge_lora(w, out, inp, &a, &b, rank, m.scaling as f32);
        Ok(true)
    }

    /// Adds `s · lora_B.bias` to `bias` (the tensor `<module>.bias`) when the adapter has one.
    pub fn merge_bias(&mut self, bias_key: &str, bias: &mut [f32]) -> Result<bool, LoraError> {
        let Some(module) = bias_key.strip_suffix(".bias") else { return Ok(false) };
        let Some(m) = self.modules.get(module).cloned() else { return Ok(false) };
        let Some(key) = m.b_bias_key else { return Ok(false) };
        let (_, b) = self.weights.load_f32(&key)?;
        if b.len() != bias.len() {
            return Err(LoraError::Shape {
                file: self.weights_file.clone(),
                key,
                expected: format!("[{}] to match `{bias_key}`", bias.len()),
                actual: vec![b.len()],
            });
        }
        let s = m.scaling as f32;
        for (x, d) in bias.iter_mut().zip(&b) {
            *x += d * s;
        }
        Ok(true)
    }

    /// Bytes of adapter tensors read while merging.
    pub fn bytes_total(&self) -> usize {
        self.modules
            .values()
            .flat_map(|m| [&m.a_key, &m.b_key])
            .filter_map(|k| self.weights.info(k).ok())
            .map(|i| i.byte_len())
            .sum()
    }
}

/// Columns of `w` handled per tile: `r × TILE` floats of `A` stay in cache while every row of
/// the tile is updated.
const TILE: usize = 512;

/// `w[out, in] += scaling · (b[out, r] @ a[r, in])`, all row-major float32.
///
/// `(B @ A)` is accumulated per row before the scaling is applied, as peft's
/// `(weight_B @ weight_A) * scaling`. Rows are split between threads.
pub fn merge_lora(w: &mut [f32], out: usize, inp: usize, a: &[f32], b: &[f32], r: usize, scaling: f32) {
    assert_eq!(w.len(), out * inp, "merge_lora: weight size");
    assert_eq!(a.len(), r * inp, "merge_lora: lora_A size");
    assert_eq!(b.len(), out * r, "merge_lora: lora_B size");
    if out == 0 || inp == 0 {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    let work = out * inp * r;
    let threads = if work < 1 << 22 { 1 } else { threads };
    let rows_per = out.div_ceil(threads);
    std::thread::scope(|scope| {
        for (chunk_index, w_rows) in w.chunks_mut(rows_per * inp).enumerate() {
            let row0 = chunk_index * rows_per;
            let rows = w_rows.len() / inp;
            let b_rows = &b[row0 * r..(row0 + rows) * r];
            scope.spawn(move || merge_rows(w_rows, rows, inp, a, b_rows, r, scaling));
        }
    });
}

fn merge_rows(w: &mut [f32], rows: usize, inp: usize, a: &[f32], b: &[f32], r: usize, scaling: f32) {
    let mut acc = vec![0f32; TILE.min(inp)];
    for c0 in (0..inp).step_by(TILE) {
        let width = TILE.min(inp - c0);
        let acc = &mut acc[..width];
        for row in 0..rows {
            acc.fill(0.0);
            let b_row = &b[row * r..(row + 1) * r];
            for (k, &bk) in b_row.iter().enumerate() {
                let a_row = &a[k * inp + c0..k * inp + c0 + width];
                for (x, &ak) in acc.iter_mut().zip(a_row) {
                    *x += bk * ak;
                }
            }
            let w_row = &mut w[row * inp + c0..row * inp + c0 + width];
            for (x, &d) in w_row.iter_mut().zip(acc.iter()) {
                *x += d * scaling;
            }
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
        assert_eq!(c.alpha("model.layers.0.self_attn.q_proj"), 16.0, "`proj` is not a suffix after a dot");
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 4.0);
    }

    #[test]
    fn refusals_name_the_feature() {
        let cases = [
            (r#"{"use_dora": true}"#, "DoRA adapters are not supported"),
            (r#"{"bias": "lora_only"}"#, "bias `lora_only`"),
            (r#"{"modules_to_save": ["lm_head", "embed_tokens"]}"#, "modules_to_save (lm_head, embed_tokens)"),
            (r#"{"peft_type": "LOHA"}"#, "peft_type `LOHA`"),
            (r#"{"layer_replication": [[0, 2]]}"#, "layer_replication"),
            (r#"{"rank_pattern": {"(?<=x)q": 2}}"#, "pattern `(?<=x)q`"),
        ];
        for (json, needle) in cases {
            let err = config(json).expect_err(json).to_string();
            assert!(err.contains(needle) && err.contains("adapter_config.json"), "{err}");
        }
        assert!(config(r#"{"bias": "none", "modules_to_save": null, "use_dora": false}"#).is_ok());
    }

    #[test]
    fn adapter_key_forms() {
        let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(split_adapter_key(k), Some(("model.layers.0.self_attn.q_proj", "lora_A.weight")));
        let k = "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight";
        assert_eq!(split_adapter_key(k), Some(("model.layers.0.mlp.up_proj", "lora_B.weight")));
        assert_eq!(split_adapter_key("base_model.model.lm_head.lora_B.bias"), Some(("lm_head", "lora_B.bias")));
        assert_eq!(split_adapter_key("base_model.model.model.embed_tokens.lora_embedding_A"), None);
        assert_eq!(split_adapter_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"), None);
    }

    #[test]
    fn merge_matches_naive_product() {
        let (out, inp, r) = (301, 1100, 13);
        let a: Vec<f32> = (0..r * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let b: Vec<f32> = (0..out * r).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let base: Vec<f32> = (0..out * inp).map(|i| (i % 17) as f32).collect();
        let mut w = base.clone();
        merge_lora(&mut w, out, inp, &a, &b, r, 0.5);
        for o in 0..out {
            for i in 0..inp {
                let d: f32 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                assert_eq!(w[o * inp + i], base[o * inp + i] + d * 0.5, "({o}, {i})");
            }
        }
    }
}
