//! Regenerates the prost types for ONNX from `graphs/src/onnx/onnx.proto3`.
//!
//! Usage: `carrot-protogen PROTO_FILE OUT_DIR` (see `scripts/gen-proto.sh`). Writes `OUT_DIR/onnx.rs`.
//! Uses `protox` to compile the schema, so no `protoc` is needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn run(proto: &Path, out_dir: &Path) -> Result<(), String> {
    let include = proto
        .parent()
        .ok_or_else(|| format!("{}: no parent directory", proto.display()))?;
    let file_name = proto
        .file_name()
        .ok_or_else(|| format!("{}: not a file", proto.display()))?;
    let descriptors = protox::compile([file_name], [include])
        .map_err(|e| format!("compiling {}: {e}", proto.display()))?;
    prost_build::Config::new()
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .map_err(|e| format!("generating Rust into {}: {e}", out_dir.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [proto, out_dir] = args.as_slice() else {
        eprintln!("usage: carrot-protogen PROTO_FILE OUT_DIR");
        return ExitCode::from(2);
    };
    match run(proto, out_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carrot-protogen: {e}");
            ExitCode::FAILURE
        }
    }
}
