//! Reading exported ONNX files: value types, external-data entries, and the structure of a graph
//! as text for snapshots.

use std::fmt::Write as _;
use std::path::Path;

use carrot_graphs::onnx::{
    AttributeProto, GraphProto, ModelProto, TensorProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType,
    tensor_shape_proto::dimension, type_proto,
};
use half::{bf16, f16};
use prost::Message;

/// Reads and decodes an ONNX file.
pub fn read_model(path: &Path) -> ModelProto {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ModelProto::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("{}: not an ONNX model: {e}", path.display()))
}

/// `FLOAT`, `FLOAT16`, … for an ONNX element type number.
pub fn data_type_name(data_type: i32) -> String {
    DataType::try_from(data_type).map_or_else(
        |_| format!("type{data_type}"),
        |t| t.as_str_name().to_string(),
    )
}

/// Element type and dims (`batch`, `16`, `?`) of a graph input or output.
pub fn value_type(info: &ValueInfoProto) -> (String, Vec<String>) {
    let Some(type_proto::Value::TensorType(t)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return ("?".into(), Vec::new());
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(v)) => v.to_string(),
                    Some(dimension::Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect()
        })
        .unwrap_or_default();
    (data_type_name(t.elem_type), dims)
}

/// The `location` / `offset` / `length` entries of an external initializer.
pub fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location == DataLocation::External as i32
}

fn small_values(t: &TensorProto) -> Option<String> {
    let numel: i64 = t.dims.iter().product();
    let raw = &t.raw_data;
    let ty = DataType::try_from(t.data_type).ok()?;
    let list = |items: Vec<String>| {
        if t.dims.is_empty() {
            items.join(", ")
        } else {
            format!("[{}]", items.join(", "))
        }
    };
    match ty {
        DataType::Int64 if numel <= 8 && raw.len() == numel as usize * 8 => Some(list(
            raw.chunks_exact(8)
                .map(|c| {
                    i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).to_string()
                })
                .collect(),
        )),
        DataType::Float if numel == 1 && raw.len() == 4 => Some(list(vec![format!(
            "{:?}",
            f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]])
        )])),
        DataType::Float16 if numel == 1 && raw.len() == 2 => Some(list(vec![format!(
            "{:?}",
            f16::from_le_bytes([raw[0], raw[1]])
        )])),
        DataType::Bfloat16 if numel == 1 && raw.len() == 2 => Some(list(vec![format!(
            "{:?}",
            bf16::from_le_bytes([raw[0], raw[1]])
        )])),
        _ => None,
    }
}

fn attribute_text(a: &AttributeProto) -> String {
    let value = match AttributeType::try_from(a.r#type).unwrap_or(AttributeType::Undefined) {
        AttributeType::Int if a.name == "to" => data_type_name(a.i as i32),
        AttributeType::Int => a.i.to_string(),
        AttributeType::Float => format!("{:?}", a.f),
        AttributeType::String => format!("{:?}", String::from_utf8_lossy(&a.s)),
        AttributeType::Ints => format!("{:?}", a.ints),
        AttributeType::Floats => format!("{:?}", a.floats),
        AttributeType::Tensor => a.t.as_ref().map_or("tensor(?)".into(), |t| {
            let values = small_values(t)
                .map(|v| format!(" = {v}"))
                .unwrap_or_default();
            format!(
                "tensor({} {:?}{values})",
                data_type_name(t.data_type),
                t.dims
            )
        }),
        other => format!("<{}>", other.as_str_name()),
    };
    format!("{}={value}", a.name)
}

fn value_info_line(kind: &str, info: &ValueInfoProto) -> String {
    let (ty, dims) = value_type(info);
    format!("{kind} {} {ty} [{}]", info.name, dims.join(", "))
}

/// The structure of a graph as text, one line per item and no weight values: header, inputs,
/// outputs, then `op_type name: inputs -> outputs {attrs}` per node in order, then
/// `initializer name dtype [dims] external|inline` (small integer and scalar constants show
/// their values).
pub fn graph_structure(model: &ModelProto) -> String {
    let mut s = String::new();
    let opsets: Vec<String> = model
        .opset_import
        .iter()
        .map(|o| {
            format!(
                "{}:{}",
                if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                },
                o.version
            )
        })
        .collect();
    let empty = GraphProto::default();
    let g = model.graph.as_ref().unwrap_or(&empty);
    let _ = writeln!(
        s,
        "graph {} ir_version {} opsets {} producer {}",
        g.name,
        model.ir_version,
        opsets.join(","),
        model.producer_name
    );
    for input in &g.input {
        let _ = writeln!(s, "{}", value_info_line("input", input));
    }
    for output in &g.output {
        let _ = writeln!(s, "{}", value_info_line("output", output));
    }
    for node in &g.node {
        let op = if node.domain.is_empty() {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        let attrs: Vec<String> = node.attribute.iter().map(attribute_text).collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{}}}", attrs.join(", "))
        };
        let _ = writeln!(
            s,
            "{op} {}: {} -> {}{attrs}",
            node.name,
            node.input.join(", "),
            node.output.join(", ")
        );
    }
    for t in &g.initializer {
        let place = if is_external(t) {
            "external".to_string()
        } else {
            "inline".to_string()
        };
        let values = if is_external(t) {
            None
        } else {
            small_values(t)
        };
        let values = values.map(|v| format!(" = {v}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "initializer {} {} {:?} {place}{values}",
            t.name,
            data_type_name(t.data_type),
            t.dims
        );
    }
    s
}
