//! How much memory running an export takes on the CPU, checked before any session is created, so
//! that an 8B float16 export never ends in a machine-wide swap storm.
//!
//! What ONNX Runtime holds per byte of graph file, measured as peak RSS of `carrot generate`:
//! - float16/bfloat16: no float16 matrix kernels on the CPU, so float32 copies of the weights: 2×;
//! - portable int4/int8: the `DequantizeLinear → MatMul` pairs are rewritten into `MatMulNBits`
//!   at load and then prepacked: 1.8× (Carrot-8B shape int4: 11.5 GiB for 6.4 GiB of files), 2×;
//! - `ort` flavor int4/int8: `MatMulNBits` prepacked next to the mapped weights: 1.3–1.4× (Carrot-8B
//!   shape: 8.1–8.9 GiB for 6.4 GiB), counted as 1.5×;
//! - float32: prepacked MatMul weights: 1.3× (SmolLM2: 704 MB for 538 MB).
//!
//! The KV cache for the full context comes on top.

use std::path::Path;

use carrot_contract::Manifest;
use indicatif::HumanBytes;

/// What the memory check compares against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLimit {
    /// `MemAvailable` from `/proc/meminfo` (no check where it cannot be read).
    #[default]
    Available,
    /// A fixed budget in bytes.
    Bytes(u64),
    /// No check.
    Off,
}

/// The estimate for one export on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Bytes of the graph files and their external data.
    pub files: u64,
    /// Bytes the weights take once ONNX Runtime holds them.
    pub weights: u64,
    /// KV cache for one sequence at the manifest's `prompt.max_length`, in float32.
    pub kv_cache: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + OVERHEAD
    }
}

/// Sessions, the tokenizer, arenas for activations: measured at a few hundred MB for the fixtures.
const OVERHEAD: u64 = 512 << 20;

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Estimate the CPU memory of the export in `dir`.
pub fn estimate(dir: &Path, manifest: &Manifest) -> Estimate {
    let graphs = [
        manifest.graphs.vision.as_deref(),
        Some(manifest.graphs.embed.as_str()),
        Some(manifest.graphs.decoder.as_str()),
    ];
    let files: u64 = graphs
        .into_iter()
        .flatten()
        .map(|g| file_len(&dir.join(g)) + file_len(&dir.join(format!("{g}.data"))))
        .sum();
    // Tenths of a byte held per byte of file (see the module documentation).
    let tenths: u64 = match (
        manifest.activation_dtype.as_str(),
        manifest.quantization.is_some(),
        manifest.flavor.as_str(),
    ) {
        ("float16" | "bfloat16", _, _) => 20,
        (_, true, "ort") => 15,
        (_, true, _) => 20,
        _ => 13,
    };
    let t = &manifest.text;
    let kv_cache = 2
        * t.num_layers as u64
        * t.num_kv_heads as u64
        * t.head_dim as u64
        * manifest.prompt.max_length as u64
        * 4;
    Estimate {
        files,
        weights: files * tenths / 10,
        kv_cache,
    }
}

/// Whether prepacking weights on all threads fits: it holds about 0.7× the graph files more at its
/// peak than prepacking one weight at a time (Carrot-8B shape, int4 `ort` decoder alone: 10.3 GB
/// against 6.9 GB, for a load of 3.9 s instead of 12.0 s).
pub fn room_for_parallel_prepack(estimate: &Estimate, budget: u64) -> bool {
    estimate.total() + estimate.files <= budget
}

/// `MemAvailable` in bytes, where the kernel reports it.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `Err(advice)` when the export in `dir` needs more than `budget` bytes on the CPU.
pub fn check(
    dir: &Path,
    manifest: &Manifest,
    estimate: &Estimate,
    budget: u64,
) -> Result<(), String> {
    let need = estimate.total();
    if need <= budget {
        return Ok(());
    }
    let why = if matches!(manifest.activation_dtype.as_str(), "float16" | "bfloat16") {
        format!(
            "its {} {} graphs run in float32 on ONNX Runtime's CPU provider, about {}",
            HumanBytes(estimate.files),
            manifest.dtype,
            HumanBytes(estimate.weights)
        )
    } else {
        format!(
            "its {} of graphs take about {} once loaded",
            HumanBytes(estimate.files),
            HumanBytes(estimate.weights)
        )
    };
    let advice = match manifest.dtype.as_str() {
        "int4" => "run it on a GPU (--device cuda)",
        "int8" => "export with --dtype int4 or run it on a GPU (--device cuda)",
        _ => "export with --dtype int4 or int8 for the CPU, or run it on a GPU (--device cuda)",
    };
    Err(format!(
        "{}: running on the CPU needs about {} ({why}, plus {} of KV cache), more than the {} available; \
         {advice}, or pass --skip-memory-check to try anyway",
        dir.display(),
        HumanBytes(need),
        HumanBytes(estimate.kv_cache),
        HumanBytes(budget)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dtype: &str, act: &str) -> Manifest {
        let quant = match dtype {
            "int4" => r#", "quantization": {"bits": 4, "block_size": 32, "weights": []}"#,
            _ => "",
        };
        let text = format!(
            r#"{{"format": "carrot/1", "exporter": {{"name": "carrot-export", "version": "0"}},
            "source": {{"model": "m", "lora": [], "dtype_in": "float16"}},
            "dtype": "{dtype}", "activation_dtype": "{act}", "flavor": "portable",
            "kv_cache": "concat", "logits": "last",
            "graphs": {{"embed": "embed.onnx", "decoder": "decoder.onnx"}},
            "text": {{"hidden_size": 4096, "num_layers": 32, "num_attention_heads": 32,
                     "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072}},
            "prompt": {{"template": "raw", "image_token": "<image>", "image_token_index": -200,
                       "bos_token_id": 128000, "eos_token_ids": [128001], "max_length": 2048}},
            "sampling_defaults": {{"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16}}{quant}}}"#
        );
        match Manifest::parse(&text, "carrot.json") {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    const GB: u64 = 1 << 30;

    #[test]
    fn float16_on_the_cpu_counts_twice_and_is_refused_with_advice() {
        let m = manifest("fp16", "float16");
        let e = Estimate {
            files: 15 * GB,
            weights: 30 * GB,
            kv_cache: 512 << 20,
        };
        let err = check(Path::new("/x/carrot-8b"), &m, &e, 22 * GB).expect_err("30 GB > 22 GB");
        for needle in [
            "/x/carrot-8b",
            "float32",
            "--dtype int4",
            "--device cuda",
            "--skip-memory-check",
            "31.00 GiB",
            "22.00 GiB",
        ] {
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        assert!(check(Path::new("x"), &m, &e, 40 * GB).is_ok());
    }

    #[test]
    fn int4_is_advised_a_gpu_only() {
        let m = manifest("int4", "float32");
        assert!(m.quantization.is_some());
        let e = Estimate {
            files: 5 * GB,
            weights: 5 * GB,
            kv_cache: 0,
        };
        let err = check(Path::new("x"), &m, &e, 4 * GB).expect_err("5.5 GB > 4 GB");
        assert!(
            err.contains("--device cuda") && !err.contains("--dtype"),
            "{err}"
        );
    }

    #[test]
    fn parallel_prepack_only_with_room_for_its_peak() {
        let e = Estimate {
            files: 6 * GB,
            weights: 9 * GB,
            kv_cache: 0,
        };
        assert!(room_for_parallel_prepack(&e, 16 * GB));
        assert!(!room_for_parallel_prepack(&e, 15 * GB));
    }

    #[test]
    fn estimate_reads_file_sizes_and_widens_half_precision() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (file, len) in [
            ("embed.onnx", 100),
            ("embed.onnx.data", 1000),
            ("decoder.onnx", 10),
            ("decoder.onnx.data", 5000),
        ] {
            std::fs::write(dir.path().join(file), vec![0u8; len]).expect("write");
        }
        let half = estimate(dir.path(), &manifest("fp16", "float16"));
        assert_eq!(half.files, 6110);
        assert_eq!(half.weights, 12220);
        // 2 (K, V) · 32 layers · 8 heads · 128 · 2048 positions · 4 bytes.
        assert_eq!(half.kv_cache, 2 * 32 * 8 * 128 * 2048 * 4);
        let int4 = estimate(dir.path(), &manifest("int4", "float32"));
        assert_eq!(int4.weights, 6110 * 2);
        let fp32 = estimate(dir.path(), &manifest("fp32", "float32"));
        assert_eq!(fp32.weights, 6110 * 13 / 10);
    }
}
