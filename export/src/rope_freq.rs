//! RoPE inverse frequencies, computed with the same float32 operations as transformers.
//!
//! Mirrors `LlamaRotaryEmbedding.compute_default_rope_parameters` (transformers 5,
//! `models/llama/modeling_llama.py`) and `_compute_llama3_parameters`
//! (`modeling_rope_utils.py`). Every tensor there is float32; Python scalars are cast to float32
//! when they meet a tensor, and `scalar / tensor` is evaluated as `tensor.reciprocal() * scalar`
//! (torch's `Tensor.__rtruediv__`). Each step below is one of those torch ops.
//!
//! `theta ** exponent` is computed in float64 and rounded, i.e. correctly rounded. torch's
//! vectorised CPU `pow` is within one ulp of that: the results agree bit for bit for Llama 3.1
//! (theta 500000, head_dim 128) and for head_dim 16/32/64 with theta 1e4 or 5e5, but can differ in
//! the last bit for some other (theta, head_dim) pairs (e.g. head_dim 96).

use std::f64::consts::PI;

use carrot_graphs::config::RopeConfig;

/// The `head_dim / 2` inverse frequencies of a Llama rotary embedding, llama3 scaling applied
/// when `rope.llama3` is set.
// `!(a < b)` is kept as transformers writes it (`~(wavelen < high_freq_wavelen)`).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn llama3_inv_freq(head_dim: usize, rope: &RopeConfig) -> Vec<f32> {
    let dim = head_dim as f32;
    let base = rope.theta as f32;
    // 1.0 / (base ** (arange(0, dim, 2).float() / dim))
    let inv_freq = (0..head_dim / 2).map(|i| {
        let exponent = (2 * i) as f32 / dim;
        let power = (f64::from(base).powf(f64::from(exponent))) as f32;
        1.0f32 / power
    });
    let Some(scaling) = rope.llama3 else {
        return inv_freq.collect();
    };
    let factor = scaling.factor as f32;
    let low_freq_factor = scaling.low_freq_factor as f32;
    let old_context_len = scaling.original_max_position_embeddings as f32;
    let low_freq_wavelen =
        (scaling.original_max_position_embeddings / scaling.low_freq_factor) as f32;
    let high_freq_wavelen =
        (scaling.original_max_position_embeddings / scaling.high_freq_factor) as f32;
    let factor_span = (scaling.high_freq_factor - scaling.low_freq_factor) as f32;
    let two_pi = (2.0 * PI) as f32;
    inv_freq
        .map(|inv| {
            let wavelen = (1.0f32 / inv) * two_pi;
            let inv_llama = if wavelen > low_freq_wavelen {
                inv / factor
            } else {
                inv
            };
            let smooth = ((1.0f32 / wavelen) * old_context_len - low_freq_factor) / factor_span;
            let smoothed = ((1.0f32 - smooth) * inv_llama) / factor + smooth * inv_llama;
            let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
            if medium { smoothed } else { inv_llama }
        })
        .collect()
}
