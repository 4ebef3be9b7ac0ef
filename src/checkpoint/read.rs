//! Reading checkpoints: `.safetensors` files (memory-mapped), Hugging Face model folders
//! (`model.safetensors`, sharded safetensors with their index, `pytorch_model.bin` alone or
//! sharded), PyTorch files (`.bin`, `.pt`, `.pth`), Burn's `.bpk` burnpack files (file-backed,
//! each tensor read from disk when it is needed), and models in the local Hugging Face cache.
//!
//! Nothing here parses a binary format: safetensors files are validated by the `safetensors`
//! crate, burnpack files by burn-store's reader, PyTorch files by burn-store's PyTorch reader
//! (the pickle stream parsed in Rust, only tensors rebuilt, no Python), index files by
//! serde_json.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use burn::store::burn_pack::{self, Bytes, Scalar};
use burn::tensor::DType;

use super::convert::label;
use super::error::CheckpointError;

/// The index file of a Hugging Face sharded checkpoint.
pub(crate) const INDEX: &str = "model.safetensors.index.json";
/// The weights file of a Hugging Face model folder with one file.
pub(crate) const SINGLE: &str = "model.safetensors";
/// The index file of a sharded PyTorch checkpoint.
pub(crate) const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";
/// The weights file of an older model folder with one PyTorch file.
pub(crate) const PYTORCH_SINGLE: &str = "pytorch_model.bin";
/// The largest index file read.
const MAX_INDEX: u64 = 64 << 20;
/// What a model folder is searched for, in this order.
pub(crate) const FOLDER_WEIGHTS: [&str; 4] = [INDEX, SINGLE, PYTORCH_INDEX, PYTORCH_SINGLE];

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One `.safetensors` file.
    Safetensors,
    /// A Hugging Face sharded checkpoint: `.safetensors` shards and an index file.
    Sharded,
    /// A Burn burnpack file (`.bpk`).
    Burnpack,
    /// A PyTorch checkpoint (`.bin`, `.pt`, `.pth`, or shards with `pytorch_model.bin.index.json`):
    /// read only, never written.
    Pytorch,
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

impl Entry {
    /// The entry of a tensor burn-store's readers rebuilt (burnpack or PyTorch).
    pub(super) fn of(t: &burn_pack::Tensor, shard: usize, param_id: Option<u64>) -> Self {
        Entry {
            name: t.name.clone(),
            dtype: Some(t.dtype),
            label: label(t.dtype),
            shape: t.shape.to_vec(),
            shard,
            param_id,
            bytes: t.byte_len(),
        }
    }
}

/// A shard's file name and its `__metadata__`.
pub(crate) type ShardInfo = (String, Option<HashMap<String, String>>);

/// Where a checkpoint's tensors are read from, once its entries are listed.
pub(crate) trait Storage: Send + Sync {
    /// The bytes (little-endian, as stored) of the `index`-th entry; the error says why not.
    fn bytes(&self, index: usize, entry: &Entry) -> Result<Data<'_>, String>;

    /// The shards' file names and `__metadata__` (one unnamed shard for unsharded formats).
    fn shards(&self) -> Vec<ShardInfo>;

    /// Key/value metadata the file carries (safetensors `__metadata__`, burnpack metadata).
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }

    /// The `metadata` object of a sharded checkpoint's index file.
    fn index_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        Default::default()
    }

    /// Typed scalars (burnpack).
    fn scalars(&self) -> BTreeMap<String, Scalar> {
        BTreeMap::new()
    }

    /// Every file the weights are read from, `path` being what the checkpoint was opened
    /// from.
    fn files(&self, path: &Path) -> Vec<PathBuf> {
        vec![path.to_path_buf()]
    }
}

/// A checkpoint opened for merging: a `.safetensors` file, a Hugging Face sharded checkpoint (a
/// folder with `model.safetensors.index.json`, or that index file) or a `.bpk` burnpack file.
pub struct Checkpoint {
    path: PathBuf,
    /// The model folder it was found in (config, tokenizer), when it was given as one.
    pub(super) folder: Option<PathBuf>,
    format: Format,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    storage: Box<dyn Storage>,
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

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn format_error(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Checkpoint {
    pub(super) fn new(
        path: &Path,
        format: Format,
        entries: Vec<Entry>,
        storage: Box<dyn Storage>,
    ) -> Self {
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            folder: None,
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

    /// The path it was opened from (the weights file or index, for a model folder).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model folder it was found in, when it was given as one (a folder, or a model of the
    /// Hugging Face cache): where its `config.json` and tokenizer files are.
    pub fn folder(&self) -> Option<&Path> {
        self.folder.as_deref()
    }

    /// Key/value metadata: a safetensors file's `__metadata__` (the first shard's), or a
    /// burnpack file's metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.storage.metadata()
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The shards' file names and `__metadata__` (one unnamed shard for other formats).
    pub(crate) fn shards(&self) -> Vec<ShardInfo> {
        self.storage.shards()
    }

    /// The `metadata` object of a sharded checkpoint's index file.
    pub(crate) fn index_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        self.storage.index_metadata()
    }

    /// A burnpack file's typed scalars.
    pub(crate) fn scalars(&self) -> BTreeMap<String, Scalar> {
        self.storage.scalars()
    }

    /// Every file the checkpoint is made of (and its model folder).
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        let mut files = self.storage.files(&self.path);
        files.extend(self.folder.clone());
        files
    }

    /// A tensor's bytes (little-endian, as stored).
    pub(crate) fn bytes(&self, name: &str) -> Result<Data<'_>, CheckpointError> {
        let found = self.by_name.get(name).map(|&i| (i, &self.entries[i]));
        let Some((index, entry)) = found else {
            return Err(format_error(
                &self.path,
                format!("tensor `{name}` is not in this checkpoint"),
            ));
        };
        self.storage
            .bytes(index, entry)
            .map_err(|e| format_error(&self.path, format!("tensor `{name}` cannot be read: {e}")))
    }
}

/// The shard files an index names, in first-mention order, each tensor's file, and the index's
/// `metadata` object.
#[allow(clippy::type_complexity)]
pub(super) fn read_index(
    index: &Path,
) -> Result<
    (
        Vec<String>,
        HashMap<String, String>,
        serde_json::Map<String, serde_json::Value>,
    ),
    CheckpointError,
> {
    // A real index is a few hundred kilobytes; a larger one is refused before it is read.
    let len = std::fs::metadata(index).map_err(io(index))?.len();
    if len > MAX_INDEX {
        return Err(format_error(
            index,
            format!("{len} bytes, more than an index file holds (at most {MAX_INDEX})"),
        ));
    }
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
    Ok((files, wanted, index_metadata))
}

/// An error naming every tensor the index names that its shard does not hold.
pub(super) fn missing_from_shards(
    index: &Path,
    entries: &[Entry],
    wanted: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    if entries.len() == wanted.len() {
        return Ok(());
    }
    let found: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut lost: Vec<String> = wanted
        .iter()
        .filter(|(n, _)| !found.contains(n.as_str()))
        .map(|(n, f)| format!("{n} (in {f})"))
        .collect();
    lost.sort();
    Err(format_error(
        index,
        format!(
            "tensors named by the index are missing from their shard: {}",
            lost.join(", ")
        ),
    ))
}
