//! The `kv_cache: "shared"` decode path: each layer's key and value cache is one buffer of
//! `max_sequence` positions, allocated once per sequence and bound with ONNX Runtime's I/O binding
//! as both `past_key_values.{i}.*` and `present.{i}.*`. `GroupQueryAttention` sees the same memory
//! on both sides and writes only the new positions into it, so nothing is reallocated or copied per
//! token; only the logits come back to the host. On CUDA and TensorRT the buffers live in device
//! memory (zero-filled on the host once, copied over), so the cache never crosses PCIe per step. Buffers start at [`INITIAL_CAPACITY`]
//! positions and double (one copy of the used positions) when a step would overflow them, up to
//! the manifest's `max_sequence`, so a short conversation does not hold a full context's memory.

use half::f16;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor};

use crate::device::Device;
use crate::engine::{ActDType, EngineError};

fn err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Run {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// Host memory, where the logits of every step are bound (made once per engine).
pub fn host_memory() -> Result<MemoryInfo<'static>, EngineError> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(|e| err("host memory info", e))
}

/// Positions a new cache holds before it first grows.
pub const INITIAL_CAPACITY: usize = 256;

/// Positions the buffers in `cache` hold.
pub fn capacity(cache: &[DynValue]) -> usize {
    cache
        .first()
        .and_then(|v| v.shape().get(2).copied())
        .map_or(0, |c| c.max(0) as usize)
}

/// Where the buffers live: host memory, or a CUDA device (for the CUDA and TensorRT providers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Host,
    Cuda(i32),
}

impl Placement {
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cuda(id) | Device::TensorRt(id) => Placement::Cuda(*id),
            Device::Cpu | Device::Auto => Placement::Host,
        }
    }

    fn place(self, value: DynValue) -> Result<DynValue, EngineError> {
        match self {
            Placement::Host => Ok(value),
            Placement::Cuda(id) => copy_to(&value, AllocationDevice::CUDA, id)
                .map_err(|e| err("KV cache on the GPU", e)),
        }
    }

    fn to_host(self, value: &DynValue) -> Result<DynValue, EngineError> {
        copy_to(value, AllocationDevice::CPU, 0).map_err(|e| err("KV cache from the GPU", e))
    }
}

/// A copy of the tensor `value` in the memory of `device`.
fn copy_to(value: &DynValue, device: AllocationDevice, id: i32) -> ort::Result<DynValue> {
    let tensor = value.view().downcast::<ort::value::DynTensorValueType>()?;
    Ok(tensor.to(device, id)?.into_dyn())
}

/// Grow every buffer to `new_capacity` positions, keeping the first `used` of each head (device
/// buffers make one round trip through the host; growth happens a logarithmic number of times).
pub fn grow(
    cache: &mut [DynValue],
    act: ActDType,
    placement: Placement,
    (kv_heads, head_dim): (usize, usize),
    used: usize,
    new_capacity: usize,
) -> Result<(), EngineError> {
    let old_capacity = capacity(cache);
    let mut grown = allocate(
        act,
        Placement::Host,
        cache.len() / 2,
        kv_heads,
        new_capacity,
        head_dim,
    )?;
    let shape = Shape {
        kv_heads,
        head_dim,
        used,
        old_capacity,
        new_capacity,
    };
    for (old, new) in cache.iter().zip(grown.iter_mut()) {
        let host;
        let old = match placement {
            Placement::Host => old,
            Placement::Cuda(_) => {
                host = placement.to_host(old)?;
                &host
            }
        };
        match act {
            ActDType::F32 => copy_used::<f32>(old, new, &shape)?,
            ActDType::F16 => copy_used::<f16>(old, new, &shape)?,
            ActDType::BF16 => return Err(err("KV cache", "no shared cache for bfloat16")),
        }
    }
    for (slot, value) in cache.iter_mut().zip(grown) {
        *slot = placement.place(value)?;
    }
    Ok(())
}

struct Shape {
    kv_heads: usize,
    head_dim: usize,
    used: usize,
    old_capacity: usize,
    new_capacity: usize,
}

fn copy_used<T: PrimitiveTensorElementType + Copy>(
    old: &DynValue,
    new: &mut DynValue,
    s: &Shape,
) -> Result<(), EngineError> {
    let (_, src) = old
        .try_extract_tensor::<T>()
        .map_err(|e| err("KV cache", e))?;
    let (_, dst) = new
        .try_extract_tensor_mut::<T>()
        .map_err(|e| err("KV cache", e))?;
    let n = s.used * s.head_dim;
    for h in 0..s.kv_heads {
        let from = h * s.old_capacity * s.head_dim;
        let to = h * s.new_capacity * s.head_dim;
        dst[to..to + n].copy_from_slice(&src[from..from + n]);
    }
    Ok(())
}

/// `2 × layers` zero-filled buffers `[1, kv_heads, capacity, head_dim]` in the activation dtype,
/// in decoder input order, where `placement` says.
pub fn allocate(
    act: ActDType,
    placement: Placement,
    layers: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
) -> Result<Vec<DynValue>, EngineError> {
    (0..2 * layers)
        .map(|_| {
            let host = match act {
                ActDType::F32 => zeros::<f32>([1, kv_heads, capacity, head_dim], 0.0),
                ActDType::F16 => zeros::<f16>([1, kv_heads, capacity, head_dim], f16::ZERO),
                ActDType::BF16 => Err(err("KV cache", "no shared cache for bfloat16")),
            }?;
            placement.place(host)
        })
        .collect()
}

fn zeros<T: PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    shape: [usize; 4],
    zero: T,
) -> Result<DynValue, EngineError> {
    let mut t = Tensor::<T>::new(&Allocator::default(), shape).map_err(|e| err("KV cache", e))?;
    let (_, data) = t
        .try_extract_tensor_mut::<T>()
        .map_err(|e| err("KV cache", e))?;
    data.fill(zero);
    Ok(t.into_dyn())
}

/// One decoder run with the cache bound in place. `inputs` are the non-cache inputs by name;
/// `read` gets the logits and the vocabulary size.
pub fn run<T>(
    decoder: &mut Session,
    inputs: Vec<(&str, DynValue)>,
    cache: &mut [DynValue],
    (past_names, present_names): (&[String], &[String]),
    logits_memory: &MemoryInfo<'_>,
    read: impl FnOnce(&[f32], usize) -> T,
) -> Result<T, EngineError> {
    let bind = |e| err("decoder.onnx I/O binding", e);
    let mut binding = decoder.create_binding().map_err(bind)?;
    for (name, value) in &inputs {
        binding.bind_input(*name, value).map_err(bind)?;
    }
    for ((past, present), value) in past_names.iter().zip(present_names).zip(cache.iter_mut()) {
        binding.bind_input(past.as_str(), &*value).map_err(bind)?;
        binding.bind_output(present.as_str(), value).map_err(bind)?;
    }
    binding
        .bind_output_to_device(carrot_contract::names::LOGITS, logits_memory)
        .map_err(bind)?;
    let outputs = decoder
        .run_binding(&binding)
        .map_err(|e| err("decoder.onnx", e))?;
    crate::engine::read_logits(&outputs, read)
}

/// Tensors over the rows `rows` of each buffer in `cache`, shaped `[rows.len(), kv_heads,
/// capacity, head_dim]` and sharing the buffer's memory. A batch cache keeps its `n` rows in
/// buffers of `n · kv_heads` heads; row `r` is its `kv_heads` heads from `r · kv_heads`, so
/// consecutive rows are one contiguous tensor that ONNX Runtime can read and write in place.
///
/// # Safety
/// The views alias `cache` without borrowing it: drop them before `cache` is grown, replaced
/// or dropped, and run nothing else on those rows while they are bound.
pub(crate) unsafe fn row_views(
    cache: &mut [DynValue],
    act: ActDType,
    placement: Placement,
    (kv_heads, head_dim): (usize, usize),
    rows: std::ops::Range<usize>,
) -> Result<Vec<DynValue>, EngineError> {
    use ort::AsPointer;
    let api = ort::api();
    let capacity = capacity(cache);
    let (element, elem_type) = match act {
        ActDType::F32 => (
            4,
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        ),
        ActDType::F16 => (
            2,
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        ),
        ActDType::BF16 => return Err(err("KV cache", "no shared cache for bfloat16")),
    };
    let memory = match placement {
        Placement::Host => host_memory()?,
        Placement::Cuda(id) => MemoryInfo::new(
            AllocationDevice::CUDA,
            id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| err("KV cache memory info", e))?,
    };
    let row_bytes = kv_heads * capacity * head_dim * element;
    let shape = [
        rows.len() as i64,
        kv_heads as i64,
        capacity as i64,
        head_dim as i64,
    ];
    let allocator = Allocator::default();
    let mut views = Vec::with_capacity(cache.len());
    for buffer in cache.iter_mut() {
        let tensor = buffer
            .view()
            .downcast::<ort::value::DynTensorValueType>()
            .map_err(|e| err("KV cache", e))?;
        debug_assert_eq!(
            tensor.memory_info().allocation_device(),
            memory.allocation_device()
        );
        let base = tensor.data_ptr().cast_mut().cast::<u8>();
        // SAFETY: `rows` lies within the buffer (the caller's batch has that many rows of
        // `row_bytes`), so the view covers memory the buffer owns.
        let data = unsafe { base.add(rows.start * row_bytes) };
        let mut out: *mut ort::sys::OrtValue = std::ptr::null_mut();
        // SAFETY: plain FFI call with valid pointers; the tensor does not own `data`.
        let status = unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                memory.ptr(),
                data.cast(),
                rows.len() * row_bytes,
                shape.as_ptr(),
                shape.len(),
                elem_type,
                &mut out,
            )
        };
        if !status.0.is_null() {
            // SAFETY: a non-null status is a valid OrtStatus that we release once read.
            let message = unsafe {
                let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                    .to_string_lossy()
                    .into_owned();
                (api.ReleaseStatus)(status.0);
                text
            };
            return Err(err("KV cache row view", message));
        }
        let out = std::ptr::NonNull::new(out).ok_or_else(|| err("KV cache row view", "null"))?;
        // SAFETY: `out` is a new tensor value that this `DynValue` now owns (and releases);
        // values made this way are bound without a defensive copy, so past and present share
        // the buffer.
        views.push(unsafe { DynValue::from_ptr(out, Some(&allocator)) });
    }
    Ok(views)
}
