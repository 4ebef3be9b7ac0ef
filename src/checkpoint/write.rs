//! Writing the merged checkpoint: each tensor is computed when the writer reaches it, written,
//! and forgotten. One `.safetensors` file (the crate's header, the data written here from
//! buffers reused from tensor to tensor), a sharded folder (one such file per shard, and the
//! index), or a `.bpk` burnpack file (burn-store's writer over deferred tensors, which owns
//! each tensor's bytes).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::store::burn_pack::{self, Bytes, Writer};
use burn::tensor::{DType, FloatDType, Tensor, TensorData, bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};

use super::convert::{
    convert, encode, encode_f32, f32_values, label, round_to, rounds, to_f32, to_f64,
    to_safetensors,
};
use super::error::CheckpointError;
use super::folder::write_model_files;
use super::options::{FileMerge, Progress};
use super::plan::{Origin, OutputTensor};
use super::read::{Checkpoint, Format, INDEX, SINGLE};
use crate::config::SlerpConfig;
use crate::engine::{self, Lane};
use crate::error::MergeError;
use crate::family::{Gram, Refusal};
use crate::interpolate::{compute_dtype, finish, slerp_with_stats, vectors};
use crate::kernels;
use crate::module::mean::{MeanStats, SphericalMean};
use crate::module::task_vector::task_vector_slerp_with_stats;
use crate::numerics::PairStats;
use crate::report::MergeReport;
use crate::stats::TensorStats;

/// Called after each tensor is written.
pub(super) type OnProgress = Box<dyn FnMut(Progress<'_>) + Send>;

/// A, B and the base of a task-vector merge.
pub(super) type Inputs = (Checkpoint, Checkpoint, Option<Checkpoint>);

/// What the tensors being written share: the inputs, the options, and what the writers
/// collect as they ask for each tensor's bytes.
struct Writing {
    a: Checkpoint,
    b: Checkpoint,
    /// The base of a task-vector merge.
    base: Option<Checkpoint>,
    /// A spherical mean of A, B and `rest`, instead of SLERP.
    mean: Option<(SphericalMean, Vec<Checkpoint>)>,
    /// What the mean computed for each tensor, with its index in the output's order.
    mean_stats: Mutex<Vec<(usize, MeanStats)>>,
    /// Output tensors read under other names: output name → (A's name, B's name).
    renames: HashMap<String, (String, String)>,
    /// The dtype inputs are rounded to before they are merged (a mergekit recipe's `dtype`).
    input_dtype: Option<DType>,
    options: FileMerge,
    /// The statistics of each merged tensor, with its index in the output's order.
    stats: Mutex<Vec<(usize, TensorStats)>>,
    progress: Mutex<Counter>,
    /// Tensors the output holds.
    total: usize,
    /// The first error, kept for writers that cannot return one.
    error: Mutex<Option<CheckpointError>>,
    /// Buffers reused from tensor to tensor.
    scratch: Mutex<Scratch>,
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
    fn new((a, b, base): Inputs, options: FileMerge, total: usize, progress: OnProgress) -> Self {
        Self {
            a,
            b,
            base,
            mean: None,
            mean_stats: Mutex::new(Vec::new()),
            renames: HashMap::new(),
            input_dtype: None,
            options,
            stats: Mutex::new(Vec::new()),
            progress: Mutex::new(Counter {
                report: progress,
                done: 0,
            }),
            total,
            error: Mutex::new(None),
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// The statistics of the merged tensors, in the output's order, whatever order the writer
    /// asked for them in.
    /// The name the output tensor `name` has in `from` (A or B).
    fn source<'n>(&'n self, from: &Checkpoint, name: &'n str) -> &'n str {
        match self.renames.get(name) {
            Some((in_a, _)) if std::ptr::eq(from, &self.a) => in_a,
            Some((_, in_b)) if std::ptr::eq(from, &self.b) => in_b,
            _ => name,
        }
    }

    /// The stored dtype and bytes of the output tensor `name` in `from`.
    fn read<'c>(
        &'c self,
        from: &'c Checkpoint,
        name: &str,
    ) -> Result<(DType, super::read::Data<'c>), CheckpointError> {
        let name = self.source(from, name);
        let dtype = from.entry(name).and_then(|e| e.dtype).expect("planned");
        Ok((dtype, from.bytes(name)?))
    }

    /// The output tensor's values in `from` as a flat tensor on the options' device, in its
    /// compute dtype (f64, or f32 rounded to [`Self::input_dtype`] first where that is
    /// narrower).
    fn load(&self, from: &Checkpoint, tensor: &OutputTensor) -> Result<Tensor<1>, CheckpointError> {
        let n: usize = tensor.shape.iter().product();
        let compute = compute_dtype(tensor.dtype).expect("a float dtype");
        let (dtype, bytes) = self.read(from, &tensor.name)?;
        let values = match compute {
            FloatDType::F64 => TensorData::new(to_f64(dtype, &bytes), [n]),
            _ => {
                let mut values = to_f32(dtype, &bytes);
                if rounds(dtype, self.input_dtype) {
                    round_to(&mut values, self.input_dtype);
                }
                TensorData::new(values, [n])
            }
        };
        Ok(Tensor::from_data(
            values,
            (&self.options.device, compute.into()),
        ))
    }

    /// Whether an input is a model folder, so that a folder output is one too.
    fn model_folder(&self) -> bool {
        self.a.folder().is_some() || self.b.folder().is_some()
    }

    fn report(&self) -> MergeReport {
        let mut stats = std::mem::take(&mut *lock(&self.stats));
        stats.sort_by_key(|(index, _)| *index);
        MergeReport::new(stats.into_iter().map(|(_, s)| s).collect())
    }

    /// What the mean computed, in the output's order.
    fn mean_report(&self) -> Vec<MeanStats> {
        let mut stats = std::mem::take(&mut *lock(&self.mean_stats));
        stats.sort_by_key(|(index, _)| *index);
        stats.into_iter().map(|(_, s)| s).collect()
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

    /// Computes one output tensor and hands its bytes to `emit`, in order, in one or more
    /// pieces, borrowed: from the input's memory map when it is copied as it is, from the
    /// buffers the merge reuses from tensor to tensor otherwise.
    fn produce(
        &self,
        tensor: &OutputTensor,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        self.options.check_cancel()?;
        let name = &tensor.name;
        let t = match &tensor.origin {
            Origin::CopyA => return emit(&self.read(&self.a, name)?.1),
            Origin::CopyB => return emit(&self.read(&self.b, name)?.1),
            Origin::Merge(assignment) if let Some((mean, _)) = &self.mean => {
                let weights = mean
                    .weights_at(name, assignment.position)
                    .map_err(CheckpointError::Merge)?;
                if self.on_host(tensor) {
                    let mut scratch = lock(&self.scratch);
                    let how = HostMerge::Mean(mean, &weights);
                    if let Some(result) = self.merge_on_host(tensor, how, &mut scratch, emit) {
                        return result;
                    }
                }
                let bytes = self.merge_mean(tensor, &weights)?;
                return emit(&bytes);
            }
            Origin::Merge(assignment) => assignment.t,
        };
        // At t = 0 and t = 1 the merge is an input: its bytes, converted where the output dtype
        // differs, without looking at the values (as the in-memory merge).
        if t == 0.0 || t == 1.0 {
            let from = if t == 0.0 { &self.a } else { &self.b };
            let (dtype, bytes) = self.read(from, name)?;
            let fits =
                |bytes: Option<Vec<u8>>| bytes.ok_or_else(|| does_not_fit(name, tensor.dtype));
            let (dtype, bytes) = match self.input_dtype {
                Some(rounded) if rounds(dtype, self.input_dtype) => {
                    (rounded, Cow::Owned(fits(convert(dtype, &bytes, rounded))?))
                }
                _ => (dtype, Cow::Borrowed(&*bytes)),
            };
            if dtype == tensor.dtype {
                return emit(&bytes);
            }
            return emit(&fits(convert(dtype, &bytes, tensor.dtype))?);
        }
        let config = self.options.config.clone().with_t(t).with_schedule(None);
        if self.on_host(tensor) {
            let mut scratch = lock(&self.scratch);
            if let Some(result) =
                self.merge_on_host(tensor, HostMerge::Slerp(&config), &mut scratch, emit)
            {
                return result;
            }
        }
        let bytes = self.merge_tensors(tensor, &config)?;
        emit(&bytes)
    }

    /// Whether the tensor is merged on the host, from the memory maps, by the engine's
    /// kernels: f32-computed tensors on a CPU device.
    fn on_host(&self, tensor: &OutputTensor) -> bool {
        compute_dtype(tensor.dtype) == Some(FloatDType::F32)
            && kernels::is_cpu(&self.options.device)
    }

    /// The merge of one f32-computed tensor on the host, in the reused buffers, through the
    /// engine: one Gram pass over the inputs (of their differences from the base, for task
    /// vectors), coefficients on the host, the combination written block by block (the same
    /// bits as the in-memory merge), with no tensor built. `None` when the Gram matrix cannot
    /// be trusted (values beyond ±1.8e19 or below 1e-19, a zero task vector among them), which
    /// the tensor path then decides in f64.
    fn merge_on_host(
        &self,
        tensor: &OutputTensor,
        how: HostMerge<'_>,
        scratch: &mut Scratch,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Option<Result<(), CheckpointError>> {
        let name = &tensor.name;
        let n: usize = tensor.shape.iter().product();
        let dims = if tensor.shape.len() >= 2 {
            vec![tensor.shape[0].max(1), n / tensor.shape[0].max(1)]
        } else {
            vec![n]
        };
        let (sources, base): (Vec<&Checkpoint>, Option<&Checkpoint>) = match how {
            HostMerge::Slerp(_) => (vec![&self.a, &self.b], self.base.as_ref()),
            HostMerge::Mean(mean, weights) => {
                let (_, rest) = self.mean.as_ref().expect("a mean");
                let all: Vec<&Checkpoint> = [&self.a, &self.b].into_iter().chain(rest).collect();
                (
                    mean.taking(weights).iter().map(|i| all[*i]).collect(),
                    self.base.as_ref(),
                )
            }
        };
        let data = match sources
            .iter()
            .map(|c| self.read(c, name))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(data) => data,
            Err(e) => return Some(Err(e)),
        };
        let base_data = match base.map(|c| self.read(c, name)).transpose() {
            Ok(data) => data,
            Err(e) => return Some(Err(e)),
        };
        let Scratch {
            inputs,
            base: base_buffer,
            out,
            out_half,
            bytes,
        } = scratch;
        if n == 0 {
            return Some(emit(&[]));
        }
        // f16 and bf16 inputs of the output's dtype are read from the maps as they are and
        // widened eight values at a time in the kernels, never whole.
        let same_half = matches!(tensor.dtype, DType::F16 | DType::BF16)
            && self.input_dtype.is_none_or(|d| d == tensor.dtype)
            && data
                .iter()
                .chain(&base_data)
                .all(|(dtype, _)| *dtype == tensor.dtype);
        if same_half && cfg!(target_endian = "little") {
            if out_half.len() < BLOCK.min(n) {
                out_half.resize(BLOCK.min(n), 0);
            }
            let done = match tensor.dtype {
                DType::F16 => half_slices::<f16>(&data, &base_data).map(|(xs, base)| {
                    let out = bytemuck::cast_slice_mut(&mut out_half[..]);
                    self.host_merge(tensor, &dims, how, &xs, base, out, bytes, emit)
                }),
                _ => half_slices::<bf16>(&data, &base_data).map(|(xs, base)| {
                    let out = bytemuck::cast_slice_mut(&mut out_half[..]);
                    self.host_merge(tensor, &dims, how, &xs, base, out, bytes, emit)
                }),
            };
            if let Some(done) = done {
                return done;
            }
        }
        if inputs.len() < data.len() {
            inputs.resize_with(data.len(), Vec::new);
        }
        let xs: Vec<&[f32]> = data
            .iter()
            .zip(inputs.iter_mut())
            .map(|((dtype, bytes), buffer)| f32_values(*dtype, bytes, buffer, self.input_dtype))
            .collect();
        let base_values = base_data
            .as_ref()
            .map(|(dtype, bytes)| f32_values(*dtype, bytes, base_buffer, self.input_dtype));
        if out.len() < BLOCK.min(n) {
            out.resize(BLOCK.min(n), 0.0);
        }
        self.host_merge(tensor, &dims, how, &xs, base_values, out, bytes, emit)
    }

    /// The engine's two passes over the inputs' values, as [`Self::merge_on_host`] describes,
    /// combining into `out` (at least one block long) and encoding each block.
    #[allow(clippy::too_many_arguments)]
    fn host_merge<E: HostLane>(
        &self,
        tensor: &OutputTensor,
        dims: &[usize],
        how: HostMerge<'_>,
        xs: &[&[E]],
        base_values: Option<&[E]>,
        out: &mut [E],
        bytes: &mut Vec<u8>,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Option<Result<(), CheckpointError>> {
        let name = &tensor.name;
        let n: usize = dims.iter().product();
        let non_finite = || {
            Some(Err(CheckpointError::NonFinite {
                name: name.clone(),
                reason: "an input holds a NaN or an infinity".into(),
            }))
        };
        let (rows, flat) = match how {
            HostMerge::Slerp(config) => {
                let rows = vectors(dims, config);
                let grams = engine::gram_slices(xs, base_values, rows)?;
                let stats: Vec<PairStats> = grams.iter().map(Gram::pair).collect();
                let Some((coeffs, mut summary)) = finish(&stats, dims, config) else {
                    return non_finite();
                };
                summary.path = name.clone();
                lock(&self.stats).push((tensor.index, summary));
                let flat: Vec<f32> = coeffs
                    .iter()
                    .flat_map(|c| [c.c0 as f32, c.c1 as f32])
                    .collect();
                (rows, flat)
            }
            HostMerge::Mean(mean, weights) => {
                let gram = engine::gram_slices(xs, base_values, 1)?;
                let (coeffs, mut stats) = match mean.coefficients(&gram[0], n, weights) {
                    Ok(done) => done,
                    Err(Refusal::NonFinite) => return non_finite(),
                    Err(Refusal::Cancelling) => {
                        return Some(Err(CheckpointError::Merge(
                            MergeError::CancellingDirections { path: name.clone() },
                        )));
                    }
                };
                stats.path = name.clone();
                lock(&self.mean_stats).push((tensor.index, stats));
                (1, coeffs.iter().map(|c| *c as f32).collect())
            }
        };
        // Combined and written block by block: the block stays in cache between the two, and
        // the merge's own memory is one block, whatever the tensor.
        let cols = n / rows;
        let mut start = 0;
        while start < n {
            let block = &mut out[..BLOCK.min(n - start)];
            if !engine::combine_block(block, xs, base_values, start, cols, &flat) {
                return Some(Err(does_not_fit(name, tensor.dtype)));
            }
            let written = match E::encode(tensor.dtype, block, bytes) {
                Some(encoded) => emit(encoded),
                None => Err(does_not_fit(name, tensor.dtype)),
            };
            if let Err(e) = written {
                return Some(Err(e));
            }
            start += block.len();
        }
        Some(Ok(()))
    }

    /// The merge of one tensor through Burn tensors on the options' device: f64 tensors,
    /// devices other than the CPU backends, and the tensors [`Self::merge_on_host`] leaves to
    /// the f64 path.
    fn merge_tensors(
        &self,
        tensor: &OutputTensor,
        config: &SlerpConfig,
    ) -> Result<Vec<u8>, CheckpointError> {
        let name = &tensor.name;
        let n: usize = tensor.shape.iter().product();
        let load = |from: &Checkpoint| self.load(from, tensor);
        let (a, b) = (load(&self.a)?, load(&self.b)?);
        let base = self.base.as_ref().map(load).transpose()?;
        let merge_error = |e: MergeError| match e {
            MergeError::NonFinite { .. } => CheckpointError::NonFinite {
                name: name.clone(),
                reason: "an input holds a NaN or an infinity".into(),
            },
            other => CheckpointError::Merge(other),
        };
        // Row granularity needs the rows: [rows, rest] as stored.
        let rows = if tensor.shape.len() >= 2 {
            tensor.shape[0].max(1)
        } else {
            1
        };
        let shape = [rows, n / rows.max(1)];
        let (a2, b2) = (a.reshape(shape), b.reshape(shape));
        let (out, stats) = match base {
            Some(base) => task_vector_slerp_with_stats(base.reshape(shape), a2, b2, config),
            None if rows > 1 => slerp_with_stats(a2, b2, config),
            // A 1-D tensor stays 1-D: a single row is the whole tensor either way.
            None => slerp_with_stats(a2.reshape([n]), b2.reshape([n]), config)
                .map(|(out, stats)| (out.reshape(shape), stats)),
        }
        .map_err(merge_error)?;
        let out = out.reshape([n]);
        if let Some(mut stats) = stats {
            stats.path = name.clone();
            lock(&self.stats).push((tensor.index, stats));
        }
        encode(tensor.dtype, &out.into_data()).ok_or_else(|| does_not_fit(name, tensor.dtype))
    }

    /// The spherical mean of one tensor of every input, through Burn tensors on the options'
    /// device.
    fn merge_mean(
        &self,
        tensor: &OutputTensor,
        weights: &[f64],
    ) -> Result<Vec<u8>, CheckpointError> {
        let (mean, rest) = self.mean.as_ref().expect("a mean");
        let name = &tensor.name;
        let tensors = [&self.a, &self.b]
            .into_iter()
            .chain(rest)
            .map(|from| self.load(from, tensor))
            .collect::<Result<Vec<_>, _>>()?;
        let base = self
            .base
            .as_ref()
            .map(|b| self.load(b, tensor))
            .transpose()?;
        let (out, mut stats) =
            mean.compute(tensors, base, weights)
                .map_err(|refusal| match refusal {
                    Refusal::NonFinite => CheckpointError::NonFinite {
                        name: name.clone(),
                        reason: "an input holds a NaN or an infinity".into(),
                    },
                    Refusal::Cancelling => {
                        CheckpointError::Merge(MergeError::CancellingDirections {
                            path: name.clone(),
                        })
                    }
                })?;
        stats.path = name.clone();
        lock(&self.mean_stats).push((tensor.index, stats));
        encode(tensor.dtype, &out.into_data()).ok_or_else(|| does_not_fit(name, tensor.dtype))
    }

    /// The bytes of one output tensor, owned (for writers that keep them).
    fn compute(&self, tensor: &OutputTensor) -> Result<Vec<u8>, CheckpointError> {
        let mut owned = Vec::new();
        self.produce(tensor, &mut |bytes| {
            owned.extend_from_slice(bytes);
            Ok(())
        })?;
        Ok(owned)
    }
}

/// Values combined and written at a time by the file merge (2 MiB of f32).
const BLOCK: usize = 1 << 19;

/// The buffers the file merge reuses from tensor to tensor: inputs widened to f32 (when they
/// cannot be read in place; each grows to the largest tensor that needs it, once), one block
/// of merged values, and its encoding.
#[derive(Default)]
struct Scratch {
    inputs: Vec<Vec<f32>>,
    base: Vec<f32>,
    out: Vec<f32>,
    /// One block of f16 or bf16 results.
    out_half: Vec<u16>,
    bytes: Vec<u8>,
}

/// The element types the host path combines into: f32, encoded to the output's dtype; f16 and
/// bf16 of the output's dtype, written as they are.
trait HostLane: Lane + bytemuck::Pod {
    /// The block's bytes in `dtype`; `None` when a value does not fit it.
    fn encode<'a>(dtype: DType, block: &'a [Self], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]>;
}

impl HostLane for f32 {
    fn encode<'a>(dtype: DType, block: &'a [f32], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        encode_f32(dtype, block, scratch)
    }
}

impl HostLane for f16 {
    fn encode<'a>(_: DType, block: &'a [f16], _: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        block
            .iter()
            .all(|v| v.is_finite())
            .then(|| bytemuck::cast_slice(block))
    }
}

impl HostLane for bf16 {
    fn encode<'a>(_: DType, block: &'a [bf16], _: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        block
            .iter()
            .all(|v| v.is_finite())
            .then(|| bytemuck::cast_slice(block))
    }
}

/// The inputs' and the base's values as f16 or bf16 slices of the memory maps, where every one
/// is aligned for it.
#[allow(clippy::type_complexity)]
fn half_slices<'d, E: bytemuck::Pod>(
    data: &'d [(DType, super::read::Data<'_>)],
    base: &'d Option<(DType, super::read::Data<'_>)>,
) -> Option<(Vec<&'d [E]>, Option<&'d [E]>)> {
    let cast = |bytes: &'d [u8]| bytemuck::try_cast_slice::<u8, E>(bytes).ok();
    let xs = data
        .iter()
        .map(|(_, bytes)| cast(bytes))
        .collect::<Option<Vec<_>>>()?;
    let base = match base {
        Some((_, bytes)) => Some(cast(bytes)?),
        None => None,
    };
    Some((xs, base))
}

/// What the host path computes for one tensor.
#[derive(Clone, Copy)]
enum HostMerge<'m> {
    /// SLERP of A and B (of their task vectors when there is a base), at the config's `t`.
    Slerp(&'m SlerpConfig),
    /// The mean of the inputs, with every input's weight at this tensor.
    Mean(&'m SphericalMean, &'m [f64]),
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

/// Writes `tensors` as one safetensors file at `path`, a file created beforehand (by
/// [`create_temp`]), whose permissions it keeps.
///
/// The header is the one the safetensors crate would write (its `Metadata`, serialised by
/// it, tensors ordered as its own writer orders them: by dtype alignment, then by name,
/// padded with spaces to 8 bytes); the data section is written here, each tensor from the
/// buffer the merge reuses, so that no tensor's bytes are ever owned by the writer.
fn write_safetensors(
    writing: &Writing,
    tensors: &[&OutputTensor],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let dtype = |t: &OutputTensor| to_safetensors(t.dtype).expect("checked when planning");
    let mut order: Vec<&OutputTensor> = tensors.to_vec();
    order.sort_by(|x, y| dtype(y).cmp(&dtype(x)).then_with(|| x.name.cmp(&y.name)));
    let mut offset = 0;
    let infos = order
        .iter()
        .map(|t| {
            let info = TensorInfo {
                dtype: dtype(t),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.byte_len),
            };
            offset += t.byte_len;
            (t.name.clone(), info)
        })
        .collect();
    let io = |source: std::io::Error| CheckpointError::Io {
        path: out.to_path_buf(),
        source,
    };
    let invalid = |e: String| io(std::io::Error::other(e));
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
    for tensor in order {
        let mut length = 0;
        writing.produce(tensor, &mut |bytes| {
            length += bytes.len();
            file.write_all(bytes).map_err(io)
        })?;
        assert_eq!(length, tensor.byte_len, "{}: bytes as planned", tensor.name);
        writing.done(&tensor.name, length);
    }
    file.into_inner().map_err(|e| io(e.into_error()))?;
    Ok(())
}

/// The safetensors format's limit on the header, in bytes.
const MAX_HEADER: usize = 100_000_000;

/// Writes the shards of a sharded checkpoint and its index into the new folder `dir`.
fn write_sharded(
    writing: &Writing,
    tensors: &[OutputTensor],
    dir: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    let shards = writing.a.shards();
    let single = shards.len() == 1 && writing.a.format() != Format::Sharded;
    if single && writing.model_folder() {
        // A model folder whose weights are one file: `model.safetensors`, as `save_pretrained`
        // writes it, without an index.
        let path = dir.join(SINGLE);
        File::create_new(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        let chosen: Vec<&OutputTensor> = tensors.iter().collect();
        let metadata = shards.into_iter().next().and_then(|(_, m)| m);
        let metadata = metadata.filter(|m| !m.is_empty());
        return write_safetensors(writing, &chosen, metadata, &path, out);
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
    let writing = Writing::new((a, b, None), options, tensors.len(), Box::new(|_| {}));
    for tensor in tensors {
        writing.compute(tensor)?;
    }
    Ok(writing.report())
}

/// Computes and writes every tensor into `out` in `format`, through a temporary file or folder
/// beside it that is renamed into place only when complete.
/// What [`write`] writes: the inputs, how they were named, and a mean's weights and further
/// inputs when it is one.
pub(super) struct Job {
    pub(super) inputs: Inputs,
    /// Every input, as it was given.
    pub(super) names: Vec<String>,
    pub(super) mean: Option<(SphericalMean, Vec<Checkpoint>)>,
    /// Output tensors read under other names: output name → (A's name, B's name).
    pub(super) renames: HashMap<String, (String, String)>,
    /// The dtype inputs are rounded to before they are merged.
    pub(super) input_dtype: Option<DType>,
    /// For each output layer, the input layer it comes from, when the layers change
    /// (`config.json`'s `num_hidden_layers` and per-layer lists follow).
    pub(super) layers: Option<Vec<usize>>,
}

pub(super) fn write(
    job: Job,
    tensors: Vec<OutputTensor>,
    out: &Path,
    format: Format,
    options: &FileMerge,
    progress: OnProgress,
) -> Result<(MergeReport, Vec<MeanStats>), CheckpointError> {
    let out_dtype = options.out_dtype.map(|d| d.dtype());
    let names = job.names;
    let mut writing = Writing::new(job.inputs, options.clone(), tensors.len(), progress);
    writing.mean = job.mean;
    writing.renames = job.renames;
    writing.input_dtype = job.input_dtype;
    let layers = job.layers;
    let writing = Arc::new(writing);
    let temp = create_temp(out, format == Format::Sharded)?;
    let written = match format {
        Format::Safetensors => {
            let chosen: Vec<&OutputTensor> = tensors.iter().collect();
            let metadata = Some(writing.a.metadata()).filter(|m| !m.is_empty());
            write_safetensors(&writing, &chosen, metadata, &temp, out)
        }
        Format::Sharded => write_sharded(&writing, &tensors, &temp, out).and_then(|()| {
            if !writing.model_folder() {
                return Ok(());
            }
            let (method, recipe) = match &writing.mean {
                Some((mean, _)) => (
                    "the weighted spherical mean",
                    serde_json::json!({ "weights": mean.weights() }).to_string(),
                ),
                None if options.base.is_some() => (
                    "task-vector SLERP (`base + slerp(a - base, b - base, t)`)",
                    serde_json::to_string_pretty(&options.config).unwrap_or_default(),
                ),
                None => (
                    "SLERP",
                    serde_json::to_string_pretty(&options.config).unwrap_or_default(),
                ),
            };
            write_model_files(
                &temp,
                writing.a.folder(),
                writing.b.folder(),
                out_dtype,
                options,
                &names,
                method,
                &recipe,
                layers.as_deref(),
            )
        }),
        Format::Burnpack => write_burnpack(&writing, tensors, &temp, out),
        Format::Pytorch => unreachable!("never an output format"),
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
    Ok((writing.report(), writing.mean_report()))
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
