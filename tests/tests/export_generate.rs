//! Greedy generation through the exported graphs (the runtime's `Engine` and generation loop)
//! reproduces transformers' `generate` records in `generate.json` token for token.

use std::num::NonZeroUsize;
use std::path::Path;

use carrot_export::pipeline::WeightFormat;
use carrot_graphs::config::{DType, Flavor};
use carrot_runtime::generate::{self, GenerateOptions, Request, SamplingOptions, prompt_len};
use carrot_tests::export_util::{
    Goldens, IdText, Layout, exported, exported_flavor, fixture_golden, greedy, load_engine,
    prompt_parts,
};
use serde_json::Value as Json;

struct Record {
    name: String,
    raw: Json,
    input_ids: Vec<i64>,
    output_ids: Vec<u32>,
}

fn generate_json() -> Json {
    let path = fixture_golden("generate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn record(name: &str) -> Record {
    let json = generate_json();
    let raw = json["records"]
        .get(name)
        .unwrap_or_else(|| panic!("generate.json has no record `{name}`"))
        .clone();
    let ids = |key: &str| -> Vec<i64> {
        raw[key]
            .as_array()
            .unwrap_or_else(|| panic!("{name}.{key} is not a list"))
            .iter()
            .map(|v| {
                v.as_i64()
                    .unwrap_or_else(|| panic!("{name}.{key}: {v} is not an integer"))
            })
            .collect()
    };
    let input_ids = ids("input_ids");
    let output_ids = ids("output_ids")
        .into_iter()
        .map(|i| u32::try_from(i).unwrap_or_else(|_| panic!("{i}")))
        .collect();
    Record {
        name: name.to_string(),
        raw,
        input_ids,
        output_ids,
    }
}

fn max_new_tokens() -> usize {
    generate_json()["max_new_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("generate.json: no max_new_tokens")) as usize
}

fn eos_token_ids() -> Vec<u32> {
    generate_json()["eos_token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("generate.json: no eos_token_ids"))
        .iter()
        .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
        .collect()
}

/// The export layout a record's `export` entry names.
fn layout_of(rec: &Record) -> Layout {
    let export = &rec.raw["export"];
    let model = export["model"].as_str().unwrap_or("");
    let base = export.get("base").and_then(Json::as_str);
    let loras: Vec<&str> = export
        .get("lora")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    match (model, base, loras.as_slice()) {
        ("carrot-tiny", None, []) => Layout::Merged,
        ("carrot-lora-tiny", Some("llama-base-tiny"), []) => Layout::LoraOverBase,
        ("llama-base-tiny", None, []) => Layout::TextOnly,
        ("llama-base-tiny", None, ["lora-rslora-tiny"]) => Layout::TextOnlyRslora,
        _ => panic!("{}: no export layout for {export}", rec.name),
    }
}

/// `[3, S, S]` pixel values of the record's image, as the reference preprocessed it.
fn pixel_values(rec: &Record) -> Vec<Vec<f32>> {
    let Some(image) = rec.raw["image"].as_str() else {
        return Vec::new();
    };
    let stem = image.trim_end_matches(".png");
    let size = rec.raw["image_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no image_size", rec.name));
    let goldens = Goldens::open("pixel_values.safetensors");
    let pixels = goldens.f32(&format!("{stem}.{size}"));
    assert_eq!(pixels.shape, [3, size as usize, size as usize]);
    vec![pixels.data.clone()]
}

/// Greedy generation of `rec` on the export in `dir` (`layout` is the export the record names).
fn generate_on(dir: &Path, rec: &Record) -> Vec<u32> {
    let mut engine = load_engine(dir);
    let num_image_tokens = engine
        .manifest
        .vision
        .as_ref()
        .map_or(0, |v| v.num_image_tokens);
    let positions = rec.raw["num_positions"].as_u64().unwrap_or(0) as usize;
    assert_eq!(
        prompt_len(&prompt_parts(&rec.input_ids), num_image_tokens),
        positions,
        "{}: prompt positions with the image expanded",
        rec.name
    );
    greedy(
        &mut engine,
        &rec.input_ids,
        &pixel_values(rec),
        max_new_tokens(),
        &eos_token_ids(),
    )
}

fn reproduces(name: &str) {
    reproduces_in(name, Flavor::Portable);
}

/// The record's greedy tokens from the fp32 export in `flavor`.
fn reproduces_in(name: &str, flavor: Flavor) {
    let rec = record(name);
    let layout = layout_of(&rec);
    let exp = exported_flavor(layout, WeightFormat::Float(DType::F32), flavor);
    let manifest = carrot_contract::Manifest::read_dir(&exp.dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        Some(manifest.prompt.template.as_str()),
        rec.raw["template"].as_str(),
        "{name}: manifest prompt.template"
    );
    let got = generate_on(&exp.dir, &rec);
    eprintln!("{name}: {got:?}");
    assert_eq!(
        got,
        rec.output_ids,
        "{name}: greedy tokens from the {} export ({} flavor) differ from transformers",
        layout.name(),
        flavor.manifest_name()
    );
}

/// The `ort` flavor in fp32 (fused attention, fused residual norms, shared KV cache) is
/// token-exact with transformers on every record.
#[test]
fn ort_flavor_fp32_greedy_matches_reference_on_every_record() {
    for name in [
        "carrot_image",
        "carrot_text",
        "lora_image",
        "llama_chat",
        "llama_rslora_chat",
    ] {
        reproduces_in(name, Flavor::Ort);
    }
}

#[test]
fn carrot_image_greedy_matches_reference() {
    reproduces("carrot_image");
}

#[test]
fn carrot_text_greedy_matches_reference() {
    reproduces("carrot_text");
}

#[test]
fn lora_image_greedy_matches_reference() {
    reproduces("lora_image");
}

#[test]
fn llama_chat_greedy_matches_reference() {
    reproduces("llama_chat");
}

#[test]
fn llama_rslora_chat_greedy_matches_reference() {
    reproduces("llama_rslora_chat");
}

/// Prefill in chunks of 5 positions (one chunk boundary falls inside the image) gives the same
/// tokens as the reference.
#[test]
fn carrot_image_chunked_prefill_matches_reference() {
    chunked_prefill_matches_reference(Flavor::Portable);
}

/// The same through the `ort` flavor's shared KV cache (`GroupQueryAttention` on a chunk over a
/// past).
#[test]
fn carrot_image_chunked_prefill_matches_reference_in_the_ort_flavor() {
    chunked_prefill_matches_reference(Flavor::Ort);
}

/// The records' greedy settings, prefilling 5 positions per step.
fn greedy_in_chunks_of_5(engine: &carrot_runtime::engine::Engine) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new_tokens(),
        max_length: engine.manifest.prompt.max_length,
        eos_token_ids: eos_token_ids(),
        ignore_eos: false,
        prefill_chunk: NonZeroUsize::new(5),
        sampling: SamplingOptions::greedy(),
    }
}

fn chunked_prefill_matches_reference(flavor: Flavor) {
    let rec = record("carrot_image");
    let exp = exported_flavor(Layout::Merged, WeightFormat::Float(DType::F32), flavor);
    let mut engine = load_engine(&exp.dir);
    let images = engine
        .encode_images(&pixel_values(&rec))
        .unwrap_or_else(|e| panic!("{e}"));
    let request = Request {
        prompt: prompt_parts(&rec.input_ids),
        images,
        options: greedy_in_chunks_of_5(&engine),
    };
    let out = generate::generate(&mut engine, &IdText, &request, |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.token_ids, rec.output_ids, "chunked prefill");
}

/// The Bunny adapter matters: the reference without it generates something else, and the same
/// vision tower and projector in front of the plain base decoder reproduce that record.
#[test]
fn lora_adapter_changes_the_output() {
    let with_adapter = record("lora_image");
    let base_only = record("lora_image_base_only");
    assert_eq!(with_adapter.input_ids, base_only.input_ids);
    assert_ne!(
        with_adapter.output_ids, base_only.output_ids,
        "the goldens should differ"
    );

    // vision.onnx + manifest of the LoRA export, embed/decoder of the plain base export.
    let lora = exported(Layout::LoraOverBase, DType::F32);
    let base = exported(Layout::TextOnly, DType::F32);
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("base-with-projector");
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    for (from, file) in [
        (&lora.dir, "carrot.json"),
        (&lora.dir, "vision.onnx"),
        (&lora.dir, "vision.onnx.data"),
        (&base.dir, "embed.onnx"),
        (&base.dir, "embed.onnx.data"),
        (&base.dir, "decoder.onnx"),
        (&base.dir, "decoder.onnx.data"),
    ] {
        std::fs::copy(from.join(file), dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let got = generate_on(&dir, &base_only);
    assert_eq!(
        got, base_only.output_ids,
        "base decoder + LoRA export's vision graph vs lora_image_base_only"
    );
    assert_ne!(got, with_adapter.output_ids);
}

/// Continuous batching reproduces the reference: six sequences of one export's records share
/// a 3-row batch, taking rows as earlier ones finish (rows that hold stale positions), their
/// prompts prefilled in chunks of 5 between the others' decode steps. Every sequence's tokens
/// equal its transformers record, in both flavors (batched decode steps in the `ort` flavor,
/// rows taking turns in the portable one).
#[test]
fn batched_generation_reproduces_every_record_in_both_flavors() {
    for flavor in [Flavor::Portable, Flavor::Ort] {
        let image = record("carrot_image");
        let text = record("carrot_text");
        let exp = exported_flavor(Layout::Merged, WeightFormat::Float(DType::F32), flavor);
        let mut engine = load_engine(&exp.dir);
        let features = engine
            .encode_images(&pixel_values(&image))
            .unwrap_or_else(|e| panic!("{e}"));
        let records = [&image, &text, &text, &image, &image, &text];
        let requests: Vec<Request<_>> = records
            .iter()
            .map(|rec| Request {
                prompt: prompt_parts(&rec.input_ids),
                images: if rec.raw["image"].is_string() {
                    features.clone()
                } else {
                    Vec::new()
                },
                options: greedy_in_chunks_of_5(&engine),
            })
            .collect();
        assert_eq!(
            engine.batch_cache(3).expect("cache").is_batched(),
            flavor == Flavor::Ort
        );
        let outputs = engine
            .generate_batch(&requests, 3, &IdText)
            .unwrap_or_else(|e| panic!("{flavor:?}: {e}"));
        assert_eq!(outputs.len(), records.len());
        for (i, (output, rec)) in outputs.iter().zip(records).enumerate() {
            assert_eq!(
                output.token_ids, rec.output_ids,
                "{flavor:?}: sequence {i} ({})",
                rec.name
            );
        }
    }
}
