//! The SigLIP vision transformer up to the selected layer, as `SiglipVisionModel` in
//! transformers (`models/siglip/modeling_siglip.py`): patch embedding, learned position
//! embedding, pre-norm encoder layers with bidirectional attention. `post_layernorm` and the
//! attention-pool head are never used by Bunny-style models and are not built.

use crate::builder::{Dim, ElemType, Value};
use crate::config::{Activation, SiglipTower, VisionConfig};
use crate::nn::{self, Ctx, GraphError, Result};

const PREFIX: &str = "vision_model";

/// `SiglipVisionEmbeddings`: `pixel_values` float32 `[b, C, S, S]` → `[b, N, hidden]`.
///
/// ```text
///   pixel_values ─Cast─Conv(k=p, s=p)─Reshape[b,hidden,N]─Transpose[b,N,hidden]─Add(position_embedding)─▶
/// ```
pub fn embeddings(ctx: &mut Ctx<'_>, cfg: &SiglipTower, pixel_values: &Value) -> Result<Value> {
    let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
    let n = cfg.num_image_tokens();
    // ONNX `Conv` has no bfloat16 kernel type: a bf16 graph runs the patch embedding in float32.
    let conv_f32 = ctx.dtype == crate::config::DType::BF16;
    let (w, bias) = if conv_f32 {
        (
            ctx.param_f32(
                &format!("{PREFIX}.embeddings.patch_embedding.weight"),
                &[h, c, p, p],
            )?,
            ctx.param_f32(&format!("{PREFIX}.embeddings.patch_embedding.bias"), &[h])?,
        )
    } else {
        (
            ctx.param(
                &format!("{PREFIX}.embeddings.patch_embedding.weight"),
                &[h, c, p, p],
            )?,
            ctx.param(&format!("{PREFIX}.embeddings.patch_embedding.bias"), &[h])?,
        )
    };
    let pos = ctx.param(
        &format!("{PREFIX}.embeddings.position_embedding.weight"),
        &[n, h],
    )?;
    ctx.b.push_scope("/vision/embeddings");
    let result = (|| {
        let x = if conv_f32 {
            pixel_values.clone()
        } else {
            ctx.from_f32("Cast", pixel_values)?
        };
        ctx.b.push_scope("patch_embedding");
        let x = ctx.b.conv(
            "Conv",
            &x,
            &w,
            Some(&bias),
            &[p as i64, p as i64],
            &[p as i64, p as i64],
        );
        ctx.b.pop_scope();
        let x = x?;
        let x = if conv_f32 {
            ctx.from_f32("Cast", &x)?
        } else {
            x
        };
        let shape = ctx.b.const_i64("flatten_shape", &[0, h as i64, -1])?;
        let x = ctx.b.reshape("Reshape", &x, &shape)?;
        let x = ctx.b.transpose("Transpose", &x, &[0, 2, 1])?;
        Ok(ctx.b.add("position_embedding/Add", &x, &pos)?)
    })();
    ctx.b.pop_scope();
    result
}

/// `SiglipAttention`: bidirectional multi-head attention with biases, no mask.
///
/// ```text
///   x ─q_proj─Reshape[b,N,H,d]─Transpose[b,H,N,d]─────────────┐
///   x ─k_proj─Reshape[b,N,H,d]─Transpose[b,H,d,N]─────────────MatMul─Mul(scale)─Cast(f32)─Softmax─Cast─┐
///   x ─v_proj─Reshape[b,N,H,d]─Transpose[b,H,N,d]───────────────────────────────────────────────────MatMul
///        ─Transpose[b,N,H,d]─Reshape[b,N,hidden]─out_proj─▶
/// ```
fn attention(ctx: &mut Ctx<'_>, cfg: &SiglipTower, key: &str, x: &Value) -> Result<Value> {
    let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let d = hidden / heads;
    let q = nn::linear(
        ctx,
        "q_proj",
        &format!("{key}.q_proj"),
        x,
        hidden,
        hidden,
        true,
    )?;
    let k = nn::linear(
        ctx,
        "k_proj",
        &format!("{key}.k_proj"),
        x,
        hidden,
        hidden,
        true,
    )?;
    let v = nn::linear(
        ctx,
        "v_proj",
        &format!("{key}.v_proj"),
        x,
        hidden,
        hidden,
        true,
    )?;
    let split = ctx
        .b
        .const_i64("split_heads", &[0, 0, heads as i64, d as i64])?;
    let q = ctx.b.reshape("q/Reshape", &q, &split)?;
    let q = ctx.b.transpose("q/Transpose", &q, &[0, 2, 1, 3])?;
    let k = ctx.b.reshape("k/Reshape", &k, &split)?;
    let kt = ctx.b.transpose("k/Transpose", &k, &[0, 2, 3, 1])?;
    let v = ctx.b.reshape("v/Reshape", &v, &split)?;
    let v = ctx.b.transpose("v/Transpose", &v, &[0, 2, 1, 3])?;
    let scores = ctx.b.matmul("MatMul", &q, &kt)?;
    let scale = ctx.scalar("scale", (d as f64).powf(-0.5))?;
    let scores = ctx.b.mul("Mul", &scores, &scale)?;
    let scores = ctx.to_f32("Cast", &scores)?;
    let probs = nn::softmax_f32(ctx, &scores)?;
    let out = ctx.b.matmul("MatMul_1", &probs, &v)?;
    let out = ctx.b.transpose("Transpose", &out, &[0, 2, 1, 3])?;
    let merge = ctx.b.const_i64("merge_heads", &[0, 0, hidden as i64])?;
    let out = ctx.b.reshape("Reshape", &out, &merge)?;
    nn::linear(
        ctx,
        "out_proj",
        &format!("{key}.out_proj"),
        &out,
        hidden,
        hidden,
        true,
    )
}

/// `SiglipMLP`: `fc2(act(fc1(x)))`.
fn mlp(ctx: &mut Ctx<'_>, cfg: &SiglipTower, key: &str, x: &Value) -> Result<Value> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let y = nn::linear(ctx, "fc1", &format!("{key}.fc1"), x, h, i, true)?;
    let y = match cfg.activation {
        Activation::GeluTanh => nn::gelu_tanh(ctx, "act", &y)?,
        Activation::GeluErf => nn::gelu_erf(ctx, "act", &y)?,
        Activation::QuickGelu => nn::quick_gelu(ctx, "act", &y)?,
    };
    nn::linear(ctx, "fc2", &format!("{key}.fc2"), &y, i, h, true)
}

/// `SiglipEncoderLayer`: `h = x + attn(ln1(x))`, `y = h + mlp(ln2(h))`.
fn encoder_layer(ctx: &mut Ctx<'_>, cfg: &SiglipTower, layer: usize, x: &Value) -> Result<Value> {
    let key = format!("{PREFIX}.encoder.layers.{layer}");
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    ctx.b.push_scope(&format!("/vision/encoder/layers.{layer}"));
    let result = (|| {
        let n1 = nn::layer_norm(ctx, "layer_norm1", &format!("{key}.layer_norm1"), x, h, eps)?;
        ctx.b.push_scope("attn");
        let a = attention(ctx, cfg, &format!("{key}.self_attn"), &n1);
        ctx.b.pop_scope();
        let h1 = ctx.b.add("residual/Add", x, &a?)?;
        let n2 = nn::layer_norm(
            ctx,
            "layer_norm2",
            &format!("{key}.layer_norm2"),
            &h1,
            h,
            eps,
        )?;
        ctx.b.push_scope("mlp");
        let m = mlp(ctx, cfg, &format!("{key}.mlp"), &n2);
        ctx.b.pop_scope();
        Ok(ctx.b.add("residual/Add_1", &h1, &m?)?)
    })();
    ctx.b.pop_scope();
    result
}

/// The vision tower: `pixel_values` → features after `cfg.layers_used` encoder layers
/// (`hidden_states[-2]` for Bunny-style models), `[b, N, hidden]` in the activation dtype.
pub fn vision_tower(ctx: &mut Ctx<'_>, cfg: &VisionConfig, pixel_values: &Value) -> Result<Value> {
    if cfg.tower.num_attention_heads == 0
        || !cfg
            .tower
            .hidden_size
            .is_multiple_of(cfg.tower.num_attention_heads)
    {
        return Err(GraphError::Config(format!(
            "vision hidden_size {} is not a multiple of num_attention_heads {}",
            cfg.tower.hidden_size, cfg.tower.num_attention_heads
        )));
    }
    if cfg.layers_used == 0 || cfg.layers_used > cfg.tower.num_layers {
        return Err(GraphError::Config(format!(
            "vision feature layer {} is outside the tower's {} layers",
            cfg.layers_used, cfg.tower.num_layers
        )));
    }
    let mut x = embeddings(ctx, &cfg.tower, pixel_values)?;
    for layer in 0..cfg.layers_used {
        x = encoder_layer(ctx, &cfg.tower, layer, &x)?;
    }
    Ok(x)
}

/// Declare the `pixel_values` input of vision.onnx.
pub fn pixel_values_input(ctx: &mut Ctx<'_>, cfg: &SiglipTower) -> Result<Value> {
    let s = cfg.image_size as i64;
    Ok(ctx.b.input(
        carrot_contract::names::PIXEL_VALUES,
        ElemType::F32,
        &[
            Dim::from(carrot_contract::names::DIM_BATCH),
            Dim::Fixed(cfg.num_channels as i64),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    )?)
}
