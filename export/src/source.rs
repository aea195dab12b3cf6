//! The unified weight source: resolves a model directory (merged Carrot/Bunny, Bunny LoRA output
//! over a base LLM, or plain Llama) into configs plus a [`WeightSource`] that hands graph code one
//! float32 tensor at a time, by canonical name, with every LoRA adapter already merged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use carrot_graphs::config::TextConfig;
use carrot_graphs::weights::{Tensor, WeightError, WeightSource};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::hf_config::{
    ConfigError, GenerationDefaults, HfGenerationConfig, HfModelConfig, read_json,
    resolve_text_config,
};
use crate::lora::{HfAdapterConfig, LoraAdapter, LoraError};
use crate::mm_config::{ModelKind, resolve_mm_keys, resolve_multimodal};
use crate::siglip_table::{VisionOrigin, resolve_siglip};
use crate::weight_names::{
    bunny_non_lora_names, canonical_of_merged, merged_keys, projector_tensors, text_tensors,
    vision_tensors,
};

/// Why a model directory cannot be exported; messages name the directory, file or tensor.
#[derive(thiserror::Error, Debug)]
pub enum ExportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("{0}")]
    Layout(String),
    #[error("tensor `{name}` not found (looked for {looked})")]
    MissingTensor { name: String, looked: String },
    #[error("{file}: tensor `{key}` has shape {actual:?}, expected {expected:?}{}", canonical_note(.key, .name))]
    Shape {
        file: PathBuf,
        key: String,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
}

fn canonical_note(key: &str, name: &str) -> String {
    if key == name {
        String::new()
    } else {
        format!(" (read as `{name}`)")
    }
}

/// Files copied next to the graphs when present (model directory first, then the base).
pub const SUPPORT_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// How the weights were laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Weights in the model directory (merged Carrot/Bunny, or plain Llama).
    Merged,
    /// A Bunny/PEFT LoRA output directory over a base LLM directory.
    LoraOverBase { base: PathBuf },
}

/// A model directory, resolved: configs, kind, defaults and its weights.
#[derive(Debug)]
pub struct ResolvedModel {
    pub model_dir: PathBuf,
    pub layout: Layout,
    pub text: TextConfig,
    pub kind: ModelKind,
    /// Where the SigLIP config came from (multimodal only).
    pub vision_origin: Option<VisionOrigin>,
    pub generation: GenerationDefaults,
    /// The dtype the language model is stored in (`float16`, `bfloat16`, `float32`).
    pub source_dtype: String,
    /// Tokenizer / template / generation files found, in [`SUPPORT_FILES`] order.
    pub support_files: Vec<PathBuf>,
    /// Adapter directories merged, in order (Bunny's own first).
    pub loras: Vec<PathBuf>,
    pub weights: ModelWeights,
}

#[derive(Debug)]
struct Store {
    role: &'static str,
    checkpoint: Checkpoint,
    /// Renamed key → stored key (only `non_lora_trainables.bin` is renamed).
    renames: Option<HashMap<String, String>>,
}

impl Store {
    fn new(role: &'static str, checkpoint: Checkpoint) -> Self {
        Store {
            role,
            checkpoint,
            renames: None,
        }
    }

    fn stored_key(&self, key: &str) -> Option<String> {
        match &self.renames {
            Some(map) => map.get(key).cloned(),
            None => self.checkpoint.contains(key).then(|| key.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
struct Location {
    store: usize,
    key: String,
}

/// Every weight of a resolved model; implements [`WeightSource`].
#[derive(Debug)]
pub struct ModelWeights {
    stores: Vec<Store>,
    /// Store indices searched for Bunny-layout keys (`model.*`, `model.mm_projector.*`, …), in order.
    merged_order: Vec<usize>,
    /// Store holding SigLIP `vision_model.*` keys directly.
    siglip: Option<usize>,
    tied: bool,
    expected: BTreeMap<String, Vec<usize>>,
    adapters: Vec<LoraAdapter>,
    bytes_read: u64,
    /// The last tensor read whole to serve [`WeightSource::rows`] (an adapted or `.bin` one).
    row_cache: Option<(String, Tensor)>,
}

impl ModelWeights {
    fn locate(&self, name: &str) -> Option<Location> {
        let canonical = if self.tied && name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name
        };
        for key in merged_keys(canonical) {
            for &store in &self.merged_order {
                if let Some(stored) = self.stores[store].stored_key(&key) {
                    return Some(Location { store, key: stored });
                }
            }
        }
        if canonical.starts_with("vision_model.")
            && let Some(store) = self.siglip
            && let Some(key) = self.stores[store].stored_key(canonical)
        {
            return Some(Location { store, key });
        }
        None
    }

    fn looked_for(&self, name: &str) -> String {
        let canonical = if self.tied && name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let mut places = Vec::new();
        for key in merged_keys(canonical) {
            for &store in &self.merged_order {
                places.push(format!(
                    "`{key}` in {}",
                    self.stores[store].checkpoint.label().display()
                ));
            }
        }
        if canonical.starts_with("vision_model.")
            && let Some(store) = self.siglip
        {
            places.push(format!(
                "`{canonical}` in {}",
                self.stores[store].checkpoint.label().display()
            ));
        }
        if places.is_empty() {
            "no weight files".to_string()
        } else {
            places.join(", ")
        }
    }

    fn stored_shape(&self, name: &str) -> Option<Vec<usize>> {
        let loc = self.locate(name)?;
        self.stores[loc.store]
            .checkpoint
            .info(&loc.key)
            .ok()
            .map(|i| i.shape.clone())
    }

    /// Checks that every expected tensor exists with the expected shape, and that every adapter
    /// module targets one.
    fn validate(&self) -> Result<(), ExportError> {
        for (name, expected) in &self.expected {
            let loc = self
                .locate(name)
                .ok_or_else(|| ExportError::MissingTensor {
                    name: name.clone(),
                    looked: self.looked_for(name),
                })?;
            let checkpoint = &self.stores[loc.store].checkpoint;
            let info = checkpoint.info(&loc.key)?;
            if &info.shape != expected {
                return Err(ExportError::Shape {
                    file: checkpoint
                        .file_of(&loc.key)
                        .unwrap_or(checkpoint.label())
                        .to_path_buf(),
                    key: loc.key.clone(),
                    name: name.clone(),
                    expected: expected.clone(),
                    actual: info.shape.clone(),
                });
            }
        }
        for adapter in &self.adapters {
            adapter.check_targets(|module_key| {
                let canonical = canonical_of_merged(module_key);
                self.expected
                    .get(&canonical)
                    .cloned()
                    .or_else(|| self.stored_shape(&canonical))
            })?;
        }
        Ok(())
    }

    /// Bytes read from disk for all expected tensors, adapters included (for a progress bar).
    pub fn bytes_total(&self) -> u64 {
        let tensors: usize = self
            .expected
            .keys()
            .filter_map(|name| self.locate(name))
            .filter_map(|loc| {
                self.stores[loc.store]
                    .checkpoint
                    .info(&loc.key)
                    .ok()
                    .map(|i| i.byte_len())
            })
            .sum();
        let adapters: usize = self.adapters.iter().map(LoraAdapter::bytes_total).sum();
        (tensors + adapters) as u64
    }

    /// Bytes read so far by [`WeightSource::tensor`].
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The canonical names expected for this model, with their shapes.
    pub fn expected(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.expected
    }

    /// Where a canonical tensor is read from: (file, stored key, role of the store).
    pub fn origin(&self, name: &str) -> Option<(PathBuf, String, &'static str)> {
        let loc = self.locate(name)?;
        let store = &self.stores[loc.store];
        let file = store.checkpoint.file_of(&loc.key)?.to_path_buf();
        Some((file, loc.key, store.role))
    }

    fn load(&mut self, name: &str) -> Result<Tensor, ExportError> {
        let (loc, _) = self.located(name)?;
        let checkpoint = &mut self.stores[loc.store].checkpoint;
        let byte_len = checkpoint.info(&loc.key).map(|i| i.byte_len()).unwrap_or(0);
        let (shape, mut data) = checkpoint.load_f32(&loc.key)?;
        self.bytes_read += byte_len as u64;
        let module_key = merged_keys(name).swap_remove(0);
        for adapter in &mut self.adapters {
            if module_key.ends_with(".bias") {
                adapter.merge_bias(&module_key, &mut data)?;
            } else if adapter.merge(&module_key, &mut data, &shape)? {
                self.bytes_read += adapter.bytes_for(&module_key) as u64;
            }
        }
        Ok(Tensor { shape, data })
    }
}

impl ModelWeights {
    /// Where `name` is stored and its stored shape, checked against the model's configuration
    /// before any of its data is read.
    fn located(&self, name: &str) -> Result<(Location, Vec<usize>), ExportError> {
        let loc = self
            .locate(name)
            .ok_or_else(|| ExportError::MissingTensor {
                name: name.to_string(),
                looked: self.looked_for(name),
            })?;
        let checkpoint = &self.stores[loc.store].checkpoint;
        let shape = checkpoint.info(&loc.key)?.shape.clone();
        if let Some(expected) = self.expected.get(name)
            && &shape != expected
        {
            return Err(ExportError::Shape {
                file: checkpoint
                    .file_of(&loc.key)
                    .unwrap_or(checkpoint.label())
                    .to_path_buf(),
                key: loc.key,
                name: name.to_string(),
                expected: expected.clone(),
                actual: shape,
            });
        }
        Ok((loc, shape))
    }

    fn load_rows(
        &mut self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor, WeightError> {
        let err = |e: ExportError| WeightError(e.to_string());
        let (loc, shape) = self.located(name).map_err(err)?;
        let module_key = merged_keys(name).swap_remove(0);
        let module = module_key.strip_suffix(".weight").unwrap_or(&module_key);
        let adapted = self.adapters.iter().any(|a| a.scaling(module).is_some());
        if !adapted {
            let checkpoint = &mut self.stores[loc.store].checkpoint;
            let elem = checkpoint
                .info(&loc.key)
                .map(|i| i.dtype.size().unwrap_or(0))
                .unwrap_or(0);
            if let Some((shape, data)) = checkpoint
                .load_rows_f32(&loc.key, rows.clone())
                .map_err(|e| err(e.into()))?
            {
                self.bytes_read += (data.len() * elem) as u64;
                return Ok(Tensor { shape, data });
            }
        }
        // Adapted, or in a torch `.bin`: read (and merge) the whole tensor once, serve its rows
        // until the last block has been asked for.
        let whole = match self.row_cache.take() {
            Some((cached, t)) if cached == name => t,
            _ => self.load(name).map_err(err)?,
        };
        let part = carrot_graphs::weights::slice_rows(&whole, name, rows.clone())?;
        if rows.end < shape[0] {
            self.row_cache = Some((name.to_string(), whole));
        }
        Ok(part)
    }
}

impl WeightSource for ModelWeights {
    fn tensor(&mut self, name: &str) -> Result<Tensor, WeightError> {
        self.load(name).map_err(|e| WeightError(e.to_string()))
    }

    fn shape(&mut self, name: &str) -> Result<Vec<usize>, WeightError> {
        self.located(name)
            .map(|(_, shape)| shape)
            .map_err(|e| WeightError(e.to_string()))
    }

    fn rows(&mut self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor, WeightError> {
        self.load_rows(name, rows)
    }
}

fn find_support_files(dirs: &[&Path]) -> Vec<PathBuf> {
    SUPPORT_FILES
        .iter()
        .filter_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
        .collect()
}

fn read_model_config(dir: &Path) -> Result<(HfModelConfig, String), ConfigError> {
    let path = dir.join("config.json");
    Ok((read_json(&path)?, path.display().to_string()))
}

/// Opens a model directory as `carrot-export` does.
///
/// * `model_dir`: merged checkpoint, plain Llama, or LoRA output (`adapter_config.json`).
/// * `base`: the base LLM for a LoRA output (else `base_model_name_or_path` when it is a local
///   directory).
/// * `loras`: further PEFT adapters, merged in order after the model's own.
/// * `vision_tower`: a local SigLIP directory, overriding the configured vision tower.
pub fn open(
    model_dir: &Path,
    base: Option<&Path>,
    loras: &[PathBuf],
    vision_tower: Option<&Path>,
) -> Result<ResolvedModel, ExportError> {
    if !model_dir.is_dir() {
        return Err(ExportError::Layout(format!(
            "{}: not a directory",
            model_dir.display()
        )));
    }
    let is_lora_dir = model_dir.join("adapter_config.json").is_file();
    let base_dir = if is_lora_dir {
        Some(lora_base(model_dir, base)?)
    } else {
        None
    };
    if !is_lora_dir && let Some(base) = base {
        return Err(ExportError::Layout(format!(
            "--base {} was given, but {} is not a LoRA output directory (it has no adapter_config.json)",
            base.display(),
            model_dir.display()
        )));
    }

    let (cfg, cfg_file) = match (&base_dir, model_dir.join("config.json").is_file()) {
        (Some(base), false) => read_model_config(base)?,
        _ => read_model_config(model_dir)?,
    };
    let text = match (resolve_text_config(&cfg, &cfg_file), &base_dir) {
        (Ok(text), _) => text,
        (Err(ConfigError::Missing { .. }), Some(base)) => {
            let (base_cfg, base_file) = read_model_config(base)?;
            resolve_text_config(&base_cfg, &base_file)?
        }
        (Err(e), _) => return Err(e.into()),
    };

    let (kind, vision_origin) = if cfg.is_multimodal() {
        resolve_mm_keys(&cfg, &cfg_file)?;
        let (siglip, origin) = resolve_siglip(model_dir, &cfg, &cfg_file, vision_tower)?;
        let mm = resolve_multimodal(&cfg, &text, siglip, &cfg_file)?;
        (ModelKind::Multimodal(Box::new(mm)), Some(origin))
    } else {
        if let Some(dir) = vision_tower {
            return Err(ExportError::Layout(format!(
                "--vision-tower {} was given, but {cfg_file} describes a text-only model (no mm_* keys)",
                dir.display()
            )));
        }
        (ModelKind::TextOnly, None)
    };

    let mut stores = Vec::new();
    let mut merged_order = Vec::new();
    if let Some(base) = &base_dir {
        let nlt = model_dir.join("non_lora_trainables.bin");
        if nlt.is_file() {
            let checkpoint = Checkpoint::open_files(&nlt, std::slice::from_ref(&nlt))?;
            let renames = bunny_non_lora_names(checkpoint.keys());
            merged_order.push(stores.len());
            stores.push(Store {
                role: "non_lora_trainables",
                checkpoint,
                renames: Some(renames),
            });
        }
        if Checkpoint::dir_has_weights(model_dir) {
            merged_order.push(stores.len());
            stores.push(Store::new("model", Checkpoint::open_dir(model_dir)?));
        }
        merged_order.push(stores.len());
        stores.push(Store::new("base", Checkpoint::open_dir(base)?));
    } else {
        merged_order.push(stores.len());
        stores.push(Store::new("model", Checkpoint::open_dir(model_dir)?));
    }
    let llm_store = *merged_order.last().unwrap_or(&0);
    let source_dtype = stores
        .get(llm_store)
        .and_then(|s| {
            s.checkpoint
                .info("model.embed_tokens.weight")
                .ok()
                .map(|i| i.dtype.clone())
        })
        .or_else(|| {
            stores
                .get(llm_store)
                .and_then(|s| s.checkpoint.dominant_dtype())
        })
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| "float32".to_string());

    let mut expected: BTreeMap<String, Vec<usize>> = text_tensors(&text).into_iter().collect();
    let mut siglip = None;
    if let Some(mm) = kind.multimodal() {
        expected.extend(vision_tensors(&mm.vision));
        expected.extend(projector_tensors(&mm.projector));
        let probe = "vision_model.embeddings.patch_embedding.weight";
        let in_checkpoint = merged_keys(probe).iter().any(|k| {
            merged_order
                .iter()
                .any(|&s| stores[s].stored_key(k).is_some())
        });
        if !in_checkpoint {
            let Some(dir) = vision_origin.as_ref().and_then(VisionOrigin::directory) else {
                let named = cfg.mm_vision_tower.as_deref().unwrap_or("(none)");
                return Err(ExportError::Layout(format!(
                    "{}: the checkpoint has no vision tower weights and mm_vision_tower `{named}` is not a local \
                     directory; pass --vision-tower DIR with a local SigLIP checkpoint",
                    model_dir.display()
                )));
            };
            siglip = Some(stores.len());
            stores.push(Store::new("vision_tower", Checkpoint::open_dir(dir)?));
        }
    }

    let mut adapter_dirs = Vec::new();
    if is_lora_dir {
        adapter_dirs.push(model_dir.to_path_buf());
    }
    adapter_dirs.extend(loras.iter().cloned());
    let adapters = adapter_dirs
        .iter()
        .map(|d| LoraAdapter::open(d))
        .collect::<Result<Vec<_>, _>>()?;

    let weights = ModelWeights {
        stores,
        merged_order,
        siglip,
        tied: text.tie_word_embeddings,
        expected,
        adapters,
        bytes_read: 0,
        row_cache: None,
    };
    weights.validate()?;

    let mut dirs: Vec<&Path> = vec![model_dir];
    if let Some(base) = &base_dir {
        dirs.push(base);
    }
    let support_files = find_support_files(&dirs);
    let generation_config = match support_files
        .iter()
        .find(|p| p.ends_with("generation_config.json"))
    {
        Some(path) => Some(read_json::<HfGenerationConfig>(path)?),
        None => None,
    };
    let generation = GenerationDefaults::resolve(&cfg, generation_config.as_ref());

    Ok(ResolvedModel {
        model_dir: model_dir.to_path_buf(),
        layout: match base_dir {
            Some(base) => Layout::LoraOverBase { base },
            None => Layout::Merged,
        },
        text,
        kind,
        vision_origin,
        generation,
        source_dtype,
        support_files,
        loras: adapter_dirs,
        weights,
    })
}

/// The base directory of a LoRA output: `--base`, else a local `base_model_name_or_path`.
fn lora_base(model_dir: &Path, base: Option<&Path>) -> Result<PathBuf, ExportError> {
    if let Some(base) = base {
        if !base.is_dir() {
            return Err(ExportError::Layout(format!(
                "--base {}: not a directory",
                base.display()
            )));
        }
        return Ok(base.to_path_buf());
    }
    let config_path = model_dir.join("adapter_config.json");
    let raw: HfAdapterConfig = read_json(&config_path)?;
    if let Some(named) = raw.base_model_name_or_path.as_deref() {
        let path = Path::new(named);
        let candidate = if path.is_absolute() {
            path.to_path_buf()
        } else {
            model_dir.join(path)
        };
        if candidate.is_dir() && Checkpoint::dir_has_weights(&candidate) {
            return Ok(candidate);
        }
    }
    Err(ExportError::Layout(format!(
        "{} is a LoRA adapter directory (adapter_config.json); pass --base DIR with the base model it was trained on{}",
        model_dir.display(),
        raw.base_model_name_or_path
            .map(|n| format!(" (`{n}`)"))
            .unwrap_or_default()
    )))
}
