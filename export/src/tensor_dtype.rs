//! Stored tensor element types and their conversion to float32 (`half`'s bulk conversions).

use std::borrow::Cow;
use std::fmt;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// Element type of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoredDType {
    F16,
    BF16,
    F32,
    F64,
    /// Any other type (integers, fp8, …), by its safetensors / torch name.
    Other(String),
}

impl StoredDType {
    /// The name as `torch_dtype` spells it (`float16`, `bfloat16`, …).
    pub fn name(&self) -> &str {
        match self {
            StoredDType::F16 => "float16",
            StoredDType::BF16 => "bfloat16",
            StoredDType::F32 => "float32",
            StoredDType::F64 => "float64",
            StoredDType::Other(name) => name,
        }
    }

    /// Bytes per element, for the float types.
    pub fn size(&self) -> Option<usize> {
        match self {
            StoredDType::F16 | StoredDType::BF16 => Some(2),
            StoredDType::F32 => Some(4),
            StoredDType::F64 => Some(8),
            StoredDType::Other(_) => None,
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Self {
        match dtype {
            safetensors::Dtype::F16 => StoredDType::F16,
            safetensors::Dtype::BF16 => StoredDType::BF16,
            safetensors::Dtype::F32 => StoredDType::F32,
            safetensors::Dtype::F64 => StoredDType::F64,
            other => StoredDType::Other(format!("{other:?}")),
        }
    }

    /// Parses a torch dtype name (`torch.float16`, `float16`, `half`, `F16`, …).
    pub fn from_name(name: &str) -> Self {
        let short = name.trim_start_matches("torch.");
        match short.to_ascii_lowercase().as_str() {
            "float16" | "half" | "f16" => StoredDType::F16,
            "bfloat16" | "bf16" => StoredDType::BF16,
            "float32" | "float" | "f32" => StoredDType::F32,
            "float64" | "double" | "f64" => StoredDType::F64,
            _ => StoredDType::Other(short.to_string()),
        }
    }
}

impl fmt::Display for StoredDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dtype and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored size in bytes (0 for non-float types).
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size().unwrap_or(0)
    }
}

/// Converts little-endian float bytes to f32; `None` for non-float dtypes.
pub fn bytes_to_f32(bytes: &[u8], dtype: &StoredDType) -> Option<Vec<f32>> {
    let size = dtype.size()?;
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    let n = bytes.len() / size;
    let mut out = carrot_graphs::weights::large_vec::<f32>(n);
    match dtype {
        StoredDType::F16 => widen::<f16>(bytes, &mut out)?,
        StoredDType::BF16 => widen::<bf16>(bytes, &mut out)?,
        StoredDType::F32 => {
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 4))
                .for_each(|(o, s)| {
                    for (o, c) in o.iter_mut().zip(s.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                });
        }
        StoredDType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *o = f64::from_le_bytes(b) as f32;
            }
        }
        StoredDType::Other(_) => return None,
    }
    Some(out)
}

/// Elements per parallel conversion task.
const CHUNK: usize = 1 << 16;

/// Little-endian half-precision bytes (`f16` or `bf16`) into `out`, on all threads.
fn widen<H: bytemuck::Pod + Sync>(bytes: &[u8], out: &mut [f32]) -> Option<()>
where
    [H]: HalfFloatSliceExt,
{
    let v = aligned::<u16>(bytes)?;
    let v = bytemuck::cast_slice::<u16, H>(&v);
    out.par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .for_each(|(o, s)| s.convert_to_f32_slice(o));
    Some(())
}

/// Views little-endian bytes as `T`s, copying only when they are not aligned for `T`.
fn aligned<T: bytemuck::Pod>(bytes: &[u8]) -> Option<Cow<'_, [T]>> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(view) => Some(Cow::Borrowed(view)),
        Err(bytemuck::PodCastError::TargetAlignmentGreaterAndInputNotAligned) => {
            Some(Cow::Owned(bytemuck::pod_collect_to_vec::<u8, T>(bytes)))
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect()
    }

    #[test]
    fn converts_every_float_dtype() {
        let v = [1.0f32, -2.5, 0.125];
        let bf: Vec<u8> = v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f64b: Vec<u8> = v.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect();
        for (bytes, dtype) in [
            (f16_bytes(&v), StoredDType::F16),
            (bf, StoredDType::BF16),
            (f32b, StoredDType::F32),
            (f64b, StoredDType::F64),
        ] {
            assert_eq!(
                bytes_to_f32(&bytes, &dtype).as_deref(),
                Some(&v[..]),
                "{dtype}"
            );
            // Misaligned input is copied, not rejected.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            assert_eq!(
                bytes_to_f32(&shifted[1..], &dtype).as_deref(),
                Some(&v[..]),
                "{dtype} misaligned"
            );
        }
        assert_eq!(
            bytes_to_f32(&[0, 0], &StoredDType::Other("I16".into())),
            None
        );
    }
}
