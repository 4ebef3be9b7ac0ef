//! Models named as on the Hugging Face Hub (`org/name`, `name`, `org/name@revision`): found in
//! the local cache as `huggingface_hub` lays it out, and downloaded into it when they are not
//! there (see [`plan_download`] and `docs/guide.md`), so that a later run and Python tools share the files.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model `org/name` lives
//! in `models--org--name/`: `refs/<revision>` holds the commit a branch or tag points at,
//! `snapshots/<commit>/` the files, as relative symbolic links into `blobs/`.
//!
//! Revisions and refs are checked before they become paths: a revision is a branch, a tag or
//! `refs/pr/N` (segments of letters, digits, `-`, `_`, `.`, no `..`), or a commit hash; the
//! contents of a ref must be a 40-hex commit.

mod cache;
mod download;

use std::path::{Path, PathBuf};

use super::error::CheckpointError;
use cache::{cache_dir, cached, not_cached, offline, parse};
pub use download::{DownloadEvent, DownloadList, plan_download, set_download_progress};

/// `spec` as a path when it names an existing file or folder, else as a Hub model: from the
/// cache, downloaded into it when it is not there (unless `HF_HUB_OFFLINE` is set).
///
/// # Errors
///
/// As the cache lookup and the download; with `HF_HUB_OFFLINE` set, [`CheckpointError::Format`]
/// naming where it looked; [`CheckpointError::Io`] (not found) when `spec` reads neither way.
pub(crate) fn resolve(spec: &Path) -> Result<PathBuf, CheckpointError> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some((repo, revision)) = spec.to_str().and_then(parse) else {
        return Err(CheckpointError::Io {
            path: spec.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    };
    let cache = cache_dir();
    if let Some(dir) = cached(&cache, repo, revision)? {
        return Ok(dir);
    }
    if offline() {
        return Err(not_cached(&cache, repo, revision));
    }
    download::fetch(&cache, repo, revision)
}
