//! Safetensors checkpoints, memory-mapped: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors of dtype F16, BF16 or F32 come out as F16 (the storage
//! type of every weight matrix) or F32 (norms and biases, which are small).
//!
//! Each file's header is validated when opened (`safetensors::SafeTensors::read_metadata` checks
//! that the offsets cover exactly the file, so a truncated download fails here, naming the file).

use super::ModelError;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One mapped `.safetensors` file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset where tensor data begins (8-byte length + JSON header).
    data_start: usize,
    meta: Metadata,
}

/// All tensors of a checkpoint directory, by name.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    names: HashMap<String, usize>,
    /// The file tensors are reported against when missing (the index, or the single file).
    origin: PathBuf,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
            let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
                return Err(ModelError::MissingField {
                    path: index,
                    field: "weight_map".into(),
                });
            };
            let mut files: Vec<String> = Vec::new();
            let mut want: HashMap<String, String> = HashMap::new();
            for (name, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(ModelError::BadField {
                        path: index,
                        field: format!("weight_map.{name}"),
                        reason: "expected a file name".into(),
                    });
                };
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
                want.insert(name.clone(), file.to_string());
            }
            files.sort();
            let mut shards = Vec::with_capacity(files.len());
            for f in &files {
                shards.push(Shard::open(&dir.join(f))?);
            }
            let mut names = HashMap::new();
            for (name, file) in want {
                let i = files.iter().position(|f| *f == file).unwrap_or(0);
                if shards[i].meta.info(&name).is_none() {
                    return Err(ModelError::MissingTensor {
                        path: shards[i].path.clone(),
                        tensor: name,
                    });
                }
                names.insert(name, i);
            }
            Ok(Self {
                shards,
                names,
                origin: index,
            })
        } else {
            let path = dir.join("model.safetensors");
            let shard = Shard::open(&path)?;
            let names = shard.meta.tensors().into_keys().map(|n| (n, 0)).collect();
            Ok(Self {
                shards: vec![shard],
                names,
                origin: path,
            })
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Tensor names, sorted (for diagnostics).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.names.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Loads `name` as F16, checking that its shape is `shape`.
    pub fn f16(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>, ModelError> {
        let (dtype, bytes) = self.raw(name, shape)?;
        Ok(match dtype {
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32()))
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
        })
    }

    /// Loads `name` as F32 (for norm weights and biases), checking its shape.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (dtype, bytes) = self.raw(name, shape)?;
        Ok(match dtype {
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        })
    }

    fn raw(&self, name: &str, shape: &[usize]) -> Result<(Dtype, &[u8]), ModelError> {
        let Some(&i) = self.names.get(name) else {
            return Err(ModelError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.into(),
            });
        };
        let s = &self.shards[i];
        let Some(info) = s.meta.info(name) else {
            return Err(ModelError::MissingTensor {
                path: s.path.clone(),
                tensor: name.into(),
            });
        };
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                path: s.path.clone(),
                tensor: name.into(),
                found: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        if !matches!(info.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
            return Err(ModelError::WrongDtype {
                path: s.path.clone(),
                tensor: name.into(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let (a, b) = info.data_offsets;
        // read_metadata validated that every tensor's offsets lie inside the file and match its
        // shape × dtype size, so this range is in bounds.
        let bytes = s
            .mmap
            .get(s.data_start + a..s.data_start + b)
            .ok_or_else(|| ModelError::BadSafetensors {
                path: s.path.clone(),
                reason: format!("tensor `{name}` out of bounds"),
            })?;
        Ok((info.dtype, bytes))
    }
}

/// Maps a checkpoint file read-only (safetensors shards, GGUF files).
pub(crate) fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })?;
    // SAFETY: the file is mapped read-only; a checkpoint modified on disk while we run is
    // outside what any loader can defend against (the same contract as safetensors' own docs).
    unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })
}

impl Shard {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let mmap = map_file(path)?;
        let (n, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::BadSafetensors {
                path: path.into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path: path.into(),
            mmap,
            data_start: 8 + n,
            meta,
        })
    }
}
