//! Activations held on the host between sessions (token embeddings, image features), in the
//! export's activation dtype.

use half::{bf16, f16};
use ort::value::{DynValue, Tensor};

use crate::engine::{EngineError, run_err};

/// The element type of activations (`activation_dtype` in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActDType {
    F32,
    F16,
    BF16,
}

impl ActDType {
    pub(crate) fn from_manifest(name: &str) -> Self {
        match name {
            "float16" => ActDType::F16,
            "bfloat16" => ActDType::BF16,
            _ => ActDType::F32,
        }
    }
}

/// Rows of activations held on the host, in the activation dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum HostRows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostRows {
    pub(crate) fn empty(dtype: ActDType) -> Self {
        match dtype {
            ActDType::F32 => HostRows::F32(Vec::new()),
            ActDType::F16 => HostRows::F16(Vec::new()),
            ActDType::BF16 => HostRows::BF16(Vec::new()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            HostRows::F32(v) => v.len(),
            HostRows::F16(v) => v.len(),
            HostRows::BF16(v) => v.len(),
        }
    }

    /// Append `src[start..end]` (element indices) to self; both must have the same dtype.
    pub(crate) fn extend_from(
        &mut self,
        src: &HostRows,
        start: usize,
        end: usize,
    ) -> Result<(), EngineError> {
        match (self, src) {
            (HostRows::F32(d), HostRows::F32(s)) => d.extend_from_slice(&s[start..end]),
            (HostRows::F16(d), HostRows::F16(s)) => d.extend_from_slice(&s[start..end]),
            (HostRows::BF16(d), HostRows::BF16(s)) => d.extend_from_slice(&s[start..end]),
            _ => {
                return Err(run_err(
                    "inputs_embeds",
                    "image features and text embeddings differ in dtype",
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn from_value(
        v: &DynValue,
        what: &str,
    ) -> Result<(Vec<usize>, HostRows), EngineError> {
        use ort::value::TensorElementType as T;
        let ty = v.dtype().tensor_type();
        let shape = |s: &ort::value::Shape| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
        match ty {
            Some(T::Float32) => {
                let (s, d) = v
                    .try_extract_tensor::<f32>()
                    .map_err(|e| run_err(what, e))?;
                Ok((shape(s), HostRows::F32(d.to_vec())))
            }
            Some(T::Float16) => {
                let (s, d) = v
                    .try_extract_tensor::<f16>()
                    .map_err(|e| run_err(what, e))?;
                Ok((shape(s), HostRows::F16(d.to_vec())))
            }
            Some(T::Bfloat16) => {
                let (s, d) = v
                    .try_extract_tensor::<bf16>()
                    .map_err(|e| run_err(what, e))?;
                Ok((shape(s), HostRows::BF16(d.to_vec())))
            }
            other => Err(run_err(what, format!("unexpected element type {other:?}"))),
        }
    }

    pub(crate) fn into_value(self, shape: Vec<usize>) -> Result<DynValue, EngineError> {
        let v = match self {
            HostRows::F32(d) => Tensor::from_array((shape, d)).map(|t| t.into_dyn()),
            HostRows::F16(d) => Tensor::from_array((shape, d)).map(|t| t.into_dyn()),
            HostRows::BF16(d) => Tensor::from_array((shape, d)).map(|t| t.into_dyn()),
        };
        v.map_err(|e| run_err("inputs_embeds", e))
    }
}
