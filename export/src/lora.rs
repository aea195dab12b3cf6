//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.{safetensors,bin}`, merged into
//! base weights as `W += s · (B @ A)` in float32.
//!
//! Mirrors peft 0.21 `tuners/lora/layer.py` (`update_layer`, `get_delta_weight`) and
//! `utils/other.py::get_pattern_key` for `rank_pattern` / `alpha_pattern`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::hf_config::{ConfigError, read_json};
pub use crate::lora_config::{HfAdapterConfig, LoraConfig, OrderedMap};
pub use crate::lora_merge::merge_lora;

/// A LoRA adapter that cannot be used; the message names the file, and the tensor when there is one.
#[derive(thiserror::Error, Debug)]
pub enum LoraError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] CheckpointError),
    #[error("{file}: {what}")]
    Refused { file: PathBuf, what: String },
    #[error(
        "{dir}: no adapter weights (looked for adapter_model.safetensors and adapter_model.bin)"
    )]
    NoWeights { dir: PathBuf },
    #[error("{file}: unexpected tensor `{key}` (only lora_A / lora_B weights are understood)")]
    UnexpectedKey { file: PathBuf, key: String },
    #[error("{file}: module `{module}` has {present} but no {missing}")]
    Incomplete {
        file: PathBuf,
        module: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("{file}: adapter tensor `{key}` targets `{target}`, which is not in the model")]
    NoTarget {
        file: PathBuf,
        key: String,
        target: String,
    },
    #[error("{file}: tensor `{key}` has shape {actual:?}, expected {expected}")]
    Shape {
        file: PathBuf,
        key: String,
        expected: String,
        actual: Vec<usize>,
    },
    #[error("{file}: pattern `{pattern}` is not a usable regular expression: {message}")]
    Pattern {
        file: PathBuf,
        pattern: String,
        message: String,
    },
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
            let is_weight = rest == "weight"
                || rest
                    .strip_suffix(".weight")
                    .is_some_and(|n| !n.contains('.'));
            let is_bias =
                rest == "bias" || rest.strip_suffix(".bias").is_some_and(|n| !n.contains('.'));
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
            .ok_or_else(|| LoraError::NoWeights {
                dir: dir.to_path_buf(),
            })?;
        let weights = Checkpoint::open_files(&weights_file, std::slice::from_ref(&weights_file))?;
        Self::from_parts(dir, weights_file, config, weights)
    }

    fn from_parts(
        dir: &Path,
        weights_file: PathBuf,
        config: LoraConfig,
        weights: Checkpoint,
    ) -> Result<Self, LoraError> {
        let mut found: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
        for key in weights.keys() {
            let Some((module, part)) = split_adapter_key(key) else {
                return Err(LoraError::UnexpectedKey {
                    file: weights_file.clone(),
                    key: key.to_string(),
                });
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
                return Err(LoraError::UnexpectedKey {
                    file: weights_file.clone(),
                    key: bias.unwrap_or_default(),
                });
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
                return Err(shape_err(
                    &a_key,
                    format!("[{rank}, in_features] (r = {rank})"),
                    a_shape,
                ));
            }
            if b_shape.len() != 2 || b_shape[1] != rank {
                return Err(shape_err(
                    &b_key,
                    format!("[out_features, {rank}] (r = {rank})"),
                    b_shape,
                ));
            }
            let scaling = config.scaling(&module);
            modules.insert(
                module,
                LoraModule {
                    a_key,
                    b_key,
                    b_bias_key: bias,
                    scaling,
                },
            );
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            weights_file,
            config,
            modules,
            weights,
        })
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
    pub fn check_targets(
        &self,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<(), LoraError> {
        for (module, m) in &self.modules {
            let target = format!("{module}.weight");
            let Some(shape) = shape_of(&target) else {
                return Err(LoraError::NoTarget {
                    file: self.weights_file.clone(),
                    key: m.a_key.clone(),
                    target,
                });
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
    pub fn merge(
        &mut self,
        weight_key: &str,
        w: &mut [f32],
        shape: &[usize],
    ) -> Result<bool, LoraError> {
        let Some(module) = weight_key.strip_suffix(".weight") else {
            return Ok(false);
        };
        let Some(m) = self.modules.get(module).cloned() else {
            return Ok(false);
        };
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
        let Some(module) = bias_key.strip_suffix(".bias") else {
            return Ok(false);
        };
        let Some(m) = self.modules.get(module).cloned() else {
            return Ok(false);
        };
        let Some(key) = m.b_bias_key else {
            return Ok(false);
        };
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

    /// Bytes of adapter tensors read while merging every module.
    pub fn bytes_total(&self) -> usize {
        self.modules.values().map(|m| self.module_bytes(m)).sum()
    }

    /// Bytes of adapter tensors read when merging into `key` (a `.weight` or `.bias` name).
    pub fn bytes_for(&self, key: &str) -> usize {
        match key
            .strip_suffix(".weight")
            .and_then(|module| self.modules.get(module))
        {
            Some(m) => self.module_bytes(m),
            None => 0,
        }
    }

    fn module_bytes(&self, m: &LoraModule) -> usize {
        [Some(&m.a_key), Some(&m.b_key), m.b_bias_key.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|k| self.weights.info(k).ok())
            .map(|i| i.byte_len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_key_forms() {
        let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(
            split_adapter_key(k),
            Some(("model.layers.0.self_attn.q_proj", "lora_A.weight"))
        );
        let k = "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight";
        assert_eq!(
            split_adapter_key(k),
            Some(("model.layers.0.mlp.up_proj", "lora_B.weight"))
        );
        assert_eq!(
            split_adapter_key("base_model.model.lm_head.lora_B.bias"),
            Some(("lm_head", "lora_B.bias"))
        );
        assert_eq!(
            split_adapter_key("base_model.model.model.embed_tokens.lora_embedding_A"),
            None
        );
        assert_eq!(
            split_adapter_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
            ),
            None
        );
    }

    fn write_adapter(dir: &Path, config: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        std::fs::write(dir.join("adapter_config.json"), config).expect("config");
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b);
                (name.to_string(), view.expect("view"))
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
            .expect("write");
    }

    #[test]
    fn lora_bias_is_merged_into_the_base_bias() {
        let tmp = tempfile::tempdir().expect("tmp");
        let config = r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "lora_bias": true}"#;
        let a = (
            "base_model.model.proj.lora_A.weight",
            vec![1, 2],
            vec![1.0, 2.0],
        );
        let b = (
            "base_model.model.proj.lora_B.weight",
            vec![2, 1],
            vec![0.5, -1.0],
        );
        let bias = (
            "base_model.model.proj.lora_B.bias",
            vec![2],
            vec![0.25, 4.0],
        );
        write_adapter(tmp.path(), config, &[a.clone(), b.clone(), bias]);
        let mut adapter = LoraAdapter::open(tmp.path()).expect("open");
        let mut w = vec![0.0f32; 4];
        assert!(
            adapter
                .merge("proj.weight", &mut w, &[2, 2])
                .expect("merge")
        );
        assert_eq!(w, [1.0, 2.0, -2.0, -4.0]);
        let mut base_bias = vec![1.0f32, 1.0];
        assert!(
            adapter
                .merge_bias("proj.bias", &mut base_bias)
                .expect("bias")
        );
        assert_eq!(base_bias, [1.5, 9.0]);
        let err = adapter
            .check_targets(|k| (k == "proj.weight").then(|| vec![2, 2]))
            .expect_err("no bias");
        assert!(
            err.to_string()
                .contains("`proj.bias`, which is not in the model"),
            "{err}"
        );

        write_adapter(tmp.path(), config, &[a, b]);
        let err = LoraAdapter::open(tmp.path())
            .expect_err("bias missing")
            .to_string();
        assert!(
            err.contains("module `proj` has lora_bias: true but no lora_B.bias"),
            "{err}"
        );
    }
}
