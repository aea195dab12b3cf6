//! Weight bytes a decoder graph reads for one token, from its initializers.
//!
//! Every initializer is read whole once per step, except a table that only feeds the data input
//! of `Gather` (a token embedding), of which one row is read.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use carrot_graphs::onnx::{ModelProto, TensorProto, tensor_proto::DataType};
use prost::Message;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphWeights {
    /// Bytes of all initializers.
    pub total_bytes: u64,
    /// Bytes read per token: everything but gathered tables, plus one row of each.
    pub per_token_bytes: u64,
    /// Output projection (`lm_head`, or the tied embedding used as one).
    pub lm_head_bytes: u64,
    /// Tables read by `Gather` (token embeddings) held in this graph.
    pub gathered_bytes: u64,
}

pub fn measure(path: &Path) -> anyhow::Result<GraphWeights> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let model = ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("parsing {}", path.display()))?;
    let graph = model
        .graph
        .with_context(|| format!("{} has no graph", path.display()))?;
    let mut gather_data: HashSet<&str> = HashSet::new();
    let mut other_uses: HashSet<&str> = HashSet::new();
    for node in &graph.node {
        for (i, input) in node.input.iter().enumerate() {
            if node.op_type == "Gather" && i == 0 {
                gather_data.insert(input);
            } else {
                other_uses.insert(input);
            }
        }
    }
    let mut w = GraphWeights {
        total_bytes: 0,
        per_token_bytes: 0,
        lm_head_bytes: 0,
        gathered_bytes: 0,
    };
    for t in &graph.initializer {
        let size = tensor_bytes(t)
            .with_context(|| format!("{}: initializer {}", path.display(), t.name))?;
        w.total_bytes += size;
        let gathered_only =
            gather_data.contains(t.name.as_str()) && !other_uses.contains(t.name.as_str());
        if gathered_only {
            w.gathered_bytes += size;
            let rows = t
                .dims
                .first()
                .copied()
                .and_then(|d| u64::try_from(d).ok())
                .filter(|&d| d > 0)
                .unwrap_or(1);
            w.per_token_bytes += size / rows;
        } else {
            w.per_token_bytes += size;
        }
        if !gathered_only && (t.name.contains("lm_head") || t.name.contains("embed_tokens")) {
            w.lm_head_bytes += size;
        }
    }
    Ok(w)
}

fn tensor_bytes(t: &TensorProto) -> anyhow::Result<u64> {
    let elements = t
        .dims
        .iter()
        .try_fold(1u64, |n, &d| u64::try_from(d).ok().map(|d| n * d));
    let elements = elements.context("negative dimension")?;
    let bits: u64 = match DataType::try_from(t.data_type).context("unknown data type")? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 32,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 16,
        DataType::Double | DataType::Int64 | DataType::Uint64 | DataType::Complex64 => 64,
        DataType::Uint8 | DataType::Int8 | DataType::Bool => 8,
        DataType::Int4 | DataType::Uint4 => 4,
        other => anyhow::bail!("unsupported data type {other:?}"),
    };
    Ok((elements * bits).div_ceil(8))
}
