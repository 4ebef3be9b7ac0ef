//! Durable writes: every byte of an output is on the disk before the rename that publishes it,
//! and the rename itself after the parent folder is synced, so that after a power loss or a
//! kernel crash the output path holds the old file or the whole new one.
//!
//! `sync_all` is `fsync(2)` on Linux and the BSDs; on macOS `fsync` only reaches the drive's
//! cache, so files are synced there with `fcntl(F_FULLFSYNC)`, which the standard library's
//! `sync_all` issues on Apple targets. On Windows `sync_all` is `FlushFileBuffers`, and folders
//! cannot be opened to be synced: the rename is what the file system makes of it.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// The folder `path` is in (`.` for a bare name).
pub(crate) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs a file's data and metadata to the disk.
pub(crate) fn sync_file(file: &File) -> std::io::Result<()> {
    file.sync_all()
}

/// Reopens the file at `path` (written by another writer that closed it) and syncs it.
pub(crate) fn sync_path(path: &Path) -> std::io::Result<()> {
    sync_file(&File::options().write(true).open(path)?)
}

/// Syncs a folder's entries (names created, renamed or removed in it); nothing on platforms
/// where folders cannot be opened.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Syncs every file in a folder this process wrote (the temporary of a folder output), the
/// folders in it, and the folder itself. Links are not followed.
pub(crate) fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            sync_path(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// Writes `bytes` to a new file at `path` (created exclusively: never through a link) and
/// syncs it.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<(), super::error::CheckpointError> {
    let io = |source| super::error::CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::create_new(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    sync_file(&file).map_err(io)
}
