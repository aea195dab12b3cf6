//! Weight-only int4/int8 exports of carrot-tiny against the transformers goldens: the decoder's
//! logits stay close to the float32 reference (top-5 overlap, never exact tokens, as
//! quantization allows), the graphs use the pattern ONNX Runtime fuses into `MatMulNBits`, and
//! the embedding table dequantizes to what the decoder expects.

use std::collections::HashMap;

use carrot_contract::names;
use carrot_graphs::config::DType;
use carrot_tests::export_util::{
    Goldens, Layout, Output, argmax_rows, exported_format, golden_feeds, int_format, ort_env,
    read_model, run, session,
};
use ndarray::Array2;
use ort::value::Tensor;

const LAYERS: usize = 2;
const VOCAB: usize = 128_256;
const HIDDEN: usize = 32;
/// Bounds on the relative RMS error of the logits (carrot-tiny's random weights, and ONNX
/// Runtime's `MatMulNBits` computing with int8 activations; measured at about half of these).
const INT8_RMS: f64 = 0.05;
const INT4_RMS: f64 = 0.5;

/// The `k` largest entries of a row, largest first.
fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx
}

struct Agreement {
    positions: usize,
    top1: usize,
    in_top5: usize,
    max_abs_error: f32,
    max_logit: f32,
    /// `‖ours − reference‖ / ‖reference‖` over every logit.
    relative_rms: f64,
}

/// Runs the golden prefill, decode and chunk cases (each on the golden past) through the
/// decoder of a `dtype` export and compares its logits with the float32 reference.
fn agreement(dtype: &str, block: usize) -> Agreement {
    let goldens = Goldens::open("decoder.safetensors");
    let exp = exported_format(Layout::Merged, int_format(dtype, block));
    let mut s = session(&exp.graph(names::DECODER_GRAPH));
    let mut a = Agreement {
        positions: 0,
        top1: 0,
        in_top5: 0,
        max_abs_error: 0.0,
        max_logit: 0.0,
        relative_rms: 0.0,
    };
    let (mut diff2, mut ref2) = (0f64, 0f64);
    for case in ["prefill", "decode", "chunk"] {
        let feeds = golden_feeds(&s, &goldens, case, DType::F32);
        let outputs: HashMap<String, Output> = run(&mut s, feeds);
        let got = &outputs[names::LOGITS].array.data;
        let want = &goldens.f32(&format!("{case}.logits")).data;
        assert_eq!(got.len(), want.len(), "{dtype} {case}: logits length");
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{dtype} {case}: non-finite logits"
        );
        for (g, w) in got.chunks_exact(VOCAB).zip(want.chunks_exact(VOCAB)) {
            let reference = argmax_rows(w, VOCAB)[0];
            let ours = top_k(g, 5);
            a.positions += 1;
            a.top1 += usize::from(ours[0] == reference);
            a.in_top5 += usize::from(ours.contains(&reference));
        }
        for (&g, &w) in got.iter().zip(want) {
            a.max_abs_error = a.max_abs_error.max((g - w).abs());
            a.max_logit = a.max_logit.max(w.abs());
            diff2 += f64::from(g - w).powi(2);
            ref2 += f64::from(w).powi(2);
        }
        for name in names::decoder_outputs(LAYERS).iter().skip(1) {
            let p = &outputs[name].array;
            let w = goldens.f32(&format!("{case}.{name}"));
            assert_eq!(p.shape, w.shape, "{dtype} {case}: {name} shape");
        }
    }
    a.relative_rms = (diff2 / ref2).sqrt();
    eprintln!(
        "{dtype} (block {block}): top-1 agrees at {}/{} positions, reference top-1 in our top 5 at {}/{}; \
         relative RMS logit error {:.3e}, max abs {:.3e} (largest reference logit {:.3e})",
        a.top1, a.positions, a.in_top5, a.positions, a.relative_rms, a.max_abs_error, a.max_logit
    );
    a
}

#[test]
fn int8_decoder_tracks_the_reference() {
    let a = agreement("int8", 32);
    assert_eq!(
        a.in_top5, a.positions,
        "reference top-1 outside int8's top 5"
    );
    assert_eq!(a.top1, a.positions, "int8 top-1 differs from the reference");
    assert!(
        a.relative_rms < INT8_RMS,
        "int8 logits drift: relative RMS {}",
        a.relative_rms
    );
}

#[test]
fn int4_decoder_tracks_the_reference() {
    let a = agreement("int4", 32);
    assert_eq!(
        a.in_top5, a.positions,
        "reference top-1 outside int4's top 5"
    );
    assert!(
        a.relative_rms < INT4_RMS,
        "int4 logits drift: relative RMS {}",
        a.relative_rms
    );
}

/// The quantized embedding returns the checkpoint's own table rows (carrot-tiny's fp16
/// `model.embed_tokens.weight`) up to the quantization step.
#[test]
fn quantized_embeddings_dequantize_to_the_table() {
    let ids: Vec<i64> = vec![0, 1, 128_000, 128_255, 42, 9_999];
    let feed = |path: &std::path::Path| {
        let mut s = session(path);
        let input =
            Tensor::from_array(Array2::from_shape_vec((2, 3), ids.clone()).unwrap_or_default())
                .unwrap_or_else(|e| panic!("input_ids: {e}"));
        let out = s
            .run(ort::inputs![names::INPUT_IDS => input])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (shape, data) = out[names::INPUTS_EMBEDS]
            .try_extract_tensor::<f32>()
            .unwrap_or_else(|e| panic!("inputs_embeds: {e}"));
        assert_eq!(shape.to_vec(), vec![2, 3, HIDDEN as i64]);
        data.to_vec()
    };
    let reference = checkpoint_rows("model.embed_tokens.weight", &ids);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, bound) in [("int8", 0.01), ("int4", 0.1)] {
        let got =
            feed(&exported_format(Layout::Merged, int_format(dtype, 32)).graph(names::EMBED_GRAPH));
        let err = got
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{dtype} embedding: max abs error {err:.3e} (values up to {scale:.3e})");
        assert!(
            err <= bound * scale,
            "{dtype}: embedding error {err} against values up to {scale}"
        );
        assert!(err > 0.0, "{dtype}: the embedding was not quantized");
    }
}

/// Rows `ids` of the fp16 matrix `name` in carrot-tiny's sharded checkpoint, as float32.
fn checkpoint_rows(name: &str, ids: &[i64]) -> Vec<f32> {
    let dir = carrot_tests::export_util::fixture_model("carrot-tiny");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json"))
            .unwrap_or_else(|e| panic!("index: {e}")),
    )
    .unwrap_or_else(|e| panic!("index: {e}"));
    let shard = index["weight_map"][name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} is not in the index"));
    let bytes = std::fs::read(dir.join(shard)).unwrap_or_else(|e| panic!("{shard}: {e}"));
    let st =
        safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{shard}: {e}"));
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F16, "{name} dtype");
    let cols = t.shape()[1];
    let values: Vec<f32> = t
        .data()
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    ids.iter()
        .flat_map(|&id| {
            values[id as usize * cols..(id as usize + 1) * cols]
                .iter()
                .copied()
        })
        .collect()
}

/// Every linear and the lm_head is `DequantizeLinear(axis 0, block) → MatMul`, and ONNX Runtime's
/// CPU optimizer turns each into one `MatMulNBits` kernel (the fast path the format exists for).
#[test]
fn quantized_linears_fuse_into_matmulnbits() {
    let exp = exported_format(Layout::Merged, int_format("int4", 32));
    let path = exp.graph(names::DECODER_GRAPH);
    let model = read_model(&path);
    let graph = model.graph.unwrap_or_default();
    let dq: Vec<_> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .collect();
    let linears = 7 * LAYERS + 1;
    assert_eq!(dq.len(), linears, "DequantizeLinear nodes");
    for n in &dq {
        let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).map(|a| a.i);
        assert_eq!(
            (attr("axis"), attr("block_size")),
            (Some(0), Some(32)),
            "{}",
            n.name
        );
        let consumers = graph
            .node
            .iter()
            .filter(|m| m.input.contains(&n.output[0]))
            .map(|m| m.op_type.as_str())
            .collect::<Vec<_>>();
        assert_eq!(consumers, vec!["MatMul"], "{} feeds {consumers:?}", n.name);
    }
    assert!(
        !graph.node.iter().any(|n| n.domain == "com.microsoft"),
        "the portable flavor uses standard ops only"
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let optimized = dir.path().join("decoder.optimized.onnx");
    ort::session::Session::builder(ort_env())
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.with_optimized_model_path(&optimized)
                .map_err(|e| e.to_string())
        })
        .and_then(|mut b| b.commit_from_file(&path).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("optimizing {}: {e}", path.display()));
    let fused = read_model(&optimized).graph.unwrap_or_default();
    let count = |op: &str| fused.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(
        count("MatMulNBits"),
        linears,
        "MatMulNBits after optimization"
    );
    assert_eq!(
        count("DequantizeLinear"),
        0,
        "DequantizeLinear left after optimization"
    );
}

/// The `ort` flavor emits `MatMulNBits` itself (no `DequantizeLinear` left for ONNX Runtime to fuse),
/// packs q/k/v, attends with `GroupQueryAttention`, fuses residual additions into the norms, and
/// computes what the portable graph computes: logits and presents for the golden prefill, decode and
/// chunk cases.
#[test]
fn ort_flavor_emits_matmulnbits_and_matches_the_portable_graph() {
    let portable = exported_format(Layout::Merged, int_format("int4", 32));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = tmp.path().join("ort-int4");
    let mut plan = Layout::Merged.plan(&out, int_format("int4", 32));
    plan.flavor = "ort".into();
    carrot_export::pipeline::export(&plan).unwrap_or_else(|e| panic!("ort flavor export: {e}"));
    let manifest = carrot_contract::Manifest::read_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (manifest.flavor.as_str(), manifest.dtype.as_str()),
        ("ort", "int4")
    );

    let graph = read_model(&out.join(names::DECODER_GRAPH))
        .graph
        .unwrap_or_default();
    let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    // Per layer: packed q/k/v, o_proj, gate, up, down; then the lm_head.
    assert_eq!(count("MatMulNBits"), 5 * LAYERS + 1, "MatMulNBits nodes");
    assert_eq!(
        count("GroupQueryAttention"),
        LAYERS,
        "GroupQueryAttention nodes"
    );
    // Every residual addition is fused into the norm after it: two per layer.
    assert_eq!(
        count("SkipSimplifiedLayerNormalization"),
        2 * LAYERS,
        "SkipSimplifiedLayerNormalization nodes"
    );
    assert!(
        !graph.node.iter().any(|n| n.name.contains("residual")),
        "residual Adds left"
    );
    assert_eq!(count("DequantizeLinear"), 0);
    assert!(
        graph
            .node
            .iter()
            .filter(|n| n.op_type == "MatMulNBits")
            .all(|n| n.domain == "com.microsoft")
    );

    let goldens = Goldens::open("decoder.safetensors");
    let mut a = session(&portable.graph(names::DECODER_GRAPH));
    let mut b = session(&out.join(names::DECODER_GRAPH));
    for case in ["prefill", "decode", "chunk"] {
        let feeds = golden_feeds(&a, &goldens, case, DType::F32);
        let want = run(&mut a, feeds);
        let feeds = golden_feeds(&b, &goldens, case, DType::F32);
        let got = run(&mut b, feeds);
        for name in names::decoder_outputs(LAYERS) {
            let c =
                carrot_tests::allclose(&got[&name].array.data, &want[&name].array.data, 1e-5, 1e-5);
            assert_eq!(
                c.mismatches, 0,
                "{case}.{name}: ort flavor vs portable, max abs error {:e}",
                c.max_abs_error
            );
        }
    }
}

#[test]
fn ort_flavor_of_a_bf16_export_is_refused() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = tmp.path().join("out");
    let mut plan = Layout::Merged.plan(
        &out,
        carrot_export::pipeline::WeightFormat::Float(DType::BF16),
    );
    plan.flavor = "ort".into();
    let msg = carrot_export::pipeline::export(&plan)
        .expect_err("ort flavor in bf16")
        .to_string();
    assert!(
        msg.contains("--flavor ort") && msg.contains("bfloat16"),
        "{msg}"
    );
    assert!(!out.exists());
}

/// The `ort` flavor's manifest asks for a shared KV cache; the runtime's shared buffers (bound as
/// past and present, grown past their first 256 positions) give the same greedy tokens as feeding
/// the same graph concatenated caches, for float32 (int4) and float16 activations.
#[test]
fn shared_kv_cache_generates_what_the_concatenating_cache_does() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let formats = [
        int_format("int4", 32),
        carrot_export::pipeline::WeightFormat::Float(DType::F16),
    ];
    for format in formats {
        let shared = tmp.path().join(format!("shared-{}", format.name()));
        let mut plan = Layout::Merged.plan(&shared, format);
        plan.flavor = "ort".into();
        carrot_export::pipeline::export(&plan).unwrap_or_else(|e| panic!("ort flavor export: {e}"));
        let manifest_path = shared.join(names::MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
        let mut json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["kv_cache"], "shared");
        assert_eq!(json["max_sequence"], 2048);
        carrot_tests::check_manifest_schema(&[&manifest_path])
            .unwrap_or_else(|e| panic!("docs/carrot.schema.json rejects the ort manifest:\n{e}"));

        // The same graph, told to concatenate.
        let concat = tmp.path().join(format!("concat-{}", format.name()));
        std::fs::create_dir(&concat).unwrap_or_else(|e| panic!("{e}"));
        for entry in std::fs::read_dir(&shared)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
        {
            std::fs::copy(entry.path(), concat.join(entry.file_name()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        json["kv_cache"] = "concat".into();
        json.as_object_mut().map(|m| m.remove("max_sequence"));
        std::fs::write(concat.join(names::MANIFEST_FILE), json.to_string())
            .unwrap_or_else(|e| panic!("{e}"));

        let prompt: Vec<i64> = vec![
            128_000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13,
        ];
        let run = |dir: &std::path::Path| {
            let mut engine = carrot_tests::export_util::load_engine(dir);
            carrot_tests::export_util::greedy(&mut engine, &prompt, &[], 300, &[])
        };
        let (a, b) = (run(&shared), run(&concat));
        assert_eq!(a.len(), 300);
        assert_eq!(a, b, "{}: shared vs concatenated KV cache", format.name());
    }
}

/// The exported bytes do not depend on how many threads quantize: every file of an int4 export
/// made on one thread equals the same export made on four.
#[test]
fn quantized_exports_are_byte_identical_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let export_on = |threads: usize| {
        let out = tmp.path().join(format!("threads-{threads}"));
        let mut plan = Layout::Merged.plan(&out, int_format("int4", 32));
        plan.flavor = "ort".into();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap_or_else(|e| panic!("thread pool: {e}"));
        pool.install(|| carrot_export::pipeline::export(&plan))
            .unwrap_or_else(|e| panic!("export on {threads} threads: {e}"));
        out
    };
    let (one, four) = (export_on(1), export_on(4));
    assert_same_files(&one, &four, "1 and 4 threads");
}

/// Every file of directory `a` equals the same file of `b`.
fn assert_same_files(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let mut files: Vec<_> = std::fs::read_dir(a)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for name in files {
        let x = std::fs::read(a.join(&name)).unwrap_or_else(|e| panic!("{e}"));
        let y = std::fs::read(b.join(&name)).unwrap_or_else(|e| panic!("{e}"));
        assert!(x == y, "{} differs between {what}", name.to_string_lossy());
    }
}

/// Large matrices (the embedding table and lm_head) are read, converted and quantized a block of
/// rows at a time. With the threshold lowered so that every matrix of the fixtures streams in
/// blocks of two rows, each export equals the one that reads every matrix whole, byte for byte:
/// float and quantized, both flavors, tied embeddings and LoRA-merged weights.
#[test]
fn exports_streamed_by_rows_equal_exports_read_whole() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let cases = [
        (Layout::Merged, "fp16", "portable"),
        (Layout::Merged, "fp32", "ort"),
        (Layout::Merged, "bf16", "portable"),
        (Layout::Merged, "int4", "portable"),
        (Layout::Merged, "int4", "ort"),
        (Layout::TextOnly, "int8", "portable"),
        (Layout::TextOnly, "fp16", "ort"),
        (Layout::LoraOverBase, "fp16", "portable"),
        (Layout::LoraOverBase, "int4", "ort"),
    ];
    for (i, (layout, dtype, flavor)) in cases.into_iter().enumerate() {
        let export = |stream_elements: usize, tag: &str| {
            let out = tmp.path().join(format!("{i}-{tag}"));
            let format = carrot_export::pipeline::WeightFormat::parse(dtype)
                .unwrap_or_else(|| panic!("--dtype {dtype}"));
            let mut plan = layout.plan(&out, format);
            plan.flavor = flavor.into();
            plan.stream_elements = stream_elements;
            carrot_export::pipeline::export(&plan)
                .unwrap_or_else(|e| panic!("{layout:?} {dtype} {flavor} ({tag}): {e}"));
            out
        };
        let whole = export(usize::MAX, "whole");
        let streamed = export(64, "streamed");
        assert_same_files(
            &whole,
            &streamed,
            &format!("{layout:?} {dtype} {flavor} read whole and streamed"),
        );
    }
}
