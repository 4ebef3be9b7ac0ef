//! PyTorch checkpoints (`.bin`, `.pt`, `.pth`, alone or sharded with
//! `pytorch_model.bin.index.json`), read through burn-store's PyTorch reader (the pickle stream
//! parsed in Rust, only tensors rebuilt, no Python); never written.

use std::path::{Path, PathBuf};

use burn::store::burn_pack;
use burn::store::{ModuleStore, PytorchStore};

use crate::checkpoint::error::CheckpointError;
use crate::checkpoint::read::{
    Checkpoint, Data, Entry, Format, ShardInfo, Storage, format_error, missing_from_shards,
    read_index,
};

/// Tensors rebuilt by burn-store's PyTorch reader, each read when it is needed.
struct Pytorch {
    /// In the order of the entries.
    tensors: Vec<burn_pack::Tensor>,
    /// The shard files, as the index names them (one for a single file).
    files: Vec<String>,
}

impl Storage for Pytorch {
    fn bytes(&self, index: usize, entry: &Entry) -> Result<Data<'_>, String> {
        let tensor = self
            .tensors
            .get(index)
            .ok_or_else(|| format!("tensor `{}` is not listed", entry.name))?;
        let bytes = caught(|| tensor.to_bytes())?.map_err(|e| e.to_string())?;
        if bytes.len() != entry.bytes {
            return Err(format!(
                "{} bytes read, {} expected from its dtype and shape",
                bytes.len(),
                entry.bytes
            ));
        }
        Ok(Data::Read(bytes))
    }

    /// Written as safetensors: `pytorch_model-00001-of-00002.bin` becomes
    /// `model-00001-of-00002.safetensors`.
    fn shards(&self) -> Vec<ShardInfo> {
        if self.files.len() < 2 {
            return vec![(String::new(), None)];
        }
        self.files
            .iter()
            .map(|f| {
                let stem = f.strip_suffix(".bin").unwrap_or(f);
                let stem = stem.strip_prefix("pytorch_").unwrap_or(stem);
                (format!("{stem}.safetensors"), None)
            })
            .collect()
    }

    fn files(&self, path: &Path) -> Vec<PathBuf> {
        if self.files.len() < 2 {
            return vec![path.to_path_buf()];
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut all: Vec<PathBuf> = self.files.iter().map(|f| dir.join(f)).collect();
        all.push(path.to_path_buf());
        all
    }
}

/// Opens one PyTorch file.
pub(in crate::checkpoint) fn open_pytorch(
    path: &Path,
    file: String,
) -> Result<Checkpoint, CheckpointError> {
    let (tensors, entries) = read_pytorch(path, 0, |_| true)?;
    let storage = Pytorch {
        tensors,
        files: vec![file],
    };
    Ok(Checkpoint::new(
        path,
        Format::Pytorch,
        entries,
        Box::new(storage),
    ))
}

/// Opens a sharded PyTorch checkpoint from its index file.
pub(in crate::checkpoint) fn open_pytorch_sharded(
    index: &Path,
) -> Result<Checkpoint, CheckpointError> {
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
    let storage = Pytorch { tensors, files };
    Ok(Checkpoint::new(
        index,
        Format::Pytorch,
        entries,
        Box::new(storage),
    ))
}

/// `read()`, with a panic inside burn-store's PyTorch reader (a damaged pickle stream it does
/// not expect) caught and turned into an error.
fn caught<T>(read: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a damaged file");
        format!("the reader failed ({why})")
    })
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
    let unreadable =
        |e: String| format_error(path, format!("not a readable PyTorch checkpoint: {e}"));
    let all = caught(|| {
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        store.get_all_tensors().cloned()
    })
    .map_err(unreadable)?
    .map_err(|e| unreadable(e.to_string()))?;
    let tensors: Vec<burn_pack::Tensor> = all
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(_, t)| t.clone())
        .collect();
    let entries = tensors.iter().map(|t| Entry::of(t, shard, None)).collect();
    Ok((tensors, entries))
}
