//! Element types of PyTorch storages and the decoded [`RawTensor`].

use std::fmt;

use super::TorchBinError;

/// Element type of a tensor read from a `torch.save` checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDType {
    F64,
    F32,
    F16,
    BF16,
    /// `torch.float8_e4m3fn` (no infinities, one NaN pattern per sign).
    F8E4M3FN,
    /// `torch.float8_e5m2`.
    F8E5M2,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl TorchDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 | TorchDType::U64 => 8,
            TorchDType::F32 | TorchDType::I32 | TorchDType::U32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 | TorchDType::U16 => 2,
            TorchDType::F8E4M3FN
            | TorchDType::F8E5M2
            | TorchDType::I8
            | TorchDType::U8
            | TorchDType::Bool => 1,
        }
    }

    /// The name PyTorch uses for this dtype (`torch.<name>`).
    pub fn torch_name(self) -> &'static str {
        match self {
            TorchDType::F64 => "float64",
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::F8E4M3FN => "float8_e4m3fn",
            TorchDType::F8E5M2 => "float8_e5m2",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U64 => "uint64",
            TorchDType::U32 => "uint32",
            TorchDType::U16 => "uint16",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
        }
    }

    /// Whether values are floating point.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            TorchDType::F64
                | TorchDType::F32
                | TorchDType::F16
                | TorchDType::BF16
                | TorchDType::F8E4M3FN
                | TorchDType::F8E5M2
        )
    }

    /// Dtype of a legacy typed storage class such as `torch.HalfStorage`.
    pub(super) fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }

    /// Dtype named by a `torch.<name>` global (as passed to `_rebuild_tensor_v3`).
    pub(super) fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => TorchDType::F64,
            "float32" | "float" => TorchDType::F32,
            "float16" | "half" => TorchDType::F16,
            "bfloat16" => TorchDType::BF16,
            "float8_e4m3fn" => TorchDType::F8E4M3FN,
            "float8_e5m2" => TorchDType::F8E5M2,
            "int64" | "long" => TorchDType::I64,
            "int32" | "int" => TorchDType::I32,
            "int16" | "short" => TorchDType::I16,
            "int8" => TorchDType::I8,
            "uint64" => TorchDType::U64,
            "uint32" => TorchDType::U32,
            "uint16" => TorchDType::U16,
            "uint8" => TorchDType::U8,
            "bool" => TorchDType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for TorchDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// A tensor read from a checkpoint: row-major contiguous, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts every element to `f32` (integers and booleans by value, wider
    /// floats by round-to-nearest).
    ///
    /// Fails only when `data` does not hold exactly `numel × dtype size` bytes,
    /// which cannot happen for tensors returned by the reader. The tensor does
    /// not know its file, so that error names the shape and dtype instead.
    pub fn to_f32(&self) -> Result<Vec<f32>, TorchBinError> {
        let expected = self
            .shape
            .iter()
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d));
        if expected != Some(self.data.len()) {
            return Err(TorchBinError::DataLength {
                dtype: self.dtype,
                shape: self.shape.clone(),
                expected,
                actual: self.data.len(),
            });
        }
        Ok(decode_f32(self.dtype, &self.data))
    }
}

fn decode_f32(dtype: TorchDType, data: &[u8]) -> Vec<f32> {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        data.chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                f(b)
            })
            .collect()
    }
    match dtype {
        TorchDType::F64 => each(data, |b| f64::from_le_bytes(b) as f32),
        TorchDType::F32 => each(data, f32::from_le_bytes),
        TorchDType::F16 => each(data, |b| half::f16::from_le_bytes(b).to_f32()),
        TorchDType::BF16 => each(data, |b| half::bf16::from_le_bytes(b).to_f32()),
        TorchDType::F8E4M3FN => data.iter().map(|&b| f8_e4m3fn_to_f32(b)).collect(),
        TorchDType::F8E5M2 => data
            .iter()
            .map(|&b| half::f16::from_bits(u16::from(b) << 8).to_f32())
            .collect(),
        TorchDType::I64 => each(data, |b| i64::from_le_bytes(b) as f32),
        TorchDType::I32 => each(data, |b| i32::from_le_bytes(b) as f32),
        TorchDType::I16 => each(data, |b| f32::from(i16::from_le_bytes(b))),
        TorchDType::I8 => data.iter().map(|&b| f32::from(b as i8)).collect(),
        TorchDType::U64 => each(data, |b| u64::from_le_bytes(b) as f32),
        TorchDType::U32 => each(data, |b| u32::from_le_bytes(b) as f32),
        TorchDType::U16 => each(data, |b| f32::from(u16::from_le_bytes(b))),
        TorchDType::U8 => data.iter().map(|&b| f32::from(b)).collect(),
        TorchDType::Bool => data
            .iter()
            .map(|&b| if b != 0 { 1.0 } else { 0.0 })
            .collect(),
    }
}

/// float8 e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits;
/// `S.1111.111` is NaN and there are no infinities.
fn f8_e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}
