//! The Llama decoder with a KV cache, as `LlamaForCausalLM` in transformers
//! (`models/llama/modeling_llama.py`), and the token-embedding graph.
//!
//! Inputs and outputs follow `contract.md`: `inputs_embeds`, `attention_mask` over past + new
//! positions, `position_ids`, `past_key_values.{i}.{key,value}` → `logits` (float32) and
//! `present.{i}.{key,value}` (past concatenated with the new positions).

use carrot_contract::names;

use crate::builder::{Dim, ElemType, Value};
use crate::config::{Flavor, TextConfig};
use crate::nn::{self, Ctx, GraphError, Result};
use crate::quant::{Bits, PackedLayout, QuantSpec};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[batch, sequence, vocab]`.
    All,
    /// `[batch, 1, vocab]`: only the last position (what generation needs).
    Last,
}

impl Logits {
    pub fn manifest_name(self) -> &'static str {
        match self {
            Logits::All => "all",
            Logits::Last => "last",
        }
    }
}

/// Attention inputs computed once and shared by every layer, per flavor.
enum AttnShared {
    Portable(crate::eager_attention::Shared),
    Gqa(crate::gqa::GqaShared),
}

fn check(cfg: &TextConfig) -> Result<()> {
    if cfg.num_kv_heads == 0 || !cfg.num_attention_heads.is_multiple_of(cfg.num_kv_heads) {
        return Err(GraphError::Config(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            cfg.num_attention_heads, cfg.num_kv_heads
        )));
    }
    if !cfg.head_dim.is_multiple_of(2) {
        return Err(GraphError::Config(format!(
            "head_dim {} must be even for rotary embeddings",
            cfg.head_dim
        )));
    }
    Ok(())
}

/// embed.onnx: `input_ids` → `inputs_embeds` (`Gather` on `model.embed_tokens.weight`).
pub fn build_embed(ctx: &mut Ctx<'_>, cfg: &TextConfig) -> Result<()> {
    let ids = ctx.b.input(
        names::INPUT_IDS,
        ElemType::I64,
        &[Dim::from(names::DIM_BATCH), Dim::from(names::DIM_SEQUENCE)],
    )?;
    let out = match ctx.quant {
        None => {
            let key = "model.embed_tokens.weight";
            let dims = (cfg.vocab_size, cfg.hidden_size);
            let table = if dims.0 * dims.1 > ctx.stream_elements {
                ctx.check_shape(key, &[dims.0, dims.1])?;
                let dtype = ctx.dtype;
                let bytes = ctx.streamed_bytes(key, dims, dtype, false)?;
                let elem = ctx.elem();
                ctx.b.initializer(key, elem, &[dims.0, dims.1], &bytes)?
            } else {
                ctx.param(key, &[dims.0, dims.1])?
            };
            ctx.b.push_scope("/model/embed_tokens");
            let out = ctx
                .b
                .op("Gather", "Gather", &[&table, &ids])
                .attr_int("axis", 0)
                .output_names(&[names::INPUTS_EMBEDS])
                .build();
            ctx.b.pop_scope();
            out.map_err(GraphError::from)
        }
        Some(spec) => {
            ctx.check_quantized_activations()?;
            // Codes packed by rows; zero points one per byte (`Gather` takes no 4-bit tensors).
            let rows = ctx.quantized_layout(
                "model.embed_tokens.weight",
                (cfg.vocab_size, cfg.hidden_size),
                spec,
                |q| PackedLayout {
                    codes: crate::quant::pack(&q.codes, q.spec.bits),
                    scales: q.scales.clone(),
                    zero_points: q.zero_points.clone(),
                },
            )?;
            ctx.b.push_scope("/model/embed_tokens");
            let out = quantized_embedding(ctx, rows, &ids, cfg, spec);
            ctx.b.pop_scope();
            out
        }
    };
    let elem = ctx.elem();
    ctx.b.output(
        &out?,
        elem,
        &[
            Dim::from(names::DIM_BATCH),
            Dim::from(names::DIM_SEQUENCE),
            Dim::Fixed(cfg.hidden_size as i64),
        ],
    )?;
    Ok(())
}

/// The embedding table quantized by rows (blocks along `hidden`), gathered, then dequantized.
///
/// `Gather` takes no 4-bit tensors, so int4 codes are stored two per byte (`[vocab, hidden / 2]`
/// uint8, the first of each pair in the low nibble) and unpacked after the gather:
/// ```text
///   input_ids ─Gather(codes)─┬─BitwiseAnd(15)────────────Unsqueeze(-1)─┐
///                            └─BitShift(4, RIGHT)────────Unsqueeze(-1)─Concat(-1)─Reshape[b,s,hidden]─┐
///   input_ids ─Gather(scales [vocab, blocks])──────────────────────────────────────────────────────────┤
///   input_ids ─Gather(zero_points [vocab, blocks] uint8)───────DequantizeLinear(axis 2, block_size)─▶ inputs_embeds
/// ```
fn quantized_embedding(
    ctx: &mut Ctx<'_>,
    packed: PackedLayout,
    ids: &Value,
    cfg: &TextConfig,
    spec: QuantSpec,
) -> Result<Value> {
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    let blocks = hidden.div_ceil(spec.block_size);
    let key = "model.embed_tokens.weight";
    let codes = match spec.bits {
        Bits::Int8 => ctx.b.initializer(
            &format!("{key}.codes"),
            ElemType::U8,
            &[vocab, hidden],
            &packed.codes,
        )?,
        Bits::Int4 => {
            if !hidden.is_multiple_of(2) {
                return Err(GraphError::Config(format!(
                    "int4 embedding needs an even hidden_size, found {hidden}"
                )));
            }
            ctx.b.initializer(
                &format!("{key}.codes"),
                ElemType::U8,
                &[vocab, hidden / 2],
                &packed.codes,
            )?
        }
    };
    let scales = ctx.b.initializer(
        &format!("{key}.scales"),
        ElemType::F32,
        &[vocab, blocks],
        bytemuck::cast_slice(&packed.scales),
    )?;
    let zero_points = ctx.b.initializer(
        &format!("{key}.zero_points"),
        ElemType::U8,
        &[vocab, blocks],
        &packed.zero_points,
    )?;
    drop(packed);
    let g = ctx.b.gather("Gather", &codes, ids, 0)?;
    let g = match spec.bits {
        Bits::Int8 => g,
        Bits::Int4 => {
            let mask = ctx.b.const_scalar("low_nibble", ElemType::U8, 15.0)?;
            let four = ctx.b.const_scalar("four", ElemType::U8, 4.0)?;
            let lo = ctx.b.op("BitwiseAnd", "BitwiseAnd", &[&g, &mask]).build()?;
            let hi = ctx
                .b
                .op("BitShift", "BitShift", &[&g, &four])
                .attr_string("direction", "RIGHT")
                .build()?;
            let last = ctx.b.const_i64("axis_last", &[-1])?;
            let lo = ctx.b.unsqueeze("Unsqueeze", &lo, &last)?;
            let hi = ctx.b.unsqueeze("Unsqueeze_1", &hi, &last)?;
            let pairs = ctx.b.concat("Concat", &[&lo, &hi], -1)?;
            let shape = ctx.b.const_i64("shape", &[0, 0, hidden as i64])?;
            ctx.b.reshape("Reshape", &pairs, &shape)?
        }
    };
    let s = ctx.b.gather("Gather_1", &scales, ids, 0)?;
    let z = ctx.b.gather("Gather_2", &zero_points, ids, 0)?;
    let out = ctx
        .b
        .op("DequantizeLinear", "DequantizeLinear", &[&g, &s, &z])
        .attr_int("axis", 2)
        .attr_int("block_size", spec.block_size as i64)
        .output_names(&[names::INPUTS_EMBEDS])
        .build()?;
    Ok(out)
}

/// decoder.onnx. `inv_freq` holds the (possibly llama3-scaled) rotary inverse frequencies,
/// `head_dim / 2` float32 values computed exactly as transformers does.
pub fn build_decoder(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    inv_freq: &[f32],
    logits: Logits,
) -> Result<()> {
    check(cfg)?;
    if inv_freq.len() * 2 != cfg.head_dim {
        return Err(GraphError::Config(format!(
            "{} rotary frequencies given for head_dim {}",
            inv_freq.len(),
            cfg.head_dim
        )));
    }
    let elem = ctx.elem();
    let (b, s, past, total) = (
        Dim::from(names::DIM_BATCH),
        Dim::from(names::DIM_SEQUENCE),
        Dim::from(names::DIM_PAST),
        Dim::from(names::DIM_TOTAL),
    );
    let (kvh, hd) = (
        Dim::Fixed(cfg.num_kv_heads as i64),
        Dim::Fixed(cfg.head_dim as i64),
    );
    let embeds = ctx.b.input(
        names::INPUTS_EMBEDS,
        elem,
        &[b.clone(), s.clone(), Dim::Fixed(cfg.hidden_size as i64)],
    )?;
    let mask = ctx.b.input(
        names::ATTENTION_MASK,
        ElemType::I64,
        &[b.clone(), total.clone()],
    )?;
    let positions = ctx
        .b
        .input(names::POSITION_IDS, ElemType::I64, &[b.clone(), s.clone()])?;
    let mut pasts = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let dims = [b.clone(), kvh.clone(), past.clone(), hd.clone()];
        let k = ctx.b.input(&names::past_key(i), elem, &dims)?;
        let v = ctx.b.input(&names::past_value(i), elem, &dims)?;
        pasts.push((k, v));
    }

    let shared = if uses_gqa(ctx.flavor, cfg) {
        AttnShared::Gqa(crate::gqa::shared_inputs(ctx, cfg, inv_freq, &mask)?)
    } else {
        AttnShared::Portable(crate::eager_attention::shared_inputs(
            ctx, cfg, inv_freq, &embeds, &mask, &positions,
        )?)
    };
    let mut x = Residual {
        base: embeds,
        delta: None,
    };
    let mut presents = Vec::with_capacity(cfg.num_layers);
    for (i, (pk, pv)) in pasts.iter().enumerate() {
        let (y, present_k, present_v) = decoder_layer(ctx, cfg, i, x, pk, pv, &shared)?;
        presents.push((present_k, present_v));
        x = y;
    }

    let (x, _) = norm_residual(ctx, "/model/norm", "model.norm", x, cfg)?;
    let x = match logits {
        Logits::All => x,
        Logits::Last => {
            ctx.b.push_scope("/model/last_position");
            let r = (|| {
                let starts = ctx.b.const_i64("starts", &[-1])?;
                let ends = ctx.b.const_i64("ends", &[i64::MAX])?;
                let axes = ctx.b.const_i64("axes", &[1])?;
                ctx.b.slice("Slice", &x, &starts, &ends, &axes)
            })();
            ctx.b.pop_scope();
            r?
        }
    };
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    // `lm_head.weight` (the source hands out `model.embed_tokens.weight` for tied models).
    let w = nn::Matrix::Source("lm_head.weight", [vocab, hidden]);
    let y = nn::matmul_weight(ctx, "/lm_head", "lm_head.weight", w, &x)?;
    ctx.b.push_scope("/lm_head");
    let out = (|| -> Result<Value> {
        if ctx.dtype == crate::config::DType::F32 {
            Ok(ctx
                .b
                .op("Identity", "Identity", &[&y])
                .output_names(&[names::LOGITS])
                .build()?)
        } else {
            Ok(ctx
                .b
                .op("Cast", "Cast", &[&y])
                .attr_int("to", ElemType::F32.onnx() as i64)
                .output_names(&[names::LOGITS])
                .build()?)
        }
    })();
    ctx.b.pop_scope();
    let seq_dim = match logits {
        Logits::All => s.clone(),
        Logits::Last => Dim::Fixed(1),
    };
    ctx.b.output(
        &out?,
        ElemType::F32,
        &[b.clone(), seq_dim, Dim::Fixed(vocab as i64)],
    )?;
    // Outputs in contract order: logits, then present.{i}.key / present.{i}.value.
    for (present_k, present_v) in &presents {
        let dims = [b.clone(), kvh.clone(), total.clone(), hd.clone()];
        ctx.b.output(present_k, elem, &dims)?;
        ctx.b.output(present_v, elem, &dims)?;
    }
    Ok(())
}

/// The `ort` flavor attends with `GroupQueryAttention` where ONNX Runtime's kernel supports the
/// head size; such a decoder can keep its KV cache in one shared past/present buffer.
pub fn uses_gqa(flavor: Flavor, cfg: &TextConfig) -> bool {
    flavor == Flavor::Ort && crate::gqa::supports(cfg)
}

/// `LlamaMLP`: `down(silu(gate(x)) * up(x))`.
fn mlp(ctx: &mut Ctx<'_>, cfg: &TextConfig, layer: usize, x: &Value) -> Result<Value> {
    let key = format!("model.layers.{layer}.mlp");
    let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
    let g = nn::linear(ctx, "gate_proj", &format!("{key}.gate_proj"), x, h, i, bias)?;
    let u = nn::linear(ctx, "up_proj", &format!("{key}.up_proj"), x, h, i, bias)?;
    let g = nn::silu(ctx, "act_fn", &g)?;
    let y = ctx.b.mul("Mul", &g, &u)?;
    nn::linear(
        ctx,
        "down_proj",
        &format!("{key}.down_proj"),
        &y,
        i,
        h,
        bias,
    )
}

/// The residual stream between blocks: `base + delta`. The portable graph adds at once
/// (`delta` is `None`); the `ort` flavor leaves the addition to the next norm, which ONNX Runtime's
/// `SkipSimplifiedLayerNormalization` fuses with it.
struct Residual {
    base: Value,
    delta: Option<Value>,
}

/// `LlamaRMSNorm` of the residual stream: `(normed, base + delta)`.
///
/// ```text
///   base ─┐
///   delta ─SkipSimplifiedLayerNormalization(key.weight)─┬─▶ normed (output 0)
///                                                       └─▶ base + delta (output 3)
/// ```
fn norm_residual(
    ctx: &mut Ctx<'_>,
    scope: &str,
    key: &str,
    r: Residual,
    cfg: &TextConfig,
) -> Result<(Value, Value)> {
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let Some(delta) = r.delta else {
        let normed = nn::rms_norm(ctx, scope, key, &r.base, h, eps)?;
        return Ok((normed, r.base));
    };
    let weight = ctx.param(&format!("{key}.weight"), &[h])?;
    ctx.b.push_scope(scope);
    let names = [
        ctx.b.scoped("SkipLayerNorm/output_0"),
        String::new(),
        String::new(),
        ctx.b.scoped("SkipLayerNorm/output_3"),
    ];
    let outs = ctx
        .b
        .op(
            "SkipSimplifiedLayerNormalization",
            "SkipLayerNorm",
            &[&r.base, &delta, &weight],
        )
        .domain("com.microsoft")
        .attr_float("epsilon", eps as f32)
        .output_names(&names.iter().map(String::as_str).collect::<Vec<_>>())
        .build_n(4);
    ctx.b.pop_scope();
    let mut outs = outs?.into_iter();
    match (outs.next(), outs.nth(2)) {
        (Some(normed), Some(sum)) => Ok((normed, sum)),
        _ => Err(GraphError::Config(
            "SkipSimplifiedLayerNormalization has four outputs".into(),
        )),
    }
}

/// `LlamaDecoderLayer`: pre-norm attention and MLP with residuals.
fn decoder_layer(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    layer: usize,
    x: Residual,
    past_k: &Value,
    past_v: &Value,
    shared: &AttnShared,
) -> Result<(Residual, Value, Value)> {
    let key = format!("model.layers.{layer}");
    let fuse = matches!(shared, AttnShared::Gqa(_));
    ctx.b.push_scope(&format!("/model/layers.{layer}"));
    let r = (|| {
        let (n1, x) = norm_residual(
            ctx,
            "input_layernorm",
            &format!("{key}.input_layernorm"),
            x,
            cfg,
        )?;
        ctx.b.push_scope("attn");
        let a = match shared {
            AttnShared::Portable(shared) => {
                crate::eager_attention::attention(ctx, cfg, layer, &n1, past_k, past_v, shared)
            }
            AttnShared::Gqa(shared) => {
                crate::gqa::attention(ctx, cfg, layer, &n1, (past_k, past_v), shared)
            }
        };
        ctx.b.pop_scope();
        let (a, pk, pv) = a?;
        let h1 = if fuse {
            Residual {
                base: x,
                delta: Some(a),
            }
        } else {
            Residual {
                base: ctx.b.add("residual/Add", &x, &a)?,
                delta: None,
            }
        };
        let (n2, h1) = norm_residual(
            ctx,
            "post_attention_layernorm",
            &format!("{key}.post_attention_layernorm"),
            h1,
            cfg,
        )?;
        ctx.b.push_scope("mlp");
        let m = mlp(ctx, cfg, layer, &n2);
        ctx.b.pop_scope();
        let m = m?;
        let y = if fuse {
            Residual {
                base: h1,
                delta: Some(m),
            }
        } else {
            Residual {
                base: ctx.b.add("residual/Add_1", &h1, &m)?,
                delta: None,
            }
        };
        Ok((y, pk, pv))
    })();
    ctx.b.pop_scope();
    r
}
