//! Interpretation of the torch objects found in a `data.pkl`: persistent
//! storage ids, `torch._utils._rebuild_*` calls and `collections.OrderedDict`.

use std::cell::RefCell;
use std::rc::Rc;

use super::dtype::TorchDType;
use super::value::{Dict, Global, Object, Value};

/// Element type of a storage, as declared in its persistent id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StorageKind {
    Typed(TorchDType),
    /// `torch.UntypedStorage`: `numel` counts bytes.
    Untyped,
    /// A storage class the reader does not decode (complex, quantized, ...).
    Unsupported(String),
}

/// `('storage', storage_type, key, location, numel)`.
#[derive(Debug)]
pub(super) struct StorageRef {
    pub key: String,
    pub kind: StorageKind,
    pub numel: u64,
}

impl StorageRef {
    /// Size in bytes the storage record must have, when known.
    pub(super) fn nbytes(&self) -> Option<u64> {
        match &self.kind {
            StorageKind::Typed(d) => self.numel.checked_mul(d.size() as u64),
            StorageKind::Untyped => Some(self.numel),
            StorageKind::Unsupported(_) => None,
        }
    }
}

/// A tensor view over a storage, before its bytes are read.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub storage: Rc<StorageRef>,
    /// The element type, or why the tensor cannot be decoded.
    pub dtype: Result<TorchDType, String>,
    /// Offset into the storage, in elements of `dtype`.
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

pub(super) fn persistent_load(pid: &Value) -> Result<StorageRef, String> {
    let Some(items) = pid.items() else {
        return Err(format!(
            "persistent id is a {}, expected a tuple",
            pid.kind()
        ));
    };
    let [tag, class, key, _location, numel] = items.as_slice() else {
        return Err(format!(
            "persistent id has {} fields, expected 5",
            items.len()
        ));
    };
    if !matches!(tag, Value::Str(s) if &**s == "storage") {
        return Err("persistent id does not start with 'storage'".into());
    }
    let Value::Global(class) = class else {
        return Err(format!(
            "storage type is a {}, expected a global",
            class.kind()
        ));
    };
    let kind = storage_kind(class);
    let key = match key {
        Value::Str(s) => s.to_string(),
        other => return Err(format!("storage key is a {}, expected a str", other.kind())),
    };
    let numel = match numel {
        Value::Int(n) if *n >= 0 => *n as u64,
        other => return Err(format!("storage size {other:?} is not a non-negative int")),
    };
    Ok(StorageRef { key, kind, numel })
}

fn storage_kind(class: &Global) -> StorageKind {
    let torch_module = matches!(
        class.module.as_str(),
        "torch" | "torch.storage" | "torch.cuda"
    );
    if torch_module && class.name == "UntypedStorage" {
        return StorageKind::Untyped;
    }
    match TorchDType::from_storage_class(&class.name) {
        Some(d) if torch_module => StorageKind::Typed(d),
        _ => StorageKind::Unsupported(format!("{}.{}", class.module, class.name)),
    }
}

/// Interprets `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ).
pub(super) fn call(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(g) = &callable else {
        return Ok(opaque(callable, args));
    };
    let module = g.module.as_str();
    let name = g.name.as_str();
    match (module, name) {
        ("collections", "OrderedDict") => ordered_dict(&args),
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
            let items = args_of(&args, name)?;
            rebuild_tensor(&items, None, name).map(|t| Value::Tensor(Rc::new(t)))
        }
        ("torch._utils", "_rebuild_tensor_v3") => {
            let items = args_of(&args, name)?;
            let dtype = match items.get(6) {
                Some(Value::Global(d)) if d.module == "torch" => {
                    TorchDType::from_torch_name(&d.name)
                        .ok_or_else(|| format!("unsupported dtype torch.{}", d.name))
                }
                Some(other) => return Err(format!("{name}: dtype is a {}", other.kind())),
                None => return Err(format!("{name}: missing dtype argument")),
            };
            let mut rest = items;
            let metadata = if rest.len() > 7 {
                rest.split_off(7)
            } else {
                Vec::new()
            };
            rest.truncate(6);
            rest.extend(metadata);
            rebuild_tensor(&rest, Some(dtype), name).map(|t| Value::Tensor(Rc::new(t)))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            let items = args_of(&args, name)?;
            match items.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                Some(other) => Err(format!(
                    "{name}: data is a {}, expected a tensor",
                    other.kind()
                )),
                None => Err(format!("{name}: missing arguments")),
            }
        }
        ("torch._tensor", "_rebuild_from_type_v2") | ("torch._utils", "_rebuild_from_type_v2") => {
            let items = args_of(&args, name)?;
            match items.as_slice() {
                [func, _new_type, inner, ..] => call(func.clone(), inner.clone()),
                _ => Err(format!("{name}: expected (func, type, args, state)")),
            }
        }
        _ => Ok(opaque(callable, args)),
    }
}

fn opaque(callable: Value, args: Value) -> Value {
    Value::Object(Rc::new(RefCell::new(Object {
        callable,
        args,
        state: Value::None,
    })))
}

fn args_of(args: &Value, func: &str) -> Result<Vec<Value>, String> {
    args.items()
        .ok_or_else(|| format!("{func}: arguments are a {}, expected a tuple", args.kind()))
}

fn ordered_dict(args: &Value) -> Result<Value, String> {
    let mut dict = Dict::default();
    let items = args_of(args, "OrderedDict")?;
    match items.as_slice() {
        [] => {}
        [pairs] => {
            let Some(pairs) = pairs.items() else {
                return Err(format!("OrderedDict argument is a {}", pairs.kind()));
            };
            for pair in pairs {
                match pair.items().as_deref() {
                    Some([k, v]) => dict.insert(k.clone(), v.clone()),
                    _ => return Err("OrderedDict items must be (key, value) pairs".into()),
                }
            }
        }
        _ => {
            return Err(format!(
                "OrderedDict takes at most 1 argument, got {}",
                items.len()
            ));
        }
    }
    Ok(Value::Dict(Rc::new(RefCell::new(dict))))
}

fn int_list(v: &Value, what: &str, func: &str) -> Result<Vec<u64>, String> {
    let items = v
        .items()
        .ok_or_else(|| format!("{func}: {what} is a {}, expected a tuple", v.kind()))?;
    items
        .iter()
        .map(|x| match x {
            Value::Int(n) if *n >= 0 => Ok(*n as u64),
            other => Err(format!(
                "{func}: {what} holds {other:?}, expected non-negative ints"
            )),
        })
        .collect()
}

/// `(storage, storage_offset, size, stride[, requires_grad, backward_hooks[, metadata]])`.
fn rebuild_tensor(
    args: &[Value],
    dtype: Option<Result<TorchDType, String>>,
    func: &str,
) -> Result<TensorRef, String> {
    let [storage, offset, size, stride, rest @ ..] = args else {
        return Err(format!(
            "{func}: expected at least 4 arguments, got {}",
            args.len()
        ));
    };
    let Value::Storage(storage) = storage else {
        return Err(format!("{func}: storage is a {}", storage.kind()));
    };
    let offset = match offset {
        Value::Int(n) if *n >= 0 => *n as u64,
        other => {
            return Err(format!(
                "{func}: storage offset {other:?} is not a non-negative int"
            ));
        }
    };
    let size = int_list(size, "size", func)?;
    let stride = int_list(stride, "stride", func)?;
    if size.len() != stride.len() {
        return Err(format!(
            "{func}: size has {} dims but stride has {}",
            size.len(),
            stride.len()
        ));
    }
    let mut dtype = match dtype {
        Some(d) => d,
        None => match &storage.kind {
            StorageKind::Typed(d) => Ok(*d),
            StorageKind::Untyped => Ok(TorchDType::U8),
            StorageKind::Unsupported(name) => Err(format!("unsupported storage type {name}")),
        },
    };
    if let Some(Value::Dict(meta)) = rest.get(2) {
        let flagged: Vec<String> = meta
            .borrow()
            .entries
            .iter()
            .filter(|(_, v)| !matches!(v, Value::Bool(false) | Value::None | Value::Int(0)))
            .map(|(k, _)| match k {
                Value::Str(s) => s.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if !flagged.is_empty() {
            dtype = Err(format!(
                "tensor metadata flags {flagged:?} (conj/neg views) are not supported"
            ));
        }
    }
    Ok(TensorRef {
        storage: storage.clone(),
        dtype,
        offset,
        size,
        stride,
    })
}
