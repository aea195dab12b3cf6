//! `carrot`: run Carrot's exported graphs.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carrot_runtime::device::Device;
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::generate::Event;
use carrot_runtime::pipeline::{ImageSource, Params, Pipeline, Prompt};
use carrot_runtime::prompt::Turn;
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "carrot",
    version,
    about = "Run Carrot vision-language models exported by carrot-export"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer one prompt (optionally about an image).
    Generate(GenerateArgs),
    /// Talk with the model; the image (if any) belongs to the first turn.
    Chat(ChatArgs),
    /// Perplexity of the model on a text file (tokenized as it is: no BOS, no template).
    Perplexity(PerplexityArgs),
    /// Export the shipped fixture model, answer a question about a photo, check against the reference.
    Demo(RuntimeArgs),
    /// Write container files and KServe / Kubernetes resources for serving an export.
    Deploy(carrot::deploy::DeployArgs),
    /// Serve the OpenAI chat-completions API (POST /v1/chat/completions, GET /health).
    Serve {
        #[command(flatten)]
        serve: carrot::serve::ServeArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

#[derive(Args, Debug, Clone)]
struct RuntimeArgs {
    /// cpu, cuda[:N], tensorrt[:N] or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Path to libonnxruntime.so (else CARROT_ORT_LIB, ORT_DYLIB_PATH, .cache/, Python onnxruntime).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// Intra-op threads per session.
    #[arg(long)]
    threads: Option<usize>,
    /// Load even when the CPU memory estimate exceeds the memory available.
    #[arg(long)]
    skip_memory_check: bool,
}

impl RuntimeArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            threads: self.threads,
            ort_lib: self.ort_lib.clone(),
            cache_dir: None,
            memory_limit: if self.skip_memory_check {
                carrot_runtime::memory::MemoryLimit::Off
            } else {
                carrot_runtime::memory::MemoryLimit::Available
            },
            parallel_prepack: None,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// Most new tokens (default: the manifest's sampling_defaults).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> Params {
        Params {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            prefill_chunk: None,
        }
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Exported directory (carrot.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Image file (JPEG, PNG, WebP); repeat for several images.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Send the prompt text as it is (no template).
    #[arg(long)]
    raw: bool,
    /// Print one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
struct PerplexityArgs {
    /// Exported directory (carrot.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// UTF-8 text file, scored as it is.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Positions per window (default: the manifest's prompt.max_length).
    #[arg(long, value_name = "N")]
    context: Option<usize>,
    /// Print {"perplexity", "tokens", "mean_nll", "windows", "context"} on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
struct ChatArgs {
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Diagnostics go through `tracing` to stderr; `CARROT_LOG` (e.g. `debug`, `carrot_runtime=trace`)
/// sets the filter, `info` by default. Program output (answers, tables, JSON) stays on stdout.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARROT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Demo(args) => carrot::demo::run(&args.load_options()).map(|_| ()),
        Command::Deploy(args) => carrot::deploy::run(&args),
        Command::Serve { serve, runtime } => carrot::serve::run(&serve, &runtime.load_options()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", carrot_export::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn load(model: &std::path::Path, runtime: &RuntimeArgs) -> anyhow::Result<Pipeline> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {} on {}", model.display(), runtime.device));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let pipeline = Pipeline::load(model, &runtime.load_options());
    spinner.finish_and_clear();
    pipeline.with_context(|| format!("loading {}", model.display()))
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let mut pipeline = load(&args.model, &args.runtime)?;
    let images: Vec<ImageSource> = args.images.iter().cloned().map(ImageSource::Path).collect();
    let prompt = Prompt::Text {
        text: args.prompt.clone(),
        raw: args.raw,
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let answer = pipeline.generate(&prompt, &images, &args.sampling.params(), |event| {
        if let (true, Event::Token { text_delta, .. }) = (stream, &event) {
            let _ = stdout.write_all(text_delta.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let out = &answer.output;
    if args.json {
        let json = serde_json::json!({
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_tokens": out.prompt_tokens,
            "generated_tokens": out.token_ids.len(),
            "finish_reason": out.finish_reason.as_str(),
            "timings": {
                "load_ms": pipeline.engine.load_ms,
                "vision_ms": answer.vision_ms,
                "prefill_ms": out.timings.prefill_ms,
                "decode_ms": out.timings.decode_ms,
            },
        });
        println!("{json}");
    } else {
        println!();
        let t = out.timings;
        eprintln!(
            "[{} prompt positions, {} tokens, {}; prefill {:.1} ms, decode {:.1} ms]",
            out.prompt_tokens,
            out.token_ids.len(),
            out.finish_reason,
            t.prefill_ms,
            t.decode_ms
        );
    }
    Ok(())
}

fn perplexity(args: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("--text {}", args.text.display()))?;
    let mut pipeline = load(&args.model, &args.runtime)?;
    let ids = pipeline
        .tokenizer
        .encode(&text, false)
        .with_context(|| format!("tokenizing {}", args.text.display()))?;
    let manifest = &pipeline.engine.manifest;
    let context = args.context.unwrap_or(manifest.prompt.max_length);
    if manifest.logits != "all" {
        tracing::warn!(
            "{} returns logits for the last position only: scoring one token per step \
             (export with --logits all to score a window per step)",
            args.model.display()
        );
    }
    let bar = indicatif::ProgressBar::new(ids.len().saturating_sub(1) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} scoring [{bar:30}] {pos}/{len} tokens {per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = carrot_runtime::perplexity::perplexity(&mut pipeline.engine, &ids, context, |n| {
        bar.set_position(n as u64)
    })
    .with_context(|| format!("scoring {}", args.text.display()));
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        let json = serde_json::json!({
            "perplexity": report.perplexity,
            "tokens": report.tokens,
            "mean_nll": report.mean_nll,
            "windows": report.windows,
            "context": context,
        });
        println!("{json}");
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} window(s) of at most {context} positions)",
            report.perplexity, report.tokens, report.windows
        );
    }
    Ok(())
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut pipeline = load(&args.model, &args.runtime)?;
    let images: Vec<ImageSource> = args.image.iter().cloned().map(ImageSource::Path).collect();
    // The image is encoded once; each turn prefills only what the cache does not hold yet.
    let mut conversation = pipeline.conversation(&images)?;
    let mut turns: Vec<Turn> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        args.model.display()
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        turns.push(Turn {
            user: line.trim_end().to_string(),
            assistant: None,
        });
        let prompt = Prompt::Conversation(turns.clone());
        let ids = pipeline.prompt_ids(&prompt, images.len())?;
        let answer = pipeline.continue_conversation(
            &mut conversation,
            &ids,
            &args.sampling.params(),
            |event| {
                if let Event::Token { text_delta, .. } = &event {
                    let _ = stdout.write_all(text_delta.as_bytes());
                    let _ = stdout.flush();
                }
            },
        )?;
        println!();
        if let Some(last) = turns.last_mut() {
            last.assistant = Some(answer.output.text.trim().to_string());
        }
    }
    Ok(())
}
