//! Safetensors: one `.safetensors` file (memory-mapped, validated by the `safetensors` crate),
//! or a Hugging Face sharded checkpoint (`model.safetensors.index.json` and its shards); written
//! as one file, or as a folder of shards laid out like the first input's, with the index.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};

use crate::checkpoint::compute::Run;
use crate::checkpoint::convert::{from_safetensors, to_safetensors};
use crate::checkpoint::error::CheckpointError;
use crate::checkpoint::fault::Registered;
use crate::checkpoint::layout::Layout;
use crate::checkpoint::plan::OutputTensor;
use crate::checkpoint::read::{
    Checkpoint, Data, Entry, Format, INDEX, SINGLE, ShardInfo, Storage, format_error, io,
    missing_from_shards, read_index,
};

/// One memory-mapped, validated safetensors file.
struct Shard {
    /// The file name, as the index names it.
    file: String,
    map: Mmap,
    header: usize,
    metadata: Metadata,
    /// The map, known to the bus-error handler while it lives.
    _registered: Registered,
}

impl Shard {
    fn open(path: &Path, file: String) -> Result<Self, CheckpointError> {
        let handle = File::open(path).map_err(io(path))?;
        // SAFETY: the map is read-only and lives as long as this value; a file truncated by
        // another process while mapped faults on the next read past its end, which the
        // bus-error handler reports (see `fault`).
        let map = unsafe { Mmap::map(&handle) }.map_err(io(path))?;
        let registered = Registered::map(map.as_ptr() as usize, map.len(), path);
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
            _registered: registered,
        })
    }

    fn bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header;
        self.map
            .get(start + info.data_offsets.0..start + info.data_offsets.1)
    }

    fn entries(&self, shard: usize, keep: impl Fn(&str) -> bool) -> Vec<Entry> {
        self.metadata
            .offset_keys()
            .into_iter()
            .filter(|name| keep(name))
            .filter_map(|name| {
                let info = self.metadata.info(&name)?;
                Some(Entry {
                    dtype: from_safetensors(info.dtype),
                    label: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    shard,
                    param_id: None,
                    bytes: info.data_offsets.1 - info.data_offsets.0,
                    name,
                })
            })
            .collect()
    }
}

/// The shards of a safetensors checkpoint (one for a single file).
struct Safetensors {
    shards: Vec<Shard>,
    /// The `metadata` object of the index file.
    index_metadata: serde_json::Map<String, serde_json::Value>,
    /// Opened from an index.
    sharded: bool,
}

impl Storage for Safetensors {
    fn bytes(&self, _: usize, entry: &Entry) -> Result<Data<'_>, String> {
        self.shards
            .get(entry.shard)
            .and_then(|s| s.bytes(&entry.name))
            .map(Data::Mapped)
            .ok_or_else(|| format!("tensor `{}` is not in its shard", entry.name))
    }

    fn shards(&self) -> Vec<ShardInfo> {
        self.shards
            .iter()
            .map(|s| (s.file.clone(), s.metadata.metadata().clone()))
            .collect()
    }

    fn metadata(&self) -> HashMap<String, String> {
        self.shards
            .first()
            .and_then(|s| s.metadata.metadata().clone())
            .unwrap_or_default()
    }

    fn index_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        self.index_metadata.clone()
    }

    fn files(&self, path: &Path) -> Vec<PathBuf> {
        if !self.sharded {
            return vec![path.to_path_buf()];
        }
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let mut files: Vec<PathBuf> = self.shards.iter().map(|s| dir.join(&s.file)).collect();
        files.push(dir.join(INDEX));
        files.push(dir);
        files
    }
}

/// Opens one `.safetensors` file.
pub(in crate::checkpoint) fn open_safetensors(
    path: &Path,
    file: String,
) -> Result<Checkpoint, CheckpointError> {
    let shard = Shard::open(path, file)?;
    let entries = shard.entries(0, |_| true);
    let storage = Safetensors {
        shards: vec![shard],
        index_metadata: Default::default(),
        sharded: false,
    };
    Ok(Checkpoint::new(
        path,
        Format::Safetensors,
        entries,
        Box::new(storage),
    ))
}

/// Opens a sharded checkpoint from its index file.
pub(in crate::checkpoint) fn open_sharded(
    path: &Path,
    index: &Path,
) -> Result<Checkpoint, CheckpointError> {
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
    let storage = Safetensors {
        shards,
        index_metadata,
        sharded: true,
    };
    Ok(Checkpoint::new(
        path,
        Format::Sharded,
        entries,
        Box::new(storage),
    ))
}

/// One `.safetensors` file.
pub(super) struct SafetensorsFile;

impl Layout for SafetensorsFile {
    fn write(
        &self,
        run: &Arc<Run>,
        tensors: Vec<OutputTensor>,
        temp: &Path,
        out: &Path,
    ) -> Result<(), CheckpointError> {
        let chosen: Vec<&OutputTensor> = tensors.iter().collect();
        let metadata = Some(run.first().metadata()).filter(|m| !m.is_empty());
        write_file(run, &chosen, metadata, temp, out)
    }
}

/// A folder of shards laid out as the first input's, and their index; `model.safetensors`
/// alone for a model folder whose weights are one file.
pub(super) struct ShardedFolder;

impl Layout for ShardedFolder {
    fn folder(&self) -> bool {
        true
    }

    fn write(
        &self,
        run: &Arc<Run>,
        tensors: Vec<OutputTensor>,
        dir: &Path,
        out: &Path,
    ) -> Result<(), CheckpointError> {
        let first = run.first();
        let shards = first.shards();
        let single = shards.len() == 1 && first.format() != Format::Sharded;
        let create = |path: &Path| {
            File::create_new(path)
                .map(drop)
                .map_err(|source| CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            run.track(path);
            Ok::<_, CheckpointError>(())
        };
        if single && run.model_folder() {
            // A model folder whose weights are one file: `model.safetensors`, as
            // `save_pretrained` writes it, without an index.
            let path = dir.join(SINGLE);
            create(&path)?;
            let chosen: Vec<&OutputTensor> = tensors.iter().collect();
            let metadata = shards.into_iter().next().and_then(|(_, m)| m);
            let metadata = metadata.filter(|m| !m.is_empty());
            return write_file(run, &chosen, metadata, &path, out);
        }
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (i, (file, metadata)) in shards.into_iter().enumerate() {
            let file = if single {
                "model-00001-of-00001.safetensors".to_string()
            } else {
                file
            };
            let chosen: Vec<&OutputTensor> = tensors.iter().filter(|t| t.shard == i).collect();
            if chosen.is_empty() {
                continue;
            }
            let path = dir.join(&file);
            create(&path)?;
            write_file(run, &chosen, metadata, &path, out)?;
            for tensor in chosen {
                total += tensor.byte_len;
                weight_map.insert(tensor.name.clone(), file.clone().into());
            }
        }
        let mut metadata = first.index_metadata();
        metadata.insert("total_size".into(), total.into());
        let index = serde_json::json!({ "metadata": metadata, "weight_map": weight_map });
        let text = serde_json::to_string_pretty(&index).map_err(|e| CheckpointError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        crate::checkpoint::durable::write_new(&dir.join(INDEX), (text + "\n").as_bytes())
    }
}

/// The safetensors format's limit on the header, in bytes.
const MAX_HEADER: usize = 100_000_000;

/// Writes `tensors` as one safetensors file at `path`, a file created beforehand, whose
/// permissions it keeps, and syncs it.
///
/// The header is the one the safetensors crate would write (its `Metadata`, serialised by
/// it, tensors ordered as its own writer orders them: by dtype alignment, then by name,
/// padded with spaces to 8 bytes); the data section is written here, each tensor from the
/// buffer the merge reuses, so that no tensor's bytes are ever owned by the writer.
fn write_file(
    run: &Run,
    tensors: &[&OutputTensor],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let io = |source: std::io::Error| CheckpointError::Io {
        path: out.to_path_buf(),
        source,
    };
    let invalid = |e: String| io(std::io::Error::other(e));
    let mut order: Vec<(&OutputTensor, safetensors::Dtype)> = tensors
        .iter()
        .map(|t| {
            to_safetensors(t.dtype)
                .map(|d| (*t, d))
                .ok_or_else(|| invalid(format!("`{}`: safetensors has no such dtype", t.name)))
        })
        .collect::<Result<_, _>>()?;
    order.sort_by(|(x, dx), (y, dy)| dy.cmp(dx).then_with(|| x.name.cmp(&y.name)));
    let mut offset = 0;
    let infos = order
        .iter()
        .map(|(t, dtype)| {
            let info = TensorInfo {
                dtype: *dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.byte_len),
            };
            offset += t.byte_len;
            (t.name.clone(), info)
        })
        .collect();
    let header = Metadata::new(metadata, infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_string(&header)
        .map_err(|e| invalid(e.to_string()))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER {
        return Err(invalid(format!(
            "the header would take {} bytes, above the format's limit of {MAX_HEADER}",
            header.len()
        )));
    }
    // Created empty and exclusively beforehand: opened without truncating (on ext4 a truncated
    // file is flushed to disk when it is closed).
    let file = OpenOptions::new().write(true).open(path).map_err(io)?;
    let mut file = BufWriter::with_capacity(1 << 20, file);
    file.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&header).map_err(io)?;
    for (tensor, _) in order {
        let mut length = 0;
        run.produce(tensor, &mut |bytes| {
            // A signal stops a large tensor too, within a block.
            run.check_cancel()?;
            length += bytes.len();
            file.write_all(bytes).map_err(io)
        })?;
        if length != tensor.byte_len {
            return Err(invalid(format!(
                "`{}`: {length} bytes computed, {} planned",
                tensor.name, tensor.byte_len
            )));
        }
        run.done(&tensor.name, length);
    }
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    crate::checkpoint::durable::sync_file(&file).map_err(io)
}
