//! Task-vector SLERP: `base + slerp(a − base, b − base, t)`.
//!
//! On the CPU backends it runs on the engine: one pass reduces the task vectors' Gram matrix
//! from the differences, computed in registers (no task vector is materialised, and none is
//! derived from the raw Gram matrix, which cancels five or six digits for fine-tunes close to
//! their base), and one pass writes `base + c0·(a − base) + c1·(b − base)`. On CubeCL devices
//! the same two passes run on the device, the coefficients included, and nothing is read back
//! until the end of the merge.

use burn::tensor::Tensor;

use crate::config::SlerpConfig;
use crate::engine::Inputs;
use crate::interpolate::{Interpolated, Prepared, Summary, endpoint, finish, vectors};
use crate::numerics::PairStats;

/// `base + slerp(a − base, b − base)`, computed in f32 (f64 for f64 tensors) and returned in
/// `a`'s dtype; `t = 0` and `t = 1` return `a` and `b` themselves.
pub(crate) fn interpolate_task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Interpolated<D> {
    if let Some(input) = endpoint(&a, &b, config.t) {
        return Interpolated::Done(input, None);
    }
    let (shape, dtype, device) = (a.shape(), a.dtype(), a.device());
    match prepare_task_vectors(base.clone(), a.clone(), b.clone(), config) {
        Some((prepared, summary)) => {
            Interpolated::Done(apply_task_vectors(base, a, b, prepared), summary)
        }
        None => Interpolated::NonFinite(Tensor::zeros(shape, (&device, dtype))),
    }
}

/// The statistics pass of [`interpolate_task_vectors`] strictly between the endpoints: the
/// task vectors' statistics and the coefficients, nothing written.
pub(crate) fn prepare_task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Option<(Prepared, Option<Summary>)> {
    let dims = a.dims();
    let n: usize = dims.iter().product();
    if n == 0 {
        return Some((Prepared::Empty, None));
    }
    #[cfg(feature = "wgpu")]
    if crate::interpolate::on_device(&a, &b, Some(&base), config) {
        let (prepared, summary) =
            crate::interpolate::prepare_on_device(&a, &b, Some(&base), config);
        return Some((prepared, summary));
    }
    let rows = vectors(&dims, config);
    let inputs = Inputs::new(vec![a, b], Some(base));
    let stats: Vec<PairStats> = inputs.gram(rows).iter().map(|g| g.pair()).collect();
    let (coeffs, summary) = finish(&stats, &dims, config)?;
    Some((Prepared::Host(coeffs), Some(Summary::Ready(summary))))
}

/// The write pass, with the prepared coefficients: `base + c0·(a − base) + c1·(b − base)`,
/// over `a`'s storage where nothing else holds it; the same bits as
/// [`interpolate_task_vectors`].
pub(crate) fn apply_task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    prepared: Prepared,
) -> Tensor<D> {
    match prepared {
        Prepared::Empty => a,
        Prepared::Host(coeffs) => {
            let per_row: Vec<Vec<f64>> = coeffs.iter().map(|c| vec![c.c0, c.c1]).collect();
            Inputs::new(vec![a, b], Some(base)).combine(&per_row)
        }
        #[cfg(feature = "wgpu")]
        Prepared::Device(prepared) => crate::kernels::cubecl::apply(a, b, Some(base), *prepared),
    }
}

/// [`interpolate_task_vectors`] with the checks of [`crate::slerp`] and the statistics read:
/// what the file merge calls for each tensor when it has a base.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn task_vector_slerp_with_stats<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Result<(Tensor<D>, Option<crate::stats::TensorStats>), crate::error::MergeError> {
    use crate::interpolate::{TensorInfo, check_pair};
    config.validate()?;
    check_pair("", &TensorInfo::of(&a), &TensorInfo::of(&b))?;
    check_pair("", &TensorInfo::of(&a), &TensorInfo::of(&base))?;
    crate::interpolate::finished(interpolate_task_vectors(base, a, b, config))
}
