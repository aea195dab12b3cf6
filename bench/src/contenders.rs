//! The commands each contender runs, and the parsing of what they print.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::child::{self, Finished};
use crate::weights::GraphWeights;

/// Everything the commands need, resolved and checked before anything runs.
#[derive(Debug, Clone)]
pub struct Setup {
    pub hf_dir: PathBuf,
    pub work: PathBuf,
    pub python: PathBuf,
    pub bin_dir: PathBuf,
    pub peers_dir: PathBuf,
    pub prompt: String,
    pub new_tokens: usize,
    pub threads: usize,
    /// `fp32`, `int8` or `int4`, for both exporters.
    pub dtype: String,
    /// Quantization block size (int8/int4).
    pub block_size: usize,
    /// carrot-export's `--flavor`.
    pub flavor: String,
    /// The text every runtime scores for perplexity.
    pub text: PathBuf,
    /// The model as a GGUF for llama.cpp; `None` when llama.cpp is skipped.
    pub gguf: Option<PathBuf>,
}

impl Setup {
    pub fn carrot_out(&self) -> PathBuf {
        self.work
            .join(format!("carrot-{}-{}", self.dtype, self.flavor))
    }

    pub fn ogenai_out(&self) -> PathBuf {
        self.work.join(format!("ogenai-{}", self.dtype))
    }

    fn quantized(&self) -> bool {
        self.dtype != "fp32"
    }

    fn log(&self, name: &str) -> PathBuf {
        self.work.join("logs").join(format!("{name}.stderr"))
    }

    /// The runtimes that generate: all of them, less llama.cpp when it is skipped.
    pub fn runtimes(&self) -> Vec<Runtime> {
        Runtime::ALL
            .into_iter()
            .filter(|&r| r != Runtime::LlamaCpp || self.gguf.is_some())
            .collect()
    }

    /// A command with the thread count pinned for every library that reads it from the environment.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        let n = self.threads.to_string();
        cmd.env("OMP_NUM_THREADS", &n)
            .env("MKL_NUM_THREADS", &n)
            .env("TOKENIZERS_PARALLELISM", "false")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1");
        cmd
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Exporter {
    #[serde(rename = "carrot-export")]
    Carrot,
    #[serde(rename = "onnxruntime-genai builder")]
    OgenaiBuilder,
}

impl Exporter {
    pub const ALL: [Exporter; 2] = [Exporter::Carrot, Exporter::OgenaiBuilder];

    pub fn name(self) -> &'static str {
        match self {
            Exporter::Carrot => "carrot-export",
            Exporter::OgenaiBuilder => "onnxruntime-genai builder",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportRun {
    pub wall_s: f64,
    pub peak_rss_mb: f64,
}

/// Export in the setup's dtype into a fresh output directory.
pub fn export(s: &Setup, who: Exporter, round: usize) -> anyhow::Result<ExportRun> {
    let (out, mut cmd, log) = match who {
        Exporter::Carrot => {
            let out = s.carrot_out();
            let mut cmd = s.command(&s.bin_dir.join("carrot-export"));
            cmd.arg("--model").arg(&s.hf_dir).arg("--out").arg(&out);
            cmd.args([
                "--dtype", &s.dtype, "--flavor", &s.flavor, "--logits", "last", "-q",
            ]);
            if s.quantized() {
                cmd.args(["--block-size", &s.block_size.to_string()]);
            }
            (out, cmd, s.log(&format!("export-carrot-{round}")))
        }
        Exporter::OgenaiBuilder => {
            let out = s.ogenai_out();
            let cache = s.work.join("ogenai-cache");
            remove_dir(&cache)?;
            let mut cmd = s.command(&s.python);
            cmd.args(["-m", "onnxruntime_genai.models.builder", "-i"])
                .arg(&s.hf_dir);
            cmd.arg("-o")
                .arg(&out)
                .args(["-p", &s.dtype, "-e", "cpu", "-c"])
                .arg(&cache);
            if s.quantized() {
                cmd.args(["--extra_options", &format!("block_size={}", s.block_size)]);
            }
            (out, cmd, s.log(&format!("export-ogenai-{round}")))
        }
    };
    remove_dir(&out)?;
    let f = child::run(&mut cmd, &log)?;
    Ok(ExportRun {
        wall_s: f.wall_s,
        peak_rss_mb: mb(f.peak_rss_bytes),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Runtime {
    #[serde(rename = "carrot")]
    Carrot,
    #[serde(rename = "onnxruntime-genai")]
    Ogenai,
    #[serde(rename = "transformers")]
    Transformers,
    /// llama.cpp (llama-cpp-python) on the GGUF as shipped, in its own quantization.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
}

impl Runtime {
    pub const ALL: [Runtime; 4] = [
        Runtime::Carrot,
        Runtime::Ogenai,
        Runtime::Transformers,
        Runtime::LlamaCpp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Carrot => "carrot",
            Runtime::Ogenai => "onnxruntime-genai",
            Runtime::Transformers => "transformers",
            Runtime::LlamaCpp => "llama.cpp",
        }
    }
}

/// Whether `import llama_cpp` works in the setup's Python.
pub fn llamacpp_importable(s: &Setup) -> bool {
    let mut cmd = s.command(&s.python);
    cmd.args(["-c", "import llama_cpp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().is_ok_and(|st| st.success())
}

/// What the GGUF holds: its file type (`Q4_1`, ...) and the weight bytes llama.cpp reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GgufWeights {
    pub file_type: String,
    #[serde(flatten)]
    pub weights: GraphWeights,
}

/// Read the GGUF's tensor table (with the `gguf` package, in a child).
pub fn gguf_weights(s: &Setup, gguf: &Path) -> anyhow::Result<GgufWeights> {
    let mut cmd = s.command(&s.python);
    cmd.arg(s.peers_dir.join("llamacpp_generate.py"))
        .arg("--model")
        .arg(gguf)
        .arg("--weights");
    let f = child::run(&mut cmd, &s.log("weights-gguf"))?;
    let line = json_line(&f).context("llamacpp_generate.py --weights printed no JSON")?;
    serde_json::from_str(line).with_context(|| format!("reading the GGUF's weights from {line}"))
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateRun {
    pub load_ms: f64,
    /// Time to the first new token: the prompt through the model and the first pick.
    pub prefill_ms: f64,
    /// The remaining `generated_tokens - 1` steps.
    pub decode_ms: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub token_ids: Vec<u64>,
    pub wall_s: f64,
    pub peak_rss_mb: f64,
}

/// One greedy generation of `new_tokens` tokens past EOS in a fresh process.
pub fn generate(s: &Setup, who: Runtime, round: usize) -> anyhow::Result<GenerateRun> {
    let n = s.new_tokens.to_string();
    let threads = s.threads.to_string();
    let mut cmd = match who {
        Runtime::Carrot => {
            let mut cmd = s.command(&s.bin_dir.join("carrot"));
            cmd.arg("generate")
                .arg("--model")
                .arg(s.carrot_out())
                .arg("--prompt")
                .arg(&s.prompt);
            cmd.args([
                "--max-new-tokens",
                &n,
                "--temperature",
                "0",
                "--ignore-eos",
                "--json",
                "--threads",
                &threads,
            ]);
            cmd
        }
        Runtime::Ogenai | Runtime::Transformers | Runtime::LlamaCpp => {
            let (script, model) = match who {
                Runtime::Ogenai => ("ogenai_generate.py", s.ogenai_out()),
                Runtime::Transformers => ("hf_generate.py", s.hf_dir.clone()),
                _ => (
                    "llamacpp_generate.py",
                    s.gguf.clone().context("llama.cpp runs without a GGUF")?,
                ),
            };
            let mut cmd = s.command(&s.python);
            cmd.arg(s.peers_dir.join(script)).arg("--model").arg(model);
            cmd.arg("--prompt").arg(&s.prompt).args([
                "--max-new-tokens",
                &n,
                "--threads",
                &threads,
            ]);
            cmd
        }
    };
    let f = child::run(
        &mut cmd,
        &s.log(&format!("generate-{}-{round}", who.name())),
    )?;
    parse_generate(who, &f)
        .with_context(|| format!("{} printed no usable JSON: {}", who.name(), f.stdout.trim()))
}

/// Who scores the perplexity text: an exporter's output in its own runtime, or llama.cpp on the
/// GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scorer {
    Export(Exporter),
    LlamaCpp,
}

impl Scorer {
    pub fn name(self) -> &'static str {
        match self {
            Scorer::Export(e) => e.name(),
            Scorer::LlamaCpp => Runtime::LlamaCpp.name(),
        }
    }
}

/// Perplexity on the setup's text, the whole text in one window.
pub fn perplexity(s: &Setup, who: Scorer) -> anyhow::Result<f64> {
    let threads = s.threads.to_string();
    let mut cmd = match who {
        Scorer::Export(Exporter::Carrot) => {
            let mut cmd = s.command(&s.bin_dir.join("carrot"));
            cmd.arg("perplexity")
                .arg("--model")
                .arg(s.carrot_out())
                .arg("--text")
                .arg(&s.text)
                .args(["--context", "1000000", "--json", "--threads", &threads]);
            cmd
        }
        Scorer::Export(Exporter::OgenaiBuilder) => {
            let mut cmd = s.command(&s.python);
            cmd.arg(s.peers_dir.join("ogenai_perplexity.py"))
                .arg("--model")
                .arg(s.ogenai_out())
                .arg("--text")
                .arg(&s.text)
                .args(["--context", "full", "--json", "--threads", &threads]);
            cmd
        }
        Scorer::LlamaCpp => {
            let mut cmd = s.command(&s.python);
            cmd.arg(s.peers_dir.join("llamacpp_generate.py"))
                .arg("--model")
                .arg(s.gguf.as_ref().context("llama.cpp runs without a GGUF")?)
                .arg("--perplexity")
                .arg(&s.text)
                .args(["--threads", &threads]);
            cmd
        }
    };
    let f = child::run(&mut cmd, &s.log(&format!("perplexity-{}", who.name())))?;
    let line = json_line(&f).with_context(|| format!("{} printed no JSON", who.name()))?;
    let v: Value = serde_json::from_str(line)?;
    v.get("perplexity")
        .and_then(Value::as_f64)
        .with_context(|| format!("{} printed no perplexity: {line}", who.name()))
}

/// The last line of the child's stdout that holds a JSON object.
fn json_line(f: &Finished) -> Option<&str> {
    f.stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
}

fn parse_generate(who: Runtime, f: &Finished) -> anyhow::Result<GenerateRun> {
    let line = json_line(f).context("no JSON line")?;
    let v: Value = serde_json::from_str(line)?;
    let timings = if who == Runtime::Carrot {
        v.get("timings").context("no timings")?
    } else {
        &v
    };
    let num = |obj: &Value, key: &str| {
        obj.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("no {key}"))
    };
    let count = |key: &str| {
        v.get(key)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .with_context(|| format!("no {key}"))
    };
    let token_ids: Vec<u64> = v
        .get("token_ids")
        .and_then(Value::as_array)
        .context("no token_ids")?
        .iter()
        .map(|t| t.as_u64().context("token id is not an integer"))
        .collect::<anyhow::Result<_>>()?;
    let generated_tokens = count("generated_tokens")?;
    let decode_ms = num(timings, "decode_ms")?;
    Ok(GenerateRun {
        load_ms: num(timings, "load_ms")?,
        prefill_ms: num(timings, "prefill_ms")?,
        decode_ms,
        decode_tok_s: generated_tokens.saturating_sub(1) as f64 / (decode_ms / 1e3),
        prompt_tokens: count("prompt_tokens")?,
        generated_tokens,
        token_ids,
        wall_s: f.wall_s,
        peak_rss_mb: mb(f.peak_rss_bytes),
    })
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
