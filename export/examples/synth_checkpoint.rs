//! Write a synthetic Llama checkpoint of a chosen size (random fp16 weights, streamed to disk) for
//! measuring that export memory does not grow with model size.
//!
//! `cargo run --release -p carrot-export --example synth_checkpoint -- OUT_DIR LAYERS [HIDDEN] [VOCAB]`

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: synth_checkpoint OUT_DIR LAYERS [HIDDEN=1024] [VOCAB=32000]";
    let out = PathBuf::from(args.get(1).expect(usage));
    let layers: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let hidden: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let vocab: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(32000);
    let heads = hidden / 64;
    let kv = (heads / 4).max(1);
    let inter = hidden * 11 / 4;
    std::fs::create_dir_all(&out)?;

    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
        ("lm_head.weight".into(), vec![vocab, hidden]),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        tensors.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * 64, hidden],
        ));
        tensors.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv * 64, hidden],
        ));
        tensors.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv * 64, hidden],
        ));
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * 64],
        ));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    tensors.sort();

    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_string(&header)?.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut f = BufWriter::with_capacity(8 << 20, File::create(out.join("model.safetensors"))?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(&header)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let mut left = n;
        while left > 0 {
            let chunk = left.min(1 << 19);
            buf.clear();
            for _ in 0..chunk {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                let v = if is_norm { 1.0 } else { (u - 0.5) * 0.04 };
                buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            f.write_all(&buf)?;
            left -= chunk;
        }
    }
    f.flush()?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    eprintln!(
        "wrote {} ({} layers, {:.0} MB of fp16 weights)",
        out.display(),
        layers,
        offset as f64 / 1e6
    );
    Ok(())
}
