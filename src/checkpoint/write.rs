//! The atomic output of a plan: a temporary file (or folder) beside the output, written by the
//! output format's writer, synced, and renamed into place only once complete; the parent
//! folder synced after the rename. On error the temporary is removed and a file already at the
//! output is kept.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::compute::{OnProgress, Run};
use super::durable;
use super::error::CheckpointError;
use super::folder::write_model_files;
use super::formats::layout;
use super::plan::{FilePlan, Written};

/// Temporary files and folders created so far by this process: the unique part of their names.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// The `attempt`-th temporary name beside `out`, in the same folder (so the rename is atomic):
/// `.NAME.partial-PID-N`.
fn temp_name(out: &Path, attempt: u64) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    out.with_file_name(format!(".{name}.partial-{}-{attempt}", std::process::id()))
}

/// Creates a new temporary file (or folder) beside `out` under a name nothing else holds:
/// created exclusively, so that a file or a symbolic link already at a candidate name is never
/// written through; that name is skipped for the next. Candidates start at the `first`-th.
fn create_temp_from(out: &Path, folder: bool, first: u64) -> Result<PathBuf, CheckpointError> {
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
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        }
    }
    Err(CheckpointError::Io {
        path: temp_name(out, first),
        source: last.unwrap_or_else(|| std::io::Error::other("no free temporary name")),
    })
}

fn create_temp(out: &Path, folder: bool) -> Result<PathBuf, CheckpointError> {
    let first = TEMPORARIES.fetch_add(64, Ordering::Relaxed);
    create_temp_from(out, folder, first)
}

/// Computes and writes every tensor of `plan` through a temporary beside the output.
pub(super) fn write(plan: FilePlan, progress: OnProgress) -> Result<Written, CheckpointError> {
    let FilePlan {
        inputs,
        tensors,
        out,
        format,
        options,
        card,
        ..
    } = plan;
    let writer = layout(format);
    let out_dtype = options.out_dtype.map(|d| d.dtype());
    let folders: Vec<Option<PathBuf>> = inputs
        .iter()
        .take(2)
        .map(|c| c.folder().map(Path::to_path_buf))
        .collect();
    let run = Arc::new(Run::new(inputs, options.clone(), tensors.len(), progress));
    let temp = create_temp(&out, writer.folder())?;
    let written = writer.write(&run, tensors, &temp, &out).and_then(|()| {
        if !writer.folder() || !run.model_folder() {
            return Ok(());
        }
        write_model_files(
            &temp,
            folders.first().cloned().flatten().as_deref(),
            folders.get(1).cloned().flatten().as_deref(),
            out_dtype,
            &options,
            &card,
        )
    });
    let io = |source| CheckpointError::Io {
        path: out.clone(),
        source,
    };
    let published = written
        .and_then(|()| {
            if writer.folder() {
                durable::sync_tree(&temp).map_err(io)?;
            }
            std::fs::rename(&temp, &out).map_err(io)
        })
        .and_then(|()| durable::sync_dir(parent(&out)).map_err(io));
    if let Err(e) = published {
        remove(&temp);
        return Err(e);
    }
    Ok(Written {
        report: run.report(),
        means: run.mean_report(),
    })
}

/// The folder `path` is in.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
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

    /// A symbolic link planted at the first temporary name is neither followed nor replaced:
    /// the next name is taken, and the link's target is untouched.
    #[cfg(unix)]
    #[test]
    fn temporaries_never_write_through_a_planted_link() {
        let dir = std::env::temp_dir().join(format!("burn-slerp-temp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("merged.safetensors");
        let target = dir.join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, temp_name(&out, 7)).unwrap();
        for folder in [false, true] {
            let temp = create_temp_from(&out, folder, 7).unwrap();
            assert_ne!(temp, temp_name(&out, 7));
            assert!(!temp.is_symlink());
            assert_eq!(temp.is_dir(), folder);
            if folder {
                std::fs::remove_dir(&temp).unwrap();
            } else {
                std::fs::remove_file(&temp).unwrap();
            }
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // Two temporaries of one process never share a name.
        let (x, y) = (
            create_temp(&out, false).unwrap(),
            create_temp(&out, false).unwrap(),
        );
        assert_ne!(x, y);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
