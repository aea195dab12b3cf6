//! The portable flavor's attention: `LlamaAttention` in standard ONNX operators (rotary
//! embedding, a causal and padding mask, grouped queries broadcast over their KV head, a
//! concatenating KV cache), as transformers' eager attention computes it.

use carrot_contract::names;

use crate::builder::{ElemType, Value};
use crate::config::TextConfig;
use crate::nn::{self, Ctx, Result};

/// Values computed once and shared by every layer.
pub(crate) struct Shared {
    /// `[b, 1, s, d]`, activation dtype: for keys.
    cos_k: Value,
    sin_k: Value,
    /// `[b, 1, 1, s, d]`, activation dtype: for queries grouped by KV head.
    cos_q: Value,
    sin_q: Value,
    /// Additive float32 mask `[b, 1, 1, s, past + s]`: 0 where attending is allowed.
    mask: Value,
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
pub(crate) fn shared_inputs(
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
pub(crate) fn attention(
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
