//! The engine of the SLERP family on tensors: for k inputs of one shape (and an optional base,
//! for methods on task vectors), one pass for the Gram matrix of each vector (the whole tensor
//! or each row), coefficients on the host ([`crate::family`]), one pass that writes the
//! combination. The fused CPU kernels do both passes on flex and ndarray, the CubeCL kernels
//! on wgpu (2 to 8 f32 inputs; a caller that walks a whole model queues every Gram pass with
//! [`Inputs::queue_gram`] and reads them back at once); every other device, dtype and number
//! of inputs takes Burn's tensor ops, with the reductions of [`crate::reduce`].
//!
//! The file merge reaches the same kernels through [`gram_slices`] and [`combine_block`], on
//! the values it reads from its memory maps.

use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use crate::family::Gram;
use crate::kernels;
use crate::reduce;

use crate::kernels::cpu::First;
pub(crate) use crate::kernels::cpu::Lane;

/// Below this mean square per element, the f32 products of the CPU kernels may have lost
/// digits to underflow (|x| < 1.1e-19 squares below f32's normal range): such a tensor's Gram
/// matrix is recomputed on the tensor-op path (in f64 on the CPU backends).
const UNDERFLOW_MEAN_SQUARE: f64 = 1e-35;

/// How the inputs are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The fused CPU kernels.
    Cpu,
    /// The CubeCL kernels: 2 to 8 f32 inputs on a wgpu device.
    #[cfg(feature = "wgpu")]
    Cube,
    /// Burn's tensor ops.
    Generic,
}

/// k float tensors of one shape and device, without autodiff, as they are computed, with an
/// optional base.
pub(crate) struct Inputs<const D: usize> {
    xs: Vec<Tensor<D>>,
    base: Option<Tensor<D>>,
    route: Route,
    /// The first input's dtype: the result's.
    out_dtype: DType,
}

impl<const D: usize> Inputs<D> {
    /// Widens the inputs to one compute dtype where the kernels cannot read them as they are
    /// (mixed dtypes; f16 and bf16 off flex), and takes the one routing decision.
    pub(crate) fn new(xs: Vec<Tensor<D>>, base: Option<Tensor<D>>) -> Self {
        let out_dtype = xs[0].dtype();
        let dtypes: Vec<DType> = xs.iter().chain(&base).map(Tensor::dtype).collect();
        let same = dtypes.iter().all(|d| *d == out_dtype);
        let device = xs[0].device();
        if same && kernels::is_cpu(&device) {
            let half = matches!(out_dtype, DType::F16 | DType::BF16)
                && kernels::takes_half(&xs[0], &xs[0]);
            if out_dtype == DType::F32 || half {
                return Self {
                    xs,
                    base,
                    route: Route::Cpu,
                    out_dtype,
                };
            }
        }
        // f64 if any input is f64, f32 otherwise.
        let compute = if dtypes.contains(&DType::F64) {
            FloatDType::F64
        } else {
            FloatDType::F32
        };
        // Every dtype here was checked before merging (float, not quantized). Inputs of the
        // compute dtype are kept as they are (a cast may copy, and the combine could then no
        // longer write over the first input).
        let target = DType::from(compute);
        let cast = |x: Tensor<D>| {
            if x.dtype() == target {
                x
            } else {
                x.cast(compute)
            }
        };
        let xs: Vec<Tensor<D>> = xs.into_iter().map(cast).collect();
        let base = base.map(cast);
        let route = if compute != FloatDType::F32 {
            Route::Generic
        } else if kernels::is_cpu(&device) {
            Route::Cpu
        } else {
            device_route(&device, xs.len())
        };
        Self {
            xs,
            base,
            route,
            out_dtype,
        }
    }

    /// The number of inputs.
    pub(crate) fn k(&self) -> usize {
        self.xs.len()
    }

    /// The number of elements of each input.
    pub(crate) fn numel(&self) -> usize {
        self.xs[0].shape().num_elements()
    }

    /// The first input as the result: an empty tensor, or an input returned as it is.
    pub(crate) fn into_first(self) -> Tensor<D> {
        let dtype = self.out_dtype;
        let first = self.xs.into_iter().next().expect("at least one input");
        in_dtype(first, dtype)
    }

    /// The Gram matrix of each of `rows` equal rows (1: the whole tensor), of the inputs or of
    /// their differences from the base.
    pub(crate) fn gram(&self, rows: usize) -> Vec<Gram> {
        if let Some(queued) = self.queue_gram(rows) {
            let values: Vec<f32> = queued.into_data().iter::<f32>().collect();
            return device_grams(self.k(), &values);
        }
        if self.route == Route::Cpu
            && let Some(grams) = cpu_grams_of(&self.xs, self.base.as_ref(), rows)
        {
            return grams;
        }
        self.generic_gram(rows)
    }

    /// On a CubeCL device, the Gram pass queued and nothing read back: `[rows, w]` f32 that
    /// [`device_grams`] decodes once read. `None` on every other route.
    pub(crate) fn queue_gram(&self, rows: usize) -> Option<Tensor<2>> {
        #[cfg(feature = "wgpu")]
        if self.route == Route::Cube {
            return Some(kernels::cubecl::gram(&self.xs, self.base.as_ref(), rows));
        }
        let _ = rows;
        None
    }

    /// The Gram matrices with Burn's tensor ops and [`reduce`]'s reductions: one reduction per
    /// pair of inputs.
    fn generic_gram(&self, rows: usize) -> Vec<Gram> {
        let k = self.k();
        let n = self.numel();
        let vectors: Vec<Tensor<2>> = self
            .xs
            .iter()
            .map(|x| {
                let x = match &self.base {
                    Some(base) => x.clone().sub(base.clone()),
                    None => x.clone(),
                };
                x.reshape([rows, n / rows.max(1)])
            })
            .collect();
        let stats = |i: usize, j: usize| {
            if rows == 1 {
                vec![reduce::tensor_stats(
                    vectors[i].clone().reshape([n]),
                    vectors[j].clone().reshape([n]),
                )]
            } else {
                reduce::row_stats(vectors[i].clone(), vectors[j].clone())
            }
        };
        let mut g = vec![vec![0.0; k * k]; rows];
        if k == 1 {
            for (row, s) in stats(0, 0).into_iter().enumerate() {
                g[row][0] = s.aa;
            }
        }
        for i in 0..k {
            for j in i + 1..k {
                for (row, s) in stats(i, j).into_iter().enumerate() {
                    g[row][i * k + i] = s.aa;
                    g[row][j * k + j] = s.bb;
                    g[row][i * k + j] = s.ab;
                }
            }
        }
        g.into_iter()
            .map(|full| {
                let upper: Vec<f64> = (0..k)
                    .flat_map(|i| (i..k).map(move |j| (i, j)))
                    .map(|(i, j)| full[i * k + j])
                    .collect();
                Gram::from_upper(k, &upper)
            })
            .collect()
    }

    /// `Σ cᵢ·xᵢ` (or `base + Σ cᵢ·(xᵢ − base)`) in the first input's dtype, with one list of
    /// k coefficients per row: written over the first input where the kernels can (nothing
    /// else holds it), allocated otherwise.
    pub(crate) fn combine(self, coefficients: &[Vec<f64>]) -> Tensor<D> {
        let Inputs {
            xs,
            base,
            route,
            out_dtype,
        } = self;
        let k = xs.len();
        if xs[0].shape().num_elements() == 0 {
            return in_dtype(xs.into_iter().next().expect("an input"), out_dtype);
        }
        let out = match route {
            Route::Cpu => {
                let flat: Vec<f32> = coefficients
                    .iter()
                    .flat_map(|c| c.iter().map(|v| *v as f32))
                    .collect();
                let mut xs = xs.into_iter();
                let first = xs.next().expect("an input");
                let rest: Vec<Tensor<D>> = xs.collect();
                kernels::cpu::combine(first, &rest, base.as_ref(), &flat)
            }
            #[cfg(feature = "wgpu")]
            Route::Cube => {
                let device = xs[0].device();
                let rows = coefficients.len();
                let mut padded = vec![0f32; rows * kernels::cubecl::WIDTH];
                for (row, c) in padded
                    .chunks_exact_mut(kernels::cubecl::WIDTH)
                    .zip(coefficients)
                {
                    for (slot, v) in row.iter_mut().zip(c) {
                        *slot = *v as f32;
                    }
                }
                let table = Tensor::<2>::from_data(
                    TensorData::new(padded, [rows, kernels::cubecl::WIDTH]),
                    (&device, DType::F32),
                );
                kernels::cubecl::combine(xs, base, table, 0)
            }
            Route::Generic => generic_combine(xs, base, coefficients, k),
        };
        in_dtype(out, out_dtype)
    }
}

/// `x` in `dtype`: as it is when it already has it (a cast of a tensor to its own dtype is not
/// free everywhere: under fusion it is one more op in the stream).
pub(crate) fn in_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// The route of f32 inputs on a device other than the CPU backends': the CubeCL kernels for 2
/// to 8 inputs on a wgpu device, Burn's tensor ops otherwise.
fn device_route(device: &burn::tensor::Device, k: usize) -> Route {
    #[cfg(feature = "wgpu")]
    if kernels::is_cube(device) && (2..=kernels::cubecl::MAX_K).contains(&k) {
        return Route::Cube;
    }
    let _ = (device, k);
    Route::Generic
}

/// The Gram matrices of k inputs from the values of a queued Gram pass
/// ([`Inputs::queue_gram`]), read back: one matrix per row. Its scaled sums need no trust check:
/// they neither overflow nor underflow, and a NaN or an infinity shows as a non-finite matrix.
#[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
pub(crate) fn device_grams(k: usize, values: &[f32]) -> Vec<Gram> {
    #[cfg(feature = "wgpu")]
    {
        values
            .chunks_exact(k + kernels::cpu::packed(k))
            .map(|row| Gram::from_upper(k, &kernels::cubecl::unscale(k, row)))
            .collect()
    }
    #[cfg(not(feature = "wgpu"))]
    unreachable!("nothing is queued without a CubeCL device")
}

/// The combination with Burn's tensor ops: scalars for one vector, `[rows, 1]` columns in the
/// compute dtype for many.
fn generic_combine<const D: usize>(
    xs: Vec<Tensor<D>>,
    base: Option<Tensor<D>>,
    coefficients: &[Vec<f64>],
    k: usize,
) -> Tensor<D> {
    let dims = xs[0].dims();
    let n: usize = dims.iter().product();
    let rows = coefficients.len();
    let device = xs[0].device();
    let dtype = xs[0].dtype();
    let vector = |x: Tensor<D>| match &base {
        Some(base) => x.sub(base.clone()),
        None => x,
    };
    let sum = if rows == 1 {
        xs.into_iter()
            .zip(&coefficients[0])
            .map(|(x, c)| vector(x).mul_scalar(*c))
            .reduce(|acc, x| acc.add(x))
            .expect("an input")
    } else {
        let column = |i: usize| -> Tensor<2> {
            let values: Vec<f64> = coefficients.iter().map(|c| c[i]).collect();
            Tensor::<2>::from_data(TensorData::new(values, [rows, 1]), (&device, dtype))
        };
        xs.into_iter()
            .enumerate()
            .map(|(i, x)| vector(x).reshape([rows, n / rows]).mul(column(i)))
            .reduce(|acc, x| acc.add(x))
            .expect("an input")
            .reshape(dims)
    };
    debug_assert_eq!(coefficients[0].len(), k);
    match base {
        Some(base) => base.add(sum),
        None => sum,
    }
}

/// The Gram matrices of `rows` equal rows of tensors on flex or ndarray (f32, or one half
/// dtype on flex) through the fused kernels; `None` when they cannot be trusted.
pub(crate) fn cpu_grams<const D: usize>(xs: &[Tensor<D>], rows: usize) -> Option<Vec<Gram>> {
    cpu_grams_of(xs, None, rows)
}

fn cpu_grams_of<const D: usize>(
    xs: &[Tensor<D>],
    base: Option<&Tensor<D>>,
    rows: usize,
) -> Option<Vec<Gram>> {
    let grams = unpack(xs.len(), &kernels::cpu::gram(xs, base, rows));
    let cols = xs[0].shape().num_elements() / rows.max(1);
    trusted(&grams, cols).then_some(grams)
}

/// `rows` Gram matrices from the kernels' packed upper triangles.
fn unpack(k: usize, packed: &[f64]) -> Vec<Gram> {
    packed
        .chunks_exact(kernels::cpu::packed(k))
        .map(|upper| Gram::from_upper(k, upper))
        .collect()
}

/// Whether the CPU kernels' Gram matrices of rows of `cols` elements can be trusted: their f32
/// lanes overflow for |x| > 1.8e19 and lose digits below 1e-19 (a zero input included), and
/// the tensor-op path decides those.
fn trusted(grams: &[Gram], cols: usize) -> bool {
    let floor = UNDERFLOW_MEAN_SQUARE * cols as f64;
    grams
        .iter()
        .all(|g| g.is_finite() && (0..g.k()).all(|i| g.at(i, i) >= floor))
}

/// The Gram matrices of `rows` equal rows of k slices (of their differences from `base`), for
/// the file merge; `None` when the f32 lanes cannot be trusted (values beyond ±1.8e19 or
/// below 1e-19), which the caller then decides on the tensor path.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn gram_slices<E: Lane>(
    xs: &[&[E]],
    base: Option<&[E]>,
    rows: usize,
) -> Option<Vec<Gram>> {
    let k = xs.len();
    let grams = unpack(k, &kernels::cpu::gram_slices(xs, base, rows));
    trusted(&grams, xs[0].len() / rows.max(1)).then_some(grams)
}

/// Elements `start .. start + out.len()` of the combination of k slices into `out` (a block
/// the file merge reuses), with one list of k coefficients per row of `cols` elements: the
/// same bits as the in-memory combine. Returns whether every value is finite.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn combine_block<E: Lane>(
    out: &mut [E],
    xs: &[&[E]],
    base: Option<&[E]>,
    start: usize,
    cols: usize,
    coefficients: &[f32],
) -> bool {
    // SAFETY: `MaybeUninit<E>` has `E`'s layout, and only `E` values are written.
    let out = unsafe { &mut *(out as *mut [E] as *mut [std::mem::MaybeUninit<E>]) };
    kernels::cpu::combine_into(
        out,
        First::Slice(xs[0]),
        xs,
        base,
        start,
        cols,
        coefficients,
    )
}
