//! Execution providers, one function per provider. A requested GPU provider that cannot be
//! registered is an error (no silent CPU fallback); only `auto` falls back, and says so.

use std::path::Path;

use carrot_contract::Manifest;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::device::{Device, DeviceError};
use crate::engine::{EngineError, LoadOptions};

/// Resolve `auto` to a concrete device; check that a requested GPU provider is compiled in.
pub fn resolve(device: &Device) -> Result<Device, DeviceError> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda(_) if !cfg!(feature = "cuda") => Err(DeviceError::NotCompiled {
            device: device.to_string(),
            feature: "cuda",
        }),
        Device::TensorRt(_) if !cfg!(feature = "tensorrt") => Err(DeviceError::NotCompiled {
            device: device.to_string(),
            feature: "tensorrt",
        }),
        Device::Cuda(_) | Device::TensorRt(_) => Ok(device.clone()),
        Device::Auto => {
            let chosen = auto_choice();
            tracing::info!("device auto: using {chosen}");
            Ok(chosen)
        }
    }
}

fn auto_choice() -> Device {
    #[cfg(feature = "tensorrt")]
    {
        use ort::ep::ExecutionProvider;
        if <ort::ep::TensorRT as ExecutionProvider>::is_available().unwrap_or(false) {
            return Device::TensorRt(0);
        }
    }
    #[cfg(feature = "cuda")]
    {
        use ort::ep::ExecutionProvider;
        if <ort::ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false) {
            return Device::Cuda(0);
        }
    }
    Device::Cpu
}

/// Create a session for `path` on `device`.
#[cfg_attr(not(feature = "tensorrt"), allow(unused_variables))]
pub fn session(
    path: &Path,
    device: &Device,
    opts: &LoadOptions,
    manifest: &Manifest,
    role: SessionRole,
) -> Result<Session, EngineError> {
    let fail = |reason: String| EngineError::Session {
        path: path.to_path_buf(),
        reason,
    };
    let builder = session_builder(opts, role).map_err(fail)?;
    let builder = match device {
        Device::Cpu | Device::Auto => builder,
        #[cfg(feature = "cuda")]
        Device::Cuda(id) => cuda(builder, *id).map_err(fail)?,
        #[cfg(feature = "tensorrt")]
        Device::TensorRt(id) => tensorrt(builder, *id, path, opts, manifest).map_err(fail)?,
        #[allow(unreachable_patterns)]
        other => {
            return Err(fail(format!(
                "device {other} is not compiled into this build"
            )));
        }
    };
    let mut builder = builder;
    builder
        .commit_from_file(path)
        .map_err(|e| fail(e.to_string()))
}

#[cfg(feature = "cuda")]
fn cuda(
    builder: ort::session::builder::SessionBuilder,
    id: i32,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let ep = ort::ep::CUDA::default()
        .with_device_id(id)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([ep])
        .map_err(|e| e.to_string())?
        .with_disable_cpu_fallback()
        .map_err(|e| e.to_string())
}

#[cfg(feature = "tensorrt")]
fn tensorrt(
    builder: ort::session::builder::SessionBuilder,
    id: i32,
    path: &Path,
    opts: &LoadOptions,
    manifest: &Manifest,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let cache = opts
        .cache_dir
        .clone()
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).join(".trt-cache"));
    std::fs::create_dir_all(&cache)
        .map_err(|e| format!("cannot create TensorRT cache {}: {e}", cache.display()))?;
    let cache = cache.display().to_string();
    let mut trt = ort::ep::TensorRT::default()
        .with_device_id(id)
        .with_fp16(manifest.activation_dtype == "float16")
        .with_engine_cache(true)
        .with_engine_cache_path(&cache)
        .with_timing_cache(true)
        .with_timing_cache_path(&cache);
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let max = manifest.prompt.max_length;
    if file == manifest.graphs.decoder {
        let [min, opt, max] = crate::device::decoder_profiles(&manifest.text, max);
        trt = trt
            .with_profile_min_shapes(min)
            .with_profile_opt_shapes(opt)
            .with_profile_max_shapes(max);
    } else if file == manifest.graphs.embed {
        trt = trt
            .with_profile_min_shapes("input_ids:1x1")
            .with_profile_opt_shapes(format!("input_ids:1x{}", max / 2))
            .with_profile_max_shapes(format!("input_ids:1x{max}"));
    } else if let Some(v) = &manifest.vision {
        let s = v.image_size;
        trt = trt
            .with_profile_min_shapes(format!("pixel_values:1x3x{s}x{s}"))
            .with_profile_opt_shapes(format!("pixel_values:1x3x{s}x{s}"))
            .with_profile_max_shapes(format!("pixel_values:4x3x{s}x{s}"));
    }
    let cuda = ort::ep::CUDA::default()
        .with_device_id(id)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([trt.build().error_on_failure(), cuda])
        .map_err(|e| e.to_string())?
        .with_disable_cpu_fallback()
        .map_err(|e| e.to_string())
}

/// What a session runs, which decides how its threads behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRole {
    /// Runs every token: the intra-op threads keep spinning between runs.
    Decoder,
    /// A row lookup per step: one thread, no pool to spin and take cores from the decoder.
    Embed,
    /// Heavy but once per image: all threads, which sleep instead of spinning when done.
    Vision,
}

/// Build a session with the standard options (used by `providers`).
pub(crate) fn session_builder(
    opts: &LoadOptions,
    role: SessionRole,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let env = crate::ort_lib::environment().ok_or("ONNX Runtime is not initialised")?;
    let mut b = Session::builder(env).map_err(|e| e.to_string())?;
    b = b
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| e.to_string())?;
    // Without an explicit thread count every session runs on the environment's one shared
    // intra-op pool (ONNX Runtime's default size). An explicit count gives each session its own
    // pool: the decoder and vision that many threads, the embedding (a row lookup per step) one,
    // vision's threads sleeping instead of spinning when done.
    if let Some(n) = opts.threads {
        let n = if role == SessionRole::Embed { 1 } else { n };
        b = b
            .with_independent_thread_pool()
            .map_err(|e| e.to_string())?
            .with_intra_threads(n)
            .map_err(|e| e.to_string())?;
        if role == SessionRole::Vision {
            b = b.with_intra_op_spinning(false).map_err(|e| e.to_string())?;
        }
    }
    if opts.parallel_prepack == Some(true) {
        b = b
            .with_config_entry("session.prepack.enable_parallel", "1")
            .map_err(|e| e.to_string())?;
    }
    Ok(b)
}
