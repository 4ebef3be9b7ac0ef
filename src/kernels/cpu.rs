//! Fused kernels of the SLERP family for the CPU backends (flex, ndarray): for k inputs (and
//! an optional base, for the methods that work on task vectors), one pass that computes the
//! k×k Gram matrix and one pass that writes the combination.
//!
//! The Gram pass reads every input once: `Gᵢⱼ = xᵢ·xⱼ` (per row or for the whole tensor), of
//! `xᵢ − base` where a base is given, the differences taken in f32 in registers (exact for
//! close values), never derived from the raw Gram matrix. Products accumulate in eight f32
//! lanes flushed to f64 every 512 elements. The combine pass reads every input once more and
//! writes `Σ cᵢ·xᵢ` (or `base + Σ cᵢ·(xᵢ − base)`) once, in f32, rounded once to the element
//! type: over the first input's own storage when nothing else holds it, into the only
//! full-size allocation otherwise. Both passes run in parallel over contiguous chunks with
//! rayon. The coefficients are computed between the two passes by the caller, on the host,
//! in f64 ([`crate::family`]). Two-input SLERP is the case k = 2.
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

use std::mem::MaybeUninit;

use burn::tensor::{Tensor, bf16, f16};
use rayon::prelude::*;
use wide::f32x8;

/// Elements per parallel task: large enough to stream, small enough to balance two cores.
const CHUNK: usize = 1 << 16;
/// Elements summed in f32 lanes before each flush to f64.
const FLUSH: usize = 8 * 64;
/// The most inputs one pass takes (the base not counted).
pub(crate) const MAX_INPUTS: usize = 8;

/// The length of the packed upper triangle of a k×k Gram matrix.
pub(crate) const fn packed(k: usize) -> usize {
    k * (k + 1) / 2
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

/// Calls `$run::<$e, K, BASE>($($arg),*)` for the run-time `k` in 1..=8 and whether a base is
/// given (`$base: Option<&[E]>`, passed on as a slice, empty without a base).
macro_rules! for_k {
    ($run:ident, $e:ty, $k:expr, $base:expr, $($arg:expr),*) => {{
        let base = $base;
        let slice = base.unwrap_or(&[]);
        match ($k, base.is_some()) {
            (1, false) => $run::<$e, 1, false>($($arg,)* slice),
            (2, false) => $run::<$e, 2, false>($($arg,)* slice),
            (3, false) => $run::<$e, 3, false>($($arg,)* slice),
            (4, false) => $run::<$e, 4, false>($($arg,)* slice),
            (5, false) => $run::<$e, 5, false>($($arg,)* slice),
            (6, false) => $run::<$e, 6, false>($($arg,)* slice),
            (7, false) => $run::<$e, 7, false>($($arg,)* slice),
            (8, false) => $run::<$e, 8, false>($($arg,)* slice),
            (1, true) => $run::<$e, 1, true>($($arg,)* slice),
            (2, true) => $run::<$e, 2, true>($($arg,)* slice),
            (3, true) => $run::<$e, 3, true>($($arg,)* slice),
            (4, true) => $run::<$e, 4, true>($($arg,)* slice),
            (5, true) => $run::<$e, 5, true>($($arg,)* slice),
            (6, true) => $run::<$e, 6, true>($($arg,)* slice),
            (7, true) => $run::<$e, 7, true>($($arg,)* slice),
            (8, true) => $run::<$e, 8, true>($($arg,)* slice),
            (k, _) => panic!("the kernels take 1 to {MAX_INPUTS} inputs, got {k}"),
        }
    }};
}

/// The packed upper triangle of the Gram matrix of one contiguous run of K inputs (of their
/// differences from `base` when `BASE`).
///
/// Eight f32 lanes accumulate blocks of [`FLUSH`] elements (64 per lane), and each block is
/// added to f64 totals: the lanes keep the loop at memory speed, the short blocks keep the f32
/// rounding far below the accuracy bar, and the f64 totals keep long tensors exact and finite.
/// A product above f32's range (|x| > 1.8e19) overflows a lane to infinity; the caller then
/// recomputes the tensor on the f64 path before calling it non-finite. Half-precision values
/// are widened as they are loaded, so they sum exactly as their f32 copies would.
fn sums<E: Lane, const K: usize, const BASE: bool>(xs: &[&[E]; K], base: &[E]) -> [[f64; K]; K] {
    let n = xs[0].len();
    let mut total = [[0.0f64; K]; K];
    let mut start = 0;
    while start < n {
        let end = (start + FLUSH).min(n);
        let chunks: [&[[E; 8]]; K] = std::array::from_fn(|i| xs[i][start..end].as_chunks().0);
        let based: &[[E; 8]] = if BASE {
            base[start..end].as_chunks().0
        } else {
            &[]
        };
        let full = chunks[0].len();
        let mut acc = [[f32x8::ZERO; K]; K];
        for q in 0..full {
            let b = if BASE {
                f32x8::from(based[q].map(E::widen))
            } else {
                f32x8::ZERO
            };
            let v: [f32x8; K] = std::array::from_fn(|i| {
                let x = f32x8::from(chunks[i][q].map(E::widen));
                if BASE { x - b } else { x }
            });
            for i in 0..K {
                for j in i..K {
                    acc[i][j] = v[i].mul_add(v[j], acc[i][j]);
                }
            }
        }
        let mut lanes = acc.map(|row| row.map(|v| v.to_array()));
        for (l, e) in (start + full * 8..end).enumerate() {
            let v: [f32; K] = std::array::from_fn(|i| {
                let x = xs[i][e].widen();
                if BASE { x - base[e].widen() } else { x }
            });
            for i in 0..K {
                for j in i..K {
                    lanes[i][j][l] += v[i] * v[j];
                }
            }
        }
        for i in 0..K {
            for j in i..K {
                total[i][j] += lanes[i][j].iter().map(|v| *v as f64).sum::<f64>();
            }
        }
        start = end;
    }
    total
}

/// The packed upper triangle of a [`sums`] result.
fn pack<const K: usize>(g: [[f64; K]; K], out: &mut Vec<f64>) {
    for (i, row) in g.iter().enumerate() {
        out.extend_from_slice(&row[i..]);
    }
}

/// Row Gram matrices of K contiguous buffers of `rows` equal rows, packed, row after row.
///
/// The chunk partials of a row are summed in a fixed order, so results do not depend on how the
/// work was scheduled.
fn gram_rows<E: Lane, const K: usize, const BASE: bool>(
    xs: &[&[E]],
    rows: usize,
    base: &[E],
) -> Vec<f64> {
    let xs: [&[E]; K] = std::array::from_fn(|i| xs[i]);
    let n = xs[0].len();
    assert!(
        xs.iter().all(|x| x.len() == n) && (!BASE || base.len() == n),
        "gram: inputs of different lengths"
    );
    let cols = n / rows.max(1);
    let mut out = Vec::with_capacity(rows * packed(K));
    if cols == 0 {
        out.resize(rows * packed(K), 0.0);
        return out;
    }
    let range = |s: usize, e: usize| -> ([&[E]; K], &[E]) {
        (
            std::array::from_fn(|i| &xs[i][s..e]),
            if BASE { &base[s..e] } else { &[] },
        )
    };
    if cols >= CHUNK {
        // Long rows: chunks of every row in parallel, partials combined per row in order.
        let per_row = cols.div_ceil(CHUNK);
        let partials: Vec<[[f64; K]; K]> = (0..rows * per_row)
            .into_par_iter()
            .map(|task| {
                let (row, part) = (task / per_row, task % per_row);
                let start = row * cols + part * CHUNK;
                let end = (row * cols + cols).min(start + CHUNK);
                let (x, b) = range(start, end);
                sums::<E, K, BASE>(&x, b)
            })
            .collect();
        for row in partials.chunks(per_row) {
            let mut g = [[0.0; K]; K];
            for part in row {
                for i in 0..K {
                    for j in i..K {
                        g[i][j] += part[i][j];
                    }
                }
            }
            pack(g, &mut out);
        }
    } else {
        // Short rows: many rows per task.
        let per_task = (CHUNK / cols).max(1);
        let each: Vec<[[f64; K]; K]> = (0..rows)
            .into_par_iter()
            .with_min_len(per_task)
            .map(|row| {
                let (x, b) = range(row * cols, row * cols + cols);
                sums::<E, K, BASE>(&x, b)
            })
            .collect();
        for g in each {
            pack(g, &mut out);
        }
    }
    out
}

/// The Gram matrices of `rows` equal rows of k contiguous buffers of one length (of their
/// differences from `base`, where given): `rows` packed upper triangles of `k(k+1)/2` values,
/// `(0,0), (0,1), …, (k−1,k−1)`.
///
/// More than [`MAX_INPUTS`] inputs are reduced in tiles: the inputs in groups of four, one pass
/// over each pair of groups (at most eight inputs), each entry taken from a pass that holds
/// both of its inputs (the same sums whichever pass that is).
pub(crate) fn gram_slices<E: Lane>(xs: &[&[E]], base: Option<&[E]>, rows: usize) -> Vec<f64> {
    let k = xs.len();
    if k <= MAX_INPUTS {
        return for_k!(gram_rows, E, k, base, xs, rows);
    }
    const GROUP: usize = MAX_INPUTS / 2;
    let groups: Vec<Vec<usize>> = (0..k)
        .step_by(GROUP)
        .map(|s| (s..(s + GROUP).min(k)).collect())
        .collect();
    // (i, j), i ≤ j, sits at i·k − i(i − 1)/2 + (j − i) in a packed upper triangle of k.
    let at = |k: usize, i: usize, j: usize| i * k - (i * i - i) / 2 + (j - i);
    let mut out = vec![0.0; rows * packed(k)];
    for a in 0..groups.len() {
        for b in a + 1..groups.len() {
            let idx: Vec<usize> = groups[a].iter().chain(&groups[b]).copied().collect();
            let sub: Vec<&[E]> = idx.iter().map(|i| xs[*i]).collect();
            let g = gram_slices(&sub, base, rows);
            let m = idx.len();
            for r in 0..rows {
                for p in 0..m {
                    for q in p..m {
                        out[r * packed(k) + at(k, idx[p], idx[q])] = g[r * packed(m) + at(m, p, q)];
                    }
                }
            }
        }
    }
    out
}

/// Where the combine reads the first input: a slice of its own, or the output it is written
/// over.
#[derive(Clone, Copy)]
pub(crate) enum First<'a, E> {
    Slice(&'a [E]),
    InPlace,
}

/// One run of the combine: `out[e] = Σ cᵢ·xᵢ[e]` (or `base[e] + Σ cᵢ·(xᵢ[e] − base[e])`) in
/// f32, products summed in input order, rounded once; `x0` is `out` itself when `None`.
/// Returns whether every value is finite in f32.
#[inline(always)]
fn run<E: Lane, const K: usize, const BASE: bool>(
    out: &mut [MaybeUninit<E>],
    x0: Option<&[E]>,
    xs: &[&[E]; K],
    base: &[E],
    c: &[f32],
) -> bool {
    let n = out.len();
    let c: [f32; K] = std::array::from_fn(|i| c[i]);
    let cv: [f32x8; K] = c.map(f32x8::splat);
    let mut ok = true;
    let (blocks, _) = out.as_chunks_mut::<8>();
    let full = blocks.len() * 8;
    for (q, o) in blocks.iter_mut().enumerate() {
        let e = q * 8;
        let load = |x: &[E]| -> f32x8 {
            let x: &[E; 8] = x[e..e + 8].try_into().expect("eight values");
            f32x8::from(x.map(E::widen))
        };
        let first = match x0 {
            Some(x) => load(x),
            // SAFETY: in place, `out` holds the first input's values, all initialised.
            None => f32x8::from(o.map(|v| unsafe { v.assume_init() }.widen())),
        };
        let b = if BASE { load(base) } else { f32x8::ZERO };
        let mut acc = cv[0] * if BASE { first - b } else { first };
        for i in 1..K {
            let x = load(xs[i]);
            acc += cv[i] * if BASE { x - b } else { x };
        }
        let v = if BASE { b + acc } else { acc };
        for (o, v) in o.iter_mut().zip(v.to_array()) {
            // Without a branch per value (NaN fails the comparison too).
            ok &= v.abs() <= f32::MAX;
            o.write(E::narrow(v));
        }
    }
    for e in full..n {
        let first = match x0 {
            Some(x) => x[e].widen(),
            // SAFETY: as above.
            None => unsafe { out[e].assume_init() }.widen(),
        };
        let b = if BASE { base[e].widen() } else { 0.0 };
        let mut acc = c[0] * if BASE { first - b } else { first };
        for i in 1..K {
            let x = xs[i][e].widen();
            acc += c[i] * if BASE { x - b } else { x };
        }
        let v = if BASE { b + acc } else { acc };
        ok &= v.abs() <= f32::MAX;
        out[e].write(E::narrow(v));
    }
    ok
}

/// Elements `start .. start + out.len()` of the combination of K inputs into `out`, with K
/// coefficients per row of `cols` elements, in parallel chunks split at row boundaries.
fn combine_rows<E: Lane, const K: usize, const BASE: bool>(
    out: &mut [MaybeUninit<E>],
    first: First<'_, E>,
    xs: &[&[E]],
    start: usize,
    cols: usize,
    coefficients: &[f32],
    base: &[E],
) -> bool {
    let xs: [&[E]; K] = std::array::from_fn(|i| xs[i]);
    let x0 = match first {
        First::Slice(x) => Some(x),
        First::InPlace => None,
    };
    // In place with no other input, `out` is the whole first input.
    let n = match (x0, xs.get(1).copied()) {
        (Some(x), _) | (None, Some(x)) => x.len(),
        (None, None) => start + out.len(),
    };
    assert!(
        cols > 0
            && n % cols == 0
            && n / cols * K == coefficients.len()
            && xs[1..].iter().all(|x| x.len() == n)
            && x0.is_none_or(|x| x.len() == n)
            && (!BASE || base.len() == n)
            && start + out.len() <= n,
        "combine: inconsistent lengths"
    );
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(q, o)| {
            let mut i = start + q * CHUNK;
            let mut o = o;
            let mut ok = true;
            while !o.is_empty() {
                // The part of this chunk in row `i / cols`.
                let row = i / cols;
                let take = ((row + 1) * cols - i).min(o.len());
                let (head, tail) = o.split_at_mut(take);
                let seg: [&[E]; K] =
                    std::array::from_fn(|k| if k == 0 { &[][..] } else { &xs[k][i..i + take] });
                let b = if BASE { &base[i..i + take] } else { &[][..] };
                let c = &coefficients[row * K..row * K + K];
                ok &= run::<E, K, BASE>(head, x0.map(|x| &x[i..i + take]), &seg, b, c);
                o = tail;
                i += take;
            }
            ok
        })
        .reduce(|| true, |x, y| x && y)
}

/// Elements `start .. start + out.len()` of the combination of k inputs (`Σ cᵢ·xᵢ`, or
/// `base + Σ cᵢ·(xᵢ − base)` with a base) into `out`, with k coefficients per row of `cols`
/// elements; `first` is the first input, or `out` itself (holding its values `start ..`), and
/// then `inputs[0]` is ignored. Returns whether every value is finite, found in the
/// same pass.
#[allow(clippy::too_many_arguments)]
///
/// More than [`MAX_INPUTS`] inputs are folded in: the first eight written, then the rest
/// added over `out` seven at a time (`out` taking coefficient 1), each pass rounding to `E`.
pub(crate) fn combine_into<E: Lane>(
    out: &mut [MaybeUninit<E>],
    first: First<'_, E>,
    inputs: &[&[E]],
    base: Option<&[E]>,
    start: usize,
    cols: usize,
    coefficients: &[f32],
) -> bool {
    let k = inputs.len();
    if k > MAX_INPUTS {
        let rows = coefficients.len() / k;
        let pick = |from: usize, to: usize, lead: Option<f32>| -> Vec<f32> {
            (0..rows)
                .flat_map(|r| {
                    let c = &coefficients[r * k..(r + 1) * k];
                    lead.into_iter().chain(c[from..to].iter().copied())
                })
                .collect()
        };
        let mut ok = combine_into(
            out,
            first,
            &inputs[..MAX_INPUTS],
            base,
            start,
            cols,
            &pick(0, MAX_INPUTS, None),
        );
        let mut from = MAX_INPUTS;
        while from < k {
            let to = (from + MAX_INPUTS - 1).min(k);
            let fold: Vec<&[E]> = std::iter::once(&[][..])
                .chain(inputs[from..to].iter().copied())
                .collect();
            let c = pick(from, to, Some(1.0));
            ok &= combine_into(out, First::InPlace, &fold, base, start, cols, &c);
            from = to;
        }
        return ok;
    }
    for_k!(
        combine_rows,
        E,
        inputs.len(),
        base,
        out,
        first,
        inputs,
        start,
        cols,
        coefficients
    )
}

/// The combination of k contiguous buffers into a new one (see [`combine_into`]), with k
/// coefficients per row (`coefficients.len() / k` equal rows).
pub(crate) fn combine_slices<E: Lane>(
    inputs: &[&[E]],
    base: Option<&[E]>,
    coefficients: &[f32],
) -> Vec<E> {
    let n = inputs[0].len();
    let rows = coefficients.len() / inputs.len();
    let mut out: Vec<E> = Vec::with_capacity(n);
    advise_huge_pages(&mut out);
    // Written once, without zero-filling first: a fill would be one more pass over memory.
    let spare = &mut out.spare_capacity_mut()[..n];
    if n > 0 {
        let first = First::Slice(inputs[0]);
        combine_into(spare, first, inputs, base, 0, n / rows, coefficients);
    }
    // SAFETY: `combine_into` covers `spare[..n]` exactly with its runs (it checks the
    // lengths), and writes every element of every run.
    unsafe { out.set_len(n) };
    out
}

/// The combination written over the first input (see [`combine_into`]; `inputs[0]` is
/// ignored): the same bits as [`combine_slices`].
pub(crate) fn combine_in_place<E: Lane>(
    first: &mut [E],
    inputs: &[&[E]],
    base: Option<&[E]>,
    coefficients: &[f32],
) {
    let n = first.len();
    if n == 0 {
        return;
    }
    let rows = coefficients.len() / inputs.len();
    // SAFETY: `MaybeUninit<E>` has `E`'s layout, and every value written is an initialised `E`.
    let out = unsafe { &mut *(first as *mut [E] as *mut [MaybeUninit<E>]) };
    combine_into(out, First::InPlace, inputs, base, 0, n / rows, coefficients);
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

/// The Gram matrices of `rows` equal rows of k tensors of one shape and dtype on flex or
/// ndarray (of their differences from `base`, where given): [`gram_slices`] of their values.
pub(crate) fn gram<const D: usize>(
    inputs: &[Tensor<D>],
    base: Option<&Tensor<D>>,
    rows: usize,
) -> Vec<f64> {
    #[cfg(feature = "flex")]
    if let Some(gram) = flex::gram(inputs, base, rows) {
        return gram;
    }
    #[cfg(feature = "ndarray")]
    if let Some(gram) = ndarray::gram(inputs, base, rows) {
        return gram;
    }
    unreachable!("only flex and ndarray tensors are routed to the CPU kernels")
}

/// The combination of `first` and `rest` (`Σ cᵢ·xᵢ`, or `base + Σ cᵢ·(xᵢ − base)`), with one
/// coefficient per input per row (`coefficients.len() / (1 + rest.len())` equal rows): written
/// over `first`'s storage when nothing else holds it, into a new tensor otherwise.
pub(crate) fn combine<const D: usize>(
    first: Tensor<D>,
    rest: &[Tensor<D>],
    base: Option<&Tensor<D>>,
    coefficients: &[f32],
) -> Tensor<D> {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)] // with one CPU backend, the other arm is compiled out
    match first.device().as_dispatch() {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => flex::combine(first, rest, base, coefficients),
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => ndarray::combine(first, rest, base, coefficients),
        _ => unreachable!("only flex and ndarray tensors are routed to the CPU kernels"),
    }
}

/// The slices of the inputs after the first, behind an empty placeholder for the first.
fn with_placeholder<E>(rest: &[impl std::ops::Deref<Target = [E]>]) -> Vec<&[E]> {
    std::iter::once(&[][..])
        .chain(rest.iter().map(|v| &**v))
        .collect()
}

#[cfg(feature = "flex")]
mod flex {
    use std::borrow::Cow;

    use burn::backend::Flex;
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{AllocationProperty, DType, Element, Tensor, TensorData, bf16, f16};

    use super::{Lane, combine_in_place, combine_slices, gram_slices, with_placeholder};

    /// The element types flex stores and the kernels read: f32, f16, bf16.
    trait FlexLane: Lane + Element + bytemuck::Pod {}
    impl FlexLane for f32 {}
    impl FlexLane for f16 {}
    impl FlexLane for bf16 {}

    fn primitive<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
        t.clone().try_into_primitive::<Flex>().ok()
    }

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

    pub(super) fn gram<const D: usize>(
        inputs: &[Tensor<D>],
        base: Option<&Tensor<D>>,
        rows: usize,
    ) -> Option<Vec<f64>> {
        let xs: Vec<FlexTensor> = inputs.iter().map(primitive).collect::<Option<_>>()?;
        let base = match base {
            Some(b) => Some(primitive(b)?),
            None => None,
        };
        Some(match xs[0].dtype() {
            DType::F16 => gram_as::<f16>(&xs, base.as_ref(), rows),
            DType::BF16 => gram_as::<bf16>(&xs, base.as_ref(), rows),
            _ => gram_as::<f32>(&xs, base.as_ref(), rows),
        })
    }

    fn gram_as<E: FlexLane>(xs: &[FlexTensor], base: Option<&FlexTensor>, rows: usize) -> Vec<f64> {
        let values: Vec<Cow<'_, [E]>> = xs.iter().map(contiguous::<E>).collect();
        let slices: Vec<&[E]> = values.iter().map(|v| &**v).collect();
        let base = base.map(contiguous::<E>);
        gram_slices(&slices, base.as_deref(), rows)
    }

    pub(super) fn combine<const D: usize>(
        first: Tensor<D>,
        rest: &[Tensor<D>],
        base: Option<&Tensor<D>>,
        coefficients: &[f32],
    ) -> Tensor<D> {
        let first = first
            .try_into_primitive::<Flex>()
            .expect("a tensor on a flex device");
        let rest: Vec<FlexTensor> = rest
            .iter()
            .map(primitive)
            .collect::<Option<_>>()
            .expect("flex tensors beside a flex tensor");
        let base = base.and_then(primitive);
        let out = match first.dtype() {
            DType::F16 => combine_as::<f16>(first, &rest, base.as_ref(), coefficients),
            DType::BF16 => combine_as::<bf16>(first, &rest, base.as_ref(), coefficients),
            _ => combine_as::<f32>(first, &rest, base.as_ref(), coefficients),
        };
        Tensor::from_primitive::<Flex>(out)
    }

    fn combine_as<E: FlexLane>(
        mut first: FlexTensor,
        rest: &[FlexTensor],
        base: Option<&FlexTensor>,
        coefficients: &[f32],
    ) -> FlexTensor {
        let values: Vec<Cow<'_, [E]>> = rest.iter().map(contiguous::<E>).collect();
        let base = base.map(contiguous::<E>);
        if let Some((start, end)) = writable(&first)
            && let Some(storage) = first.try_storage_mut::<E>()
        {
            let inputs = with_placeholder(&values);
            combine_in_place(
                &mut storage[start..end],
                &inputs,
                base.as_deref(),
                coefficients,
            );
            return first;
        }
        let shape = first.shape();
        let x0 = contiguous::<E>(&first);
        let inputs: Vec<&[E]> = std::iter::once(&*x0)
            .chain(values.iter().map(|v| &**v))
            .collect();
        let out = combine_slices(&inputs, base.as_deref(), coefficients);
        FlexTensor::from_data(TensorData::new(out, shape))
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
    use burn::tensor::{Tensor, TensorData};

    use super::{combine_in_place, combine_slices, gram_slices, with_placeholder};

    fn primitive<const D: usize>(t: &Tensor<D>) -> Option<NdArrayTensor> {
        t.clone().try_into_primitive::<NdArray>().ok()
    }

    /// The tensor's f32 values, contiguous: borrowed when they already are, copied otherwise.
    fn contiguous(t: &NdArrayTensor) -> Cow<'_, [f32]> {
        if let NdArrayTensor::F32(storage) = t
            && let Some(s) = storage.view().to_slice()
        {
            return Cow::Borrowed(s);
        }
        Cow::Owned(match t {
            NdArrayTensor::F32(storage) => storage.view().iter().copied().collect(),
            other => unreachable!(
                "the fused kernels take f32 ndarray tensors only, got {:?}",
                other.dtype()
            ),
        })
    }

    pub(super) fn gram<const D: usize>(
        inputs: &[Tensor<D>],
        base: Option<&Tensor<D>>,
        rows: usize,
    ) -> Option<Vec<f64>> {
        let xs: Vec<NdArrayTensor> = inputs.iter().map(primitive).collect::<Option<_>>()?;
        let base = match base {
            Some(b) => Some(primitive(b)?),
            None => None,
        };
        let values: Vec<Cow<'_, [f32]>> = xs.iter().map(contiguous).collect();
        let slices: Vec<&[f32]> = values.iter().map(|v| &**v).collect();
        let base = base.as_ref().map(contiguous);
        Some(gram_slices(&slices, base.as_deref(), rows))
    }

    pub(super) fn combine<const D: usize>(
        first: Tensor<D>,
        rest: &[Tensor<D>],
        base: Option<&Tensor<D>>,
        coefficients: &[f32],
    ) -> Tensor<D> {
        let first = first
            .try_into_primitive::<NdArray>()
            .expect("a tensor on an ndarray device");
        let rest: Vec<NdArrayTensor> = rest
            .iter()
            .map(primitive)
            .collect::<Option<_>>()
            .expect("ndarray tensors beside an ndarray tensor");
        let base = base.and_then(primitive);
        let values: Vec<Cow<'_, [f32]>> = rest.iter().map(contiguous).collect();
        let base = base.as_ref().map(contiguous);
        let out = match first {
            // Owned by this tensor alone (a zero-copy buffer from a file is never unique):
            // written over, in its standard layout.
            NdArrayTensor::F32(storage) if storage.is_unique() => {
                let mut array = storage.into_owned();
                if let Some(slice) = array.as_slice_mut() {
                    let inputs = with_placeholder(&values);
                    combine_in_place(slice, &inputs, base.as_deref(), coefficients);
                    NdArrayTensor::from(array)
                } else {
                    allocate(
                        &NdArrayTensor::from(array),
                        &values,
                        base.as_deref(),
                        coefficients,
                    )
                }
            }
            first => allocate(&first, &values, base.as_deref(), coefficients),
        };
        Tensor::from_primitive::<NdArray>(out)
    }

    fn allocate(
        first: &NdArrayTensor,
        rest: &[Cow<'_, [f32]>],
        base: Option<&[f32]>,
        coefficients: &[f32],
    ) -> NdArrayTensor {
        let x0 = contiguous(first);
        let inputs: Vec<&[f32]> = std::iter::once(&*x0)
            .chain(rest.iter().map(|v| &**v))
            .collect();
        let out = combine_slices(&inputs, base, coefficients);
        NdArrayTensor::from_data(TensorData::new(out, first.shape()))
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

    /// The packed Gram matrix of `xs` (of `xᵢ − base`) in plain f64: the reference.
    fn exact(xs: &[&[f32]], base: Option<&[f32]>) -> Vec<f64> {
        let d = |x: &[f32], e: usize| x[e] as f64 - base.map_or(0.0, |b| b[e] as f64);
        let mut out = Vec::new();
        for i in 0..xs.len() {
            for j in i..xs.len() {
                out.push((0..xs[0].len()).map(|e| d(xs[i], e) * d(xs[j], e)).sum());
            }
        }
        out
    }

    /// f32 lanes flushed to f64 every 512 elements: errors of ~1e-7 of the norms' scale.
    fn close(got: &[f64], want: &[f64], k: usize) -> bool {
        // (i, i) sits at i·k − i(i − 1)/2 in the packed upper triangle.
        let scale = (0..k)
            .map(|i| want[i * k - (i * i - i) / 2])
            .fold(1.0, f64::max);
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-6 * scale)
    }

    fn input(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * (seed + 3)) as f32 * 0.0137 + seed as f32).sin())
            .collect()
    }

    #[test]
    fn gram_matches_f64_for_every_k_and_tail_length() {
        for n in [0, 1, 7, 8, 9, 100, 513, CHUNK + 3] {
            for k in 1..=MAX_INPUTS {
                let xs: Vec<Vec<f32>> = (0..k).map(|s| input(n, s)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let base = input(n, 11);
                for base in [None, Some(base.as_slice())] {
                    let got = gram_slices(&refs, base, 1);
                    assert!(close(&got, &exact(&refs, base), k), "n={n} k={k}");
                }
            }
        }
    }

    #[test]
    fn more_inputs_than_a_pass_takes_are_tiled() {
        let (rows, cols) = (3, 700);
        let n = rows * cols;
        for k in [9, 13, 17] {
            let xs: Vec<Vec<f32>> = (0..k).map(|s| input(n, s)).collect();
            let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
            let base = input(n, 40);
            for base in [None, Some(base.as_slice())] {
                let got = gram_slices(&refs, base, rows);
                let p = packed(k);
                for r in 0..rows {
                    let s = r * cols..(r + 1) * cols;
                    let row: Vec<&[f32]> = refs.iter().map(|x| &x[s.clone()]).collect();
                    let b = base.map(|b| &b[s.clone()]);
                    assert!(close(&got[r * p..(r + 1) * p], &exact(&row, b), k), "k={k}");
                }
                let coefficients: Vec<f32> =
                    (0..rows * k).map(|i| 0.1 + (i % 5) as f32 * 0.05).collect();
                let out = combine_slices(&refs, base, &coefficients);
                for (e, o) in out.iter().enumerate() {
                    let c = &coefficients[e / cols * k..];
                    let d = |i: usize| xs[i][e] as f64 - base.map_or(0.0, |b| b[e] as f64);
                    let want = base.map_or(0.0, |b| b[e] as f64)
                        + (0..k).map(|i| c[i] as f64 * d(i)).sum::<f64>();
                    assert!(
                        (*o as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "k={k} e={e}"
                    );
                }
                let mut first = xs[0].clone();
                combine_in_place(&mut first, &refs, base, &coefficients);
                assert_eq!(first, out);
            }
        }
    }

    #[test]
    fn task_vectors_are_reduced_from_the_differences() {
        // Fine-tunes 0.1% from their base: the raw Gram matrix would cancel six digits.
        let n = 20_000;
        let base = input(n, 1);
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|s| {
                let d = input(n, 5 + s);
                base.iter().zip(&d).map(|(b, d)| b + 1e-3 * d).collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let got = gram_slices(&refs, Some(&base), 1);
        let want = exact(&refs, Some(&base));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * want[0].abs(), "{g} vs {w}");
        }
    }

    #[test]
    fn rows_long_and_short_match_their_slices() {
        for (rows, cols) in [(3, CHUNK * 2 + 5), (1000, 3), (5, 1)] {
            let n = rows * cols;
            for k in [2, 3, 8] {
                let xs: Vec<Vec<f32>> = (0..k).map(|s| input(n, s)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let got = gram_slices(&refs, None, rows);
                let p = packed(k);
                assert_eq!(got.len(), rows * p);
                for r in 0..rows {
                    let s = r * cols..(r + 1) * cols;
                    let row: Vec<&[f32]> = refs.iter().map(|x| &x[s.clone()]).collect();
                    assert!(close(&got[r * p..(r + 1) * p], &exact(&row, None), k));
                }
            }
        }
    }

    #[test]
    fn combine_sums_in_input_order_in_place_or_not() {
        for (rows, cols) in [(1, CHUNK * 2 + 5), (1000, 3), (5, 1), (2, 13)] {
            let n = rows * cols;
            for k in [1, 2, 3, 8] {
                let xs: Vec<Vec<f32>> = (0..k).map(|s| input(n, s)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let base = input(n, 9);
                let coefficients: Vec<f32> = (0..rows * k)
                    .map(|i| 0.25 + (i % 7) as f32 * 0.125)
                    .collect();
                for base in [None, Some(base.as_slice())] {
                    let out = combine_slices(&refs, base, &coefficients);
                    for (e, o) in out.iter().enumerate() {
                        let c = &coefficients[e / cols * k..];
                        let want = match base {
                            None => (1..k).fold(c[0] * xs[0][e], |acc, i| acc + c[i] * xs[i][e]),
                            Some(b) => {
                                let d = |i: usize| xs[i][e] - b[e];
                                b[e] + (1..k).fold(c[0] * d(0), |acc, i| acc + c[i] * d(i))
                            }
                        };
                        assert_eq!(o.to_bits(), want.to_bits(), "k={k} e={e}");
                    }
                    let mut first = xs[0].clone();
                    combine_in_place(&mut first, &refs, base, &coefficients);
                    assert_eq!(first, out);
                }
            }
        }
    }

    #[test]
    fn combine_reports_values_beyond_f32() {
        let (a, b) = (vec![3e38f32; 20], vec![3e38f32; 20]);
        let mut out = vec![MaybeUninit::uninit(); 20];
        assert!(!combine_into(
            &mut out,
            First::Slice(&a),
            &[&a, &b],
            None,
            0,
            20,
            &[1.0, 1.0]
        ));
        assert!(combine_into(
            &mut out,
            First::Slice(&a),
            &[&a, &b],
            None,
            0,
            20,
            &[0.5, 0.5]
        ));
    }
}
