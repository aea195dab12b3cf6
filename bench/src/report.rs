//! The results: medians, ratios (carrot ÷ peer), the physical limit; as a table and as JSON.

use std::fmt::Write;

use serde::Serialize;

use crate::contenders::{ExportRun, Exporter, GenerateRun, GgufWeights, Runtime};
use crate::stats::median;
use crate::weights::GraphWeights;

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub setup: SetupInfo,
    pub bandwidth: Bandwidth,
    pub weights: Weights,
    /// Bandwidth ÷ the bytes carrot's decoder reads per token (llama.cpp's own limit is in its
    /// generation summary).
    pub limit_tok_s: f64,
    pub export: Vec<ExportSummary>,
    pub generation: Vec<GenerateSummary>,
    pub perplexity: Vec<Perplexity>,
    pub ratios: Vec<Ratio>,
}

/// Perplexity on `fixtures/perplexity/text.txt` (one window): an exporter's output scored by its
/// own runtime (labelled by the exporter), or llama.cpp on the GGUF (labelled by the runtime).
#[derive(Debug, Serialize)]
pub struct Perplexity {
    pub label: String,
    pub perplexity: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub load_avg_start: f64,
    pub load_avg_end: f64,
    /// carrot-bench's own peak RSS: a floor under every peak RSS reported.
    pub bench_peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
pub struct SetupInfo {
    pub model: String,
    pub dtype: String,
    pub prompt: String,
    pub new_tokens: usize,
    pub threads: usize,
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Bandwidth {
    pub threads: usize,
    /// Best of all samples (before the exports and after each round of generations), in 1e9 bytes/s.
    pub read_gb_s: f64,
    pub single_thread_read_gb_s: f64,
    pub samples_gb_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Weights {
    pub carrot_decoder: GraphWeights,
    pub ogenai_model: GraphWeights,
    /// The GGUF llama.cpp runs; absent when llama.cpp is skipped.
    pub llamacpp_gguf: Option<GgufWeights>,
}

#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub exporter: Exporter,
    pub wall_s: f64,
    pub peak_rss_mb: f64,
    pub runs: Vec<ExportRun>,
}

impl ExportSummary {
    pub fn new(exporter: Exporter, runs: Vec<ExportRun>) -> Self {
        Self {
            exporter,
            wall_s: median(runs.iter().map(|r| r.wall_s)),
            peak_rss_mb: median(runs.iter().map(|r| r.peak_rss_mb)),
            runs,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GenerateSummary {
    pub runtime: Runtime,
    /// The runtime's name, with the weight format where it is not the setup's.
    pub label: String,
    pub load_ms: f64,
    pub prefill_ms: f64,
    pub decode_tok_s: f64,
    pub peak_rss_mb: f64,
    /// Bandwidth ÷ the bytes this runtime's weights read per token (carrot's decoder for the ONNX
    /// runtimes and transformers, the GGUF for llama.cpp).
    pub limit_tok_s: f64,
    pub percent_of_limit: f64,
    pub prompt_tokens: usize,
    /// Index of the first generated token that differs from carrot's; `None` when all agree.
    pub first_difference_from_carrot: Option<usize>,
    pub runs: Vec<GenerateRun>,
}

impl GenerateSummary {
    pub fn new(
        runtime: Runtime,
        label: String,
        runs: Vec<GenerateRun>,
        limit_tok_s: f64,
        carrot_tokens: &[u64],
    ) -> Self {
        let decode_tok_s = median(runs.iter().map(|r| r.decode_tok_s));
        let tokens = runs
            .first()
            .map(|r| r.token_ids.as_slice())
            .unwrap_or_default();
        let first_difference_from_carrot = (0..tokens.len().max(carrot_tokens.len()))
            .find(|&i| tokens.get(i) != carrot_tokens.get(i));
        Self {
            runtime,
            label,
            load_ms: median(runs.iter().map(|r| r.load_ms)),
            prefill_ms: median(runs.iter().map(|r| r.prefill_ms)),
            decode_tok_s,
            peak_rss_mb: median(runs.iter().map(|r| r.peak_rss_mb)),
            limit_tok_s,
            percent_of_limit: 100.0 * decode_tok_s / limit_tok_s,
            prompt_tokens: runs.first().map_or(0, |r| r.prompt_tokens),
            first_difference_from_carrot,
            runs,
        }
    }
}

/// carrot's value ÷ the peer's, of the medians. Below 1 is better for times and memory, above 1
/// for tokens per second.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub metric: &'static str,
    pub peer: String,
    pub carrot: f64,
    pub peer_value: f64,
    pub ratio: f64,
}

pub fn ratios(
    export: &[ExportSummary],
    generation: &[GenerateSummary],
    perplexity: &[Perplexity],
) -> Vec<Ratio> {
    let mut out = Vec::new();
    let mut push = |metric, peer: &str, carrot: f64, peer_value: f64| {
        out.push(Ratio {
            metric,
            peer: peer.to_string(),
            carrot,
            peer_value,
            ratio: carrot / peer_value,
        });
    };
    if let [c, peers @ ..] = export {
        for p in peers {
            push("export wall s", p.exporter.name(), c.wall_s, p.wall_s);
            push(
                "export peak RSS MB",
                p.exporter.name(),
                c.peak_rss_mb,
                p.peak_rss_mb,
            );
        }
    }
    if let [c, peers @ ..] = generation {
        for p in peers {
            push("prefill ms", &p.label, c.prefill_ms, p.prefill_ms);
            push("decode tok/s", &p.label, c.decode_tok_s, p.decode_tok_s);
            push(
                "generate peak RSS MB",
                &p.label,
                c.peak_rss_mb,
                p.peak_rss_mb,
            );
        }
    }
    if let [c, peers @ ..] = perplexity {
        for p in peers {
            push("perplexity", &p.label, c.perplexity, p.perplexity);
        }
    }
    out
}

/// The results as a Markdown table with a short heading.
pub fn table(r: &Results) -> String {
    let mut s = String::new();
    let u = &r.setup;
    let prompt_tokens = r.generation.first().map_or(0, |g| g.prompt_tokens);
    let _ = writeln!(
        s,
        "{} ({}), {} threads, {} new tokens (greedy, past EOS) after a {}-token chat prompt; median of {} runs.",
        u.model, u.dtype, u.threads, u.new_tokens, prompt_tokens, u.runs
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {}, {} cores, load average {:.1} at start, {:.1} at end.\n",
        m.cpu, m.cores, m.load_avg_start, m.load_avg_end
    );

    let _ = writeln!(s, "| export | wall s | peak RSS MB |\n|---|---:|---:|");
    for e in &r.export {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.0} |",
            e.exporter.name(),
            e.wall_s,
            e.peak_rss_mb
        );
    }
    if let [c, peers @ ..] = r.export.as_slice() {
        for p in peers {
            let _ = writeln!(
                s,
                "| carrot ÷ {} | {:.2}× | {:.2}× |",
                p.exporter.name(),
                c.wall_s / p.wall_s,
                c.peak_rss_mb / p.peak_rss_mb
            );
        }
    }

    let _ = writeln!(
        s,
        "\n| generation | prompt tokens | load ms | prefill ms | decode tok/s (min–max) | % of limit | peak RSS MB | tokens vs carrot |\n|---|---:|---:|---:|---:|---:|---:|---|"
    );
    for g in &r.generation {
        let same = match (g.runtime, g.first_difference_from_carrot) {
            (Runtime::Carrot, _) => "—".to_string(),
            (_, None) => "identical".to_string(),
            (_, Some(i)) => format!("differ from #{i}"),
        };
        let (lo, hi) = g.runs.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
            (lo.min(r.decode_tok_s), hi.max(r.decode_tok_s))
        });
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.1} | {:.1} ({lo:.1}–{hi:.1}) | {:.0} % | {:.0} | {} |",
            g.label,
            g.prompt_tokens,
            g.load_ms,
            g.prefill_ms,
            g.decode_tok_s,
            g.percent_of_limit,
            g.peak_rss_mb,
            same
        );
    }
    if let [c, peers @ ..] = r.generation.as_slice() {
        for p in peers {
            let _ = writeln!(
                s,
                "| carrot ÷ {} | | {:.2}× | {:.2}× | {:.2}× | | {:.2}× | |",
                p.label,
                c.load_ms / p.load_ms,
                c.prefill_ms / p.prefill_ms,
                c.decode_tok_s / p.decode_tok_s,
                c.peak_rss_mb / p.peak_rss_mb
            );
        }
    }

    let _ = writeln!(
        s,
        "\n| perplexity on fixtures/perplexity/text.txt | {} |\n|---|---:|",
        u.dtype
    );
    for p in &r.perplexity {
        let _ = writeln!(s, "| {} | {:.4} |", p.label, p.perplexity);
    }

    let b = &r.bandwidth;
    let w = &r.weights;
    let _ = writeln!(
        s,
        "\nPhysical limit: read bandwidth {:.1} GB/s with {} thread(s) ({:.1} GB/s with 1), best of {} samples. \
         carrot's decoder reads {:.0} MB of weights per token (lm_head {:.0} MB of it; the embedding table \
         is in embed.onnx, one row per token), so decode ≤ {:.1} tok/s. onnxruntime-genai's model reads \
         {:.0} MB per token of the {:.0} MB it holds (lm_head {:.0} MB).",
        b.read_gb_s,
        b.threads,
        b.single_thread_read_gb_s,
        b.samples_gb_s.len(),
        w.carrot_decoder.per_token_bytes as f64 / 1e6,
        w.carrot_decoder.lm_head_bytes as f64 / 1e6,
        r.limit_tok_s,
        w.ogenai_model.per_token_bytes as f64 / 1e6,
        w.ogenai_model.total_bytes as f64 / 1e6,
        w.ogenai_model.lm_head_bytes as f64 / 1e6,
    );
    let llamacpp = r.generation.iter().find(|g| g.runtime == Runtime::LlamaCpp);
    if let (Some(g), Some(gguf)) = (llamacpp, &w.llamacpp_gguf) {
        let _ = writeln!(
            s,
            "{} reads {:.0} MB of the GGUF's {:.0} MB per token (lm_head {:.0} MB), so its decode ≤ {:.1} tok/s; \
             its % of limit is of that.",
            g.label,
            gguf.weights.per_token_bytes as f64 / 1e6,
            gguf.weights.total_bytes as f64 / 1e6,
            gguf.weights.lm_head_bytes as f64 / 1e6,
            g.limit_tok_s,
        );
    }
    s
}
