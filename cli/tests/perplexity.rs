//! `carrot perplexity` against transformers: llama-base-tiny exported in float32 scores
//! `fixtures/perplexity/text.txt` exactly as `fixtures/perplexity/make_goldens.py` did, with the
//! whole text in one window and in windows of 64, through a decoder that returns every position's
//! logits and through one that returns only the last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use carrot_graphs::config::DType;
use carrot_graphs::llama::Logits;
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::Pipeline;
use carrot_tests::workspace_root as root;
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    records: BTreeMap<String, Record>,
}

#[derive(Deserialize)]
struct Record {
    input_ids: Vec<u32>,
    contexts: BTreeMap<String, Score>,
}

#[derive(Deserialize)]
struct Score {
    perplexity: f64,
    mean_nll: f64,
    tokens: usize,
}

fn goldens() -> Goldens {
    let path = root().join("fixtures/perplexity/goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text_file() -> PathBuf {
    root().join("fixtures/perplexity/text.txt")
}

/// Float32 noise over a few hundred positions: the mean NLL agrees to far better than this.
const NLL_TOLERANCE: f64 = 1e-5;

fn export(logits: Logits, dir: &Path) -> PathBuf {
    let out = dir.join(format!("llama-base-tiny-{}", logits.manifest_name()));
    carrot::demo::export_fixture("llama-base-tiny", &out, DType::F32, logits, false)
        .unwrap_or_else(|e| panic!("exporting llama-base-tiny: {e:#}"));
    out
}

#[test]
fn fixture_perplexity_equals_transformers() {
    let goldens = goldens();
    let record = &goldens.records["llama-base-tiny"];
    let text = std::fs::read_to_string(text_file()).expect("text.txt");
    let tmp = tempfile::tempdir().expect("tempdir");
    for logits in [Logits::All, Logits::Last] {
        let dir = export(logits, tmp.path());
        let mut pipeline = Pipeline::load(&dir, &LoadOptions::default()).expect("load");
        let ids = pipeline.tokenizer.encode(&text, false).expect("tokenize");
        assert_eq!(
            ids, record.input_ids,
            "ids of text.txt (no BOS) vs the golden's"
        );
        for (context, window) in [("full", ids.len()), ("64", 64)] {
            let want = &record.contexts[context];
            let got =
                carrot_runtime::perplexity::perplexity(&mut pipeline.engine, &ids, window, |_| {})
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
            eprintln!(
                "logits {}, context {context}: perplexity {:.6} (transformers {:.6}), {} tokens in {} window(s)",
                logits.manifest_name(),
                got.perplexity,
                want.perplexity,
                got.tokens,
                got.windows
            );
            assert_eq!(got.tokens, want.tokens, "{context}: tokens scored");
            assert!(
                (got.mean_nll - want.mean_nll).abs() < NLL_TOLERANCE,
                "logits {} context {context}: mean NLL {} vs transformers {}",
                logits.manifest_name(),
                got.mean_nll,
                want.mean_nll
            );
        }
    }
}

#[test]
fn cli_prints_json_and_refuses_bad_input_in_one_line() {
    let goldens = goldens();
    let want = &goldens.records["llama-base-tiny"].contexts["64"];
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = export(Logits::All, tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_carrot"))
        .args(["perplexity", "--json", "--context", "64", "--model"])
        .arg(&dir)
        .arg("--text")
        .arg(text_file())
        .output()
        .expect("running carrot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["tokens"].as_u64(), Some(want.tokens as u64));
    assert_eq!(json["context"].as_u64(), Some(64));
    let ppl = json["perplexity"].as_f64().expect("perplexity");
    assert!(
        (ppl.ln() - want.mean_nll).abs() < NLL_TOLERANCE,
        "{ppl} vs {}",
        want.perplexity
    );

    let one_line = |args: &[&std::ffi::OsStr], needle: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_carrot"))
            .arg("perplexity")
            .args(args)
            .output()
            .expect("running carrot");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!out.status.success(), "expected a failure for {args:?}");
        assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    };
    let model = dir.as_os_str();
    one_line(
        &[
            "--model".as_ref(),
            model,
            "--text".as_ref(),
            "/nonexistent/t.txt".as_ref(),
        ],
        "--text /nonexistent/t.txt",
    );
    one_line(
        &[
            "--model".as_ref(),
            model,
            "--text".as_ref(),
            text_file().as_os_str(),
            "--context".as_ref(),
            "1".as_ref(),
        ],
        "--context 1",
    );
    let short = tmp.path().join("one-word.txt");
    std::fs::write(&short, "Hello").expect("write");
    one_line(
        &[
            "--model".as_ref(),
            model,
            "--text".as_ref(),
            short.as_os_str(),
        ],
        "at least 2",
    );
}
