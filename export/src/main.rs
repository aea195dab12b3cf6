//! `carrot-export`: Hugging Face checkpoint in, ONNX graphs out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carrot_export::pipeline::{self, ExportPlan, WeightFormat};
use carrot_graphs::llama::Logits;
use clap::Parser;

/// Export a Carrot/Bunny vision-language checkpoint (or a plain Llama) to ONNX graphs.
#[derive(Parser, Debug)]
#[command(name = "carrot-export", version, about)]
struct Cli {
    /// Hugging Face model directory: merged Carrot/Bunny checkpoint, Bunny LoRA output, or plain Llama.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output directory (written to a temporary sibling, renamed at the end).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Base LLM directory for a LoRA output directory.
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// Extra PEFT LoRA adapter directories, merged in order.
    #[arg(long = "lora", value_name = "DIR")]
    loras: Vec<PathBuf>,
    /// Local SigLIP directory (overrides the configured vision tower).
    #[arg(long, value_name = "DIR")]
    vision_tower: Option<PathBuf>,
    /// Weight format.
    #[arg(long, default_value = "fp16", value_parser = ["fp32", "fp16", "bf16", "int4", "int8"])]
    dtype: String,
    /// Quantization block: consecutive input features sharing one scale and zero point
    /// (int4/int8 only; a power of two from 16 to 256).
    #[arg(long, value_name = "N")]
    block_size: Option<usize>,
    /// Graph flavor.
    #[arg(long, default_value = "portable", value_parser = ["portable", "ort"])]
    flavor: String,
    /// Logits for only the last position (`last`, what generation needs) or for every position (`all`).
    #[arg(long, default_value = "last", value_parser = ["all", "last"])]
    logits: String,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C: leave no partial output behind.
    let _ = ctrlc::set_handler(|| {
        pipeline::remove_partial_output();
        eprintln!("error: interrupted; no output written");
        std::process::exit(130);
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", carrot_export::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut format =
        WeightFormat::parse(&cli.dtype).with_context(|| format!("--dtype {}", cli.dtype))?;
    if let Some(bs) = cli.block_size {
        if format.quant().is_none() {
            anyhow::bail!(
                "--block-size applies to --dtype int4 and int8, not {}",
                cli.dtype
            );
        }
        format = format.with_block_size(bs);
    }
    let plan = ExportPlan {
        base: cli.base,
        loras: cli.loras,
        vision_tower: cli.vision_tower,
        flavor: cli.flavor,
        logits: if cli.logits == "last" {
            Logits::Last
        } else {
            Logits::All
        },
        force: cli.force,
        progress: !cli.quiet,
        ..ExportPlan::new(cli.model, cli.out, format)
    };
    let summary = pipeline::export(&plan)?;
    eprintln!(
        "exported {} ({}, {}) to {} in {:.1} s, {} tensors",
        if summary.multimodal {
            "vision + embed + decoder"
        } else {
            "embed + decoder"
        },
        summary.dtype,
        plan.flavor,
        summary.out.display(),
        summary.seconds,
        summary.tensors
    );
    for (file, bytes) in &summary.files {
        eprintln!(
            "  {file:<28} {:>12}",
            indicatif::HumanBytes(*bytes).to_string()
        );
    }
    Ok(())
}
