//! A small graph made with `GraphBuilder`, written with external data, run in ONNX Runtime and
//! compared with the same computation done by hand; the file also passes the ONNX checker.
//!
//! ```text
//!  x [batch,4,6] ──MatMul(proj.weight [6,64])──Add(proj.bias [64])──Reshape [batch,4,8,8]
//!    ──Transpose(0,2,1,3) [batch,8,4,8]──Softmax(-1)──MatMul(out.weight [8,48]) [batch,8,4,48]
//!    ──Mul(2)──▶ y
//! ```
//! `proj.weight` and `out.weight` (1536 bytes each) go to `model.onnx.data`; the rest is inline.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use carrot_graphs::builder::{Dim, ElemType, GraphBuilder};
use carrot_tests::{assert_allclose, check_onnx, init_ort};
use ndarray::Array3;
use ort::session::Session;
use ort::value::TensorRef;
use prost::Message;

const BATCH: usize = 2;
const SEQ: usize = 4;
const IN: usize = 6;
const HEADS: usize = 8;
const HEAD_DIM: usize = 8;
const OUT: usize = 48;

/// Deterministic values in [-1, 1) (a fixed LCG; the numbers need no other provenance).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct Weights {
    proj_w: Vec<f32>, // [IN, HEADS * HEAD_DIM]
    proj_b: Vec<f32>, // [HEADS * HEAD_DIM]
    out_w: Vec<f32>,  // [HEAD_DIM, OUT]
}

fn weights() -> Weights {
    Weights {
        proj_w: values(1, IN * HEADS * HEAD_DIM),
        proj_b: values(2, HEADS * HEAD_DIM),
        out_w: values(3, HEAD_DIM * OUT),
    }
}

/// Builds the graph and writes `model.onnx` + `model.onnx.data` into `dir`.
fn write_model(dir: &Path, w: &Weights) -> Result<PathBuf> {
    let data = File::create(dir.join("model.onnx.data"))?;
    let mut g = GraphBuilder::with_external_data(
        "roundtrip",
        "model.onnx.data",
        Box::new(BufWriter::new(data)),
    );
    let batch = Dim::from("batch");
    let x = g.input("x", ElemType::F32, &[batch.clone(), SEQ.into(), IN.into()])?;
    let proj_w = g.initializer(
        "proj.weight",
        ElemType::F32,
        &[IN, HEADS * HEAD_DIM],
        &le_bytes(&w.proj_w),
    )?;
    let proj_b = g.initializer(
        "proj.bias",
        ElemType::F32,
        &[HEADS * HEAD_DIM],
        &le_bytes(&w.proj_b),
    )?;
    let out_w = g.initializer(
        "out.weight",
        ElemType::F32,
        &[HEAD_DIM, OUT],
        &le_bytes(&w.out_w),
    )?;

    g.push_scope("model");
    g.push_scope("proj");
    let h = g.matmul("MatMul", &x, &proj_w)?;
    let h = g.add("Add", &h, &proj_b)?;
    g.pop_scope();
    let shape = g.const_i64(
        "heads_shape",
        &[0, SEQ as i64, HEADS as i64, HEAD_DIM as i64],
    )?;
    let h = g.reshape("Reshape", &h, &shape)?;
    let h = g.transpose("Transpose", &h, &[0, 2, 1, 3])?;
    let p = g.softmax("Softmax", &h, -1)?;
    let o = g.matmul("out/MatMul", &p, &out_w)?;
    let two = g.const_scalar("two", ElemType::F32, 2.0)?;
    let y = g
        .op("Mul", "Mul", &[&o, &two])
        .output_names(&["y"])
        .build()?;
    g.pop_scope();
    g.output(
        &y,
        ElemType::F32,
        &[batch, HEADS.into(), SEQ.into(), OUT.into()],
    )?;

    let model = g.finish(21, "carrot-tests", env!("CARGO_PKG_VERSION"))?;
    let path = dir.join("model.onnx");
    std::fs::write(&path, model.encode_to_vec())?;
    Ok(path)
}

/// The same computation in plain Rust, [BATCH, HEADS, SEQ, OUT] flattened.
fn reference(x: &[f32], w: &Weights) -> Vec<f32> {
    let hidden = HEADS * HEAD_DIM;
    let mut y = vec![0.0f32; BATCH * HEADS * SEQ * OUT];
    for b in 0..BATCH {
        for s in 0..SEQ {
            let row = &x[(b * SEQ + s) * IN..][..IN];
            let proj: Vec<f32> = (0..hidden)
                .map(|j| {
                    w.proj_b[j]
                        + (0..IN)
                            .map(|k| row[k] * w.proj_w[k * hidden + j])
                            .sum::<f32>()
                })
                .collect();
            for head in 0..HEADS {
                let logits = &proj[head * HEAD_DIM..][..HEAD_DIM];
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                let dst = &mut y[((b * HEADS + head) * SEQ + s) * OUT..][..OUT];
                for (o, d) in dst.iter_mut().enumerate() {
                    let dot: f32 = (0..HEAD_DIM)
                        .map(|k| exps[k] / total * w.out_w[k * OUT + o])
                        .sum();
                    *d = 2.0 * dot;
                }
            }
        }
    }
    y
}

#[test]
fn builder_graph_runs_in_onnx_runtime() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let w = weights();
    let path = write_model(dir.path(), &w)?;
    let data_len = std::fs::metadata(dir.path().join("model.onnx.data"))?.len();
    assert_eq!(
        data_len,
        4096 + 1536,
        "proj.weight at 0, out.weight at the next 4096 boundary"
    );

    let x = Array3::from_shape_vec((BATCH, SEQ, IN), values(4, BATCH * SEQ * IN))?;
    let mut session = Session::builder(init_ort()?)?
        .commit_from_file(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let outputs = session.run(ort::inputs!["x" => TensorRef::from_array_view(&x)?])?;
    let y = outputs["y"].try_extract_array::<f32>()?;
    assert_eq!(y.shape(), [BATCH, HEADS, SEQ, OUT]);

    let actual: Vec<f32> = y.iter().copied().collect();
    let x_flat: Vec<f32> = x.iter().copied().collect();
    assert_allclose("y", &actual, &reference(&x_flat, &w), 1e-5, 1e-4);
    Ok(())
}

#[test]
fn builder_graph_passes_the_onnx_checker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write_model(dir.path(), &weights())?;
    check_onnx(&[&path]);
    Ok(())
}
