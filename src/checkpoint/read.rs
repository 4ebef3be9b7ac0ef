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
use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use burn::store::burn_pack::{self, Bytes, Reader, Scalar};
use burn::store::{ModuleStore, PytorchStore};
use burn::tensor::DType;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};

use super::convert::{from_safetensors, label};
use super::error::CheckpointError;

/// The index file of a Hugging Face sharded checkpoint.
pub(crate) const INDEX: &str = "model.safetensors.index.json";
/// The weights file of a Hugging Face model folder with one file.
pub(crate) const SINGLE: &str = "model.safetensors";
/// The index file of a sharded PyTorch checkpoint.
const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";
/// The weights file of an older model folder with one PyTorch file.
const PYTORCH_SINGLE: &str = "pytorch_model.bin";
/// What a model folder is searched for, in this order.
const FOLDER_WEIGHTS: [&str; 4] = [INDEX, SINGLE, PYTORCH_INDEX, PYTORCH_SINGLE];

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
    fn of(t: &burn_pack::Tensor, shard: usize, param_id: Option<u64>) -> Self {
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
    /// Tensors rebuilt by burn-store's PyTorch reader, each read when it is needed.
    Pytorch {
        /// In the order of the entries.
        tensors: Vec<burn_pack::Tensor>,
        /// The shard files, as the index names them (one for a single file).
        files: Vec<String>,
    },
}

/// A checkpoint opened for merging: a `.safetensors` file, a Hugging Face sharded checkpoint (a
/// folder with `model.safetensors.index.json`, or that index file) or a `.bpk` burnpack file.
pub struct Checkpoint {
    path: PathBuf,
    /// The model folder it was found in (config, tokenizer), when it was given as one.
    folder: Option<PathBuf>,
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
    /// that each tensor the index names is in its shard.
    ///
    /// `path` is a file, a model folder, or a model in the local Hugging Face cache
    /// (`org/name`, `org/name@revision`; see `docs/guide.md`). A model folder is read from the first
    /// of `model.safetensors.index.json`, `model.safetensors`, `pytorch_model.bin.index.json`
    /// and `pytorch_model.bin` it holds. A file is read as burnpack when its name ends in
    /// `.bpk` or it starts with burnpack's magic number, as PyTorch when it ends in `.bin`,
    /// `.pt` or `.pth`, as an index when it ends in `.index.json`, as safetensors otherwise.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] or [`CheckpointError::Format`], naming the file (for a folder
    /// holding no checkpoint, what was looked for; for a hub name, where it was looked up).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let resolved = super::hub::resolve(path)?;
        let path = resolved.as_path();
        if path.is_dir() {
            let Some(file) = FOLDER_WEIGHTS.iter().find(|f| path.join(f).is_file()) else {
                return Err(format_error(
                    path,
                    format!(
                        "a folder holding no checkpoint (looked for {})",
                        FOLDER_WEIGHTS.join(", ")
                    ),
                ));
            };
            let mut checkpoint = Self::open_file(&path.join(file))?;
            checkpoint.folder = Some(path.to_path_buf());
            return Ok(checkpoint);
        }
        Self::open_file(path)
    }

    fn open_file(path: &Path) -> Result<Self, CheckpointError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".bin.index.json") {
            return Self::open_pytorch_sharded(path);
        }
        if name.ends_with(".index.json") {
            return Self::open_sharded(path, path);
        }
        if path
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
        {
            let (tensors, entries) = read_pytorch(path, 0, |_| true)?;
            return Ok(Self::new(
                path,
                Format::Pytorch,
                entries,
                Storage::Pytorch {
                    tensors,
                    files: vec![name],
                },
            ));
        }
        let mut magic = [0u8; 4];
        let is_burnpack = path.extension().is_some_and(|e| e == "bpk")
            || File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok_and(|()| magic == BURNPACK_MAGIC);
        if is_burnpack {
            return Self::open_burnpack(path);
        }
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

    fn open_pytorch_sharded(index: &Path) -> Result<Self, CheckpointError> {
        let (files, wanted, _) = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let (mut tensors, mut entries) = (Vec::new(), Vec::new());
        for (i, file) in files.iter().enumerate() {
            let (t, e) = read_pytorch(&dir.join(file), i, |name| {
                wanted.get(name).is_some_and(|f| f == file)
            })?;
            tensors.extend(t);
            entries.extend(e);
        }
        missing_from_shards(index, &entries, &wanted)?;
        Ok(Self::new(
            index,
            Format::Pytorch,
            entries,
            Storage::Pytorch { tensors, files },
        ))
    }

    fn open_sharded(path: &Path, index: &Path) -> Result<Self, CheckpointError> {
        let (files, wanted, index_metadata) = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let shard = Shard::open(&dir.join(file), file.clone())?;
            entries.extend(shard.entries(i, |name| wanted.get(name).is_some_and(|f| f == file)));
            shards.push(shard);
        }
        missing_from_shards(index, &entries, &wanted)?;
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
            .map(|t| Entry::of(t, 0, t.param_id))
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
        match &self.storage {
            Storage::Safetensors { shards, .. } => shards
                .first()
                .and_then(|s| s.metadata.metadata().clone())
                .unwrap_or_default(),
            Storage::Burnpack { metadata, .. } => metadata.clone().into_iter().collect(),
            Storage::Pytorch { .. } => HashMap::new(),
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
            // Written as safetensors: `pytorch_model-00001-of-00002.bin` becomes
            // `model-00001-of-00002.safetensors`.
            Storage::Pytorch { files, .. } if files.len() > 1 => files
                .iter()
                .map(|f| {
                    let stem = f.strip_suffix(".bin").unwrap_or(f);
                    let stem = stem.strip_prefix("pytorch_").unwrap_or(stem);
                    (format!("{stem}.safetensors"), None)
                })
                .collect(),
            Storage::Pytorch { .. } => vec![(String::new(), None)],
        }
    }

    /// The `metadata` object of a sharded checkpoint's index file.
    pub(crate) fn index_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        match &self.storage {
            Storage::Safetensors { index_metadata, .. } => index_metadata.clone(),
            Storage::Burnpack { .. } | Storage::Pytorch { .. } => Default::default(),
        }
    }

    /// A burnpack file's typed scalars.
    pub(crate) fn scalars(&self) -> BTreeMap<String, Scalar> {
        match &self.storage {
            Storage::Burnpack { scalars, .. } => scalars.clone(),
            Storage::Safetensors { .. } | Storage::Pytorch { .. } => BTreeMap::new(),
        }
    }

    /// Every file the checkpoint is made of.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        let mut files = self.weight_files();
        files.extend(self.folder.clone());
        files
    }

    fn weight_files(&self) -> Vec<PathBuf> {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        match (&self.storage, self.format) {
            (Storage::Pytorch { files, .. }, _) if files.len() > 1 => {
                let mut all: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
                all.push(self.path.clone());
                all
            }
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
            Storage::Burnpack { tensors, .. } | Storage::Pytorch { tensors, .. } => {
                tensors[i].to_bytes().map(Data::Read).map_err(|e| {
                    format_error(&self.path, format!("tensor `{name}` cannot be read: {e}"))
                })
            }
        }
    }
}

/// The shard files an index names, in first-mention order, each tensor's file, and the index's
/// `metadata` object.
#[allow(clippy::type_complexity)]
fn read_index(
    index: &Path,
) -> Result<
    (
        Vec<String>,
        HashMap<String, String>,
        serde_json::Map<String, serde_json::Value>,
    ),
    CheckpointError,
> {
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
fn missing_from_shards(
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

/// The tensors of one PyTorch file that `keep` keeps (sorted by name), with their entries in
/// shard `shard`: names and layouts as stored (no index renumbering, no transposition).
fn read_pytorch(
    path: &Path,
    shard: usize,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<burn_pack::Tensor>, Vec<Entry>), CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
    let all = store
        .get_all_tensors()
        .map_err(|e| format_error(path, format!("not a readable PyTorch checkpoint: {e}")))?;
    let tensors: Vec<burn_pack::Tensor> = all
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(_, t)| t.clone())
        .collect();
    let entries = tensors.iter().map(|t| Entry::of(t, shard, None)).collect();
    Ok((tensors, entries))
}
