//! The `ort` flavor's attention: ONNX Runtime's `com.microsoft.GroupQueryAttention` with rotary
//! embeddings inside the kernel, fed by one packed q/k/v `MatMulNBits`.
//!
//! The graph keeps the contract's inputs and outputs (`attention_mask`, `position_ids`,
//! `past_key_values.{i}.*` → `present.{i}.*`, all `[batch, kv_heads, positions, head_dim]`); the
//! kernel takes the sequence length of each row from the mask (`seqlens_k = Σ mask − 1`) and the
//! rotary angles from `cos_cache`/`sin_cache`, tables of `cos(p · inv_freq)` and `sin(p · inv_freq)`
//! for every position `p` below `max_position_embeddings`, computed here in float32 as
//! transformers computes them.

use carrot_contract::names;

use crate::builder::{ElemType, Value};
use crate::config::TextConfig;
use crate::nn::{self, Ctx, GraphError, Result};

/// ONNX Runtime's CPU kernel rotates inside `GroupQueryAttention` only for these head sizes.
pub fn supports(cfg: &TextConfig) -> bool {
    cfg.head_dim.is_multiple_of(16) && !cfg.attention_bias
}

/// Inputs every layer's `GroupQueryAttention` shares.
pub struct GqaShared {
    /// int32 `[batch]`: index of each row's last position (`Σ attention_mask − 1`).
    seqlens_k: Value,
    /// int32 scalar: `attention_mask`'s length (past + new positions).
    total_sequence_length: Value,
    cos_cache: Value,
    sin_cache: Value,
}

/// `seqlens_k`, `total_sequence_length` and the rotary tables.
///
/// ```text
///   attention_mask ─ReduceSum(1)─Sub(1)─Cast(int32)─▶ seqlens_k
///   attention_mask ─Shape─Gather(1)─Cast(int32)─────▶ total_sequence_length
/// ```
pub fn shared_inputs(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    inv_freq: &[f32],
    mask: &Value,
) -> Result<GqaShared> {
    let positions = cfg.max_position_embeddings;
    let half = inv_freq.len();
    let (mut cos, mut sin) = (
        Vec::with_capacity(positions * half),
        Vec::with_capacity(positions * half),
    );
    for p in 0..positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let elem = ctx.elem();
    let table = |v: Vec<f32>| crate::weights::Tensor::new(vec![positions, half], v);
    let cos_cache = ctx.store("model.rotary_emb.cos_cache", &table(cos), ctx.dtype)?;
    let sin_cache = ctx.store("model.rotary_emb.sin_cache", &table(sin), ctx.dtype)?;
    debug_assert_eq!(elem, ElemType::from(ctx.dtype));
    ctx.b.push_scope("/model/attn_mask");
    let r = (|| -> Result<(Value, Value)> {
        let axis1 = ctx.b.const_i64("axis1", &[1])?;
        let sum = ctx
            .b
            .op("ReduceSum", "ReduceSum", &[mask, &axis1])
            .attr_int("keepdims", 0)
            .build()?;
        let one = ctx.b.const_scalar("one", ElemType::I64, 1.0)?;
        let last = ctx.b.sub("Sub", &sum, &one)?;
        let seqlens_k = ctx.b.cast("Cast", &last, ElemType::I32)?;
        let shape = ctx.b.shape("Shape", mask)?;
        let one_idx = ctx.b.const_scalar("one_index", ElemType::I64, 1.0)?;
        let total = ctx.b.gather("Gather", &shape, &one_idx, 0)?;
        let total = ctx.b.cast("Cast_1", &total, ElemType::I32)?;
        Ok((seqlens_k, total))
    })();
    ctx.b.pop_scope();
    let (seqlens_k, total_sequence_length) = r?;
    Ok(GqaShared {
        seqlens_k,
        total_sequence_length,
        cos_cache,
        sin_cache,
    })
}

/// `LlamaAttention` as one packed projection and one kernel:
/// ```text
///   x ─MatMulNBits(q|k|v packed)─GroupQueryAttention(past_k, past_v, seqlens_k, total, cos, sin)─┬─o_proj─▶
///                                                                  present.i.key, present.i.value ◀┘
/// ```
pub fn attention(
    ctx: &mut Ctx<'_>,
    cfg: &TextConfig,
    layer: usize,
    x: &Value,
    past: (&Value, &Value),
    shared: &GqaShared,
) -> Result<(Value, Value, Value)> {
    let key = format!("model.layers.{layer}.self_attn");
    let (hidden, heads, kv, d) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let qkv = nn::packed_linear(
        ctx,
        "qkv_proj",
        &[
            (&format!("{key}.q_proj"), heads * d),
            (&format!("{key}.k_proj"), kv * d),
            (&format!("{key}.v_proj"), kv * d),
        ],
        &format!("{key}.qkv_proj.weight"),
        x,
        hidden,
    )?;
    let none = Value::none();
    let attn_out = ctx.b.scoped("GroupQueryAttention/output_0");
    let outs = ctx
        .b
        .op(
            "GroupQueryAttention",
            "GroupQueryAttention",
            &[
                &qkv,
                &none,
                &none,
                past.0,
                past.1,
                &shared.seqlens_k,
                &shared.total_sequence_length,
                &shared.cos_cache,
                &shared.sin_cache,
            ],
        )
        .domain("com.microsoft")
        .attr_int("num_heads", heads as i64)
        .attr_int("kv_num_heads", kv as i64)
        .attr_int("do_rotary", 1)
        .attr_int("rotary_interleaved", 0)
        .attr_float("scale", (d as f64).powf(-0.5) as f32)
        .output_names(&[
            &attn_out,
            &names::present_key(layer),
            &names::present_value(layer),
        ])
        .build_n(3)?;
    let [out, present_k, present_v]: [Value; 3] = outs
        .try_into()
        .map_err(|_| GraphError::Config("GroupQueryAttention has three outputs".into()))?;
    let out = nn::linear(
        ctx,
        "o_proj",
        &format!("{key}.o_proj"),
        &out,
        heads * d,
        hidden,
        false,
    )?;
    Ok((out, present_k, present_v))
}
