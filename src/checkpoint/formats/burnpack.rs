//! Burn's burnpack files (`.bpk`): read through burn-store's reader (each tensor read from disk
//! when it is needed), written through burn-store's writer over deferred tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use burn::store::burn_pack::{self, Bytes, Reader, Scalar, Writer};

use crate::checkpoint::compute::Run;
use crate::checkpoint::error::CheckpointError;
use crate::checkpoint::layout::Layout;
use crate::checkpoint::plan::OutputTensor;
use crate::checkpoint::read::{Checkpoint, Data, Entry, Format, ShardInfo, Storage, format_error};

/// The first four bytes of every burnpack file ("BURN", little-endian).
pub(in crate::checkpoint) const BURNPACK_MAGIC: [u8; 4] = burn_pack::MAGIC_NUMBER.to_le_bytes();

struct Burnpack {
    /// In the order of the entries.
    tensors: Vec<burn_pack::Tensor>,
    metadata: BTreeMap<String, String>,
    scalars: BTreeMap<String, Scalar>,
}

impl Storage for Burnpack {
    fn bytes(&self, index: usize, entry: &Entry) -> Result<Data<'_>, String> {
        let tensor = self
            .tensors
            .get(index)
            .ok_or_else(|| format!("tensor `{}` is not listed", entry.name))?;
        tensor.to_bytes().map(Data::Read).map_err(|e| e.to_string())
    }

    fn shards(&self) -> Vec<ShardInfo> {
        vec![(String::new(), Some(self.metadata()))]
    }

    fn metadata(&self) -> HashMap<String, String> {
        self.metadata.clone().into_iter().collect()
    }

    fn scalars(&self) -> BTreeMap<String, Scalar> {
        self.scalars.clone()
    }
}

/// Opens a burnpack file.
pub(in crate::checkpoint) fn open_burnpack(path: &Path) -> Result<Checkpoint, CheckpointError> {
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
    let storage = Burnpack {
        tensors,
        metadata,
        scalars,
    };
    Ok(Checkpoint::new(
        path,
        Format::Burnpack,
        entries,
        Box::new(storage),
    ))
}

/// One burnpack file, each tensor computed when burn-store's writer reaches it.
pub(super) struct BurnpackFile;

impl Layout for BurnpackFile {
    fn write(
        &self,
        run: &Arc<Run>,
        tensors: Vec<OutputTensor>,
        path: &Path,
        out: &Path,
    ) -> Result<(), CheckpointError> {
        let deferred: Vec<burn_pack::Tensor> = tensors
            .into_iter()
            .map(|tensor| {
                let (name, dtype, shape, id, len) = (
                    tensor.name.clone(),
                    tensor.dtype,
                    tensor.shape.clone(),
                    tensor.param_id,
                    tensor.byte_len,
                );
                let run = Arc::clone(run);
                burn_pack::Tensor::deferred(name, dtype, shape, id, len, move || {
                    match run.compute(&tensor) {
                        Ok(bytes) => {
                            run.done(&tensor.name, bytes.len());
                            Ok(Bytes::from_bytes_vec(bytes))
                        }
                        Err(e) => {
                            run.fail(e);
                            Err(burn_pack::Error::ValidationError("stopped".into()))
                        }
                    }
                })
            })
            .collect();
        let first = run.first();
        let mut writer = Writer::new(deferred).auto_extension(false).overwrite(true);
        let mut metadata: Vec<(String, String)> = first.metadata().into_iter().collect();
        metadata.sort();
        for (key, value) in &metadata {
            writer = writer.with_metadata(key, value);
        }
        for (key, value) in first.scalars() {
            writer = writer.with_scalar(&key, value);
        }
        let written = writer.write_to_file_in_place(path);
        if let Some(e) = run.take_error() {
            return Err(e);
        }
        let io = |source: std::io::Error| CheckpointError::Io {
            path: out.to_path_buf(),
            source,
        };
        written.map_err(|e| io(std::io::Error::other(e.to_string())))?;
        // burn-store's writer closes the file without syncing it: reopened to sync.
        crate::checkpoint::durable::sync_path(path).map_err(io)
    }
}
