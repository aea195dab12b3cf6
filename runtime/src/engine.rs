//! An exported directory loaded into ONNX Runtime sessions, and the decoder step that the
//! generation loop drives.
//!
//! The KV cache stays in ONNX Runtime values: each step's `present.{i}.*` outputs are kept as
//! they are and bound as the next step's `past_key_values.{i}.*` inputs, never copied through
//! host arrays. Only embeddings are assembled on the host (text rows from embed.onnx and image
//! rows from vision.onnx, spliced in prompt order).

use std::path::{Path, PathBuf};
use std::time::Instant;

use carrot_contract::{Manifest, ManifestError, names};
use half::{bf16, f16};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

mod batch;

pub use batch::{BatchCache, RowOutcome, Running};

use crate::device::{Device, DeviceError};
use crate::generate::{BoxError, Model, Segment, StepInput};
pub use crate::host_rows::{ActDType, HostRows};
use crate::memory::MemoryLimit;
use crate::providers::SessionRole;

#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    OrtLib(#[from] crate::ort_lib::OrtLibError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{path}: missing graph file (listed in carrot.json)")]
    MissingGraph { path: PathBuf },
    #[error("cannot load {path}: {reason}")]
    Session { path: PathBuf, reason: String },
    #[error("{graph} has no {kind} `{name}`, which carrot.json requires")]
    Interface {
        graph: String,
        kind: &'static str,
        name: String,
    },
    #[error("this model has no vision graph; it cannot take images")]
    NoVision,
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Memory(String),
    #[error("{what}: {reason}")]
    Run { what: String, reason: String },
}

pub(crate) fn run_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Run {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// One image's projected features: `[num_image_tokens, hidden_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    pub rows: usize,
    pub hidden: usize,
    pub data: HostRows,
}

/// KV cache of one sequence: `2 × num_layers` ONNX Runtime values in decoder input order.
pub struct KvCache {
    values: Vec<DynValue>,
    len: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How to load an exported directory.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Intra-op threads per session; `None` lets ONNX Runtime choose.
    pub threads: Option<usize>,
    /// Explicit `libonnxruntime.so`.
    pub ort_lib: Option<PathBuf>,
    /// Where TensorRT keeps engine and timing caches (default: `OUT/.trt-cache`).
    pub cache_dir: Option<PathBuf>,
    /// Refuse a CPU load that would not fit in memory (see [`crate::memory`]).
    pub memory_limit: MemoryLimit,
    /// Prepack weights on all threads at load (faster, but a higher transient peak); `None`
    /// decides from the memory estimate.
    pub parallel_prepack: Option<bool>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            threads: None,
            ort_lib: None,
            cache_dir: None,
            memory_limit: MemoryLimit::default(),
            parallel_prepack: None,
        }
    }
}

/// A loaded exported directory.
pub struct Engine {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The device the sessions run on (`auto` resolved).
    pub device: Device,
    vision: Option<Session>,
    embed: Session,
    decoder: Session,
    act: ActDType,
    /// `past_key_values.{i}.*` and `present.{i}.*` in layer order, made once at load.
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// Where a shared-cache step binds its logits.
    logits_memory: ort::memory::MemoryInfo<'static>,
    /// Time spent creating sessions.
    pub load_ms: f64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.dir)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Read `DIR/carrot.json`, create one session per graph and check every graph's inputs and
    /// outputs against the manifest.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let start = Instant::now();
        let manifest = Manifest::read_dir(dir)?;
        crate::ort_lib::init(opts.ort_lib.as_deref())?;
        let device = crate::providers::resolve(&opts.device)?;
        let act = ActDType::from_manifest(&manifest.activation_dtype);
        if act == ActDType::BF16 && device == Device::Cpu {
            return Err(EngineError::Unsupported(format!(
                "{}: bf16 graphs need a GPU device (cuda or tensorrt); ONNX Runtime's CPU provider has no \
                 bfloat16 kernels. Export with --dtype fp32 or fp16 to run on the CPU",
                dir.display()
            )));
        }
        if manifest.kv_cache == "shared" && act == ActDType::BF16 {
            return Err(EngineError::Unsupported(format!(
                "{}: a shared KV cache is supported with float32 or float16 activations (this export has {})",
                dir.display(),
                manifest.activation_dtype
            )));
        }
        let mut opts = opts.clone();
        if device == Device::Cpu {
            let budget = match opts.memory_limit {
                MemoryLimit::Available => crate::memory::available(),
                MemoryLimit::Bytes(b) => Some(b),
                MemoryLimit::Off => None,
            };
            if let Some(budget) = budget {
                let estimate = crate::memory::estimate(dir, &manifest);
                crate::memory::check(dir, &manifest, &estimate, budget)
                    .map_err(EngineError::Memory)?;
                opts.parallel_prepack =
                    opts.parallel_prepack
                        .or(Some(crate::memory::room_for_parallel_prepack(
                            &estimate, budget,
                        )));
            }
        }
        let opts = &opts;
        let open = |file: &str, role: SessionRole| -> Result<Session, EngineError> {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(EngineError::MissingGraph { path });
            }
            crate::providers::session(&path, &device, opts, &manifest, role)
        };
        let vision = match &manifest.graphs.vision {
            Some(file) => Some(open(file, SessionRole::Vision)?),
            None => None,
        };
        let embed = open(&manifest.graphs.embed, SessionRole::Embed)?;
        let decoder = open(&manifest.graphs.decoder, SessionRole::Decoder)?;
        let engine = Engine {
            dir: dir.to_path_buf(),
            device,
            vision,
            embed,
            decoder,
            act,
            past_names: names::decoder_inputs(manifest.text.num_layers).split_off(3),
            present_names: names::decoder_outputs(manifest.text.num_layers).split_off(1),
            logits_memory: crate::kv_shared::host_memory()?,
            load_ms: 0.0,
            manifest,
        };
        engine.check_interfaces()?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            dir = %dir.display(),
            device = %engine.device,
            parallel_prepack = ?opts.parallel_prepack,
            "sessions created in {load_ms:.0} ms"
        );
        Ok(Engine { load_ms, ..engine })
    }

    fn check_interfaces(&self) -> Result<(), EngineError> {
        let m = &self.manifest;
        let check = |session: &Session, graph: &str, inputs: &[String], outputs: &[String]| {
            for name in inputs {
                if !session.inputs().iter().any(|o| o.name() == name) {
                    return Err(EngineError::Interface {
                        graph: graph.into(),
                        kind: "input",
                        name: name.clone(),
                    });
                }
            }
            for name in outputs {
                if !session.outputs().iter().any(|o| o.name() == name) {
                    return Err(EngineError::Interface {
                        graph: graph.into(),
                        kind: "output",
                        name: name.clone(),
                    });
                }
            }
            Ok(())
        };
        if let (Some(session), Some(file)) = (&self.vision, &m.graphs.vision) {
            check(
                session,
                file,
                &[names::PIXEL_VALUES.into()],
                &[names::IMAGE_FEATURES.into()],
            )?;
        }
        check(
            &self.embed,
            &m.graphs.embed,
            &[names::INPUT_IDS.into()],
            &[names::INPUTS_EMBEDS.into()],
        )?;
        check(
            &self.decoder,
            &m.graphs.decoder,
            &names::decoder_inputs(m.text.num_layers),
            &names::decoder_outputs(m.text.num_layers),
        )?;
        // Embeddings and image features are spliced by rows of `hidden_size`: every graph must
        // agree with the manifest on that width.
        let hidden = m.text.hidden_size as i64;
        let mut widths = vec![
            (&self.embed, &m.graphs.embed, names::INPUTS_EMBEDS, false),
            (&self.decoder, &m.graphs.decoder, names::INPUTS_EMBEDS, true),
        ];
        if let (Some(session), Some(file)) = (&self.vision, &m.graphs.vision) {
            widths.push((session, file, names::IMAGE_FEATURES, false));
        }
        for (session, file, name, input) in widths {
            let outlets = if input {
                session.inputs()
            } else {
                session.outputs()
            };
            let last = outlets
                .iter()
                .find(|o| o.name() == name)
                .and_then(|o| match o.dtype() {
                    ort::value::ValueType::Tensor { shape, .. } => shape.last().copied(),
                    _ => None,
                });
            if let Some(width) = last.filter(|&w| w >= 0 && w != hidden) {
                return Err(EngineError::Unsupported(format!(
                    "{file}: `{name}` is {width} wide but carrot.json says text.hidden_size {hidden}"
                )));
            }
        }
        Ok(())
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    /// Run vision.onnx on preprocessed images (`[3, S, S]` each) → one [`ImageFeatures`] per image.
    pub fn encode_images(
        &mut self,
        pixel_values: &[Vec<f32>],
    ) -> Result<Vec<ImageFeatures>, EngineError> {
        let vision_cfg = self.manifest.vision.clone().ok_or(EngineError::NoVision)?;
        let session = self.vision.as_mut().ok_or(EngineError::NoVision)?;
        let s = vision_cfg.image_size;
        let mut out = Vec::with_capacity(pixel_values.len());
        for pixels in pixel_values {
            if pixels.len() != 3 * s * s {
                return Err(run_err(
                    "pixel_values",
                    format!("expected 3x{s}x{s} values, got {}", pixels.len()),
                ));
            }
            let input =
                ort::value::TensorRef::from_array_view((vec![1usize, 3, s, s], pixels.as_slice()))
                    .map_err(|e| run_err("pixel_values", e))?;
            let outputs = session
                .run(vec![(
                    names::PIXEL_VALUES,
                    ort::session::SessionInputValue::from(input),
                )])
                .map_err(|e| run_err("vision.onnx", e))?;
            let value = outputs
                .get(names::IMAGE_FEATURES)
                .ok_or_else(|| run_err("vision.onnx", "no image_features"))?;
            let (shape, data) = HostRows::from_value(value, "image_features")?;
            let [_, rows, hidden] = shape[..] else {
                return Err(run_err(
                    "image_features",
                    format!("unexpected shape {shape:?}"),
                ));
            };
            out.push(ImageFeatures { rows, hidden, data });
        }
        Ok(out)
    }

    /// Run embed.onnx on `ids` → `[ids.len(), hidden]` rows.
    pub(crate) fn embed(&mut self, ids: &[u32]) -> Result<HostRows, EngineError> {
        let ids64: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let input = Tensor::from_array((vec![1usize, ids.len()], ids64))
            .map_err(|e| run_err("input_ids", e))?;
        let outputs = self
            .embed
            .run(vec![(names::INPUT_IDS, input.into_dyn())])
            .map_err(|e| run_err("embed.onnx", e))?;
        let value = outputs
            .get(names::INPUTS_EMBEDS)
            .ok_or_else(|| run_err("embed.onnx", "no inputs_embeds"))?;
        Ok(HostRows::from_value(value, "inputs_embeds")?.1)
    }

    /// With `kv_cache: "shared"`, the decoder keeps its cache in one preallocated buffer per
    /// layer, bound as both past and present, of at most this many positions (`max_sequence`).
    fn shared_capacity(&self) -> Option<usize> {
        self.manifest
            .max_sequence
            .filter(|_| self.manifest.kv_cache == "shared")
    }

    /// Keep the first `len` positions of `cache`.
    pub fn truncate(&self, cache: &mut KvCache, len: usize) -> Result<(), EngineError> {
        if len >= cache.len {
            return Ok(());
        }
        if self.shared_capacity().is_none() {
            for value in &mut cache.values {
                *value = match self.act {
                    ActDType::F32 => truncated::<f32>(value, len)?,
                    ActDType::F16 => truncated::<f16>(value, len)?,
                    ActDType::BF16 => truncated::<bf16>(value, len)?,
                };
            }
        }
        // A shared buffer keeps its capacity; the next step overwrites from `len` on.
        cache.len = len;
        Ok(())
    }

    /// A cache holding no positions.
    pub fn empty_cache(&self) -> Result<KvCache, EngineError> {
        let t = &self.manifest.text;
        if let Some(max) = self.shared_capacity() {
            let capacity = max.min(crate::kv_shared::INITIAL_CAPACITY);
            let values = crate::kv_shared::allocate(
                self.act,
                crate::kv_shared::Placement::of(&self.device),
                t.num_layers,
                t.num_kv_heads,
                capacity,
                t.head_dim,
            )?;
            return Ok(KvCache { values, len: 0 });
        }
        let mut values = Vec::with_capacity(2 * t.num_layers);
        for _ in 0..2 * t.num_layers {
            let shape = vec![1usize, t.num_kv_heads, 0, t.head_dim];
            values.push(HostRows::empty(self.act).into_value(shape)?);
        }
        Ok(KvCache { values, len: 0 })
    }

    fn run_step(
        &mut self,
        cache: &mut KvCache,
        input: &StepInput<'_, ImageFeatures>,
    ) -> Result<Vec<f32>, EngineError> {
        self.run_decoder(cache, input, |logits, vocab| {
            logits[logits.len() - vocab..].to_vec()
        })
    }

    /// The embeddings of `segments`: text rows from embed.onnx (one run for all of them) and
    /// image rows from `images`, in order.
    pub(crate) fn input_embeds(
        &mut self,
        segments: &[Segment<'_>],
        images: &[ImageFeatures],
    ) -> Result<HostRows, EngineError> {
        let hidden = self.manifest.text.hidden_size;
        let text_ids: Vec<u32> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Tokens(ids) => Some(ids.iter().copied()),
                Segment::Image { .. } => None,
            })
            .flatten()
            .collect();
        let text = if text_ids.is_empty() {
            HostRows::empty(self.act)
        } else {
            self.embed(&text_ids)?
        };
        let mut embeds = HostRows::empty(self.act);
        let mut text_row = 0;
        for segment in segments {
            match segment {
                Segment::Tokens(ids) => {
                    embeds.extend_from(
                        &text,
                        text_row * hidden,
                        (text_row + ids.len()) * hidden,
                    )?;
                    text_row += ids.len();
                }
                Segment::Image { index, rows } => {
                    let image = images
                        .get(*index)
                        .ok_or_else(|| run_err("inputs_embeds", format!("no image {index}")))?;
                    if image.hidden != hidden || rows.end > image.rows {
                        return Err(run_err(
                            "image_features",
                            format!(
                                "image is {}x{}, decoder wants width {hidden}",
                                image.rows, image.hidden
                            ),
                        ));
                    }
                    embeds.extend_from(&image.data, rows.start * hidden, rows.end * hidden)?;
                }
            }
        }
        Ok(embeds)
    }

    /// The decoder's non-cache inputs for one sequence's step: `inputs_embeds` (text and image
    /// rows spliced), `attention_mask` and `position_ids`, batch 1.
    pub(crate) fn step_inputs(
        &mut self,
        input: &StepInput<'_, ImageFeatures>,
    ) -> Result<[(&'static str, DynValue); 3], EngineError> {
        let hidden = self.manifest.text.hidden_size;
        let seq = input.seq_len();
        let embeds = self.input_embeds(input.segments, input.images)?;
        if embeds.len() != seq * hidden {
            return Err(run_err(
                "inputs_embeds",
                format!("{} values for {seq} positions", embeds.len()),
            ));
        }
        let mask = Tensor::from_array((
            vec![1usize, input.attention_mask.len()],
            input.attention_mask.to_vec(),
        ))
        .map_err(|e| run_err("attention_mask", e))?;
        let positions = Tensor::from_array((vec![1usize, seq], input.position_ids.to_vec()))
            .map_err(|e| run_err("position_ids", e))?;
        Ok([
            (
                names::INPUTS_EMBEDS,
                embeds.into_value(vec![1, seq, hidden])?,
            ),
            (names::ATTENTION_MASK, mask.into_dyn()),
            (names::POSITION_IDS, positions.into_dyn()),
        ])
    }

    /// Grow the shared-cache `buffers` (`[1, heads, capacity, head_dim]` each, any number of
    /// heads) to hold `needed` positions, keeping the first `used`; refuse beyond
    /// `max_sequence`. Capacity doubles, so growth happens a logarithmic number of times.
    pub(crate) fn fit_shared(
        &self,
        buffers: &mut [DynValue],
        used: usize,
        needed: usize,
    ) -> Result<(), EngineError> {
        let max = self.shared_capacity().unwrap_or(usize::MAX);
        if needed > max {
            return Err(run_err(
                "decoder.onnx",
                format!("{needed} positions do not fit the KV cache of max_sequence {max}"),
            ));
        }
        let capacity = crate::kv_shared::capacity(buffers);
        if needed > capacity {
            let heads = buffers
                .first()
                .and_then(|b| b.shape().get(1).copied())
                .map_or(0, |h| h.max(0) as usize);
            crate::kv_shared::grow(
                buffers,
                self.act,
                crate::kv_shared::Placement::of(&self.device),
                (heads, self.manifest.text.head_dim),
                used,
                needed.max(2 * capacity).min(max),
            )?;
        }
        Ok(())
    }

    /// Runs the decoder on the new positions of `input` (extending `cache`) and hands the logits
    /// it returned — `[rows, vocab]`, every new position when the manifest says `logits: "all"`,
    /// else only the last — to `read`, without copying them.
    pub fn run_decoder<T>(
        &mut self,
        cache: &mut KvCache,
        input: &StepInput<'_, ImageFeatures>,
        read: impl FnOnce(&[f32], usize) -> T,
    ) -> Result<T, EngineError> {
        let [embeds, mask, positions] = self.step_inputs(input)?;
        let needed = input.past_len + input.seq_len();
        if self.shared_capacity().is_some() {
            self.fit_shared(&mut cache.values, input.past_len, needed)?;
            let result = crate::kv_shared::run(
                &mut self.decoder,
                vec![embeds, mask, positions],
                &mut cache.values,
                (&self.past_names, &self.present_names),
                &self.logits_memory,
                read,
            )?;
            cache.len = needed;
            return Ok(result);
        }
        let layers = self.manifest.text.num_layers;
        let mut feeds: Vec<(&str, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(3 + 2 * layers);
        for (name, value) in [embeds, mask, positions] {
            feeds.push((name, value.into()));
        }
        for (name, value) in self.past_names.iter().zip(&cache.values) {
            feeds.push((name.as_str(), value.into()));
        }
        let mut outputs = self
            .decoder
            .run(feeds)
            .map_err(|e| run_err("decoder.onnx", e))?;
        let result = read_logits(&outputs, read)?;
        let mut next = Vec::with_capacity(2 * layers);
        for name in &self.present_names {
            next.push(
                outputs
                    .remove(name)
                    .ok_or_else(|| run_err("decoder.onnx", format!("no {name}")))?,
            );
        }
        drop(outputs);
        cache.values = next;
        cache.len = needed;
        Ok(result)
    }
}

impl Model for Engine {
    type Cache = KvCache;
    type Image = ImageFeatures;

    fn num_image_tokens(&self) -> usize {
        self.manifest
            .vision
            .as_ref()
            .map_or(0, |v| v.num_image_tokens)
    }

    fn new_cache(&mut self) -> Result<Self::Cache, BoxError> {
        Ok(self.empty_cache()?)
    }

    fn step(
        &mut self,
        cache: &mut Self::Cache,
        input: &StepInput<'_, Self::Image>,
    ) -> Result<Vec<f32>, BoxError> {
        Ok(self.run_step(cache, input)?)
    }

    fn truncate_cache(&mut self, cache: &mut Self::Cache, len: usize) -> Result<(), BoxError> {
        Ok(self.truncate(cache, len)?)
    }
}

/// The first `len` positions of a `[1, heads, positions, head_dim]` cache tensor.
fn truncated<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
    value: &DynValue,
    len: usize,
) -> Result<DynValue, EngineError> {
    let (shape, data) = value
        .try_extract_tensor::<T>()
        .map_err(|e| run_err("KV cache", e))?;
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let [b, heads, positions, head_dim] = dims[..] else {
        return Err(run_err("KV cache", format!("unexpected shape {shape:?}")));
    };
    let keep = len.min(positions);
    let mut out = Vec::with_capacity(b * heads * keep * head_dim);
    for row in data.chunks_exact(positions * head_dim) {
        out.extend_from_slice(&row[..keep * head_dim]);
    }
    Tensor::from_array((vec![b, heads, keep, head_dim], out))
        .map(|t| t.into_dyn())
        .map_err(|e| run_err("KV cache", e))
}

/// Hands the decoder's `logits` (`[rows, vocab]` float32) to `read` without copying them.
pub(crate) fn read_logits<T>(
    outputs: &ort::session::SessionOutputs<'_>,
    read: impl FnOnce(&[f32], usize) -> T,
) -> Result<T, EngineError> {
    let logits = outputs
        .get(names::LOGITS)
        .ok_or_else(|| run_err("decoder.onnx", "no logits"))?;
    let (shape, data) = logits
        .try_extract_tensor::<f32>()
        .map_err(|e| run_err("logits", e))?;
    let vocab = shape.last().copied().unwrap_or(0) as usize;
    if vocab == 0 || data.len() < vocab || !data.len().is_multiple_of(vocab) {
        return Err(run_err("logits", format!("unexpected shape {shape:?}")));
    }
    Ok(read(data, vocab))
}
