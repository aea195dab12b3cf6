//! Building blocks shared by the model graphs: linear layers, norms, activations, attention.
//!
//! Each helper mirrors one PyTorch module or function and names its nodes after it, under the
//! builder's current scope (`/model/layers.3/attn/q_proj/MatMul`).

use crate::builder::{BuildError, ElemType, GraphBuilder, Value};
use crate::config::{DType, Flavor};
use crate::quant::{BlockQuantized, PackedLayout, QuantSpec};
use crate::weights::{Tensor, WeightError, WeightSource};

/// Anything that can stop a graph from being built.
#[derive(thiserror::Error, Debug)]
pub enum GraphError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("tensor {name}: expected shape {expected:?}, found {actual:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, GraphError>;

/// Matrices with more elements than this (the 128k-row embedding table and lm_head of Llama 3)
/// are read, converted and quantized a block of rows at a time, so none is ever whole in
/// float32; smaller ones are read whole.
pub const STREAM_ELEMENTS: usize = 1 << 25;

/// Rows per block when streaming a matrix with `cols` columns: at most 16 MiB of float32 (fewer
/// elements when `stream_elements` is smaller), an even number of rows (4-bit codes of
/// consecutive blocks then pack exactly as the whole matrix's would).
fn stream_rows(cols: usize, stream_elements: usize) -> usize {
    (stream_elements.min(4 << 20) / cols.max(1)).max(2) & !1
}

/// What every model graph is built with: the builder, the weights, the weight dtype and, for a
/// weight-only quantized graph, how its matrices are quantized.
pub struct Ctx<'a> {
    pub b: &'a mut GraphBuilder,
    pub weights: &'a mut dyn WeightSource,
    pub dtype: DType,
    /// `Some` quantizes the weights of [`linear`] and [`matmul_weight`] (and the embedding
    /// table); activations stay in `dtype`.
    pub quant: Option<QuantSpec>,
    pub flavor: Flavor,
    /// Matrices with more elements are read a block of rows at a time ([`STREAM_ELEMENTS`]
    /// unless a test wants small blocks).
    pub stream_elements: usize,
}

impl Ctx<'_> {
    /// The element type of activations and weights in this graph.
    pub fn elem(&self) -> ElemType {
        ElemType::from(self.dtype)
    }

    /// Quantized weights dequantize to float32 (`DequantizeLinear` with float32 scales,
    /// `MatMulNBits` on float32 inputs): a quantized graph must have float32 activations.
    pub fn check_quantized_activations(&self) -> Result<()> {
        if self.quant.is_some() && self.dtype != DType::F32 {
            return Err(GraphError::Config(format!(
                "quantized weights need float32 activations, not {}",
                self.dtype.manifest_name()
            )));
        }
        Ok(())
    }

    /// Fetch `name` from the weight source and check its shape.
    pub fn fetch(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self.weights.tensor(name)?;
        if t.shape != expected {
            return Err(GraphError::Shape {
                name: name.into(),
                expected: expected.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }

    /// Store a tensor as an initializer in `dtype`.
    pub fn store(&mut self, name: &str, t: &Tensor, dtype: DType) -> Result<Value> {
        Ok(self
            .b
            .initializer(name, ElemType::from(dtype), &t.shape, &t.to_bytes(dtype))?)
    }

    /// Check the shape of `name` in the weight source without converting it.
    pub fn check_shape(&mut self, name: &str, expected: &[usize]) -> Result<()> {
        let actual = self.weights.shape(name)?;
        if actual != expected {
            return Err(GraphError::Shape {
                name: name.into(),
                expected: expected.to_vec(),
                actual,
            });
        }
        Ok(())
    }

    /// Calls `f(first_row, block)` for consecutive blocks of rows of the `[rows, cols]` weight
    /// `name`, so that only one block is in float32 at a time.
    pub fn for_row_blocks(
        &mut self,
        name: &str,
        (rows, cols): (usize, usize),
        mut f: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let step = stream_rows(cols, self.stream_elements);
        for r0 in (0..rows).step_by(step) {
            let block = self.weights.rows(name, r0..(r0 + step).min(rows))?;
            f(r0, &block)?;
        }
        Ok(())
    }

    /// A large `[rows, cols]` weight from the source, as bytes of `dtype` (transposed to
    /// `[cols, rows]` when asked), converted a block of rows at a time.
    pub fn streamed_bytes(
        &mut self,
        name: &str,
        (rows, cols): (usize, usize),
        dtype: DType,
        transpose: bool,
    ) -> Result<Vec<u8>> {
        let size = dtype.size();
        let mut out = crate::weights::large_vec::<u8>(rows * cols * size);
        self.for_row_blocks(name, (rows, cols), |r0, block| {
            if transpose {
                block.scatter_transposed(&mut out, r0, rows, dtype);
            } else {
                let at = r0 * cols * size;
                block.write_bytes(&mut out[at..at + block.len() * size], dtype);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// `name` `[rows, cols]` quantized along `cols`: read whole when small, else a block of rows
    /// at a time (rows are quantized independently, so the result is the same).
    pub fn quantized(
        &mut self,
        name: &str,
        (rows, cols): (usize, usize),
        spec: QuantSpec,
    ) -> Result<BlockQuantized> {
        if rows * cols <= self.stream_elements {
            let t = self.fetch(name, &[rows, cols])?;
            return Ok(BlockQuantized::quantize(&t.data, rows, cols, spec));
        }
        self.check_shape(name, &[rows, cols])?;
        let blocks = cols.div_ceil(spec.block_size);
        let mut q = BlockQuantized {
            rows,
            cols,
            spec,
            codes: Vec::with_capacity(rows * cols),
            scales: Vec::with_capacity(rows * blocks),
            zero_points: Vec::with_capacity(rows * blocks),
        };
        self.for_row_blocks(name, (rows, cols), |_, block| {
            let part = BlockQuantized::quantize(&block.data, block.shape[0], cols, spec);
            q.codes.extend_from_slice(&part.codes);
            q.scales.extend_from_slice(&part.scales);
            q.zero_points.extend_from_slice(&part.zero_points);
            Ok(())
        })?;
        Ok(q)
    }

    /// `name` `[rows, cols]` quantized along `cols` and laid out by `layout`, which must lay
    /// out each row on its own (then a block of rows at a time gives the same bytes as the
    /// whole matrix, and large matrices never sit in memory unpacked).
    pub fn quantized_layout(
        &mut self,
        name: &str,
        (rows, cols): (usize, usize),
        spec: QuantSpec,
        layout: impl Fn(&BlockQuantized) -> PackedLayout,
    ) -> Result<PackedLayout> {
        if rows * cols <= self.stream_elements {
            return Ok(layout(&self.quantized(name, (rows, cols), spec)?));
        }
        self.check_shape(name, &[rows, cols])?;
        let mut out = PackedLayout {
            codes: Vec::new(),
            scales: Vec::new(),
            zero_points: Vec::new(),
        };
        self.for_row_blocks(name, (rows, cols), |_, block| {
            let q = BlockQuantized::quantize(&block.data, block.shape[0], cols, spec);
            let part = layout(&q);
            out.codes.extend_from_slice(&part.codes);
            out.scales.extend_from_slice(&part.scales);
            out.zero_points.extend_from_slice(&part.zero_points);
            Ok(())
        })?;
        Ok(out)
    }

    /// Store the transpose of a 2-D tensor as an initializer in `dtype`.
    pub fn store_transposed(&mut self, name: &str, t: &Tensor, dtype: DType) -> Result<Value> {
        let shape: Vec<usize> = t.shape.iter().rev().copied().collect();
        Ok(self.b.initializer(
            name,
            ElemType::from(dtype),
            &shape,
            &t.transposed_bytes(dtype),
        )?)
    }

    /// Fetch a weight, check its shape and store it in the graph's dtype under its own name.
    pub fn param(&mut self, name: &str, expected: &[usize]) -> Result<Value> {
        let t = self.fetch(name, expected)?;
        self.store(name, &t, self.dtype)
    }

    /// Like [`Ctx::param`] but always stored as float32 (norm parameters applied in fp32).
    pub fn param_f32(&mut self, name: &str, expected: &[usize]) -> Result<Value> {
        let t = self.fetch(name, expected)?;
        self.store(name, &t, DType::F32)
    }

    /// A scalar constant in the activation dtype.
    pub fn scalar(&mut self, name: &str, value: f64) -> Result<Value> {
        let elem = self.elem();
        Ok(self.b.const_scalar(name, elem, value)?)
    }

    /// Cast to float32 unless already float32.
    pub fn to_f32(&mut self, name: &str, x: &Value) -> Result<Value> {
        if self.dtype == DType::F32 {
            Ok(x.clone())
        } else {
            Ok(self.b.cast(name, x, ElemType::F32)?)
        }
    }

    /// Cast from float32 back to the activation dtype unless it is float32.
    pub fn from_f32(&mut self, name: &str, x: &Value) -> Result<Value> {
        if self.dtype == DType::F32 {
            Ok(x.clone())
        } else {
            let elem = self.elem();
            Ok(self.b.cast(name, x, elem)?)
        }
    }
}

/// `nn.Linear(in_features, out_features)` with weights under `key` (`key.weight`, `key.bias`).
///
/// ```text
///   x ──MatMul(key.weight)──[Add(key.bias)]──▶ y
/// ```
pub fn linear(
    ctx: &mut Ctx<'_>,
    scope: &str,
    key: &str,
    x: &Value,
    in_f: usize,
    out_f: usize,
    bias: bool,
) -> Result<Value> {
    let name = format!("{key}.weight");
    let y = matmul_weight(ctx, scope, &name, Matrix::Source(&name, [out_f, in_f]), x)?;
    if !bias {
        return Ok(y);
    }
    let bv = ctx.param(&format!("{key}.bias"), &[out_f])?;
    ctx.b.push_scope(scope);
    let r = ctx.b.add("Add", &y, &bv);
    ctx.b.pop_scope();
    Ok(r?)
}

/// Several bias-free linears on the same input as one matrix: their weights (`KEY.weight`,
/// `[out_i, in]` each) stacked by rows under `name`, so one kernel computes
/// `[x @ w_0ᵀ | x @ w_1ᵀ | …]` along the last axis.
pub fn packed_linear(
    ctx: &mut Ctx<'_>,
    scope: &str,
    parts: &[(&str, usize)],
    name: &str,
    x: &Value,
    in_f: usize,
) -> Result<Value> {
    let rows: usize = parts.iter().map(|(_, out)| out).sum();
    let mut data = Vec::with_capacity(rows * in_f);
    for (key, out_f) in parts {
        let w = ctx.fetch(&format!("{key}.weight"), &[*out_f, in_f])?;
        data.extend_from_slice(&w.data);
    }
    let w = Tensor::new(vec![rows, in_f], data);
    matmul_weight(ctx, scope, name, Matrix::Loaded(&w), x)
}

/// `x @ wᵀ` for a checkpoint matrix `w [out, in]` named `name`, under `scope`.
///
/// Float graphs keep the weight transposed as `name.T` `[in, out]` for `MatMul`. Quantized graphs
/// store it blocked along `in` as `name.T.codes` (`[in, out]`, uint4/uint8), `name.T.scales` and
/// `name.T.zero_points` (`[in / block, out]`), dequantized in front of the `MatMul` — the
/// pattern ONNX Runtime fuses into one `MatMulNBits` kernel and TensorRT runs as weight-only
/// quantization:
/// ```text
///   name.T.codes ───────┐
///   name.T.scales ──────DequantizeLinear(axis 0, block_size)──┐
///   name.T.zero_points ─┘                                     │
///   x ────────────────────────────────────────────────────────MatMul──▶ y
/// ```
/// The `ort` flavor emits that kernel itself, on the checkpoint's `[out, in]` layout:
/// ```text
///   x ─MatMulNBits(name.codes [out, blocks, block·bits/8], name.scales, name.zero_points)─▶ y
/// ```
pub fn matmul_weight(
    ctx: &mut Ctx<'_>,
    scope: &str,
    name: &str,
    w: Matrix<'_>,
    x: &Value,
) -> Result<Value> {
    let (out_f, in_f) = w.dims(name)?;
    ctx.check_quantized_activations()?;
    if let (Some(spec), Flavor::Ort) = (ctx.quant, ctx.flavor) {
        let l = match w {
            Matrix::Loaded(t) => {
                BlockQuantized::quantize(&t.data, out_f, in_f, spec).matmul_nbits()
            }
            Matrix::Source(key, _) => {
                ctx.quantized_layout(key, (out_f, in_f), spec, BlockQuantized::matmul_nbits)?
            }
        };
        return matmul_nbits(ctx, scope, name, l, x, spec, (out_f, in_f));
    }
    let weight = match ctx.quant {
        None => {
            let dtype = ctx.dtype;
            match w {
                Matrix::Source(key, shape) if out_f * in_f > ctx.stream_elements => {
                    ctx.check_shape(key, &shape)?;
                    let bytes = ctx.streamed_bytes(key, (out_f, in_f), dtype, true)?;
                    ctx.b.initializer(
                        &format!("{name}.T"),
                        ElemType::from(dtype),
                        &[in_f, out_f],
                        &bytes,
                    )?
                }
                Matrix::Source(key, shape) => {
                    let t = ctx.fetch(key, &shape)?;
                    ctx.store_transposed(&format!("{name}.T"), &t, dtype)?
                }
                Matrix::Loaded(t) => ctx.store_transposed(&format!("{name}.T"), t, dtype)?,
            }
        }
        Some(spec) => {
            let q = w.quantized(ctx, spec)?;
            let t = q.transposed();
            let elem = spec.bits.elem();
            let blocks = q.blocks();
            drop(q);
            let codes =
                ctx.b
                    .initializer(&format!("{name}.T.codes"), elem, &[in_f, out_f], &t.codes)?;
            let scales = ctx.b.initializer(
                &format!("{name}.T.scales"),
                ElemType::F32,
                &[blocks, out_f],
                bytemuck::cast_slice(&t.scales),
            )?;
            let zero_points = ctx.b.initializer(
                &format!("{name}.T.zero_points"),
                elem,
                &[blocks, out_f],
                &t.zero_points,
            )?;
            ctx.b.push_scope(scope);
            let r = ctx
                .b
                .op(
                    "DequantizeLinear",
                    "DequantizeLinear",
                    &[&codes, &scales, &zero_points],
                )
                .attr_int("axis", 0)
                .attr_int("block_size", spec.block_size as i64)
                .build();
            ctx.b.pop_scope();
            r?
        }
    };
    ctx.b.push_scope(scope);
    let y = ctx.b.matmul("MatMul", x, &weight);
    ctx.b.pop_scope();
    Ok(y?)
}

/// The checkpoint matrix `[out, in]` of [`matmul_weight`].
#[derive(Debug, Clone, Copy)]
pub enum Matrix<'a> {
    /// Already in memory (e.g. several matrices packed into one).
    Loaded(&'a Tensor),
    /// Still in the weight source under this name, with this shape: read whole, or a block of
    /// rows at a time when larger than [`STREAM_ELEMENTS`].
    Source(&'a str, [usize; 2]),
}

impl Matrix<'_> {
    fn dims(&self, name: &str) -> Result<(usize, usize)> {
        match self {
            Matrix::Loaded(t) => match t.shape.as_slice() {
                [o, i] => Ok((*o, *i)),
                _ => Err(GraphError::Shape {
                    name: name.into(),
                    expected: vec![0, 0],
                    actual: t.shape.clone(),
                }),
            },
            Matrix::Source(_, [o, i]) => Ok((*o, *i)),
        }
    }

    fn quantized(&self, ctx: &mut Ctx<'_>, spec: QuantSpec) -> Result<BlockQuantized> {
        match *self {
            Matrix::Loaded(t) => {
                let (o, i) = self.dims("")?;
                Ok(BlockQuantized::quantize(&t.data, o, i, spec))
            }
            Matrix::Source(key, [o, i]) => ctx.quantized(key, (o, i), spec),
        }
    }
}

/// ONNX Runtime's `MatMulNBits` on a quantized `w [out, in]` (the `ort` flavor).
fn matmul_nbits(
    ctx: &mut Ctx<'_>,
    scope: &str,
    name: &str,
    l: PackedLayout,
    x: &Value,
    spec: QuantSpec,
    (out_f, in_f): (usize, usize),
) -> Result<Value> {
    let blocks = in_f.div_ceil(spec.block_size);
    let blob = spec.block_size * spec.bits.width() / 8;
    let codes = ctx.b.initializer(
        &format!("{name}.codes"),
        ElemType::U8,
        &[out_f, blocks, blob],
        &l.codes,
    )?;
    let scales = ctx.b.initializer(
        &format!("{name}.scales"),
        ElemType::F32,
        &[out_f * blocks],
        bytemuck::cast_slice(&l.scales),
    )?;
    let zero_points = ctx.b.initializer(
        &format!("{name}.zero_points"),
        ElemType::U8,
        &[l.zero_points.len()],
        &l.zero_points,
    )?;
    ctx.b.push_scope(scope);
    let y = ctx
        .b
        .op(
            "MatMulNBits",
            "MatMulNBits",
            &[x, &codes, &scales, &zero_points],
        )
        .domain("com.microsoft")
        .attr_int("K", in_f as i64)
        .attr_int("N", out_f as i64)
        .attr_int("bits", spec.bits.width() as i64)
        .attr_int("block_size", spec.block_size as i64)
        .attr_int("accuracy_level", MATMUL_NBITS_ACCURACY_LEVEL)
        .build();
    ctx.b.pop_scope();
    Ok(y?)
}

/// `MatMulNBits` computes with int8-quantized activations (level 4), as ONNX Runtime does when it
/// fuses the portable flavor's `DequantizeLinear → MatMul` on the CPU.
pub const MATMUL_NBITS_ACCURACY_LEVEL: i64 = 4;

/// `LlamaRMSNorm`: computed in float32, cast back, then multiplied by the weight.
///
/// Emitted as the node pattern ONNX Runtime fuses into one `SimplifiedLayerNormalization` kernel
/// (`Pow → ReduceMean → Add → Sqrt → Div → Mul`), so it costs one kernel instead of six.
///
/// ```text
///   x ─Cast(f32)─┬─Pow(2)─ReduceMean(-1)─Add(eps)─Sqrt─┐
///                └───────────────────────────────────Div─Cast(dtype)─Mul(weight)─▶ y
/// ```
pub fn rms_norm(
    ctx: &mut Ctx<'_>,
    scope: &str,
    key: &str,
    x: &Value,
    dim: usize,
    eps: f64,
) -> Result<Value> {
    let weight = ctx.param(&format!("{key}.weight"), &[dim])?;
    ctx.b.push_scope(scope);
    let result = (|| {
        let x32 = ctx.to_f32("Cast", x)?;
        let two = ctx.b.const_scalar("two", ElemType::F32, 2.0)?;
        let sq = ctx.b.pow("Pow", &x32, &two)?;
        let axes = ctx.b.const_i64("axes", &[-1])?;
        let var = ctx.b.reduce_mean("ReduceMean", &sq, &axes, true)?;
        let eps = ctx.b.const_scalar("eps", ElemType::F32, eps)?;
        let var = ctx.b.add("Add", &var, &eps)?;
        let std = ctx.b.sqrt("Sqrt", &var)?;
        let normed = ctx.b.div("Div", &x32, &std)?;
        let normed = ctx.from_f32("Cast_1", &normed)?;
        Ok(ctx.b.mul("Mul", &weight, &normed)?)
    })();
    ctx.b.pop_scope();
    result
}

/// `nn.LayerNorm(dim, eps)` over the last axis, computed in float32.
pub fn layer_norm(
    ctx: &mut Ctx<'_>,
    scope: &str,
    key: &str,
    x: &Value,
    dim: usize,
    eps: f64,
) -> Result<Value> {
    let weight = ctx.param_f32(&format!("{key}.weight"), &[dim])?;
    let bias = ctx.param_f32(&format!("{key}.bias"), &[dim])?;
    ctx.b.push_scope(scope);
    let result = (|| {
        let x32 = ctx.to_f32("Cast", x)?;
        let y = ctx
            .b
            .layer_norm("LayerNormalization", &x32, &weight, &bias, -1, eps)?;
        ctx.from_f32("Cast_1", &y)
    })();
    ctx.b.pop_scope();
    result
}

/// A float32 scalar constant.
fn scalar_f32(ctx: &mut Ctx<'_>, name: &str, value: f64) -> Result<Value> {
    Ok(ctx.b.const_scalar(name, ElemType::F32, value)?)
}

/// Run an elementwise activation in float32 (PyTorch computes half-precision activations in
/// float32 internally), casting around it in fp16/bf16 graphs.
fn activation_f32(
    ctx: &mut Ctx<'_>,
    scope: &str,
    x: &Value,
    body: impl FnOnce(&mut Ctx<'_>, &Value) -> Result<Value>,
) -> Result<Value> {
    ctx.b.push_scope(scope);
    let result = (|| {
        let x32 = ctx.to_f32("Cast", x)?;
        let y = body(ctx, &x32)?;
        ctx.from_f32("Cast_1", &y)
    })();
    ctx.b.pop_scope();
    result
}

/// Exact GELU: `0.5 · x · (1 + erf(x / √2))` (PyTorch `nn.GELU()`).
pub fn gelu_erf(ctx: &mut Ctx<'_>, scope: &str, x: &Value) -> Result<Value> {
    activation_f32(ctx, scope, x, |ctx, x| {
        let inv_sqrt2 = scalar_f32(ctx, "inv_sqrt2", std::f64::consts::FRAC_1_SQRT_2)?;
        let half = scalar_f32(ctx, "half", 0.5)?;
        let one = scalar_f32(ctx, "one", 1.0)?;
        let t = ctx.b.mul("Mul", x, &inv_sqrt2)?;
        let e = ctx.b.erf("Erf", &t)?;
        let e1 = ctx.b.add("Add", &e, &one)?;
        let hx = ctx.b.mul("Mul_1", x, &half)?;
        Ok(ctx.b.mul("Mul_2", &hx, &e1)?)
    })
}

/// Tanh-approximate GELU: `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (`gelu_pytorch_tanh`).
pub fn gelu_tanh(ctx: &mut Ctx<'_>, scope: &str, x: &Value) -> Result<Value> {
    activation_f32(ctx, scope, x, |ctx, x| {
        let c = scalar_f32(ctx, "sqrt_2_over_pi", (2.0 / std::f64::consts::PI).sqrt())?;
        let k = scalar_f32(ctx, "coeff", 0.044715)?;
        let half = scalar_f32(ctx, "half", 0.5)?;
        let one = scalar_f32(ctx, "one", 1.0)?;
        let x2 = ctx.b.mul("Mul", x, x)?;
        let x3 = ctx.b.mul("Mul_1", &x2, x)?;
        let kx3 = ctx.b.mul("Mul_2", &x3, &k)?;
        let inner = ctx.b.add("Add", x, &kx3)?;
        let inner = ctx.b.mul("Mul_3", &inner, &c)?;
        let t = ctx.b.tanh("Tanh", &inner)?;
        let t1 = ctx.b.add("Add_1", &t, &one)?;
        let hx = ctx.b.mul("Mul_4", x, &half)?;
        Ok(ctx.b.mul("Mul_5", &hx, &t1)?)
    })
}

/// `x · sigmoid(1.702 x)` (`quick_gelu`).
pub fn quick_gelu(ctx: &mut Ctx<'_>, scope: &str, x: &Value) -> Result<Value> {
    activation_f32(ctx, scope, x, |ctx, x| {
        let k = scalar_f32(ctx, "coeff", 1.702)?;
        let kx = ctx.b.mul("Mul", x, &k)?;
        let s = ctx.b.sigmoid("Sigmoid", &kx)?;
        Ok(ctx.b.mul("Mul_1", x, &s)?)
    })
}

/// `silu(x) = x · sigmoid(x)`.
pub fn silu(ctx: &mut Ctx<'_>, scope: &str, x: &Value) -> Result<Value> {
    activation_f32(ctx, scope, x, |ctx, x| {
        let s = ctx.b.sigmoid("Sigmoid", x)?;
        Ok(ctx.b.mul("Mul", x, &s)?)
    })
}

/// Softmax over the last axis in float32, then back to the activation dtype, as eager attention
/// does (`softmax(scores, dim=-1, dtype=torch.float32).to(dtype)`). `scores` is already float32.
pub fn softmax_f32(ctx: &mut Ctx<'_>, scores32: &Value) -> Result<Value> {
    let p = ctx.b.softmax("Softmax", scores32, -1)?;
    ctx.from_f32("Cast_softmax", &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Bits;

    struct Ones;

    impl WeightSource for Ones {
        fn tensor(&mut self, _name: &str) -> std::result::Result<Tensor, WeightError> {
            Ok(Tensor::new(vec![4, 32], vec![1.0; 128]))
        }
    }

    #[test]
    fn quantized_linears_refuse_half_precision_activations() {
        for (dtype, ok) in [
            (DType::F32, true),
            (DType::F16, false),
            (DType::BF16, false),
        ] {
            let mut b = GraphBuilder::new("g");
            let x = b
                .input(
                    "x",
                    ElemType::from(dtype),
                    &[crate::builder::Dim::Fixed(32)],
                )
                .unwrap_or_else(|e| panic!("{e}"));
            let mut ctx = Ctx {
                b: &mut b,
                weights: &mut Ones,
                dtype,
                quant: Some(QuantSpec {
                    bits: Bits::Int4,
                    block_size: 32,
                }),
                flavor: Flavor::Portable,
                stream_elements: STREAM_ELEMENTS,
            };
            let r = linear(&mut ctx, "proj", "proj", &x, 32, 4, false);
            match (ok, r) {
                (true, Ok(_)) => {}
                (false, Err(GraphError::Config(msg))) => {
                    assert!(msg.contains("float32 activations"), "{msg}")
                }
                (ok, r) => panic!("{dtype:?}: expected ok={ok}, got {:?}", r.err()),
            }
        }
    }
}
