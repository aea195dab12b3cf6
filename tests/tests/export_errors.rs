//! The exporter's refusals and failures leave the file system as contract.md says: an existing
//! `--out` is kept unless `--force`, a failed export leaves no `--out` and no partial sibling, and
//! the command line exits non-zero with one line on stderr naming what is at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use carrot_export::pipeline::{self, PipelineError, WeightFormat};
use carrot_graphs::config::DType;
use carrot_tests::export_util::{
    Layout, export_cli, export_to, fixture_model, int_format, read_model,
};

// ---- refusals and failures ----------------------------------------------------------------

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// Every file under `dir` with its bytes.
fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                files.insert(path.strip_prefix(dir).unwrap_or(&path).to_path_buf(), bytes);
            }
        }
    }
    files
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("creating a temporary directory: {e}"))
}

fn fp32() -> WeightFormat {
    WeightFormat::Float(DType::F32)
}

#[test]
fn existing_out_is_refused_without_force_and_left_untouched() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    existing_out(&out, b"precious", true);
    let before = snapshot_tree(&out);

    let err = export_to(Layout::TextOnly, fp32(), &out)
        .expect_err("exporting over an existing --out without --force");
    let msg = err.to_string();
    assert!(
        msg.contains("--force") && msg.contains(&out.display().to_string()),
        "message: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_eq!(snapshot_tree(&out), before, "--out was modified");
    assert_eq!(
        listing(tmp.path()),
        ["out"],
        "something was left next to --out"
    );
}

#[test]
fn force_replaces_an_existing_out() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    existing_out(&out, b"stale", true);

    let mut plan = Layout::TextOnly.plan(&out, fp32());
    plan.force = true;
    let summary = pipeline::export(&plan).unwrap_or_else(|e| panic!("--force export failed: {e}"));
    assert_eq!(summary.out, out);
    assert!(
        !out.join("keep.txt").exists(),
        "--force kept a file of the old --out"
    );
    let decoder = read_model(&out.join("decoder.onnx"));
    assert!(
        decoder.graph.is_some_and(|g| !g.node.is_empty()),
        "decoder.onnx was not replaced"
    );
    assert!(out.join("carrot.json").is_file());
    assert_eq!(
        listing(tmp.path()),
        ["out"],
        "a temporary or old sibling was left next to --out"
    );
}

/// A copy of fixture `name` in `dst` (config and support files), with its safetensors weights
/// rewritten after `edit` has changed the tensor map (`name → (dtype, shape, bytes)`).
type TensorMap = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn rewritten_copy(name: &str, dst: &Path, edit: impl FnOnce(&mut TensorMap)) -> PathBuf {
    let src = fixture_model(name);
    let dir = dst.join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let weights = src.join("model.safetensors");
    for entry in std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        if entry.path() != weights {
            std::fs::copy(entry.path(), dir.join(entry.file_name()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let bytes = std::fs::read(&weights).unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut map: TensorMap = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(k, (dtype, shape, data))| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// A copy of carrot-tiny (and siglip-tiny next to it, for `mm_vision_tower: ../siglip-tiny`) whose
/// last shard is cut in half.
fn truncated_shard_copy(dst: &Path) -> (PathBuf, PathBuf) {
    for name in ["carrot-tiny", "siglip-tiny"] {
        let dir = dst.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        for entry in std::fs::read_dir(fixture_model(name))
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
        {
            std::fs::copy(entry.path(), dir.join(entry.file_name()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let shard = dst.join("carrot-tiny/model-00003-of-00003.safetensors");
    let len = std::fs::metadata(&shard).map(|m| m.len()).unwrap_or(0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap_or_else(|e| panic!("{e}"));
    f.set_len(len / 2).unwrap_or_else(|e| panic!("{e}"));
    (dst.join("carrot-tiny"), shard)
}

/// The broken models a failed export must clean up after: (what, model dir, text the message
/// must contain).
fn broken_models(tmp: &Path) -> Vec<(&'static str, PathBuf, String)> {
    let missing = rewritten_copy("llama-base-tiny", &tmp.join("missing"), |m| {
        m.remove("model.layers.1.mlp.down_proj.weight");
    });
    // model.norm.weight is read after the embed graph and most of the decoder were written.
    let late = rewritten_copy("llama-base-tiny", &tmp.join("late"), |m| {
        let entry = m
            .get_mut("model.norm.weight")
            .unwrap_or_else(|| panic!("fixture has no model.norm.weight"));
        let n: usize = entry.1.iter().product();
        *entry = (safetensors::Dtype::I32, entry.1.clone(), vec![0u8; n * 4]);
    });
    let (truncated, shard) = truncated_shard_copy(&tmp.join("truncated"));
    vec![
        (
            "missing tensor",
            missing,
            "model.layers.1.mlp.down_proj.weight".to_string(),
        ),
        ("integer norm weight", late, "model.norm.weight".to_string()),
        (
            "truncated shard",
            truncated,
            shard
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    ]
}

#[test]
fn failed_exports_leave_no_out_and_no_partial_sibling() {
    let tmp = tempdir();
    let models = tempdir();
    for (what, model, needle) in broken_models(models.path()) {
        let out = tmp.path().join(format!("out-{}", what.replace(' ', "-")));
        let mut plan = Layout::TextOnly.plan(&out, fp32());
        plan.model = model;
        let err = pipeline::export(&plan).expect_err(what);
        let msg = err.to_string();
        assert!(
            msg.contains(&needle),
            "{what}: the message should name `{needle}`: {msg}"
        );
        assert!(!msg.contains('\n'), "{what}: one line: {msg}");
        assert!(
            !out.exists(),
            "{what}: --out {} exists after a failed export",
            out.display()
        );
        assert_eq!(
            listing(tmp.path()),
            Vec::<String>::new(),
            "{what}: files left next to --out"
        );
    }
}

/// A failure with `--force` keeps the existing `--out` as it was.
#[test]
fn failed_forced_export_keeps_the_existing_out() {
    let tmp = tempdir();
    let models = tempdir();
    let out = tmp.path().join("out");
    existing_out(&out, b"precious", false);
    let before = snapshot_tree(&out);
    for (what, model, _) in broken_models(models.path()) {
        let mut plan = Layout::TextOnly.plan(&out, fp32());
        plan.model = model;
        plan.force = true;
        pipeline::export(&plan).expect_err(what);
        assert_eq!(snapshot_tree(&out), before, "{what}: --out changed");
        assert_eq!(
            listing(tmp.path()),
            ["out"],
            "{what}: files left next to --out"
        );
    }
}

#[test]
fn vision_tower_for_a_text_only_model_is_refused() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let mut plan = Layout::TextOnly.plan(&out, fp32());
    plan.vision_tower = Some(fixture_model("siglip-tiny"));
    let err = pipeline::export(&plan).expect_err("--vision-tower on a text-only model");
    let msg = err.to_string();
    assert!(
        msg.contains("--vision-tower") && msg.contains("text-only"),
        "message: {msg}"
    );
    assert!(!out.exists());
    assert_eq!(listing(tmp.path()), Vec::<String>::new());
}

#[test]
fn block_sizes_that_are_not_powers_of_two_from_16_to_256_are_refused() {
    let tmp = tempdir();
    for (dtype, block) in [("int4", 48), ("int8", 8), ("int4", 512), ("int8", 0)] {
        let out = tmp.path().join("out");
        let plan = Layout::Merged.plan(&out, int_format(dtype, block));
        let err = pipeline::check_plan(&plan).expect_err(dtype);
        assert!(matches!(err, PipelineError::Plan(_)), "{dtype}: {err:?}");
        let msg = pipeline::export(&plan).expect_err(dtype).to_string();
        assert!(
            msg.contains(&format!("--block-size {block}")) && msg.contains("power of two"),
            "message: {msg}"
        );
        assert!(!out.exists());
        assert_eq!(listing(tmp.path()), Vec::<String>::new());
    }
}

// ---- the command line ---------------------------------------------------------------------

/// Runs `carrot-export ARGS`; fails the test when the binary cannot be found or built.
fn cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let bin = export_cli().unwrap_or_else(|why| panic!("the carrot-export binary: {why}"));
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// Exit status non-zero, exactly one line on stderr naming `needle`, no panic, nothing on stdout.
#[track_caller]
fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit status {:?}; stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "stderr should name `{needle}`: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn cli_errors_exit_nonzero_with_one_line() {
    let tmp = tempdir();
    let models = tempdir();
    let llama = fixture_model("llama-base-tiny");
    let out = tmp.path().join("out");

    let o = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--dtype"),
        os("int4"),
        os("--block-size"),
        os("100"),
        os("-q"),
    ]);
    assert_one_line_error(&o, "--block-size 100");
    assert!(!out.exists());

    let o = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--block-size"),
        os("64"),
        os("-q"),
    ]);
    assert_one_line_error(&o, "--block-size applies to --dtype int4 and int8");
    assert!(!out.exists());

    let tower = fixture_model("siglip-tiny");
    let o = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--vision-tower"),
        tower.as_os_str(),
        os("-q"),
    ]);
    assert_one_line_error(&o, "--vision-tower");
    assert!(!out.exists());

    for (what, model, needle) in broken_models(models.path()) {
        let o = cli(&[
            os("--model"),
            model.as_os_str(),
            os("--out"),
            out.as_os_str(),
            os("--dtype"),
            os("fp32"),
            os("-q"),
        ]);
        assert_one_line_error(&o, &needle);
        assert!(!out.exists(), "{what}: --out exists");
        assert_eq!(
            listing(tmp.path()),
            Vec::<String>::new(),
            "{what}: files left next to --out"
        );
    }

    existing_out(&out, b"precious", false);
    let o = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--dtype"),
        os("fp32"),
        os("-q"),
    ]);
    assert_one_line_error(&o, "--force");
    assert_eq!(listing(&out), ["keep.txt"]);
}

#[test]
fn cli_exports_and_replaces_with_force() {
    let tmp = tempdir();
    let llama = fixture_model("llama-base-tiny");
    let out = tmp.path().join("out");
    existing_out(&out, b"old", false);
    let o = cli(&[
        os("--model"),
        llama.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--dtype"),
        os("fp16"),
        os("--force"),
        os("-q"),
    ]);
    assert!(
        o.status.success(),
        "carrot-export failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!out.join("keep.txt").exists());
    for file in [
        "carrot.json",
        "embed.onnx",
        "decoder.onnx",
        "decoder.onnx.data",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let manifest = carrot_contract::Manifest::read_dir(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (manifest.dtype.as_str(), manifest.activation_dtype.as_str()),
        ("fp16", "float16")
    );
    assert!(manifest.vision.is_none());
    assert_eq!(listing(tmp.path()), ["out"]);
}

/// Make `out` an existing directory holding `keep.txt` (with `content`) and, with `graph`, a
/// bogus `decoder.onnx`: what an earlier export or the user left there.
fn existing_out(out: &Path, content: &[u8], graph: bool) {
    std::fs::create_dir(out).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out.join("keep.txt"), content).unwrap_or_else(|e| panic!("{e}"));
    if graph {
        std::fs::write(out.join("decoder.onnx"), b"not a graph").unwrap_or_else(|e| panic!("{e}"));
    }
}
