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
mod flatten;
mod objects;
mod pickle;
mod value;
mod view;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use zip::ZipArchive;
use zip::result::ZipError;

pub use dtype::{RawTensor, TorchDType};

use flatten::{FlatError, flatten};
use pickle::PickleError;
use view::{Storage, materialise};

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
    Record {
        path: PathBuf,
        record: String,
        msg: String,
    },

    #[error(
        "{}: {record}: unsupported pickle opcode {name} (0x{opcode:02x}) at byte {offset}",
        path.display()
    )]
    UnsupportedOpcode {
        path: PathBuf,
        record: String,
        opcode: u8,
        name: &'static str,
        offset: usize,
    },

    #[error("{}: {record}: malformed pickle at byte {offset}: {msg}", path.display())]
    Pickle {
        path: PathBuf,
        record: String,
        offset: usize,
        msg: String,
    },

    #[error("{}: {msg}", path.display())]
    Structure { path: PathBuf, msg: String },

    #[error("{}: tensor '{key}': {msg}", path.display())]
    Tensor {
        path: PathBuf,
        key: String,
        msg: String,
    },

    #[error(
        "tensor data is {actual} bytes but a {dtype} tensor of shape {shape:?} needs {}",
        expected.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string())
    )]
    DataLength {
        dtype: TorchDType,
        shape: Vec<usize>,
        expected: Option<usize>,
        actual: usize,
    },
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
    let file = File::open(path).map_err(|source| TorchBinError::Io {
        path: path.into(),
        source,
    })?;
    read_torch_bin_from_reader(BufReader::new(file), path)
}

/// Reads a checkpoint from any seekable reader; `label` names it in errors.
pub fn read_torch_bin_from_reader<R: Read + Seek>(
    mut reader: R,
    label: &Path,
) -> Result<TorchBinContents, TorchBinError> {
    let io_err = |source| TorchBinError::Io {
        path: label.into(),
        source,
    };
    let head = read_head(&mut reader).map_err(io_err)?;
    sniff(&head, label)?;
    reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let zip = ZipArchive::new(reader).map_err(|source| TorchBinError::Zip {
        path: label.into(),
        source,
    })?;
    Reader {
        zip,
        path: label.to_path_buf(),
    }
    .read()
}

fn read_head<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    r.take(512).read_to_end(&mut head)?;
    Ok(head)
}

fn sniff(head: &[u8], path: &Path) -> Result<(), TorchBinError> {
    let not = |reason: &str| {
        Err(TorchBinError::NotCheckpoint {
            path: path.into(),
            reason: reason.into(),
        })
    };
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    if head.is_empty() {
        return not("the file is empty");
    }
    if head[0] == 0x80 {
        return Err(TorchBinError::Legacy {
            path: path.into(),
            format: "raw pickle",
        });
    }
    if head.get(257..262) == Some(b"ustar".as_slice()) {
        return Err(TorchBinError::Legacy {
            path: path.into(),
            format: "tar",
        });
    }
    if head.len() > 8 && head[8] == b'{' {
        return not("it looks like a safetensors file");
    }
    not("unrecognised header (expected a zip archive)")
}

struct Reader<R> {
    zip: ZipArchive<R>,
    path: PathBuf,
}

impl<R: Read + Seek> Reader<R> {
    fn structure(&self, msg: impl Into<String>) -> TorchBinError {
        TorchBinError::Structure {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    fn record_err(&self, record: &str, msg: impl Into<String>) -> TorchBinError {
        TorchBinError::Record {
            path: self.path.clone(),
            record: record.into(),
            msg: msg.into(),
        }
    }

    fn read(mut self) -> Result<TorchBinContents, TorchBinError> {
        let pkl_name = self.find_data_pkl()?;
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        let big_endian = self.byteorder(&prefix)?;
        let pkl = self.record(&pkl_name, None)?;

        let flat = pickle::with_unpickled(&pkl, flatten)
            .map_err(|e| match e {
                PickleError::Unsupported {
                    offset,
                    opcode,
                    name,
                } => TorchBinError::UnsupportedOpcode {
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
                FlatError::Tensor { key, msg } => TorchBinError::Tensor {
                    path: self.path.clone(),
                    key,
                    msg,
                },
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
            let nbytes = t.storage.nbytes().ok_or_else(|| {
                tensor_err(format!("storage '{key}' has a type that cannot be decoded"))
            })?;
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
        Ok(TorchBinContents {
            tensors,
            skipped: flat.skipped,
        })
    }

    fn find_data_pkl(&self) -> Result<String, TorchBinError> {
        let names: Vec<String> = self
            .zip
            .file_names()
            .filter_map(Result::ok)
            .map(|n| n.into_owned())
            .collect();
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
            Err(source) => {
                return Err(TorchBinError::Zip {
                    path: self.path.clone(),
                    source,
                });
            }
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
        let err = |msg: String| TorchBinError::Record {
            path: path.clone(),
            record: name.into(),
            msg,
        };
        let size = entry.size();
        if let Some(exp) = expected
            && size != exp
        {
            return Err(err(format!(
                "holds {size} bytes but the pickle declares {exp}"
            )));
        }
        // Reserve at most what a real record needs up front: the declared size may be anything,
        // and a record shorter than it fails the check below.
        const UPFRONT: u64 = 64 << 20;
        let mut buf = Vec::new();
        usize::try_from(size.min(UPFRONT))
            .ok()
            .and_then(|n| buf.try_reserve_exact(n).ok())
            .ok_or_else(|| err(format!("cannot allocate {size} bytes")))?;
        (&mut entry)
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| err(format!("read failed: {e}")))?;
        if buf.len() as u64 != size {
            return Err(err(format!(
                "truncated: read {} of {size} bytes",
                buf.len()
            )));
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_declaring_gigabytes_is_refused_without_reserving_them() {
        // Found by the torch_bin fuzz target: a zip record claiming 4 GiB made the reader reserve
        // that much before reading it.
        let bytes = include_bytes!(
            "../../../fuzz/regressions/torch_bin/oom-538238e3205512802afb0f09798f48948962cef1"
        );
        let r = read_torch_bin_from_reader(std::io::Cursor::new(&bytes[..]), Path::new("f.bin"));
        assert!(r.is_err());
    }
}
