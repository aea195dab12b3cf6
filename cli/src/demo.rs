//! `carrot demo`: export the shipped fixture model (once), answer a question about a real
//! photograph, and check the generated tokens against the reference golden made by
//! transformers.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use carrot_runtime::engine::LoadOptions;
use carrot_runtime::generate::Event;
use carrot_runtime::pipeline::{ImageSource, Params, Pipeline, Prompt};

/// The golden record the demo reproduces.
const RECORD: &str = "carrot_image";

#[derive(Deserialize)]
struct Goldens {
    records: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct Record {
    question: String,
    image: Option<String>,
    output_ids: Vec<u32>,
    export: ExportSpec,
}

#[derive(Deserialize)]
struct ExportSpec {
    model: String,
}

/// Where the repository's `fixtures/` and `.cache/` live.
pub fn repo_root() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Some(ws) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        candidates.push(ws.to_path_buf());
    }
    candidates
        .into_iter()
        .find(|d| d.join("fixtures/goldens/generate.json").is_file())
        .context("cannot find the Carrot repository (fixtures/goldens/generate.json); run `carrot demo` inside it")
}

/// The Llama 3 tokenizer fetched by `scripts/setup.sh` (`.cache/llama3-tokenizer`).
pub fn llama3_tokenizer_dir() -> anyhow::Result<PathBuf> {
    carrot_runtime::ort_lib::cache_dirs()
        .into_iter()
        .map(|d| d.join("llama3-tokenizer"))
        .find(|d| d.join("tokenizer.json").is_file())
        .context("the Llama 3 tokenizer is not in .cache/llama3-tokenizer: run `scripts/setup.sh`")
}

/// Export the repository's `fixtures/models/NAME` into `out` and put the Llama 3 tokenizer next
/// to it (the fixtures ship without tokenizer files). Used by the demo and the tests.
pub fn export_fixture(
    name: &str,
    out: &Path,
    dtype: carrot_graphs::config::DType,
    logits: carrot_graphs::llama::Logits,
    progress: bool,
) -> anyhow::Result<carrot_export::pipeline::ExportSummary> {
    export_fixture_as(
        name,
        out,
        carrot_export::pipeline::WeightFormat::Float(dtype),
        "portable",
        logits,
        progress,
    )
}

/// [`export_fixture`] in any weight format and graph flavor.
pub fn export_fixture_as(
    name: &str,
    out: &Path,
    format: carrot_export::pipeline::WeightFormat,
    flavor: &str,
    logits: carrot_graphs::llama::Logits,
    progress: bool,
) -> anyhow::Result<carrot_export::pipeline::ExportSummary> {
    let root = repo_root()?;
    let tokenizer = llama3_tokenizer_dir()?;
    let plan = carrot_export::pipeline::ExportPlan {
        flavor: flavor.into(),
        logits,
        force: true,
        progress,
        ..carrot_export::pipeline::ExportPlan::new(
            root.join("fixtures/models").join(name),
            out.to_path_buf(),
            format,
        )
    };
    let summary = carrot_export::pipeline::export(&plan)
        .with_context(|| format!("exporting fixture {name}"))?;
    for leaf in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer.join(leaf), out.join(leaf))
            .with_context(|| format!("copying {leaf} into {}", out.display()))?;
    }
    Ok(summary)
}

pub fn run(opts: &LoadOptions) -> anyhow::Result<bool> {
    let root = repo_root()?;
    let goldens_path = root.join("fixtures/goldens/generate.json");
    let goldens: Goldens = serde_json::from_str(&std::fs::read_to_string(&goldens_path)?)
        .with_context(|| format!("{}", goldens_path.display()))?;
    let record: Record = goldens
        .records
        .get(RECORD)
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .with_context(|| format!("{}: record {RECORD}", goldens_path.display()))?
        .with_context(|| format!("{}: no record {RECORD}", goldens_path.display()))?;
    let model_dir = root.join("fixtures/models").join(&record.export.model);
    let out = root
        .join(".cache/demo")
        .join(format!("{}-fp32", record.export.model));
    // The fixture exports in well under a second, so the demo always exports it afresh rather
    // than trusting a cached copy that an older build or older fixtures may have written.
    eprintln!(
        "exporting {} (fp32) to {}",
        model_dir.display(),
        out.display()
    );
    let summary = export_fixture(
        &record.export.model,
        &out,
        carrot_graphs::config::DType::F32,
        carrot_graphs::llama::Logits::Last,
        true,
    )?;
    eprintln!("exported in {:.1} s", summary.seconds);

    let mut pipeline = Pipeline::load(&out, opts)?;
    let image = record
        .image
        .as_ref()
        .map(|name| root.join("fixtures/images").join(name));
    let images: Vec<ImageSource> = image.iter().cloned().map(ImageSource::Path).collect();
    let params = Params {
        max_new_tokens: Some(record.output_ids.len()),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Params::default()
    };
    if let Some(p) = &image {
        eprintln!("image:    {}", p.display());
    }
    eprintln!("question: {}", record.question);
    eprint!("answer:   ");
    let answer = pipeline.generate(
        &Prompt::Text {
            text: record.question.clone(),
            raw: false,
        },
        &images,
        &params,
        |e| {
            if let Event::Token { text_delta, .. } = e {
                eprint!("{text_delta}");
            }
        },
    )?;
    eprintln!();
    let out_ids = &answer.output.token_ids;
    let t = answer.output.timings;
    eprintln!(
        "timings:  load {:.0} ms, vision {:.1} ms, prefill {:.1} ms ({} positions), decode {:.1} ms ({} tokens, {:.0} tok/s)",
        pipeline.engine.load_ms,
        answer.vision_ms,
        t.prefill_ms,
        answer.output.prompt_tokens,
        t.decode_ms,
        t.tokens,
        if t.decode_ms > 0.0 {
            (t.tokens.saturating_sub(1)) as f64 / (t.decode_ms / 1e3)
        } else {
            0.0
        }
    );
    if out_ids == &record.output_ids {
        println!(
            "exact: the {} generated tokens equal the transformers reference ({} / {})",
            out_ids.len(),
            goldens_path
                .strip_prefix(&root)
                .unwrap_or(&goldens_path)
                .display(),
            RECORD
        );
        Ok(true)
    } else {
        let first = out_ids
            .iter()
            .zip(&record.output_ids)
            .position(|(a, b)| a != b)
            .unwrap_or(out_ids.len().min(record.output_ids.len()));
        println!("MISMATCH: generated tokens differ from the reference from position {first}");
        println!("  carrot:    {out_ids:?}");
        println!("  reference: {:?}", record.output_ids);
        bail!("demo tokens differ from the reference golden")
    }
}
