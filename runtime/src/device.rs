//! Execution devices: `cpu`, `cuda[:N]`, `tensorrt[:N]` and `auto`.
//!
//! Asking for CUDA or TensorRT never falls back to CPU silently: the provider is registered with
//! `error_on_failure` and CPU fallback is disabled. Only `auto` tries GPUs and says what it chose.

use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
    TensorRt(i32),
    /// TensorRT, then CUDA, then CPU, reporting the choice.
    Auto,
}

#[derive(thiserror::Error, Debug)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected cpu, cuda[:N], tensorrt[:N] or auto")]
    Parse(String),
    #[error(
        "device {device} is not available in this build: rebuild with `--features {feature}` (and the onnxruntime-gpu library)"
    )]
    NotCompiled {
        device: String,
        feature: &'static str,
    },
    #[error("device {device} is not available: {reason}")]
    Unavailable { device: String, reason: String },
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (
                k,
                Some(i.parse::<i32>().map_err(|_| DeviceError::Parse(s.into()))?),
            ),
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), index) {
            ("cpu", None) => Ok(Device::Cpu),
            ("auto", None) => Ok(Device::Auto),
            ("cuda", i) => Ok(Device::Cuda(i.unwrap_or(0))),
            ("tensorrt" | "trt", i) => Ok(Device::TensorRt(i.unwrap_or(0))),
            _ => Err(DeviceError::Parse(s.into())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::TensorRt(i) => write!(f, "tensorrt:{i}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

/// TensorRT settings derived from the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRtOptions {
    pub cache_dir: PathBuf,
    pub fp16: bool,
    /// `trt_profile_{min,opt,max}_shapes` strings per graph file name.
    pub profiles: Vec<(String, [String; 3])>,
}

/// Optimisation profiles (min, opt, max) for the decoder: batch 1, sequence 1..=max/2,
/// past 0..=max - max/2, with `max` the context length.
pub fn decoder_profiles(text: &carrot_contract::manifest::Text, max_length: usize) -> [String; 3] {
    let shapes = |seq: usize, past: usize| {
        let mut parts = vec![
            format!("inputs_embeds:1x{seq}x{}", text.hidden_size),
            format!("attention_mask:1x{}", past + seq),
            format!("position_ids:1x{seq}"),
        ];
        for i in 0..text.num_layers {
            for kind in ["key", "value"] {
                parts.push(format!(
                    "past_key_values.{i}.{kind}:1x{}x{past}x{}",
                    text.num_kv_heads, text.head_dim
                ));
            }
        }
        parts.join(",")
    };
    let max = max_length.max(2);
    [
        shapes(1, 0),
        shapes(1, max / 2),
        shapes(max / 2, max - max / 2),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_devices() {
        assert_eq!("cpu".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!("cuda:1".parse::<Device>().ok(), Some(Device::Cuda(1)));
        assert_eq!(
            "tensorrt:2".parse::<Device>().ok(),
            Some(Device::TensorRt(2))
        );
        assert_eq!("auto".parse::<Device>().ok(), Some(Device::Auto));
        let err = "gpu".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("`gpu`") && err.contains("tensorrt"), "{err}");
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
