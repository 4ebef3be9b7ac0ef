//! The checkpoint formats, each behind one small interface per direction: a reader
//! ([`Storage`]) gives the bytes of a tensor the checkpoint lists and what its files carry
//! besides tensors; a writer ([`Layout`]) takes the planned output tensors in order and writes
//! them into the temporary the atomic output renames into place. A new format is one new file
//! here, with its place in [`super::read`]'s opening rules and in [`layout`].

mod burnpack;
mod pytorch;
mod safetensors;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::store::burn_pack::Scalar;

use super::compute::Run;
use super::error::CheckpointError;
use super::plan::OutputTensor;
use super::read::{Data, Entry, Format};
pub(super) use burnpack::{BURNPACK_MAGIC, open_burnpack};
pub(super) use pytorch::{open_pytorch, open_pytorch_sharded};
pub(super) use safetensors::{open_safetensors, open_sharded};

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

/// How an output format writes the planned tensors.
pub(super) trait Layout {
    /// Whether the output is a folder (its temporary is created as one).
    fn folder(&self) -> bool {
        false
    }

    /// Writes `tensors`, each computed by `run` when the writer reaches it, into `temp`
    /// (created empty beforehand); `out` is named in errors.
    fn write(
        &self,
        run: &Arc<Run>,
        tensors: Vec<OutputTensor>,
        temp: &Path,
        out: &Path,
    ) -> Result<(), CheckpointError>;
}

/// The writer of an output format.
pub(super) fn layout(format: Format) -> Box<dyn Layout> {
    match format {
        Format::Safetensors => Box::new(safetensors::SafetensorsFile),
        Format::Sharded => Box::new(safetensors::ShardedFolder),
        Format::Burnpack => Box::new(burnpack::BurnpackFile),
        Format::Pytorch => unreachable!("never an output format: refused by output_format"),
    }
}

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
