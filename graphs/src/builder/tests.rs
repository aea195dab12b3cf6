use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use super::*;
use crate::onnx::tensor_proto::DataLocation;

/// A sink the test can read back after the builder has consumed its `Box<dyn Write>`.
#[derive(Clone, Default)]
struct SharedSink(Arc<Mutex<Vec<u8>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

fn f32_bytes(n: usize, v: f32) -> Vec<u8> {
    (0..n).flat_map(|_| v.to_le_bytes()).collect()
}

#[test]
fn names_follow_scope_and_outputs_are_numbered() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    let x = g.input("x", ElemType::F32, &["batch".into(), 4usize.into()])?;
    let w = g.initializer(
        "model.layers.3.self_attn.q_proj.weight",
        ElemType::F32,
        &[4, 4],
        &f32_bytes(16, 1.0),
    )?;
    g.push_scope("model");
    g.push_scope("layers.3");
    let y = g.in_scope("attn", |g| g.matmul("q_proj/MatMul", &x, &w))?;
    let shape = g.const_i64("shape", &[0, -1])?;
    g.pop_scope();
    g.pop_scope();
    let z = g.reshape("Reshape", &y, &shape)?;
    let logits = g
        .op("Identity", "Identity", &[&z])
        .output_names(&["logits"])
        .build()?;
    g.output(&logits, ElemType::F32, &["batch".into(), Dim::Fixed(4)])?;
    let m = g.finish(21, "carrot-test", "0.0")?;

    assert_eq!(y.name(), "/model/layers.3/attn/q_proj/MatMul/output_0");
    assert_eq!(shape.name(), "/model/layers.3/shape");
    assert_eq!(z.name(), "/Reshape/output_0");
    assert_eq!(logits.name(), "logits");
    assert_eq!(m.ir_version, 10);
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(
        (m.opset_import[0].domain.as_str(), m.opset_import[0].version),
        ("", 21)
    );
    let graph = m.graph.unwrap_or_default();
    let nodes: Vec<_> = graph
        .node
        .iter()
        .map(|n| (n.op_type.as_str(), n.name.as_str()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("MatMul", "/model/layers.3/attn/q_proj/MatMul"),
            ("Reshape", "/Reshape"),
            ("Identity", "/Identity"),
        ]
    );
    assert_eq!(
        graph.node[0].input,
        ["x", "model.layers.3.self_attn.q_proj.weight"]
    );
    assert_eq!(graph.output[0].name, "logits");
    let out_ty = graph.output[0].r#type.clone().and_then(|t| t.value);
    let Some(type_proto::Value::TensorType(t)) = out_ty else {
        panic!("output is not a tensor type")
    };
    let dims: Vec<_> = t
        .shape
        .unwrap_or_default()
        .dim
        .into_iter()
        .filter_map(|d| d.value)
        .collect();
    assert_eq!(
        dims,
        [
            dimension::Value::DimParam("batch".into()),
            dimension::Value::DimValue(4)
        ]
    );
    assert_eq!(graph.initializer[1].dims, [2]);
    assert_eq!(graph.initializer[1].raw_data.len(), 16);
    Ok(())
}

#[test]
fn attributes_and_contrib_domain() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    let x = g.input("x", ElemType::F16, &[Dim::Fixed(2)])?;
    let outs = g
        .op(
            "SkipSimplifiedLayerNormalization",
            "norm",
            &[&x, &x, &Value::none()],
        )
        .domain("com.microsoft")
        .attr_float("epsilon", 1e-5)
        .attr_ints("perm", &[0, 2, 1])
        .attr_string("mode", "linear")
        .build_n(2)?;
    assert_eq!(outs[1].name(), "/norm/output_1");
    let m = g.finish(23, "p", "v")?;
    let domains: Vec<_> = m
        .opset_import
        .iter()
        .map(|o| (o.domain.as_str(), o.version))
        .collect();
    assert_eq!(domains, [("", 23), ("com.microsoft", 1)]);
    let node = &m.graph.unwrap_or_default().node[0];
    assert_eq!(node.input, ["x", "x", ""]);
    let a: Vec<_> = node
        .attribute
        .iter()
        .map(|a| (a.name.as_str(), a.r#type))
        .collect();
    assert_eq!(
        a,
        [
            ("epsilon", AttributeType::Float as i32),
            ("perm", AttributeType::Ints as i32),
            ("mode", AttributeType::String as i32)
        ]
    );
    assert_eq!(node.attribute[2].s, b"linear");
    Ok(())
}

#[test]
fn duplicate_node_name_is_an_error() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    let x = g.input("x", ElemType::F32, &[Dim::Fixed(1)])?;
    g.push_scope("model");
    g.neg("Neg", &x)?;
    let err = g.neg("Neg", &x).err();
    assert!(
        matches!(err, Some(BuildError::DuplicateNode(ref n)) if n == "/model/Neg"),
        "{err:?}"
    );
    // The same local name in another scope is fine.
    g.pop_scope();
    g.neg("Neg", &x)?;
    Ok(())
}

#[test]
fn duplicate_value_names_are_errors() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    let x = g.input("x", ElemType::F32, &[Dim::Fixed(1)])?;
    assert!(
        matches!(g.input("x", ElemType::F32, &[]), Err(BuildError::DuplicateValue(n)) if n == "x")
    );
    let err = g.initializer("x", ElemType::F32, &[1], &f32_bytes(1, 0.0));
    assert!(matches!(err, Err(BuildError::DuplicateValue(n)) if n == "x"));
    g.op("Neg", "a", &[&x]).output_names(&["y"]).build()?;
    let err = g.op("Neg", "b", &[&x]).output_names(&["y"]).build();
    assert!(matches!(err, Err(BuildError::DuplicateValue(n)) if n == "y"));
    let err = g
        .op("Split", "c", &[&x])
        .output_names(&["p", "p"])
        .build_n(2);
    assert!(matches!(err, Err(BuildError::DuplicateValue(n)) if n == "p"));
    // A failed node leaves no trace: its name is still free.
    g.op("Neg", "b", &[&x]).output_names(&["z"]).build()?;
    let y = g
        .lookup("y")
        .ok_or_else(|| BuildError::DuplicateValue("y missing".into()))?;
    g.output(&y, ElemType::F32, &[])?;
    assert!(matches!(
        g.output(&y, ElemType::F32, &[]),
        Err(BuildError::DuplicateValue(_))
    ));
    Ok(())
}

#[test]
fn unknown_inputs_and_wrong_output_counts_are_errors() -> Result<(), BuildError> {
    let mut a = GraphBuilder::new("a");
    let foreign = a.input("elsewhere", ElemType::F32, &[])?;
    let mut g = GraphBuilder::new("test");
    let err = g.neg("Neg", &foreign);
    assert!(
        matches!(err, Err(BuildError::UnknownValue { ref node, ref value })
        if node == "/Neg" && value == "elsewhere")
    );
    let x = g.input("x", ElemType::F32, &[])?;
    let err = g.op("Split", "s", &[&x]).output_names(&["a"]).build_n(2);
    assert!(matches!(
        err,
        Err(BuildError::OutputCount {
            expected: 2,
            given: 1,
            ..
        })
    ));
    Ok(())
}

#[test]
fn initializer_length_is_checked() {
    let mut g = GraphBuilder::new("test");
    let err = g.initializer("w", ElemType::BF16, &[3, 2], &[0; 11]);
    assert!(
        matches!(&err, Err(BuildError::BadInitializer { name, reason })
            if name == "w" && reason.contains("12 bytes, got 11")),
        "{err:?}"
    );
    let err = g.initializer("w", ElemType::F32, &[usize::MAX, 2], &[]);
    assert!(matches!(err, Err(BuildError::BadInitializer { .. })));
    assert!(g.initializer("w", ElemType::I64, &[0, 5], &[]).is_ok());
}

#[test]
fn scalars_are_converted_to_their_type() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    g.push_scope("c");
    g.const_scalar("f32", ElemType::F32, 0.5)?;
    g.const_scalar("f16", ElemType::F16, 1.0)?;
    g.const_scalar("bf16", ElemType::BF16, -2.0)?;
    g.const_scalar("i64", ElemType::I64, -3.0)?;
    assert!(matches!(
        g.const_scalar("bad", ElemType::I64, 0.5),
        Err(BuildError::BadInitializer { .. })
    ));
    let graph = g.finish(21, "p", "v")?.graph.unwrap_or_default();
    let raw: Vec<_> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.len(), t.raw_data.clone()))
        .collect();
    assert_eq!(
        raw,
        [
            ("/c/f32", 0, 0.5f32.to_le_bytes().to_vec()),
            ("/c/f16", 0, vec![0x00, 0x3c]),
            ("/c/bf16", 0, vec![0x00, 0xc0]),
            ("/c/i64", 0, (-3i64).to_le_bytes().to_vec()),
        ]
    );
    Ok(())
}

#[test]
fn large_initializers_go_external_at_aligned_offsets() -> Result<(), BuildError> {
    let sink = SharedSink::default();
    let mut g = GraphBuilder::with_external_data("test", "model.onnx.data", Box::new(sink.clone()));
    let small = f32_bytes(EXTERNAL_THRESHOLD / 4, 1.0); // exactly at the threshold: stays inline
    let big = f32_bytes(300, 2.0); // 1200 bytes
    let bigger = f32_bytes(1500, 3.0); // 6000 bytes
    g.initializer("small", ElemType::F32, &[small.len() / 4], &small)?;
    g.initializer("big", ElemType::F32, &[300], &big)?;
    g.initializer("bigger", ElemType::F32, &[30, 50], &bigger)?;
    assert_eq!(g.external_bytes(), 4096 + 6000);
    let graph = g.finish(21, "p", "v")?.graph.unwrap_or_default();

    let [small_t, big_t, bigger_t] = graph.initializer.as_slice() else {
        panic!("three initializers")
    };
    assert_eq!(small_t.data_location, DataLocation::Default as i32);
    assert_eq!(small_t.raw_data, small);
    for (t, offset, length) in [(big_t, "0", "1200"), (bigger_t, "4096", "6000")] {
        assert_eq!(t.data_location, DataLocation::External as i32, "{}", t.name);
        assert!(t.raw_data.is_empty());
        assert_eq!(external_entry(t, "location"), Some("model.onnx.data"));
        assert_eq!(external_entry(t, "offset"), Some(offset));
        assert_eq!(external_entry(t, "length"), Some(length));
    }
    let data = sink
        .0
        .lock()
        .map_err(|_| BuildError::DuplicateValue("poisoned".into()))?
        .clone();
    assert_eq!(data.len(), 4096 + 6000);
    assert_eq!(&data[..1200], big.as_slice());
    assert!(data[1200..4096].iter().all(|&b| b == 0));
    assert_eq!(&data[4096..], bigger.as_slice());
    Ok(())
}

#[test]
fn without_a_sink_everything_is_inline() -> Result<(), BuildError> {
    let mut g = GraphBuilder::new("test");
    let big = f32_bytes(1000, 1.0);
    g.initializer("big", ElemType::F32, &[1000], &big)?;
    assert_eq!(g.external_bytes(), 0);
    let graph = g.finish(21, "p", "v")?.graph.unwrap_or_default();
    assert_eq!(graph.initializer[0].raw_data, big);
    assert!(graph.initializer[0].external_data.is_empty());
    Ok(())
}

#[test]
fn elem_types_match_onnx_codes() {
    let codes: Vec<_> = [
        ElemType::F32,
        ElemType::F16,
        ElemType::BF16,
        ElemType::I64,
        ElemType::I32,
        ElemType::Bool,
    ]
    .map(ElemType::onnx)
    .into();
    assert_eq!(codes, [1, 10, 16, 7, 6, 9]);
    assert_eq!(ElemType::from(crate::config::DType::BF16), ElemType::BF16);
}
