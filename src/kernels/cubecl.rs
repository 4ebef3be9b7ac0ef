//! Fused SLERP kernels for the CubeCL backend (wgpu, and with it CUDA, ROCm and Metal).
//!
//! Everything stays on the device, coefficients included, so a whole-model merge reads back one
//! small buffer at its end instead of one per tensor:
//!
//! 1. `partials`: each unit streams a strided slice of one row of `a` and `b` and keeps
//!    `(ma, Σ(a/ma)², mb, Σ(b/mb)², Σ(a/ma)(b/mb))`, where `ma`, `mb` are the largest magnitudes
//!    seen so far (the sums are rescaled when they grow). No square can overflow, whatever the
//!    values, and a NaN or an infinity poisons the sums, which is how the host finds it.
//! 2. `fold`: groups of those 5-tuples are combined the same way until one is left per row.
//! 3. `coefficients`: one unit per row turns its tuple into `(c0, c1)` and the branch taken, with
//!    the formulas of the numerics contract evaluated in f32 (the sinc form, the angle from
//!    `atan2`), and writes them next to the tuple: 8 f32 per row.
//! 4. `combine`: `out = c0·a + c1·b`, reading the coefficients of its row from that buffer.
//!
//! The 8-value rows are what [`decode`] turns into statistics on the host.

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, cubecl::calculate_cube_count_elemwise};

use crate::numerics::{ANTIPARALLEL_MARGIN, Branch, Coefficients, LerpReason, PairStats};

/// Values per row of the prepared buffer: `ma, Σa'², mb, Σb'², Σa'b', c0, c1, branch`.
pub(crate) const WIDTH: usize = 8;
/// Elements each unit of the `partials` kernel reads from each input, at most.
const PER_UNIT: usize = 256;
/// Tuples each unit of the `fold` kernel combines.
const FOLD: usize = 64;
/// Units per cube.
const CUBE: u32 = 256;
/// π as the sum of an f32 with trailing zero bits and a small correction: `PI_HIGH − x` is
/// exact for `x` in `[π/2, π]`.
const PI_HIGH: f32 = 3.140_625;
const PI_LOW: f32 = (std::f64::consts::PI - 3.140_625) as f32;

// The branch codes the `coefficients` kernel writes, as f32 (0 is the spherical branch).
const ZERO_NORM: f32 = Branch::Lerp(LerpReason::ZeroNorm).code() as f32;
const ANTIPARALLEL: f32 = Branch::Lerp(LerpReason::Antiparallel).code() as f32;
const DOT_THRESHOLD: f32 = Branch::Lerp(LerpReason::DotThreshold).code() as f32;
const METHOD: f32 = Branch::Lerp(LerpReason::Method).code() as f32;
/// `cos θ` below this is antiparallel.
const ANTIPARALLEL_COS: f32 = -(1.0 - ANTIPARALLEL_MARGIN) as f32;

#[backend_extension(Cube: cfg(feature = "wgpu"), Fusion: cfg(feature = "wgpu"))]
pub(crate) trait SlerpDeviceKernels: Backend {
    /// `[rows, 8]` f32: the scaled sums of each row and the coefficients computed from them.
    /// `s = 1 − t` is rounded from f64 by the caller, so that swapping the inputs and `t` swaps
    /// the coefficients exactly. `threshold` above 1 means none; `lerp_only` forces `(s, t)`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(dtype = burn::tensor::DType::F32, shape = burn::tensor::Shape::new([*rows, 8]))]
    fn slerp_prepare(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
        t: f32,
        s: f32,
        eps: f32,
        threshold: f32,
        lerp_only: bool,
    ) -> FloatTensor<Self>;

    /// `c0·a + c1·b` row by row, with the coefficients of `prepared`; written over `a` when
    /// nothing else holds its buffer.
    #[fusion(dtype = a, shape = a)]
    fn slerp_apply(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        prepared: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// What the `coefficients` kernel needs of the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceParams {
    /// The factor.
    pub(crate) t: f64,
    /// Norm at or below which a row counts as zero.
    pub(crate) eps: f64,
    /// mergekit's threshold on `|cos θ|`, if any.
    pub(crate) dot_threshold: Option<f64>,
    /// Linear interpolation whatever the angle.
    pub(crate) lerp_only: bool,
}

/// Queues the statistics and coefficients of `rows` equal rows of two f32 tensors: a
/// `[rows, 8]` tensor on the device, nothing read back.
pub(crate) fn prepare<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    rows: usize,
    params: DeviceParams,
) -> Tensor<2> {
    use burn::backend::Dispatch;
    let threshold = params.dot_threshold.map_or(2.0, |d| d as f32);
    let out = <Dispatch as SlerpDeviceKernels>::slerp_prepare(
        a.into_dispatch(),
        b.into_dispatch(),
        rows,
        params.t as f32,
        (1.0 - params.t) as f32,
        params.eps as f32,
        threshold,
        params.lerp_only,
    );
    Tensor::from_dispatch(out)
}

/// Queues `c0·a + c1·b` with the coefficients of `prepared`.
pub(crate) fn apply<const D: usize>(a: Tensor<D>, b: Tensor<D>, prepared: Tensor<2>) -> Tensor<D> {
    use burn::backend::Dispatch;
    let out = <Dispatch as SlerpDeviceKernels>::slerp_apply(
        a.into_dispatch(),
        b.into_dispatch(),
        prepared.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// Decodes the rows of a prepared buffer read back to the host: the statistics in f64 and the
/// coefficients and branch the device used.
pub(crate) fn decode(values: &[f32]) -> Vec<(PairStats, Coefficients)> {
    values
        .chunks_exact(WIDTH)
        .map(|v| {
            let row: [f32; WIDTH] = v.try_into().expect("chunks of WIDTH");
            let [ma, aa, mb, bb, ab, c0, c1, code] = row.map(f64::from);
            let stats = PairStats {
                aa: ma * ma * aa,
                bb: mb * mb * bb,
                ab: ma * mb * ab,
            };
            let branch = Branch::from_code(code as u32);
            (stats, Coefficients { c0, c1, branch })
        })
        .collect()
}

/// Folds one value `x` into a running `(scale, Σ(x/scale)²)`, returning the factor the older
/// terms were multiplied by (1 when the scale did not grow).
#[cube]
fn grow<F: Float>(scale: &mut F, sum: &mut F, magnitude: F) -> F {
    let mut ratio = F::new(1.0);
    if magnitude > *scale {
        ratio = *scale / magnitude;
        *sum *= ratio * ratio;
        *scale = magnitude;
    }
    ratio
}

/// Stage 1: one unit per `(row, slot)`, reading elements `slot, slot + units, …` of its row.
#[cube(launch_unchecked)]
fn partials_kernel<F: Float>(
    a: &[F],
    b: &[F],
    out: &mut [F],
    cols: usize,
    units: usize,
    total: usize,
) {
    let id = ABSOLUTE_POS;
    if id >= total {
        terminate!();
    }
    let row = id / units;
    let base = row * cols;
    let mut ma = F::new(0.0);
    let mut mb = F::new(0.0);
    let mut aa = F::new(0.0);
    let mut bb = F::new(0.0);
    let mut ab = F::new(0.0);
    let mut ia = F::new(0.0);
    let mut ib = F::new(0.0);
    let mut i = id % units;
    while i < cols {
        let x = a[base + i];
        let y = b[base + i];
        let ax = x.abs();
        let ay = y.abs();
        if ax > ma || ay > mb {
            let ra = grow::<F>(&mut ma, &mut aa, ax);
            let rb = grow::<F>(&mut mb, &mut bb, ay);
            // One product, so that swapping `a` and `b` rounds the same way.
            ab *= ra * rb;
            // 0 while a side is all zeros so far (its values are then 0 too).
            if ma > F::new(0.0) {
                ia = F::new(1.0) / ma;
            }
            if mb > F::new(0.0) {
                ib = F::new(1.0) / mb;
            }
        }
        let xs = x * ia;
        let ys = y * ib;
        aa += xs * xs;
        bb += ys * ys;
        ab += xs * ys;
        i += units;
    }
    let o = id * 5;
    out[o] = ma;
    out[o + 1] = aa;
    out[o + 2] = mb;
    out[o + 3] = bb;
    out[o + 4] = ab;
}

/// Stage 2: one unit per `(row, group)`, combining up to `fold` of the row's `parts` tuples.
#[cube(launch_unchecked)]
fn fold_kernel<F: Float>(
    input: &[F],
    out: &mut [F],
    parts: usize,
    groups: usize,
    fold: usize,
    total: usize,
) {
    let id = ABSOLUTE_POS;
    if id >= total {
        terminate!();
    }
    let row = id / groups;
    let start = (id % groups) * fold;
    let mut end = start + fold;
    if end > parts {
        end = parts;
    }
    let mut ma = F::new(0.0);
    let mut mb = F::new(0.0);
    let mut aa = F::new(0.0);
    let mut bb = F::new(0.0);
    let mut ab = F::new(0.0);
    for j in start..end {
        let p = (row * parts + j) * 5;
        let pa = input[p];
        let pb = input[p + 2];
        let ra = grow::<F>(&mut ma, &mut aa, pa);
        let rb = grow::<F>(&mut mb, &mut bb, pb);
        ab *= ra * rb;
        // Each tuple's own scale relative to the running one (0 while everything is zero).
        let mut sa = F::new(0.0);
        if ma > F::new(0.0) {
            sa = pa / ma;
        }
        let mut sb = F::new(0.0);
        if mb > F::new(0.0) {
            sb = pb / mb;
        }
        aa += sa * sa * input[p + 1];
        bb += sb * sb * input[p + 3];
        ab += sa * sb * input[p + 4];
    }
    let o = id * 5;
    out[o] = ma;
    out[o + 1] = aa;
    out[o + 2] = mb;
    out[o + 3] = bb;
    out[o + 4] = ab;
}

/// `sin(x)` for `0 ≤ x ≤ π/2`: its Taylor series to `x¹⁵`, within an f32 rounding or two.
///
/// Written with arithmetic alone: the built-in `sin` and `atan2` of shading languages may be
/// far less accurate (Vulkan allows an absolute error of 2⁻¹¹ for `sin`; Mesa's lavapipe
/// was measured 1e-6 off), which the accuracy bar does not leave room for.
#[cube]
fn sin_series<F: Float>(x: F) -> F {
    let x2 = x * x;
    let mut p = F::new(-1.0 / 1_307_674_368_000.0);
    p = p * x2 + F::new(1.0 / 6_227_020_800.0);
    p = p * x2 + F::new(-1.0 / 39_916_800.0);
    p = p * x2 + F::new(1.0 / 362_880.0);
    p = p * x2 + F::new(-1.0 / 5040.0);
    p = p * x2 + F::new(1.0 / 120.0);
    p = p * x2 + F::new(-1.0 / 6.0);
    x + x * x2 * p
}

/// `sin(x)/x` for `0 ≤ x < π`, continuous at 0.
#[cube]
fn sinc<F: Float>(x: F) -> F {
    let x2 = x * x;
    let mut s = F::new(1.0) - x2 / F::new(6.0) + x2 * x2 / F::new(120.0);
    if x >= F::new(1e-2) {
        let mut y = x;
        if x > F::new(std::f32::consts::FRAC_PI_2) {
            // sin(x) = sin(π − x), with π split so that the subtraction is exact.
            y = (F::new(PI_HIGH) - x) + F::new(PI_LOW);
        }
        s = sin_series::<F>(y) / x;
    }
    s
}

/// `atan(x)` for `|x| ≤ tan(π/8)`: its Taylor series to `x²¹`.
#[cube]
fn atan_series<F: Float>(x: F) -> F {
    let x2 = x * x;
    let mut p = F::new(-1.0 / 21.0);
    p = p * x2 + F::new(1.0 / 19.0);
    p = p * x2 + F::new(-1.0 / 17.0);
    p = p * x2 + F::new(1.0 / 15.0);
    p = p * x2 + F::new(-1.0 / 13.0);
    p = p * x2 + F::new(1.0 / 11.0);
    p = p * x2 + F::new(-1.0 / 9.0);
    p = p * x2 + F::new(1.0 / 7.0);
    p = p * x2 + F::new(-1.0 / 5.0);
    p = p * x2 + F::new(1.0 / 3.0);
    x - x * x2 * p
}

/// `atan(r)` for `0 ≤ r ≤ 1`: `π/4 + atan((r − 1)/(r + 1))` above `tan(π/8)`.
#[cube]
fn atan_unit<F: Float>(r: F) -> F {
    let reduce = r > F::new(0.414_213_57);
    let mut z = r;
    if reduce {
        z = (r - F::new(1.0)) / (r + F::new(1.0));
    }
    let mut a = atan_series::<F>(z);
    if reduce {
        a += F::new(std::f32::consts::FRAC_PI_4);
    }
    a
}

/// `atan2(y, x)` for `y, x ≥ 0`, not both 0.
#[cube]
fn atan2_positive<F: Float>(y: F, x: F) -> F {
    let swap = y > x;
    let mut num = y;
    let mut den = x;
    if swap {
        num = x;
        den = y;
    }
    let mut a = atan_unit::<F>(num / den);
    if swap {
        a = F::new(std::f32::consts::FRAC_PI_2) - a;
    }
    a
}

/// Stage 3: one unit per row, from its single tuple to `(c0, c1, branch)`.
#[cube(launch_unchecked)]
fn coefficients_kernel<F: Float>(
    input: &[F],
    out: &mut [F],
    rows: usize,
    t: f32,
    s: f32,
    eps: f32,
    threshold: f32,
    lerp_only: u32,
) {
    let t = F::cast_from(t);
    let u = F::cast_from(s);
    let eps = F::cast_from(eps);
    let threshold = F::cast_from(threshold);
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let p = row * 5;
    let ma = input[p];
    let aa = input[p + 1];
    let mb = input[p + 2];
    let bb = input[p + 3];
    let ab = input[p + 4];
    let one = F::new(1.0);
    let two = F::new(2.0);
    let mut c0 = u;
    let mut c1 = t;
    let mut code = F::new(0.0);
    let ra = aa.sqrt();
    let rb = bb.sqrt();
    if lerp_only == 1 {
        code = F::new(METHOD);
    } else if ma * ra <= eps || mb * rb <= eps {
        code = F::new(ZERO_NORM);
    } else {
        let mut cos = ab / (ra * rb);
        if cos > one {
            cos = one;
        }
        if cos < -one {
            cos = -one;
        }
        if cos.abs() > threshold {
            code = F::new(DOT_THRESHOLD);
        } else if cos < F::new(ANTIPARALLEL_COS) {
            code = F::new(ANTIPARALLEL);
        } else {
            // 2 ∓ 2·cos ≥ 0 once cos is clamped.
            let minus = (two - two * cos).sqrt();
            let plus = (two + two * cos).sqrt();
            let theta = two * atan2_positive::<F>(minus, plus);
            let whole = sinc::<F>(theta);
            c0 = u * sinc::<F>(u * theta) / whole;
            c1 = t * sinc::<F>(t * theta) / whole;
        }
    }
    let o = row * 8;
    out[o] = ma;
    out[o + 1] = aa;
    out[o + 2] = mb;
    out[o + 3] = bb;
    out[o + 4] = ab;
    out[o + 5] = c0;
    out[o + 6] = c1;
    out[o + 7] = code;
}

/// Stage 4: `out = c0·a + c1·b`, one element per unit.
#[cube(launch_unchecked)]
fn combine_kernel<F: Float>(a: &[F], b: &[F], prepared: &[F], out: &mut [F], cols: usize) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let o = (i / cols) * 8;
    out[i] = prepared[o + 5] * a[i] + prepared[o + 6] * b[i];
}

/// Stage 4 written over `a`, which nothing else holds: the same expression, so the same bits.
#[cube(launch_unchecked)]
fn combine_in_place_kernel<F: Float>(a: &mut [F], b: &[F], prepared: &[F], cols: usize) {
    let i = ABSOLUTE_POS;
    if i >= a.len() {
        terminate!();
    }
    let o = (i / cols) * 8;
    a[i] = prepared[o + 5] * a[i] + prepared[o + 6] * b[i];
}

fn units_grid(tensor: &CubeTensor, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(CUBE);
    (
        calculate_cube_count_elemwise(&tensor.client, units, dim),
        dim,
    )
}

fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

impl SlerpDeviceKernels for CubeBackend {
    fn slerp_prepare(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
        t: f32,
        s: f32,
        eps: f32,
        threshold: f32,
        lerp_only: bool,
    ) -> FloatTensor<Self> {
        let (a, b) = (into_contiguous(a), into_contiguous(b));
        let n = a.meta.shape().num_elements();
        let cols = n / rows;
        let mut parts = cols.div_ceil(PER_UNIT).max(1);
        let units = rows * parts;
        let mut partial = empty(&a, Shape::new([units * 5]));
        let (count, dim) = units_grid(&a, units);
        // SAFETY: every index the kernel reads is below `rows · cols = n`, the length of `a` and
        // `b`, and it writes `units · 5` values into a buffer of that length.
        unsafe {
            partials_kernel::launch_unchecked::<f32>(
                &a.client,
                count,
                dim,
                a.clone().into_buffer_arg(),
                b.into_buffer_arg(),
                partial.clone().into_buffer_arg(),
                cols,
                parts,
                units,
            );
        }
        while parts > 1 {
            let groups = parts.div_ceil(FOLD);
            let units = rows * groups;
            let folded = empty(&a, Shape::new([units * 5]));
            let (count, dim) = units_grid(&a, units);
            // SAFETY: unit `(row, g)` reads tuples `g·FOLD .. min((g+1)·FOLD, parts)` of its row
            // (`rows · parts` tuples exist) and writes its own tuple.
            unsafe {
                fold_kernel::launch_unchecked::<f32>(
                    &a.client,
                    count,
                    dim,
                    partial.into_buffer_arg(),
                    folded.clone().into_buffer_arg(),
                    parts,
                    groups,
                    FOLD,
                    units,
                );
            }
            partial = folded;
            parts = groups;
        }
        let out = empty(&a, Shape::new([rows, WIDTH]));
        let (count, dim) = units_grid(&a, rows);
        // SAFETY: row `r` reads tuple `r` of `rows` and writes values `8r .. 8r + 8`.
        unsafe {
            coefficients_kernel::launch_unchecked::<f32>(
                &a.client,
                count,
                dim,
                partial.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                rows,
                t,
                s,
                eps,
                threshold,
                u32::from(lerp_only),
            );
        }
        out
    }

    fn slerp_apply(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        prepared: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (a, b) = (into_contiguous(a), into_contiguous(b));
        let shape = a.meta.shape().clone();
        let n = shape.num_elements();
        let rows = prepared.meta.shape()[0];
        let (count, dim) = units_grid(&a, n);
        let client = a.client.clone();
        // A buffer nothing else holds (under fusion: one the stream hands over read-write, as
        // its last use) is written over.
        if a.can_mut() {
            // SAFETY: element `i < n` of `a` and `b`, and row `i / cols < rows` of `prepared`.
            unsafe {
                combine_in_place_kernel::launch_unchecked::<f32>(
                    &client,
                    count,
                    dim,
                    a.clone().into_buffer_arg(),
                    b.into_buffer_arg(),
                    into_contiguous(prepared).into_buffer_arg(),
                    n / rows,
                );
            }
            return a;
        }
        let out = empty(&a, shape);
        // SAFETY: element `i < n` of `a`, `b` and `out`, and row `i / cols < rows` of `prepared`.
        unsafe {
            combine_kernel::launch_unchecked::<f32>(
                &client,
                count,
                dim,
                a.into_buffer_arg(),
                b.into_buffer_arg(),
                into_contiguous(prepared).into_buffer_arg(),
                out.clone().into_buffer_arg(),
                n / rows,
            );
        }
        out
    }
}
