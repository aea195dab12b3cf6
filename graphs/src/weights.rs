//! Where graph builders get their weights from, and how weights are laid out in a graph.
//!
//! Graph code asks a [`WeightSource`] for tensors by their canonical checkpoint names
//! (`model.layers.0.self_attn.q_proj.weight`, `vision_model.encoder.layers.3.mlp.fc1.bias`,
//! `mm_projector.0.weight`, …). The source (in `carrot-export`) maps those names to the files a
//! user holds, merges LoRA adapters and returns one float32 tensor at a time, so a graph is
//! written while at most one tensor sits in memory.

use half::{bf16, f16};

use crate::config::DType;

/// A dense float32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Transpose a 2-D tensor: `[rows, cols]` → `[cols, rows]`.
    ///
    /// Hugging Face `Linear` weights are stored `[out, in]`; ONNX `MatMul` wants `[in, out]`.
    pub fn transposed(&self) -> Tensor {
        let (rows, cols) = match self.shape.as_slice() {
            [r, c] => (*r, *c),
            _ => return self.clone(),
        };
        let mut out = vec![0f32; self.data.len()];
        const BLOCK: usize = 32;
        for r0 in (0..rows).step_by(BLOCK) {
            for c0 in (0..cols).step_by(BLOCK) {
                for r in r0..(r0 + BLOCK).min(rows) {
                    for c in c0..(c0 + BLOCK).min(cols) {
                        out[c * rows + r] = self.data[r * cols + c];
                    }
                }
            }
        }
        Tensor {
            shape: vec![cols, rows],
            data: out,
        }
    }

    /// Little-endian bytes of this tensor converted to `dtype` (round to nearest even).
    pub fn to_bytes(&self, dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F32 => bytemuck::cast_slice(&self.data).to_vec(),
            DType::F16 => {
                let v: Vec<f16> = self.data.iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::BF16 => {
                let v: Vec<bf16> = self.data.iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
        }
    }
}

/// A failure to produce a weight; the message names the file and the tensor.
#[derive(thiserror::Error, Debug)]
#[error("{0}")]
pub struct WeightError(pub String);

/// Supplies weights by canonical checkpoint name, one tensor at a time.
pub trait WeightSource {
    fn tensor(&mut self, name: &str) -> Result<Tensor, WeightError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_rectangular() {
        let t = Tensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let u = t.transposed();
        assert_eq!(u.shape, vec![3, 2]);
        assert_eq!(u.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(u.transposed(), t);
    }

    #[test]
    fn transpose_larger_than_block() {
        let (r, c) = (67, 45);
        let t = Tensor::new(vec![r, c], (0..r * c).map(|x| x as f32).collect());
        let u = t.transposed();
        for i in 0..r {
            for j in 0..c {
                assert_eq!(u.data[j * r + i], t.data[i * c + j]);
            }
        }
    }

    #[test]
    fn bytes_in_each_dtype() {
        let t = Tensor::new(vec![2], vec![1.0, -2.5]);
        assert_eq!(
            t.to_bytes(DType::F32),
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
        assert_eq!(t.to_bytes(DType::F16), vec![0x00, 0x3c, 0x00, 0xc1]);
        assert_eq!(t.to_bytes(DType::BF16), vec![0x80, 0x3f, 0x20, 0xc0]);
    }
}
