//! Reading checkpoints: `.safetensors` files (memory-mapped), Hugging Face sharded folders, and
//! Burn's `.bpk` burnpack files (file-backed, each tensor read from disk when it is needed).
//!
//! Nothing here parses a binary format: safetensors files are validated by the `safetensors`
//! crate, burnpack files by burn-store's reader, index files by serde_json.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use burn::store::burn_pack::{self, Bytes, Reader, Scalar};
use burn::tensor::DType;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};

use super::convert::{from_safetensors, label};
use super::error::CheckpointError;

/// The index file of a Hugging Face sharded checkpoint.
pub(crate) const INDEX: &str = "model.safetensors.index.json";

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One `.safetensors` file.
    Safetensors,
    /// A Hugging Face sharded checkpoint: `.safetensors` shards and an index file.
    Sharded,
    /// A Burn burnpack file (`.bpk`).
    Burnpack,
}

/// One tensor of a checkpoint, as its file describes it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    /// `None`: a dtype Burn has no type for (the label says which).
    pub(crate) dtype: Option<DType>,
    pub(crate) label: String,
    pub(crate) shape: Vec<usize>,
    /// The shard it is stored in (0 outside sharded checkpoints).
    pub(crate) shard: usize,
    /// A burnpack parameter id.
    pub(crate) param_id: Option<u64>,
    /// Its length in bytes.
    pub(crate) bytes: usize,
}

/// One memory-mapped, validated safetensors file.
struct Shard {
    /// The file name, as the index names it.
    file: String,
    map: Mmap,
    header: usize,
    metadata: Metadata,
}

enum Storage {
    Safetensors {
        shards: Vec<Shard>,
        /// The `metadata` object of the index file.
        index_metadata: serde_json::Map<String, serde_json::Value>,
    },
    Burnpack {
        /// In the order of the entries.
        tensors: Vec<burn_pack::Tensor>,
        metadata: BTreeMap<String, String>,
        scalars: BTreeMap<String, Scalar>,
    },
}

/// A checkpoint opened for merging: a `.safetensors` file, a Hugging Face sharded checkpoint (a
/// folder with `model.safetensors.index.json`, or that index file) or a `.bpk` burnpack file.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    storage: Storage,
}

/// A tensor's bytes: borrowed from a memory map, or read from a burnpack file.
pub(crate) enum Data<'a> {
    Mapped(&'a [u8]),
    Read(Bytes),
}

impl Deref for Data<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(bytes) => bytes,
            Data::Read(bytes) => bytes,
        }
    }
}

/// The first four bytes of every burnpack file ("BURN", little-endian).
const BURNPACK_MAGIC: [u8; 4] = burn_pack::MAGIC_NUMBER.to_le_bytes();

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Shard {
    fn open(path: &Path, file: String) -> Result<Self, CheckpointError> {
        let handle = File::open(path).map_err(io(path))?;
        // SAFETY: the map is read-only and lives as long as this value; a file truncated by
        // another process while mapped would fault, as for any reader of a mapped file.
        let map = unsafe { Mmap::map(&handle) }.map_err(io(path))?;
        let invalid = |e: safetensors::SafeTensorError| {
            format_error(path, format!("not a valid safetensors file: {e}"))
        };
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(invalid)?;
        // The whole file is checked once here (every offset inside the data section).
        SafeTensors::deserialize(&map).map_err(invalid)?;
        Ok(Self {
            file,
            map,
            header,
            metadata,
        })
    }

    fn bytes(&self, name: &str) -> &[u8] {
        let info = self.metadata.info(name).expect("a validated name");
        let start = 8 + self.header;
        &self.map[start + info.data_offsets.0..start + info.data_offsets.1]
    }

    fn entries(&self, shard: usize, keep: impl Fn(&str) -> bool) -> Vec<Entry> {
        self.metadata
            .offset_keys()
            .into_iter()
            .filter(|name| keep(name))
            .map(|name| {
                let info = self.metadata.info(&name).expect("listed");
                Entry {
                    dtype: from_safetensors(info.dtype),
                    label: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    shard,
                    param_id: None,
                    bytes: info.data_offsets.1 - info.data_offsets.0,
                    name,
                }
            })
            .collect()
    }
}

impl Checkpoint {
    /// Opens and validates a checkpoint: every header, dtype and offset; for a sharded one, also
    /// that each tensor the index names is in its shard. A file is read as burnpack when its
    /// name ends in `.bpk` or it starts with burnpack's magic number, as safetensors otherwise.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] or [`CheckpointError::Format`], naming the file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        if path.is_dir() {
            return Self::open_sharded(path, &path.join(INDEX));
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_sharded(path, path);
        }
        let mut magic = [0u8; 4];
        let is_burnpack = path.extension().is_some_and(|e| e == "bpk")
            || File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok_and(|()| magic == BURNPACK_MAGIC);
        if is_burnpack {
            return Self::open_burnpack(path);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shard = Shard::open(path, name)?;
        let entries = shard.entries(0, |_| true);
        Ok(Self::new(
            path,
            Format::Safetensors,
            entries,
            Storage::Safetensors {
                shards: vec![shard],
                index_metadata: Default::default(),
            },
        ))
    }

    fn open_sharded(path: &Path, index: &Path) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(index).map_err(io(index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format_error(index, format!("not a valid index file: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_error(index, "no `weight_map` object"))?;
        let index_metadata = match json.get("metadata") {
            None | Some(serde_json::Value::Null) => Default::default(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(_) => return Err(format_error(index, "`metadata` is not an object")),
        };
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        let mut wanted: HashMap<String, String> = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format_error(index, format!("`{name}` maps to a non-string")))?;
            if Path::new(file).components().count() != 1 {
                return Err(format_error(
                    index,
                    format!("`{name}` maps to `{file}`, which is not a file name in the folder"),
                ));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            wanted.insert(name.clone(), file.to_string());
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let shard = Shard::open(&dir.join(file), file.clone())?;
            entries.extend(shard.entries(i, |name| wanted.get(name).is_some_and(|f| f == file)));
            shards.push(shard);
        }
        if entries.len() != wanted.len() {
            let found: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            let mut lost: Vec<String> = wanted
                .iter()
                .filter(|(n, _)| !found.contains(n.as_str()))
                .map(|(n, f)| format!("{n} (in {f})"))
                .collect();
            lost.sort();
            return Err(format_error(
                index,
                format!(
                    "tensors named by the index are missing from their shard: {}",
                    lost.join(", ")
                ),
            ));
        }
        Ok(Self::new(
            path,
            Format::Sharded,
            entries,
            Storage::Safetensors {
                shards,
                index_metadata,
            },
        ))
    }

    fn open_burnpack(path: &Path) -> Result<Self, CheckpointError> {
        let invalid = |e: burn_pack::Error| match e {
            burn_pack::Error::IoError(message) => CheckpointError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(message),
            },
            other => format_error(path, format!("not a valid burnpack file: {other}")),
        };
        // The exact path: no extension is guessed, so the message names the file given.
        let reader = Reader::from_file_exact(path).map_err(invalid)?;
        let metadata = reader.metadata().clone();
        let scalars = reader.scalars().clone();
        let tensors = reader.into_tensors().map_err(invalid)?;
        let entries = tensors
            .iter()
            .map(|t| Entry {
                name: t.name.clone(),
                dtype: Some(t.dtype),
                label: label(t.dtype),
                shape: t.shape.to_vec(),
                shard: 0,
                param_id: t.param_id,
                bytes: t.byte_len(),
            })
            .collect();
        Ok(Self::new(
            path,
            Format::Burnpack,
            entries,
            Storage::Burnpack {
                tensors,
                metadata,
                scalars,
            },
        ))
    }

    fn new(path: &Path, format: Format, entries: Vec<Entry>, storage: Storage) -> Self {
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            format,
            entries,
            by_name,
            storage,
        }
    }

    /// Tensor names in file order (shard by shard; burnpack files list them sorted).
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// `(dtype, shape)` of a tensor, the dtype as printed by `inspect` (`F32`, `BF16`, `I64`,
    /// `BOOL`, …).
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        self.entry(name).map(|e| (e.label.clone(), e.shape.clone()))
    }

    /// The format it was read as.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Key/value metadata: a safetensors file's `__metadata__` (the first shard's), or a
    /// burnpack file's metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        match &self.storage {
            Storage::Safetensors { shards, .. } => shards
                .first()
                .and_then(|s| s.metadata.metadata().clone())
                .unwrap_or_default(),
            Storage::Burnpack { metadata, .. } => metadata.clone().into_iter().collect(),
        }
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The shards' file names and `__metadata__` (one unnamed shard for other formats).
    pub(crate) fn shards(&self) -> Vec<(String, Option<HashMap<String, String>>)> {
        match &self.storage {
            Storage::Safetensors { shards, .. } => shards
                .iter()
                .map(|s| (s.file.clone(), s.metadata.metadata().clone()))
                .collect(),
            Storage::Burnpack { .. } => vec![(String::new(), Some(self.metadata()))],
        }
    }

    /// The `metadata` object of a sharded checkpoint's index file.
    pub(crate) fn index_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        match &self.storage {
            Storage::Safetensors { index_metadata, .. } => index_metadata.clone(),
            Storage::Burnpack { .. } => Default::default(),
        }
    }

    /// A burnpack file's typed scalars.
    pub(crate) fn scalars(&self) -> BTreeMap<String, Scalar> {
        match &self.storage {
            Storage::Burnpack { scalars, .. } => scalars.clone(),
            Storage::Safetensors { .. } => BTreeMap::new(),
        }
    }

    /// Every file the checkpoint is made of.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        match (&self.storage, self.format) {
            (Storage::Safetensors { shards, .. }, Format::Sharded) => {
                let dir = if self.path.is_dir() {
                    self.path.clone()
                } else {
                    self.path.parent().unwrap_or(Path::new(".")).to_path_buf()
                };
                let mut files: Vec<PathBuf> = shards.iter().map(|s| dir.join(&s.file)).collect();
                files.push(dir.join(INDEX));
                files.push(dir);
                files
            }
            _ => vec![self.path.clone()],
        }
    }

    /// A tensor's bytes (little-endian, as stored).
    pub(crate) fn bytes(&self, name: &str) -> Result<Data<'_>, CheckpointError> {
        let i = self.by_name[name];
        match &self.storage {
            Storage::Safetensors { shards, .. } => {
                Ok(Data::Mapped(shards[self.entries[i].shard].bytes(name)))
            }
            Storage::Burnpack { tensors, .. } => {
                tensors[i].to_bytes().map(Data::Read).map_err(|e| {
                    format_error(&self.path, format!("tensor `{name}` cannot be read: {e}"))
                })
            }
        }
    }
}
