//! Writing the merged checkpoint: each tensor is computed when the writer asks for its bytes,
//! written, and dropped. One `.safetensors` file (`safetensors::serialize_to_file` over lazy
//! views), a sharded folder (one such file per shard, and the index), or a `.bpk` burnpack file
//! (burn-store's writer over deferred tensors).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::store::burn_pack::{self, Bytes, Writer};
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use safetensors::tensor::{Dtype, View};

use super::convert::{convert, encode, label, to_f32, to_f64, to_safetensors};
use super::error::CheckpointError;
use super::options::{FileMerge, Progress};
use super::plan::{Origin, OutputTensor};
use super::read::{Checkpoint, Format, INDEX};
use crate::error::MergeError;
use crate::interpolate::{compute_dtype, slerp_with_stats};
use crate::report::MergeReport;
use crate::stats::TensorStats;

/// Called after each tensor is written.
pub(super) type OnProgress = Box<dyn FnMut(Progress<'_>) + Send>;

/// What the tensors being written share: the inputs, the options, and what the writers
/// collect as they ask for each tensor's bytes.
struct Writing {
    a: Checkpoint,
    b: Checkpoint,
    options: FileMerge,
    /// The statistics of each merged tensor, with its index in the output's order.
    stats: Mutex<Vec<(usize, TensorStats)>>,
    progress: Mutex<Counter>,
    /// Tensors the output holds.
    total: usize,
    /// The first error, kept for writers that cannot return one.
    error: Mutex<Option<CheckpointError>>,
}

/// The progress callback and the tensors written so far.
struct Counter {
    report: OnProgress,
    done: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Writing {
    fn new(
        a: Checkpoint,
        b: Checkpoint,
        options: FileMerge,
        total: usize,
        progress: OnProgress,
    ) -> Self {
        Self {
            a,
            b,
            options,
            stats: Mutex::new(Vec::new()),
            progress: Mutex::new(Counter {
                report: progress,
                done: 0,
            }),
            total,
            error: Mutex::new(None),
        }
    }

    /// The statistics of the merged tensors, in the output's order, whatever order the writer
    /// asked for them in.
    fn report(&self) -> MergeReport {
        let mut stats = std::mem::take(&mut *lock(&self.stats));
        stats.sort_by_key(|(index, _)| *index);
        MergeReport::new(stats.into_iter().map(|(_, s)| s).collect())
    }

    fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    fn fail(&self, e: CheckpointError) {
        lock(&self.error).get_or_insert(e);
    }

    fn done(&self, name: &str, bytes: usize) {
        let mut counter = lock(&self.progress);
        counter.done += 1;
        let done = counter.done;
        (counter.report)(Progress {
            name,
            bytes,
            done,
            total: self.total,
        });
    }

    /// The bytes of one output tensor.
    fn compute(&self, tensor: &OutputTensor) -> Result<Vec<u8>, CheckpointError> {
        self.options.check_cancel()?;
        let name = &tensor.name;
        let t = match &tensor.origin {
            Origin::CopyA => return Ok(self.a.bytes(name)?.to_vec()),
            Origin::CopyB => return Ok(self.b.bytes(name)?.to_vec()),
            Origin::Merge(assignment) => assignment.t,
        };
        // At t = 0 and t = 1 the merge is an input: its bytes, converted where the output dtype
        // differs, without looking at the values (as the in-memory merge).
        if t == 0.0 || t == 1.0 {
            let from = if t == 0.0 { &self.a } else { &self.b };
            let dtype = from.entry(name).and_then(|e| e.dtype).expect("planned");
            return convert(dtype, &from.bytes(name)?, tensor.dtype)
                .ok_or_else(|| does_not_fit(name, tensor.dtype));
        }
        let n: usize = tensor.shape.iter().product();
        let device = &self.options.device;
        let compute = compute_dtype(tensor.dtype).expect("a float dtype");
        let load = |from: &Checkpoint| -> Result<Tensor<1>, CheckpointError> {
            let dtype = from.entry(name).and_then(|e| e.dtype).expect("planned");
            let bytes = from.bytes(name)?;
            let values = match compute {
                FloatDType::F64 => TensorData::new(to_f64(dtype, &bytes), [n]),
                _ => TensorData::new(to_f32(dtype, &bytes), [n]),
            };
            Ok(Tensor::from_data(values, (device, compute.into())))
        };
        let (a, b) = (load(&self.a)?, load(&self.b)?);
        let config = self.options.config.clone().with_t(t).with_schedule(None);
        let merge_error = |e: MergeError| match e {
            MergeError::NonFinite { .. } => CheckpointError::NonFinite {
                name: name.clone(),
                reason: "an input holds a NaN or an infinity".into(),
            },
            other => CheckpointError::Merge(other),
        };
        // Row granularity needs the rows: [rows, rest] as stored.
        let (out, stats) = if tensor.shape.len() >= 2 {
            let rows = tensor.shape[0].max(1);
            let (a2, b2) = (a.reshape([rows, n / rows]), b.reshape([rows, n / rows]));
            let (out, stats) = slerp_with_stats(a2, b2, &config).map_err(merge_error)?;
            (out.reshape([n]), stats)
        } else {
            slerp_with_stats(a, b, &config).map_err(merge_error)?
        };
        if let Some(mut stats) = stats {
            stats.path = name.clone();
            lock(&self.stats).push((tensor.index, stats));
        }
        encode(tensor.dtype, &out.into_data()).ok_or_else(|| does_not_fit(name, tensor.dtype))
    }
}

fn does_not_fit(name: &str, dtype: DType) -> CheckpointError {
    CheckpointError::NonFinite {
        name: name.to_string(),
        reason: format!("the merged values do not fit {}", label(dtype)),
    }
}

/// Whether two paths name the same file or folder (the output may not exist yet).
pub(super) fn same_file(input: &Path, out: &Path) -> bool {
    match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(i), Ok(o)) => i == o,
        _ => false,
    }
}

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

/// Checks that `out` can be written in `format` before anything is computed.
pub(super) fn check_output(out: &Path, format: Format) -> Result<(), CheckpointError> {
    let refuse = |reason: &str| {
        Err(CheckpointError::Output {
            path: out.to_path_buf(),
            reason: reason.to_string(),
        })
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return refuse("the folder it would go in does not exist");
    }
    if format == Format::Sharded && out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            return refuse(
                "a sharded checkpoint is written into a new or empty folder, and this one is not \
                 empty",
            );
        }
    }
    Ok(())
}

/// One tensor of a safetensors file, computed when the writer asks for its bytes.
struct DeferredView<'a> {
    tensor: &'a OutputTensor,
    dtype: Dtype,
    writing: &'a Writing,
}

impl View for &DeferredView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // The writer cannot take an error: the first one is kept, and this tensor and every
        // later one write nothing (the file was sized beforehand, so the short write is
        // harmless), and the output is discarded at the end.
        if self.writing.failed() {
            return Cow::Borrowed(&[]);
        }
        match self.writing.compute(self.tensor) {
            Ok(bytes) => {
                self.writing.done(&self.tensor.name, bytes.len());
                Cow::Owned(bytes)
            }
            Err(e) => {
                self.writing.fail(e);
                Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.byte_len
    }
}

/// Writes `tensors` as one safetensors file at `path`, a file created beforehand (by
/// [`create_temp`]) whose permissions it keeps.
fn write_safetensors(
    writing: &Writing,
    tensors: &[&OutputTensor],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let views: Vec<DeferredView<'_>> = tensors
        .iter()
        .map(|tensor| DeferredView {
            tensor,
            dtype: to_safetensors(tensor.dtype).expect("checked when planning"),
            writing,
        })
        .collect();
    // The writer renames a private temporary file of its own onto `path`: the permissions the
    // file created at `path` got (the umask's) are put back on afterwards.
    let permissions = File::open(path)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions());
    let written = safetensors::serialize_to_file(
        views.iter().map(|v| (v.tensor.name.clone(), v)),
        metadata,
        path,
    )
    .map_err(|e| e.to_string())
    .and_then(|()| {
        let permissions = permissions.map_err(|e| e.to_string())?;
        std::fs::set_permissions(path, permissions).map_err(|e| e.to_string())
    });
    if let Some(e) = lock(&writing.error).take() {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    })
}

/// Writes the shards of a sharded checkpoint and its index into the new folder `dir`.
fn write_sharded(
    writing: &Writing,
    tensors: &[OutputTensor],
    dir: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let shards = writing.a.shards();
    let single = shards.len() == 1 && writing.a.format() != Format::Sharded;
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
        File::create_new(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        write_safetensors(writing, &chosen, metadata, &path, out)?;
        for tensor in chosen {
            total += tensor.byte_len;
            weight_map.insert(tensor.name.clone(), file.clone().into());
        }
    }
    let mut metadata = writing.a.index_metadata();
    metadata.insert("total_size".into(), total.into());
    let index = serde_json::json!({ "metadata": metadata, "weight_map": weight_map });
    let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
    std::fs::write(dir.join(INDEX), text + "\n").map_err(|source| CheckpointError::Io {
        path: dir.join(INDEX),
        source,
    })
}

/// Writes `tensors` as one burnpack file at `path` (a file created beforehand), each tensor
/// deferred until the writer reaches it.
fn write_burnpack(
    writing: &Arc<Writing>,
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
            let writing = Arc::clone(writing);
            burn_pack::Tensor::deferred(name, dtype, shape, id, len, move || {
                match writing.compute(&tensor) {
                    Ok(bytes) => {
                        writing.done(&tensor.name, bytes.len());
                        Ok(Bytes::from_bytes_vec(bytes))
                    }
                    Err(e) => {
                        writing.fail(e);
                        Err(burn_pack::Error::ValidationError("stopped".into()))
                    }
                }
            })
        })
        .collect();
    let mut writer = Writer::new(deferred).auto_extension(false).overwrite(true);
    let mut metadata: Vec<(String, String)> = writing.a.metadata().into_iter().collect();
    metadata.sort();
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    for (key, value) in writing.a.scalars() {
        writer = writer.with_scalar(&key, value);
    }
    let written = writer.write_to_file_in_place(path);
    if let Some(e) = lock(&writing.error).take() {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The statistics of merging every tensor (the merged values are dropped).
pub(super) fn angles(
    a: Checkpoint,
    b: Checkpoint,
    tensors: &[OutputTensor],
    options: FileMerge,
) -> Result<MergeReport, CheckpointError> {
    let writing = Writing::new(a, b, options, tensors.len(), Box::new(|_| {}));
    for tensor in tensors {
        writing.compute(tensor)?;
    }
    Ok(writing.report())
}

/// Computes and writes every tensor into `out` in `format`, through a temporary file or folder
/// beside it that is renamed into place only when complete.
pub(super) fn write(
    a: Checkpoint,
    b: Checkpoint,
    tensors: Vec<OutputTensor>,
    out: &Path,
    format: Format,
    options: &FileMerge,
    progress: OnProgress,
) -> Result<MergeReport, CheckpointError> {
    let writing = Arc::new(Writing::new(a, b, options.clone(), tensors.len(), progress));
    let temp = create_temp(out, format == Format::Sharded)?;
    let written = match format {
        Format::Safetensors => {
            let chosen: Vec<&OutputTensor> = tensors.iter().collect();
            let metadata = Some(writing.a.metadata()).filter(|m| !m.is_empty());
            write_safetensors(&writing, &chosen, metadata, &temp, out)
        }
        Format::Sharded => write_sharded(&writing, &tensors, &temp, out),
        Format::Burnpack => write_burnpack(&writing, tensors, &temp, out),
    };
    let remove = |path: &Path| {
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
    };
    if let Err(e) = written {
        remove(&temp);
        return Err(e);
    }
    std::fs::rename(&temp, out).map_err(|source| {
        remove(&temp);
        CheckpointError::Io {
            path: out.to_path_buf(),
            source,
        }
    })?;
    Ok(writing.report())
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
