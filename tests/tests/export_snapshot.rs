//! The structure of carrot-tiny's graphs (nodes, attributes, initializer shapes; no weight
//! values) as reviewed text snapshots, so that any change in what the exporter emits is a diff.

use carrot_graphs::config::DType;
use carrot_tests::export_util::{Layout, exported, graph_structure, read_model};

fn snapshot(dtype: DType, graph: &str) {
    let exp = exported(Layout::Merged, dtype);
    let text = graph_structure(&read_model(&exp.graph(&format!("{graph}.onnx"))));
    let dtype = match dtype {
        DType::F32 => "fp32",
        DType::F16 => "fp16",
        DType::BF16 => "bf16",
    };
    insta::assert_snapshot!(format!("carrot_tiny_{dtype}_{graph}"), text);
}

#[test]
fn fp32_vision_structure() {
    snapshot(DType::F32, "vision");
}

#[test]
fn fp32_embed_structure() {
    snapshot(DType::F32, "embed");
}

#[test]
fn fp32_decoder_structure() {
    snapshot(DType::F32, "decoder");
}

#[test]
fn fp16_vision_structure() {
    snapshot(DType::F16, "vision");
}

#[test]
fn fp16_embed_structure() {
    snapshot(DType::F16, "embed");
}

#[test]
fn fp16_decoder_structure() {
    snapshot(DType::F16, "decoder");
}

/// Node and value names follow onnxruntime-genai's scheme, `/model/layers.3/attn/q_proj/MatMul`
/// and `…/output_0`: one leading slash, no empty path segment.
#[test]
fn node_names_are_slash_paths_without_empty_segments() {
    let exp = exported(Layout::Merged, DType::F32);
    let mut bad = Vec::new();
    for graph in ["vision", "embed", "decoder"] {
        let model = read_model(&exp.graph(&format!("{graph}.onnx")));
        let g = model.graph.unwrap_or_default();
        for node in &g.node {
            if !node.name.starts_with('/') || node.name.contains("//") {
                bad.push(format!("{graph}: node `{}`", node.name));
            }
            for out in &node.output {
                if out.contains("//") {
                    bad.push(format!("{graph}: value `{out}`"));
                }
            }
        }
        for t in &g.initializer {
            if t.name.contains("//") {
                bad.push(format!("{graph}: initializer `{}`", t.name));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} malformed names, for example:\n{}",
        bad.len(),
        bad[..bad.len().min(5)].join("\n")
    );
}
