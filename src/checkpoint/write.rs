//! Writing the merged checkpoint: each tensor is computed when the writer asks for its bytes,
//! written, and dropped. One `.safetensors` file (`safetensors::serialize_to_file` over lazy
//! views), a sharded folder (one such file per shard, and the index), or a `.bpk` burnpack file
//! (burn-store's writer over deferred tensors).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::store::burn_pack::{self, Bytes, Writer};
use burn::tensor::{DType, Tensor, TensorData};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, View};

use super::read::{self, Checkpoint, INDEX};
use super::{CheckpointError, FileMerge, Format, Item, Job};
use crate::report::MergeReport;
use crate::slerp::slerp_with_stats;
use crate::{MergeError, TensorStats};

/// Called after each tensor is written, with its name and its size in bytes.
pub(super) type Progress = Box<dyn FnMut(&str, usize) + Send>;

/// What the tensors being written share.
struct Shared {
    a: Checkpoint,
    b: Checkpoint,
    options: FileMerge,
    stats: Mutex<Vec<TensorStats>>,
    progress: Mutex<Progress>,
    /// The first error, kept for writers that cannot return one.
    error: Mutex<Option<CheckpointError>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    fn fail(&self, e: CheckpointError) {
        lock(&self.error).get_or_insert(e);
    }

    fn done(&self, name: &str, bytes: usize) {
        (lock(&self.progress))(name, bytes);
    }

    /// The bytes of one output tensor.
    fn compute(&self, item: &Item) -> Result<Vec<u8>, CheckpointError> {
        if let Some(cancel) = &self.options.cancel
            && cancel.load(Ordering::Relaxed)
        {
            return Err(CheckpointError::Interrupted);
        }
        let t = match item.job {
            Job::CopyA => return Ok(self.a.bytes(&item.name)?.to_vec()),
            Job::CopyB => return Ok(self.b.bytes(&item.name)?.to_vec()),
            Job::Merge { t, .. } => t,
        };
        let name = &item.name;
        let n: usize = item.shape.iter().product();
        let device = &self.options.device;
        // f64 tensors are computed in f64; f32, f16 and bf16 in f32, rounded once at the end.
        let wide = item.dtype == DType::F64;
        let load = |from: &Checkpoint| -> Result<Tensor<1>, CheckpointError> {
            let dtype = from.entry(name).and_then(|e| e.dtype).expect("prepared");
            let bytes = from.bytes(name)?;
            Ok(if wide {
                let values = TensorData::new(to_f64(dtype, &bytes), [n]);
                Tensor::from_data(values, (device, DType::F64))
            } else {
                let values = TensorData::new(to_f32(dtype, &bytes), [n]);
                Tensor::from_data(values, (device, DType::F32))
            })
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
        let (out, stats) = if item.shape.len() >= 2 {
            let rows = item.shape[0].max(1);
            let (a2, b2) = (a.reshape([rows, n / rows]), b.reshape([rows, n / rows]));
            let (out, stats) = slerp_with_stats(a2, b2, &config).map_err(merge_error)?;
            (out.reshape([n]), stats)
        } else {
            slerp_with_stats(a, b, &config).map_err(merge_error)?
        };
        if let Some(mut stats) = stats {
            stats.path = name.clone();
            lock(&self.stats).push(stats);
        }
        encode(item.dtype, &out.into_data()).ok_or_else(|| CheckpointError::NonFinite {
            name: name.clone(),
            reason: format!("the merged values do not fit {}", read::label(item.dtype)),
        })
    }
}

/// Little-endian values of a float tensor, widened to f32.
fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 | DType::Flex32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        // Narrowed once; only used when A is not f64 (the output is A's dtype, or f32/f16/bf16).
        DType::F64 => to_f64(dtype, bytes).into_iter().map(|v| v as f32).collect(),
        other => unreachable!("not a float dtype: {other:?}"),
    }
}

/// Little-endian values of a float tensor, widened to f64.
fn to_f64(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => to_f32(other, bytes).into_iter().map(f64::from).collect(),
    }
}

/// The merged values rounded once to `dtype`; `None` when one of them is not finite there.
fn encode(dtype: DType, data: &TensorData) -> Option<Vec<u8>> {
    let n = data.num_elements();
    let mut out = Vec::with_capacity(n * dtype.size());
    match dtype {
        DType::F64 => {
            for v in data.iter::<f64>() {
                v.is_finite().then_some(())?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F32 | DType::Flex32 => {
            for v in data.iter::<f32>() {
                v.is_finite().then_some(())?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in data.iter::<f32>() {
                let h = f16::from_f32(v);
                h.is_finite().then_some(())?;
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in data.iter::<f32>() {
                let h = bf16::from_f32(v);
                h.is_finite().then_some(())?;
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        other => unreachable!("not a float dtype: {other:?}"),
    }
    Some(out)
}

/// Whether two paths name the same file or folder (the output may not exist yet).
pub(super) fn same_file(input: &Path, out: &Path) -> bool {
    match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(i), Ok(o)) => i == o,
        _ => false,
    }
}

/// A temporary name beside `out`, in the same folder (so the rename is atomic).
fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
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
struct Lazy<'a> {
    item: &'a Item,
    dtype: Dtype,
    shared: &'a Shared,
}

impl View for &Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.item.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // The writer cannot take an error: the first one is kept, zeros of the right length
        // are written instead, and the output is discarded at the end.
        let bytes = if self.shared.failed() {
            vec![0; self.data_len()]
        } else {
            match self.shared.compute(self.item) {
                Ok(bytes) => bytes,
                Err(e) => {
                    self.shared.fail(e);
                    vec![0; self.data_len()]
                }
            }
        };
        self.shared.done(&self.item.name, bytes.len());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.item.byte_len
    }
}

/// Writes `items` as one safetensors file at `path`.
fn write_safetensors(
    shared: &Shared,
    items: &[&Item],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let lazies: Vec<Lazy<'_>> = items
        .iter()
        .map(|item| Lazy {
            item,
            dtype: read::to_safetensors(item.dtype).expect("checked in prepare"),
            shared,
        })
        .collect();
    // The writer renames a private temporary file to `path`: the permissions a file created
    // here gets (the umask's) are put back on afterwards.
    let permissions = std::fs::File::create(path)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions());
    let written = safetensors::serialize_to_file(
        lazies.iter().map(|l| (l.item.name.clone(), l)),
        metadata,
        path,
    )
    .map_err(|e| e.to_string())
    .and_then(|()| {
        let permissions = permissions.map_err(|e| e.to_string())?;
        std::fs::set_permissions(path, permissions).map_err(|e| e.to_string())
    });
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    })
}

/// Writes the shards of a sharded checkpoint and its index into the folder `dir`.
fn write_sharded(
    shared: &Shared,
    items: &[Item],
    dir: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    std::fs::create_dir(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let shards = shared.a.shards();
    let single = shards.len() == 1 && shared.a.format() != Format::Sharded;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, (file, metadata)) in shards.into_iter().enumerate() {
        let file = if single {
            "model-00001-of-00001.safetensors".to_string()
        } else {
            file
        };
        let chosen: Vec<&Item> = items.iter().filter(|item| item.shard == i).collect();
        if chosen.is_empty() {
            continue;
        }
        write_safetensors(shared, &chosen, metadata, &dir.join(&file), out)?;
        for item in chosen {
            total += item.byte_len;
            weight_map.insert(item.name.clone(), file.clone().into());
        }
    }
    let mut metadata = shared.a.index_metadata();
    metadata.insert("total_size".into(), total.into());
    let index = serde_json::json!({ "metadata": metadata, "weight_map": weight_map });
    let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
    std::fs::write(dir.join(INDEX), text + "\n").map_err(|source| CheckpointError::Io {
        path: dir.join(INDEX),
        source,
    })
}

/// Writes `items` as one burnpack file at `path`, each tensor deferred until the writer
/// reaches it.
fn write_burnpack(
    shared: &Arc<Shared>,
    items: Vec<Item>,
    path: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let tensors: Vec<burn_pack::Tensor> = items
        .into_iter()
        .map(|item| {
            let (name, dtype, shape, id, len) = (
                item.name.clone(),
                item.dtype,
                item.shape.clone(),
                item.param_id,
                item.byte_len,
            );
            let shared = Arc::clone(shared);
            burn_pack::Tensor::deferred(name, dtype, shape, id, len, move || {
                match shared.compute(&item) {
                    Ok(bytes) => {
                        shared.done(&item.name, bytes.len());
                        Ok(Bytes::from_bytes_vec(bytes))
                    }
                    Err(e) => {
                        shared.fail(e);
                        Err(burn_pack::Error::ValidationError("stopped".into()))
                    }
                }
            })
        })
        .collect();
    let mut writer = Writer::new(tensors).auto_extension(false).overwrite(true);
    let mut metadata: Vec<(String, String)> = shared.a.metadata().into_iter().collect();
    metadata.sort();
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    for (key, value) in shared.a.scalars() {
        writer = writer.with_scalar(&key, value);
    }
    let written = writer.write_to_file_in_place(path);
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The statistics of merging every item (the merged values are dropped).
pub(super) fn angles(
    a: Checkpoint,
    b: Checkpoint,
    items: &[Item],
    options: FileMerge,
) -> Result<MergeReport, CheckpointError> {
    let shared = Shared {
        a,
        b,
        options,
        stats: Mutex::new(Vec::new()),
        progress: Mutex::new(Box::new(|_, _| {})),
        error: Mutex::new(None),
    };
    for item in items {
        shared.compute(item)?;
    }
    Ok(MergeReport::new(
        shared
            .stats
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
    ))
}

/// Computes and writes every item into `out` in `format`, through a temporary file or folder
/// beside it that is renamed into place only when complete.
pub(super) fn write(
    a: Checkpoint,
    b: Checkpoint,
    items: Vec<Item>,
    out: &Path,
    format: Format,
    options: &FileMerge,
    progress: Progress,
) -> Result<MergeReport, CheckpointError> {
    let shared = Arc::new(Shared {
        a,
        b,
        options: options.clone(),
        stats: Mutex::new(Vec::new()),
        progress: Mutex::new(progress),
        error: Mutex::new(None),
    });
    let temp = temp_path(out);
    let written = match format {
        Format::Safetensors => {
            let chosen: Vec<&Item> = items.iter().collect();
            let metadata = Some(shared.a.metadata()).filter(|m| !m.is_empty());
            write_safetensors(&shared, &chosen, metadata, &temp, out)
        }
        Format::Sharded => write_sharded(&shared, &items, &temp, out),
        Format::Burnpack => write_burnpack(&shared, items, &temp, out),
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
    let stats = std::mem::take(&mut *lock(&shared.stats));
    Ok(MergeReport::new(stats))
}
