//! Write a synthetic Carrot-8B checkpoint: the exact layout, shapes and config of the release,
//! with seeded random weights, so export and runtime can be measured at full size.
//!
//! ```text
//! cargo run --release -p carrot-export --example synth_carrot -- --out DIR
//!     [--scale full|tiny-test] [--layers N] [--lora [--lora-dtype f32|bf16]] [--seed S]
//!     [--max-shard-gb 5] [--tokenizer DIR]
//! ```
//!
//! Default: a merged Bunny checkpoint as Carrot ships it (`DIR/`): fp16 shards of at most 5 GB
//! (`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, or one `model.safetensors`
//! when everything fits in one), `config.json` (Llama 3.1 keys plus Bunny's `mm_*` keys, as the
//! carrot-tiny fixture has them), `generation_config.json`, and the Llama 3 tokenizer files. It holds
//! the Llama (`model.*`, `lm_head.weight`), the whole SigLIP vision model including the parts Carrot
//! never runs (`model.vision_tower.vision_tower.vision_model.*`, pooling head included) and the
//! projector (`model.mm_projector.{0,2}.{weight,bias}`).
//!
//! `--lora`: instead, a Bunny LoRA run over a bf16 base, as three sibling directories:
//! * `DIR/base`: Llama-3.1-8B-Instruct as published (bf16 shards, config, generation config, tokenizer);
//! * `DIR/siglip`: google/siglip-so400m-patch14-384 as published (`SiglipModel` config, text tower
//!   included, fp32 `model.safetensors`, `preprocessor_config.json`);
//! * `DIR/lora`: Bunny's output directory: `config.json` (`mm_vision_tower: "../siglip"`),
//!   `adapter_config.json` (r 128, alpha 256, the 7 Llama linears), `adapter_model.safetensors` and
//!   `non_lora_trainables.bin` (the projector, a `torch.save` zip archive), both in `--lora-dtype`
//!   (f32, as the carrot-lora-tiny fixture; bf16, as a DeepSpeed bf16 run writes them).
//!
//! Export it with `carrot-export --model DIR/lora --base DIR/base --out OUT`.
//!
//! `--scale tiny-test` shrinks every width for a quick check; `--layers N` sets the Llama depth and
//! the SigLIP depth (at least 2: Carrot reads `hidden_states[-2]`). A vision tower that is not the
//! published so400m one gets an explicit `vision_config` in the merged `config.json`, since the
//! exporter's table entry for `google/siglip-so400m-patch14-384` would not match it.
//!
//! Weights: each tensor has its own generator, seeded from `--seed` and the tensor's name with the
//! layout prefixes removed, so a tensor has the same values in every layout and at every depth
//! (the LoRA layout's base, tower and projector round the merged checkpoint's values to their own
//! dtype). Values come from a 65536-entry table of normal quantiles: linear weights and embeddings
//! N(0, 0.02), norm weights N(1, 0.02), biases N(0, 0.01), `lora_A` N(0, 0.01), `lora_B` N(0, 0.002).
//! Every file is streamed: header first (all shapes are known), then the tensor bytes in order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

const BOS: i64 = 128000;
const EOS: [i64; 3] = [128001, 128008, 128009];
const SO400M: &str = "google/siglip-so400m-patch14-384";
const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
const LORA_R: usize = 128;
const LORA_ALPHA: usize = 256;
/// Elements generated and written per chunk (a multiple of 4: one random u64 feeds 4 elements).
const CHUNK: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "Write a synthetic Carrot-8B checkpoint (seeded random weights, real layout)")]
struct Args {
    /// Output directory (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Model widths: the real Carrot-8B, or tiny ones for a quick check.
    #[arg(long, value_enum, default_value_t = Scale::Full)]
    scale: Scale,
    /// Llama and SigLIP depth (SigLIP keeps at least 2 layers).
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Write a Bunny LoRA run (DIR/base, DIR/siglip, DIR/lora) instead of a merged checkpoint.
    #[arg(long)]
    lora: bool,
    /// Dtype of the adapter and of non_lora_trainables.bin.
    #[arg(long, value_enum, default_value_t = LoraDtype::F32)]
    lora_dtype: LoraDtype,
    #[arg(long, default_value_t = 20240917)]
    seed: u64,
    /// Largest shard, in units of 10^9 bytes (Hugging Face's "5GB").
    #[arg(long, value_name = "GB", default_value_t = 5.0)]
    max_shard_gb: f64,
    /// Llama 3 tokenizer directory [default: $CARROT_CACHE/llama3-tokenizer or .cache/llama3-tokenizer].
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    Full,
    TinyTest,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LoraDtype {
    F32,
    Bf16,
}

// ------------------------------------------------------------------------------------------------
// Sizes and tensor lists
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct TextDims {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    max_positions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct SiglipDims {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    image: usize,
    patch: usize,
    /// The text tower of the SigLIP repository (same widths and depth as the vision tower).
    text_vocab: usize,
    text_positions: usize,
}

const LLAMA_31_8B: TextDims = TextDims {
    hidden: 4096,
    intermediate: 14336,
    layers: 32,
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    vocab: 128256,
    max_positions: 131072,
};

const SIGLIP_SO400M_384: SiglipDims = SiglipDims {
    hidden: 1152,
    intermediate: 4304,
    layers: 27,
    heads: 16,
    image: 384,
    patch: 14,
    text_vocab: 32000,
    text_positions: 64,
};

fn dims(args: &Args) -> anyhow::Result<(TextDims, SiglipDims)> {
    let (mut text, mut vision) = match args.scale {
        Scale::Full => (LLAMA_31_8B, SIGLIP_SO400M_384),
        Scale::TinyTest => (
            TextDims {
                hidden: 64,
                intermediate: 224,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                vocab: 128256,
                max_positions: 131072,
            },
            SiglipDims {
                hidden: 48,
                intermediate: 96,
                layers: 3,
                heads: 4,
                image: 56,
                patch: 14,
                text_vocab: 256,
                text_positions: 16,
            },
        ),
    };
    if let Some(n) = args.layers {
        if n == 0 {
            bail!("--layers must be at least 1");
        }
        text.layers = n;
        vision.layers = n.max(2);
    }
    Ok((text, vision))
}

/// A tensor to write: its full key in the file and its shape.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    shape: Vec<usize>,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn spec(name: impl Into<String>, shape: &[usize]) -> Spec {
    Spec {
        name: name.into(),
        shape: shape.to_vec(),
    }
}

/// The seven linears of a `LlamaDecoderLayer`: module path and `[out, in]`.
fn layer_linears(t: &TextDims) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (t.hidden, t.intermediate);
    let (q, kv) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    [
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]
}

/// `LlamaForCausalLM` parameters in module order, `lm_head.weight` last.
fn llama_specs(t: &TextDims) -> Vec<Spec> {
    let h = t.hidden;
    let mut out = vec![spec("model.embed_tokens.weight", &[t.vocab, h])];
    for layer in 0..t.layers {
        let p = format!("model.layers.{layer}");
        for (name, rows, cols) in layer_linears(t) {
            out.push(spec(format!("{p}.{name}.weight"), &[rows, cols]));
        }
        out.push(spec(format!("{p}.input_layernorm.weight"), &[h]));
        out.push(spec(format!("{p}.post_attention_layernorm.weight"), &[h]));
    }
    out.push(spec("model.norm.weight", &[h]));
    out.push(spec("lm_head.weight", &[t.vocab, h]));
    out
}

/// `SiglipEncoder` layers (`SiglipEncoderLayer` registers k, v, q, out, then the norms and MLP).
fn siglip_encoder(out: &mut Vec<Spec>, prefix: &str, v: &SiglipDims) {
    let (h, i) = (v.hidden, v.intermediate);
    for layer in 0..v.layers {
        let p = format!("{prefix}encoder.layers.{layer}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            out.push(spec(format!("{p}.self_attn.{proj}.weight"), &[h, h]));
            out.push(spec(format!("{p}.self_attn.{proj}.bias"), &[h]));
        }
        out.push(spec(format!("{p}.layer_norm1.weight"), &[h]));
        out.push(spec(format!("{p}.layer_norm1.bias"), &[h]));
        out.push(spec(format!("{p}.mlp.fc1.weight"), &[i, h]));
        out.push(spec(format!("{p}.mlp.fc1.bias"), &[i]));
        out.push(spec(format!("{p}.mlp.fc2.weight"), &[h, i]));
        out.push(spec(format!("{p}.mlp.fc2.bias"), &[h]));
        out.push(spec(format!("{p}.layer_norm2.weight"), &[h]));
        out.push(spec(format!("{p}.layer_norm2.bias"), &[h]));
    }
}

/// `SiglipVisionTransformer` (`prefix` ends in `vision_model.`), attention-pool head included.
fn siglip_vision_specs(prefix: &str, v: &SiglipDims) -> Vec<Spec> {
    let (h, i, p) = (v.hidden, v.intermediate, v.patch);
    let tokens = (v.image / p) * (v.image / p);
    let mut out = vec![
        spec(
            format!("{prefix}embeddings.patch_embedding.weight"),
            &[h, 3, p, p],
        ),
        spec(format!("{prefix}embeddings.patch_embedding.bias"), &[h]),
        spec(
            format!("{prefix}embeddings.position_embedding.weight"),
            &[tokens, h],
        ),
    ];
    siglip_encoder(&mut out, prefix, v);
    for leaf in ["weight", "bias"] {
        out.push(spec(format!("{prefix}post_layernorm.{leaf}"), &[h]));
    }
    let head = format!("{prefix}head");
    out.extend([
        spec(format!("{head}.probe"), &[1, 1, h]),
        spec(format!("{head}.attention.in_proj_weight"), &[3 * h, h]),
        spec(format!("{head}.attention.in_proj_bias"), &[3 * h]),
        spec(format!("{head}.attention.out_proj.weight"), &[h, h]),
        spec(format!("{head}.attention.out_proj.bias"), &[h]),
        spec(format!("{head}.layernorm.weight"), &[h]),
        spec(format!("{head}.layernorm.bias"), &[h]),
        spec(format!("{head}.mlp.fc1.weight"), &[i, h]),
        spec(format!("{head}.mlp.fc1.bias"), &[i]),
        spec(format!("{head}.mlp.fc2.weight"), &[h, i]),
        spec(format!("{head}.mlp.fc2.bias"), &[h]),
    ]);
    out
}

/// `SiglipModel`: text tower, vision tower, `logit_scale`, `logit_bias`.
fn siglip_model_specs(v: &SiglipDims) -> Vec<Spec> {
    let h = v.hidden;
    let mut out = vec![
        spec(
            "text_model.embeddings.token_embedding.weight",
            &[v.text_vocab, h],
        ),
        spec(
            "text_model.embeddings.position_embedding.weight",
            &[v.text_positions, h],
        ),
    ];
    siglip_encoder(&mut out, "text_model.", v);
    out.extend([
        spec("text_model.final_layer_norm.weight", &[h]),
        spec("text_model.final_layer_norm.bias", &[h]),
        spec("text_model.head.weight", &[h, h]),
        spec("text_model.head.bias", &[h]),
    ]);
    out.extend(siglip_vision_specs("vision_model.", v));
    out.push(spec("logit_scale", &[1]));
    out.push(spec("logit_bias", &[1]));
    out
}

/// Bunny's `mlp2x_gelu`: `Linear(in, out)`, GELU, `Linear(out, out)`.
fn projector_specs(prefix: &str, input: usize, output: usize) -> Vec<Spec> {
    vec![
        spec(format!("{prefix}mm_projector.0.weight"), &[output, input]),
        spec(format!("{prefix}mm_projector.0.bias"), &[output]),
        spec(format!("{prefix}mm_projector.2.weight"), &[output, output]),
        spec(format!("{prefix}mm_projector.2.bias"), &[output]),
    ]
}

/// peft's `lora_A` [r, in] / `lora_B` [out, r] for the 7 linears of every layer.
fn lora_specs(t: &TextDims, r: usize) -> Vec<Spec> {
    let mut out = Vec::new();
    for layer in 0..t.layers {
        for (module, rows, cols) in layer_linears(t) {
            let p = format!("base_model.model.model.layers.{layer}.{module}");
            out.push(spec(format!("{p}.lora_A.weight"), &[r, cols]));
            out.push(spec(format!("{p}.lora_B.weight"), &[rows, r]));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Values
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    fn safetensors(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    fn torch_storage(self) -> &'static str {
        match self {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
        }
    }

    fn config_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    fn encode(self, v: f32) -> u32 {
        match self {
            DType::F32 => v.to_bits(),
            DType::F16 => u32::from(half::f16::from_f32(v).to_bits()),
            DType::BF16 => u32::from(half::bf16::from_f32(v).to_bits()),
        }
    }
}

/// The name a tensor is seeded and initialised by: its key without the layout's prefix, so the
/// same parameter gets the same values in the merged checkpoint, the SigLIP repository and
/// `non_lora_trainables.bin`.
fn seed_name(key: &str) -> &str {
    key.strip_prefix("model.vision_tower.vision_tower.")
        .or_else(|| key.strip_prefix("base_model.model."))
        .unwrap_or(key)
}

/// (mean, std) of a tensor's values; std 0 means a constant.
fn distribution(name: &str) -> (f64, f64) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    match name {
        "logit_scale" => return (10f64.ln(), 0.0),
        "logit_bias" => return (-10.0, 0.0),
        _ => {}
    }
    if name.contains(".lora_A.") {
        (0.0, 0.01)
    } else if name.contains(".lora_B.") {
        (0.0, 0.002)
    } else if leaf.ends_with("bias") {
        (0.0, 0.01)
    } else if leaf == "weight" && name.contains("norm") {
        (1.0, 0.02)
    } else {
        (0.0, 0.02)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64; // FNV-1a
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    let mut state = seed ^ h;
    splitmix64(&mut state)
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Streams seeded values: a random 16-bit index picks one of 65536 encoded normal quantiles.
struct ValueWriter {
    seed: u64,
    /// Standard normal quantiles at (i + 0.5) / 65536.
    z: Vec<f64>,
    chunk: Vec<u8>,
}

impl ValueWriter {
    fn new(seed: u64) -> Self {
        let z = (0..65536)
            .map(|i| normal_quantile((f64::from(i) + 0.5) / 65536.0))
            .collect();
        ValueWriter {
            seed,
            z,
            chunk: Vec::with_capacity(CHUNK * 4),
        }
    }

    /// Writes `spec`'s values as little-endian `dtype`.
    fn write(&mut self, out: &mut impl Write, spec: &Spec, dtype: DType) -> io::Result<()> {
        let name = seed_name(&spec.name);
        let (mean, std) = distribution(name);
        let table: Vec<u32> = self
            .z
            .iter()
            .map(|z| dtype.encode((mean + std * z) as f32))
            .collect();
        let size = dtype.size();
        let mut rng = tensor_seed(self.seed, name);
        let mut left = spec.numel();
        while left > 0 {
            let n = left.min(CHUNK);
            self.chunk.resize(n * size, 0);
            match dtype {
                DType::F32 => fill::<4>(&mut self.chunk, &table, &mut rng),
                DType::F16 | DType::BF16 => fill::<2>(&mut self.chunk, &table, &mut rng),
            }
            out.write_all(&self.chunk)?;
            left -= n;
        }
        Ok(())
    }
}

/// Fills `out` with `S`-byte elements from `table`, four 16-bit indices per random word.
fn fill<const S: usize>(out: &mut [u8], table: &[u32], rng: &mut u64) {
    for group in out.chunks_mut(4 * S) {
        let bits = splitmix64(rng);
        for (k, el) in group.chunks_exact_mut(S).enumerate() {
            let v = table[((bits >> (16 * k)) & 0xFFFF) as usize].to_le_bytes();
            el.copy_from_slice(&v[..S]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// safetensors
// ------------------------------------------------------------------------------------------------

/// Writes one safetensors file (tensors sorted by name, as the Python library stores them).
/// Returns the file's size.
fn write_safetensors(
    path: &Path,
    specs: &mut [Spec],
    dtype: DType,
    values: &mut ValueWriter,
) -> anyhow::Result<u64> {
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs.iter() {
        let end = offset + s.numel() * dtype.size();
        header.insert(
            s.name.clone(),
            json!({"dtype": dtype.safetensors(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let started = Instant::now();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for s in specs.iter() {
        values
            .write(&mut out, s, dtype)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()?;
    let bytes = 8 + header.len() as u64 + offset as u64;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  {:<52} {:>7.2} GB {:>6.1} s {:>6.0} MB/s",
        path.display(),
        bytes as f64 / 1e9,
        secs,
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(bytes)
}

/// Writes a model directory's weights as Hugging Face does: tensors in module order are cut into
/// shards of at most `max_shard` bytes (a larger tensor gets a shard of its own), named
/// `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or one
/// `model.safetensors` when a single shard suffices. Returns the bytes written.
fn write_checkpoint(
    dir: &Path,
    specs: Vec<Spec>,
    dtype: DType,
    max_shard: u64,
    values: &mut ValueWriter,
) -> anyhow::Result<u64> {
    let mut shards: Vec<Vec<Spec>> = Vec::new();
    let mut current: Vec<Spec> = Vec::new();
    let mut current_bytes = 0u64;
    let mut total_size = 0u64;
    for s in specs {
        let bytes = (s.numel() * dtype.size()) as u64;
        total_size += bytes;
        if !current.is_empty() && current_bytes + bytes > max_shard {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(s);
        current_bytes += bytes;
        if current_bytes > max_shard {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
    }
    if !current.is_empty() {
        shards.push(current);
    }
    let n = shards.len();
    if n == 1 {
        return write_safetensors(
            &dir.join("model.safetensors"),
            &mut shards[0],
            dtype,
            values,
        );
    }
    let mut weight_map = serde_json::Map::new();
    let mut written = 0;
    for (i, mut shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for s in &shard {
            weight_map.insert(s.name.clone(), Value::String(file.clone()));
        }
        written += write_safetensors(&dir.join(&file), &mut shard, dtype, values)?;
    }
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    write_json(&dir.join("model.safetensors.index.json"), &index)?;
    Ok(written)
}

// ------------------------------------------------------------------------------------------------
// torch.save zip archive
// ------------------------------------------------------------------------------------------------

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

struct ZipEntry {
    name: String,
    offset: u64,
    crc: u32,
    size: u64,
}

/// The zip container `torch.save` writes (PyTorchStreamWriter over miniz): stored records whose
/// data starts on a 64-byte boundary (padded with an `FB` extra field), sizes and CRC in a data
/// descriptor after each record, then the central directory and zip64 end records.
struct TorchZip {
    out: BufWriter<File>,
    pos: u64,
    prefix: String,
    entries: Vec<ZipEntry>,
    /// CRC of the open record (pre-inverted), and its size so far.
    crc: u32,
    size: u64,
}

impl TorchZip {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let prefix = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("archive name")?
            .to_string();
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TorchZip {
            out: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            prefix,
            entries: Vec::new(),
            crc: 0,
            size: 0,
        })
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn begin(&mut self, record: &str) -> io::Result<()> {
        let name = format!("{}/{record}", self.prefix);
        let start = self.pos + 30 + name.len() as u64 + 4;
        let pad = (64 - start % 64) % 64;
        self.entries.push(ZipEntry {
            name: name.clone(),
            offset: self.pos,
            crc: 0,
            size: 0,
        });
        let mut h = Vec::with_capacity(30 + name.len() + 4 + pad as usize);
        h.extend_from_slice(b"PK\x03\x04");
        h.extend_from_slice(&0u16.to_le_bytes()); // version needed
        h.extend_from_slice(&0x0808u16.to_le_bytes()); // data descriptor, UTF-8 names
        h.extend_from_slice(&[0; 3 * 2 + 3 * 4]); // method, time, date, crc, sizes
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(b"FB");
        h.extend_from_slice(&(pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, b'Z');
        self.crc = !0;
        self.size = 0;
        self.raw(&h)
    }

    fn end(&mut self) -> anyhow::Result<()> {
        let crc = !self.crc;
        let size = self.size;
        let Ok(size32) = u32::try_from(size) else {
            bail!("record of {size} bytes needs zip64 sizes, which this writer does not emit");
        };
        if let Some(e) = self.entries.last_mut() {
            e.crc = crc;
            e.size = size;
        }
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(b"PK\x07\x08");
        d.extend_from_slice(&crc.to_le_bytes());
        d.extend_from_slice(&size32.to_le_bytes());
        d.extend_from_slice(&size32.to_le_bytes());
        Ok(self.raw(&d)?)
    }

    fn record(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.begin(name)?;
        self.write_all(bytes)?;
        self.end()
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        let cd_offset = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let (Ok(size), Ok(offset)) = (u32::try_from(e.size), u32::try_from(e.offset)) else {
                bail!("{}: archive too large for 32-bit offsets", e.name);
            };
            let mut c = Vec::with_capacity(46 + e.name.len());
            c.extend_from_slice(b"PK\x01\x02");
            c.extend_from_slice(&[0; 4]); // version made by, version needed
            c.extend_from_slice(&0x0808u16.to_le_bytes());
            c.extend_from_slice(&[0; 6]); // method, time, date
            c.extend_from_slice(&e.crc.to_le_bytes());
            c.extend_from_slice(&size.to_le_bytes());
            c.extend_from_slice(&size.to_le_bytes());
            c.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            c.extend_from_slice(&[0; 12]); // extra, comment, disk, internal and external attributes
            c.extend_from_slice(&offset.to_le_bytes());
            c.extend_from_slice(e.name.as_bytes());
            self.raw(&c)?;
        }
        let cd_size = self.pos - cd_offset;
        let count = entries.len() as u64;
        let zip64_eocd = self.pos;
        let mut t = Vec::with_capacity(56 + 20 + 22);
        t.extend_from_slice(b"PK\x06\x06");
        t.extend_from_slice(&44u64.to_le_bytes());
        t.extend_from_slice(&0x031Eu16.to_le_bytes());
        t.extend_from_slice(&45u16.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        for v in [count, count, cd_size, cd_offset] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        t.extend_from_slice(b"PK\x06\x07");
        t.extend_from_slice(&0u32.to_le_bytes());
        t.extend_from_slice(&zip64_eocd.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(b"PK\x05\x06");
        t.extend_from_slice(&[0; 4]);
        t.extend_from_slice(&(count as u16).to_le_bytes());
        t.extend_from_slice(&(count as u16).to_le_bytes());
        t.extend_from_slice(&(cd_size as u32).to_le_bytes());
        t.extend_from_slice(&(cd_offset as u32).to_le_bytes());
        t.extend_from_slice(&0u16.to_le_bytes());
        self.raw(&t)?;
        self.out.flush()?;
        Ok(self.pos)
    }
}

/// Data of the open record.
impl Write for TorchZip {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.crc = CRC_TABLE[((self.crc ^ u32::from(b)) & 0xFF) as usize] ^ (self.crc >> 8);
        }
        self.size += buf.len() as u64;
        self.raw(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Protocol-2 pickle of a `{name: tensor}` dict, as `torch.save` writes it: every tensor is
/// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`, storage `i`
/// being the persistent id `('storage', torch.<Dtype>Storage, 'i', 'cpu', numel)`.
struct Pickler {
    buf: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    fn put(&mut self) -> u32 {
        let i = self.next;
        match u8::try_from(i) {
            Ok(b) => self.buf.extend_from_slice(&[b'q', b]),
            Err(_) => {
                self.buf.push(b'r');
                self.buf.extend_from_slice(&i.to_le_bytes());
            }
        }
        self.next += 1;
        i
    }

    /// Emits a memoised object (a string, or a global as `module\nname\n`) or a reference to it.
    fn memoised(&mut self, key: String, emit: impl FnOnce(&mut Vec<u8>)) {
        if let Some(&i) = self.memo.get(&key) {
            match u8::try_from(i) {
                Ok(b) => self.buf.extend_from_slice(&[b'h', b]),
                Err(_) => {
                    self.buf.push(b'j');
                    self.buf.extend_from_slice(&i.to_le_bytes());
                }
            }
            return;
        }
        emit(&mut self.buf);
        let i = self.put();
        self.memo.insert(key, i);
    }

    fn string(&mut self, s: &str) {
        self.memoised(format!("s:{s}"), |b| {
            b.push(b'X');
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        });
    }

    fn global(&mut self, module: &str, name: &str) {
        self.memoised(format!("g:{module}.{name}"), |b| {
            b.push(b'c');
            b.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        });
    }

    fn int(&mut self, v: u64) {
        if let Ok(b) = u8::try_from(v) {
            self.buf.extend_from_slice(&[b'K', b]);
        } else if let Ok(w) = u16::try_from(v) {
            self.buf.push(b'M');
            self.buf.extend_from_slice(&w.to_le_bytes());
        } else if let Ok(d) = i32::try_from(v) {
            self.buf.push(b'J');
            self.buf.extend_from_slice(&d.to_le_bytes());
        } else {
            // LONG1: little-endian two's complement (one spare byte keeps the sign positive).
            self.buf.extend_from_slice(&[0x8A, 9]);
            self.buf.extend_from_slice(&v.to_le_bytes());
            self.buf.push(0);
        }
    }

    fn int_tuple(&mut self, values: &[u64]) {
        match values.len() {
            0 => self.buf.push(b')'),
            n @ 1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.buf.push(0x84 + n as u8); // TUPLE1..TUPLE3
                self.put();
            }
            _ => {
                self.buf.push(b'(');
                for &v in values {
                    self.int(v);
                }
                self.buf.push(b't');
                self.put();
            }
        }
    }

    fn state_dict(specs: &[Spec], dtype: DType) -> Vec<u8> {
        let mut p = Pickler {
            buf: vec![0x80, 2, b'}'],
            memo: HashMap::new(),
            next: 0,
        };
        p.put();
        p.buf.push(b'(');
        for (i, s) in specs.iter().enumerate() {
            p.string(&s.name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.buf.extend_from_slice(b"((");
            p.string("storage");
            p.global("torch", dtype.torch_storage());
            p.string(&i.to_string());
            p.string("cpu");
            p.int(s.numel() as u64);
            p.buf.push(b't');
            p.put();
            p.buf.push(b'Q'); // BINPERSID
            p.int(0);
            let shape: Vec<u64> = s.shape.iter().map(|&d| d as u64).collect();
            let mut stride = vec![1u64; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * shape[d + 1];
            }
            p.int_tuple(&shape);
            p.int_tuple(&stride);
            p.buf.push(0x89); // False
            p.global("collections", "OrderedDict");
            p.buf.extend_from_slice(b")R");
            p.put();
            p.buf.push(b't');
            p.put();
            p.buf.push(b'R');
            p.put();
        }
        p.buf.extend_from_slice(b"u.");
        p.buf
    }
}

/// `torch.save(state_dict, path)` for the tensors of `specs`, each in a storage of its own.
fn write_torch_bin(
    path: &Path,
    specs: &[Spec],
    dtype: DType,
    values: &mut ValueWriter,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut zip = TorchZip::create(path)?;
    zip.record("data.pkl", &Pickler::state_dict(specs, dtype))?;
    zip.record(".format_version", b"1")?;
    zip.record(".storage_alignment", b"64")?;
    zip.record("byteorder", b"little")?;
    for (i, s) in specs.iter().enumerate() {
        zip.begin(&format!("data/{i}"))?;
        values.write(&mut zip, s, dtype)?;
        zip.end()?;
    }
    zip.record("version", b"3\n")?;
    let mut state = values.seed ^ 0x7365_7269_616C_6964; // "serialid"
    let id = format!(
        "{:020}{:020}",
        splitmix64(&mut state) % 10u64.pow(19),
        splitmix64(&mut state) % 10u64.pow(19)
    );
    zip.record(".data/serialization_id", id.as_bytes())?;
    let bytes = zip.finish()?;
    eprintln!(
        "  {:<52} {:>7.2} GB {:>6.1} s",
        path.display(),
        bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(bytes)
}

// ------------------------------------------------------------------------------------------------
// Configs
// ------------------------------------------------------------------------------------------------

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `config.json` of Llama 3.1 in the transformers 4 layout (`rope_theta` + `rope_scaling`).
fn llama_config(t: &TextDims, dtype: DType) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": t.hidden,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate,
        "max_position_embeddings": t.max_positions,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": t.heads,
        "num_hidden_layers": t.layers,
        "num_key_value_heads": t.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.config_name(),
        "use_cache": true,
        "vocab_size": t.vocab
    })
}

/// Carrot's `config.json`: the Llama keys plus Bunny's, as the carrot-tiny fixture has them.
fn carrot_config(t: &TextDims, v: &SiglipDims, dtype: DType, vision_tower: &str) -> Value {
    let mut cfg = llama_config(t, dtype);
    let bunny = json!({
        "architectures": ["CapxLlamaForCausalLM"],
        "model_type": "capx-llama",
        "head_dim": t.head_dim,
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": v.hidden,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_s2": false,
        "use_mm_proj": true,
        "tune_mm_mlp_adapter": false,
        "freeze_mm_mlp_adapter": false,
        "unfreeze_vision_tower": false,
        "mm_projector_lr": null
    });
    if let (Value::Object(cfg), Value::Object(bunny)) = (&mut cfg, bunny) {
        cfg.extend(bunny);
    }
    cfg
}

fn siglip_vision_config(v: &SiglipDims) -> Value {
    json!({
        "hidden_size": v.hidden,
        "image_size": v.image,
        "intermediate_size": v.intermediate,
        "model_type": "siglip_vision_model",
        "num_attention_heads": v.heads,
        "num_hidden_layers": v.layers,
        "patch_size": v.patch
    })
}

/// A SigLIP repository's `config.json` (`SiglipModel`, defaults left out as Google's are).
fn siglip_config(v: &SiglipDims) -> Value {
    let mut text = json!({
        "hidden_size": v.hidden,
        "intermediate_size": v.intermediate,
        "model_type": "siglip_text_model",
        "num_attention_heads": v.heads,
        "num_hidden_layers": v.layers
    });
    if (v.text_vocab, v.text_positions) != (32000, 64) {
        text["vocab_size"] = json!(v.text_vocab);
        text["max_position_embeddings"] = json!(v.text_positions);
    }
    json!({
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": text,
        "torch_dtype": "float32",
        "vision_config": siglip_vision_config(v)
    })
}

fn siglip_preprocessor(v: &SiglipDims) -> Value {
    json!({
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"height": v.image, "width": v.image}
    })
}

fn generation_config(temperature: f64) -> Value {
    json!({"bos_token_id": BOS, "do_sample": true, "eos_token_id": EOS, "temperature": temperature, "top_p": 0.9})
}

/// peft 0.21's `adapter_config.json` for Bunny's LoRA recipe (keys as in the carrot-lora-tiny fixture).
fn adapter_config(base: &str) -> Value {
    let mut targets = LORA_TARGETS.to_vec();
    targets.sort_unstable();
    json!({
        "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
        "auto_mapping": null, "base_model_name_or_path": base, "bias": "none",
        "corda_config": null, "ensure_weight_tying": false, "eva_config": null,
        "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
        "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
        "lora_alpha": LORA_ALPHA, "lora_bias": false, "lora_dropout": 0.05, "lora_ga_config": null,
        "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
        "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2",
        "qalora_group_size": 16, "r": LORA_R, "rank_pattern": {}, "revision": null,
        "target_modules": targets, "target_parameters": null, "task_type": "CAUSAL_LM",
        "trainable_token_indices": null, "use_bdlora": null, "use_dora": false,
        "use_qalora": false, "use_rslora": false, "velora_config": null
    })
}

/// Copies the Llama 3 tokenizer files into `dir`; returns false (after saying so) when absent.
fn copy_tokenizer(tokenizer: &Path, dir: &Path) -> anyhow::Result<bool> {
    let files = ["tokenizer.json", "tokenizer_config.json"];
    if files.iter().any(|f| !tokenizer.join(f).is_file()) {
        eprintln!(
            "  no Llama 3 tokenizer in {} (run scripts/setup.sh); tokenizer files skipped",
            tokenizer.display()
        );
        return Ok(false);
    }
    for f in files {
        std::fs::copy(tokenizer.join(f), dir.join(f))
            .with_context(|| format!("copying {f} into {}", dir.display()))?;
    }
    Ok(true)
}

// ------------------------------------------------------------------------------------------------
// Layouts
// ------------------------------------------------------------------------------------------------

struct Plan {
    text: TextDims,
    vision: SiglipDims,
    max_shard: u64,
    tokenizer: PathBuf,
    lora_dtype: DType,
}

/// The merged Carrot release: Llama + SigLIP + projector in fp16 shards.
fn write_merged(dir: &Path, plan: &Plan, values: &mut ValueWriter) -> anyhow::Result<u64> {
    let mut specs = llama_specs(&plan.text);
    let lm_head = specs.pop().context("lm_head")?;
    specs.extend(siglip_vision_specs(
        "model.vision_tower.vision_tower.vision_model.",
        &plan.vision,
    ));
    specs.extend(projector_specs(
        "model.",
        plan.vision.hidden,
        plan.text.hidden,
    ));
    specs.push(lm_head);
    let bytes = write_checkpoint(dir, specs, DType::F16, plan.max_shard, values)?;
    let mut cfg = carrot_config(&plan.text, &plan.vision, DType::F16, SO400M);
    if plan.vision != SIGLIP_SO400M_384 {
        let mut vision = siglip_vision_config(&plan.vision);
        vision["hidden_act"] = json!("gelu_pytorch_tanh");
        vision["layer_norm_eps"] = json!(1e-6);
        cfg["vision_config"] = vision;
    }
    write_json(&dir.join("config.json"), &cfg)?;
    write_json(&dir.join("generation_config.json"), &generation_config(0.2))?;
    copy_tokenizer(&plan.tokenizer, dir)?;
    Ok(bytes)
}

/// A Bunny LoRA run: `base/` (bf16 Llama), `siglip/` (fp32 SigLIP repository), `lora/` (output).
fn write_lora_run(dir: &Path, plan: &Plan, values: &mut ValueWriter) -> anyhow::Result<u64> {
    let (base, siglip, lora) = (dir.join("base"), dir.join("siglip"), dir.join("lora"));
    for d in [&base, &siglip, &lora] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut bytes = write_checkpoint(
        &base,
        llama_specs(&plan.text),
        DType::BF16,
        plan.max_shard,
        values,
    )?;
    write_json(
        &base.join("config.json"),
        &llama_config(&plan.text, DType::BF16),
    )?;
    write_json(
        &base.join("generation_config.json"),
        &generation_config(0.6),
    )?;
    copy_tokenizer(&plan.tokenizer, &base)?;

    let specs = siglip_model_specs(&plan.vision);
    bytes += write_checkpoint(&siglip, specs, DType::F32, plan.max_shard, values)?;
    write_json(&siglip.join("config.json"), &siglip_config(&plan.vision))?;
    write_json(
        &siglip.join("preprocessor_config.json"),
        &siglip_preprocessor(&plan.vision),
    )?;

    let mut adapter = lora_specs(&plan.text, LORA_R);
    bytes += write_safetensors(
        &lora.join("adapter_model.safetensors"),
        &mut adapter,
        plan.lora_dtype,
        values,
    )?;
    write_json(
        &lora.join("adapter_config.json"),
        &adapter_config("../base"),
    )?;
    let projector = projector_specs(
        "base_model.model.model.",
        plan.vision.hidden,
        plan.text.hidden,
    );
    bytes += write_torch_bin(
        &lora.join("non_lora_trainables.bin"),
        &projector,
        plan.lora_dtype,
        values,
    )?;
    write_json(
        &lora.join("config.json"),
        &carrot_config(&plan.text, &plan.vision, DType::BF16, "../siglip"),
    )?;
    Ok(bytes)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (text, vision) = dims(&args)?;
    if args.max_shard_gb.is_nan() || args.max_shard_gb <= 0.0 {
        bail!("--max-shard-gb must be positive");
    }
    let tokenizer = args.tokenizer.clone().unwrap_or_else(|| {
        std::env::var_os("CARROT_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"))
            .join("llama3-tokenizer")
    });
    let plan = Plan {
        text,
        vision,
        max_shard: (args.max_shard_gb * 1e9) as u64,
        tokenizer,
        lora_dtype: match args.lora_dtype {
            LoraDtype::F32 => DType::F32,
            LoraDtype::Bf16 => DType::BF16,
        },
    };
    if args.out.exists()
        && std::fs::read_dir(&args.out)
            .with_context(|| format!("reading {}", args.out.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty; remove it first", args.out.display());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    eprintln!(
        "synth_carrot: {} {} (Llama {} layers x {}, SigLIP {} layers x {}), seed {}",
        if args.lora { "LoRA run" } else { "merged" },
        args.out.display(),
        text.layers,
        text.hidden,
        vision.layers,
        vision.hidden,
        args.seed
    );
    let started = Instant::now();
    let mut values = ValueWriter::new(args.seed);
    let bytes = if args.lora {
        write_lora_run(&args.out, &plan, &mut values)?
    } else {
        write_merged(&args.out, &plan, &mut values)?
    };
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "synth_carrot: wrote {:.2} GB of weights to {} in {secs:.1} s ({:.0} MB/s)",
        bytes as f64 / 1e9,
        args.out.display(),
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}
