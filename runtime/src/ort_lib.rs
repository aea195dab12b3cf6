//! Finding and loading the ONNX Runtime shared library.
//!
//! Carrot links ONNX Runtime dynamically (`ort`'s `load-dynamic`), so a build never downloads
//! anything. At run time the library is taken from, in order:
//! 1. an explicit path (`--ort-lib`), then the `CARROT_ORT_LIB` and `ORT_DYLIB_PATH` variables;
//! 2. the project-local cache filled by `scripts/setup.sh` from the pinned `onnxruntime==1.31.1`
//!    wheel (`$CARROT_CACHE`, else `.cache/` in the current directory or any parent, else next to
//!    the executable's workspace, else the source tree this crate was built from);
//! 3. an installed Python `onnxruntime` package (`python3 -c "import onnxruntime"`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The ONNX Runtime release Carrot is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

const LIB_NAME: &str = "libonnxruntime.so.1.31.1";

#[derive(thiserror::Error, Debug, Clone)]
pub enum OrtLibError {
    #[error(
        "ONNX Runtime library not found: run `scripts/setup.sh` to fetch onnxruntime=={ORT_VERSION} into .cache/, \
         or point --ort-lib / CARROT_ORT_LIB at libonnxruntime.so"
    )]
    NotFound,
    #[error("ONNX Runtime library {path} (from {origin}) does not exist")]
    Missing { path: PathBuf, origin: &'static str },
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

/// Where a library path came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    pub origin: &'static str,
}

/// Find the library without loading it.
pub fn locate(explicit: Option<&Path>) -> Result<Located, OrtLibError> {
    let explicit_candidates = [
        (explicit.map(Path::to_path_buf), "--ort-lib"),
        (env_path("CARROT_ORT_LIB"), "CARROT_ORT_LIB"),
        (env_path("ORT_DYLIB_PATH"), "ORT_DYLIB_PATH"),
    ];
    for (path, origin) in explicit_candidates {
        if let Some(path) = path {
            if path.is_file() {
                return Ok(Located { path, origin });
            }
            return Err(OrtLibError::Missing { path, origin });
        }
    }
    for dir in cache_dirs() {
        let path = dir.join("onnxruntime").join(ORT_VERSION).join(LIB_NAME);
        if path.is_file() {
            return Ok(Located {
                path,
                origin: "project cache",
            });
        }
    }
    if let Some(path) = python_package_lib() {
        return Ok(Located {
            path,
            origin: "Python onnxruntime package",
        });
    }
    Err(OrtLibError::NotFound)
}

/// Candidate `.cache` directories, most specific first.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = env_path("CARROT_CACHE") {
        dirs.push(dir);
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.extend(cwd.ancestors().map(|d| d.join(".cache")));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).map(|d| d.join(".cache")));
    }
    if let Some(workspace) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        dirs.push(workspace.join(".cache"));
    }
    dirs.dedup();
    dirs
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn python_package_lib() -> Option<PathBuf> {
    let python = std::env::var_os("CARROT_PYTHON").unwrap_or_else(|| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let capi = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
}

static LOADED: OnceLock<Result<Located, OrtLibError>> = OnceLock::new();
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Locate and load ONNX Runtime once per process; later calls return the first outcome.
pub fn init(explicit: Option<&Path>) -> Result<Located, OrtLibError> {
    LOADED
        .get_or_init(|| {
            let located = locate(explicit)?;
            let builder = ort::init_from(&located.path).map_err(|e| OrtLibError::Load {
                path: located.path.clone(),
                reason: e.to_string(),
            })?;
            // One intra-op pool for every session that does not ask for its own thread count
            // (see `providers::session_builder`): vision, embed and decoder then share threads
            // instead of three pools spinning against each other.
            let pool = ort::environment::GlobalThreadPoolOptions::default()
                .with_intra_threads(0)
                .and_then(|p| p.with_spin_control(true))
                .map_err(|e| OrtLibError::Load {
                    path: located.path.clone(),
                    reason: e.to_string(),
                })?;
            let env = builder
                .with_name("carrot")
                .with_global_thread_pool(pool)
                .build()
                .map_err(|e| OrtLibError::Load {
                    path: located.path.clone(),
                    reason: e.to_string(),
                })?;
            let _ = ENVIRONMENT.set(env);
            Ok(located)
        })
        .clone()
}

/// The process-wide ONNX Runtime environment, once [`init`] succeeded.
pub fn environment() -> Option<&'static ort::environment::Environment> {
    ENVIRONMENT.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_explicit_path_names_it() {
        let err = locate(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("--ort-lib"), "{msg}");
    }

    #[test]
    fn not_found_message_is_one_line_with_the_fix() {
        let msg = OrtLibError::NotFound.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("scripts/setup.sh"));
    }
}
