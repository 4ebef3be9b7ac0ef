//! Task-vector SLERP: `base + slerp(a − base, b − base, t)`.

use burn::tensor::Tensor;

use crate::config::SlerpConfig;
use crate::interpolate::{
    Interpolated, KernelChoice, Pair, Prepared, Summary, apply, compute_dtype, endpoint,
    interpolate, prepare,
};

/// `base`, `a − base` and `b − base` in the compute dtype (f32, f64 for f64 tensors).
fn task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let compute = compute_dtype(a.dtype()).expect("checked before merging");
    let base = base.cast(compute);
    let da = a.cast(compute).sub(base.clone());
    let db = b.cast(compute).sub(base.clone());
    (base, da, db)
}

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
    let dtype = a.dtype();
    let (base, da, db) = task_vectors(base, a, b);
    match interpolate(da, db, config, KernelChoice::Fused) {
        Interpolated::Done(out, summary) => Interpolated::Done(base.add(out).cast(dtype), summary),
        Interpolated::NonFinite(da) => Interpolated::NonFinite(base.add(da).cast(dtype)),
    }
}

/// The statistics pass of [`interpolate_task_vectors`] strictly between the endpoints: the task
/// vectors are computed, reduced and dropped.
pub(crate) fn prepare_task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Option<(Prepared, Option<Summary>)> {
    let (_, da, db) = task_vectors(base, a, b);
    prepare(&Pair::new(da, db, KernelChoice::Fused), config)
}

/// The write pass: the task vectors computed again, combined with the prepared coefficients
/// and added to `base`; the same bits as [`interpolate_task_vectors`].
pub(crate) fn apply_task_vectors<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    prepared: Prepared,
) -> Tensor<D> {
    let dtype = a.dtype();
    let (base, da, db) = task_vectors(base, a, b);
    let out = apply(Pair::new(da, db, KernelChoice::Fused), prepared);
    base.add(out).cast(dtype)
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
