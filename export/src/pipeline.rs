//! The export itself: resolve the checkpoint, stream its weights through the graph builders into
//! a temporary sibling of `--out`, write the manifest and support files, then rename into place.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use carrot_contract::manifest::{self, Manifest};
use carrot_contract::names;
use carrot_graphs::builder::GraphBuilder;
use carrot_graphs::config::{DType, Flavor};
use carrot_graphs::llama::{self, Logits};
use carrot_graphs::nn::{Ctx, GraphError};
use carrot_graphs::quant::{Bits, QuantSpec};
use carrot_graphs::vision;
use carrot_graphs::weights::{Tensor, WeightError, WeightSource};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;

use crate::mm_config::ModelKind;
use crate::rope_freq::llama3_inv_freq;
use crate::source::{self, ExportError, ModelWeights, ResolvedModel};

/// Default-domain opset of every graph: accepted by ONNX Runtime 1.31 and TensorRT 10.
pub const OPSET: i64 = 21;

/// Weight format of the exported graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    Float(DType),
    /// Weight-only quantization of the decoder's matrices, the lm_head and the embedding table;
    /// activations, norms and the vision tower in float32.
    Quantized(QuantSpec),
}

/// Default `--block-size`.
pub const DEFAULT_BLOCK_SIZE: usize = 32;

impl WeightFormat {
    /// `fp32`, `fp16`, `bf16`, `int4` or `int8` (quantized with [`DEFAULT_BLOCK_SIZE`]).
    pub fn parse(s: &str) -> Option<Self> {
        let quantized = |bits| {
            WeightFormat::Quantized(QuantSpec {
                bits,
                block_size: DEFAULT_BLOCK_SIZE,
            })
        };
        Some(match s {
            "fp32" => WeightFormat::Float(DType::F32),
            "fp16" => WeightFormat::Float(DType::F16),
            "bf16" => WeightFormat::Float(DType::BF16),
            "int4" => quantized(Bits::Int4),
            "int8" => quantized(Bits::Int8),
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Float(DType::F32) => "fp32",
            WeightFormat::Float(DType::F16) => "fp16",
            WeightFormat::Float(DType::BF16) => "bf16",
            WeightFormat::Quantized(QuantSpec {
                bits: Bits::Int4, ..
            }) => "int4",
            WeightFormat::Quantized(QuantSpec {
                bits: Bits::Int8, ..
            }) => "int8",
        }
    }

    /// The same format with another quantization block size (float formats are unchanged).
    pub fn with_block_size(self, block_size: usize) -> Self {
        match self {
            WeightFormat::Quantized(spec) => {
                WeightFormat::Quantized(QuantSpec { block_size, ..spec })
            }
            float => float,
        }
    }

    /// Element type of activations (and of unquantized weights).
    pub fn activation_dtype(self) -> DType {
        match self {
            WeightFormat::Float(d) => d,
            WeightFormat::Quantized(_) => DType::F32,
        }
    }

    pub fn quant(self) -> Option<QuantSpec> {
        match self {
            WeightFormat::Float(_) => None,
            WeightFormat::Quantized(spec) => Some(spec),
        }
    }
}

/// Everything an export needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub model: PathBuf,
    pub out: PathBuf,
    pub base: Option<PathBuf>,
    pub loras: Vec<PathBuf>,
    pub vision_tower: Option<PathBuf>,
    pub format: WeightFormat,
    pub flavor: String,
    pub logits: Logits,
    pub force: bool,
    /// Show progress bars on stderr.
    pub progress: bool,
    /// Matrices with more elements are read, converted and quantized a block of rows at a time
    /// (default [`carrot_graphs::nn::STREAM_ELEMENTS`]; the output is the same either way).
    pub stream_elements: usize,
}

impl ExportPlan {
    /// `carrot-export --model MODEL --out OUT` in `format` with the command line's other defaults:
    /// no base, adapters or vision tower of its own, the portable flavor, logits for the last
    /// position, no `--force`, no progress bars, large matrices streamed.
    pub fn new(model: PathBuf, out: PathBuf, format: WeightFormat) -> Self {
        Self {
            model,
            out,
            base: None,
            loras: Vec::new(),
            vision_tower: None,
            format,
            flavor: "portable".into(),
            logits: Logits::Last,
            force: false,
            progress: false,
            stream_elements: carrot_graphs::nn::STREAM_ELEMENTS,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub out: PathBuf,
    /// (file name, bytes) of every file written.
    pub files: Vec<(String, u64)>,
    pub dtype: &'static str,
    pub seconds: f64,
    pub tensors: usize,
    pub multimodal: bool,
}

#[derive(thiserror::Error, Debug)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] ExportError),
    #[error("building {graph}: {source}")]
    Graph { graph: String, source: GraphError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Plan(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary output directory of the export in progress, for [`remove_partial_output`].
static PARTIAL: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Remove the temporary directory of an export in progress (for an interrupt handler: the process
/// is about to exit without unwinding, so [`TempDir`]'s drop would not run).
pub fn remove_partial_output() {
    let partial = PARTIAL.lock().map(|mut p| p.take()).unwrap_or_default();
    if let Some(path) = partial {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Removes a temporary output directory unless it was moved into place.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(path: PathBuf) -> Self {
        if let Ok(mut p) = PARTIAL.lock() {
            *p = Some(path.clone());
        }
        TempDir { path, keep: false }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Ok(mut p) = PARTIAL.lock() {
            *p = None;
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Check the plan against the file system before anything is read or written.
pub fn check_plan(plan: &ExportPlan) -> Result<(), PipelineError> {
    if let Some(spec) = plan.format.quant() {
        let bs = spec.block_size;
        if !(bs.is_power_of_two() && (16..=256).contains(&bs)) {
            return Err(PipelineError::Plan(format!(
                "--block-size {bs}: must be a power of two from 16 to 256"
            )));
        }
    }
    if flavor(plan)? == Flavor::Ort && plan.format == WeightFormat::Float(DType::BF16) {
        return Err(PipelineError::Plan(
            "--flavor ort takes --dtype fp32, fp16, int8 or int4 (ONNX Runtime's \
             GroupQueryAttention has no bfloat16 kernel); export bf16 with --flavor portable"
                .into(),
        ));
    }
    if plan.out.exists() && !plan.force {
        return Err(out_exists(&plan.out));
    }
    if plan.out.exists() && !plan.out.is_dir() {
        return Err(PipelineError::Plan(format!(
            "--out {} exists and is not a directory",
            plan.out.display()
        )));
    }
    Ok(())
}

fn flavor(plan: &ExportPlan) -> Result<Flavor, PipelineError> {
    match plan.flavor.as_str() {
        "portable" => Ok(Flavor::Portable),
        "ort" => Ok(Flavor::Ort),
        other => Err(PipelineError::Plan(format!(
            "--flavor {other}: expected portable or ort"
        ))),
    }
}

/// Counts tensors and bytes as they are handed to the graph builders.
struct Progress<'a> {
    inner: &'a mut ModelWeights,
    bar: ProgressBar,
    tensors: usize,
}

impl WeightSource for Progress<'_> {
    fn tensor(&mut self, name: &str) -> Result<Tensor, WeightError> {
        self.bar.set_message(name.to_string());
        let t = self.inner.tensor(name)?;
        self.tensors += 1;
        self.bar.set_position(self.inner.bytes_read());
        Ok(t)
    }

    fn shape(&mut self, name: &str) -> Result<Vec<usize>, WeightError> {
        self.inner.shape(name)
    }

    fn rows(&mut self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor, WeightError> {
        self.bar.set_message(name.to_string());
        if rows.start == 0 {
            self.tensors += 1;
        }
        let t = self.inner.rows(name, rows)?;
        self.bar.set_position(self.inner.bytes_read());
        Ok(t)
    }
}

/// Run the export.
pub fn export(plan: &ExportPlan) -> Result<ExportSummary, PipelineError> {
    check_plan(plan)?;
    let start = Instant::now();
    let dtype = plan.format.activation_dtype();
    let quant = plan.format.quant();
    let flavor = flavor(plan)?;
    let mut model = source::open(
        &plan.model,
        plan.base.as_deref(),
        &plan.loras,
        plan.vision_tower.as_deref(),
    )?;

    let preprocessing = match model.kind.multimodal() {
        Some(mm) => crate::preprocessor::read(
            model
                .vision_origin
                .as_ref()
                .and_then(crate::siglip_table::VisionOrigin::directory),
            mm.vision.tower.image_size,
        )
        .map_err(PipelineError::Plan)?,
        None => crate::preprocessor::Preprocessing::default(),
    };
    let out = absolute(&plan.out);
    let parent = out
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let leaf = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("export")
        .to_string();
    let tmp = TempDir::new(parent.join(format!(".{leaf}.partial-{}", std::process::id())));
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path).map_err(io(&tmp.path))?;
    }
    std::fs::create_dir_all(&tmp.path).map_err(io(&tmp.path))?;

    let bar = if plan.progress {
        ProgressBar::new(model.weights.bytes_total())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix:>12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut files = Vec::new();
    let mut tensors = 0;
    {
        let mut weights = Progress {
            inner: &mut model.weights,
            bar: bar.clone(),
            tensors: 0,
        };
        let text = model.text.clone();
        if let ModelKind::Multimodal(mm) = &model.kind {
            let mm = mm.clone();
            bar.set_prefix(names::VISION_GRAPH);
            files.extend(write_graph(
                &tmp.path,
                names::VISION_GRAPH,
                (dtype, None, flavor),
                plan.stream_elements,
                &mut weights,
                |ctx| vision::build_vision(ctx, &mm.vision, &mm.projector),
            )?);
        }
        bar.set_prefix(names::EMBED_GRAPH);
        files.extend(write_graph(
            &tmp.path,
            names::EMBED_GRAPH,
            (dtype, quant, flavor),
            plan.stream_elements,
            &mut weights,
            |ctx| llama::build_embed(ctx, &text),
        )?);
        let inv_freq = llama3_inv_freq(text.head_dim, &text.rope);
        bar.set_prefix(names::DECODER_GRAPH);
        files.extend(write_graph(
            &tmp.path,
            names::DECODER_GRAPH,
            (dtype, quant, flavor),
            plan.stream_elements,
            &mut weights,
            |ctx| llama::build_decoder(ctx, &text, &inv_freq, plan.logits),
        )?);
        tensors += weights.tensors;
    }
    bar.finish_and_clear();

    let manifest = build_manifest(plan, &model, (dtype, flavor), &preprocessing);
    let manifest_path = tmp.path.join(names::MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.to_json()).map_err(io(&manifest_path))?;
    files.push((names::MANIFEST_FILE.to_string(), file_len(&manifest_path)));
    for src in &model.support_files {
        let Some(name) = src.file_name() else {
            continue;
        };
        let dst = tmp.path.join(name);
        std::fs::copy(src, &dst).map_err(io(src))?;
        files.push((name.to_string_lossy().into_owned(), file_len(&dst)));
    }

    move_into_place(&tmp.path, &out, plan.force)?;
    let mut tmp = tmp;
    tmp.keep = true;
    Ok(ExportSummary {
        out,
        files,
        dtype: plan.format.name(),
        seconds: start.elapsed().as_secs_f64(),
        tensors,
        multimodal: model.kind.multimodal().is_some(),
    })
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Build one graph with its weights streamed to `FILE.data`, then write `FILE`.
fn write_graph(
    dir: &Path,
    file: &str,
    (dtype, quant, flavor): (DType, Option<QuantSpec>, Flavor),
    stream_elements: usize,
    weights: &mut dyn WeightSource,
    build: impl FnOnce(&mut Ctx<'_>) -> Result<(), GraphError>,
) -> Result<Vec<(String, u64)>, PipelineError> {
    let data_name = format!("{file}.data");
    let data_path = dir.join(&data_name);
    let data = File::create(&data_path).map_err(io(&data_path))?;
    let sink = Box::new(crate::sink::BackgroundFile::new(data).map_err(io(&data_path))?);
    let graph_name = file.trim_end_matches(".onnx");
    let mut builder = GraphBuilder::with_external_data(graph_name, &data_name, sink);
    let graph_err = |source| PipelineError::Graph {
        graph: file.to_string(),
        source,
    };
    {
        let mut ctx = Ctx {
            b: &mut builder,
            weights,
            dtype,
            quant,
            flavor,
            stream_elements,
        };
        build(&mut ctx).map_err(graph_err)?;
    }
    let external = builder.external_bytes();
    let proto = builder
        .finish(OPSET, "carrot-export", env!("CARGO_PKG_VERSION"))
        .map_err(|e| graph_err(GraphError::Build(e)))?;
    let path = dir.join(file);
    let mut f = BufWriter::new(File::create(&path).map_err(io(&path))?);
    f.write_all(&proto.encode_to_vec()).map_err(io(&path))?;
    f.flush().map_err(io(&path))?;
    let mut written = vec![(file.to_string(), file_len(&path))];
    if external == 0 {
        std::fs::remove_file(&data_path).map_err(io(&data_path))?;
    } else {
        written.push((data_name, file_len(&data_path)));
    }
    Ok(written)
}

fn out_exists(out: &Path) -> PipelineError {
    PipelineError::Plan(format!(
        "--out {} already exists; pass --force to replace it",
        out.display()
    ))
}

fn move_into_place(tmp: &Path, out: &Path, force: bool) -> Result<(), PipelineError> {
    if out.exists() {
        // Checked again here: the directory may have appeared while the export ran.
        if !force {
            return Err(out_exists(out));
        }
        let old = out.with_file_name(format!(
            ".{}.old-{}",
            out.file_name().and_then(|n| n.to_str()).unwrap_or("export"),
            std::process::id()
        ));
        std::fs::rename(out, &old).map_err(io(out))?;
        if let Err(e) = std::fs::rename(tmp, out) {
            let _ = std::fs::rename(&old, out);
            return Err(PipelineError::Io {
                path: out.to_path_buf(),
                source: e,
            });
        }
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(tmp, out).map_err(io(out))?;
    }
    Ok(())
}

fn build_manifest(
    plan: &ExportPlan,
    model: &ResolvedModel,
    (dtype, flavor): (DType, Flavor),
    pre: &crate::preprocessor::Preprocessing,
) -> Manifest {
    let text = &model.text;
    let gen_cfg = &model.generation;
    let mm = model.kind.multimodal();
    let has_chat_template = model
        .support_files
        .iter()
        .any(|p| p.ends_with("chat_template.jinja"))
        || model
            .support_files
            .iter()
            .find(|p| p.ends_with("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v.get("chat_template").is_some());
    let template = match (mm.is_some(), has_chat_template) {
        (true, _) => "bunny-llama",
        (false, true) => "chat-template",
        (false, false) => "raw",
    };
    let max_length = mm
        .and_then(|m| m.settings.tokenizer_model_max_length)
        .unwrap_or(text.max_position_embeddings);
    // GroupQueryAttention writes into one buffer per layer bound as both past and present.
    let shared_cache = llama::uses_gqa(flavor, text);
    let sampling = if gen_cfg.do_sample == Some(false) {
        (0.0, 1.0)
    } else {
        (
            gen_cfg.temperature.unwrap_or(1.0),
            gen_cfg.top_p.unwrap_or(1.0),
        )
    };
    Manifest {
        format: manifest::FORMAT.into(),
        exporter: manifest::Exporter {
            name: "carrot-export".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        source: manifest::Source {
            model: plan.model.display().to_string(),
            lora: model
                .loras
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            dtype_in: model.source_dtype.clone(),
            base: plan.base.as_ref().map(|p| p.display().to_string()),
        },
        dtype: plan.format.name().into(),
        activation_dtype: dtype.manifest_name().into(),
        flavor: flavor.manifest_name().into(),
        kv_cache: if shared_cache { "shared" } else { "concat" }.into(),
        logits: plan.logits.manifest_name().into(),
        graphs: manifest::Graphs {
            vision: mm.map(|_| names::VISION_GRAPH.into()),
            embed: names::EMBED_GRAPH.into(),
            decoder: names::DECODER_GRAPH.into(),
        },
        text: manifest::Text {
            hidden_size: text.hidden_size,
            num_layers: text.num_layers,
            num_attention_heads: text.num_attention_heads,
            num_kv_heads: text.num_kv_heads,
            head_dim: text.head_dim,
            vocab_size: text.vocab_size,
            max_position_embeddings: text.max_position_embeddings,
        },
        vision: mm.map(|m| manifest::Vision {
            image_size: m.vision.tower.image_size,
            num_image_tokens: m.vision.num_image_tokens(),
            image_aspect_ratio: m.settings.image_aspect_ratio.manifest_name().into(),
            pad_color: pre.pad_color,
            resample: "bicubic".into(),
            rescale: pre.rescale,
            mean: pre.mean,
            std: pre.std,
        }),
        prompt: manifest::Prompt {
            template: template.into(),
            image_token: "<image>".into(),
            image_token_index: -200,
            bos_token_id: gen_cfg.bos_token_id.and_then(|b| u32::try_from(b).ok()),
            eos_token_ids: gen_cfg
                .eos_token_ids
                .iter()
                .filter_map(|&e| u32::try_from(e).ok())
                .collect(),
            max_length,
        },
        sampling_defaults: manifest::SamplingDefaults {
            temperature: sampling.0,
            top_p: sampling.1,
            // transformers samples with top_k 50 unless the generation config says otherwise.
            top_k: Some(gen_cfg.top_k.unwrap_or(50)).filter(|&k| k > 0),
            max_new_tokens: gen_cfg.max_new_tokens.unwrap_or(512),
        },
        max_sequence: shared_cache.then_some(max_length.min(text.max_position_embeddings)),
        quantization: plan.format.quant().map(|spec| manifest::Quantization {
            bits: spec.bits.width() as u32,
            block_size: spec.block_size,
            weights: ["decoder_linears", "lm_head", "embed_tokens"]
                .map(String::from)
                .to_vec(),
        }),
    }
}
