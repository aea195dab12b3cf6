//! Every fixture layout exports to a directory that follows `contract.md` (files, manifest keys,
//! graph inputs and outputs, external data, IR version, no `com.microsoft` op) and passes the ONNX
//! checker. Refusals and failures are in `export_errors.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use carrot_contract::names;
use carrot_graphs::config::DType;
use carrot_graphs::onnx::ModelProto;
use carrot_graphs::onnx::tensor_proto::DataLocation;
use carrot_tests::check_onnx;
use carrot_tests::export_util::{
    Exported, Layout, exported, exported_format, external_entry, int_format, read_model, value_type,
};
use serde_json::Value as Json;

const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 128_256;
const IMAGE_SIZE: usize = 60;
const IMAGE_TOKENS: usize = 16;
/// Inline initializers above this size mean a weight escaped the side file.
const MAX_INLINE_BYTES: usize = 4096;

fn act_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FLOAT",
        DType::F16 => "FLOAT16",
        DType::BF16 => "BFLOAT16",
    }
}

/// `(name, element type, dims)` of a graph's inputs or outputs.
fn signature(values: &[carrot_graphs::onnx::ValueInfoProto]) -> Vec<(String, String, Vec<String>)> {
    values
        .iter()
        .map(|v| {
            let (ty, dims) = value_type(v);
            (v.name.clone(), ty, dims)
        })
        .collect()
}

fn sig(name: &str, ty: &str, dims: &[&str]) -> (String, String, Vec<String>) {
    (
        name.to_string(),
        ty.to_string(),
        dims.iter().map(|d| d.to_string()).collect(),
    )
}

/// IR version, opsets, domains and external data of one graph file.
fn check_graph_file(dir: &Path, file: &str, model: &ModelProto) {
    let what = format!("{}/{file}", dir.display());
    assert_eq!(model.ir_version, 10, "{what}: IR version");
    for opset in &model.opset_import {
        assert!(
            opset.domain.is_empty() || opset.domain == "ai.onnx",
            "{what}: imports opset domain `{}`; the portable flavor uses the default domain only",
            opset.domain
        );
        assert!(
            (21..=24).contains(&opset.version),
            "{what}: default-domain opset {}",
            opset.version
        );
    }
    assert!(!model.opset_import.is_empty(), "{what}: no opset import");
    let graph = model
        .graph
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no graph"));
    for node in &graph.node {
        assert!(
            node.domain.is_empty() || node.domain == "ai.onnx",
            "{what}: node {} ({}) is in domain `{}`",
            node.name,
            node.op_type,
            node.domain
        );
    }

    let data_name = format!("{file}.data");
    let data_path = dir.join(&data_name);
    let data_len = std::fs::metadata(&data_path).map(|m| m.len()).ok();
    let mut external = 0usize;
    for t in &graph.initializer {
        if t.data_location == DataLocation::External as i32 {
            external += 1;
            let entry = |key: &str| {
                external_entry(t, key).unwrap_or_else(|| {
                    panic!("{what}: initializer {} has no external `{key}`", t.name)
                })
            };
            assert_eq!(
                entry("location"),
                data_name,
                "{what}: initializer {} location",
                t.name
            );
            let offset: u64 = entry("offset")
                .parse()
                .unwrap_or_else(|e| panic!("{what}: {} offset: {e}", t.name));
            let length: u64 = entry("length")
                .parse()
                .unwrap_or_else(|e| panic!("{what}: {} length: {e}", t.name));
            assert_eq!(
                offset % 4096,
                0,
                "{what}: initializer {} offset {offset} is not 4096-aligned",
                t.name
            );
            let total = data_len.unwrap_or_else(|| {
                panic!("{what}: {} is external but {data_name} is missing", t.name)
            });
            assert!(
                offset + length <= total,
                "{what}: initializer {} ends past {data_name} ({total} bytes)",
                t.name
            );
            assert!(
                t.raw_data.is_empty(),
                "{what}: external initializer {} also has inline data",
                t.name
            );
        } else {
            assert!(
                t.raw_data.len() <= MAX_INLINE_BYTES,
                "{what}: initializer {} keeps {} bytes inline",
                t.name,
                t.raw_data.len()
            );
        }
    }
    assert!(external > 0, "{what}: no initializer lives in {data_name}");
}

/// Files, manifest and graph interfaces of an export, against contract.md.
fn check_contract(exp: &Exported) {
    let dir = &exp.dir;
    let act = act_name(exp.dtype);
    let multimodal = exp.layout.multimodal();

    let mut expected: BTreeSet<String> = [
        "carrot.json",
        "embed.onnx",
        "embed.onnx.data",
        "decoder.onnx",
        "decoder.onnx.data",
        "generation_config.json",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if multimodal {
        expected.extend(["vision.onnx".to_string(), "vision.onnx.data".to_string()]);
    }
    if matches!(exp.layout, Layout::TextOnly | Layout::TextOnlyRslora) {
        expected.insert("chat_template.jinja".into());
    }
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let missing: Vec<_> = expected.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{}: missing {missing:?} (has {present:?})",
        exp.layout.name()
    );
    let extra: Vec<_> = present
        .difference(&expected)
        .filter(|f| !f.starts_with("chat_template"))
        .collect();
    assert!(
        extra.is_empty(),
        "{}: unexpected files {extra:?}",
        exp.layout.name()
    );
    let reported: BTreeSet<String> = exp.summary.files.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(
        reported,
        present,
        "{}: ExportSummary.files vs the directory",
        exp.layout.name()
    );
    for (file, bytes) in &exp.summary.files {
        let on_disk = std::fs::metadata(dir.join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert_eq!(
            *bytes,
            on_disk,
            "{}: size reported for {file}",
            exp.layout.name()
        );
    }
    assert_eq!(exp.summary.multimodal, multimodal);

    check_manifest(exp);

    let graphs: Vec<&str> = if multimodal {
        vec![
            names::VISION_GRAPH,
            names::EMBED_GRAPH,
            names::DECODER_GRAPH,
        ]
    } else {
        vec![names::EMBED_GRAPH, names::DECODER_GRAPH]
    };
    for file in &graphs {
        let model = read_model(&dir.join(file));
        check_graph_file(dir, file, &model);
        let graph = model
            .graph
            .as_ref()
            .unwrap_or_else(|| panic!("{file}: no graph"));
        let (inputs, outputs) = (signature(&graph.input), signature(&graph.output));
        match *file {
            names::VISION_GRAPH => {
                let s = IMAGE_SIZE.to_string();
                assert_eq!(
                    inputs,
                    vec![sig(names::PIXEL_VALUES, "FLOAT", &["batch", "3", &s, &s])],
                    "{file} inputs"
                );
                assert_eq!(
                    outputs,
                    vec![sig(
                        names::IMAGE_FEATURES,
                        act,
                        &["batch", &IMAGE_TOKENS.to_string(), &HIDDEN.to_string()]
                    )],
                    "{file} outputs"
                );
            }
            names::EMBED_GRAPH => {
                assert_eq!(
                    inputs,
                    vec![sig(names::INPUT_IDS, "INT64", &["batch", "sequence"])],
                    "{file} inputs"
                );
                assert_eq!(
                    outputs,
                    vec![sig(
                        names::INPUTS_EMBEDS,
                        act,
                        &["batch", "sequence", &HIDDEN.to_string()]
                    )],
                    "{file} outputs"
                );
            }
            _ => check_decoder_interface(&inputs, &outputs, act),
        }
    }
    let paths: Vec<PathBuf> = graphs.iter().map(|f| dir.join(f)).collect();
    check_onnx(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
}

fn check_decoder_interface(
    inputs: &[(String, String, Vec<String>)],
    outputs: &[(String, String, Vec<String>)],
    act: &str,
) {
    let in_names: Vec<&str> = inputs.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        in_names,
        names::decoder_inputs(LAYERS),
        "decoder input names"
    );
    let out_names: BTreeSet<&str> = outputs.iter().map(|(n, _, _)| n.as_str()).collect();
    let want_out = names::decoder_outputs(LAYERS);
    assert_eq!(
        out_names,
        want_out.iter().map(String::as_str).collect(),
        "decoder output names (order is checked apart)"
    );
    assert_eq!(outputs.len(), want_out.len(), "decoder outputs");
    let input = |name: &str| {
        inputs
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no input {name}"))
    };
    let output = |name: &str| {
        outputs
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no output {name}"))
    };
    let (h, kv, d) = (
        HIDDEN.to_string(),
        KV_HEADS.to_string(),
        HEAD_DIM.to_string(),
    );
    assert_eq!(
        input(names::INPUTS_EMBEDS),
        &sig(names::INPUTS_EMBEDS, act, &["batch", "sequence", &h])
    );
    let (mask, positions) = (input(names::ATTENTION_MASK), input(names::POSITION_IDS));
    assert_eq!(
        (mask.1.as_str(), positions.1.as_str()),
        ("INT64", "INT64"),
        "attention_mask / position_ids dtypes"
    );
    assert_eq!(positions.2, ["batch", "sequence"], "position_ids dims");
    let total = &mask.2[1];
    assert_eq!(mask.2[0], "batch", "attention_mask dims");
    assert!(
        total.parse::<usize>().is_err(),
        "attention_mask's second dim must be symbolic, is {total}"
    );
    for (name, ty, dims) in inputs
        .iter()
        .filter(|(n, _, _)| n.starts_with("past_key_values."))
    {
        assert_eq!(ty, act, "{name} dtype");
        assert_eq!(
            dims,
            &["batch", kv.as_str(), "past_sequence", d.as_str()],
            "{name} dims"
        );
    }
    assert_eq!(
        output(names::LOGITS),
        &sig(
            names::LOGITS,
            "FLOAT",
            &["batch", "sequence", &VOCAB.to_string()]
        )
    );
    for (name, ty, dims) in outputs.iter().filter(|(n, _, _)| n.starts_with("present.")) {
        assert_eq!(ty, act, "{name} dtype");
        assert_eq!(
            dims,
            &["batch", kv.as_str(), total.as_str(), d.as_str()],
            "{name} dims (past + sequence)"
        );
    }
}

/// `carrot_contract::names::decoder_outputs` is documented as the graph order (logits first, as
/// contract.md lists them and Optimum exports them); hosts that bind outputs by position rely on it.
#[test]
fn decoder_outputs_are_in_contract_order() {
    for dtype in [DType::F32, DType::F16] {
        let exp = exported(Layout::Merged, dtype);
        let model = read_model(&exp.dir.join(names::DECODER_GRAPH));
        let graph = model.graph.unwrap_or_default();
        let got: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            got,
            names::decoder_outputs(LAYERS),
            "decoder.onnx output order ({dtype:?})"
        );
    }
}

#[track_caller]
fn key<'a>(v: &'a Json, path: &str) -> &'a Json {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .unwrap_or_else(|| panic!("carrot.json has no `{path}`"))
}

fn check_manifest(exp: &Exported) {
    let path = exp.dir.join(names::MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let m: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    carrot_contract::Manifest::parse(&text, &path.display().to_string())
        .unwrap_or_else(|e| panic!("the runtime's reader rejects the manifest: {e}"));
    carrot_tests::check_manifest_schema(&[&path])
        .unwrap_or_else(|e| panic!("docs/carrot.schema.json rejects the manifest:\n{e}"));
    let multimodal = exp.layout.multimodal();
    let (dtype, act) = (exp.format.name(), exp.dtype.manifest_name());
    assert_eq!(key(&m, "format"), "carrot/1");
    assert_eq!(key(&m, "exporter.name"), "carrot-export");
    assert!(key(&m, "exporter.version").is_string());
    assert!(key(&m, "source.model").is_string());
    assert!(key(&m, "source.lora").is_array());
    let dtype_in = match exp.layout {
        Layout::Merged | Layout::MergedExplicitTower => "float16",
        _ => "bfloat16",
    };
    assert_eq!(key(&m, "source.dtype_in"), dtype_in, "source.dtype_in");
    let loras: Vec<&str> = key(&m, "source.lora")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    let expected_loras: &[&str] = match exp.layout {
        Layout::LoraOverBase => &["carrot-lora-tiny"],
        Layout::TextOnlyRslora => &["lora-rslora-tiny"],
        _ => &[],
    };
    assert_eq!(loras.len(), expected_loras.len(), "source.lora {loras:?}");
    for (lora, dir) in loras.iter().zip(expected_loras) {
        assert!(
            lora.ends_with(dir),
            "source.lora entry {lora} should name {dir}"
        );
    }
    assert_eq!(key(&m, "dtype"), dtype);
    assert_eq!(key(&m, "activation_dtype"), act);
    match exp.format.quant() {
        None => assert!(
            m.get("quantization").is_none(),
            "quantization in a float export"
        ),
        Some(spec) => {
            assert_eq!(key(&m, "quantization.bits"), spec.bits.width() as u64);
            assert_eq!(key(&m, "quantization.block_size"), spec.block_size as u64);
            assert_eq!(
                key(&m, "quantization.weights"),
                &serde_json::json!(["decoder_linears", "lm_head", "embed_tokens"])
            );
        }
    }
    assert_eq!(key(&m, "flavor"), "portable");
    assert_eq!(key(&m, "kv_cache"), "concat");
    assert_eq!(key(&m, "logits"), "all");
    assert_eq!(key(&m, "graphs.embed"), "embed.onnx");
    assert_eq!(key(&m, "graphs.decoder"), "decoder.onnx");
    assert_eq!(
        m["graphs"].get("vision").and_then(Json::as_str),
        multimodal.then_some("vision.onnx"),
        "graphs.vision"
    );
    for (k, v) in [
        ("hidden_size", HIDDEN),
        ("num_layers", LAYERS),
        ("num_attention_heads", 4),
        ("num_kv_heads", KV_HEADS),
        ("head_dim", HEAD_DIM),
        ("vocab_size", VOCAB),
        ("max_position_embeddings", 2048),
    ] {
        assert_eq!(key(&m, &format!("text.{k}")), v, "text.{k}");
    }
    if multimodal {
        assert_eq!(key(&m, "vision.image_size"), IMAGE_SIZE);
        assert_eq!(key(&m, "vision.num_image_tokens"), IMAGE_TOKENS);
        assert_eq!(key(&m, "vision.image_aspect_ratio"), "pad");
        assert_eq!(
            key(&m, "vision.pad_color"),
            &serde_json::json!([127, 127, 127])
        );
        assert_eq!(key(&m, "vision.resample"), "bicubic");
        let rescale = key(&m, "vision.rescale").as_f64().unwrap_or(f64::NAN);
        assert!(
            (rescale - 1.0 / 255.0).abs() < 1e-12,
            "vision.rescale {rescale}"
        );
        assert_eq!(key(&m, "vision.mean"), &serde_json::json!([0.5, 0.5, 0.5]));
        assert_eq!(key(&m, "vision.std"), &serde_json::json!([0.5, 0.5, 0.5]));
    } else {
        assert!(
            m.get("vision").is_none(),
            "a text-only export has no `vision` key: {}",
            m["vision"]
        );
    }
    let template = if multimodal {
        "bunny-llama"
    } else {
        "chat-template"
    };
    assert_eq!(key(&m, "prompt.template"), template);
    assert_eq!(key(&m, "prompt.image_token"), "<image>");
    assert_eq!(key(&m, "prompt.image_token_index"), -200);
    assert_eq!(key(&m, "prompt.bos_token_id"), 128_000);
    assert_eq!(
        key(&m, "prompt.eos_token_ids"),
        &serde_json::json!([128_001, 128_008, 128_009])
    );
    assert_eq!(key(&m, "prompt.max_length"), 2048);
    // The generation_config.json copied into OUT (the model's own, else the base model's).
    let generation_path = exp.dir.join("generation_config.json");
    let generation: Json = std::fs::read_to_string(&generation_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| panic!("{}: unreadable", generation_path.display()));
    let (temperature, top_p) = match exp.layout {
        Layout::Merged | Layout::MergedExplicitTower => (0.2, 0.9),
        Layout::TextOnly | Layout::TextOnlyRslora | Layout::LoraOverBase => (0.6, 0.9),
    };
    assert_eq!(
        (
            generation["temperature"].as_f64(),
            generation["top_p"].as_f64()
        ),
        (Some(temperature), Some(top_p)),
        "{}: generation_config.json copied into OUT",
        exp.layout.name()
    );
    let close = |path: &str, want: f64| {
        let got = key(&m, path).as_f64().unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-6, "{path}: {got}, expected {want}");
    };
    close("sampling_defaults.temperature", temperature);
    close("sampling_defaults.top_p", top_p);
    assert!(key(&m, "sampling_defaults.max_new_tokens").is_u64());
}

#[test]
fn merged_carrot_tiny_exports_per_contract() {
    check_contract(exported(Layout::Merged, DType::F32));
}

#[test]
fn merged_carrot_tiny_fp16_exports_per_contract() {
    check_contract(exported(Layout::Merged, DType::F16));
}

#[test]
fn merged_carrot_tiny_int4_exports_per_contract() {
    check_contract(exported_format(Layout::Merged, int_format("int4", 32)));
}

#[test]
fn text_only_llama_int8_block_64_exports_per_contract() {
    check_contract(exported_format(Layout::TextOnly, int_format("int8", 64)));
}

#[test]
fn merged_carrot_tiny_bf16_exports_per_contract() {
    check_contract(exported(Layout::Merged, DType::BF16));
}

#[test]
fn merged_with_explicit_vision_tower_exports_per_contract() {
    check_contract(exported(Layout::MergedExplicitTower, DType::F32));
}

#[test]
fn lora_output_over_base_exports_per_contract() {
    check_contract(exported(Layout::LoraOverBase, DType::F32));
}

#[test]
fn text_only_llama_exports_without_vision() {
    let exp = exported(Layout::TextOnly, DType::F32);
    assert!(!exp.dir.join(names::VISION_GRAPH).exists());
    check_contract(exp);
}

#[test]
fn text_only_llama_with_rslora_adapter_exports_per_contract() {
    check_contract(exported(Layout::TextOnlyRslora, DType::F32));
}

/// Adapters change the weights: the decoder side files of base, base + rsLoRA and the Bunny
/// LoRA export all differ, while the token embedding (not a LoRA target) is the same.
#[test]
fn adapters_change_the_decoder_weights() {
    let read = |layout: Layout, file: &str| {
        std::fs::read(exported(layout, DType::F32).dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let base = read(Layout::TextOnly, "decoder.onnx.data");
    assert_ne!(
        base,
        read(Layout::TextOnlyRslora, "decoder.onnx.data"),
        "--lora lora-rslora-tiny changed nothing"
    );
    assert_ne!(
        base,
        read(Layout::LoraOverBase, "decoder.onnx.data"),
        "the Bunny LoRA adapter changed nothing"
    );
    assert_eq!(
        read(Layout::TextOnly, "embed.onnx.data"),
        read(Layout::TextOnlyRslora, "embed.onnx.data")
    );
}

/// The manifest's preprocessing comes from the vision tower's `preprocessor_config.json`, with
/// Bunny's pad colour `int(mean · 255)`; a resampling the runtime cannot do is refused by name.
#[test]
fn preprocessing_follows_the_towers_preprocessor_config() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let tower = tmp.path().join("siglip");
    std::fs::create_dir(&tower).unwrap_or_else(|e| panic!("{e}"));
    let fixture = carrot_tests::export_util::fixture_model("siglip-tiny");
    for entry in std::fs::read_dir(&fixture)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        std::fs::copy(entry.path(), tower.join(entry.file_name()))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let pre = tower.join("preprocessor_config.json");
    let mut json: Json =
        serde_json::from_str(&std::fs::read_to_string(&pre).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    json["image_mean"] = serde_json::json!([0.48145466, 0.4578275, 0.40821073]);
    json["image_std"] = serde_json::json!([0.26862954, 0.26130258, 0.27577711]);
    std::fs::write(&pre, json.to_string()).unwrap_or_else(|e| panic!("{e}"));

    let out = tmp.path().join("out");
    let mut plan = Layout::MergedExplicitTower.plan(
        &out,
        carrot_export::pipeline::WeightFormat::Float(DType::F32),
    );
    plan.vision_tower = Some(tower.clone());
    carrot_export::pipeline::export(&plan).unwrap_or_else(|e| panic!("export: {e}"));
    let m = carrot_contract::Manifest::read_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    let v = m
        .vision
        .unwrap_or_else(|| panic!("no vision in the manifest"));
    assert_eq!(v.mean, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(v.std, [0.26862954, 0.26130258, 0.27577711]);
    assert_eq!(v.pad_color, [122, 116, 104]);

    json["resample"] = 2.into();
    std::fs::write(&pre, json.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let out = tmp.path().join("out2");
    plan.out = out.clone();
    let msg = carrot_export::pipeline::export(&plan)
        .expect_err("resample 2")
        .to_string();
    assert!(
        msg.contains("resample 2") && msg.contains("preprocessor_config.json"),
        "{msg}"
    );
    assert!(!out.exists());
}

/// The schema is strict enough to fail: a manifest with an unknown flavor, a zero size, a shared
/// cache without `max_sequence` and a quantized dtype without `quantization` is rejected on each
/// of those counts.
#[test]
fn the_manifest_schema_rejects_what_the_contract_forbids() {
    let exp = exported(Layout::Merged, DType::F32);
    let text = std::fs::read_to_string(exp.dir.join(names::MANIFEST_FILE))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut m: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    m["flavor"] = "fast".into();
    m["text"]["hidden_size"] = 0.into();
    m["kv_cache"] = "shared".into();
    m["dtype"] = "int4".into();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("carrot.json");
    std::fs::write(&path, m.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let err = carrot_tests::check_manifest_schema(&[&path]).expect_err("an invalid manifest");
    for needle in ["flavor", "text/hidden_size", "max_sequence", "quantization"] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }
}
