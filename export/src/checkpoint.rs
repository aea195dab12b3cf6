//! Tensors of a Hugging Face checkpoint directory, read one at a time.
//!
//! Handles `model.safetensors.index.json` (sharded), a single `model.safetensors`, and
//! `pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`). Safetensors
//! shards are memory-mapped, so asking for one tensor touches only its bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

pub use crate::tensor_dtype::{StoredDType, TensorInfo, bytes_to_f32};
use crate::torch_bin::{RawTensor, read_torch_bin};

/// A failure to read a checkpoint; every message names the file, and the tensor when there is one.
#[derive(thiserror::Error, Debug)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: no weights found (looked for model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin)"
    )]
    NoWeights { dir: PathBuf },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{index}: tensor `{key}` is listed in shard `{shard}`, which does not exist")]
    MissingShard {
        index: PathBuf,
        shard: String,
        key: String,
    },
    #[error(
        "{index}: tensor `{key}` is listed in shard `{shard}`, but that file does not contain it"
    )]
    NotInShard {
        index: PathBuf,
        shard: PathBuf,
        key: String,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    TorchBin { path: PathBuf, message: String },
    #[error("{path}: tensor `{key}` appears in two files (also in {other})")]
    Duplicate {
        path: PathBuf,
        other: PathBuf,
        key: String,
    },
    #[error("{dir}: no tensor `{key}`")]
    NotFound { dir: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has dtype {dtype}, which cannot be read as float")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: StoredDType,
    },
}

struct SafetensorsFile {
    mmap: Mmap,
    /// Byte ranges within `mmap`, by tensor name.
    ranges: HashMap<String, (usize, usize)>,
}

enum FileKind {
    Safetensors(SafetensorsFile),
    /// Torch pickles cannot be read lazily; the file is loaded whole when one of its tensors is
    /// asked for, and kept until a tensor of another `.bin` file is.
    TorchBin,
}

struct WeightFile {
    path: PathBuf,
    kind: FileKind,
}

/// The tensors of a checkpoint, opened but not read.
/// A tensor's shape and its float32 data.
pub type Tensor2 = (Vec<usize>, Vec<f32>);

pub struct Checkpoint {
    label: PathBuf,
    files: Vec<WeightFile>,
    tensors: BTreeMap<String, (usize, TensorInfo)>,
    bin_cache: Option<(usize, HashMap<String, RawTensor>)>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("label", &self.label)
            .field(
                "files",
                &self.files.iter().map(|w| &w.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the model weights of a Hugging Face directory.
    pub fn open_dir(dir: &Path) -> Result<Self, CheckpointError> {
        let st_index = dir.join("model.safetensors.index.json");
        let st_single = dir.join("model.safetensors");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let bin_single = dir.join("pytorch_model.bin");
        if st_index.is_file() {
            Self::open_index(dir, &st_index)
        } else if st_single.is_file() {
            Self::open_files(dir, &[st_single])
        } else if bin_index.is_file() {
            Self::open_index(dir, &bin_index)
        } else if bin_single.is_file() {
            Self::open_files(dir, &[bin_single])
        } else {
            Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Whether `dir` holds model weights [`Checkpoint::open_dir`] can read.
    pub fn dir_has_weights(dir: &Path) -> bool {
        [
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ]
        .iter()
        .any(|name| dir.join(name).is_file())
    }

    /// Opens a sharded checkpoint through its index; every shard the index names must exist and
    /// hold the tensors listed for it.
    pub fn open_index(dir: &Path, index_path: &Path) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(index_path).map_err(|source| CheckpointError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Index {
                path: index_path.to_path_buf(),
                message: e.to_string(),
            })?;
        let mut shards: Vec<String> = index.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        let dir_of_index = index_path.parent().unwrap_or(dir);
        for shard in &shards {
            if !dir_of_index.join(shard).is_file() {
                let key = index
                    .weight_map
                    .iter()
                    .find(|(_, s)| *s == shard)
                    .map(|(k, _)| k.clone())
                    .unwrap_or_default();
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard.clone(),
                    key,
                });
            }
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir_of_index.join(s)).collect();
        let checkpoint = Self::open_files(dir, &paths)?;
        for (key, shard) in &index.weight_map {
            let shard_path = dir_of_index.join(shard);
            let holds = checkpoint
                .tensors
                .get(key)
                .is_some_and(|(file, _)| checkpoint.files[*file].path == shard_path);
            if !holds {
                return Err(CheckpointError::NotInShard {
                    index: index_path.to_path_buf(),
                    shard: shard_path,
                    key: key.clone(),
                });
            }
        }
        Ok(checkpoint)
    }

    /// Opens the given weight files (`.safetensors` or torch `.bin`) as one checkpoint; `label`
    /// names it in errors.
    pub fn open_files(label: &Path, paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut checkpoint = Checkpoint {
            label: label.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
            bin_cache: None,
        };
        for path in paths {
            let file_index = checkpoint.files.len();
            let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
            let (kind, infos) = if is_safetensors {
                open_safetensors(path)?
            } else {
                open_torch_bin(path)?
            };
            for (key, info) in infos {
                if let Some((other, _)) = checkpoint.tensors.get(&key) {
                    return Err(CheckpointError::Duplicate {
                        path: path.clone(),
                        other: checkpoint.files[*other].path.clone(),
                        key,
                    });
                }
                checkpoint.tensors.insert(key, (file_index, info));
            }
            checkpoint.files.push(WeightFile {
                path: path.clone(),
                kind,
            });
        }
        Ok(checkpoint)
    }

    /// The directory or file this checkpoint was opened from.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Dtype and shape of a tensor, without reading it.
    pub fn info(&self, key: &str) -> Result<&TensorInfo, CheckpointError> {
        self.tensors
            .get(key)
            .map(|(_, info)| info)
            .ok_or_else(|| CheckpointError::NotFound {
                dir: self.label.clone(),
                key: key.to_string(),
            })
    }

    /// The file holding a tensor.
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        self.tensors
            .get(key)
            .map(|(file, _)| self.files[*file].path.as_path())
    }

    /// The dtype most tensors are stored in (by bytes), e.g. `float16`.
    pub fn dominant_dtype(&self) -> Option<StoredDType> {
        let mut bytes: HashMap<&StoredDType, usize> = HashMap::new();
        for (_, info) in self.tensors.values() {
            *bytes.entry(&info.dtype).or_default() += info.numel();
        }
        bytes
            .into_iter()
            .max_by_key(|(dtype, n)| (*n, dtype.name().to_string()))
            .map(|(d, _)| d.clone())
    }

    /// Reads rows `rows` of a 2-D tensor stored in a safetensors file and converts them to
    /// float32 (`[rows.len(), cols]`); `Ok(None)` when the tensor lives in a torch `.bin` file,
    /// which is read whole.
    pub fn load_rows_f32(
        &mut self,
        key: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Option<Tensor2>, CheckpointError> {
        let (file_index, info) = self.info_at(key)?;
        let path = self.files[file_index].path.clone();
        let FileKind::Safetensors(file) = &self.files[file_index].kind else {
            return Ok(None);
        };
        let (n, cols) = match info.shape.as_slice() {
            [n, c] if rows.start <= rows.end && rows.end <= *n => (*n, *c),
            shape => {
                return Err(CheckpointError::Safetensors {
                    path,
                    message: format!("rows {rows:?} of tensor `{key}` with shape {shape:?}"),
                });
            }
        };
        let size = info
            .dtype
            .size()
            .ok_or_else(|| CheckpointError::UnsupportedDtype {
                path: path.clone(),
                key: key.to_string(),
                dtype: info.dtype.clone(),
            })?;
        let &(start, end) = file
            .ranges
            .get(key)
            .ok_or_else(|| CheckpointError::NotFound {
                dir: path.clone(),
                key: key.to_string(),
            })?;
        if end - start != n * cols * size {
            return Err(CheckpointError::Safetensors {
                path,
                message: format!("tensor `{key}` does not hold its shape {:?}", info.shape),
            });
        }
        let row_bytes = cols * size;
        let range = start + rows.start * row_bytes..start + rows.end * row_bytes;
        let data = convert_range(file, &path, key, &info, range)?;
        Ok(Some((vec![rows.len(), cols], data)))
    }

    fn info_at(&self, key: &str) -> Result<(usize, TensorInfo), CheckpointError> {
        self.tensors
            .get(key)
            .cloned()
            .ok_or_else(|| CheckpointError::NotFound {
                dir: self.label.clone(),
                key: key.to_string(),
            })
    }

    /// Reads one tensor and converts it to float32.
    pub fn load_f32(&mut self, key: &str) -> Result<Tensor2, CheckpointError> {
        let (file_index, info) = self.info_at(key)?;
        let path = self.files[file_index].path.clone();
        let data = match &self.files[file_index].kind {
            FileKind::Safetensors(file) => {
                let &(start, end) =
                    file.ranges
                        .get(key)
                        .ok_or_else(|| CheckpointError::NotFound {
                            dir: path.clone(),
                            key: key.to_string(),
                        })?;
                convert_range(file, &path, key, &info, start..end)?
            }
            FileKind::TorchBin => {
                if self
                    .bin_cache
                    .as_ref()
                    .is_none_or(|(cached, _)| *cached != file_index)
                {
                    self.bin_cache = None;
                    let tensors = read_torch_bin(&path).map_err(|e| CheckpointError::TorchBin {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                    self.bin_cache = Some((file_index, tensors.into_iter().collect()));
                }
                let raw = self
                    .bin_cache
                    .as_ref()
                    .and_then(|(_, tensors)| tensors.get(key))
                    .ok_or_else(|| CheckpointError::NotFound {
                        dir: path.clone(),
                        key: key.to_string(),
                    })?;
                if !raw.dtype.is_float() {
                    return Err(CheckpointError::UnsupportedDtype {
                        path,
                        key: key.to_string(),
                        dtype: info.dtype,
                    });
                }
                raw.to_f32().map_err(|e| CheckpointError::TorchBin {
                    path: path.clone(),
                    message: format!("tensor `{key}`: {e}"),
                })?
            }
        };
        if data.len() != info.numel() {
            return Err(CheckpointError::Safetensors {
                path,
                message: format!(
                    "tensor `{key}` holds {} elements, its shape {:?} needs {}",
                    data.len(),
                    info.shape,
                    info.numel()
                ),
            });
        }
        Ok((info.shape, data))
    }
}

fn open_safetensors(path: &Path) -> Result<(FileKind, Vec<(String, TensorInfo)>), CheckpointError> {
    let file = File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only; a checkpoint modified on disk while it is being read is
    // outside what this tool can guard against (as for every memory-mapped reader).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        CheckpointError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let data_start = 8 + header_len;
    let mut ranges = HashMap::new();
    let mut infos = Vec::new();
    for (name, info) in metadata.tensors() {
        let (begin, end) = info.data_offsets;
        ranges.insert(name.clone(), (data_start + begin, data_start + end));
        infos.push((
            name,
            TensorInfo {
                dtype: StoredDType::from_safetensors(info.dtype),
                shape: info.shape.clone(),
            },
        ));
    }
    Ok((
        FileKind::Safetensors(SafetensorsFile { mmap, ranges }),
        infos,
    ))
}

fn open_torch_bin(path: &Path) -> Result<(FileKind, Vec<(String, TensorInfo)>), CheckpointError> {
    let tensors = read_torch_bin(path).map_err(|e| CheckpointError::TorchBin {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let infos = tensors
        .iter()
        .map(|(name, raw)| {
            (
                name.clone(),
                TensorInfo {
                    dtype: bin_dtype(raw),
                    shape: raw.shape.clone(),
                },
            )
        })
        .collect();
    Ok((FileKind::TorchBin, infos))
}

fn bin_dtype(raw: &RawTensor) -> StoredDType {
    StoredDType::from_name(raw.dtype.torch_name())
}

/// Drop the mapped pages of a tensor once it has been converted, so resident memory stays at
/// about one tensor however large the checkpoint is (mapped file pages count as resident).
/// Bytes `range` of `file` (part or all of tensor `key`) as float32: prefetched, converted on all
/// threads, then released from this process's memory.
fn convert_range(
    file: &SafetensorsFile,
    path: &Path,
    key: &str,
    info: &TensorInfo,
    range: std::ops::Range<usize>,
) -> Result<Vec<f32>, CheckpointError> {
    let bytes = file
        .mmap
        .get(range.clone())
        .ok_or_else(|| CheckpointError::Safetensors {
            path: path.to_path_buf(),
            message: format!("tensor `{key}` lies outside the file"),
        })?;
    prefetch(&file.mmap, range.start, range.end);
    let data =
        bytes_to_f32(bytes, &info.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: key.to_string(),
            dtype: info.dtype.clone(),
        })?;
    release_pages(&file.mmap, range.start, range.end);
    Ok(data)
}

/// Starts reading a tensor's whole byte range ahead of its conversion, so the threads that
/// convert it find its pages in memory instead of faulting them in one readahead window at a time.
fn prefetch(mmap: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let aligned = start & !(PAGE - 1);
    if end > aligned {
        let _ = mmap.advise_range(memmap2::Advice::WillNeed, aligned, end - aligned);
    }
}

fn release_pages(mmap: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let aligned = start & !(PAGE - 1);
    if end > aligned {
        // SAFETY: the mapping is read-only and file-backed, and no reference into this range
        // outlives the conversion above; discarded pages are read again from the file if touched.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, end - aligned)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use safetensors::tensor::TensorView;

    fn write_st(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    TensorView::new(*d, s.clone(), b).expect("view"),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).expect("write safetensors");
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect()
    }

    #[test]
    fn single_file_keys_info_and_load() {
        let tmp = tempfile::tempdir().expect("tmp");
        write_st(
            &tmp.path().join("model.safetensors"),
            &[
                (
                    "b",
                    safetensors::Dtype::F16,
                    vec![2, 2],
                    f16_bytes(&[1.0, 2.0, 3.0, 4.0]),
                ),
                ("a", safetensors::Dtype::I64, vec![1], vec![0; 8]),
            ],
        );
        let mut ck = Checkpoint::open_dir(tmp.path()).expect("open");
        assert_eq!(ck.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            ck.info("b").expect("info"),
            &TensorInfo {
                dtype: StoredDType::F16,
                shape: vec![2, 2]
            }
        );
        assert_eq!(
            ck.load_f32("b").expect("load"),
            (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])
        );
        let err = ck.load_f32("a").expect_err("int").to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("`a`") && err.contains("I64"),
            "{err}"
        );
        let err = ck.load_f32("missing").expect_err("missing").to_string();
        assert!(err.contains("no tensor `missing`"), "{err}");
        assert_eq!(ck.dominant_dtype(), Some(StoredDType::F16));
    }

    #[test]
    fn sharded_index_and_missing_shard() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        write_st(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("x", safetensors::Dtype::F16, vec![1], f16_bytes(&[0.5]))],
        );
        write_st(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("y", safetensors::Dtype::F16, vec![1], f16_bytes(&[1.5]))],
        );
        let index = r#"{"metadata": {"total_size": 4}, "weight_map": {
            "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).expect("index");
        let mut ck = Checkpoint::open_dir(dir).expect("open");
        assert_eq!(ck.load_f32("y").expect("y").1, vec![1.5]);
        assert!(
            ck.file_of("x")
                .is_some_and(|p| p.ends_with("model-00001-of-00002.safetensors"))
        );

        let index = index.replace(
            "\"y\": \"model-00002-of-00002",
            "\"y\": \"model-00003-of-00002",
        );
        std::fs::write(dir.join("model.safetensors.index.json"), index).expect("index");
        let err = Checkpoint::open_dir(dir)
            .expect_err("missing shard")
            .to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains("model-00003-of-00002.safetensors"),
            "{err}"
        );
        assert!(
            err.contains("`y`") && err.contains("does not exist"),
            "{err}"
        );

        let index = r#"{"weight_map": {"x": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.join("model.safetensors.index.json"), index).expect("index");
        let err = Checkpoint::open_dir(dir)
            .expect_err("key not in shard")
            .to_string();
        assert!(
            err.contains("`z`") && err.contains("does not contain it"),
            "{err}"
        );
    }

    #[test]
    fn empty_dir_is_a_clear_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = Checkpoint::open_dir(tmp.path())
            .expect_err("empty")
            .to_string();
        assert!(err.contains("no weights found"), "{err}");
    }

    #[test]
    fn truncated_file_names_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("model.safetensors");
        write_st(
            &path,
            &[("x", safetensors::Dtype::F16, vec![4], f16_bytes(&[1.0; 4]))],
        );
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 2]).expect("truncate");
        let err = Checkpoint::open_dir(tmp.path())
            .expect_err("truncated")
            .to_string();
        assert!(
            err.contains("model.safetensors: not a valid safetensors file"),
            "{err}"
        );
    }
}
