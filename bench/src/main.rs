//! `carrot-bench`: carrot side by side with onnxruntime-genai, transformers and llama.cpp on one
//! machine, in one run. Exports with both exporters, generates with every runtime, measures the
//! memory read bandwidth, prints a table of medians and ratios and writes it as JSON.

mod bandwidth;
mod child;
mod contenders;
mod report;
mod stats;
mod weights;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use contenders::{Exporter, Runtime, Scorer, Setup};
use report::{Bandwidth, ExportSummary, GenerateSummary, Machine, Results, SetupInfo, Weights};

#[derive(Parser, Debug)]
#[command(
    name = "carrot-bench",
    about = "carrot vs onnxruntime-genai, transformers and llama.cpp: export, generation and perplexity on CPU"
)]
struct Cli {
    /// Hugging Face model directory (default: .cache/smollm2-135m-instruct).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Python with onnxruntime-genai, transformers, torch and llama-cpp-python (default:
    /// .venv-bench/bin/python).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Where carrot-export and carrot are (default: target/release).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Exports, logs and results.json (default: target/bench).
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Runs of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Intra-op threads for every runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// The user message, put through the model's chat template by every runtime.
    #[arg(
        long,
        default_value = "Write a story about a rabbit who grows carrots in a small garden."
    )]
    prompt: String,
    /// Weight format of both exports (transformers always runs fp32).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "int8", "int4"])]
    dtype: String,
    /// Quantization block size for int8/int4.
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    /// carrot-export's graph flavor (`ort` needs --dtype int8 or int4).
    #[arg(long, default_value = "portable", value_parser = ["portable", "ort"])]
    flavor: String,
    /// The same model as a GGUF, run by llama.cpp in its own quantization (default:
    /// .cache/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, value_name = "PATH")]
    gguf: Option<PathBuf>,
    /// Leave llama.cpp out (it is also left out, with a note, when --python cannot import llama_cpp).
    #[arg(long)]
    no_llamacpp: bool,
    /// Bytes of the bandwidth buffer.
    #[arg(long, default_value_t = 1 << 30)]
    bandwidth_bytes: usize,
    #[command(subcommand)]
    probe: Option<Probe>,
}

/// Measurements run in a child of carrot-bench, so that their memory never counts towards the
/// peak RSS of the processes measured after them (a spawned child inherits its parent's high-water
/// mark when it execs).
#[derive(Subcommand, Debug)]
enum Probe {
    /// Print the best read bandwidth in bytes per second.
    #[command(hide = true)]
    Bandwidth {
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        passes: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Probe::Bandwidth {
        bytes,
        threads,
        passes,
    }) = cli.probe
    {
        println!("{}", bandwidth::read_bandwidth(bytes, threads, passes));
        return ExitCode::SUCCESS;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plan(cli: &Cli) -> anyhow::Result<Setup> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("bench/ has no parent")?
        .to_path_buf();
    let setup = Setup {
        hf_dir: cli
            .model
            .clone()
            .unwrap_or_else(|| root.join(".cache/smollm2-135m-instruct")),
        work: cli
            .work
            .clone()
            .unwrap_or_else(|| root.join("target/bench")),
        python: cli
            .python
            .clone()
            .unwrap_or_else(|| root.join(".venv-bench/bin/python")),
        bin_dir: cli
            .bin_dir
            .clone()
            .unwrap_or_else(|| root.join("target/release")),
        peers_dir: root.join("bench/peers"),
        prompt: cli.prompt.clone(),
        new_tokens: cli.new_tokens,
        threads: cli.threads,
        dtype: cli.dtype.clone(),
        block_size: cli.block_size,
        flavor: cli.flavor.clone(),
        text: root.join("fixtures/perplexity/text.txt"),
        gguf: None,
    };
    if cli.runs == 0 || cli.threads == 0 || cli.new_tokens < 2 {
        bail!("--runs and --threads must be at least 1, --new-tokens at least 2");
    }
    let needed = [
        setup.hf_dir.join("config.json"),
        setup.hf_dir.join("model.safetensors"),
        setup.python.clone(),
        setup.bin_dir.join("carrot-export"),
        setup.bin_dir.join("carrot"),
        setup.peers_dir.join("ogenai_generate.py"),
        setup.peers_dir.join("hf_generate.py"),
        setup.peers_dir.join("ogenai_perplexity.py"),
        setup.text.clone(),
    ];
    for path in &needed {
        if !path.exists() {
            bail!(
                "{} is missing (scripts/bench.sh builds and fetches everything)",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(setup.work.join("logs"))
        .with_context(|| format!("creating {}", setup.work.display()))?;
    if cli.no_llamacpp {
        return Ok(setup);
    }
    let gguf = cli
        .gguf
        .clone()
        .unwrap_or_else(|| root.join(".cache/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"));
    for path in [&gguf, &setup.peers_dir.join("llamacpp_generate.py")] {
        if !path.exists() {
            bail!(
                "{} is missing (scripts/bench.sh fetches it; --gguf PATH, or --no-llamacpp)",
                path.display()
            );
        }
    }
    if !contenders::llamacpp_importable(&setup) {
        say(&format!(
            "llama.cpp skipped: {} cannot import llama_cpp (pip install -r bench/peers/requirements.txt)",
            setup.python.display()
        ));
        return Ok(setup);
    }
    Ok(Setup {
        gguf: Some(gguf),
        ..setup
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let setup = plan(&cli)?;
    let load_avg_start = load_avg();
    let threads = setup.threads;
    let gb = |x: f64| x / 1e9;

    let bandwidth = |threads: usize| -> anyhow::Result<f64> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args([
            "bandwidth",
            "--bytes",
            &cli.bandwidth_bytes.to_string(),
            "--threads",
            &threads.to_string(),
            "--passes",
            "5",
        ]);
        let f = child::run(&mut cmd, &setup.work.join("logs/bandwidth.stderr"))?;
        Ok(gb(f
            .stdout
            .trim()
            .parse::<f64>()
            .context("bandwidth probe printed no number")?))
    };
    say("memory read bandwidth");
    let mut samples = vec![bandwidth(threads)?];
    let single = bandwidth(1)?;

    let mut exports: Vec<Vec<_>> = vec![Vec::new(); Exporter::ALL.len()];
    for round in 0..cli.runs {
        for k in 0..Exporter::ALL.len() {
            let i = (k + round) % Exporter::ALL.len();
            let who = Exporter::ALL[i];
            say(&format!(
                "export {}/{}: {}",
                round + 1,
                cli.runs,
                who.name()
            ));
            exports[i].push(contenders::export(&setup, who, round)?);
        }
    }
    let weights = Weights {
        carrot_decoder: weights::measure(&setup.carrot_out().join("decoder.onnx"))?,
        ogenai_model: weights::measure(&setup.ogenai_out().join("model.onnx"))?,
        llamacpp_gguf: match &setup.gguf {
            Some(gguf) => Some(contenders::gguf_weights(&setup, gguf)?),
            None => None,
        },
    };

    let runtimes = setup.runtimes();
    let mut gens: Vec<Vec<_>> = vec![Vec::new(); runtimes.len()];
    for round in 0..cli.runs {
        for k in 0..runtimes.len() {
            let i = (k + round) % runtimes.len();
            let who = runtimes[i];
            say(&format!(
                "generate {}/{}: {}",
                round + 1,
                cli.runs,
                who.name()
            ));
            gens[i].push(contenders::generate(&setup, who, round)?);
        }
        say("memory read bandwidth");
        samples.push(bandwidth(threads)?);
    }
    let read_gb_s = samples.iter().copied().fold(0.0, f64::max);
    let limit_tok_s = read_gb_s * 1e9 / weights.carrot_decoder.per_token_bytes as f64;
    let gguf_label = weights
        .llamacpp_gguf
        .as_ref()
        .map_or_else(String::new, |g| format!("llama.cpp ({} GGUF)", g.file_type));
    let label = |who: Runtime| match who {
        Runtime::LlamaCpp => gguf_label.clone(),
        _ => who.name().to_string(),
    };
    let limit = |who: Runtime| match (who, &weights.llamacpp_gguf) {
        (Runtime::LlamaCpp, Some(g)) => read_gb_s * 1e9 / g.weights.per_token_bytes as f64,
        _ => limit_tok_s,
    };

    let mut scorers: Vec<Scorer> = Exporter::ALL.into_iter().map(Scorer::Export).collect();
    if setup.gguf.is_some() {
        scorers.push(Scorer::LlamaCpp);
    }
    let mut perplexity = Vec::new();
    for who in scorers {
        say(&format!("perplexity: {}", who.name()));
        perplexity.push(report::Perplexity {
            label: match who {
                Scorer::Export(e) => e.name().to_string(),
                Scorer::LlamaCpp => label(Runtime::LlamaCpp),
            },
            perplexity: contenders::perplexity(&setup, who)?,
        });
    }

    let export: Vec<ExportSummary> = Exporter::ALL
        .into_iter()
        .zip(exports)
        .map(|(w, r)| ExportSummary::new(w, r))
        .collect();
    let carrot_tokens = gens
        .first()
        .and_then(|g| g.first())
        .map(|r| r.token_ids.clone())
        .unwrap_or_default();
    let generation: Vec<GenerateSummary> = runtimes
        .into_iter()
        .zip(gens)
        .map(|(w, r)| GenerateSummary::new(w, label(w), r, limit(w), &carrot_tokens))
        .collect();
    let results = Results {
        machine: Machine {
            cpu: cpu_name(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_avg_start,
            load_avg_end: load_avg(),
            bench_peak_rss_mb: child::own_peak_rss_bytes() as f64 / 1e6,
        },
        setup: SetupInfo {
            model: setup.hf_dir.file_name().map_or_else(
                || setup.hf_dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            dtype: format!("{}, carrot flavor {}", setup.dtype, setup.flavor),
            prompt: setup.prompt.clone(),
            new_tokens: setup.new_tokens,
            threads,
            runs: cli.runs,
        },
        bandwidth: Bandwidth {
            threads,
            read_gb_s,
            single_thread_read_gb_s: single,
            samples_gb_s: samples,
        },
        weights,
        limit_tok_s,
        ratios: report::ratios(&export, &generation, &perplexity),
        perplexity,
        export,
        generation,
    };
    println!("{}", report::table(&results));
    let path = setup.work.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    say(&format!("wrote {}", path.display()));
    Ok(())
}

fn say(msg: &str) {
    eprintln!("carrot-bench: {msg}");
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
