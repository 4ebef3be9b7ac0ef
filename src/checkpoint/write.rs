//! The atomic output of a plan: a temporary file (or folder) beside the output, written by the
//! output format's writer, synced, and renamed into place only once complete; the parent
//! folder synced after the rename. On error the temporary is removed and a file already at the
//! output is kept.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::compute::{OnProgress, Run};
use super::durable::{self, folder_of};
use super::error::CheckpointError;
use super::fault::Registered;
use super::folder::write_model_files;
use super::formats::layout;
use super::options::Progress;
use super::plan::{FilePlan, Written};

/// Temporary files and folders created so far by this process: the unique part of their names.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// The prefix of every temporary name beside `out`: `.NAME.partial-`.
fn temp_prefix(out: &Path) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    format!(".{name}.partial-")
}

/// The `attempt`-th temporary name beside `out`, in the same folder (so the rename is atomic):
/// `.NAME.partial-PID-N`.
fn temp_name(out: &Path, attempt: u64) -> PathBuf {
    out.with_file_name(format!(
        "{}{}-{attempt}",
        temp_prefix(out),
        std::process::id()
    ))
}

/// A temporary file or folder beside the output, owned from its creation: locked (an
/// exclusive `flock`, or `LockFileEx` on Windows) for as long as this run lives, so that
/// another run can tell it from a stopped run's; removed when dropped unless it was published,
/// so that an error or a panic leaves nothing; known to the bus-error handler.
pub(super) struct Temporary {
    path: PathBuf,
    /// The open file or folder holding the lock.
    _lock: File,
    _registered: Registered,
    published: bool,
}

impl Temporary {
    /// Creates a new temporary beside `out` under a name nothing else holds: created
    /// exclusively, so that a file or a symbolic link already at a candidate name is never
    /// written through; that name is skipped for the next. Candidates start at the `first`-th.
    fn create_from(out: &Path, folder: bool, first: u64) -> Result<Self, CheckpointError> {
        let mut last = None;
        for attempt in first..first + 64 {
            let path = temp_name(out, attempt);
            let created = if folder {
                std::fs::create_dir(&path)
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map(drop)
            };
            match created {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(e);
                    continue;
                }
                Err(source) => return Err(CheckpointError::Io { path, source }),
            }
            // Registered before anything is written into it.
            let registered = Registered::temporary(&path);
            match lock_fresh(&path) {
                Ok(lock) => {
                    return Ok(Self {
                        path,
                        _lock: lock,
                        _registered: registered,
                        published: false,
                    });
                }
                // Another run took it for a stopped run's in the instant before the lock:
                // it removes it; the next name is taken.
                Err(e) => last = Some(e),
            }
        }
        Err(CheckpointError::Io {
            path: temp_name(out, first),
            source: last.unwrap_or_else(|| std::io::Error::other("no free temporary name")),
        })
    }

    pub(super) fn create(out: &Path, folder: bool) -> Result<Self, CheckpointError> {
        let first = TEMPORARIES.fetch_add(64, Ordering::Relaxed);
        Self::create_from(out, folder, first)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs a folder temporary's files, renames the temporary to `out`, and syncs the
    /// folder it is in.
    fn publish(mut self, out: &Path) -> std::io::Result<()> {
        if self.path.is_dir() {
            durable::sync_tree(&self.path)?;
        }
        std::fs::rename(&self.path, out)?;
        self.published = true;
        durable::sync_dir(folder_of(out))
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.published {
            remove(&self.path);
        }
    }
}

/// Opens `path` (a file or folder this run just created), takes its lock, and checks that the
/// path still names what was locked.
fn lock_fresh(path: &Path) -> std::io::Result<File> {
    let handle = File::open(path)?;
    handle.try_lock().map_err(std::io::Error::from)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (held, named) = (handle.metadata()?, std::fs::symlink_metadata(path)?);
        if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
            return Err(std::io::Error::other("the temporary was replaced"));
        }
    }
    Ok(handle)
}

/// Removes the temporaries of stopped runs beside `out`: those whose lock can be taken (the
/// run that held it has ended, however it ended). A temporary whose lock is held belongs to a
/// run still going, and is left alone; links are never followed. Returns what was removed.
pub(super) fn remove_stale(out: &Path) -> Vec<PathBuf> {
    let prefix = temp_prefix(out);
    let Ok(entries) = std::fs::read_dir(folder_of(out)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let Ok(handle) = File::open(&path) else {
            continue;
        };
        if handle.try_lock().is_ok() {
            remove(&path);
            if !path.exists() {
                removed.push(path);
            }
        }
    }
    removed.sort();
    removed
}

impl FilePlan {
    /// Computes and writes the plan; `progress` is called after each tensor is written.
    ///
    /// # Errors
    ///
    /// As [`merge_files`](super::merge_files); on error nothing is left at the output (a file
    /// already there is kept).
    pub fn write(
        self,
        progress: impl FnMut(Progress<'_>) + Send + 'static,
    ) -> Result<Written, CheckpointError> {
        write(self, Box::new(progress))
    }
}

/// Computes and writes every tensor of `plan` through a temporary beside the output.
fn write(plan: FilePlan, progress: OnProgress) -> Result<Written, CheckpointError> {
    let FilePlan {
        inputs,
        tensors,
        warnings,
        out,
        format,
        options,
        card,
        model,
    } = plan;
    let writer = layout(format);
    let run = Arc::new(Run::new(inputs, options.clone(), tensors.len(), progress));
    let removed = remove_stale(&out);
    let temporary = Temporary::create(&out, writer.folder())?;
    let temp = temporary.path().to_path_buf();
    let written = writer
        .write(&run, tensors, &temp, &out)
        .and_then(|()| match &model {
            Some(model) => write_model_files(&temp, model, &options, &card),
            None => Ok(()),
        });
    let io = |source| CheckpointError::Io {
        path: out.clone(),
        source,
    };
    // On error the temporary is dropped, which removes it.
    written.and_then(|()| temporary.publish(&out).map_err(io))?;
    Ok(Written {
        report: run.report(),
        means: run.mean_report(),
        removed,
        warnings,
    })
}

/// Writes a small file (a report) as outputs are written: through a temporary beside it,
/// synced, renamed into place.
pub(super) fn write_small(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = Temporary::create(path, false)?;
    let mut file = OpenOptions::new()
        .write(true)
        .open(temporary.path())
        .map_err(io)?;
    std::io::Write::write_all(&mut file, bytes).map_err(io)?;
    durable::sync_file(&file).map_err(io)?;
    drop(file);
    temporary.publish(path).map_err(io)
}

/// Removes a temporary file or folder, whatever it holds.
fn remove(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("burn-slerp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A symbolic link planted at the first temporary name is neither followed nor replaced:
    /// the next name is taken, and the link's target is untouched.
    #[cfg(unix)]
    #[test]
    fn temporaries_never_write_through_a_planted_link() {
        let dir = scratch("temp");
        let out = dir.join("merged.safetensors");
        let target = dir.join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, temp_name(&out, 7)).unwrap();
        for folder in [false, true] {
            let temp = Temporary::create_from(&out, folder, 7).unwrap();
            assert_ne!(temp.path(), temp_name(&out, 7));
            assert!(!temp.path().is_symlink());
            assert_eq!(temp.path().is_dir(), folder);
            // Dropped unpublished: removed.
            let path = temp.path().to_path_buf();
            drop(temp);
            assert!(!path.exists());
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // Two temporaries of one process never share a name.
        let (x, y) = (
            Temporary::create(&out, false).unwrap(),
            Temporary::create(&out, false).unwrap(),
        );
        assert_ne!(x.path(), y.path());
        drop((x, y));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A temporary whose lock is free (its run has ended) is removed by the next run into the
    /// same output, a file or a folder with what it holds; one whose lock is held is left
    /// alone, as are other names and links.
    #[cfg(unix)]
    #[test]
    fn stale_temporaries_go_and_live_ones_stay() {
        let dir = scratch("stale");
        let out = dir.join("merged");
        let stale_file = dir.join(".merged.partial-1-0");
        std::fs::write(&stale_file, b"half").unwrap();
        let stale_folder = dir.join(".merged.partial-1-1");
        std::fs::create_dir(&stale_folder).unwrap();
        std::fs::write(stale_folder.join("model-00001-of-00002.safetensors"), b"x").unwrap();
        let live = Temporary::create(&out, true).unwrap();
        let other = dir.join(".other.partial-1-0");
        std::fs::write(&other, b"not ours").unwrap();
        let target = dir.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"keep").unwrap();
        let link = dir.join(".merged.partial-1-2");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let removed = remove_stale(&out);
        assert_eq!(removed, vec![stale_file.clone(), stale_folder.clone()]);
        assert!(!stale_file.exists() && !stale_folder.exists());
        assert!(live.path().is_dir(), "a live run's temporary stays");
        assert!(other.exists() && link.is_symlink());
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"keep");
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
