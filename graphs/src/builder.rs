//! A small fluent builder for ONNX graphs over the [`crate::onnx`] protobuf types.
//!
//! Node names follow onnxruntime-genai: the current scope, then the local name
//! (`/model/layers.3/attn/q_proj/MatMul`), and unnamed outputs are `<node>/output_<i>`. Names are
//! checked as the graph grows: a node name or a value name used twice is an error, never a silent
//! skip. Initializers larger than [`EXTERNAL_THRESHOLD`] go to the external-data sink when the
//! builder has one.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;

use crate::external::ExternalDataWriter;
use crate::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{self, dimension},
    type_proto,
};

/// Initializers with more raw bytes than this go to the external-data file (when there is one).
pub const EXTERNAL_THRESHOLD: usize = 1024;

/// The IR version every Carrot graph declares (ONNX Runtime 1.31 loads 10–13).
pub const IR_VERSION: i64 = 10;

/// Element type of a graph input, output or initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    I64,
    I32,
    Bool,
    /// Unsigned 8-bit integer (quantized weights and zero points).
    U8,
    /// Unsigned 4-bit integer, two per byte, first element in the low nibble.
    U4,
}

impl ElemType {
    /// The `TensorProto.DataType` code.
    pub fn onnx(self) -> i32 {
        let t = match self {
            ElemType::F32 => DataType::Float,
            ElemType::F16 => DataType::Float16,
            ElemType::BF16 => DataType::Bfloat16,
            ElemType::I64 => DataType::Int64,
            ElemType::I32 => DataType::Int32,
            ElemType::Bool => DataType::Bool,
            ElemType::U8 => DataType::Uint8,
            ElemType::U4 => DataType::Uint4,
        };
        t as i32
    }

    /// Size of one element in bits.
    pub fn bits(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 32,
            ElemType::F16 | ElemType::BF16 => 16,
            ElemType::I64 => 64,
            ElemType::Bool | ElemType::U8 => 8,
            ElemType::U4 => 4,
        }
    }

    /// Bytes taken by `numel` packed elements (4-bit types round up to a whole byte), or `None`
    /// on overflow.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        Some(numel.checked_mul(self.bits())?.div_ceil(8))
    }
}

impl From<crate::config::DType> for ElemType {
    fn from(d: crate::config::DType) -> Self {
        match d {
            crate::config::DType::F32 => ElemType::F32,
            crate::config::DType::F16 => ElemType::F16,
            crate::config::DType::BF16 => ElemType::BF16,
        }
    }
}

/// One dimension of a graph input or output: a fixed size or a symbolic name (`batch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

impl From<usize> for Dim {
    fn from(v: usize) -> Self {
        Dim::Fixed(v as i64)
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Named(v.to_owned())
    }
}

/// A value (tensor name) in the graph under construction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value(String);

impl Value {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The empty name, for an omitted optional input.
    pub fn none() -> Self {
        Value(String::new())
    }

    pub fn is_none(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(thiserror::Error, Debug)]
pub enum BuildError {
    #[error("node name {0:?} is used twice")]
    DuplicateNode(String),
    #[error("value name {0:?} is produced twice")]
    DuplicateValue(String),
    #[error("node {node:?} reads {value:?}, which no input, initializer or node produces")]
    UnknownValue { node: String, value: String },
    #[error("node {node:?} was given {given} output names but builds {expected} outputs")]
    OutputCount {
        node: String,
        expected: usize,
        given: usize,
    },
    #[error("writing external data for tensor {tensor:?}: {source}")]
    Io {
        tensor: String,
        source: std::io::Error,
    },
    #[error("flushing external data {location:?}: {source}")]
    Flush {
        location: String,
        source: std::io::Error,
    },
    #[error("initializer {name:?}: {reason}")]
    BadInitializer { name: String, reason: String },
}

struct External {
    location: String,
    writer: ExternalDataWriter<Box<dyn Write + Send>>,
}

/// Builds one [`GraphProto`] node by node; [`GraphBuilder::finish`] wraps it in a [`ModelProto`].
pub struct GraphBuilder {
    graph: GraphProto,
    scope: Vec<String>,
    nodes: HashSet<String>,
    values: HashSet<String>,
    domains: BTreeSet<String>,
    external: Option<External>,
}

impl GraphBuilder {
    /// A builder that keeps every initializer inside the model.
    pub fn new(graph_name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: graph_name.to_owned(),
                ..Default::default()
            },
            scope: Vec::new(),
            nodes: HashSet::new(),
            values: HashSet::new(),
            domains: BTreeSet::new(),
            external: None,
        }
    }

    /// A builder that streams initializers over [`EXTERNAL_THRESHOLD`] bytes into `sink`, which
    /// the model refers to as `location` (a plain file name next to the `.onnx` file).
    pub fn with_external_data(
        graph_name: &str,
        location: &str,
        sink: Box<dyn Write + Send>,
    ) -> Self {
        let writer = ExternalDataWriter::new(sink);
        GraphBuilder {
            external: Some(External {
                location: location.to_owned(),
                writer,
            }),
            ..Self::new(graph_name)
        }
    }

    /// Enter a scope; `s` may hold several `/`-separated parts and may start with `/`.
    pub fn push_scope(&mut self, s: &str) {
        self.scope.push(s.trim_matches('/').to_owned());
    }

    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    /// Runs `f` inside scope `s`, popping it again whether `f` succeeds or not.
    pub fn in_scope<T>(
        &mut self,
        s: &str,
        f: impl FnOnce(&mut Self) -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        self.push_scope(s);
        let r = f(self);
        self.pop_scope();
        r
    }

    /// `name` prefixed with the current scope: `/model/layers.3/attn` + `q_proj/MatMul`.
    pub fn scoped(&self, name: &str) -> String {
        let mut s = String::new();
        for part in &self.scope {
            s.push('/');
            s.push_str(part);
        }
        s.push('/');
        s.push_str(name);
        s
    }

    /// The value already in the graph under this exact name, if any.
    pub fn lookup(&self, name: &str) -> Option<Value> {
        self.values.contains(name).then(|| Value(name.to_owned()))
    }

    /// Bytes written to the external-data sink so far (0 without one).
    pub fn external_bytes(&self) -> u64 {
        self.external
            .as_ref()
            .map_or(0, |e| e.writer.bytes_written())
    }

    fn claim_value(&mut self, name: &str) -> Result<Value, BuildError> {
        if !self.values.insert(name.to_owned()) {
            return Err(BuildError::DuplicateValue(name.to_owned()));
        }
        Ok(Value(name.to_owned()))
    }

    pub fn input(&mut self, name: &str, ty: ElemType, dims: &[Dim]) -> Result<Value, BuildError> {
        let v = self.claim_value(name)?;
        self.graph.input.push(value_info(name, ty, dims));
        Ok(v)
    }

    /// Declares `v` as a graph output under its own name.
    pub fn output(&mut self, v: &Value, ty: ElemType, dims: &[Dim]) -> Result<(), BuildError> {
        if !self.values.contains(v.name()) {
            return Err(BuildError::UnknownValue {
                node: "<graph output>".into(),
                value: v.0.clone(),
            });
        }
        if self.graph.output.iter().any(|o| o.name == v.0) {
            return Err(BuildError::DuplicateValue(v.0.clone()));
        }
        self.graph.output.push(value_info(v.name(), ty, dims));
        Ok(())
    }

    /// Starts a node named `<scope>/<name>`; finish it with [`NodeBuilder::build`].
    pub fn op(&mut self, op_type: &str, name: &str, inputs: &[&Value]) -> NodeBuilder<'_> {
        let node = NodeProto {
            name: self.scoped(name),
            op_type: op_type.to_owned(),
            input: inputs.iter().map(|v| v.0.clone()).collect(),
            ..Default::default()
        };
        NodeBuilder {
            graph: self,
            node,
            output_names: None,
        }
    }

    fn add_node(
        &mut self,
        mut node: NodeProto,
        outputs: Vec<String>,
    ) -> Result<Vec<Value>, BuildError> {
        if self.nodes.contains(&node.name) {
            return Err(BuildError::DuplicateNode(node.name));
        }
        if let Some(missing) = node
            .input
            .iter()
            .find(|i| !i.is_empty() && !self.values.contains(*i))
        {
            return Err(BuildError::UnknownValue {
                node: node.name.clone(),
                value: missing.clone(),
            });
        }
        // An empty name leaves an optional output out, as ONNX allows.
        let mut fresh = HashSet::new();
        if let Some(dup) = outputs
            .iter()
            .filter(|o| !o.is_empty())
            .find(|o| self.values.contains(*o) || !fresh.insert(*o))
        {
            return Err(BuildError::DuplicateValue(dup.clone()));
        }
        self.nodes.insert(node.name.clone());
        self.values
            .extend(outputs.iter().filter(|o| !o.is_empty()).cloned());
        if !node.domain.is_empty() {
            self.domains.insert(node.domain.clone());
        }
        let values = outputs.iter().map(|o| Value(o.clone())).collect();
        node.output = outputs;
        self.graph.node.push(node);
        Ok(values)
    }

    /// Adds an initializer under `name` verbatim (weights keep their checkpoint names).
    pub fn initializer(
        &mut self,
        name: &str,
        ty: ElemType,
        dims: &[usize],
        raw_le_bytes: &[u8],
    ) -> Result<Value, BuildError> {
        let bad = |reason: String| BuildError::BadInitializer {
            name: name.to_owned(),
            reason,
        };
        let expected = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|numel| ty.bytes_for(numel))
            .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        if expected != raw_le_bytes.len() {
            return Err(bad(format!(
                "shape {dims:?} of {ty:?} needs {expected} bytes, got {}",
                raw_le_bytes.len()
            )));
        }
        if self.values.contains(name) {
            return Err(BuildError::DuplicateValue(name.to_owned()));
        }
        let mut t = TensorProto {
            name: name.to_owned(),
            data_type: ty.onnx(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        match &mut self.external {
            Some(ext) if raw_le_bytes.len() > EXTERNAL_THRESHOLD => {
                let (offset, length) =
                    ext.writer
                        .write_tensor(raw_le_bytes)
                        .map_err(|source| BuildError::Io {
                            tensor: name.to_owned(),
                            source,
                        })?;
                t.data_location = DataLocation::External as i32;
                t.external_data = [
                    ("location", ext.location.clone()),
                    ("offset", offset.to_string()),
                    ("length", length.to_string()),
                ]
                .into_iter()
                .map(|(key, value)| StringStringEntryProto {
                    key: key.to_owned(),
                    value,
                })
                .collect();
            }
            _ => t.raw_data = raw_le_bytes.to_vec(),
        }
        self.graph.initializer.push(t);
        self.claim_value(name)
    }

    /// A 1-D int64 constant named `<scope>/<name>`.
    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> Result<Value, BuildError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(&self.scoped(name), ElemType::I64, &[values.len()], &bytes)
    }

    /// A 0-D constant named `<scope>/<name>`, `value` converted to `ty`.
    pub fn const_scalar(
        &mut self,
        name: &str,
        ty: ElemType,
        value: f64,
    ) -> Result<Value, BuildError> {
        let full = self.scoped(name);
        let integral = |lo: f64, hi: f64| {
            if value.fract() == 0.0 && (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(BuildError::BadInitializer {
                    name: full.clone(),
                    reason: format!("{value} is not a {ty:?} value"),
                })
            }
        };
        let bytes = match ty {
            ElemType::F32 => (value as f32).to_le_bytes().to_vec(),
            ElemType::F16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
            ElemType::BF16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
            ElemType::I64 => {
                integral(i64::MIN as f64, i64::MAX as f64)?;
                (value as i64).to_le_bytes().to_vec()
            }
            ElemType::I32 => {
                integral(f64::from(i32::MIN), f64::from(i32::MAX))?;
                (value as i32).to_le_bytes().to_vec()
            }
            ElemType::Bool => vec![u8::from(value != 0.0)],
            ElemType::U8 => {
                integral(0.0, 255.0)?;
                vec![value as u8]
            }
            ElemType::U4 => {
                integral(0.0, 15.0)?;
                vec![value as u8]
            }
        };
        self.initializer(&full, ty, &[], &bytes)
    }

    /// Wraps the graph in a model (IR version [`IR_VERSION`]) and flushes the external-data sink.
    pub fn finish(
        self,
        opset: i64,
        producer_name: &str,
        producer_version: &str,
    ) -> Result<ModelProto, BuildError> {
        if let Some(ext) = self.external {
            let location = ext.location;
            ext.writer
                .into_inner()
                .map_err(|source| BuildError::Flush { location, source })?;
        }
        let mut opset_import = vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }];
        opset_import.extend(
            self.domains
                .into_iter()
                .map(|domain| OperatorSetIdProto { domain, version: 1 }),
        );
        Ok(ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: producer_name.to_owned(),
            producer_version: producer_version.to_owned(),
            graph: Some(self.graph),
            ..Default::default()
        })
    }
}

fn value_info(name: &str, ty: ElemType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n),
                Dim::Named(s) => dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: ty.onnx(),
        shape: Some(TensorShapeProto { dim }),
    };
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node being configured; nothing enters the graph until [`build`](Self::build).
pub struct NodeBuilder<'a> {
    graph: &'a mut GraphBuilder,
    node: NodeProto,
    output_names: Option<Vec<String>>,
}

impl NodeBuilder<'_> {
    fn attr(
        mut self,
        name: &str,
        r#type: AttributeType,
        fill: impl FnOnce(&mut AttributeProto),
    ) -> Self {
        let mut a = AttributeProto {
            name: name.to_owned(),
            r#type: r#type as i32,
            ..Default::default()
        };
        fill(&mut a);
        self.node.attribute.push(a);
        self
    }

    pub fn attr_int(self, k: &str, v: i64) -> Self {
        self.attr(k, AttributeType::Int, |a| a.i = v)
    }

    pub fn attr_ints(self, k: &str, v: &[i64]) -> Self {
        self.attr(k, AttributeType::Ints, |a| a.ints = v.to_vec())
    }

    pub fn attr_float(self, k: &str, v: f32) -> Self {
        self.attr(k, AttributeType::Float, |a| a.f = v)
    }

    pub fn attr_floats(self, k: &str, v: &[f32]) -> Self {
        self.attr(k, AttributeType::Floats, |a| a.floats = v.to_vec())
    }

    pub fn attr_string(self, k: &str, v: &str) -> Self {
        self.attr(k, AttributeType::String, |a| a.s = v.as_bytes().to_vec())
    }

    pub fn attr_tensor(self, k: &str, v: TensorProto) -> Self {
        self.attr(k, AttributeType::Tensor, |a| a.t = Some(v))
    }

    /// Operator domain, e.g. `com.microsoft`; the model then imports that domain.
    pub fn domain(mut self, d: &str) -> Self {
        self.node.domain = d.to_owned();
        self
    }

    /// Explicit output names (`logits`, `present.0.key`) instead of `<node>/output_<i>`.
    pub fn output_names(mut self, names: &[&str]) -> Self {
        self.output_names = Some(names.iter().map(|&n| n.to_owned()).collect());
        self
    }

    /// Adds the node with exactly one output.
    pub fn build(self) -> Result<Value, BuildError> {
        let mut outputs = self.build_n(1)?;
        Ok(outputs.remove(0))
    }

    /// Adds the node with `n` outputs.
    pub fn build_n(self, n: usize) -> Result<Vec<Value>, BuildError> {
        let NodeBuilder {
            graph,
            node,
            output_names,
        } = self;
        let outputs = match output_names {
            Some(names) if names.len() != n => {
                return Err(BuildError::OutputCount {
                    node: node.name,
                    expected: n,
                    given: names.len(),
                });
            }
            Some(names) => names,
            None => (0..n)
                .map(|i| format!("{}/output_{i}", node.name))
                .collect(),
        };
        graph.add_node(node, outputs)
    }
}

mod ops;

#[cfg(test)]
mod tests;
