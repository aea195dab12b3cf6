//! Every fixture layout exports to a directory that follows `contract.md` (files, manifest keys,
//! graph inputs and outputs, external data, IR version, no `com.microsoft` op) and passes the ONNX
//! checker; and the exporter's refusals and failures leave the file system as the contract says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use carrot_contract::names;
use carrot_export::pipeline::{self, PipelineError, WeightFormat};
use carrot_graphs::config::DType;
use carrot_graphs::onnx::ModelProto;
use carrot_graphs::onnx::tensor_proto::DataLocation;
use carrot_tests::check_onnx;
use carrot_tests::export_util::{
    Exported, Layout, export_cli, export_to, exported, external_entry, fixture_model, read_model, value_type,
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
    (name.to_string(), ty.to_string(), dims.iter().map(|d| d.to_string()).collect())
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
        assert!((21..=24).contains(&opset.version), "{what}: default-domain opset {}", opset.version);
    }
    assert!(!model.opset_import.is_empty(), "{what}: no opset import");
    let graph = model.graph.as_ref().unwrap_or_else(|| panic!("{what}: no graph"));
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
                external_entry(t, key).unwrap_or_else(|| panic!("{what}: initializer {} has no external `{key}`", t.name))
            };
            assert_eq!(entry("location"), data_name, "{what}: initializer {} location", t.name);
            let offset: u64 = entry("offset").parse().unwrap_or_else(|e| panic!("{what}: {} offset: {e}", t.name));
            let length: u64 = entry("length").parse().unwrap_or_else(|e| panic!("{what}: {} length: {e}", t.name));
            assert_eq!(offset % 4096, 0, "{what}: initializer {} offset {offset} is not 4096-aligned", t.name);
            let total = data_len.unwrap_or_else(|| panic!("{what}: {} is external but {data_name} is missing", t.name));
            assert!(offset + length <= total, "{what}: initializer {} ends past {data_name} ({total} bytes)", t.name);
            assert!(t.raw_data.is_empty(), "{what}: external initializer {} also has inline data", t.name);
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

    let mut expected: BTreeSet<String> =
        ["carrot.json", "embed.onnx", "embed.onnx.data", "decoder.onnx", "decoder.onnx.data", "generation_config.json"]
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
    assert!(missing.is_empty(), "{}: missing {missing:?} (has {present:?})", exp.layout.name());
    let extra: Vec<_> = present.difference(&expected).filter(|f| !f.starts_with("chat_template")).collect();
    assert!(extra.is_empty(), "{}: unexpected files {extra:?}", exp.layout.name());
    let reported: BTreeSet<String> = exp.summary.files.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(reported, present, "{}: ExportSummary.files vs the directory", exp.layout.name());
    for (file, bytes) in &exp.summary.files {
        let on_disk = std::fs::metadata(dir.join(file)).map(|m| m.len()).unwrap_or(0);
        assert_eq!(*bytes, on_disk, "{}: size reported for {file}", exp.layout.name());
    }
    assert_eq!(exp.summary.multimodal, multimodal);

    check_manifest(exp);

    let graphs: Vec<&str> =
        if multimodal { vec![names::VISION_GRAPH, names::EMBED_GRAPH, names::DECODER_GRAPH] } else { vec![names::EMBED_GRAPH, names::DECODER_GRAPH] };
    for file in &graphs {
        let model = read_model(&dir.join(file));
        check_graph_file(dir, file, &model);
        let graph = model.graph.as_ref().unwrap_or_else(|| panic!("{file}: no graph"));
        let (inputs, outputs) = (signature(&graph.input), signature(&graph.output));
        match *file {
            names::VISION_GRAPH => {
                let s = IMAGE_SIZE.to_string();
                assert_eq!(inputs, vec![sig(names::PIXEL_VALUES, "FLOAT", &["batch", "3", &s, &s])], "{file} inputs");
                assert_eq!(
                    outputs,
                    vec![sig(names::IMAGE_FEATURES, act, &["batch", &IMAGE_TOKENS.to_string(), &HIDDEN.to_string()])],
                    "{file} outputs"
                );
            }
            names::EMBED_GRAPH => {
                assert_eq!(inputs, vec![sig(names::INPUT_IDS, "INT64", &["batch", "sequence"])], "{file} inputs");
                assert_eq!(
                    outputs,
                    vec![sig(names::INPUTS_EMBEDS, act, &["batch", "sequence", &HIDDEN.to_string()])],
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
    assert_eq!(in_names, names::decoder_inputs(LAYERS), "decoder input names");
    let out_names: BTreeSet<&str> = outputs.iter().map(|(n, _, _)| n.as_str()).collect();
    let want_out = names::decoder_outputs(LAYERS);
    assert_eq!(out_names, want_out.iter().map(String::as_str).collect(), "decoder output names (order is checked apart)");
    assert_eq!(outputs.len(), want_out.len(), "decoder outputs");
    let input = |name: &str| inputs.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no input {name}"));
    let output = |name: &str| outputs.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no output {name}"));
    let (h, kv, d) = (HIDDEN.to_string(), KV_HEADS.to_string(), HEAD_DIM.to_string());
    assert_eq!(input(names::INPUTS_EMBEDS), &sig(names::INPUTS_EMBEDS, act, &["batch", "sequence", &h]));
    let (mask, positions) = (input(names::ATTENTION_MASK), input(names::POSITION_IDS));
    assert_eq!((mask.1.as_str(), positions.1.as_str()), ("INT64", "INT64"), "attention_mask / position_ids dtypes");
    assert_eq!(positions.2, ["batch", "sequence"], "position_ids dims");
    let total = &mask.2[1];
    assert_eq!(mask.2[0], "batch", "attention_mask dims");
    assert!(total.parse::<usize>().is_err(), "attention_mask's second dim must be symbolic, is {total}");
    for (name, ty, dims) in inputs.iter().filter(|(n, _, _)| n.starts_with("past_key_values.")) {
        assert_eq!(ty, act, "{name} dtype");
        assert_eq!(dims, &["batch", kv.as_str(), "past_sequence", d.as_str()], "{name} dims");
    }
    assert_eq!(output(names::LOGITS), &sig(names::LOGITS, "FLOAT", &["batch", "sequence", &VOCAB.to_string()]));
    for (name, ty, dims) in outputs.iter().filter(|(n, _, _)| n.starts_with("present.")) {
        assert_eq!(ty, act, "{name} dtype");
        assert_eq!(dims, &["batch", kv.as_str(), total.as_str(), d.as_str()], "{name} dims (past + sequence)");
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
        assert_eq!(got, names::decoder_outputs(LAYERS), "decoder.onnx output order ({dtype:?})");
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
    let multimodal = exp.layout.multimodal();
    let (dtype, act) = match exp.dtype {
        DType::F32 => ("fp32", "float32"),
        DType::F16 => ("fp16", "float16"),
        DType::BF16 => ("bf16", "bfloat16"),
    };
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
    let loras: Vec<&str> = key(&m, "source.lora").as_array().into_iter().flatten().filter_map(Json::as_str).collect();
    let expected_loras: &[&str] = match exp.layout {
        Layout::LoraOverBase => &["carrot-lora-tiny"],
        Layout::TextOnlyRslora => &["lora-rslora-tiny"],
        _ => &[],
    };
    assert_eq!(loras.len(), expected_loras.len(), "source.lora {loras:?}");
    for (lora, dir) in loras.iter().zip(expected_loras) {
        assert!(lora.ends_with(dir), "source.lora entry {lora} should name {dir}");
    }
    assert_eq!(key(&m, "dtype"), dtype);
    assert_eq!(key(&m, "activation_dtype"), act);
    assert_eq!(key(&m, "flavor"), "portable");
    assert_eq!(key(&m, "kv_cache"), "concat");
    assert_eq!(key(&m, "logits"), "all");
    assert_eq!(key(&m, "graphs.embed"), "embed.onnx");
    assert_eq!(key(&m, "graphs.decoder"), "decoder.onnx");
    assert_eq!(m["graphs"].get("vision").and_then(Json::as_str), multimodal.then_some("vision.onnx"), "graphs.vision");
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
        assert_eq!(key(&m, "vision.pad_color"), &serde_json::json!([127, 127, 127]));
        assert_eq!(key(&m, "vision.resample"), "bicubic");
        let rescale = key(&m, "vision.rescale").as_f64().unwrap_or(f64::NAN);
        assert!((rescale - 1.0 / 255.0).abs() < 1e-12, "vision.rescale {rescale}");
        assert_eq!(key(&m, "vision.mean"), &serde_json::json!([0.5, 0.5, 0.5]));
        assert_eq!(key(&m, "vision.std"), &serde_json::json!([0.5, 0.5, 0.5]));
    } else {
        assert!(m.get("vision").is_none(), "a text-only export has no `vision` key: {}", m["vision"]);
    }
    let template = if multimodal { "bunny-llama" } else { "chat-template" };
    assert_eq!(key(&m, "prompt.template"), template);
    assert_eq!(key(&m, "prompt.image_token"), "<image>");
    assert_eq!(key(&m, "prompt.image_token_index"), -200);
    assert_eq!(key(&m, "prompt.bos_token_id"), 128_000);
    assert_eq!(key(&m, "prompt.eos_token_ids"), &serde_json::json!([128_001, 128_008, 128_009]));
    assert_eq!(key(&m, "prompt.max_length"), 2048);
    let (temperature, top_p) = match exp.layout {
        Layout::Merged | Layout::MergedExplicitTower => (0.2, 0.9),
        Layout::TextOnly | Layout::TextOnlyRslora => (0.6, 0.9),
        Layout::LoraOverBase => {
            let t = key(&m, "sampling_defaults.temperature").as_f64().unwrap_or(f64::NAN);
            (t, 0.9)
        }
    };
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
        std::fs::read(exported(layout, DType::F32).dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let base = read(Layout::TextOnly, "decoder.onnx.data");
    assert_ne!(base, read(Layout::TextOnlyRslora, "decoder.onnx.data"), "--lora lora-rslora-tiny changed nothing");
    assert_ne!(base, read(Layout::LoraOverBase, "decoder.onnx.data"), "the Bunny LoRA adapter changed nothing");
    assert_eq!(read(Layout::TextOnly, "embed.onnx.data"), read(Layout::TextOnlyRslora, "embed.onnx.data"));
}

// ---- refusals and failures ----------------------------------------------------------------

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// Every file under `dir` with its bytes.
fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                files.insert(path.strip_prefix(dir).unwrap_or(&path).to_path_buf(), bytes);
            }
        }
    }
    files
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("creating a temporary directory: {e}"))
}

fn fp32() -> WeightFormat {
    WeightFormat::Float(DType::F32)
}

#[test]
fn existing_out_is_refused_without_force_and_left_untouched() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), b"precious").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("decoder.onnx"), b"not a graph").unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot_tree(&out);

    let err = export_to(Layout::TextOnly, fp32(), &out).expect_err("exporting over an existing --out without --force");
    let msg = err.to_string();
    assert!(msg.contains("--force") && msg.contains(&out.display().to_string()), "message: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_eq!(snapshot_tree(&out), before, "--out was modified");
    assert_eq!(listing(tmp.path()), ["out"], "something was left next to --out");
}

#[test]
fn force_replaces_an_existing_out() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), b"stale").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("decoder.onnx"), b"not a graph").unwrap_or_else(|e| panic!("{e}"));

    let mut plan = Layout::TextOnly.plan(&out, fp32());
    plan.force = true;
    let summary = pipeline::export(&plan).unwrap_or_else(|e| panic!("--force export failed: {e}"));
    assert_eq!(summary.out, out);
    assert!(!out.join("keep.txt").exists(), "--force kept a file of the old --out");
    let decoder = read_model(&out.join("decoder.onnx"));
    assert!(decoder.graph.is_some_and(|g| !g.node.is_empty()), "decoder.onnx was not replaced");
    assert!(out.join("carrot.json").is_file());
    assert_eq!(listing(tmp.path()), ["out"], "a temporary or old sibling was left next to --out");
}

/// A copy of fixture `name` in `dst` (config and support files), with its safetensors weights
/// rewritten after `edit` has changed the tensor map (`name → (dtype, shape, bytes)`).
type TensorMap = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn rewritten_copy(name: &str, dst: &Path, edit: impl FnOnce(&mut TensorMap)) -> PathBuf {
    let src = fixture_model(name);
    let dir = dst.join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let weights = src.join("model.safetensors");
    for entry in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{e}")).flatten() {
        if entry.path() != weights {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let bytes = std::fs::read(&weights).unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut map: TensorMap =
        st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(k, (dtype, shape, data))| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// A copy of carrot-tiny (and siglip-tiny next to it, for `mm_vision_tower: ../siglip-tiny`) whose
/// last shard is cut in half.
fn truncated_shard_copy(dst: &Path) -> (PathBuf, PathBuf) {
    for name in ["carrot-tiny", "siglip-tiny"] {
        let dir = dst.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        for entry in std::fs::read_dir(fixture_model(name)).unwrap_or_else(|e| panic!("{e}")).flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let shard = dst.join("carrot-tiny/model-00003-of-00003.safetensors");
    let len = std::fs::metadata(&shard).map(|m| m.len()).unwrap_or(0);
    let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap_or_else(|e| panic!("{e}"));
    f.set_len(len / 2).unwrap_or_else(|e| panic!("{e}"));
    (dst.join("carrot-tiny"), shard)
}

/// The broken models a failed export must clean up after: (what, model dir, text the message
/// must contain).
fn broken_models(tmp: &Path) -> Vec<(&'static str, PathBuf, String)> {
    let missing = rewritten_copy("llama-base-tiny", &tmp.join("missing"), |m| {
        m.remove("model.layers.1.mlp.down_proj.weight");
    });
    // model.norm.weight is read after the embed graph and most of the decoder were written.
    let late = rewritten_copy("llama-base-tiny", &tmp.join("late"), |m| {
        let entry = m.get_mut("model.norm.weight").unwrap_or_else(|| panic!("fixture has no model.norm.weight"));
        let n: usize = entry.1.iter().product();
        *entry = (safetensors::Dtype::I32, entry.1.clone(), vec![0u8; n * 4]);
    });
    let (truncated, shard) = truncated_shard_copy(&tmp.join("truncated"));
    vec![
        ("missing tensor", missing, "model.layers.1.mlp.down_proj.weight".to_string()),
        ("integer norm weight", late, "model.norm.weight".to_string()),
        ("truncated shard", truncated, shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
    ]
}

#[test]
fn failed_exports_leave_no_out_and_no_partial_sibling() {
    let tmp = tempdir();
    let models = tempdir();
    for (what, model, needle) in broken_models(models.path()) {
        let out = tmp.path().join(format!("out-{}", what.replace(' ', "-")));
        let mut plan = Layout::TextOnly.plan(&out, fp32());
        plan.model = model;
        let err = pipeline::export(&plan).expect_err(what);
        let msg = err.to_string();
        assert!(msg.contains(&needle), "{what}: the message should name `{needle}`: {msg}");
        assert!(!msg.contains('\n'), "{what}: one line: {msg}");
        assert!(!out.exists(), "{what}: --out {} exists after a failed export", out.display());
        assert_eq!(listing(tmp.path()), Vec::<String>::new(), "{what}: files left next to --out");
    }
}

/// A failure with `--force` keeps the existing `--out` as it was.
#[test]
fn failed_forced_export_keeps_the_existing_out() {
    let tmp = tempdir();
    let models = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), b"precious").unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot_tree(&out);
    for (what, model, _) in broken_models(models.path()) {
        let mut plan = Layout::TextOnly.plan(&out, fp32());
        plan.model = model;
        plan.force = true;
        pipeline::export(&plan).expect_err(what);
        assert_eq!(snapshot_tree(&out), before, "{what}: --out changed");
        assert_eq!(listing(tmp.path()), ["out"], "{what}: files left next to --out");
    }
}

#[test]
fn vision_tower_for_a_text_only_model_is_refused() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let mut plan = Layout::TextOnly.plan(&out, fp32());
    plan.vision_tower = Some(fixture_model("siglip-tiny"));
    let err = pipeline::export(&plan).expect_err("--vision-tower on a text-only model");
    let msg = err.to_string();
    assert!(msg.contains("--vision-tower") && msg.contains("text-only"), "message: {msg}");
    assert!(!out.exists());
    assert_eq!(listing(tmp.path()), Vec::<String>::new());
}

#[test]
fn quantized_dtypes_are_refused_with_a_clear_message() {
    let tmp = tempdir();
    for dtype in ["int4", "int8"] {
        let out = tmp.path().join("out");
        let format = WeightFormat::parse(dtype).unwrap_or_else(|| panic!("--dtype {dtype} does not parse"));
        let plan = Layout::Merged.plan(&out, format);
        let err = pipeline::check_plan(&plan).expect_err(dtype);
        assert!(matches!(err, PipelineError::Plan(_)), "{dtype}: {err:?}");
        let msg = pipeline::export(&plan).expect_err(dtype).to_string();
        assert!(msg.contains(&format!("--dtype {dtype}")) && msg.contains("fp32"), "message: {msg}");
        assert!(!out.exists());
        assert_eq!(listing(tmp.path()), Vec::<String>::new());
    }
}

// ---- the command line ---------------------------------------------------------------------

/// Runs `carrot-export ARGS`; `None` (with a note) when the binary cannot be built here.
fn cli(args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    let bin = match export_cli() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("skipping the carrot-export command-line checks: {why}");
            return None;
        }
    };
    Some(Command::new(&bin).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display())))
}

/// Exit status non-zero, exactly one line on stderr naming `needle`, no panic, nothing on stdout.
#[track_caller]
fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {stderr}");
    assert!(lines[0].contains(needle), "stderr should name `{needle}`: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn cli_errors_exit_nonzero_with_one_line() {
    let tmp = tempdir();
    let models = tempdir();
    let llama = fixture_model("llama-base-tiny");
    let out = tmp.path().join("out");

    let Some(o) = cli(&[os("--model"), llama.as_os_str(), os("--out"), out.as_os_str(), os("--dtype"), os("int4"), os("-q")])
    else {
        return;
    };
    assert_one_line_error(&o, "--dtype int4");
    assert!(!out.exists());

    let tower = fixture_model("siglip-tiny");
    let Some(o) = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--vision-tower"),
        tower.as_os_str(),
        os("-q"),
    ]) else {
        return;
    };
    assert_one_line_error(&o, "--vision-tower");
    assert!(!out.exists());

    for (what, model, needle) in broken_models(models.path()) {
        let Some(o) = cli(&[os("--model"), model.as_os_str(), os("--out"), out.as_os_str(), os("--dtype"), os("fp32"), os("-q")])
        else {
            return;
        };
        assert_one_line_error(&o, &needle);
        assert!(!out.exists(), "{what}: --out exists");
        assert_eq!(listing(tmp.path()), Vec::<String>::new(), "{what}: files left next to --out");
    }

    std::fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), b"precious").unwrap_or_else(|e| panic!("{e}"));
    let Some(o) = cli(&[os("--model"), llama.as_os_str(), os("--out"), out.as_os_str(), os("--dtype"), os("fp32"), os("-q")])
    else {
        return;
    };
    assert_one_line_error(&o, "--force");
    assert_eq!(listing(&out), ["keep.txt"]);
}

#[test]
fn cli_exports_and_replaces_with_force() {
    let tmp = tempdir();
    let llama = fixture_model("llama-base-tiny");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), b"old").unwrap_or_else(|e| panic!("{e}"));
    let Some(o) = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--dtype"),
        os("fp16"),
        os("--force"),
        os("-q"),
    ]) else {
        return;
    };
    assert!(o.status.success(), "carrot-export failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&o.stdout));
    assert!(!out.join("keep.txt").exists());
    for file in ["carrot.json", "embed.onnx", "decoder.onnx", "decoder.onnx.data"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let manifest = carrot_contract::Manifest::read_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((manifest.dtype.as_str(), manifest.activation_dtype.as_str()), ("fp16", "float16"));
    assert!(manifest.vision.is_none());
    assert_eq!(listing(tmp.path()), ["out"]);
}

