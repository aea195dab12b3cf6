//! What the export tests share: exports of the fixture models (made once per test process),
//! the reference goldens, ONNX Runtime sessions fed from them, tolerance checks, a greedy
//! driver over an exported directory, and a text dump of a graph's structure.

mod cli;
mod onnx_text;

pub use cli::export_cli;
pub use onnx_text::{data_type_name, external_entry, graph_structure, read_model, value_type};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use carrot_export::pipeline::{self, ExportPlan, ExportSummary, PipelineError, WeightFormat};
use carrot_graphs::config::{DType, Flavor};
use carrot_graphs::llama::Logits;
use carrot_runtime::engine::{Engine, ImageFeatures, LoadOptions};
use carrot_runtime::generate::{
    self, BoxError, Decode, GenerateOptions, PromptPart, Request, SamplingOptions,
};
use half::{bf16, f16};
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::workspace_root;

/// `fixtures/models/NAME`.
pub fn fixture_model(name: &str) -> PathBuf {
    workspace_root().join("fixtures/models").join(name)
}

/// `fixtures/goldens/NAME`.
pub fn fixture_golden(name: &str) -> PathBuf {
    workspace_root().join("fixtures/goldens").join(name)
}

/// The ways a fixture can be exported (the `export` entries of `generate.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `--model carrot-tiny`: merged checkpoint with its own vision tower weights.
    Merged,
    /// `--model carrot-tiny --vision-tower siglip-tiny`.
    MergedExplicitTower,
    /// `--model carrot-lora-tiny --base llama-base-tiny`: Bunny LoRA output directory.
    LoraOverBase,
    /// `--model llama-base-tiny`: plain Llama, text-only.
    TextOnly,
    /// `--model llama-base-tiny --lora lora-rslora-tiny`.
    TextOnlyRslora,
}

impl Layout {
    pub const ALL: [Layout; 5] = [
        Layout::Merged,
        Layout::MergedExplicitTower,
        Layout::LoraOverBase,
        Layout::TextOnly,
        Layout::TextOnlyRslora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layout::Merged => "carrot-tiny",
            Layout::MergedExplicitTower => "carrot-tiny+siglip-tiny",
            Layout::LoraOverBase => "carrot-lora-tiny+llama-base-tiny",
            Layout::TextOnly => "llama-base-tiny",
            Layout::TextOnlyRslora => "llama-base-tiny+lora-rslora-tiny",
        }
    }

    /// Whether the export has a vision graph.
    pub fn multimodal(self) -> bool {
        matches!(
            self,
            Layout::Merged | Layout::MergedExplicitTower | Layout::LoraOverBase
        )
    }

    /// The plan `carrot-export` makes from this layout's command line, with `-q`.
    pub fn plan(self, out: &Path, format: WeightFormat) -> ExportPlan {
        let (model, base, loras, tower) = match self {
            Layout::Merged => ("carrot-tiny", None, vec![], None),
            Layout::MergedExplicitTower => ("carrot-tiny", None, vec![], Some("siglip-tiny")),
            Layout::LoraOverBase => ("carrot-lora-tiny", Some("llama-base-tiny"), vec![], None),
            Layout::TextOnly => ("llama-base-tiny", None, vec![], None),
            Layout::TextOnlyRslora => ("llama-base-tiny", None, vec!["lora-rslora-tiny"], None),
        };
        ExportPlan {
            base: base.map(fixture_model),
            loras: loras.into_iter().map(fixture_model).collect(),
            vision_tower: tower.map(fixture_model),
            logits: Logits::All,
            ..ExportPlan::new(fixture_model(model), out.to_path_buf(), format)
        }
    }
}

/// The `--dtype` format of a float dtype.
pub fn float_format(dtype: DType) -> WeightFormat {
    WeightFormat::Float(dtype)
}

/// `--dtype int4|int8 --block-size N`.
pub fn int_format(dtype: &str, block_size: usize) -> WeightFormat {
    WeightFormat::parse(dtype)
        .filter(|f| f.quant().is_some())
        .unwrap_or_else(|| panic!("{dtype} is not a quantized --dtype"))
        .with_block_size(block_size)
}

/// An exported directory that lives as long as the test process.
#[derive(Debug)]
pub struct Exported {
    pub layout: Layout,
    pub format: WeightFormat,
    /// Activation dtype (float32 for quantized formats).
    pub dtype: DType,
    pub dir: PathBuf,
    pub summary: ExportSummary,
}

impl Exported {
    pub fn graph(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

const EXPORT_ROOT_PREFIX: &str = "carrot-export-tests-";

/// Removes export roots left by test processes that no longer run (statics are never dropped,
/// so a process cannot remove its own root when it exits).
fn sweep_stale_roots() {
    let proc_fs = Path::new("/proc");
    if !proc_fs.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(EXPORT_ROOT_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !proc_fs.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A temporary directory holding this process's cached exports.
fn export_root() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        sweep_stale_roots();
        tempfile::Builder::new()
            .prefix(&format!("{EXPORT_ROOT_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for exports: {e}"))
    })
    .path()
}

/// Exports `layout` in `dtype` through [`pipeline::export`] once per process and returns it.
/// Panics with the exporter's message when the export fails.
pub fn exported(layout: Layout, dtype: DType) -> &'static Exported {
    exported_format(layout, float_format(dtype))
}

/// Like [`exported`], for any weight format (quantized ones included).
pub fn exported_format(layout: Layout, format: WeightFormat) -> &'static Exported {
    exported_flavor(layout, format, Flavor::Portable)
}

/// Like [`exported_format`], in either graph flavor.
pub fn exported_flavor(layout: Layout, format: WeightFormat, flavor: Flavor) -> &'static Exported {
    type Key = (Layout, WeightFormat, Flavor);
    static CACHE: OnceLock<Mutex<HashMap<Key, &'static Exported>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(done) = cache.get(&(layout, format, flavor)) {
        return done;
    }
    let block = format
        .quant()
        .map(|q| format!("-b{}", q.block_size))
        .unwrap_or_default();
    let dir = export_root().join(format!(
        "{}-{}{block}-{}",
        layout.name(),
        format.name(),
        flavor.manifest_name()
    ));
    let mut plan = layout.plan(&dir, format);
    plan.flavor = flavor.manifest_name().into();
    let summary = pipeline::export(&plan)
        .unwrap_or_else(|e| panic!("exporting {} as {}: {e}", layout.name(), format.name()));
    let done: &'static Exported = Box::leak(Box::new(Exported {
        layout,
        format,
        dtype: format.activation_dtype(),
        dir,
        summary,
    }));
    cache.insert((layout, format, flavor), done);
    done
}

/// Exports `layout` into `out` (a fresh path the caller owns), without caching.
pub fn export_to(
    layout: Layout,
    format: WeightFormat,
    out: &Path,
) -> Result<ExportSummary, PipelineError> {
    pipeline::export(&layout.plan(out, format))
}

/// A dense row-major array.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T> Array<T> {
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} vs {} values",
            data.len()
        );
        Self { shape, data }
    }
}

/// Every tensor of a golden safetensors file, float32 and int64 ones.
#[derive(Debug)]
pub struct Goldens {
    pub path: PathBuf,
    pub meta: HashMap<String, String>,
    floats: HashMap<String, Array<f32>>,
    ints: HashMap<String, Array<i64>>,
}

impl Goldens {
    /// Reads `fixtures/goldens/FILE`.
    pub fn open(file: &str) -> Self {
        Self::read(&fixture_golden(file))
    }

    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("{}: not a safetensors file: {e}", path.display()));
        let meta = metadata.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: not a safetensors file: {e}", path.display()));
        let mut floats = HashMap::new();
        let mut ints = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    let data = raw
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    floats.insert(name, Array::new(shape, data));
                }
                safetensors::Dtype::I64 => {
                    let data = raw
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect();
                    ints.insert(name, Array::new(shape, data));
                }
                other => panic!(
                    "{}: tensor `{name}` has dtype {other:?}; goldens are F32 or I64",
                    path.display()
                ),
            }
        }
        Self {
            path: path.to_path_buf(),
            meta,
            floats,
            ints,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.floats.contains_key(name) || self.ints.contains_key(name)
    }

    pub fn is_float(&self, name: &str) -> bool {
        self.floats.contains_key(name)
    }

    #[track_caller]
    pub fn f32(&self, name: &str) -> &Array<f32> {
        self.floats
            .get(name)
            .unwrap_or_else(|| panic!("{}: no float32 tensor `{name}`", self.path.display()))
    }

    #[track_caller]
    pub fn i64(&self, name: &str) -> &Array<i64> {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("{}: no int64 tensor `{name}`", self.path.display()))
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .floats
            .keys()
            .chain(self.ints.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }
}

/// `Ok(max abs error)` when every element of `actual` is within `atol + rtol·|expected|`, else a
/// message naming `name`, the max abs error, how many elements are outside and the first of them.
pub fn allclose(
    name: &str,
    actual: &[f32],
    expected: &[f32],
    atol: f32,
    rtol: f32,
) -> Result<f32, String> {
    let c = crate::allclose(actual, expected, atol, rtol);
    if c.mismatches == 0 {
        return Ok(c.max_abs_error);
    }
    let first = c.first_mismatch.unwrap_or(0);
    Err(format!(
        "{name}: {} of {} elements beyond atol {atol} + rtol {rtol}; max abs error {:e}; first at index {first}: \
         got {:?}, expected {:?} (lengths {} vs {})",
        c.mismatches,
        c.len,
        c.max_abs_error,
        actual.get(first),
        expected.get(first),
        actual.len(),
        expected.len()
    ))
}

/// Index of the largest value of each `vocab`-wide row (the first one on ties, as torch).
pub fn argmax_rows(values: &[f32], vocab: usize) -> Vec<usize> {
    values
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// ONNX Runtime, loaded once per process the way the runtime loads it (one environment per
/// process, shared with [`Engine`]).
pub fn ort_env() -> &'static ort::environment::Environment {
    carrot_runtime::ort_lib::init(None).unwrap_or_else(|e| panic!("{e}"));
    carrot_runtime::ort_lib::environment()
        .unwrap_or_else(|| panic!("ONNX Runtime has no environment"))
}

/// A CPU session on `path`, two intra-op threads.
pub fn session(path: &Path) -> Session {
    let fail = |e: String| -> ! {
        panic!(
            "creating an ONNX Runtime session for {}: {e}",
            path.display()
        )
    };
    Session::builder(ort_env())
        .map_err(|e| e.to_string())
        .and_then(|b| b.with_intra_threads(2).map_err(|e| e.to_string()))
        .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| fail(e))
}

/// `values` (float32) as a tensor of the activation dtype.
pub fn float_value(shape: &[usize], values: &[f32], dtype: DType) -> DynValue {
    let shape = shape.to_vec();
    let value = match dtype {
        DType::F32 => Tensor::from_array((shape, values.to_vec())).map(|t| t.into_dyn()),
        DType::F16 => Tensor::from_array((
            shape,
            values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
        ))
        .map(|t| t.into_dyn()),
        DType::BF16 => Tensor::from_array((
            shape,
            values
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>(),
        ))
        .map(|t| t.into_dyn()),
    };
    value.unwrap_or_else(|e| panic!("making a {dtype:?} tensor: {e}"))
}

pub fn i64_value(shape: &[usize], values: &[i64]) -> DynValue {
    Tensor::from_array((shape.to_vec(), values.to_vec()))
        .map(|t| t.into_dyn())
        .unwrap_or_else(|e| panic!("making an int64 tensor: {e}"))
}

/// One output of a run, converted to float32, with the element type it had.
#[derive(Debug, Clone)]
pub struct Output {
    pub elem: TensorElementType,
    pub array: Array<f32>,
}

/// Runs `session` and returns every output by name, as float32.
pub fn run(session: &mut Session, feeds: Vec<(String, DynValue)>) -> HashMap<String, Output> {
    let outputs = session
        .run(feeds)
        .unwrap_or_else(|e| panic!("running the session: {e}"));
    let mut result = HashMap::new();
    for (name, value) in outputs.iter() {
        let elem = value
            .dtype()
            .tensor_type()
            .unwrap_or_else(|| panic!("output `{name}` is not a tensor"));
        let dims = |s: &ort::value::Shape| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
        let array = match elem {
            TensorElementType::Float32 => {
                let (s, d) = value
                    .try_extract_tensor::<f32>()
                    .unwrap_or_else(|e| panic!("`{name}`: {e}"));
                Array::new(dims(s), d.to_vec())
            }
            TensorElementType::Float16 => {
                let (s, d) = value
                    .try_extract_tensor::<f16>()
                    .unwrap_or_else(|e| panic!("`{name}`: {e}"));
                Array::new(dims(s), d.iter().map(|v| v.to_f32()).collect())
            }
            TensorElementType::Bfloat16 => {
                let (s, d) = value
                    .try_extract_tensor::<bf16>()
                    .unwrap_or_else(|e| panic!("`{name}`: {e}"));
                Array::new(dims(s), d.iter().map(|v| v.to_f32()).collect())
            }
            other => panic!("output `{name}` has element type {other:?}"),
        };
        result.insert(name.to_string(), Output { elem, array });
    }
    result
}

/// Feeds for every input of `session` from `goldens` entry `{case}.{input}` (`{input}` when `case`
/// is empty); float inputs are converted to `dtype`.
pub fn golden_feeds(
    session: &Session,
    goldens: &Goldens,
    case: &str,
    dtype: DType,
) -> Vec<(String, DynValue)> {
    session
        .inputs()
        .iter()
        .map(|input| {
            let name = input.name().to_string();
            let key = if case.is_empty() {
                name.clone()
            } else {
                format!("{case}.{name}")
            };
            let value = if goldens.is_float(&key) {
                let a = goldens.f32(&key);
                float_value(&a.shape, &a.data, dtype)
            } else {
                let a = goldens.i64(&key);
                i64_value(&a.shape, &a.data)
            };
            (name, value)
        })
        .collect()
}

/// Runs `session` on the golden inputs of `case` (see [`golden_feeds`]).
pub fn run_golden(
    session: &mut Session,
    goldens: &Goldens,
    case: &str,
    dtype: DType,
) -> HashMap<String, Output> {
    let feeds = golden_feeds(session, goldens, case, dtype);
    run(session, feeds)
}

/// Ids to text for [`generate::generate`], without a tokenizer: `[id]` per token.
#[derive(Debug)]
pub struct IdText;

impl Decode for IdText {
    fn decode(&self, ids: &[u32]) -> Result<String, BoxError> {
        Ok(ids.iter().map(|id| format!("[{id}]")).collect())
    }
}

/// Splits recorded `input_ids` at every image sentinel (−200) into prompt parts; the n-th
/// sentinel refers to image n.
pub fn prompt_parts(input_ids: &[i64]) -> Vec<PromptPart> {
    let mut parts = Vec::new();
    let mut tokens = Vec::new();
    let mut images = 0;
    for &id in input_ids {
        if id == -200 {
            if !tokens.is_empty() {
                parts.push(PromptPart::Tokens(std::mem::take(&mut tokens)));
            }
            parts.push(PromptPart::Image(images));
            images += 1;
        } else {
            tokens.push(
                u32::try_from(id)
                    .unwrap_or_else(|_| panic!("input id {id} is not a vocabulary id")),
            );
        }
    }
    if !tokens.is_empty() {
        parts.push(PromptPart::Tokens(tokens));
    }
    parts
}

/// Loads an exported directory in the runtime's [`Engine`] on the CPU.
pub fn load_engine(dir: &Path) -> Engine {
    let opts = LoadOptions {
        threads: Some(2),
        ..LoadOptions::default()
    };
    Engine::load(dir, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// Greedy generation through [`Engine`] and [`generate::generate`]: the prompt as recorded
/// (`input_ids` with −200 sentinels), one image per sentinel given as `[3, S, S]` pixel values.
pub fn greedy(
    engine: &mut Engine,
    input_ids: &[i64],
    pixel_values: &[Vec<f32>],
    max_new_tokens: usize,
    eos_token_ids: &[u32],
) -> Vec<u32> {
    let images: Vec<ImageFeatures> = if pixel_values.is_empty() {
        Vec::new()
    } else {
        engine
            .encode_images(pixel_values)
            .unwrap_or_else(|e| panic!("vision.onnx: {e}"))
    };
    let request = Request {
        prompt: prompt_parts(input_ids),
        images,
        options: GenerateOptions {
            max_new_tokens,
            max_length: engine.manifest.prompt.max_length,
            eos_token_ids: eos_token_ids.to_vec(),
            ignore_eos: false,
            prefill_chunk: None,
            sampling: SamplingOptions::greedy(),
        },
    };
    generate::generate(engine, &IdText, &request, |_| {})
        .unwrap_or_else(|e| panic!("generate: {e}"))
        .token_ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_parts_split_at_sentinels() {
        assert_eq!(
            prompt_parts(&[1, 2, -200, 3, -200]),
            vec![
                PromptPart::Tokens(vec![1, 2]),
                PromptPart::Image(0),
                PromptPart::Tokens(vec![3]),
                PromptPart::Image(1)
            ]
        );
        assert_eq!(prompt_parts(&[5]), vec![PromptPart::Tokens(vec![5])]);
    }

    #[test]
    fn argmax_takes_the_first_maximum_per_row() {
        assert_eq!(argmax_rows(&[0.0, 2.0, 2.0, 5.0, 1.0, 0.0], 3), vec![1, 0]);
    }

    #[test]
    fn allclose_message_names_the_tensor_count_and_first_index() {
        assert_eq!(allclose("x", &[1.0, 2.0], &[1.0, 2.0], 0.0, 0.0), Ok(0.0));
        let err = allclose("logits", &[1.0, 2.5, 9.0], &[1.0, 2.0, 4.0], 1e-3, 0.0)
            .expect_err("outside the tolerance");
        assert!(err.contains("logits: 2 of 3"), "{err}");
        assert!(err.contains("first at index 1"), "{err}");
        assert!(err.contains("max abs error 5e0"), "{err}");
    }
}
