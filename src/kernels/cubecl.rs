//! The SLERP family's kernels for the CubeCL backend (wgpu, and with it CUDA, ROCm and Metal):
//! one Gram pass and one combine pass over k = 2 to 8 inputs (k known when the kernel is
//! compiled, one kernel per k), with an optional base whose differences are taken in
//! registers. Two-input SLERP is the k = 2 case, with its coefficients computed on the device
//! too, so a whole-model merge reads back one small buffer at its end instead of one per
//! tensor:
//!
//! 1. `gram_partials`: each unit streams a strided slice of one row of every input and keeps,
//!    per input, the largest magnitude `mᵢ` seen so far and the sums `Σ(xₐ/mₐ)(x_b/m_b)` of
//!    the upper triangle, rescaled when a magnitude grows (by `rₐ·r_b`, one product, so that
//!    the order of the inputs does not change the rounding). No product can overflow or
//!    underflow, whatever the values, and a NaN or an infinity poisons the sums, which is how
//!    the host finds it.
//! 2. `gram_fold`: groups of those tuples are combined the same way until one is left per row.
//!    [`unscale`] turns a row, read back, into the Gram matrix in f64.
//! 3. `coefficients` (two inputs): one unit per row turns its tuple into `(c0, c1)` and the
//!    branch taken, with the formulas of the numerics contract evaluated in f32 (the sinc form,
//!    the angle from `atan2`), and writes them next to the statistics: 8 f32 per row, which
//!    [`decode`] reads on the host.
//! 4. `combine`: `Σ cᵢ·xᵢ` or `base + Σ cᵢ·(xᵢ − base)`, reading the coefficients of its row
//!    from an 8-wide buffer (the prepared one, or one the host wrote for the other methods),
//!    over the first input where nothing else holds it.
//!
//! Burn's backend extensions take a fixed number of tensors, so the ops take eight inputs and
//! a base; the slots past `k` hold handles of the second input, which the kernels never read
//! (never of the first, whose buffer the combine may write over).

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, cubecl::calculate_cube_count_elemwise};

use crate::numerics::{ANTIPARALLEL_MARGIN, Branch, Coefficients, LerpReason, PairStats};

/// Values per row of the prepared buffer: `ma, Σa'², mb, Σb'², Σa'b', c0, c1, branch`; also
/// the width of a row of coefficients the combine reads.
pub(crate) const WIDTH: usize = 8;
/// Where `c0, c1` sit in a row of the prepared buffer.
const COEFFICIENTS_AT: usize = 5;
/// The most inputs one kernel takes.
pub(crate) const MAX_K: usize = 8;
/// The sums of the upper triangle of an 8 × 8 Gram matrix.
const MAX_PACKED: usize = 36;
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
pub(crate) trait FamilyDeviceKernels: Backend {
    /// The Gram pass over `rows` equal rows of the first `k` inputs (of their differences from
    /// `base` with `has_base`): `[rows, k + k(k+1)/2]` f32, each row the inputs' largest
    /// magnitudes `mᵢ` and the packed upper triangle of `Σ(xₐ/mₐ)(x_b/m_b)`. The inputs past
    /// `k`, and `base` without `has_base`, are not read (callers pass handles of another input).
    #[allow(clippy::too_many_arguments)]
    #[fusion(dtype = burn::tensor::DType::F32, shape = burn::tensor::Shape::new([*rows, *k + *k * (*k + 1) / 2]))]
    fn family_gram(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        x6: FloatTensor<Self>,
        x7: FloatTensor<Self>,
        base: FloatTensor<Self>,
        k: usize,
        has_base: bool,
        rows: usize,
    ) -> FloatTensor<Self>;

    /// `[rows, 8]` f32 from the Gram pass of two inputs: their statistics and the SLERP
    /// coefficients computed from them (`ma, Σa'², mb, Σb'², Σa'b', c0, c1, branch`). `s = 1 − t`
    /// is rounded from f64 by the caller, so that swapping the inputs and `t` swaps the
    /// coefficients exactly. `threshold` above 1 means none; `lerp_only` forces `(s, t)`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(dtype = burn::tensor::DType::F32, shape = burn::tensor::Shape::new([*rows, 8]))]
    fn slerp_coefficients(
        gram: FloatTensor<Self>,
        rows: usize,
        t: f32,
        s: f32,
        eps: f32,
        threshold: f32,
        lerp_only: bool,
    ) -> FloatTensor<Self>;

    /// `Σ cᵢ·xᵢ` (or `base + Σ cᵢ·(xᵢ − base)`) over the first `k` inputs, row by row, with
    /// the coefficients at `offset` of each 8-wide row of `coefficients`; written over `x0`
    /// when nothing else holds its buffer.
    #[allow(clippy::too_many_arguments)]
    #[fusion(dtype = x0, shape = x0)]
    fn family_combine(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        x6: FloatTensor<Self>,
        x7: FloatTensor<Self>,
        base: FloatTensor<Self>,
        coefficients: FloatTensor<Self>,
        k: usize,
        has_base: bool,
        offset: usize,
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

/// The inputs of a device op: the first `k ≤ 8` handed over as they are, the remaining slots
/// (and the base, when there is none) filled with handles of the second input, which the
/// kernels do not read (never of the first, whose buffer the combine may write over).
fn slots<const D: usize>(
    xs: Vec<Tensor<D>>,
    base: Option<Tensor<D>>,
) -> ([Tensor<D>; MAX_K], Tensor<D>) {
    assert!((2..=MAX_K).contains(&xs.len()), "2 to 8 inputs");
    let filler = xs[1].clone();
    let base = base.unwrap_or_else(|| filler.clone());
    let mut xs = xs.into_iter();
    let slots = std::array::from_fn(|_| xs.next().unwrap_or_else(|| filler.clone()));
    (slots, base)
}

/// Queues the Gram pass of `rows` equal rows of 2 to 8 f32 tensors (of their differences from
/// `base`): `[rows, k + k(k+1)/2]`, nothing read back; [`unscale`] turns a row into the Gram
/// matrix.
pub(crate) fn gram<const D: usize>(
    xs: &[Tensor<D>],
    base: Option<&Tensor<D>>,
    rows: usize,
) -> Tensor<2> {
    use burn::backend::Dispatch;
    let k = xs.len();
    let has_base = base.is_some();
    let (x, base) = slots(xs.to_vec(), base.cloned());
    let [x0, x1, x2, x3, x4, x5, x6, x7] = x.map(Tensor::into_dispatch);
    let out = <Dispatch as FamilyDeviceKernels>::family_gram(
        x0,
        x1,
        x2,
        x3,
        x4,
        x5,
        x6,
        x7,
        base.into_dispatch(),
        k,
        has_base,
        rows,
    );
    Tensor::from_dispatch(out)
}

/// The packed upper triangle of the Gram matrix, in f64, from one row of the Gram pass of `k`
/// inputs.
pub(crate) fn unscale(k: usize, row: &[f32]) -> Vec<f64> {
    let (m, sums) = row.split_at(k);
    let mut packed = Vec::with_capacity(sums.len());
    for a in 0..k {
        for b in a..k {
            let s = f64::from(sums[packed_index(k, a, b)]);
            packed.push(f64::from(m[a]) * f64::from(m[b]) * s);
        }
    }
    packed
}

/// Queues `Σ cᵢ·xᵢ` (or `base + Σ cᵢ·(xᵢ − base)`) of 2 to 8 f32 tensors, with the
/// coefficients of each row at `offset` of an 8-wide row of `coefficients` (f32, on the
/// inputs' device); written over the first input where nothing else holds it.
pub(crate) fn combine<const D: usize>(
    xs: Vec<Tensor<D>>,
    base: Option<Tensor<D>>,
    coefficients: Tensor<2>,
    offset: usize,
) -> Tensor<D> {
    use burn::backend::Dispatch;
    let k = xs.len();
    let has_base = base.is_some();
    let (x, base) = slots(xs, base);
    let [x0, x1, x2, x3, x4, x5, x6, x7] = x.map(Tensor::into_dispatch);
    let out = <Dispatch as FamilyDeviceKernels>::family_combine(
        x0,
        x1,
        x2,
        x3,
        x4,
        x5,
        x6,
        x7,
        base.into_dispatch(),
        coefficients.into_dispatch(),
        k,
        has_base,
        offset,
    );
    Tensor::from_dispatch(out)
}

/// Queues the statistics and coefficients of `rows` equal rows of two f32 tensors (of their
/// differences from `base`): a `[rows, 8]` tensor on the device, nothing read back.
pub(crate) fn prepare<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    base: Option<&Tensor<D>>,
    rows: usize,
    params: DeviceParams,
) -> Tensor<2> {
    use burn::backend::Dispatch;
    let threshold = params.dot_threshold.map_or(2.0, |d| d as f32);
    let gram = gram(&[a, b], base, rows);
    let out = <Dispatch as FamilyDeviceKernels>::slerp_coefficients(
        gram.into_dispatch(),
        rows,
        params.t as f32,
        (1.0 - params.t) as f32,
        params.eps as f32,
        threshold,
        params.lerp_only,
    );
    Tensor::from_dispatch(out)
}

/// Queues `c0·a + c1·b` (or `base + c0·(a − base) + c1·(b − base)`) with the coefficients of
/// `prepared`.
pub(crate) fn apply<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    base: Option<Tensor<D>>,
    prepared: Tensor<2>,
) -> Tensor<D> {
    combine(vec![a, b], base, prepared, COEFFICIENTS_AT)
}

/// The sums of the upper triangle of a `k × k` Gram matrix.
const fn packed(k: usize) -> usize {
    k * (k + 1) / 2
}

/// The place of `(a, b)`, `a ≤ b`, in the row-major upper triangle of a `k × k` matrix.
const fn packed_index(k: usize, a: usize, b: usize) -> usize {
    a * (2 * k - a + 1) / 2 + (b - a)
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

/// Loads element `at` of the first `k` inputs into `v`, less the base's element if there is
/// one (the f32 difference of two close values is exact). `x0` is declared writable because
/// the combine may write over it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load<F: Float>(
    x0: &mut [F],
    x1: &[F],
    x2: &[F],
    x3: &[F],
    x4: &[F],
    x5: &[F],
    x6: &[F],
    x7: &[F],
    base: &[F],
    v: &mut Array<F>,
    at: usize,
    #[comptime] k: usize,
    #[comptime] has_base: bool,
) {
    v[0] = x0[at];
    if comptime!(k > 1) {
        v[1] = x1[at];
    }
    if comptime!(k > 2) {
        v[2] = x2[at];
    }
    if comptime!(k > 3) {
        v[3] = x3[at];
    }
    if comptime!(k > 4) {
        v[4] = x4[at];
    }
    if comptime!(k > 5) {
        v[5] = x5[at];
    }
    if comptime!(k > 6) {
        v[6] = x6[at];
    }
    if comptime!(k > 7) {
        v[7] = x7[at];
    }
    if comptime!(has_base) {
        let b = base[at];
        #[unroll]
        for i in 0..k {
            v[i] -= b;
        }
    }
}

/// Multiplies each packed sum `s[(a, b)]` by `r[a]·r[b]` (one product, so that the order of
/// the inputs does not change the rounding).
#[cube]
fn rescale<F: Float>(s: &mut Array<F>, r: &Array<F>, #[comptime] k: usize) {
    #[unroll]
    for a in 0..k {
        #[unroll]
        for b in a..k {
            let p = comptime!(packed_index(k, a, b));
            s[p] *= r[a] * r[b];
        }
    }
}

/// Stage 1 of the Gram pass: one unit per `(row, slot)`, reading elements `slot, slot + units,
/// …` of its row of each of the `k` inputs (less the base). It keeps, per input, the largest
/// magnitude `mᵢ` seen so far, and the sums `Σ(xₐ/mₐ)(x_b/m_b)` of the upper triangle, rescaled
/// when a magnitude grows: no product can overflow or underflow, whatever the values, and a
/// NaN or an infinity poisons the sums. It writes the `k` magnitudes, then the packed sums.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gram_partials_kernel<F: Float>(
    x0: &mut [F],
    x1: &[F],
    x2: &[F],
    x3: &[F],
    x4: &[F],
    x5: &[F],
    x6: &[F],
    x7: &[F],
    base: &[F],
    out: &mut [F],
    cols: usize,
    units: usize,
    total: usize,
    #[comptime] k: usize,
    #[comptime] has_base: bool,
) {
    let id = ABSOLUTE_POS;
    if id >= total {
        terminate!();
    }
    let row = id / units;
    let start = row * cols;
    let mut m = Array::<F>::new(MAX_K);
    let mut inv = Array::<F>::new(MAX_K);
    let mut r = Array::<F>::new(MAX_K);
    let mut v = Array::<F>::new(MAX_K);
    let mut s = Array::<F>::new(MAX_PACKED);
    #[unroll]
    for a in 0..k {
        m[a] = F::new(0.0);
        inv[a] = F::new(0.0);
    }
    #[unroll]
    for p in 0..comptime!(packed(k)) {
        s[p] = F::new(0.0);
    }
    let mut i = id % units;
    while i < cols {
        load::<F>(
            x0,
            x1,
            x2,
            x3,
            x4,
            x5,
            x6,
            x7,
            base,
            &mut v,
            start + i,
            k,
            has_base,
        );
        let mut grew = false;
        #[unroll]
        for a in 0..k {
            let magnitude = v[a].abs();
            r[a] = F::new(1.0);
            if magnitude > m[a] {
                r[a] = m[a] / magnitude;
                m[a] = magnitude;
                inv[a] = F::new(1.0) / magnitude;
                grew = true;
            }
        }
        if grew {
            rescale::<F>(&mut s, &r, k);
        }
        #[unroll]
        for a in 0..k {
            v[a] *= inv[a];
        }
        #[unroll]
        for a in 0..k {
            #[unroll]
            for b in a..k {
                let p = comptime!(packed_index(k, a, b));
                s[p] += v[a] * v[b];
            }
        }
        i += units;
    }
    let o = id * comptime!(k + packed(k));
    #[unroll]
    for a in 0..k {
        out[o + a] = m[a];
    }
    #[unroll]
    for p in 0..comptime!(packed(k)) {
        out[o + k + p] = s[p];
    }
}

/// Stage 2 of the Gram pass: one unit per `(row, group)`, combining up to `fold` of the row's
/// `parts` tuples the same way.
#[cube(launch_unchecked)]
fn gram_fold_kernel<F: Float>(
    input: &[F],
    out: &mut [F],
    parts: usize,
    groups: usize,
    fold: usize,
    total: usize,
    #[comptime] k: usize,
) {
    let id = ABSOLUTE_POS;
    if id >= total {
        terminate!();
    }
    let width = comptime!(k + packed(k));
    let row = id / groups;
    let start = (id % groups) * fold;
    let mut end = start + fold;
    if end > parts {
        end = parts;
    }
    let mut m = Array::<F>::new(MAX_K);
    let mut part = Array::<F>::new(MAX_K);
    let mut r = Array::<F>::new(MAX_K);
    let mut f = Array::<F>::new(MAX_K);
    let mut s = Array::<F>::new(MAX_PACKED);
    #[unroll]
    for a in 0..k {
        m[a] = F::new(0.0);
    }
    #[unroll]
    for p in 0..comptime!(packed(k)) {
        s[p] = F::new(0.0);
    }
    for j in start..end {
        let q = (row * parts + j) * width;
        let mut grew = false;
        #[unroll]
        for a in 0..k {
            part[a] = input[q + a];
            r[a] = F::new(1.0);
            if part[a] > m[a] {
                r[a] = m[a] / part[a];
                m[a] = part[a];
                grew = true;
            }
        }
        if grew {
            rescale::<F>(&mut s, &r, k);
        }
        // Each tuple's own scale relative to the running one (0 while everything is zero).
        #[unroll]
        for a in 0..k {
            f[a] = F::new(0.0);
            if m[a] > F::new(0.0) {
                f[a] = part[a] / m[a];
            }
        }
        #[unroll]
        for a in 0..k {
            #[unroll]
            for b in a..k {
                let p = comptime!(packed_index(k, a, b));
                s[p] += (f[a] * f[b]) * input[q + k + p];
            }
        }
    }
    let o = id * width;
    #[unroll]
    for a in 0..k {
        out[o + a] = m[a];
    }
    #[unroll]
    for p in 0..comptime!(packed(k)) {
        out[o + k + p] = s[p];
    }
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
    // The Gram pass's tuple for two inputs: `ma, mb, Σa'², Σa'b', Σb'²`.
    let p = row * 5;
    let ma = input[p];
    let mb = input[p + 1];
    let aa = input[p + 2];
    let ab = input[p + 3];
    let bb = input[p + 4];
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

/// The combine pass: `Σ cᵢ·xᵢ`, or `base + Σ cᵢ·(xᵢ − base)`, summed in input order, one
/// element per unit, with the coefficients of its row at `offset` in an 8-wide row of
/// `coefficients`; written over `x0` when `in_place` (nothing else holds it), into `out`
/// otherwise.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn combine_kernel<F: Float>(
    x0: &mut [F],
    x1: &[F],
    x2: &[F],
    x3: &[F],
    x4: &[F],
    x5: &[F],
    x6: &[F],
    x7: &[F],
    base: &[F],
    coefficients: &[F],
    out: &mut [F],
    cols: usize,
    offset: usize,
    #[comptime] k: usize,
    #[comptime] has_base: bool,
    #[comptime] in_place: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= x0.len() {
        terminate!();
    }
    let o = (i / cols) * WIDTH + offset;
    let mut v = Array::<F>::new(MAX_K);
    load::<F>(x0, x1, x2, x3, x4, x5, x6, x7, base, &mut v, i, k, has_base);
    let mut acc = coefficients[o] * v[0];
    #[unroll]
    for a in 1..k {
        acc += coefficients[o + a] * v[a];
    }
    if comptime!(has_base) {
        acc = base[i] + acc;
    }
    if comptime!(in_place) {
        x0[i] = acc;
    } else {
        out[i] = acc;
    }
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

impl FamilyDeviceKernels for CubeBackend {
    fn family_gram(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        x6: FloatTensor<Self>,
        x7: FloatTensor<Self>,
        base: FloatTensor<Self>,
        k: usize,
        has_base: bool,
        rows: usize,
    ) -> FloatTensor<Self> {
        let [x0, x1, x2, x3, x4, x5, x6, x7, base] =
            [x0, x1, x2, x3, x4, x5, x6, x7, base].map(into_contiguous);
        let n = x0.meta.shape().num_elements();
        let cols = n / rows;
        let width = k + packed(k);
        let mut parts = cols.div_ceil(PER_UNIT).max(1);
        let units = rows * parts;
        let mut partial = empty(&x0, Shape::new([units, width]));
        let (count, dim) = units_grid(&x0, units);
        let client = x0.client.clone();
        // SAFETY: every index the kernel reads is below `rows · cols = n`, the length of the
        // first `k` inputs and of the base it reads, and it writes `units · width` values into
        // a buffer of that length.
        unsafe {
            gram_partials_kernel::launch_unchecked::<f32>(
                &client,
                count,
                dim,
                x0.into_buffer_arg(),
                x1.into_buffer_arg(),
                x2.into_buffer_arg(),
                x3.into_buffer_arg(),
                x4.into_buffer_arg(),
                x5.into_buffer_arg(),
                x6.into_buffer_arg(),
                x7.into_buffer_arg(),
                base.into_buffer_arg(),
                partial.clone().into_buffer_arg(),
                cols,
                parts,
                units,
                k,
                has_base,
            );
        }
        while parts > 1 {
            let groups = parts.div_ceil(FOLD);
            let units = rows * groups;
            let folded = empty(&partial, Shape::new([units, width]));
            let (count, dim) = units_grid(&partial, units);
            // SAFETY: unit `(row, g)` reads tuples `g·FOLD .. min((g+1)·FOLD, parts)` of its row
            // (`rows · parts` tuples exist) and writes its own tuple.
            unsafe {
                gram_fold_kernel::launch_unchecked::<f32>(
                    &client,
                    count,
                    dim,
                    partial.into_buffer_arg(),
                    folded.clone().into_buffer_arg(),
                    parts,
                    groups,
                    FOLD,
                    units,
                    k,
                );
            }
            partial = folded;
            parts = groups;
        }
        partial
    }

    fn slerp_coefficients(
        gram: FloatTensor<Self>,
        rows: usize,
        t: f32,
        s: f32,
        eps: f32,
        threshold: f32,
        lerp_only: bool,
    ) -> FloatTensor<Self> {
        let gram = into_contiguous(gram);
        let out = empty(&gram, Shape::new([rows, WIDTH]));
        let (count, dim) = units_grid(&gram, rows);
        // SAFETY: row `r` reads tuple `r` of `rows` and writes values `8r .. 8r + 8`.
        unsafe {
            coefficients_kernel::launch_unchecked::<f32>(
                &gram.client,
                count,
                dim,
                gram.clone().into_buffer_arg(),
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

    fn family_combine(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        x6: FloatTensor<Self>,
        x7: FloatTensor<Self>,
        base: FloatTensor<Self>,
        coefficients: FloatTensor<Self>,
        k: usize,
        has_base: bool,
        offset: usize,
    ) -> FloatTensor<Self> {
        let [x0, x1, x2, x3, x4, x5, x6, x7, base, coefficients] =
            [x0, x1, x2, x3, x4, x5, x6, x7, base, coefficients].map(into_contiguous);
        let shape = x0.meta.shape().clone();
        let n = shape.num_elements();
        let rows = coefficients.meta.shape()[0];
        let (count, dim) = units_grid(&x0, n);
        let client = x0.client.clone();
        // A buffer nothing else holds (under fusion: one the stream hands over read-write, as
        // its last use) is written over; the kernel then writes nothing into `out`.
        let in_place = x0.can_mut();
        let out = if in_place {
            empty(&x0, Shape::new([1]))
        } else {
            empty(&x0, shape)
        };
        // SAFETY: element `i < n` of each input read, of `out` when it is written, and the
        // values `8·(i / cols) + offset + j < 8·rows` of `coefficients`.
        unsafe {
            combine_kernel::launch_unchecked::<f32>(
                &client,
                count,
                dim,
                x0.clone().into_buffer_arg(),
                x1.into_buffer_arg(),
                x2.into_buffer_arg(),
                x3.into_buffer_arg(),
                x4.into_buffer_arg(),
                x5.into_buffer_arg(),
                x6.into_buffer_arg(),
                x7.into_buffer_arg(),
                base.into_buffer_arg(),
                coefficients.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                n / rows,
                offset,
                k,
                has_base,
                in_place,
            );
        }
        if in_place { x0 } else { out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_indices_run_through_the_upper_triangle_row_by_row() {
        for k in 1..=MAX_K {
            let mut next = 0;
            for a in 0..k {
                for b in a..k {
                    assert_eq!(packed_index(k, a, b), next, "k = {k}, ({a}, {b})");
                    next += 1;
                }
            }
            assert_eq!(next, packed(k));
        }
        assert_eq!(packed(MAX_K), MAX_PACKED);
    }

    #[test]
    fn unscale_multiplies_each_sum_by_both_scales() {
        // Two inputs with largest magnitudes 2 and 0.5: G = [[4·s00, 1·s01], [·, 0.25·s11]].
        let row = [2.0f32, 0.5, 3.0, -1.5, 8.0];
        assert_eq!(unscale(2, &row), [12.0, -1.5, 2.0]);
    }
}
