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
use crate::quant::{Bits, BlockQuantized, QuantSpec};

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
    Portable(Shared),
    Gqa(crate::gqa::GqaShared),
}

/// Values computed once and shared by every layer.
struct Shared {
    /// `[b, 1, s, d]`, activation dtype: for keys.
    cos_k: Value,
    sin_k: Value,
    /// `[b, 1, 1, s, d]`, activation dtype: for queries grouped by KV head.
    cos_q: Value,
    sin_q: Value,
    /// Additive float32 mask `[b, 1, 1, s, past + s]`: 0 where attending is allowed.
    mask: Value,
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
            let table = ctx.param(
                "model.embed_tokens.weight",
                &[cfg.vocab_size, cfg.hidden_size],
            )?;
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
            let t = ctx.fetch(
                "model.embed_tokens.weight",
                &[cfg.vocab_size, cfg.hidden_size],
            )?;
            ctx.b.push_scope("/model/embed_tokens");
            let out = quantized_embedding(ctx, &t, &ids, cfg, spec);
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
    table: &crate::weights::Tensor,
    ids: &Value,
    cfg: &TextConfig,
    spec: QuantSpec,
) -> Result<Value> {
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    if ctx.dtype != crate::config::DType::F32 {
        return Err(GraphError::Config(
            "a quantized embedding produces float32 activations".into(),
        ));
    }
    let q = BlockQuantized::quantize(&table.data, vocab, hidden, spec);
    let blocks = q.blocks();
    let packed = q.row_major();
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
        &q.zero_points,
    )?;
    drop(q);
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

    let shared = if uses_gqa(ctx, cfg) {
        AttnShared::Gqa(crate::gqa::shared_inputs(ctx, cfg, inv_freq, &mask)?)
    } else {
        AttnShared::Portable(shared_inputs(
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
    let w = ctx.fetch("lm_head.weight", &[vocab, hidden])?;
    let y = nn::matmul_weight(ctx, "/lm_head", "lm_head.weight", &w, &x)?;
    drop(w);
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

/// Rotary tables and the attention mask, computed once from the graph inputs.
///
/// ```text
///   position_ids ─Cast(f32)─Unsqueeze(-1)─Mul(inv_freq)─Concat(freqs,freqs)─┬─Cos─Cast─Unsqueeze─▶ cos_k, cos_q
///                                                                           └─Sin─Cast─Unsqueeze─▶ sin_k, sin_q
///   attention_mask ─Shape[1]=T; inputs_embeds ─Shape[1]=s; past = T - s
///   Range(past,T) ─Unsqueeze(1)─┐
///   Range(0,T)    ─Unsqueeze(0)─LessOrEqual─▶ causal [s,T]
///   attention_mask ─Cast(bool)─Unsqueeze(1)─And(causal)─Unsqueeze(1,2)─Where(0, lowest f32)─▶ mask [b,1,1,s,T]
/// ```
fn shared_inputs(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    inv_freq: &[f32],
    embeds: &Value,
    mask: &Value,
    positions: &Value,
) -> Result<Shared> {
    let half = cfg.head_dim / 2;
    let inv_freq_bytes: Vec<u8> = inv_freq.iter().flat_map(|f| f.to_le_bytes()).collect();
    let inv = ctx.b.initializer(
        "model.rotary_emb.inv_freq",
        ElemType::F32,
        &[half],
        &inv_freq_bytes,
    )?;
    ctx.b.push_scope("/model/rotary_emb");
    let rope = (|| -> Result<(Value, Value, Value, Value)> {
        let pos = ctx.b.cast("Cast", positions, ElemType::F32)?;
        let last = ctx.b.const_i64("axis_last", &[-1])?;
        let pos = ctx.b.unsqueeze("Unsqueeze", &pos, &last)?;
        let freqs = ctx.b.mul("Mul", &pos, &inv)?;
        let emb = ctx.b.concat("Concat", &[&freqs, &freqs], -1)?;
        let cos = ctx.b.op("Cos", "Cos", &[&emb]).build()?;
        let sin = ctx.b.op("Sin", "Sin", &[&emb]).build()?;
        let cos = ctx.from_f32("Cast_cos", &cos)?;
        let sin = ctx.from_f32("Cast_sin", &sin)?;
        let ax1 = ctx.b.const_i64("axes_k", &[1])?;
        let ax12 = ctx.b.const_i64("axes_q", &[1, 2])?;
        let cos_k = ctx.b.unsqueeze("Unsqueeze_cos_k", &cos, &ax1)?;
        let sin_k = ctx.b.unsqueeze("Unsqueeze_sin_k", &sin, &ax1)?;
        let cos_q = ctx.b.unsqueeze("Unsqueeze_cos_q", &cos, &ax12)?;
        let sin_q = ctx.b.unsqueeze("Unsqueeze_sin_q", &sin, &ax12)?;
        Ok((cos_k, sin_k, cos_q, sin_q))
    })();
    ctx.b.pop_scope();
    let (cos_k, sin_k, cos_q, sin_q) = rope?;

    ctx.b.push_scope("/model/attn_mask");
    let mask = (|| -> Result<Value> {
        let one_idx = ctx.b.const_i64("one_index", &[1])?;
        let mask_shape = ctx.b.shape("Shape", mask)?;
        let total = ctx.b.gather("Gather", &mask_shape, &one_idx, 0)?;
        let embeds_shape = ctx.b.shape("Shape_1", embeds)?;
        let seq = ctx.b.gather("Gather_1", &embeds_shape, &one_idx, 0)?;
        let past = ctx.b.sub("Sub", &total, &seq)?;
        let zero = ctx.b.const_i64("zero", &[0])?;
        let step = ctx.b.const_i64("one", &[1])?;
        let axes0 = ctx.b.const_i64("axes0", &[0])?;
        let past_s = ctx.b.squeeze("Squeeze", &past, &axes0)?;
        let total_s = ctx.b.squeeze("Squeeze_1", &total, &axes0)?;
        let zero_s = ctx.b.squeeze("Squeeze_2", &zero, &axes0)?;
        let step_s = ctx.b.squeeze("Squeeze_3", &step, &axes0)?;
        let q_pos = ctx.b.range("Range", &past_s, &total_s, &step_s)?;
        let k_pos = ctx.b.range("Range_1", &zero_s, &total_s, &step_s)?;
        let axes1 = ctx.b.const_i64("axes1", &[1])?;
        let q_col = ctx.b.unsqueeze("Unsqueeze", &q_pos, &axes1)?;
        let k_row = ctx.b.unsqueeze("Unsqueeze_1", &k_pos, &axes0)?;
        let causal = ctx.b.less_or_equal("LessOrEqual", &k_row, &q_col)?;
        let keep = ctx.b.cast("Cast", mask, ElemType::Bool)?;
        let keep = ctx.b.unsqueeze("Unsqueeze_2", &keep, &axes1)?;
        let allowed = ctx.b.and("And", &causal, &keep)?;
        let axes12 = ctx.b.const_i64("axes12", &[1, 2])?;
        let allowed = ctx.b.unsqueeze("Unsqueeze_3", &allowed, &axes12)?;
        let open = ctx.b.const_scalar("open", ElemType::F32, 0.0)?;
        let closed = ctx
            .b
            .const_scalar("closed", ElemType::F32, f32::MIN as f64)?;
        Ok(ctx.b.where_("Where", &allowed, &open, &closed)?)
    })();
    ctx.b.pop_scope();
    Ok(Shared {
        cos_k,
        sin_k,
        cos_q,
        sin_q,
        mask: mask?,
    })
}

/// The `ort` flavor attends with `GroupQueryAttention` where ONNX Runtime's kernel supports the
/// head size.
fn uses_gqa(ctx: &Ctx<'_>, cfg: &TextConfig) -> bool {
    ctx.flavor == Flavor::Ort && crate::gqa::supports(cfg)
}

/// `apply_rotary_pos_emb` for one tensor: `x·cos + rotate_half(x)·sin`,
/// `rotate_half(x) = concat(-x[…, d/2:], x[…, :d/2])`.
fn rotate(
    ctx: &mut Ctx<'_>,
    name: &str,
    x: &Value,
    cos: &Value,
    sin: &Value,
    head_dim: usize,
) -> Result<Value> {
    let h = head_dim as i64 / 2;
    ctx.b.push_scope(name);
    let r = (|| -> Result<Value> {
        let axes = ctx.b.const_i64("axes", &[-1])?;
        let s0 = ctx.b.const_i64("start0", &[0])?;
        let mid = ctx.b.const_i64("mid", &[h])?;
        let end = ctx.b.const_i64("end", &[2 * h])?;
        let x1 = ctx.b.slice("Slice", x, &s0, &mid, &axes)?;
        let x2 = ctx.b.slice("Slice_1", x, &mid, &end, &axes)?;
        let nx2 = ctx.b.neg("Neg", &x2)?;
        let rot = ctx.b.concat("Concat", &[&nx2, &x1], -1)?;
        let a = ctx.b.mul("Mul", x, cos)?;
        let c = ctx.b.mul("Mul_1", &rot, sin)?;
        Ok(ctx.b.add("Add", &a, &c)?)
    })();
    ctx.b.pop_scope();
    r
}

/// `LlamaAttention` with grouped-query attention and a concatenating KV cache.
///
/// Queries are grouped by the KV head they share, so keys and values broadcast instead of
/// being repeated:
/// ```text
///   x ─q_proj─Reshape[b,s,kv,rep,d]─Transpose[b,kv,rep,s,d]─RoPE────────────────────────┐
///   x ─k_proj─Reshape[b,s,kv,d]─Transpose[b,kv,s,d]─RoPE─Concat(past_k)─▶ present.i.key  │
///                                              present_k─Transpose[b,kv,d,T]─Unsqueeze(2)─MatMul─Mul(scale)
///        ─Cast(f32)─Add(mask)─Softmax─Cast──────────────────────────────────────────────────┐
///   x ─v_proj─Reshape[b,s,kv,d]─Transpose[b,kv,s,d]─Concat(past_v)─▶ present.i.value─Unsqueeze(2)─MatMul
///        ─Transpose[b,s,kv,rep,d]─Reshape[b,s,heads·d]─o_proj─▶
/// ```
#[allow(clippy::too_many_arguments)]
fn attention(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    layer: usize,
    x: &Value,
    past_k: &Value,
    past_v: &Value,
    shared: &Shared,
) -> Result<(Value, Value, Value)> {
    let key = format!("model.layers.{layer}.self_attn");
    let (hidden, heads, kv, d) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let rep = heads / kv;
    let bias = cfg.attention_bias;
    let q = nn::linear(
        ctx,
        "q_proj",
        &format!("{key}.q_proj"),
        x,
        hidden,
        heads * d,
        bias,
    )?;
    let k = nn::linear(
        ctx,
        "k_proj",
        &format!("{key}.k_proj"),
        x,
        hidden,
        kv * d,
        bias,
    )?;
    let v = nn::linear(
        ctx,
        "v_proj",
        &format!("{key}.v_proj"),
        x,
        hidden,
        kv * d,
        bias,
    )?;

    let q_shape = ctx
        .b
        .const_i64("q_shape", &[0, 0, kv as i64, rep as i64, d as i64])?;
    let q = ctx.b.reshape("q/Reshape", &q, &q_shape)?;
    let q = ctx.b.transpose("q/Transpose", &q, &[0, 2, 3, 1, 4])?;
    let kv_shape = ctx.b.const_i64("kv_shape", &[0, 0, kv as i64, d as i64])?;
    let k = ctx.b.reshape("k/Reshape", &k, &kv_shape)?;
    let k = ctx.b.transpose("k/Transpose", &k, &[0, 2, 1, 3])?;
    let v = ctx.b.reshape("v/Reshape", &v, &kv_shape)?;
    let v = ctx.b.transpose("v/Transpose", &v, &[0, 2, 1, 3])?;

    let q = rotate(ctx, "q_rotary", &q, &shared.cos_q, &shared.sin_q, d)?;
    let k = rotate(ctx, "k_rotary", &k, &shared.cos_k, &shared.sin_k, d)?;

    let present_k = ctx
        .b
        .op("Concat", "k/Concat", &[past_k, &k])
        .attr_int("axis", 2)
        .output_names(&[&names::present_key(layer)])
        .build()?;
    let present_v = ctx
        .b
        .op("Concat", "v/Concat", &[past_v, &v])
        .attr_int("axis", 2)
        .output_names(&[&names::present_value(layer)])
        .build()?;

    let axis2 = ctx.b.const_i64("group_axis", &[2])?;
    let kt = ctx
        .b
        .transpose("k/Transpose_1", &present_k, &[0, 1, 3, 2])?;
    let kt = ctx.b.unsqueeze("k/Unsqueeze", &kt, &axis2)?;
    let vg = ctx.b.unsqueeze("v/Unsqueeze", &present_v, &axis2)?;
    let scores = ctx.b.matmul("MatMul", &q, &kt)?;
    let scale = ctx.scalar("scale", (d as f64).powf(-0.5))?;
    let scores = ctx.b.mul("Mul", &scores, &scale)?;
    let scores = ctx.to_f32("Cast", &scores)?;
    let scores = ctx.b.add("mask/Add", &scores, &shared.mask)?;
    let probs = nn::softmax_f32(ctx, &scores)?;
    let out = ctx.b.matmul("MatMul_1", &probs, &vg)?;
    let out = ctx.b.transpose("Transpose", &out, &[0, 3, 1, 2, 4])?;
    let merge = ctx
        .b
        .const_i64("merge_heads", &[0, 0, (heads * d) as i64])?;
    let out = ctx.b.reshape("Reshape", &out, &merge)?;
    let out = nn::linear(
        ctx,
        "o_proj",
        &format!("{key}.o_proj"),
        &out,
        heads * d,
        hidden,
        bias,
    )?;
    Ok((out, present_k, present_v))
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
            AttnShared::Portable(shared) => attention(ctx, cfg, layer, &n1, past_k, past_v, shared),
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
