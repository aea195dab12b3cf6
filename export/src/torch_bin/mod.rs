//! Reader for PyTorch `.bin` checkpoints written by `torch.save` (the zip
//! format of torch >= 1.6), such as Bunny's `non_lora_trainables.bin` and
//! `adapter_model.bin` from older peft versions. Pure Rust; nothing in the
//! pickle is executed.
//!
//! The archive holds `<prefix>/data.pkl` (a pickle whose tensors refer to
//! storages through persistent ids), one `<prefix>/data/<key>` record of raw
//! bytes per storage, and `<prefix>/byteorder`. `<prefix>` is the file stem
//! the checkpoint was first saved under (`archive` when saved to a buffer).
//!
//! # Naming
//!
//! The top-level object must be a dict (plain or `OrderedDict`). Tensors are
//! returned in pickle order. Nested dicts are flattened by joining keys with
//! `.`, so `{"state_dict": {"fc.weight": t}}` yields `state_dict.fc.weight`;
//! integer keys and list/tuple positions become decimal components
//! (`{"layers": [t0, t1]}` yields `layers.0`, `layers.1`). Entries that hold
//! no tensor (numbers, strings, `argparse.Namespace`, ...) are not returned;
//! [`read_torch_bin_contents`] lists their names in
//! [`TorchBinContents::skipped`]. A name produced twice is an error.
//!
//! # Tensors
//!
//! Every tensor is materialised row-major contiguous in little-endian order,
//! whatever its strides, storage offset or the archive's byte order. Tensors
//! that share a storage are each copied out of it. `nn.Parameter`s read as
//! their data. Quantized, sparse, complex and conj/neg-view tensors are
//! refused with an error naming the tensor.
//!
//! The legacy non-zip format (`_use_new_zipfile_serialization=False`, or torch
//! < 1.6) is refused; TorchScript archives are refused too.

mod dtype;
mod objects;
mod pickle;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::ZipArchive;
use zip::result::ZipError;

pub use dtype::{RawTensor, TorchDType};

use objects::TensorRef;
use pickle::{PickleError, Value};

/// Errors from reading a `torch.save` checkpoint. Every message starts with
/// the file's path, except [`TorchBinError::DataLength`], which comes from a
/// [`RawTensor`] that no longer knows its file.
#[derive(Debug, thiserror::Error)]
pub enum TorchBinError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("{}: not a readable zip archive: {source}", path.display())]
    Zip { path: PathBuf, source: ZipError },

    #[error(
        "{}: legacy non-zip torch.save format ({format}) is not supported; it is written by \
         torch < 1.6 or with _use_new_zipfile_serialization=False. Re-save it with torch >= 1.6, \
         e.g. torch.save(torch.load(f), f)",
        path.display()
    )]
    Legacy { path: PathBuf, format: &'static str },

    #[error("{}: not a torch.save checkpoint: {reason}", path.display())]
    NotCheckpoint { path: PathBuf, reason: String },

    #[error("{}: record '{record}': {msg}", path.display())]
    Record { path: PathBuf, record: String, msg: String },

    #[error(
        "{}: {record}: unsupported pickle opcode {name} (0x{opcode:02x}) at byte {offset}",
        path.display()
    )]
    UnsupportedOpcode { path: PathBuf, record: String, opcode: u8, name: &'static str, offset: usize },

    #[error("{}: {record}: malformed pickle at byte {offset}: {msg}", path.display())]
    Pickle { path: PathBuf, record: String, offset: usize, msg: String },

    #[error("{}: {msg}", path.display())]
    Structure { path: PathBuf, msg: String },

    #[error("{}: tensor '{key}': {msg}", path.display())]
    Tensor { path: PathBuf, key: String, msg: String },

    #[error(
        "tensor data is {actual} bytes but a {dtype} tensor of shape {shape:?} needs {}",
        expected.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string())
    )]
    DataLength { dtype: TorchDType, shape: Vec<usize>, expected: Option<usize>, actual: usize },
}

/// Everything read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchBinContents {
    /// Flattened name → tensor, in pickle order.
    pub tensors: Vec<(String, RawTensor)>,
    /// Flattened names of entries that hold no tensor.
    pub skipped: Vec<String>,
}

/// Reads every tensor of a `torch.save` checkpoint, in file order. See the
/// module documentation for how nested containers are named.
pub fn read_torch_bin(path: &Path) -> Result<Vec<(String, RawTensor)>, TorchBinError> {
    Ok(read_torch_bin_contents(path)?.tensors)
}

/// Like [`read_torch_bin`], also listing the entries that are not tensors.
pub fn read_torch_bin_contents(path: &Path) -> Result<TorchBinContents, TorchBinError> {
    let file = File::open(path).map_err(|source| TorchBinError::Io { path: path.into(), source })?;
    read_torch_bin_from_reader(BufReader::new(file), path)
}

/// Reads a checkpoint from any seekable reader; `label` names it in errors.
pub fn read_torch_bin_from_reader<R: Read + Seek>(
    mut reader: R,
    label: &Path,
) -> Result<TorchBinContents, TorchBinError> {
    let io_err = |source| TorchBinError::Io { path: label.into(), source };
    let head = read_head(&mut reader).map_err(io_err)?;
    sniff(&head, label)?;
    reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let zip = ZipArchive::new(reader)
        .map_err(|source| TorchBinError::Zip { path: label.into(), source })?;
    Reader { zip, path: label.to_path_buf() }.read()
}

fn read_head<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    r.take(512).read_to_end(&mut head)?;
    Ok(head)
}

fn sniff(head: &[u8], path: &Path) -> Result<(), TorchBinError> {
    let not = |reason: &str| {
        Err(TorchBinError::NotCheckpoint { path: path.into(), reason: reason.into() })
    };
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    if head.is_empty() {
        return not("the file is empty");
    }
    if head[0] == 0x80 {
        return Err(TorchBinError::Legacy { path: path.into(), format: "raw pickle" });
    }
    if head.get(257..262) == Some(b"ustar".as_slice()) {
        return Err(TorchBinError::Legacy { path: path.into(), format: "tar" });
    }
    if head.len() > 8 && head[8] == b'{' {
        return not("it looks like a safetensors file");
    }
    not("unrecognised header (expected a zip archive)")
}

const MAX_DEPTH: usize = 64;
/// Largest output a view may have beyond the size of its storage (views with
/// zero strides, e.g. from `expand`).
const MAX_EXPANDED_BYTES: u64 = 1 << 30;

struct Reader<R> {
    zip: ZipArchive<R>,
    path: PathBuf,
}

impl<R: Read + Seek> Reader<R> {
    fn structure(&self, msg: impl Into<String>) -> TorchBinError {
        TorchBinError::Structure { path: self.path.clone(), msg: msg.into() }
    }

    fn record_err(&self, record: &str, msg: impl Into<String>) -> TorchBinError {
        TorchBinError::Record { path: self.path.clone(), record: record.into(), msg: msg.into() }
    }

    fn read(mut self) -> Result<TorchBinContents, TorchBinError> {
        let pkl_name = self.find_data_pkl()?;
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        let big_endian = self.byteorder(&prefix)?;
        let pkl = self.record(&pkl_name, None)?;

        let flat = pickle::with_unpickled(&pkl, |root| flatten(root))
            .map_err(|e| match e {
                PickleError::Unsupported { offset, opcode, name } => TorchBinError::UnsupportedOpcode {
                    path: self.path.clone(),
                    record: pkl_name.clone(),
                    opcode,
                    name,
                    offset,
                },
                PickleError::Malformed { offset, msg } => TorchBinError::Pickle {
                    path: self.path.clone(),
                    record: pkl_name.clone(),
                    offset,
                    msg,
                },
            })?
            .map_err(|e| match e {
                FlatError::Structure(msg) => self.structure(msg),
                FlatError::Tensor { key, msg } => {
                    TorchBinError::Tensor { path: self.path.clone(), key, msg }
                }
            })?;

        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, (_, t)) in flat.tensors.iter().enumerate() {
            last_use.insert(t.storage.key.as_str(), i);
        }
        let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
        let mut tensors = Vec::with_capacity(flat.tensors.len());
        let path = self.path.clone();
        for (i, (name, t)) in flat.tensors.iter().enumerate() {
            let tensor_err = |msg: String| TorchBinError::Tensor {
                path: path.clone(),
                key: name.clone(),
                msg,
            };
            let dtype = t.dtype.clone().map_err(&tensor_err)?;
            let key = t.storage.key.as_str();
            let nbytes = t
                .storage
                .nbytes()
                .ok_or_else(|| tensor_err(format!("storage '{key}' has an undecodable size")))?;
            if !cache.contains_key(key) {
                let bytes = self.record(&format!("{prefix}data/{key}"), Some(nbytes))?;
                cache.insert(key.to_string(), bytes);
            }
            let is_last = last_use.get(key) == Some(&i);
            let storage = match if is_last { cache.remove(key) } else { None } {
                Some(owned) => Storage::Owned(owned),
                None => match cache.get(key) {
                    Some(b) => Storage::Borrowed(b),
                    None => return Err(tensor_err(format!("storage '{key}' went missing"))),
                },
            };
            if storage.bytes().len() as u64 != nbytes {
                return Err(tensor_err(format!(
                    "storage '{key}' is declared with {nbytes} bytes here but {} bytes elsewhere",
                    storage.bytes().len()
                )));
            }
            let mut data = materialise(storage, dtype.size(), t).map_err(&tensor_err)?;
            if big_endian && dtype.size() > 1 {
                for el in data.chunks_exact_mut(dtype.size()) {
                    el.reverse();
                }
            }
            let shape = t
                .size
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| tensor_err("dimension does not fit in usize".into()))?;
            tensors.push((name.clone(), RawTensor { dtype, shape, data }));
        }
        Ok(TorchBinContents { tensors, skipped: flat.skipped })
    }

    fn find_data_pkl(&self) -> Result<String, TorchBinError> {
        let names: Vec<String> =
            self.zip.file_names().filter_map(Result::ok).map(|n| n.into_owned()).collect();
        let mut pkls: Vec<&String> = names
            .iter()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let depth = |n: &str| n.matches('/').count();
        pkls.sort_by_key(|n| depth(n));
        match pkls.as_slice() {
            [] => {
                let torchscript = names
                    .iter()
                    .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"));
                Err(TorchBinError::NotCheckpoint {
                    path: self.path.clone(),
                    reason: if torchscript {
                        "it is a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
                            .into()
                    } else {
                        "the zip archive has no data.pkl".into()
                    },
                })
            }
            [one] => Ok((*one).clone()),
            [a, b, ..] if depth(a) < depth(b) => Ok((*a).clone()),
            [a, b, ..] => Err(TorchBinError::NotCheckpoint {
                path: self.path.clone(),
                reason: format!("the zip archive holds several pickles ({a}, {b}, ...)"),
            }),
        }
    }

    /// Whether the storages are big-endian.
    fn byteorder(&mut self, prefix: &str) -> Result<bool, TorchBinError> {
        let name = format!("{prefix}byteorder");
        match self.zip.by_name(&name) {
            Err(ZipError::FileNotFound) => return Ok(false),
            Err(source) => return Err(TorchBinError::Zip { path: self.path.clone(), source }),
            Ok(_) => {}
        }
        let bytes = self.record(&name, None)?;
        match String::from_utf8_lossy(&bytes).trim() {
            "little" => Ok(false),
            "big" => Ok(true),
            other => Err(self.record_err(&name, format!("unknown byte order {other:?}"))),
        }
    }

    /// Reads a whole record; `expected` is its required size.
    fn record(&mut self, name: &str, expected: Option<u64>) -> Result<Vec<u8>, TorchBinError> {
        let path = self.path.clone();
        let mut entry = match self.zip.by_name(name) {
            Ok(e) => e,
            Err(ZipError::FileNotFound) => {
                return Err(TorchBinError::Record {
                    path,
                    record: name.into(),
                    msg: "missing from the archive".into(),
                });
            }
            Err(source) => return Err(TorchBinError::Zip { path, source }),
        };
        let err = |msg: String| TorchBinError::Record { path: path.clone(), record: name.into(), msg };
        let size = entry.size();
        if let Some(exp) = expected {
            if size != exp {
                return Err(err(format!("holds {size} bytes but the pickle declares {exp}")));
            }
        }
        let mut buf = Vec::new();
        usize::try_from(size)
            .ok()
            .and_then(|n| buf.try_reserve_exact(n).ok())
            .ok_or_else(|| err(format!("cannot allocate {size} bytes")))?;
        (&mut entry)
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| err(format!("read failed: {e}")))?;
        if buf.len() as u64 != size {
            return Err(err(format!("truncated: read {} of {size} bytes", buf.len())));
        }
        Ok(buf)
    }
}

enum Storage<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Storage<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Borrowed(b) => b,
        }
    }
}

/// Copies the view `t` out of its storage as contiguous bytes.
fn materialise(storage: Storage<'_>, elsize: usize, t: &TensorRef) -> Result<Vec<u8>, String> {
    let bytes = storage.bytes();
    let es = elsize as u64;
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {:?} has too many elements", t.size))?;
    let out_len = numel
        .checked_mul(es)
        .ok_or_else(|| format!("shape {:?} has too many bytes", t.size))?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let overflow = || format!("view (offset {}, size {:?}, stride {:?}) overflows", t.offset, t.size, t.stride);
    let mut last = t.offset;
    for (&d, &s) in t.size.iter().zip(&t.stride) {
        last = (d - 1).checked_mul(s).and_then(|x| last.checked_add(x)).ok_or_else(overflow)?;
    }
    let end = last.checked_add(1).and_then(|x| x.checked_mul(es)).ok_or_else(overflow)?;
    let have = bytes.len() as u64;
    if end > have {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) needs {} elements of {elsize} bytes but storage \
             has {have} bytes",
            t.offset,
            t.size,
            t.stride,
            last + 1
        ));
    }
    if out_len > have && out_len > MAX_EXPANDED_BYTES {
        return Err(format!(
            "view of {out_len} bytes over a storage of {have} bytes is too large to materialise"
        ));
    }
    let start = (t.offset * es) as usize;
    let out_len = out_len as usize;
    if is_contiguous(&t.size, &t.stride) {
        if let Storage::Owned(mut v) = storage {
            if start == 0 && out_len == v.len() {
                return Ok(v);
            }
            v.truncate(start + out_len);
            v.drain(..start);
            return Ok(v);
        }
        let mut out = Vec::new();
        out.try_reserve_exact(out_len).map_err(|e| format!("cannot allocate {out_len} bytes: {e}"))?;
        out.extend_from_slice(&bytes[start..start + out_len]);
        return Ok(out);
    }

    let mut out = Vec::new();
    out.try_reserve_exact(out_len).map_err(|e| format!("cannot allocate {out_len} bytes: {e}"))?;
    // Not contiguous, so at least one dimension.
    let n = t.size.len();
    let (outer_size, inner) = t.size.split_at(n - 1);
    let outer_stride = &t.stride[..n - 1];
    let (inner_size, inner_stride) = (inner[0], t.stride[n - 1]);
    let mut idx = vec![0u64; n - 1];
    // Every index below is at most `last`, which was checked against the storage.
    loop {
        let base = t.offset + idx.iter().zip(outer_stride).map(|(&i, &s)| i * s).sum::<u64>();
        if inner_stride == 1 {
            let a = (base * es) as usize;
            out.extend_from_slice(&bytes[a..a + (inner_size * es) as usize]);
        } else {
            for j in 0..inner_size {
                let a = ((base + j * inner_stride) * es) as usize;
                out.extend_from_slice(&bytes[a..a + elsize]);
            }
        }
        let mut k = n - 1;
        loop {
            if k == 0 {
                return Ok(out);
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < outer_size[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

struct Flat {
    tensors: Vec<(String, Rc<TensorRef>)>,
    skipped: Vec<String>,
    seen: HashSet<String>,
}

enum FlatError {
    Structure(String),
    Tensor { key: String, msg: String },
}

fn flatten(root: &Value) -> Result<Flat, FlatError> {
    let mut flat = Flat { tensors: Vec::new(), skipped: Vec::new(), seen: HashSet::new() };
    match root {
        Value::Dict(_) => walk(root, "", 0, &mut flat)?,
        other => {
            return Err(FlatError::Structure(format!(
                "the top-level object is a {}, expected a dict of tensors",
                other.kind()
            )));
        }
    }
    Ok(flat)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

fn too_deep(name: &str) -> FlatError {
    FlatError::Structure(format!(
        "'{name}': nested deeper than {MAX_DEPTH} levels (or a reference cycle)"
    ))
}

fn walk(v: &Value, name: &str, depth: usize, flat: &mut Flat) -> Result<(), FlatError> {
    if depth > MAX_DEPTH {
        return Err(too_deep(name));
    }
    match v {
        Value::Tensor(t) => {
            if !flat.seen.insert(name.to_string()) {
                return Err(FlatError::Tensor {
                    key: name.to_string(),
                    msg: "the name occurs twice after flattening nested keys".into(),
                });
            }
            flat.tensors.push((name.to_string(), t.clone()));
        }
        Value::Dict(d) => {
            let entries = match d.try_borrow() {
                Ok(d) => d.entries.clone(),
                Err(_) => return Err(too_deep(name)),
            };
            for (k, item) in &entries {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                    Value::None => "None".to_string(),
                    other => {
                        return Err(FlatError::Structure(format!(
                            "'{name}': dict keys of type {} are not supported",
                            other.kind()
                        )));
                    }
                };
                walk(item, &join(name, &key), depth + 1, flat)?;
            }
        }
        Value::Tuple(_) | Value::List(_) => {
            if contains_tensor(v, depth)? {
                for (i, item) in v.items().unwrap_or_default().iter().enumerate() {
                    walk(item, &join(name, &i.to_string()), depth + 1, flat)?;
                }
            } else {
                flat.skipped.push(name.to_string());
            }
        }
        Value::Object(o) => {
            if let Some(func) = unsupported_rebuild(o) {
                return Err(FlatError::Tensor {
                    key: name.to_string(),
                    msg: format!("tensors rebuilt by {func} (quantized/sparse/nested/meta) are not supported"),
                });
            }
            flat.skipped.push(name.to_string());
        }
        _ => flat.skipped.push(name.to_string()),
    }
    Ok(())
}

fn unsupported_rebuild(o: &pickle::Shared<pickle::Object>) -> Option<String> {
    let o = o.try_borrow().ok()?;
    match &o.callable {
        Value::Global(g) if g.module.starts_with("torch") && g.name.starts_with("_rebuild") => {
            Some(format!("{}.{}", g.module, g.name))
        }
        _ => None,
    }
}

fn contains_tensor(v: &Value, depth: usize) -> Result<bool, FlatError> {
    if depth > MAX_DEPTH {
        return Err(too_deep("?"));
    }
    Ok(match v {
        Value::Tensor(_) => true,
        Value::Tuple(_) | Value::List(_) => {
            for item in v.items().unwrap_or_default() {
                if contains_tensor(&item, depth + 1)? {
                    return Ok(true);
                }
            }
            false
        }
        Value::Dict(d) => {
            let entries = d.try_borrow().map(|d| d.entries.clone()).unwrap_or_default();
            for (_, item) in &entries {
                if contains_tensor(item, depth + 1)? {
                    return Ok(true);
                }
            }
            false
        }
        Value::Object(o) => unsupported_rebuild(o).is_some(),
        _ => false,
    })
}
