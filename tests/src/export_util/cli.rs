//! Finding (and, when stale, building) the `carrot-export` binary for command-line tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::workspace_root;

/// The `carrot-export` binary of this build (`target/<profile>/carrot-export`, or
/// `$CARROT_EXPORT_BIN`), built with `$CARGO build -p carrot-export` once per process when it is
/// missing or older than the sources it is built from, so a stale binary is never tested.
///
/// `Err` (the reason to skip) only when it cannot be built because the tests do not run under
/// cargo; panics when the build fails.
pub fn export_cli() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(locate_or_build_cli).clone()
}

fn locate_or_build_cli() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CARROT_EXPORT_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the test executable: {e}"))?;
    // target/<profile>/deps/export_layouts-HASH → target/<profile>/carrot-export
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join(format!("carrot-export{}", std::env::consts::EXE_SUFFIX));
    let stale = match cli_staleness(&bin) {
        None => return Ok(bin),
        Some(why) => why,
    };
    let cargo = std::env::var_os("CARGO")
        .ok_or_else(|| format!("{stale}, and $CARGO is not set to rebuild it"))?;
    let mut cmd = std::process::Command::new(&cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "carrot-export",
        "--bin",
        "carrot-export",
    ])
    .current_dir(workspace_root());
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => {}
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", Path::new(&cargo).display()));
    if !out.status.success() {
        panic!(
            "building carrot-export ({stale}) failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    match cli_staleness(&bin) {
        None => Ok(bin),
        Some(why) => panic!("after `cargo build -p carrot-export`: {why}"),
    }
}

/// Why `bin` cannot be used as it is (missing, or older than a source file), if so.
fn cli_staleness(bin: &Path) -> Option<String> {
    let built = match std::fs::metadata(bin).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) => return Some(format!("{}: {e}", bin.display())),
    };
    let root = workspace_root();
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for dir in ["export/src", "graphs/src", "contract/src"] {
        newest_file(&root.join(dir), &mut newest);
    }
    for file in [
        "Cargo.lock",
        "Cargo.toml",
        "export/Cargo.toml",
        "graphs/Cargo.toml",
        "contract/Cargo.toml",
    ] {
        let path = root.join(file);
        if let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    match newest {
        Some((modified, path)) if modified > built => Some(format!(
            "{} is older than {}",
            bin.display(),
            path.display()
        )),
        _ => None,
    }
}

fn newest_file(dir: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            newest_file(&path, newest);
        } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            *newest = Some((modified, path));
        }
    }
}
