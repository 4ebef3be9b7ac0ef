//! The checkpoint formats, one file each: a reader (a [`Storage`] behind the checkpoint's
//! entries) and, for output formats, a writer (a [`Layout`]). A new format is one new file here,
//! with its place in [`Checkpoint::open`]'s rules and in [`layout`].

mod burnpack;
mod pytorch;
mod safetensors;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::error::CheckpointError;
use super::layout::Layout;
#[cfg(doc)]
use super::read::Storage;
use super::read::{Checkpoint, FOLDER_WEIGHTS, Format, format_error};
use burnpack::{BURNPACK_MAGIC, open_burnpack};
use pytorch::{open_pytorch, open_pytorch_sharded};
use safetensors::{open_safetensors, open_sharded};

/// The writer of an output format.
pub(super) fn layout(format: Format) -> Box<dyn Layout> {
    match format {
        Format::Safetensors => Box::new(safetensors::SafetensorsFile),
        Format::Sharded => Box::new(safetensors::ShardedFolder),
        Format::Burnpack => Box::new(burnpack::BurnpackFile),
        Format::Pytorch => unreachable!("never an output format: refused by output_format"),
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

    /// Which reader opens a file: the one place the opening rules are written.
    fn open_file(path: &Path) -> Result<Self, CheckpointError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".bin.index.json") {
            return open_pytorch_sharded(path);
        }
        if name.ends_with(".index.json") {
            return open_sharded(path, path);
        }
        if path
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
        {
            return open_pytorch(path, name);
        }
        let mut magic = [0u8; 4];
        let is_burnpack = path.extension().is_some_and(|e| e == "bpk")
            || File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok_and(|()| magic == BURNPACK_MAGIC);
        if is_burnpack {
            return open_burnpack(path);
        }
        open_safetensors(path, name)
    }
}
