//! Typed one-node helpers on [`GraphBuilder`]; `name` is always the local node name (the scope
//! is prepended), and each returns the node's single output.

use super::{BuildError, ElemType, GraphBuilder, Value};

type R = Result<Value, BuildError>;

impl GraphBuilder {
    pub fn matmul(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("MatMul", name, &[a, b]).build()
    }
    pub fn add(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Add", name, &[a, b]).build()
    }
    pub fn sub(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Sub", name, &[a, b]).build()
    }
    pub fn mul(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Mul", name, &[a, b]).build()
    }
    pub fn div(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Div", name, &[a, b]).build()
    }
    pub fn pow(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Pow", name, &[a, b]).build()
    }
    pub fn sqrt(&mut self, name: &str, x: &Value) -> R {
        self.op("Sqrt", name, &[x]).build()
    }
    pub fn neg(&mut self, name: &str, x: &Value) -> R {
        self.op("Neg", name, &[x]).build()
    }
    pub fn erf(&mut self, name: &str, x: &Value) -> R {
        self.op("Erf", name, &[x]).build()
    }
    pub fn tanh(&mut self, name: &str, x: &Value) -> R {
        self.op("Tanh", name, &[x]).build()
    }
    pub fn sigmoid(&mut self, name: &str, x: &Value) -> R {
        self.op("Sigmoid", name, &[x]).build()
    }
    pub fn exp(&mut self, name: &str, x: &Value) -> R {
        self.op("Exp", name, &[x]).build()
    }
    pub fn equal(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("Equal", name, &[a, b]).build()
    }
    pub fn less_or_equal(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("LessOrEqual", name, &[a, b]).build()
    }
    pub fn and(&mut self, name: &str, a: &Value, b: &Value) -> R {
        self.op("And", name, &[a, b]).build()
    }
    pub fn where_(&mut self, name: &str, cond: &Value, a: &Value, b: &Value) -> R {
        self.op("Where", name, &[cond, a, b]).build()
    }
    pub fn reshape(&mut self, name: &str, x: &Value, shape: &Value) -> R {
        self.op("Reshape", name, &[x, shape]).build()
    }
    pub fn transpose(&mut self, name: &str, x: &Value, perm: &[i64]) -> R {
        self.op("Transpose", name, &[x])
            .attr_ints("perm", perm)
            .build()
    }
    pub fn cast(&mut self, name: &str, x: &Value, to: ElemType) -> R {
        self.op("Cast", name, &[x])
            .attr_int("to", i64::from(to.onnx()))
            .build()
    }
    pub fn softmax(&mut self, name: &str, x: &Value, axis: i64) -> R {
        self.op("Softmax", name, &[x])
            .attr_int("axis", axis)
            .build()
    }
    pub fn concat(&mut self, name: &str, xs: &[&Value], axis: i64) -> R {
        self.op("Concat", name, xs).attr_int("axis", axis).build()
    }
    pub fn gather(&mut self, name: &str, data: &Value, idx: &Value, axis: i64) -> R {
        self.op("Gather", name, &[data, idx])
            .attr_int("axis", axis)
            .build()
    }
    pub fn unsqueeze(&mut self, name: &str, x: &Value, axes: &Value) -> R {
        self.op("Unsqueeze", name, &[x, axes]).build()
    }
    pub fn squeeze(&mut self, name: &str, x: &Value, axes: &Value) -> R {
        self.op("Squeeze", name, &[x, axes]).build()
    }
    pub fn shape(&mut self, name: &str, x: &Value) -> R {
        self.op("Shape", name, &[x]).build()
    }
    pub fn slice(
        &mut self,
        name: &str,
        x: &Value,
        starts: &Value,
        ends: &Value,
        axes: &Value,
    ) -> R {
        self.op("Slice", name, &[x, starts, ends, axes]).build()
    }
    pub fn range(&mut self, name: &str, start: &Value, limit: &Value, delta: &Value) -> R {
        self.op("Range", name, &[start, limit, delta]).build()
    }
    pub fn reduce_mean(&mut self, name: &str, x: &Value, axes: &Value, keepdims: bool) -> R {
        self.op("ReduceMean", name, &[x, axes])
            .attr_int("keepdims", i64::from(keepdims))
            .build()
    }
    pub fn expand(&mut self, name: &str, x: &Value, shape: &Value) -> R {
        self.op("Expand", name, &[x, shape]).build()
    }
    /// Convolution without padding or dilation (a patch embedding).
    pub fn conv(
        &mut self,
        name: &str,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        strides: &[i64],
        kernel: &[i64],
    ) -> R {
        let inputs: Vec<&Value> = [Some(x), Some(w), b].into_iter().flatten().collect();
        self.op("Conv", name, &inputs)
            .attr_ints("strides", strides)
            .attr_ints("kernel_shape", kernel)
            .build()
    }
    /// `LayerNormalization`; `epsilon` comes straight from a config (f64) and is stored as the
    /// attribute's f32.
    pub fn layer_norm(
        &mut self,
        name: &str,
        x: &Value,
        scale: &Value,
        bias: &Value,
        axis: i64,
        epsilon: f64,
    ) -> R {
        self.op("LayerNormalization", name, &[x, scale, bias])
            .attr_int("axis", axis)
            .attr_float("epsilon", epsilon as f32)
            .build()
    }
}
