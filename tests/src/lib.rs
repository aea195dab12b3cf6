//! Shared helpers for the end-to-end tests.

pub mod export_util;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Loads ONNX Runtime once per test process and returns its environment (every `ort` session
/// is built from one: `Session::builder(init_ort()?)`).
///
/// The library is found as the runtime finds it (`carrot_runtime::ort_lib`): `CARROT_ORT_LIB`,
/// `ORT_DYLIB_PATH`, the project cache filled by `scripts/setup.sh`, a Python `onnxruntime`.
pub fn init_ort() -> anyhow::Result<&'static ort::environment::Environment> {
    carrot_runtime::ort_lib::init(None)?;
    carrot_runtime::ort_lib::environment()
        .ok_or_else(|| anyhow::anyhow!("ONNX Runtime environment missing after init"))
}

/// Runs `onnx.checker.check_model(path, full_check=True)` on each file (through
/// `tests/python/check_model.py`) and panics with the checker's message if one fails.
///
/// The interpreter is `$CARROT_PYTHON` (default `python3`) and must have `onnx==1.23.2`. With
/// `CARROT_SKIP_PYTHON=1` the check is skipped with a note on stderr.
pub fn check_onnx(paths: &[&Path]) {
    let args: Vec<&std::ffi::OsStr> = paths.iter().map(|p| p.as_os_str()).collect();
    if let Err(msg) = python_check("onnx", "check_model.py", &args) {
        panic!("ONNX checker rejected {paths:?}:\n{msg}");
    }
}

/// Validates each `carrot.json` against `docs/carrot.schema.json` (through
/// `tests/python/check_manifest.py`, `jsonschema` from `tests/python/requirements.txt`); `Err`
/// holds every violation, one per line.
pub fn check_manifest_schema(paths: &[&Path]) -> Result<(), String> {
    let schema = workspace_root().join("docs/carrot.schema.json");
    let mut args: Vec<&std::ffi::OsStr> = vec![schema.as_os_str()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    python_check("jsonschema", "check_manifest.py", &args)
}

/// Runs a bfloat16 carrot-tiny export (`--logits all`) through ONNX's reference evaluator and
/// compares embed, vision and decoder with the bfloat16 transformers goldens
/// (`tests/python/bf16_reference.py`); `Err` holds the script's report.
pub fn check_bf16_reference(export: &Path) -> Result<(), String> {
    let goldens = workspace_root().join("fixtures/goldens");
    python_check(
        "ml_dtypes",
        "bf16_reference.py",
        &[export.as_os_str(), goldens.as_os_str()],
    )
}

/// Runs `tests/python/SCRIPT ARGS` (see [`run_python_script`]); `Err` holds the script's output
/// when it fails; `CARROT_SKIP_PYTHON=1` skips the check with a note.
fn python_check(module: &str, script: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    match run_python_script(module, script, args) {
        Some(result) => result.map(|_| ()),
        None => Ok(()),
    }
}

/// `$CARROT_PYTHON` (default `python3`) when it can import `modules` (Python's `import` list, e.g.
/// `"onnxruntime, numpy"`); `None`, with a note naming `what`, when `CARROT_SKIP_PYTHON=1`.
/// Panics with advice when the interpreter lacks a module: a test must not pass by skipping.
pub fn python_with(modules: &str, what: &str) -> Option<PathBuf> {
    if std::env::var("CARROT_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("skipping {what}: CARROT_SKIP_PYTHON=1");
        return None;
    }
    let python = std::env::var_os("CARROT_PYTHON")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return Some(python),
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_owned(),
        Err(e) => e.to_string(),
    };
    panic!(
        "{what} needs Python with {modules} (tests/python/requirements.txt), but `{} -c \"import \
         {modules}\"` failed ({why}); run the setup in `.ci/run` (scripts/test.sh makes .venv-test) \
         or set CARROT_PYTHON to such an interpreter (CARROT_SKIP_PYTHON=1 skips this check)",
        python.display()
    );
}

/// Runs `tests/python/SCRIPT ARGS` with [`python_with`]`(modules, SCRIPT)`: `Ok(stdout)` when it
/// succeeds, `Err(stdout + stderr)` when it fails, `None` when Python is skipped.
pub fn run_python_script(
    modules: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> Option<Result<String, String>> {
    let python = python_with(modules, script)?;
    let path = workspace_root().join("tests/python").join(script);
    let out = Command::new(&python)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    })
}

/// `examples/python/carrot_host.py --model MODEL --prompt PROMPT --max-new-tokens N --json
/// [--image IMAGE]` under `python`: the JSON object it prints. Panics with its stderr when it fails.
pub fn run_python_host(
    python: &Path,
    model: &Path,
    prompt: &str,
    max_new_tokens: usize,
    image: Option<&Path>,
) -> serde_json::Value {
    let script = workspace_root().join("examples/python/carrot_host.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--model")
        .arg(model)
        .args(["--prompt", prompt])
        .args(["--max-new-tokens", &max_new_tokens.to_string(), "--json"]);
    if let Some(image) = image {
        cmd.arg("--image").arg(image);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}); it needs tests/python/requirements.txt in {}:\n{stderr}",
        script.display(),
        out.status,
        python.display()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("host output is not the JSON object ({e}):\n{stdout}\n{stderr}"))
}

/// How far `actual` is from `expected` under `|a - e| <= atol + rtol * |e|`.
#[derive(Debug, Clone, PartialEq)]
pub struct Closeness {
    pub max_abs_error: f32,
    /// Elements outside the tolerance (a length mismatch counts every element).
    pub mismatches: usize,
    /// Index of the first element outside the tolerance.
    pub first_mismatch: Option<usize>,
    pub len: usize,
}

/// Compares two flat f32 slices element by element (NaN never matches).
pub fn allclose(actual: &[f32], expected: &[f32], atol: f32, rtol: f32) -> Closeness {
    let mut c = Closeness {
        max_abs_error: 0.0,
        mismatches: 0,
        first_mismatch: None,
        len: expected.len(),
    };
    if actual.len() != expected.len() {
        c.mismatches = actual.len().max(expected.len());
        c.first_mismatch = Some(actual.len().min(expected.len()));
        c.max_abs_error = f32::INFINITY;
        return c;
    }
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        c.max_abs_error = if err.is_nan() || c.max_abs_error.is_nan() {
            f32::NAN
        } else {
            c.max_abs_error.max(err)
        };
        if err.is_nan() || err > atol + rtol * e.abs() {
            c.mismatches += 1;
            c.first_mismatch.get_or_insert(i);
        }
    }
    c
}

/// Panics with the max error, the mismatch count and the first mismatching element unless
/// `actual` is within `atol + rtol * |expected|` of `expected` everywhere.
#[track_caller]
pub fn assert_allclose(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    if let Err(message) = export_util::allclose(what, actual, expected, atol, rtol) {
        panic!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allclose_reports_count_max_error_and_first_index() {
        let c = allclose(&[1.0, 2.5, 3.0, 9.0], &[1.0, 2.0, 3.0, 4.0], 1e-3, 1e-3);
        assert_eq!(
            (c.mismatches, c.first_mismatch, c.max_abs_error),
            (2, Some(1), 5.0)
        );
        assert_eq!(
            allclose(&[1.0, 2.0], &[1.0, 2.0001], 1e-3, 0.0).mismatches,
            0
        );
        assert_eq!(allclose(&[f32::NAN], &[1.0], 1.0, 1.0).mismatches, 1);
        assert_eq!(
            allclose(&[1.0], &[1.0, 2.0], 1.0, 1.0).first_mismatch,
            Some(1)
        );
    }
}
