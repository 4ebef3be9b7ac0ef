//! The SLERP of one pair of float tensors: the checks, the one routing decision, the
//! reductions, the coefficients and the combination `c0·a + c1·b`, on the tensors' device. The
//! formulas and policies are those of the numerics contract ([`crate::numerics`]).
//!
//! On the CPU backends and the generic path each tensor's statistics (a few numbers per tensor
//! or row) are read back as it is merged, and the coefficients are computed in f64 on the host.
//! On CubeCL devices nothing is read: coefficients are computed on the device and the
//! statistics stay there ([`Summary::OnDevice`]) until [`read_summaries`] reads those of many
//! tensors at once.

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use crate::config::{Granularity, Method, SlerpConfig};
use crate::engine;
use crate::error::MergeError;
use crate::family::Gram;
use crate::kernels::{self, Route};
use crate::numerics::{Coefficients, LerpReason, PairStats, coefficients};
use crate::reduce;
use crate::stats::TensorStats;

/// Spherical linear interpolation of two float tensors of one shape.
///
/// `t = 0` returns `a` and `t = 1` returns `b`, bit for bit; in between, the result moves along
/// the great circle between the two, with the norm interpolated linearly. The reductions and
/// coefficients follow the crate's numerics contract on every backend, and the result stays on
/// the tensors' device. On an autodiff device the result is a fresh leaf (no graph back to `a`
/// or `b`) with `a`'s require-grad setting.
///
/// # Arguments
///
/// * `a`, `b` - the two tensors; same shape, same device (autodiff or not).
/// * `config` - interpolation factor, granularity, method and thresholds.
///
/// # Returns
///
/// The interpolated tensor, in `a`'s dtype (f16 and bf16 are computed in f32 and rounded once).
///
/// # Errors
///
/// [`MergeError::InvalidT`] or [`MergeError::InvalidConfig`] for an invalid `config`,
/// [`MergeError::ShapeMismatch`], [`MergeError::DeviceMismatch`],
/// [`MergeError::UnsupportedDType`] for quantized tensors, and [`MergeError::NonFinite`] when
/// either tensor holds a NaN or an infinity (the `path` of each is empty).
///
/// # Example
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_slerp::{SlerpConfig, slerp};
///
/// let device = Device::flex();
/// let a = Tensor::<1>::from_floats([1.0, 0.0], &device);
/// let b = Tensor::<1>::from_floats([0.0, 1.0], &device);
/// let mid = slerp(a, b, &SlerpConfig::new(0.5))?;
/// let half = std::f32::consts::FRAC_1_SQRT_2;
/// mid.into_data().assert_approx_eq::<f32>(
///     &burn::tensor::TensorData::from([half, half]),
///     burn::tensor::Tolerance::absolute(1e-6),
/// );
/// # Ok::<(), burn_slerp::MergeError>(())
/// ```
pub fn slerp<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<Tensor<D>, MergeError> {
    slerp_with(a, b, config, KernelChoice::Fused).map(|(out, _)| out)
}

/// [`slerp`] on the generic tensor-op path only, bypassing the fused kernels: the reference the
/// tests hold the kernels to.
#[doc(hidden)]
pub fn slerp_generic<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<Tensor<D>, MergeError> {
    slerp_with(a, b, config, KernelChoice::GenericOnly).map(|(out, _)| out)
}

/// [`slerp`] that also returns the statistics of the pair (`None` at `t = 0` and `t = 1`).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn slerp_with_stats<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<(Tensor<D>, Option<TensorStats>), MergeError> {
    slerp_with(a, b, config, KernelChoice::Fused)
}

fn slerp_with<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
    choice: KernelChoice,
) -> Result<(Tensor<D>, Option<TensorStats>), MergeError> {
    config.validate()?;
    check_pair("", &TensorInfo::of(&a), &TensorInfo::of(&b))?;
    let autodiff = AutodiffState::of(&a);
    let (out, stats) = finished(interpolate(a.inner(), b.inner(), config, choice))?;
    Ok((autodiff.restore(out), stats))
}

/// One interpolation's result with its statistics read (from the device, where they are
/// still there), or [`MergeError::NonFinite`] with an empty path.
pub(crate) fn finished<const D: usize>(
    result: Interpolated<D>,
) -> Result<(Tensor<D>, Option<TensorStats>), MergeError> {
    let non_finite = || MergeError::NonFinite {
        path: String::new(),
    };
    let Interpolated::Done(out, summary) = result else {
        return Err(non_finite());
    };
    let stats = match summary {
        Some(summary) => Some(
            read_summaries(vec![summary])
                .remove(0)
                .ok_or_else(non_finite)?,
        ),
        None => None,
    };
    Ok((out, stats))
}

/// What the pair checks need to know of one tensor. Nothing is initialised to learn it: the
/// dtype of a lazy parameter is unknown, and only float tensors' devices and dtypes are checked
/// (`None` for int and bool tensors, which are copied from `a`).
#[derive(Debug, Clone)]
pub(crate) struct TensorInfo {
    pub(crate) shape: Vec<usize>,
    pub(crate) device: Option<Device>,
    pub(crate) dtype: Option<DType>,
}

impl TensorInfo {
    pub(crate) fn of<const D: usize>(tensor: &Tensor<D>) -> Self {
        Self {
            shape: tensor.dims().to_vec(),
            device: Some(tensor.device()),
            dtype: Some(tensor.dtype()),
        }
    }
}

/// Every check of a pair of float tensors that needs no data: one shape (shapes that would
/// broadcast are a mismatch too), one device (with or without autodiff), dtypes that can be
/// computed in. Errors name `path`.
pub(crate) fn check_pair(path: &str, a: &TensorInfo, b: &TensorInfo) -> Result<(), MergeError> {
    if a.shape != b.shape {
        return Err(MergeError::ShapeMismatch {
            path: path.to_string(),
            a: a.shape.clone(),
            b: b.shape.clone(),
        });
    }
    if let (Some(da), Some(db)) = (&a.device, &b.device)
        && da.clone().inner() != db.clone().inner()
    {
        return Err(MergeError::DeviceMismatch {
            path: path.to_string(),
            a: Box::new(da.clone()),
            b: Box::new(db.clone()),
        });
    }
    for dtype in [a.dtype, b.dtype].into_iter().flatten() {
        compute_dtype(dtype).ok_or_else(|| MergeError::UnsupportedDType {
            path: path.to_string(),
            dtype: format!("{dtype:?}"),
        })?;
    }
    Ok(())
}

/// The dtype a float tensor is computed in: f64 tensors in f64; f32, f16 and bf16 in f32 (the
/// result is rounded once to the tensor's dtype). `None` for dtypes that cannot be computed in
/// (quantized tensors).
pub(crate) fn compute_dtype(dtype: DType) -> Option<FloatDType> {
    match dtype {
        DType::F64 => Some(FloatDType::F64),
        DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => Some(FloatDType::F32),
        _ => None,
    }
}

/// The autodiff state of `a`'s tensor, to give back to the merged result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AutodiffState {
    autodiff: bool,
    require_grad: bool,
}

impl AutodiffState {
    pub(crate) fn of<const D: usize>(tensor: &Tensor<D>) -> Self {
        Self {
            autodiff: tensor.is_autodiff(),
            require_grad: tensor.is_require_grad(),
        }
    }

    /// Puts a result computed on the inner device back on `a`'s autodiff device as a fresh leaf.
    pub(crate) fn restore<const D: usize>(self, tensor: Tensor<D>) -> Tensor<D> {
        if self.autodiff {
            tensor.autodiff().set_require_grad(self.require_grad)
        } else {
            tensor
        }
    }
}

/// Which implementations [`interpolate`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelChoice {
    /// The fused kernels where the device has them ([`kernels::route`]), the generic tensor ops
    /// elsewhere.
    Fused,
    /// The generic tensor ops everywhere.
    GenericOnly,
}

/// What [`interpolate`] knows about a tensor it merged.
pub(crate) enum Summary {
    /// The statistics, already on the host (and finite).
    Ready(TensorStats),
    /// Statistics still on the device; [`read_summaries`] reads them, many tensors at once.
    #[cfg(feature = "wgpu")]
    OnDevice(DeviceStats),
}

/// The device-side statistics of one merged tensor, not read back yet.
#[cfg(feature = "wgpu")]
pub(crate) struct DeviceStats {
    /// `[rows, 8]` f32, as the CubeCL kernels write it.
    prepared: Tensor<2>,
    numel: usize,
    t: f64,
    per_row: bool,
}

/// The statistics of many merged tensors, in order, with one host read per device for those
/// still on a device; `None` for a tensor whose inputs held a NaN or an infinity.
pub(crate) fn read_summaries(summaries: Vec<Summary>) -> Vec<Option<TensorStats>> {
    #[cfg(feature = "wgpu")]
    {
        let mut out: Vec<Option<TensorStats>> = Vec::with_capacity(summaries.len());
        let mut on_device: Vec<(usize, DeviceStats)> = Vec::new();
        for summary in summaries {
            match summary {
                Summary::Ready(stats) => out.push(Some(stats)),
                Summary::OnDevice(stats) => {
                    on_device.push((out.len(), stats));
                    out.push(None);
                }
            }
        }
        while let Some((_, first)) = on_device.first() {
            let device = first.prepared.device();
            let (group, rest): (Vec<_>, Vec<_>) = on_device
                .into_iter()
                .partition(|(_, s)| s.prepared.device() == device);
            on_device = rest;
            let rows: Vec<usize> = group.iter().map(|(_, s)| s.prepared.dims()[0]).collect();
            let all = Tensor::cat(group.iter().map(|(_, s)| s.prepared.clone()).collect(), 0);
            // The one host read: 8 f32 per row of every tensor on this device.
            let values: Vec<f32> = all.into_data().iter::<f32>().collect();
            let width = kernels::cubecl::WIDTH;
            let mut offset = 0;
            for ((index, s), rows) in group.into_iter().zip(rows) {
                let decoded = kernels::cubecl::decode(&values[offset..offset + rows * width]);
                offset += rows * width;
                if decoded.iter().all(|(stats, _)| stats.is_finite()) {
                    let (stats, coeffs): (Vec<_>, Vec<_>) = decoded.into_iter().unzip();
                    out[index] = Some(TensorStats::new(s.numel, s.t, &stats, &coeffs, s.per_row));
                }
            }
        }
        out
    }
    #[cfg(not(feature = "wgpu"))]
    summaries
        .into_iter()
        .map(|Summary::Ready(stats)| Some(stats))
        .collect()
}

/// How a tensor of `dims` is split for the configuration's granularity and method.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Number of vectors interpolated on their own: the rows, or 1 for the whole tensor.
    vectors: usize,
    /// Row granularity with one-element rows: exactly lerp, like the lerp method.
    lerp_only: bool,
    /// One angle per row.
    per_row: bool,
}

impl Split {
    fn of(dims: &[usize], config: &SlerpConfig) -> Self {
        let n: usize = dims.iter().product();
        let rows = dims[0];
        let row_mode = config.granularity == Granularity::Row;
        // Both lerp forms need the statistics only for the finiteness check, and one
        // tensor-wide reduction serves it. A single row is the whole tensor.
        let per_row = row_mode && config.method == Method::Slerp && rows > 1 && n / rows > 1;
        Self {
            vectors: if per_row { rows } else { 1 },
            lerp_only: config.method == Method::Lerp || (row_mode && n / rows == 1),
            per_row,
        }
    }
}

/// What [`interpolate`] (and every per-tensor combination of the module walk) gives back.
pub(crate) enum Interpolated<const D: usize, S = Summary> {
    /// The result, and what was learnt of the pair (nothing at `t = 0` and `t = 1`).
    Done(Tensor<D>, Option<S>),
    /// An input held a NaN or an infinity: a tensor of `a`'s shape and dtype handed back, so
    /// that nothing needs a copy of `a` kept aside for this case.
    NonFinite(Tensor<D>),
}

/// Interpolates two tensors that are known to have the same shape and device and no autodiff,
/// taking both by value (no copy of either is kept while the result is written, so that a
/// combine on the CPU or CubeCL kernels writes over `a` when nothing else holds it).
///
/// `t = 0` and `t = 1` return an input unchanged. Returns [`Interpolated::NonFinite`] when
/// either holds a NaN or an infinity; on CubeCL devices that is found only when the statistics
/// are read ([`read_summaries`]).
pub(crate) fn interpolate<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
    choice: KernelChoice,
) -> Interpolated<D> {
    if let Some(input) = endpoint(&a, &b, config.t) {
        return Interpolated::Done(input, None);
    }
    let pair = Pair::new(a, b, choice);
    match prepare(&pair, config) {
        Some((prepared, summary)) => Interpolated::Done(apply(pair, prepared), summary),
        None => Interpolated::NonFinite(engine::in_dtype(pair.a, pair.out_dtype)),
    }
}

/// Two tensors of one shape and device, without autodiff, as they are computed (f16 and bf16
/// widened to f32 unless the CPU kernels read them as they are), with their route.
pub(crate) struct Pair<const D: usize> {
    a: Tensor<D>,
    b: Tensor<D>,
    route: Route,
    out_dtype: DType,
}

impl<const D: usize> Pair<D> {
    /// Casts to the compute dtype where needed and takes the one routing decision.
    pub(crate) fn new(a: Tensor<D>, b: Tensor<D>, choice: KernelChoice) -> Self {
        let out_dtype = a.dtype();
        if choice == KernelChoice::Fused && kernels::takes_half(&a, &b) {
            return Self {
                a,
                b,
                route: Route::Cpu,
                out_dtype,
            };
        }
        let compute = compute_dtype(out_dtype).expect("checked before interpolating");
        let dtype = DType::from(compute);
        let (a, b) = (engine::in_dtype(a, dtype), engine::in_dtype(b, dtype));
        // The one routing decision, on the tensors as they are computed.
        let route = match choice {
            KernelChoice::Fused => kernels::route(&a, &b),
            KernelChoice::GenericOnly => Route::Generic,
        };
        Self {
            a,
            b,
            route,
            out_dtype,
        }
    }
}

/// What the statistics pass of a pair leaves for the combine: everything but the tensors.
pub(crate) enum Prepared {
    /// An empty tensor: the result is `a` as it is.
    Empty,
    /// One `(c0, c1)` per row, computed on the host.
    Host(Vec<Coefficients>),
    /// The `[rows, 8]` buffer the CubeCL combine reads its coefficients from.
    #[cfg(feature = "wgpu")]
    Device(Box<Tensor<2>>),
}

/// The statistics pass of one pair strictly between the endpoints (callers take `t = 0` and
/// `t = 1` from [`endpoint`]): reductions and coefficients, nothing written. `None` when an
/// input holds a NaN or an infinity (on CubeCL devices that shows only in the summary, when it
/// is read).
pub(crate) fn prepare<const D: usize>(
    pair: &Pair<D>,
    config: &SlerpConfig,
) -> Option<(Prepared, Option<Summary>)> {
    debug_assert!(
        config.t > 0.0 && config.t < 1.0,
        "endpoints are not prepared"
    );
    let (a, b) = (&pair.a, &pair.b);
    let dims = a.dims();
    let n: usize = dims.iter().product();
    if n == 0 {
        return Some((Prepared::Empty, None));
    }
    let split = Split::of(&dims, config);
    let rows = split.vectors;
    // The device kernels know only the default zero-norm rule; mergekit's takes the host's.
    #[cfg(feature = "wgpu")]
    let route = match pair.route {
        Route::Cube if config.zero_norm != crate::config::ZeroNorm::Lerp => Route::Generic,
        route => route,
    };
    #[cfg(not(feature = "wgpu"))]
    let route = pair.route;
    let stats = match route {
        #[cfg(feature = "wgpu")]
        Route::Cube => return Some(prepare_on_device(a, b, None, config)),
        Route::Cpu => match engine::cpu_grams(&[a.clone(), b.clone()], rows) {
            Some(grams) => grams.iter().map(Gram::pair).collect(),
            None => generic_stats(a, b, rows),
        },
        Route::Generic => generic_stats(a, b, rows),
    };
    let (coeffs, summary) = finish(&stats, &dims, config)?;
    Some((Prepared::Host(coeffs), Some(Summary::Ready(summary))))
}

/// Whether SLERP of `a` and `b` (of their differences from `base`) is prepared on the device
/// by the CubeCL kernels: f32 tensors on a wgpu device, with the default zero-norm rule (the
/// only one the device kernels know; mergekit's takes the host's).
#[cfg(feature = "wgpu")]
pub(crate) fn on_device<const D: usize>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    base: Option<&Tensor<D>>,
    config: &SlerpConfig,
) -> bool {
    kernels::route(a, b) == Route::Cube
        && base.is_none_or(|base| base.dtype() == DType::F32)
        && config.zero_norm == crate::config::ZeroNorm::Lerp
}

/// The statistics pass of a pair (of task vectors, with a base) on a CubeCL device, strictly
/// between the endpoints and not empty: the statistics and coefficients queued, nothing read.
#[cfg(feature = "wgpu")]
pub(crate) fn prepare_on_device<const D: usize>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    base: Option<&Tensor<D>>,
    config: &SlerpConfig,
) -> (Prepared, Option<Summary>) {
    let dims = a.dims();
    let split = Split::of(&dims, config);
    let params = kernels::cubecl::DeviceParams {
        t: config.t,
        eps: config.eps,
        dot_threshold: config.dot_threshold,
        lerp_only: split.lerp_only,
    };
    let prepared = kernels::cubecl::prepare(a.clone(), b.clone(), base, split.vectors, params);
    let stats = DeviceStats {
        prepared: prepared.clone(),
        numel: dims.iter().product(),
        t: config.t,
        per_row: split.per_row,
    };
    (
        Prepared::Device(Box::new(prepared)),
        Some(Summary::OnDevice(stats)),
    )
}

/// The number of vectors a tensor of `dims` is split into for `config`: its rows, or 1.
pub(crate) fn vectors(dims: &[usize], config: &SlerpConfig) -> usize {
    Split::of(dims, config).vectors
}

/// The coefficients of each vector of a tensor of `dims` from its statistics, and the summary;
/// `None` when an input holds a NaN or an infinity.
pub(crate) fn finish(
    stats: &[PairStats],
    dims: &[usize],
    config: &SlerpConfig,
) -> Option<(Vec<Coefficients>, TensorStats)> {
    let split = Split::of(dims, config);
    let n: usize = dims.iter().product();
    let mut coeffs = Vec::with_capacity(stats.len());
    for s in stats {
        match coefficients(*s, config) {
            // The statistics served the finiteness check only.
            Some(_) if split.lerp_only => {
                coeffs.push(Coefficients::lerp(config.t, LerpReason::Method));
            }
            Some(c) => coeffs.push(c),
            None => return None,
        }
    }
    let summary = TensorStats::new(n, config.t, stats, &coeffs, split.per_row);
    Some((coeffs, summary))
}

/// The combine of one pair with what its statistics pass prepared: `c0·a + c1·b` in `a`'s
/// dtype, written over `a` where the kernels can (nothing else holds it), allocated otherwise.
pub(crate) fn apply<const D: usize>(pair: Pair<D>, prepared: Prepared) -> Tensor<D> {
    let Pair {
        a,
        b,
        route,
        out_dtype,
    } = pair;
    let out = match prepared {
        Prepared::Empty => return engine::in_dtype(a, out_dtype),
        #[cfg(feature = "wgpu")]
        Prepared::Device(prepared) => kernels::cubecl::apply(a, b, None, *prepared),
        Prepared::Host(coeffs) if route == Route::Cpu => {
            let flat: Vec<f32> = coeffs
                .iter()
                .flat_map(|c| [c.c0 as f32, c.c1 as f32])
                .collect();
            kernels::cpu::combine(a, &[b], None, &flat)
        }
        Prepared::Host(coeffs) => {
            let compute = compute_dtype(a.dtype()).expect("a float dtype");
            generic_combine(a, b, &coeffs, compute)
        }
    };
    engine::in_dtype(out, out_dtype)
}

/// The merge at `t = 0` or `t = 1`: `a`, or `b` in `a`'s dtype, as they are (the formula
/// would turn −0.0 into +0.0, and nothing is checked for finiteness); `None` in between.
pub(crate) fn endpoint<const D: usize>(a: &Tensor<D>, b: &Tensor<D>, t: f64) -> Option<Tensor<D>> {
    if t == 0.0 {
        Some(a.clone())
    } else if t == 1.0 {
        Some(engine::in_dtype(b.clone(), a.dtype()))
    } else {
        None
    }
}

/// The statistics of `rows` equal rows (1: the whole tensor) on the generic path.
fn generic_stats<const D: usize>(a: &Tensor<D>, b: &Tensor<D>, rows: usize) -> Vec<PairStats> {
    let n = a.shape().num_elements();
    if rows > 1 {
        let shape = [rows, n / rows];
        reduce::row_stats(a.clone().reshape(shape), b.clone().reshape(shape))
    } else {
        vec![reduce::tensor_stats(
            a.clone().reshape([n]),
            b.clone().reshape([n]),
        )]
    }
}

/// `c0·a + c1·b` with Burn's tensor ops: scalars for one vector, `[rows, 1]` columns in the
/// compute dtype for many.
fn generic_combine<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    coeffs: &[Coefficients],
    compute: FloatDType,
) -> Tensor<D> {
    if let [c] = coeffs {
        return a.mul_scalar(c.c0).add(b.mul_scalar(c.c1));
    }
    let dims = a.dims();
    let rows = coeffs.len();
    let n: usize = dims.iter().product();
    let device = a.device();
    // Built in the dtype they multiply, not the device's default float dtype.
    let column = |values: Vec<f64>| -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(values, [rows, 1]),
            (&device, compute.into()),
        )
    };
    let c0 = column(coeffs.iter().map(|c| c.c0).collect());
    let c1 = column(coeffs.iter().map(|c| c.c1).collect());
    let (a2, b2): (Tensor<2>, Tensor<2>) =
        (a.reshape([rows, n / rows]), b.reshape([rows, n / rows]));
    a2.mul(c0).add(b2.mul(c1)).reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_tensors_are_refused_by_name() {
        let scheme = burn::tensor::quantization::QuantScheme::default();
        let info = |dtype| TensorInfo {
            shape: vec![4, 2],
            device: None,
            dtype: Some(dtype),
        };
        let err =
            check_pair("fc.weight", &info(DType::F32), &info(DType::QFloat(scheme))).unwrap_err();
        assert!(
            matches!(&err, MergeError::UnsupportedDType { path, dtype } if path == "fc.weight" && dtype.starts_with("QFloat")),
            "{err}"
        );
        assert!(check_pair("w", &info(DType::BF16), &info(DType::F64)).is_ok());
    }

    /// The free function on a tensor quantized by Burn itself.
    #[cfg(feature = "flex")]
    #[test]
    fn slerp_refuses_a_quantized_tensor() {
        let device = Device::flex();
        let scheme = burn::tensor::quantization::QuantScheme::default();
        let a = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0], &device);
        let q = a.clone().quantize_dynamic(&scheme);
        assert!(matches!(q.dtype(), DType::QFloat(_)));
        let err = slerp(a, q, &SlerpConfig::new(0.5)).unwrap_err();
        assert!(matches!(err, MergeError::UnsupportedDType { .. }), "{err}");
        assert!(err.to_string().contains("dequantize it first"), "{err}");
    }
}
