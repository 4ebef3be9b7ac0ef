//! The SLERP of one pair of float tensors: reductions on the device, coefficients in f64 on the
//! host, the combination `c0·a + c1·b` on the device. The formulas and policies are those of the
//! crate's numerics contract (see the crate docs).

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use crate::kernels;
use crate::stats::{Branch, LerpReason, TensorStats};
use crate::{Granularity, MergeError, Method, SlerpConfig};

/// `cos θ` below `-(1 - ANTIPARALLEL_MARGIN)` counts as antiparallel: the geodesic is undefined at
/// π, so the pair is linearly interpolated.
const ANTIPARALLEL_MARGIN: f64 = 5e-4;

/// Block length of the scaled f32 reduction used off the CPU backends (see [`native_f64`]).
const BLOCK: usize = 1024;

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
    slerp_on(a, b, config, Path::Auto).map(|(out, _)| out)
}

/// [`slerp`] on the generic tensor-op path only, bypassing the fused kernels: the reference the
/// tests hold the kernels to.
#[doc(hidden)]
pub fn slerp_generic<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<Tensor<D>, MergeError> {
    slerp_on(a, b, config, Path::Generic).map(|(out, _)| out)
}

fn slerp_on<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
    path: Path,
) -> Result<(Tensor<D>, Option<TensorStats>), MergeError> {
    config.validate()?;
    let (shape_a, shape_b) = (a.dims().to_vec(), b.dims().to_vec());
    if shape_a != shape_b {
        return Err(MergeError::ShapeMismatch {
            path: String::new(),
            a: shape_a,
            b: shape_b,
        });
    }
    let (device_a, device_b) = (a.device(), b.device());
    if !same_device(&device_a, &device_b) {
        return Err(MergeError::DeviceMismatch {
            path: String::new(),
            a: Box::new(device_a),
            b: Box::new(device_b),
        });
    }
    for dtype in [a.dtype(), b.dtype()] {
        check_dtype(dtype, "")?;
    }
    let leaf = Leaf::of(&a);
    let non_finite = || MergeError::NonFinite {
        path: String::new(),
    };
    let (out, summary) = interpolate(a.inner(), b.inner(), config, path).ok_or_else(non_finite)?;
    let stats = match summary {
        Some(Summary::Pending(pending)) => {
            Some(resolve(vec![pending]).remove(0).ok_or_else(non_finite)?)
        }
        Some(Summary::Ready(stats)) => Some(stats),
        None => None,
    };
    Ok((leaf.restore(out), stats))
}

/// [`slerp`] that also returns the statistics of the pair (`None` at `t = 0` and `t = 1`).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn slerp_with_stats<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<(Tensor<D>, Option<TensorStats>), MergeError> {
    slerp_on(a, b, config, Path::Auto)
}

/// Whether two tensors may be merged together: the same device, with or without autodiff.
pub(crate) fn same_device(a: &Device, b: &Device) -> bool {
    a.clone().inner() == b.clone().inner()
}

/// Rejects the float dtypes that cannot be computed in (quantized tensors).
pub(crate) fn check_dtype(dtype: DType, path: &str) -> Result<(), MergeError> {
    match dtype {
        DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(MergeError::UnsupportedDType {
            path: path.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// The autodiff state of `a`'s tensor, to give back to the merged result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leaf {
    autodiff: bool,
    require_grad: bool,
}

impl Leaf {
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

/// Squared norms and dot product of one pair of vectors, in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PairStats {
    pub(crate) aa: f64,
    pub(crate) bb: f64,
    pub(crate) ab: f64,
}

impl PairStats {
    pub(crate) fn is_finite(&self) -> bool {
        self.aa.is_finite() && self.bb.is_finite() && self.ab.is_finite()
    }

    /// Decodes a flat `[aa, bb, ab, aa, bb, ab, …]` buffer, one triple per row.
    fn triples(values: &[f64]) -> Vec<Self> {
        values
            .chunks_exact(3)
            .map(|v| Self {
                aa: v[0],
                bb: v[1],
                ab: v[2],
            })
            .collect()
    }

    pub(crate) fn add(self, other: Self) -> Self {
        Self {
            aa: self.aa + other.aa,
            bb: self.bb + other.bb,
            ab: self.ab + other.ab,
        }
    }
}

/// `out = c0·a + c1·b` for one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Coefficients {
    pub(crate) c0: f64,
    pub(crate) c1: f64,
    pub(crate) branch: Branch,
}

/// `sin(x)/x`, with its Taylor series near 0 so that it is exact to f64 rounding everywhere.
pub(crate) fn sinc(x: f64) -> f64 {
    if x.abs() < 1e-3 {
        let x2 = x * x;
        1.0 - x2 / 6.0 + x2 * x2 / 120.0
    } else {
        x.sin() / x
    }
}

/// The coefficients of one pair, from its statistics; `None` when a statistic is not finite
/// (which happens exactly when `a` or `b` holds a NaN or an infinity).
pub(crate) fn coefficients(stats: PairStats, config: &SlerpConfig) -> Option<Coefficients> {
    if !stats.is_finite() {
        return None;
    }
    let t = config.t;
    let lerp = |reason| Coefficients {
        c0: 1.0 - t,
        c1: t,
        branch: Branch::Lerp(reason),
    };
    if config.method == Method::Lerp {
        return Some(lerp(LerpReason::Method));
    }
    let (na, nb) = (stats.aa.sqrt(), stats.bb.sqrt());
    if na <= config.eps || nb <= config.eps {
        return Some(lerp(LerpReason::ZeroNorm));
    }
    let cos = (stats.ab / (na * nb)).clamp(-1.0, 1.0);
    if let Some(threshold) = config.dot_threshold
        && cos.abs() > threshold
    {
        return Some(lerp(LerpReason::DotThreshold));
    }
    if cos < -(1.0 - ANTIPARALLEL_MARGIN) {
        return Some(lerp(LerpReason::Antiparallel));
    }
    let theta = crate::stats::angle(stats).map_or(0.0, |(_, theta)| theta);
    let s = sinc(theta);
    Some(Coefficients {
        c0: (1.0 - t) * sinc((1.0 - t) * theta) / s,
        c1: t * sinc(t * theta) / s,
        branch: Branch::Slerp,
    })
}

/// What [`interpolate`] knows about a tensor it merged.
pub(crate) enum Summary {
    /// The statistics, already on the host (and finite).
    Ready(TensorStats),
    /// Statistics still on the device; [`resolve`] reads them, many tensors at once.
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    Pending(Pending),
}

/// The device-side statistics of one merged tensor, not read back yet.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
pub(crate) struct Pending {
    /// `[rows, 8]` f32, as the CubeCL kernels write it.
    prepared: Tensor<2>,
    numel: usize,
    t: f64,
    per_row: bool,
}

/// Reads the statistics of many merged tensors with one host read per device, in order; `None`
/// for a tensor whose inputs held a NaN or an infinity.
#[cfg_attr(not(feature = "wgpu"), allow(unused_variables, unreachable_code))]
pub(crate) fn resolve(pending: Vec<Pending>) -> Vec<Option<TensorStats>> {
    #[cfg(not(feature = "wgpu"))]
    unreachable!("pending statistics come from the CubeCL kernels only");
    #[cfg(feature = "wgpu")]
    {
        let mut out: Vec<Option<TensorStats>> = vec![None; pending.len()];
        let mut left: Vec<(usize, Pending)> = pending.into_iter().enumerate().collect();
        while let Some((_, first)) = left.first() {
            let device = first.prepared.device();
            let (group, rest): (Vec<_>, Vec<_>) = left
                .into_iter()
                .partition(|(_, p)| p.prepared.device() == device);
            left = rest;
            let rows: Vec<usize> = group.iter().map(|(_, p)| p.prepared.dims()[0]).collect();
            let all = Tensor::cat(group.iter().map(|(_, p)| p.prepared.clone()).collect(), 0);
            // The one host read: 8 f32 per row of every tensor on this device.
            let values: Vec<f32> = all.into_data().iter::<f32>().collect();
            let mut offset = 0;
            for ((index, p), rows) in group.into_iter().zip(rows) {
                let decoded =
                    crate::cube::decode(&values[offset..offset + rows * crate::cube::WIDTH]);
                offset += rows * crate::cube::WIDTH;
                if decoded.iter().all(|(s, _)| s.is_finite()) {
                    let (stats, coeffs): (Vec<_>, Vec<_>) = decoded.into_iter().unzip();
                    out[index] = Some(TensorStats::new(p.numel, p.t, &stats, &coeffs, p.per_row));
                }
            }
        }
        out
    }
}

/// Interpolates two tensors that are known to have the same shape and device and no autodiff.
/// Returns `None` when either holds a non-finite value.
///
/// `t = 0` and `t = 1` return an input unchanged. On the CPU backends and the generic path this
/// reads back one small buffer per tensor, the reduction statistics (3 f64 per row on the CPU
/// backends; 5 f32 per row, or at most 5 × 1024 for a whole tensor, elsewhere), to compute the
/// coefficients in f64 and check finiteness; nothing of the size of the tensor leaves the
/// device. On CubeCL devices nothing is read: the coefficients are computed on the device and
/// the statistics come back [`Summary::Pending`], for [`resolve`] to read later, together with
/// those of the other tensors.
pub(crate) fn interpolate<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
    path: Path,
) -> Option<(Tensor<D>, Option<Summary>)> {
    let out_dtype = a.dtype();
    if config.t == 0.0 {
        return Some((a, None));
    }
    if config.t == 1.0 {
        return Some((b.cast(out_dtype), None));
    }
    let dims = a.dims();
    let n: usize = dims.iter().product();
    if n == 0 {
        return Some((a, None));
    }
    let rows = dims[0];
    // One angle per row, or one for the whole tensor. Row granularity with one-element rows
    // (1-D tensors) is exactly lerp, like the lerp method; both need the statistics only for the
    // finiteness check, and one tensor-wide reduction serves it. A single row is the whole
    // tensor.
    let row_mode = config.granularity == Granularity::Row;
    let per_row = row_mode && config.method == Method::Slerp && rows > 1 && n / rows > 1;
    let (k, force_lerp) = if per_row {
        (rows, false)
    } else {
        (1, row_mode && n / rows == 1)
    };
    // f64 tensors are computed in f64; f32, f16 and bf16 in f32, rounded once at the end.
    let compute = if out_dtype == DType::F64 {
        FloatDType::F64
    } else {
        FloatDType::F32
    };
    let fused = path == Path::Auto && kernels::route(&a, &b);
    let (a, b) = (a.cast(compute), b.cast(compute));
    #[cfg(feature = "wgpu")]
    if path == Path::Auto && crate::cube::route(&a, &b) {
        // f32, f16 and bf16 alike: computed in f32, rounded once to `a`'s dtype.
        let lerp_only = force_lerp || config.method == Method::Lerp;
        let prepared = crate::cube::prepare(a.clone(), b.clone(), k, config, lerp_only);
        let out = crate::cube::apply(a, b, prepared.clone()).cast(out_dtype);
        let pending = Pending {
            prepared,
            numel: n,
            t: config.t,
            per_row,
        };
        return Some((out, Some(Summary::Pending(pending))));
    }

    let generic_stats = || {
        if per_row {
            let cols = n / rows;
            row_stats(
                a.clone().reshape([rows, cols]),
                b.clone().reshape([rows, cols]),
            )
        } else {
            vec![tensor_stats(a.clone().reshape([n]), b.clone().reshape([n]))]
        }
    };
    let mut stats = if fused {
        PairStats::triples(&kernels::stats(a.clone(), b.clone(), k))
    } else {
        generic_stats()
    };
    if fused && !stats.iter().all(PairStats::is_finite) {
        // The kernel's f32 lanes overflow for |x| > 1.8e19: the f64 path decides whether the
        // data is really non-finite.
        stats = generic_stats();
    }
    let mut coeffs = Vec::with_capacity(k);
    for s in &stats {
        let mut c = coefficients(*s, config)?;
        if force_lerp {
            (c.c0, c.c1) = (1.0 - config.t, config.t);
            c.branch = Branch::Lerp(LerpReason::Method);
        }
        coeffs.push(c);
    }

    let summary = TensorStats::new(n, config.t, &stats, &coeffs, per_row);
    if fused {
        let flat = coeffs
            .iter()
            .flat_map(|c| [c.c0 as f32, c.c1 as f32])
            .collect();
        return Some((kernels::combine(a, b, flat), Some(Summary::Ready(summary))));
    }
    let out = if per_row {
        let device = a.device();
        let column = |values: Vec<f64>| -> Tensor<2> {
            let data = TensorData::new(values, [rows, 1]).convert_dtype(compute.into());
            Tensor::from_data(data, &device)
        };
        let c0 = column(coeffs.iter().map(|c| c.c0).collect());
        let c1 = column(coeffs.iter().map(|c| c.c1).collect());
        let (a2, b2): (Tensor<2>, Tensor<2>) =
            (a.reshape([rows, n / rows]), b.reshape([rows, n / rows]));
        a2.mul(c0).add(b2.mul(c1)).reshape(dims)
    } else {
        a.mul_scalar(coeffs[0].c0).add(b.mul_scalar(coeffs[0].c1))
    };
    Some((out.cast(out_dtype), Some(Summary::Ready(summary))))
}

/// Which implementation `interpolate` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// The fused kernels where [`kernels::route`] allows, the generic tensor ops elsewhere.
    Auto,
    /// The generic tensor ops everywhere.
    Generic,
}

/// Whole-tensor statistics of two flat tensors.
pub(crate) fn tensor_stats(a: Tensor<1>, b: Tensor<1>) -> PairStats {
    let n = a.dims()[0];
    if native_f64(&a.device()) {
        // One row: the f64 sum is accurate to far below the accuracy bar at 1e8 elements.
        return row_stats(a.reshape([1, n]), b.reshape([1, n]))[0];
    }
    // Scaled blocks of BLOCK values, folded on the device until few enough remain, combined in
    // f64 on the host.
    let blocks = n.div_ceil(BLOCK);
    let pad = blocks * BLOCK - n;
    let blocked = |x: Tensor<1>| -> Tensor<2> {
        let x = if pad > 0 {
            let zeros = Tensor::<1>::zeros([pad], (&x.device(), x.dtype()));
            Tensor::cat(vec![x, zeros], 0)
        } else {
            x
        };
        x.reshape([blocks, BLOCK])
    };
    let mut partial = ScaledStats::of(blocked(a), blocked(b));
    while partial.rows() > BLOCK {
        partial = partial.fold();
    }
    partial
        .read()
        .into_iter()
        .fold(PairStats::default(), PairStats::add)
}

/// Per-row statistics of two `[rows, cols]` tensors.
fn row_stats(a: Tensor<2>, b: Tensor<2>) -> Vec<PairStats> {
    if native_f64(&a.device()) {
        let (a, b) = (a.cast(FloatDType::F64), b.cast(FloatDType::F64));
        let aa = a.clone().square().sum_dim(1);
        let bb = b.clone().square().sum_dim(1);
        let ab = a.mul(b).sum_dim(1);
        // Host read: 3 f64 values per row.
        let data = Tensor::cat(vec![aa, bb, ab], 1).into_data();
        let values: Vec<f64> = data.iter::<f64>().collect();
        return PairStats::triples(&values);
    }
    ScaledStats::of(a, b).read()
}

/// Whether plain f64 reductions are trusted on this device: on the CPU backends (flex, ndarray)
/// f64 is native and its sums are exact to far below the accuracy bar. Every other device takes
/// the scaled f32 blocks, even where it advertises f64: wgpu on Mesa's lavapipe does, yet its
/// f64 `sum` of 1e7 elements came out with a relative error of 0.99 while its f32 sum was
/// accurate to 5e-8.
fn native_f64(device: &Device) -> bool {
    kernels::cpu_backend(device)
}

/// Per-row statistics in f32 that cannot overflow: each row is divided by its largest
/// magnitude before squaring, so `‖a‖² = ma² · aa` and `a·b = ma · mb · ab`. All `[rows, 1]`.
struct ScaledStats {
    ma: Tensor<2>,
    aa: Tensor<2>,
    mb: Tensor<2>,
    bb: Tensor<2>,
    ab: Tensor<2>,
}

/// Splits `x` into its row maxima (0 for an all-zero row) and `x` divided by them.
fn scale_rows(x: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let m = x.clone().abs().max_dim(1);
    let safe = m.clone().mask_fill(m.clone().equal_elem(0.0), 1.0);
    (m, x.div(safe))
}

impl ScaledStats {
    fn of(a: Tensor<2>, b: Tensor<2>) -> Self {
        let (ma, ua) = scale_rows(a);
        let (mb, ub) = scale_rows(b);
        Self {
            aa: ua.clone().square().sum_dim(1),
            bb: ub.clone().square().sum_dim(1),
            ab: ua.mul(ub).sum_dim(1),
            ma,
            mb,
        }
    }

    fn rows(&self) -> usize {
        self.ma.dims()[0]
    }

    /// Combines groups of BLOCK rows into one, rescaling each to the group's largest scale.
    fn fold(self) -> Self {
        let rows = self.rows();
        let groups = rows.div_ceil(BLOCK);
        let pad = groups * BLOCK - rows;
        // Padding rows have scale 0 and sums 0: they add nothing.
        let grouped = |x: Tensor<2>| -> Tensor<2> {
            let x = if pad > 0 {
                let zeros = Tensor::<2>::zeros([pad, 1], (&x.device(), x.dtype()));
                Tensor::cat(vec![x, zeros], 0)
            } else {
                x
            };
            x.reshape([groups, BLOCK])
        };
        let (ma, ra) = scale_rows(grouped(self.ma));
        let (mb, rb) = scale_rows(grouped(self.mb));
        Self {
            aa: grouped(self.aa).mul(ra.clone().square()).sum_dim(1),
            bb: grouped(self.bb).mul(rb.clone().square()).sum_dim(1),
            ab: grouped(self.ab).mul(ra).mul(rb).sum_dim(1),
            ma,
            mb,
        }
    }

    /// Host read: 5 f32 values per row, combined in f64.
    fn read(self) -> Vec<PairStats> {
        let data = Tensor::cat(vec![self.ma, self.aa, self.mb, self.bb, self.ab], 1).into_data();
        let values: Vec<f64> = data.iter::<f64>().collect();
        values
            .chunks_exact(5)
            .map(|v| {
                let (ma, aa, mb, bb, ab) = (v[0], v[1], v[2], v[3], v[4]);
                PairStats {
                    aa: ma * ma * aa,
                    bb: mb * mb * bb,
                    ab: ma * mb * ab,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(a: &[f64], b: &[f64]) -> PairStats {
        PairStats {
            aa: a.iter().map(|x| x * x).sum(),
            bb: b.iter().map(|x| x * x).sum(),
            ab: a.iter().zip(b).map(|(x, y)| x * y).sum(),
        }
    }

    #[test]
    fn orthogonal_unit_vectors_follow_the_quarter_circle() {
        for t in [0.1, 0.25, 0.5, 0.9] {
            let c = coefficients(stats(&[1.0, 0.0], &[0.0, 1.0]), &SlerpConfig::new(t)).unwrap();
            let half_pi = std::f64::consts::FRAC_PI_2;
            assert!((c.c0 - (t * half_pi).cos()).abs() < 1e-14);
            assert!((c.c1 - (t * half_pi).sin()).abs() < 1e-14);
            assert_eq!(c.branch, Branch::Slerp);
        }
    }

    #[test]
    fn identical_vectors_give_lerp_without_a_threshold() {
        let c = coefficients(stats(&[3.0, 4.0], &[3.0, 4.0]), &SlerpConfig::new(0.3)).unwrap();
        assert_eq!(c.branch, Branch::Slerp);
        assert!((c.c0 - 0.7).abs() < 1e-15 && (c.c1 - 0.3).abs() < 1e-15);
    }

    #[test]
    fn coefficients_are_continuous_as_the_angle_vanishes() {
        // A tiny angle: the coefficients must be within O(θ²) of lerp, with no jump.
        let theta: f64 = 1e-6;
        let s = stats(&[1.0, 0.0], &[theta.cos(), theta.sin()]);
        let c = coefficients(s, &SlerpConfig::new(0.5)).unwrap();
        assert!((c.c0 - 0.5).abs() < 1e-12 && (c.c1 - 0.5).abs() < 1e-12);
        // Exact value: sin(θ/2)/sin(θ) = 1/(2 cos(θ/2)).
        let exact = 1.0 / (2.0 * (theta / 2.0).cos());
        assert!((c.c0 - exact).abs() < 1e-15);
    }

    #[test]
    fn branches_follow_the_table() {
        let cfg = SlerpConfig::new(0.4);
        let zero = coefficients(stats(&[0.0, 0.0], &[1.0, 2.0]), &cfg).unwrap();
        assert_eq!(zero.branch, Branch::Lerp(LerpReason::ZeroNorm));
        let anti = coefficients(stats(&[1.0, 2.0], &[-2.0, -4.0]), &cfg).unwrap();
        assert_eq!(anti.branch, Branch::Lerp(LerpReason::Antiparallel));
        let close = stats(&[1.0, 0.0], &[1.0, 0.02]);
        let mk = cfg.clone().with_dot_threshold(Some(0.9995));
        assert_eq!(
            coefficients(close, &mk).unwrap().branch,
            Branch::Lerp(LerpReason::DotThreshold)
        );
        assert_eq!(coefficients(close, &cfg).unwrap().branch, Branch::Slerp);
        let lerp = cfg.clone().with_method(Method::Lerp);
        let c = coefficients(stats(&[1.0, 0.0], &[0.0, 1.0]), &lerp).unwrap();
        assert_eq!((c.c0, c.c1), (1.0 - 0.4, 0.4));
        let nan = PairStats {
            aa: f64::NAN,
            ..PairStats::default()
        };
        assert!(coefficients(nan, &cfg).is_none());
    }
}
