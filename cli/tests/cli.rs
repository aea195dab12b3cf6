//! The `carrot` command line: JSON output shape, one-line errors, no panics.

use carrot_tests::workspace_root as root;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn carrot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carrot"))
}

/// carrot-tiny exported in fp32 with the Llama 3 tokenizer copied in, once per test process.
fn exported() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        carrot::demo::export_fixture(
            "carrot-tiny",
            &tmp.path().join("carrot-tiny"),
            carrot_graphs::config::DType::F32,
            carrot_graphs::llama::Logits::Last,
            false,
        )
        .expect("export carrot-tiny");
        tmp
    })
    .path()
}

fn model() -> PathBuf {
    exported().join("carrot-tiny")
}

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout must stay empty on errors");
}

#[test]
fn json_output_has_the_contract_keys_and_golden_tokens() {
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/goldens/generate.json"))
            .expect("generate.json"),
    )
    .expect("json");
    let record = &goldens["records"]["carrot_image"];
    let expected: Vec<u64> = record["output_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .arg("--image")
        .arg(root().join("fixtures/images/chelsea.png"))
        .args([
            "--prompt",
            "What is in this picture?",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ])
        .args(["--max-new-tokens", &expected.len().to_string()])
        .output()
        .expect("run carrot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one JSON object on stdout: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json object");
    for key in [
        "text",
        "token_ids",
        "prompt_tokens",
        "generated_tokens",
        "finish_reason",
        "timings",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for key in ["load_ms", "vision_ms", "prefill_ms", "decode_ms"] {
        assert!(
            v["timings"][key].as_f64().is_some(),
            "missing timings.{key} in {v}"
        );
    }
    let ids: Vec<u64> = v["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|x| x.as_u64())
        .collect();
    assert_eq!(
        ids, expected,
        "greedy tokens differ from the transformers golden"
    );
    assert_eq!(
        v["prompt_tokens"].as_u64(),
        record["num_positions"].as_u64()
    );
    assert_eq!(v["generated_tokens"].as_u64(), Some(expected.len() as u64));
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn missing_ort_library_is_one_line_naming_it() {
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .args([
            "--prompt",
            "hi",
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
        ])
        .output()
        .expect("run carrot");
    assert_one_line_error(&out, "/nonexistent/libonnxruntime.so");
}

#[test]
fn missing_model_dir_names_the_manifest() {
    let out = carrot()
        .args([
            "generate",
            "--model",
            "/nonexistent/export",
            "--prompt",
            "hi",
        ])
        .output()
        .expect("run");
    assert_one_line_error(&out, "/nonexistent/export/carrot.json");
}

#[test]
fn missing_image_names_the_file() {
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .args(["--image", "/nonexistent/cat.png", "--prompt", "hi"])
        .output()
        .expect("run");
    assert_one_line_error(&out, "/nonexistent/cat.png");
}

#[test]
fn corrupt_image_names_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bad = tmp.path().join("bad.jpg");
    std::fs::write(&bad, b"definitely not a jpeg").expect("write");
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .arg("--image")
        .arg(&bad)
        .args(["--prompt", "hi"])
        .output()
        .expect("run");
    assert_one_line_error(&out, "bad.jpg");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let long = "carrot ".repeat(3000);
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .args(["--prompt", &long, "--raw"])
        .output()
        .expect("run");
    assert_one_line_error(&out, "max_length 2048");
}

#[test]
fn unknown_device_is_refused() {
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .args(["--prompt", "hi", "--device", "gpu"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gpu"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_an_error_not_a_fallback() {
    let out = carrot()
        .args(["generate", "--model"])
        .arg(model())
        .args(["--prompt", "hi", "--device", "cuda"])
        .output()
        .expect("run");
    assert_one_line_error(&out, "--features cuda");
}

#[test]
fn chat_answers_two_turns_and_exits_on_an_empty_line() {
    use std::io::Write;
    let mut child = carrot()
        .args(["chat", "--model"])
        .arg(model())
        .arg("--image")
        .arg(root().join("fixtures/images/chelsea.png"))
        .args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn carrot chat");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"What is in this picture?\nAnd what colour is it?\n\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| !l.is_empty()).count(),
        2,
        "two answers: {stdout:?}"
    );
}

#[test]
fn demo_reproduces_the_reference_tokens() {
    let out = carrot()
        .arg("demo")
        .current_dir(root())
        .output()
        .expect("run carrot demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("exact: the 16 generated tokens equal the transformers reference"),
        "{stdout}"
    );
}

/// A CPU load beyond the memory budget is refused before any session exists, with advice;
/// within the budget, or with the check off, it loads.
#[test]
fn memory_check_refuses_a_load_beyond_the_budget() {
    use carrot_runtime::engine::{EngineError, LoadOptions};
    use carrot_runtime::memory::MemoryLimit;
    let load = |memory_limit| {
        carrot_runtime::engine::Engine::load(
            &model(),
            &LoadOptions {
                memory_limit,
                ..LoadOptions::default()
            },
        )
    };
    match load(MemoryLimit::Bytes(64 << 20)) {
        Err(EngineError::Memory(msg)) => {
            assert!(
                msg.contains("carrot-tiny") && msg.contains("--skip-memory-check"),
                "{msg}"
            );
        }
        other => panic!("expected a memory refusal, got {other:?}"),
    }
    assert!(load(MemoryLimit::Bytes(4 << 30)).is_ok());
    assert!(load(MemoryLimit::Off).is_ok());
}

/// A copy of the fixture export with `edit` applied to its manifest.
fn with_manifest(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model()).expect("export").flatten() {
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    let path = tmp.path().join("carrot.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("manifest")).expect("json");
    edit(&mut m);
    std::fs::write(&path, m.to_string()).expect("write manifest");
    tmp
}

/// Manifests the runtime cannot use are refused at load with one line naming what is wrong
/// (a zero image size, a hidden size the graphs disagree with), never a panic.
#[test]
fn unusable_manifests_are_one_line_errors() {
    let image = root().join("fixtures/images/chelsea.png");
    type Case = (fn(&mut serde_json::Value), bool, &'static str);
    let cases: [Case; 2] = [
        (
            |m| m["vision"]["image_size"] = 0.into(),
            true,
            "vision.image_size is 0",
        ),
        (
            |m| m["text"]["hidden_size"] = 64.into(),
            false,
            "text.hidden_size 64",
        ),
    ];
    for (edit, with_image, needle) in cases {
        let dir = with_manifest(edit);
        let mut cmd = carrot();
        cmd.args([
            "generate",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--model",
        ])
        .arg(dir.path());
        if with_image {
            cmd.arg("--image").arg(&image);
        }
        assert_one_line_error(&cmd.output().expect("run carrot"), needle);
    }
}

/// Every flag each `carrot` command accepts is documented in the contract's command lines or
/// notes, and in the README's (users read them there, not in `--help`).
#[test]
fn every_flag_is_documented() {
    let contract = std::fs::read_to_string(root().join("docs/contract.md")).expect("contract.md");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    for command in ["generate", "chat", "serve", "perplexity", "deploy"] {
        let out = carrot()
            .args([command, "--help"])
            .output()
            .expect("carrot runs");
        assert!(out.status.success(), "carrot {command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        // `--name` as it starts a word of the help text, whatever punctuation follows.
        let flags: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .filter(|w| *w != "--help" && *w != "--version")
            .collect();
        assert!(!flags.is_empty(), "{command}: no flags in:\n{help}");
        for flag in flags {
            for (doc, text) in [("docs/contract.md", &contract), ("README.md", &readme)] {
                assert!(
                    text.contains(flag),
                    "carrot {command} {flag} is not in {doc}"
                );
            }
        }
    }
}
