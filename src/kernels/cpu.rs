//! Fused SLERP kernels for the CPU backends (flex, ndarray).
//!
//! Two passes over memory, the least the two-pass scheme allows: one read of `a` and `b` gives
//! `Σa²`, `Σb²` and `Σa·b` (per row or for the whole tensor, accumulated in f64 per chunk), one
//! more read writes `c0·a + c1·b` into the output, the only full-size allocation. Both passes
//! run in parallel over contiguous chunks with rayon. The coefficients are computed between the
//! two passes by the caller, on the host, in f64.
//!
//! Only f32 tensors on flex or ndarray come here ([`super::route`]); a non-contiguous one is
//! copied to contiguous memory first.

// burn-ndarray is deprecated upstream; this crate still supports it behind its `ndarray` feature.
#![allow(deprecated)]
// Built with neither CPU backend (wgpu alone), nothing routes to the kernels.
#![cfg_attr(
    not(any(feature = "flex", feature = "ndarray")),
    allow(dead_code, unused_imports, unused_variables)
)]

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use wide::f32x8;

use std::mem::MaybeUninit;

/// Elements per parallel task: large enough to stream, small enough to balance two cores.
const CHUNK: usize = 1 << 16;
/// Elements summed in f32 lanes before each flush to f64.
const FLUSH: usize = 8 * 64;

#[backend_extension(Flex: cfg(feature = "flex"), NdArray: cfg(feature = "ndarray"))]
pub(crate) trait SlerpKernels: Backend {
    /// `[rows, 3]` f64 tensor of `(Σa², Σb², Σa·b)` for each of `rows` equal slices.
    fn slerp_stats(a: FloatTensor<Self>, b: FloatTensor<Self>, rows: usize) -> FloatTensor<Self>;

    /// `c0·a + c1·b` row by row; `coefficients` is a `[rows, 2]` f32 tensor of `(c0, c1)`.
    fn slerp_combine(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        coefficients: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Per-row statistics through the fused kernel: `rows` triples `(Σa², Σb², Σa·b)`.
pub(crate) fn stats<const D: usize>(a: Tensor<D>, b: Tensor<D>, rows: usize) -> Vec<f64> {
    use burn::backend::Dispatch;
    let out = <Dispatch as SlerpKernels>::slerp_stats(a.into_dispatch(), b.into_dispatch(), rows);
    // A host read of 3 f64 per row; on these CPU backends it is a copy of that small buffer.
    Tensor::<2>::from_dispatch(out)
        .into_data()
        .iter::<f64>()
        .collect()
}

/// `c0·a + c1·b` through the fused kernel, one `(c0, c1)` per row.
pub(crate) fn combine<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    coefficients: Vec<f32>,
) -> Tensor<D> {
    use burn::backend::Dispatch;
    let rows = coefficients.len() / 2;
    let device = a.device();
    // f32 whatever the device's default float dtype is.
    let coefficients = Tensor::<2>::from_data(
        TensorData::new(coefficients, [rows, 2]),
        (&device, DType::F32),
    );
    let out = <Dispatch as SlerpKernels>::slerp_combine(
        a.into_dispatch(),
        b.into_dispatch(),
        coefficients.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// `(Σa², Σb², Σa·b)` of one contiguous run.
///
/// Eight f32 lanes accumulate blocks of [`FLUSH`] elements (64 per lane), and each block is
/// added to f64 totals: the lanes keep the loop at memory speed, the short blocks keep the
/// f32 rounding far below the accuracy bar, and the f64 totals keep long tensors exact and
/// finite. A square above f32's range (|x| > 1.8e19) overflows a lane to infinity; the caller
/// then recomputes the tensor on the f64 path before calling it non-finite.
fn sums(a: &[f32], b: &[f32]) -> [f64; 3] {
    let mut total = [0.0f64; 3];
    for (xa, xb) in a.chunks(FLUSH).zip(b.chunks(FLUSH)) {
        let (mut aa, mut bb, mut ab) = (f32x8::ZERO, f32x8::ZERO, f32x8::ZERO);
        let (ca, ta) = xa.as_chunks::<8>();
        let (cb, tb) = xb.as_chunks::<8>();
        for (x, y) in ca.iter().zip(cb) {
            let (x, y) = (f32x8::from(*x), f32x8::from(*y));
            aa = x.mul_add(x, aa);
            bb = y.mul_add(y, bb);
            ab = x.mul_add(y, ab);
        }
        let mut lanes = [aa.to_array(), bb.to_array(), ab.to_array()];
        for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
            lanes[0][l] += x * x;
            lanes[1][l] += y * y;
            lanes[2][l] += x * y;
        }
        for (t, lane) in total.iter_mut().zip(lanes) {
            *t += lane.iter().map(|v| *v as f64).sum::<f64>();
        }
    }
    total
}

/// Row statistics of two contiguous buffers of `rows` equal rows, flattened `[rows × 3]`.
///
/// The chunk partials of a row are summed in a fixed order, so results do not depend on how the
/// work was scheduled.
pub(crate) fn stats_slices(a: &[f32], b: &[f32], rows: usize) -> Vec<f64> {
    let cols = a.len() / rows.max(1);
    if cols == 0 {
        return vec![0.0; rows * 3];
    }
    if cols >= CHUNK {
        // Long rows: chunks of every row in parallel, partials combined per row in order.
        let per_row = cols.div_ceil(CHUNK);
        let partials: Vec<[f64; 3]> = (0..rows * per_row)
            .into_par_iter()
            .map(|task| {
                let (row, part) = (task / per_row, task % per_row);
                let start = row * cols + part * CHUNK;
                let end = (row * cols + cols).min(start + CHUNK);
                sums(&a[start..end], &b[start..end])
            })
            .collect();
        partials
            .chunks(per_row)
            .flat_map(|row| {
                row.iter().fold([0.0; 3], |acc, s| {
                    [acc[0] + s[0], acc[1] + s[1], acc[2] + s[2]]
                })
            })
            .collect()
    } else {
        // Short rows: many rows per task.
        let per_task = (CHUNK / cols).max(1);
        let rows_out: Vec<[f64; 3]> = a
            .par_chunks(cols)
            .zip(b.par_chunks(cols))
            .with_min_len(per_task)
            .map(|(x, y)| sums(x, y))
            .collect();
        rows_out.into_iter().flatten().collect()
    }
}

/// `c0·a + c1·b` of two contiguous buffers, with `(c0, c1)` per row (`coefficients.len() / 2`
/// equal rows).
pub(crate) fn combine_slices(a: &[f32], b: &[f32], coefficients: &[f32]) -> Vec<f32> {
    let n = a.len();
    let rows = coefficients.len() / 2;
    let cols = n / rows.max(1);
    assert!(
        b.len() == n && rows * cols == n,
        "combine: inconsistent lengths"
    );
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if cols == 0 {
        return out;
    }
    // Written once, without zero-filling first: a fill would be one more pass over memory.
    let write = |o: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], c0: f32, c1: f32| {
        for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
            o.write(c0 * x + c1 * y);
        }
    };
    advise_huge_pages(&mut out);
    let spare = &mut out.spare_capacity_mut()[..n];
    if rows == 1 {
        let (c0, c1) = (coefficients[0], coefficients[1]);
        spare
            .par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((o, x), y)| write(o, x, y, c0, c1));
    } else {
        spare
            .par_chunks_mut(cols)
            .zip(a.par_chunks(cols))
            .zip(b.par_chunks(cols))
            .zip(coefficients.par_chunks(2))
            .with_min_len((CHUNK / cols).max(1))
            .for_each(|(((o, x), y), c)| write(o, x, y, c[0], c[1]));
    }
    // SAFETY: the chunks above cover `spare[..n]` exactly (`rows · cols == n`, and `a`, `b` have
    // `n` elements), and every element of every chunk was written.
    unsafe { out.set_len(n) };
    out
}

/// Asks the kernel to back the buffer's spare capacity with transparent huge pages, where the
/// system leaves that to the program (Linux's `madvise` mode).
///
/// A fresh output is faulted in page by page as the combine pass first writes it; with 4 KiB
/// pages that costs as much as the pass itself (a 64 MiB output is 16384 faults), with 2 MiB
/// pages it is 32 faults. Only whole 2 MiB pages inside the allocation are advised, so nothing
/// outside the buffer is touched; the advice changes no contents and is only a hint: refused or
/// unsupported, the pass runs the same, only slower.
fn advise_huge_pages(out: &mut Vec<f32>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let spare = out.spare_capacity_mut();
        let begin = spare.as_mut_ptr() as usize;
        let end = begin + std::mem::size_of_val(spare);
        let (first, last) = (begin.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: `[first, last)` lies inside this vector's allocation, which it owns
            // exclusively here; MADV_HUGEPAGE neither frees nor changes memory, and its result
            // is ignored because the advice is optional.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

/// The kernels of one CPU backend: the backends differ only in their tensor type and in how
/// its f32 values are borrowed (each backend module has its own `contiguous`).
#[cfg(any(feature = "flex", feature = "ndarray"))]
macro_rules! cpu_kernels {
    ($backend:ty, $tensor:ident) => {
        impl SlerpKernels for $backend {
            fn slerp_stats(
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                rows: usize,
            ) -> FloatTensor<Self> {
                let out = stats_slices(&contiguous(&a), &contiguous(&b), rows);
                $tensor::from_data(TensorData::new(out, [rows, 3]))
            }

            fn slerp_combine(
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                coefficients: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                let shape = a.shape();
                let out =
                    combine_slices(&contiguous(&a), &contiguous(&b), &contiguous(&coefficients));
                $tensor::from_data(TensorData::new(out, shape))
            }
        }
    };
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{SlerpKernels, combine_slices, stats_slices};

    /// The tensor's f32 values, contiguous: borrowed when they already are, copied otherwise.
    fn contiguous(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
        match t.as_slice::<f32>() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => {
                std::borrow::Cow::Owned(t.clone().into_data().iter::<f32>().collect::<Vec<f32>>())
            }
        }
    }

    cpu_kernels!(Flex, FlexTensor);
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::NdArray;
    use burn::backend::TensorMetadata;
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{SlerpKernels, combine_slices, stats_slices};

    /// The tensor's f32 values, contiguous: borrowed when they already are, copied otherwise.
    fn contiguous(t: &NdArrayTensor) -> std::borrow::Cow<'_, [f32]> {
        if let NdArrayTensor::F32(storage) = t
            && let Some(s) = storage.view().to_slice()
        {
            return std::borrow::Cow::Borrowed(s);
        }
        std::borrow::Cow::Owned(match t {
            NdArrayTensor::F32(storage) => storage.view().iter().copied().collect(),
            other => panic!(
                "the fused kernels take f32 tensors only, got {:?}",
                other.dtype()
            ),
        })
    }

    cpu_kernels!(NdArray, NdArrayTensor);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(Σa², Σb², Σa·b)` in plain f64: the reference.
    fn exact(a: &[f32], b: &[f32]) -> [f64; 3] {
        let mut s = [0.0; 3];
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (*x as f64, *y as f64);
            s[0] += x * x;
            s[1] += y * y;
            s[2] += x * y;
        }
        s
    }

    /// f32 lanes flushed to f64 every 512 elements: errors of ~1e-7 of the norms' scale.
    fn close(got: &[f64], want: [f64; 3]) -> bool {
        let scale = (want[0] * want[1]).sqrt().max(1.0);
        (0..3).all(|k| (got[k] - want[k]).abs() <= 1e-6 * scale)
    }

    #[test]
    fn sums_match_f64_for_every_tail_length() {
        for n in [0, 1, 7, 8, 9, 100, 513, CHUNK + 3] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!(close(&stats_slices(&a, &b, 1), exact(&a, &b)), "n={n}");
        }
    }

    #[test]
    fn rows_long_and_short_match_their_slices() {
        for (rows, cols) in [(3, CHUNK * 2 + 5), (1000, 3), (5, 1)] {
            let n = rows * cols;
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.007).cos()).collect();
            let got = stats_slices(&a, &b, rows);
            assert_eq!(got.len(), rows * 3);
            for r in 0..rows {
                let s = r * cols..(r + 1) * cols;
                assert!(close(&got[r * 3..r * 3 + 3], exact(&a[s.clone()], &b[s])));
            }
            let coefficients: Vec<f32> = (0..rows).flat_map(|r| [r as f32, 1.0]).collect();
            let out = combine_slices(&a, &b, &coefficients);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(*o, (i / cols) as f32 * a[i] + b[i]);
            }
        }
    }
}
