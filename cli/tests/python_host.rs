//! A second host: `examples/python/carrot_host.py` runs an export with plain ONNX Runtime from
//! `carrot.json` alone. Its greedy tokens must equal `carrot`'s (the `Pipeline`) and the
//! transformers goldens in `fixtures/goldens/generate.json`, for an image question (Bunny
//! template, vision graph, spliced features) and text questions (Bunny template without an image,
//! and a plain Llama checkpoint's own chat template). carrot-tiny is exported with logits for every
//! position, llama-base-tiny with the last position only (`carrot-export`'s default).
//!
//! The interpreter is `$CARROT_PYTHON` (default `python3`) with the packages of
//! `tests/python/requirements.txt`; `CARROT_SKIP_PYTHON=1` skips these tests with a note.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use carrot_graphs::config::DType;
use carrot_graphs::llama::Logits;
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::{ImageSource, Params, Pipeline, Prompt};
use carrot_tests::workspace_root as workspace;
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    records: BTreeMap<String, Record>,
}

#[derive(Deserialize)]
struct Record {
    image: Option<String>,
    question: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    input_ids: Vec<i64>,
    output_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: String,
}

impl Record {
    /// The user's text as `carrot generate --prompt` takes it.
    fn prompt(&self) -> &str {
        match (&self.question, self.messages.as_slice()) {
            (Some(q), _) => q,
            (None, [only]) => &only.content,
            _ => panic!("golden record has neither `question` nor exactly one message"),
        }
    }
}

fn golden(name: &str) -> Record {
    let path = workspace().join("fixtures/goldens/generate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut goldens: Goldens =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    goldens
        .records
        .remove(name)
        .unwrap_or_else(|| panic!("{}: no record {name}", path.display()))
}

/// The interpreter for the host, or `None` when `CARROT_SKIP_PYTHON=1`.
fn python() -> Option<PathBuf> {
    carrot_tests::python_with(
        "onnxruntime, tokenizers, numpy, PIL, jinja2",
        "the Python host",
    )
}

/// Export `fixtures/models/NAME` (fp32) into a temporary directory and put the Llama 3
/// tokenizer (`.cache/llama3-tokenizer`, from `scripts/setup.sh`) next to it.
fn export_fixture(name: &str, logits: Logits) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let out = tmp.path().join(name);
    carrot::demo::export_fixture(name, &out, DType::F32, logits, false)
        .unwrap_or_else(|e| panic!("exporting {name}: {e:#}"));
    (tmp, out)
}

#[derive(Deserialize, Debug)]
struct HostOutput {
    token_ids: Vec<u32>,
    prompt_ids: Vec<i64>,
    prompt_tokens: usize,
    generated_tokens: usize,
    finish_reason: String,
    text: String,
}

fn run_host(python: &Path, model: &Path, record: &Record) -> HostOutput {
    let image = record
        .image
        .as_ref()
        .map(|image| workspace().join("fixtures/images").join(image));
    let json = carrot_tests::run_python_host(
        python,
        model,
        record.prompt(),
        record.output_ids.len(),
        image.as_deref(),
    );
    serde_json::from_value(json).unwrap_or_else(|e| panic!("host output: {e}"))
}

/// `record`'s prompt (and image) through `Pipeline`, greedily, as many tokens as the golden has.
fn carrot_answer(pipeline: &mut Pipeline, record: &Record) -> carrot_runtime::pipeline::Answer {
    let images: Vec<ImageSource> = record
        .image
        .iter()
        .map(|i| ImageSource::Path(workspace().join("fixtures/images").join(i)))
        .collect();
    let params = Params {
        max_new_tokens: Some(record.output_ids.len()),
        temperature: Some(0.0),
        ..Params::default()
    };
    let prompt = Prompt::Text {
        text: record.prompt().to_owned(),
        raw: false,
    };
    pipeline
        .generate(&prompt, &images, &params, |_| {})
        .unwrap_or_else(|e| panic!("carrot: {e}"))
}

/// Run `record` through the Python host and through `Pipeline`, and compare both with the golden.
fn check(python: &Path, pipeline: &mut Pipeline, model: &Path, name: &str) {
    let record = golden(name);
    let host = run_host(python, model, &record);
    let answer = carrot_answer(pipeline, &record);

    assert_eq!(
        host.prompt_ids, record.input_ids,
        "{name}: Python host prompt ids vs the golden input_ids"
    );
    assert_eq!(
        answer.prompt_ids, record.input_ids,
        "{name}: carrot prompt ids vs the golden input_ids"
    );
    assert_eq!(
        host.token_ids, answer.output.token_ids,
        "{name}: Python host tokens vs carrot's"
    );
    assert_eq!(
        host.token_ids, record.output_ids,
        "{name}: Python host tokens vs the transformers golden"
    );
    assert_eq!(
        host.prompt_tokens, answer.output.prompt_tokens,
        "{name}: prompt positions"
    );
    assert_eq!(host.generated_tokens, host.token_ids.len());
    assert_eq!(
        host.finish_reason,
        answer.output.finish_reason.as_str(),
        "{name}: finish_reason"
    );
    assert_eq!(host.text, answer.output.text, "{name}: decoded text");
}

#[test]
fn python_host_matches_carrot_on_carrot_tiny() {
    let Some(python) = python() else { return };
    let (_tmp, out) = export_fixture("carrot-tiny", Logits::All);
    let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading the export");
    check(&python, &mut pipeline, &out, "carrot_image");
    check(&python, &mut pipeline, &out, "carrot_text");
}

#[test]
fn python_host_matches_carrot_with_a_chat_template() {
    let Some(python) = python() else { return };
    let (_tmp, out) = export_fixture("llama-base-tiny", Logits::Last);
    assert!(
        out.join("chat_template.jinja").is_file(),
        "the export should carry the checkpoint's chat template"
    );
    let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading the export");
    check(&python, &mut pipeline, &out, "llama_chat");
}

/// The `ort` flavor (int4, `kv_cache: "shared"`) under plain onnxruntime: the host feeds
/// concatenated pasts to the graph `carrot` runs with one bound buffer per layer, and both pick the
/// same tokens (quantized, so compared with each other rather than with the float golden).
#[test]
fn python_host_matches_carrot_on_the_ort_flavor() {
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().expect("temporary directory");
    let out = tmp.path().join("carrot-tiny-ort");
    let int4 = carrot_export::pipeline::WeightFormat::parse("int4").expect("int4");
    carrot::demo::export_fixture_as("carrot-tiny", &out, int4, "ort", Logits::Last, false)
        .unwrap_or_else(|e| panic!("ort flavor export: {e:#}"));
    let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading the export");
    assert_eq!(pipeline.engine.manifest.kv_cache, "shared");
    let record = golden("carrot_image");
    let host = run_host(&python, &out, &record);
    let answer = carrot_answer(&mut pipeline, &record);
    assert_eq!(host.prompt_ids, answer.prompt_ids, "prompt ids");
    assert_eq!(
        host.token_ids, answer.output.token_ids,
        "Python host tokens vs carrot's"
    );
    assert_eq!(host.text, answer.output.text, "decoded text");
}
