//! Computing the planned output tensors: each one's bytes when a writer asks for them, by the
//! engine, from the inputs its [`Op`] names; what the merges computed, collected for the
//! report. The writers ([`super::formats`]) know nothing of the methods, and this knows nothing
//! of the formats.

use std::borrow::Cow;
use std::sync::{Mutex, MutexGuard, PoisonError};

use burn::tensor::{DType, FloatDType, Tensor, TensorData, bf16, f16};

use super::convert::{
    convert, encode, encode_f32, f32_values, label, round_to, rounds, to_f32, to_f64,
};
use super::error::CheckpointError;
use super::fault::Registered;
use super::options::{FileMerge, Progress};
use super::plan::{Op, OutputTensor, Source};
use super::read::{Checkpoint, Data};
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

/// One run of a plan: the inputs it reads, and what the writer collects as it asks for each
/// tensor's bytes.
pub(super) struct Run {
    inputs: Vec<Checkpoint>,
    options: FileMerge,
    /// The statistics of each SLERP, with its index in the output's order.
    stats: Mutex<Vec<(usize, TensorStats)>>,
    /// What each mean computed, with its index in the output's order.
    mean_stats: Mutex<Vec<(usize, MeanStats)>>,
    progress: Mutex<Counter>,
    /// Tensors the output holds.
    total: usize,
    /// The first error, kept for writers that cannot return one.
    error: Mutex<Option<CheckpointError>>,
    /// Buffers reused from tensor to tensor.
    scratch: Mutex<Scratch>,
    /// Files created in a folder output, known to the bus-error handler while the run lives.
    tracked: Mutex<Vec<Registered>>,
}

/// The progress callback and the tensors written so far.
struct Counter {
    report: OnProgress,
    done: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn non_finite(name: &str) -> CheckpointError {
    CheckpointError::NonFinite {
        name: name.to_string(),
        reason: "an input holds a NaN or an infinity".into(),
    }
}

fn refusal(name: &str, refusal: Refusal) -> CheckpointError {
    match refusal {
        Refusal::NonFinite => non_finite(name),
        Refusal::Cancelling => CheckpointError::Merge(MergeError::CancellingDirections {
            path: name.to_string(),
        }),
    }
}

impl Run {
    pub(super) fn new(
        inputs: Vec<Checkpoint>,
        options: FileMerge,
        total: usize,
        progress: OnProgress,
    ) -> Self {
        Self {
            inputs,
            options,
            stats: Mutex::new(Vec::new()),
            mean_stats: Mutex::new(Vec::new()),
            progress: Mutex::new(Counter {
                report: progress,
                done: 0,
            }),
            total,
            error: Mutex::new(None),
            scratch: Mutex::new(Scratch::default()),
            tracked: Mutex::new(Vec::new()),
        }
    }

    /// The first input: the layout, metadata and shards an output follows.
    pub(super) fn first(&self) -> &Checkpoint {
        &self.inputs[0]
    }

    /// Whether one of the first two inputs is a model folder, so that a folder output is one
    /// too.
    pub(super) fn model_folder(&self) -> bool {
        self.inputs.iter().take(2).any(|c| c.folder().is_some())
    }

    /// The stored dtype and bytes of `source`.
    fn read(&self, source: &Source) -> Result<(DType, Data<'_>), CheckpointError> {
        let from = &self.inputs[source.input];
        let Some(dtype) = from.entry(&source.name).and_then(|e| e.dtype) else {
            return Err(CheckpointError::Format {
                path: from.path().to_path_buf(),
                message: format!("tensor `{}` is not a tensor Burn can read", source.name),
            });
        };
        Ok((dtype, from.bytes(&source.name)?))
    }

    /// The values of `source` as a flat tensor on the options' device, in the output tensor's
    /// compute dtype (f64, or f32 rounded to `round` first where that is narrower).
    fn load(
        &self,
        source: &Source,
        tensor: &OutputTensor,
        round: Option<DType>,
    ) -> Result<Tensor<1>, CheckpointError> {
        let n: usize = tensor.shape.iter().product();
        let Some(compute) = compute_dtype(tensor.dtype) else {
            return Err(does_not_fit(&tensor.name, tensor.dtype));
        };
        let (dtype, bytes) = self.read(source)?;
        let values = match compute {
            FloatDType::F64 => TensorData::new(to_f64(dtype, &bytes), [n]),
            _ => {
                let mut values = to_f32(dtype, &bytes);
                if rounds(dtype, round) {
                    round_to(&mut values, round);
                }
                TensorData::new(values, [n])
            }
        };
        Ok(Tensor::from_data(
            values,
            (&self.options.device, compute.into()),
        ))
    }

    pub(super) fn report(&self) -> MergeReport {
        let mut stats = std::mem::take(&mut *lock(&self.stats));
        stats.sort_by_key(|(index, _)| *index);
        MergeReport::new(stats.into_iter().map(|(_, s)| s).collect())
    }

    /// What the means computed, in the output's order.
    pub(super) fn mean_report(&self) -> Vec<MeanStats> {
        let mut stats = std::mem::take(&mut *lock(&self.mean_stats));
        stats.sort_by_key(|(index, _)| *index);
        stats.into_iter().map(|(_, s)| s).collect()
    }

    /// Makes a file created inside the temporary known to the bus-error handler, which
    /// removes it with the temporary.
    pub(super) fn track(&self, path: &std::path::Path) {
        lock(&self.tracked).push(Registered::temporary(path));
    }

    /// [`CheckpointError::Interrupted`] once the options' cancellation flag is set.
    pub(super) fn check_cancel(&self) -> Result<(), CheckpointError> {
        self.options.check_cancel()
    }

    /// Keeps the first error of a writer that cannot return one.
    pub(super) fn fail(&self, e: CheckpointError) {
        lock(&self.error).get_or_insert(e);
    }

    pub(super) fn take_error(&self) -> Option<CheckpointError> {
        lock(&self.error).take()
    }

    /// Reports one more tensor written.
    pub(super) fn done(&self, name: &str, bytes: usize) {
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
    pub(super) fn produce(
        &self,
        tensor: &OutputTensor,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        self.options.check_cancel()?;
        match &tensor.op {
            Op::Copy(source) => self.copy(tensor, source, None, emit),
            Op::Mean {
                inputs,
                base,
                weights,
                mean,
            } => {
                if self.on_host(tensor) {
                    let taking: Vec<&Source> =
                        mean.taking(weights).iter().map(|i| &inputs[*i]).collect();
                    let how = HostMerge::Mean(mean, weights);
                    let mut scratch = lock(&self.scratch);
                    let merged = self.merge_on_host(
                        tensor,
                        how,
                        &taking,
                        base.as_ref(),
                        None,
                        &mut scratch,
                        emit,
                    );
                    if let Some(result) = merged {
                        return result;
                    }
                }
                let bytes = self.merge_mean(tensor, inputs, base.as_ref(), weights, mean)?;
                emit(&bytes)
            }
            Op::Slerp {
                a,
                b,
                base,
                config,
                round,
                ..
            } => {
                // At t = 0 and t = 1 the merge is an input: its bytes, converted where the
                // output dtype differs, without looking at the values (as the in-memory merge).
                if config.t == 0.0 || config.t == 1.0 {
                    let from = if config.t == 0.0 { a } else { b };
                    return self.copy(tensor, from, *round, emit);
                }
                if self.on_host(tensor) {
                    let mut scratch = lock(&self.scratch);
                    let merged = self.merge_on_host(
                        tensor,
                        HostMerge::Slerp(config),
                        &[a, b],
                        base.as_ref(),
                        *round,
                        &mut scratch,
                        emit,
                    );
                    if let Some(result) = merged {
                        return result;
                    }
                }
                let bytes = self.merge_tensors(tensor, (a, b), base.as_ref(), config, *round)?;
                emit(&bytes)
            }
        }
    }

    /// The bytes of `source`, rounded to `round` where that is narrower and converted to the
    /// output's dtype where it differs.
    fn copy(
        &self,
        tensor: &OutputTensor,
        source: &Source,
        round: Option<DType>,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        let (dtype, bytes) = self.read(source)?;
        let fits =
            |bytes: Option<Vec<u8>>| bytes.ok_or_else(|| does_not_fit(&tensor.name, tensor.dtype));
        let (dtype, bytes) = match round {
            Some(rounded) if rounds(dtype, round) => {
                (rounded, Cow::Owned(fits(convert(dtype, &bytes, rounded))?))
            }
            _ => (dtype, Cow::Borrowed(&*bytes)),
        };
        if dtype == tensor.dtype {
            return emit(&bytes);
        }
        emit(&fits(convert(dtype, &bytes, tensor.dtype))?)
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
    #[allow(clippy::too_many_arguments)]
    fn merge_on_host(
        &self,
        tensor: &OutputTensor,
        how: HostMerge<'_>,
        sources: &[&Source],
        base: Option<&Source>,
        round: Option<DType>,
        scratch: &mut Scratch,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), CheckpointError>,
    ) -> Option<Result<(), CheckpointError>> {
        let n: usize = tensor.shape.iter().product();
        let dims = if tensor.shape.len() >= 2 {
            vec![tensor.shape[0].max(1), n / tensor.shape[0].max(1)]
        } else {
            vec![n]
        };
        let data = match sources
            .iter()
            .map(|s| self.read(s))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(data) => data,
            Err(e) => return Some(Err(e)),
        };
        let base_data = match base.map(|s| self.read(s)).transpose() {
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
            && round.is_none_or(|d| d == tensor.dtype)
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
            .map(|((dtype, bytes), buffer)| f32_values(*dtype, bytes, buffer, round))
            .collect();
        let base_values = base_data
            .as_ref()
            .map(|(dtype, bytes)| f32_values(*dtype, bytes, base_buffer, round));
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
        let (rows, flat) = match how {
            HostMerge::Slerp(config) => {
                let rows = vectors(dims, config);
                let grams = engine::gram_slices(xs, base_values, rows)?;
                let stats: Vec<PairStats> = grams.iter().map(Gram::pair).collect();
                let Some((coeffs, mut summary)) = finish(&stats, dims, config) else {
                    return Some(Err(non_finite(name)));
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
                    Err(e) => return Some(Err(refusal(name, e))),
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

    /// The SLERP of one tensor through Burn tensors on the options' device: f64 tensors,
    /// devices other than the CPU backends, and the tensors [`Self::merge_on_host`] leaves to
    /// the f64 path.
    fn merge_tensors(
        &self,
        tensor: &OutputTensor,
        (a, b): (&Source, &Source),
        base: Option<&Source>,
        config: &SlerpConfig,
        round: Option<DType>,
    ) -> Result<Vec<u8>, CheckpointError> {
        let name = &tensor.name;
        let n: usize = tensor.shape.iter().product();
        let load = |from: &Source| self.load(from, tensor, round);
        let (a, b) = (load(a)?, load(b)?);
        let base = base.map(load).transpose()?;
        let merge_error = |e: MergeError| match e {
            MergeError::NonFinite { .. } => non_finite(name),
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
        inputs: &[Source],
        base: Option<&Source>,
        weights: &[f64],
        mean: &SphericalMean,
    ) -> Result<Vec<u8>, CheckpointError> {
        let name = &tensor.name;
        let tensors = inputs
            .iter()
            .map(|from| self.load(from, tensor, None))
            .collect::<Result<Vec<_>, _>>()?;
        let base = base.map(|b| self.load(b, tensor, None)).transpose()?;
        let (out, mut stats) = mean
            .compute(tensors, base, weights)
            .map_err(|e| refusal(name, e))?;
        stats.path = name.clone();
        lock(&self.mean_stats).push((tensor.index, stats));
        encode(tensor.dtype, &out.into_data()).ok_or_else(|| does_not_fit(name, tensor.dtype))
    }

    /// The bytes of one output tensor, owned (for writers that keep them).
    pub(super) fn compute(&self, tensor: &OutputTensor) -> Result<Vec<u8>, CheckpointError> {
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
