//! Fused SLERP kernels for the CPU backends (flex, ndarray).
//!
//! Two passes over memory, the least the two-pass scheme allows: one read of `a` and `b` gives
//! `Σa²`, `Σb²` and `Σa·b` (per row or for the whole tensor, accumulated in f64 per chunk), one
//! more read writes `c0·a + c1·b` into the output, the only full-size allocation. Both passes
//! run in parallel over contiguous chunks with rayon. The coefficients are computed between the
//! two passes by the caller, on the host, in f64.
//!
//! The combine writes over `a`'s own storage when nothing else holds it (a merge that consumed
//! its model); otherwise it allocates the output. Either way the values are the same bits.
//!
//! f32 tensors on flex or ndarray come here, and f16 and bf16 tensors on flex
//! ([`super::route`]): those are widened to f32 eight values at a time, in registers, and the
//! result is rounded once on the way back, so that no f32 copy of the tensor is ever made. A
//! non-contiguous input is copied to contiguous memory first.

// burn-ndarray is deprecated upstream; this crate still supports it behind its `ndarray` feature.
#![allow(deprecated)]
// Built with neither CPU backend (wgpu alone), nothing routes to the kernels.
#![cfg_attr(
    not(any(feature = "flex", feature = "ndarray")),
    allow(dead_code, unused_imports, unused_variables)
)]

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData, bf16, f16};
use rayon::prelude::*;
use wide::f32x8;

/// Elements per parallel task: large enough to stream, small enough to balance two cores.
const CHUNK: usize = 1 << 16;
/// Elements summed in f32 lanes before each flush to f64.
const FLUSH: usize = 8 * 64;

#[backend_extension(Flex: cfg(feature = "flex"), NdArray: cfg(feature = "ndarray"))]
pub(crate) trait SlerpKernels: Backend {
    /// `[rows, 3]` f64 tensor of `(Σa², Σb², Σa·b)` for each of `rows` equal slices.
    fn slerp_stats(a: FloatTensor<Self>, b: FloatTensor<Self>, rows: usize) -> FloatTensor<Self>;

    /// `c0·a + c1·b` row by row; `coefficients` is a `[rows, 2]` f32 tensor of `(c0, c1)`.
    /// Written over `a`'s storage when `a` holds it alone, into a new tensor otherwise.
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

/// The element types the kernels read and write: f32 as it is, f16 and bf16 widened to f32
/// (exactly) and rounded back once.
pub(crate) trait Lane: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
}

impl Lane for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        value
    }
}

impl Lane for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Lane for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

/// `(Σa², Σb², Σa·b)` of one contiguous run.
///
/// Eight f32 lanes accumulate blocks of [`FLUSH`] elements (64 per lane), and each block is
/// added to f64 totals: the lanes keep the loop at memory speed, the short blocks keep the
/// f32 rounding far below the accuracy bar, and the f64 totals keep long tensors exact and
/// finite. A square above f32's range (|x| > 1.8e19) overflows a lane to infinity; the caller
/// then recomputes the tensor on the f64 path before calling it non-finite. Half-precision
/// values are widened as they are loaded, so they sum exactly as their f32 copies would.
fn sums<E: Lane>(a: &[E], b: &[E]) -> [f64; 3] {
    let mut total = [0.0f64; 3];
    for (xa, xb) in a.chunks(FLUSH).zip(b.chunks(FLUSH)) {
        let (mut aa, mut bb, mut ab) = (f32x8::ZERO, f32x8::ZERO, f32x8::ZERO);
        let (ca, ta) = xa.as_chunks::<8>();
        let (cb, tb) = xb.as_chunks::<8>();
        for (x, y) in ca.iter().zip(cb) {
            let (x, y) = (f32x8::from(x.map(E::widen)), f32x8::from(y.map(E::widen)));
            aa = x.mul_add(x, aa);
            bb = y.mul_add(y, bb);
            ab = x.mul_add(y, ab);
        }
        let mut lanes = [aa.to_array(), bb.to_array(), ab.to_array()];
        for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
            let (x, y) = (x.widen(), y.widen());
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
pub(crate) fn stats_slices<E: Lane>(a: &[E], b: &[E], rows: usize) -> Vec<f64> {
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

/// One element of the combine, in f32, rounded once to the element type.
#[inline(always)]
fn mix<E: Lane>(x: E, y: E, c0: f32, c1: f32) -> E {
    E::narrow(c0 * x.widen() + c1 * y.widen())
}

/// Runs `write(out_chunk, start, b_chunk, c0, c1)` over matching chunks of `out` (one slot per
/// element) and `b`, in parallel, `start` being the chunk's first index: [`CHUNK`]-sized chunks
/// for one row, whole rows (many per task) for several.
fn for_each_row<O: Send, E: Lane>(
    out: &mut [O],
    b: &[E],
    coefficients: &[f32],
    write: impl Fn(&mut [O], usize, &[E], f32, f32) + Send + Sync,
) {
    let n = out.len();
    let rows = coefficients.len() / 2;
    let cols = n / rows.max(1);
    assert!(
        b.len() == n && rows * cols == n,
        "combine: inconsistent lengths"
    );
    if cols == 0 {
        return;
    }
    if rows == 1 {
        let (c0, c1) = (coefficients[0], coefficients[1]);
        out.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(i, (o, y))| write(o, i * CHUNK, y, c0, c1));
    } else {
        out.par_chunks_mut(cols)
            .zip(b.par_chunks(cols))
            .zip(coefficients.par_chunks(2))
            .enumerate()
            .with_min_len((CHUNK / cols).max(1))
            .for_each(|(i, ((o, y), c))| write(o, i * cols, y, c[0], c[1]));
    }
}

/// `c0·a + c1·b` of two contiguous buffers into a new one, with `(c0, c1)` per row
/// (`coefficients.len() / 2` equal rows).
pub(crate) fn combine_slices<E: Lane>(a: &[E], b: &[E], coefficients: &[f32]) -> Vec<E> {
    let n = a.len();
    let mut out: Vec<E> = Vec::with_capacity(n);
    advise_huge_pages(&mut out);
    // Written once, without zero-filling first: a fill would be one more pass over memory.
    let spare = &mut out.spare_capacity_mut()[..n];
    for_each_row(spare, b, coefficients, |o, start, y, c0, c1| {
        let x = &a[start..start + o.len()];
        for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
            o.write(mix(*x, *y, c0, c1));
        }
    });
    // SAFETY: `for_each_row` covers `spare[..n]` exactly with its chunks (it checks
    // `rows · cols == n` and that `b` has `n` elements), and every element of every chunk was
    // written.
    unsafe { out.set_len(n) };
    out
}

/// `c0·a + c1·b` written over `a`, with `(c0, c1)` per row: the same bits as
/// [`combine_slices`].
pub(crate) fn combine_in_place<E: Lane>(a: &mut [E], b: &[E], coefficients: &[f32]) {
    for_each_row(a, b, coefficients, |o, _, y, c0, c1| {
        for (o, y) in o.iter_mut().zip(y) {
            *o = mix(*o, *y, c0, c1);
        }
    });
}

/// Elements `start .. start + out.len()` of `c0·a + c1·b` into `out` (a block the file merge
/// reuses from block to block), with `(c0, c1)` per row of `cols` elements: the same bits as
/// [`combine_slices`]. Returns whether every value written is finite, found in the same pass.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn combine_range(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    start: usize,
    cols: usize,
    coefficients: &[f32],
) -> bool {
    let end = start + out.len();
    assert!(
        end <= a.len()
            && a.len() == b.len()
            && cols > 0
            && a.len() / cols * 2 == coefficients.len(),
        "combine: inconsistent lengths"
    );
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(k, o)| {
            let mut i = start + k * CHUNK;
            let mut o = o;
            // Without a branch per value (NaN fails the comparison too).
            let mut ok = true;
            while !o.is_empty() {
                // The part of this chunk in row `i / cols`.
                let row = i / cols;
                let take = ((row + 1) * cols - i).min(o.len());
                let (head, tail) = o.split_at_mut(take);
                let (c0, c1) = (coefficients[2 * row], coefficients[2 * row + 1]);
                for ((o, x), y) in head.iter_mut().zip(&a[i..i + take]).zip(&b[i..i + take]) {
                    *o = mix(*x, *y, c0, c1);
                    ok &= o.abs() <= f32::MAX;
                }
                o = tail;
                i += take;
            }
            ok
        })
        .reduce(|| true, |x, y| x && y)
}

/// Asks the kernel to back the buffer's spare capacity with transparent huge pages, where the
/// system leaves that to the program (Linux's `madvise` mode).
///
/// A fresh output is faulted in page by page as the combine pass first writes it; with 4 KiB
/// pages that costs as much as the pass itself (a 64 MiB output is 16384 faults), with 2 MiB
/// pages it is 32 faults. Only whole 2 MiB pages inside the allocation are advised, so nothing
/// outside the buffer is touched; the advice changes no contents and is only a hint: refused or
/// unsupported, the pass runs the same, only slower.
fn advise_huge_pages<E>(out: &mut Vec<E>) {
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

#[cfg(feature = "flex")]
mod flex {
    use std::borrow::Cow;

    use burn::backend::Flex;
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::{AllocationProperty, DType, Element, TensorData, bf16, f16};

    use super::{Lane, SlerpKernels, combine_in_place, combine_slices, stats_slices};

    /// The element types flex stores and the kernels read: f32, f16, bf16.
    trait FlexLane: Lane + Element + bytemuck::Pod {}
    impl FlexLane for f32 {}
    impl FlexLane for f16 {}
    impl FlexLane for bf16 {}

    /// The tensor's values, contiguous: borrowed when they already are, copied otherwise.
    fn contiguous<E: FlexLane>(t: &FlexTensor) -> Cow<'_, [E]> {
        match t.as_slice::<E>() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(t.clone().into_data().iter::<E>().collect()),
        }
    }

    /// The element range of `t`'s storage that may be written over: `t` holds the storage
    /// alone, the memory is this process's own (not a file, not a buffer shared with a
    /// memory map), and `t` is contiguous in it.
    fn writable(t: &FlexTensor) -> Option<(usize, usize)> {
        if !t.is_unique() || !matches!(t.data_arc().property(), AllocationProperty::Native) {
            return None;
        }
        t.layout().contiguous_offsets()
    }

    fn stats_as<E: FlexLane>(a: &FlexTensor, b: &FlexTensor, rows: usize) -> Vec<f64> {
        stats_slices(&contiguous::<E>(a), &contiguous::<E>(b), rows)
    }

    fn combine_as<E: FlexLane>(
        mut a: FlexTensor,
        b: &FlexTensor,
        coefficients: &[f32],
    ) -> FlexTensor {
        if let Some((start, end)) = writable(&a) {
            let b = contiguous::<E>(b);
            if let Some(storage) = a.try_storage_mut::<E>() {
                combine_in_place(&mut storage[start..end], &b, coefficients);
                return a;
            }
        }
        let shape = a.shape();
        let out = combine_slices(&contiguous::<E>(&a), &contiguous::<E>(b), coefficients);
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    impl SlerpKernels for Flex {
        fn slerp_stats(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            rows: usize,
        ) -> FloatTensor<Self> {
            let out = match a.dtype() {
                DType::F16 => stats_as::<f16>(&a, &b, rows),
                DType::BF16 => stats_as::<bf16>(&a, &b, rows),
                _ => stats_as::<f32>(&a, &b, rows),
            };
            FlexTensor::from_data(TensorData::new(out, [rows, 3]))
        }

        fn slerp_combine(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            coefficients: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let coefficients = contiguous::<f32>(&coefficients);
            match a.dtype() {
                DType::F16 => combine_as::<f16>(a, &b, &coefficients),
                DType::BF16 => combine_as::<bf16>(a, &b, &coefficients),
                _ => combine_as::<f32>(a, &b, &coefficients),
            }
        }
    }

    /// The address of a tensor's first element, to tell whether a result reuses an input.
    pub(crate) fn address(t: &FlexTensor) -> usize {
        let offset = t.layout().start_offset() * t.dtype().size();
        t.bytes()[offset..].as_ptr() as usize
    }
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use std::borrow::Cow;

    use burn::backend::NdArray;
    use burn::backend::TensorMetadata;
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{SlerpKernels, combine_in_place, combine_slices, stats_slices};

    /// The tensor's f32 values, contiguous: borrowed when they already are, copied otherwise.
    fn contiguous(t: &NdArrayTensor) -> Cow<'_, [f32]> {
        if let NdArrayTensor::F32(storage) = t
            && let Some(s) = storage.view().to_slice()
        {
            return Cow::Borrowed(s);
        }
        Cow::Owned(match t {
            NdArrayTensor::F32(storage) => storage.view().iter().copied().collect(),
            other => panic!(
                "the fused kernels take f32 tensors only, got {:?}",
                other.dtype()
            ),
        })
    }

    fn allocate(a: &NdArrayTensor, b: &NdArrayTensor, coefficients: &[f32]) -> NdArrayTensor {
        let out = combine_slices(&contiguous(a), &contiguous(b), coefficients);
        NdArrayTensor::from_data(TensorData::new(out, a.shape()))
    }

    impl SlerpKernels for NdArray {
        fn slerp_stats(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            rows: usize,
        ) -> FloatTensor<Self> {
            let out = stats_slices(&contiguous(&a), &contiguous(&b), rows);
            NdArrayTensor::from_data(TensorData::new(out, [rows, 3]))
        }

        fn slerp_combine(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            coefficients: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let coefficients = contiguous(&coefficients);
            match a {
                // Owned by this tensor alone (a zero-copy buffer from a file is never unique):
                // written over, in its standard layout.
                NdArrayTensor::F32(storage) if storage.is_unique() => {
                    let mut array = storage.into_owned();
                    if array.is_standard_layout() {
                        let b = contiguous(&b);
                        let values = array.as_slice_mut().expect("a standard layout");
                        combine_in_place(values, &b, &coefficients);
                        return NdArrayTensor::from(array);
                    }
                    allocate(&NdArrayTensor::from(array), &b, &coefficients)
                }
                a => allocate(&a, &b, &coefficients),
            }
        }
    }

    /// The address of a tensor's first element, to tell whether a result reuses an input.
    pub(crate) fn address(t: &NdArrayTensor) -> Option<usize> {
        match t {
            NdArrayTensor::F32(storage) => Some(storage.view().as_ptr() as usize),
            _ => None,
        }
    }
}

/// The address of a CPU tensor's first element (`None` on other devices and for dtypes the
/// kernels do not take), so that tests can tell a result written over its input from a new one.
#[doc(hidden)]
pub fn storage_address<const D: usize>(tensor: &Tensor<D>) -> Option<usize> {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    #[allow(unreachable_patterns)]
    match tensor.clone().into_dispatch().kind {
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(BackendTensor::Float(t)) => Some(flex::address(&t)),
        #[cfg(feature = "ndarray")]
        DispatchTensorKind::NdArray(BackendTensor::Float(t)) => ndarray::address(&t),
        _ => None,
    }
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
