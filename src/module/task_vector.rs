//! Task-vector SLERP: `base + slerp(a − base, b − base, t)`.

use burn::tensor::Tensor;

use crate::config::SlerpConfig;
use crate::interpolate::{Interpolated, KernelChoice, compute_dtype, endpoint, interpolate};

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
    let compute = compute_dtype(dtype).expect("checked before merging");
    let base = base.cast(compute);
    let (da, db) = (
        a.cast(compute).sub(base.clone()),
        b.cast(compute).sub(base.clone()),
    );
    match interpolate(da, db, config, KernelChoice::Fused) {
        Interpolated::Done(out, summary) => Interpolated::Done(base.add(out).cast(dtype), summary),
        Interpolated::NonFinite(da) => Interpolated::NonFinite(base.add(da).cast(dtype)),
    }
}
