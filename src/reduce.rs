//! The reductions of the generic tensor-op path: `‖a‖²`, `‖b‖²` and `a·b` per row or for the
//! whole tensor, for devices and dtypes the fused kernels do not take.
//!
//! On the CPU backends f64 is native and its sums are exact to far below the accuracy bar;
//! everywhere else the values are scaled by their largest magnitude in blocks of [`BLOCK`], so
//! that no square can overflow or underflow in f32, and the blocks are combined in f64 on the
//! host.

use burn::tensor::{Device, FloatDType, Tensor};

use crate::kernels;
use crate::numerics::PairStats;

/// Block length of the scaled f32 reduction used off the CPU backends (see [`native_f64`]).
const BLOCK: usize = 1024;

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
pub(crate) fn row_stats(a: Tensor<2>, b: Tensor<2>) -> Vec<PairStats> {
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
    kernels::is_cpu(device)
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
