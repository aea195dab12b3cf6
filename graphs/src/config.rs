//! Resolved model configurations: every value known, no `Option`s left to guess.
//!
//! `carrot-export` parses Hugging Face `config.json` files (both transformers 4 and 5 layouts,
//! Bunny `mm_*` keys, SigLIP configs) and resolves them into these structs once; graph code only
//! ever sees the resolved form.

/// Element type of weights and activations inside a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Name used in the manifest's `activation_dtype` (`float32`, `float16`, `bfloat16`).
    pub fn manifest_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Which operators a graph may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flavor {
    /// Standard ONNX operators only: any ONNX Runtime build, TensorRT, other runtimes.
    #[default]
    Portable,
    /// ONNX Runtime's contrib operators where they are faster (`MatMulNBits` for quantized
    /// linears).
    Ort,
}

impl Flavor {
    pub fn manifest_name(self) -> &'static str {
        match self {
            Flavor::Portable => "portable",
            Flavor::Ort => "ort",
        }
    }
}

/// llama3-style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// `None` means the default (unscaled) RoPE.
    pub llama3: Option<Llama3RopeScaling>,
}

/// The Llama decoder, as `LlamaConfig` in transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    /// `lm_head` shares the `embed_tokens` matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v/o projections carry biases (`attention_bias`).
    pub attention_bias: bool,
    /// gate/up/down projections carry biases (`mlp_bias`).
    pub mlp_bias: bool,
}

/// Activation function inside the vision tower MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh` / `gelu_new`: tanh approximation.
    GeluTanh,
    /// `gelu`: exact erf form.
    GeluErf,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
}

/// The SigLIP vision transformer's hyper-parameters, as `SiglipVisionConfig` in transformers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiglipTower {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl SiglipTower {
    /// Patches per side (`image_size / patch_size`, rounded down as the convolution does).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens produced per image.
    pub fn num_image_tokens(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

/// The vision tower as a Bunny-style model uses it: the tower and how many of its encoder layers
/// run (`hidden_states[-2]` means `num_layers - 1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VisionConfig {
    pub tower: SiglipTower,
    pub layers_used: usize,
}

impl VisionConfig {
    /// Tokens produced per image.
    pub fn num_image_tokens(&self) -> usize {
        self.tower.num_image_tokens()
    }
}

/// The Bunny `mlpNx_gelu` projector: `depth` linears with exact GELU between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorConfig {
    pub depth: usize,
    pub in_features: usize,
    pub out_features: usize,
}
