//! Merge benchmarks: a whole model with GPT-2-small shapes (124,439,808 f32 parameters in 148
//! tensors) and one 4096×4096 pair, on every backend this build enables.
//!
//! In the same run it measures the machine's memory bandwidth with a STREAM-style triad over
//! buffers of the case's size, and prints one summary line per case:
//! `merge_s` (median), `bound_s` (20 bytes per parameter ÷ triad bandwidth: the two-pass
//! scheme reads `a` and `b` twice and writes the output once) and `ratio = merge_s / bound_s`.
//! For the whole-model merge on the CPU backends it also prints the peak memory the merge adds
//! (`VmHWM` after the merge minus `VmRSS` before it, with the peak reset just before), and the
//! time of a plain two-pass SLERP over the same shapes writing into preallocated outputs, the
//! floor a merge that needs no fresh memory can reach.
//!
//! The consuming merge (`merge_into`) is timed on a fresh copy of `a` per run (the copy is not
//! timed: it stands for the model a program already holds), in both walk orders (every
//! statistic first, as `merge_into` does, and tensor by tensor), next to the allocating `merge`
//! in both orders, with its peak memory (`VmHWM` over `VmRSS` before it).
//!
//! With `--features cli` it also merges a GPT-2-small-shaped pair of `.safetensors` files with
//! the `burn-slerp merge` command (the files are written to Cargo's scratch folder for
//! benches), and times `cp --reflink=never A OUT` on the same filesystem in the same run: wall,
//! user and system time of each (medians of 5 alternating runs), and the command's peak
//! anonymous memory (`RssAnon` sampled every millisecond; the largest of the 5 runs).
//!
//! With `BENCH_ONLY=scale` and `BENCH_SCALE_DIR` it measures the 7B scale instead (see
//! `scale`): not part of a plain run, the inputs take 27 GB.
//!
//! Usage: cargo bench --bench merge [--features ndarray,wgpu,cli] (`BENCH_ONLY=memory` or
//! `BENCH_ONLY=files` for one half; `BENCH_DEVICES=flex,wgpu` for some of the devices)

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use burn_slerp::{SlerpConfig, SlerpMerger, SphericalMean, WalkOrder, slerp};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use wide::f32x8;

#[derive(Module, Debug)]
struct Block {
    ln_1: LayerNorm,
    attn_qkv: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    mlp_fc: Linear,
    mlp_proj: Linear,
}

#[derive(Module, Debug)]
struct Gpt2Small {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

/// GPT-2 small's shapes; on wgpu a vocabulary of 40,000 instead of 50,257, because Mesa's
/// software Vulkan driver binds at most 128 MiB per buffer and the full token embedding is
/// 154 MB (the other tensors are the same).
fn gpt2_small(device: &Device) -> Gpt2Small {
    let d = 768;
    let vocabulary = if is_wgpu(device) { 40_000 } else { 50_257 };
    let model = Gpt2Small {
        wte: EmbeddingConfig::new(vocabulary, d).init(device),
        wpe: EmbeddingConfig::new(1024, d).init(device),
        blocks: (0..12)
            .map(|_| Block {
                ln_1: LayerNormConfig::new(d).init(device),
                attn_qkv: LinearConfig::new(d, 3 * d).init(device),
                attn_proj: LinearConfig::new(d, d).init(device),
                ln_2: LayerNormConfig::new(d).init(device),
                mlp_fc: LinearConfig::new(d, 4 * d).init(device),
                mlp_proj: LinearConfig::new(4 * d, d).init(device),
            })
            .collect(),
        ln_f: LayerNormConfig::new(d).init(device),
    };
    initialize(&model);
    model
}

/// Runs the lazy initializers now, so that no timed merge pays for them.
fn initialize<M: Module>(module: &M) {
    struct Init;
    impl ModuleVisitor for Init {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Init);
}

fn is_wgpu(device: &Device) -> bool {
    #[cfg(feature = "wgpu")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = device;
        false
    }
}

#[allow(deprecated)] // Device::ndarray() is deprecated upstream; it is still benchmarked
fn devices() -> Vec<(&'static str, Device)> {
    [
        #[cfg(feature = "flex")]
        ("flex", Device::flex()),
        #[cfg(feature = "ndarray")]
        ("ndarray", Device::ndarray()),
        #[cfg(feature = "wgpu")]
        ("wgpu", Device::wgpu(Default::default())),
    ]
    .into_iter()
    .filter(|(name, _)| {
        std::env::var("BENCH_DEVICES").map_or(true, |list| list.split(',').any(|d| d == *name))
    })
    .collect()
}

/// Times `routine` between device syncs: wgpu runs asynchronously.
fn timed<O>(device: &Device, iters: u64, mut routine: impl FnMut() -> O) -> Duration {
    device.sync().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        black_box(routine());
    }
    device.sync().unwrap();
    start.elapsed()
}

/// Median of `runs` timings of `routine`, in seconds.
fn median_s<O>(device: &Device, runs: usize, mut routine: impl FnMut() -> O) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| timed(device, 1, &mut routine).as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// Triad `x = y + s·z` over three buffers of `n` f32, on both cores: bytes per second,
/// counting 12 bytes per element (two reads, one write), median of 7 runs.
fn triad_bandwidth(n: usize) -> f64 {
    let y = vec![1.0f32; n];
    let z = vec![2.0f32; n];
    let mut x = vec![0.0f32; n];
    let mut run = || {
        let start = Instant::now();
        x.par_chunks_mut(1 << 16)
            .zip(y.par_chunks(1 << 16))
            .zip(z.par_chunks(1 << 16))
            .for_each(|((x, y), z)| {
                for ((x, y), z) in x.iter_mut().zip(y).zip(z) {
                    *x = y + 0.5 * z;
                }
            });
        black_box(&x);
        start.elapsed().as_secs_f64()
    };
    run(); // first touch of the output pages
    let mut times: Vec<f64> = (0..7).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    (12 * n) as f64 / times[3]
}

fn summary(case: &str, backend: &str, params: usize, merge_s: f64) {
    let bandwidth = triad_bandwidth(params);
    let bound_s = 20.0 * params as f64 / bandwidth;
    println!(
        "summary {case} {backend}: merge_s {merge_s:.4} bound_s {bound_s:.4} ratio {:.2} \
         (triad {:.1} GB/s)",
        merge_s / bound_s,
        bandwidth / 1e9
    );
}

/// Every float parameter of `module` as host values, in visiting order.
fn host_tensors<M: Module>(module: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().into_data().iter::<f32>().collect());
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

/// The floor a merge of these tensors can be held to: a plain two-pass SLERP in Rust over host
/// buffers, on both cores, writing into outputs allocated (and touched) beforehand. Pass one
/// sums `a²`, `b²`, `a·b` per chunk in eight f32 lanes and adds the chunks in f64 (less
/// accurate than the crate's kernels, which flush to f64 every 512 elements, and so no
/// slower); the coefficients come
/// from the angle on the host; pass two writes `c0·a + c1·b` into the existing output.
fn reference_two_pass(a: &[Vec<f32>], b: &[Vec<f32>], out: &mut [Vec<f32>], t: f64) {
    const CHUNK: usize = 1 << 16;
    for ((a, b), out) in a.iter().zip(b).zip(out.iter_mut()) {
        let (aa, bb, ab) = a
            .par_chunks(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .map(|(x, y)| {
                // Eight lanes, as any vectorised C loop would sum.
                let (mut aa, mut bb, mut ab) = (f32x8::ZERO, f32x8::ZERO, f32x8::ZERO);
                let (xs, x_tail) = x.as_chunks::<8>();
                let (ys, y_tail) = y.as_chunks::<8>();
                for (x, y) in xs.iter().zip(ys) {
                    let (x, y) = (f32x8::from(*x), f32x8::from(*y));
                    aa = x.mul_add(x, aa);
                    bb = y.mul_add(y, bb);
                    ab = x.mul_add(y, ab);
                }
                let tail: (f32, f32, f32) = x_tail
                    .iter()
                    .zip(y_tail)
                    .fold((0.0, 0.0, 0.0), |s, (x, y)| {
                        (s.0 + x * x, s.1 + y * y, s.2 + x * y)
                    });
                (
                    (aa.reduce_add() + tail.0) as f64,
                    (bb.reduce_add() + tail.1) as f64,
                    (ab.reduce_add() + tail.2) as f64,
                )
            })
            .reduce(|| (0.0, 0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1, p.2 + q.2));
        let cos = (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0);
        let theta = cos.acos();
        let (c0, c1) = if theta < 1e-6 {
            (1.0 - t, t)
        } else {
            (
                ((1.0 - t) * theta).sin() / theta.sin(),
                (t * theta).sin() / theta.sin(),
            )
        };
        let (c0, c1) = (c0 as f32, c1 as f32);
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((o, x), y)| {
                for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                    *o = c0 * x + c1 * y;
                }
            });
    }
}

/// `(VmRSS, VmHWM)` of this process in bytes, after resetting the peak when asked.
fn memory(reset_peak: bool) -> Option<(u64, u64)> {
    if reset_peak {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A copy of `module` in fresh memory of its own (each tensor's values copied), as a loaded
/// model holds them.
fn deep_copy<M: Module>(module: &M) -> M {
    struct Copy;
    impl burn::module::ModuleMapper for Copy {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| Tensor::from_data(t.to_data(), &t.device()))
        }
    }
    module.clone().map(&mut Copy)
}

/// Median of `runs` timings of `routine` on a fresh [`deep_copy`] of `a` each (untimed).
fn median_consuming_s<M: Module, O>(
    device: &Device,
    a: &M,
    runs: usize,
    mut routine: impl FnMut(M) -> O,
) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let copy = deep_copy(a);
            device.sync().unwrap();
            let start = Instant::now();
            let out = routine(copy);
            device.sync().unwrap();
            let elapsed = start.elapsed().as_secs_f64();
            drop(black_box(out));
            elapsed
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// The consuming and allocating merges of the GPT-2-small pair in both walk orders, their
/// peak memory, and the two-pass reference, in one run.
fn in_place_figures(
    name: &str,
    device: &Device,
    a: &Gpt2Small,
    b: &Gpt2Small,
    merger: &SlerpMerger,
) {
    let params = a.num_params() as u64;
    // Peak memory of the consuming merge first: `a`'s copy is all it may use.
    let copy = deep_copy(a);
    if let Some((before, _)) = memory(true) {
        let merged = merger.merge_into(copy, b).unwrap();
        if let Some((_, peak)) = memory(false) {
            println!(
                "memory gpt2_small {name}: merge_into adds {:.1} MB at peak (inputs {:.1} MB \
                 each)",
                (peak as f64 - before as f64) / 1e6,
                (params * 4) as f64 / 1e6
            );
        }
        drop(merged);
    }
    let runs = 7;
    let into_s = median_consuming_s(device, a, runs, |copy| merger.merge_into(copy, b).unwrap());
    let into_per_tensor_s = median_consuming_s(device, a, runs, |copy| {
        merger
            .merge_in_order(copy, b, WalkOrder::PerTensor, true)
            .unwrap()
    });
    let merge_s = median_s(device, runs, || merger.merge(a, b).unwrap());
    let merge_first_s = median_s(device, runs, || {
        merger
            .merge_in_order(a.clone(), b, WalkOrder::StatisticsFirst, false)
            .unwrap()
    });
    let (ha, hb) = (host_tensors(a), host_tensors(b));
    let mut out: Vec<Vec<f32>> = ha.iter().map(|t| vec![0.0; t.len()]).collect();
    let reference_s = median_s(device, runs, || {
        reference_two_pass(&ha, &hb, &mut out, 0.5);
        black_box(&out);
    });
    println!(
        "inplace gpt2_small {name}: merge_into {into_s:.4} s (statistics first; tensor by tensor \
         {into_per_tensor_s:.4} s), merge {merge_s:.4} s (statistics first {merge_first_s:.4} s), \
         reference {reference_s:.4} s; merge_into / reference {:.2}, merge / reference {:.2}",
        into_s / reference_s,
        merge_s / reference_s
    );
}

/// The floor of a three-input merge of these tensors: one pass for the 3×3 Gram matrix (six
/// f32 lanes per chunk, chunks added in f64), fixed coefficients, one pass writing
/// `Σ cᵢ·xᵢ` into outputs allocated (and touched) beforehand, on both cores.
fn reference_three(xs: [&[Vec<f32>]; 3], out: &mut [Vec<f32>]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let mut check = 0.0;
    for (t, out) in out.iter_mut().enumerate() {
        let (x, y, z) = (&xs[0][t], &xs[1][t], &xs[2][t]);
        let g = x
            .par_chunks(CHUNK)
            .zip(y.par_chunks(CHUNK))
            .zip(z.par_chunks(CHUNK))
            .map(|((x, y), z)| {
                let mut acc = [f32x8::ZERO; 6];
                let (xs, _) = x.as_chunks::<8>();
                let (ys, _) = y.as_chunks::<8>();
                let (zs, _) = z.as_chunks::<8>();
                for ((x, y), z) in xs.iter().zip(ys).zip(zs) {
                    let (x, y, z) = (f32x8::from(*x), f32x8::from(*y), f32x8::from(*z));
                    acc[0] = x.mul_add(x, acc[0]);
                    acc[1] = x.mul_add(y, acc[1]);
                    acc[2] = x.mul_add(z, acc[2]);
                    acc[3] = y.mul_add(y, acc[3]);
                    acc[4] = y.mul_add(z, acc[4]);
                    acc[5] = z.mul_add(z, acc[5]);
                }
                acc.map(|a| a.reduce_add() as f64)
            })
            .reduce(|| [0.0; 6], |p, q| std::array::from_fn(|i| p[i] + q[i]));
        check += g.iter().sum::<f64>();
        let (c0, c1, c2) = (0.3f32, 0.3f32, 0.4f32);
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(y.par_chunks(CHUNK))
            .zip(z.par_chunks(CHUNK))
            .for_each(|(((o, x), y), z)| {
                for (((o, x), y), z) in o.iter_mut().zip(x).zip(y).zip(z) {
                    *o = c0 * x + c1 * y + c2 * z;
                }
            });
    }
    check
}

/// The three-model spherical mean of GPT-2-small shapes, consuming and borrowed, its peak
/// memory, and the three-input reference, in one run.
fn mean_figures(name: &str, device: &Device, a: &Gpt2Small, b: &Gpt2Small, c: &Gpt2Small) {
    let mean = SphericalMean::new(vec![1.0, 1.0, 1.0]).unwrap();
    let copy = deep_copy(a);
    if let Some((before, _)) = memory(true) {
        let merged = mean.merge_into(copy, &[b, c]).unwrap();
        if let Some((_, peak)) = memory(false) {
            println!(
                "memory gpt2_small {name}: mean merge_into of 3 adds {:.1} MB at peak",
                (peak as f64 - before as f64) / 1e6
            );
        }
        drop(merged);
    }
    let runs = 7;
    let into_s = median_consuming_s(device, a, runs, |copy| {
        mean.merge_into(copy, &[b, c]).unwrap()
    });
    let merge_s = median_s(device, runs, || mean.merge(&[a, b, c]).unwrap());
    let (ha, hb, hc) = (host_tensors(a), host_tensors(b), host_tensors(c));
    let mut out: Vec<Vec<f32>> = ha.iter().map(|t| vec![0.0; t.len()]).collect();
    let reference_s = median_s(device, runs, || {
        black_box(reference_three([&ha, &hb, &hc], &mut out));
        black_box(&out);
    });
    println!(
        "mean gpt2_small {name}: SphericalMean of 3: merge_into {into_s:.4} s, merge \
         {merge_s:.4} s, three-input reference {reference_s:.4} s; merge_into / reference {:.2}",
        into_s / reference_s
    );
}

/// `BENCH_ONLY=files` or `BENCH_ONLY=memory` runs one half of the bench.
fn only(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only == part)
}

fn bench_merge(c: &mut Criterion) {
    if !only("memory") {
        return;
    }
    let merger = SlerpMerger::new(SlerpConfig::new(0.5)).unwrap();
    for (name, device) in devices() {
        let (a, b) = (gpt2_small(&device), gpt2_small(&device));
        let params = a.num_params() as u64;
        if name != "wgpu" {
            assert_eq!(params, 124_439_808);
        }
        // Peak memory first, before any merge has left freed memory in the allocator.
        if name != "wgpu"
            && let Some((before, _)) = memory(true)
        {
            let merged = merger.merge(&a, &b).unwrap();
            if let Some((_, peak)) = memory(false) {
                let output = params * 4;
                println!(
                    "memory gpt2_small {name}: merge adds {:.1} MB at peak (output {:.1} MB, \
                     extra beyond the output {:.1} MB)",
                    (peak - before) as f64 / 1e6,
                    output as f64 / 1e6,
                    (peak as f64 - before as f64 - output as f64) / 1e6
                );
            }
            drop(merged);
        }
        let mut group = c.benchmark_group("merge_gpt2_small");
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(20));
        // Bytes that must move at least: read a and b, write the result.
        group.throughput(Throughput::Bytes(params * 12));
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                timed(&device, iters, || {
                    merger.merge(black_box(&a), black_box(&b)).unwrap()
                })
            })
        });
        group.finish();
        let merge_s = median_s(&device, 7, || merger.merge(&a, &b).unwrap());
        summary("gpt2_small", name, params as usize, merge_s);
        if name != "wgpu" {
            in_place_figures(name, &device, &a, &b, &merger);
            let c3 = gpt2_small(&device);
            mean_figures(name, &device, &a, &b, &c3);
        } else {
            let into_s =
                median_consuming_s(&device, &a, 7, |copy| merger.merge_into(copy, &b).unwrap());
            println!("inplace gpt2_small wgpu: merge_into {into_s:.4} s, merge {merge_s:.4} s");
            // The N-way merges on the device, against the two-model merge in the same run.
            let c3 = gpt2_small(&device);
            let mean = SphericalMean::new(vec![1.0, 1.0, 1.0]).unwrap();
            let mean_into_s = median_consuming_s(&device, &a, 5, |copy| {
                mean.merge_into(copy, &[&b, &c3]).unwrap()
            });
            let mean_s = median_s(&device, 5, || mean.merge(&[&a, &b, &c3]).unwrap());
            let base_s = median_s(&device, 5, || merger.merge_with_base(&c3, &a, &b).unwrap());
            println!(
                "mean gpt2_small wgpu: SphericalMean of 3: merge_into {mean_into_s:.4} s, merge \
                 {mean_s:.4} s; SLERP merge_with_base {base_s:.4} s; mean merge_into / \
                 two-model merge_into {:.2}",
                mean_into_s / into_s
            );
        }
        drop((a, b));

        let n = 4096;
        let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let config = SlerpConfig::new(0.5);
        let mut group = c.benchmark_group("slerp_4096x4096");
        group.sample_size(10);
        group.throughput(Throughput::Bytes((n * n * 12) as u64));
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                timed(&device, iters, || {
                    slerp(black_box(a.clone()), black_box(b.clone()), &config).unwrap()
                })
            })
        });
        group.finish();
        let merge_s = median_s(&device, 7, || slerp(a.clone(), b.clone(), &config).unwrap());
        summary("4096x4096", name, n * n, merge_s);
        // The generic tensor-op path on the same pair, for what the fused kernels gain.
        let generic_s = median_s(&device, 3, || {
            burn_slerp::slerp_generic(a.clone(), b.clone(), &config).unwrap()
        });
        summary("4096x4096-generic", name, n * n, generic_s);
    }
}

/// The file merge of a GPT-2-small-shaped safetensors pair against `cp` on the same filesystem.
#[cfg(feature = "cli")]
mod files {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    use safetensors::tensor::{Dtype, TensorView};

    /// Every float tensor of `module` with its dotted path, shape and little-endian bytes.
    fn named_tensors<M: Module>(module: &M) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        #[derive(Default)]
        struct Collect {
            path: Vec<String>,
            out: Vec<(String, Vec<usize>, Vec<u8>)>,
        }
        impl ModuleVisitor for Collect {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let t = param.val();
                let bytes = t
                    .to_data()
                    .iter::<f32>()
                    .flat_map(f32::to_le_bytes)
                    .collect();
                self.out
                    .push((self.path.join("."), t.dims().to_vec(), bytes));
            }
        }
        let mut collect = Collect::default();
        module.visit(&mut collect);
        collect.out
    }

    fn write<M: Module>(module: &M, path: &Path) {
        let tensors = named_tensors(module);
        let views = tensors.iter().map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        });
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// `(user, system)` CPU seconds of this process's finished children so far.
    fn children_cpu() -> (f64, f64) {
        // SAFETY: `getrusage` fills the zeroed struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            usage
        };
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (s(usage.ru_utime), s(usage.ru_stime))
    }

    /// `RssAnon` of process `pid`, in bytes (0 once it is gone).
    fn rss_anon(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// One timed child process: wall, user and system seconds, and its peak `RssAnon` (sampled
    /// every millisecond).
    pub fn run(command: &mut Command) -> (f64, f64, f64, u64) {
        let (u0, s0) = children_cpu();
        let start = Instant::now();
        let mut child = command.spawn().unwrap();
        let pid = child.id();
        let peak = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_anon(pid), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        let status = child.wait().unwrap();
        let wall = start.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        assert!(status.success(), "{command:?}");
        let (u1, s1) = children_cpu();
        (wall, u1 - u0, s1 - s0, peak.load(Ordering::Relaxed))
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    pub fn figures<M: Module>(a: &M, b: &M, c: &M, largest_bytes: u64) {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-files");
        std::fs::create_dir_all(&dir).unwrap();
        let (pa, pb, pc, out) = (
            dir.join("a.safetensors"),
            dir.join("b.safetensors"),
            dir.join("c.safetensors"),
            dir.join("out.safetensors"),
        );
        write(a, &pa);
        write(b, &pb);
        write(c, &pc);
        // Dirty pages left by the previous write are flushed (untimed) before each timed one,
        // so that neither `cp` nor the merge is throttled by the other's writeback.
        let settle = |out: &Path| {
            let _ = std::fs::remove_file(out);
            let _ = Command::new("sync").status();
        };
        let runs = 5;
        let (mut merge, mut cp, mut mean, mut base, mut cp_sync) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let cli = || Command::new(env!("CARGO_BIN_EXE_burn-slerp"));
        for _ in 0..runs {
            settle(&out);
            mean.push(run(cli()
                .arg("mean")
                .args([&pa, &pb, &pc])
                .arg("-o")
                .arg(&out)
                .arg("-q")));
            settle(&out);
            base.push(run(cli()
                .arg("merge")
                .args([&pa, &pb])
                .arg("--base")
                .arg(&pc)
                .arg("-o")
                .arg(&out)
                .args(["-t", "0.5", "-q"])));
            // Alternating, so that both see the same page cache.
            settle(&out);
            cp.push(run(Command::new("cp")
                .arg("--reflink=never")
                .arg(&pa)
                .arg(&out)));
            // The cost of durability: the merge syncs its output before the rename, as `cp`
            // followed by `sync` of the file does.
            settle(&out);
            cp_sync.push(run(Command::new("sh")
                .arg("-c")
                .arg("cp --reflink=never \"$0\" \"$1\" && sync \"$1\"")
                .arg(&pa)
                .arg(&out)));
            settle(&out);
            merge.push(run(Command::new(env!("CARGO_BIN_EXE_burn-slerp"))
                .arg("merge")
                .arg(&pa)
                .arg(&pb)
                .arg("-o")
                .arg(&out)
                .args(["-t", "0.5", "-q"])));
        }
        let pick = |v: &[(f64, f64, f64, u64)], k: usize| -> f64 {
            median(v.iter().map(|r| [r.0, r.1, r.2, r.3 as f64][k]).collect())
        };
        let (wall, user, system) = (pick(&merge, 0), pick(&merge, 1), pick(&merge, 2));
        let peak = merge.iter().map(|r| r.3).max().unwrap_or(0);
        let cp_wall = pick(&cp, 0);
        let file = std::fs::metadata(&pa).unwrap().len();
        println!(
            "files gpt2_small: burn-slerp merge wall {wall:.3} s (user {user:.3} s, system \
             {system:.3} s, system / wall {:.2}); cp --reflink=never {cp_wall:.3} s (system \
             {:.3} s); merge / cp {:.2}; peak anonymous {:.1} MB (largest tensor {:.1} MB in \
             f32; 3x + 64 MB = {:.1} MB); file {:.1} MB",
            system / wall,
            pick(&cp, 2),
            wall / cp_wall,
            peak as f64 / 1e6,
            largest_bytes as f64 / 1e6,
            (3 * largest_bytes + 64_000_000) as f64 / 1e6,
            file as f64 / 1e6
        );
        println!(
            "files gpt2_small: durability: cp --reflink=never + sync {:.3} s; merge (synced) / \
             (cp + sync) {:.2}",
            pick(&cp_sync, 0),
            wall / pick(&cp_sync, 0)
        );
        let peak_of = |v: &[(f64, f64, f64, u64)]| v.iter().map(|r| r.3).max().unwrap_or(0);
        println!(
            "files gpt2_small: burn-slerp mean of 3 wall {:.3} s, peak anonymous {:.1} MB; \
             merge --base wall {:.3} s, peak anonymous {:.1} MB; mean / merge {:.2}, --base / \
             merge {:.2}",
            pick(&mean, 0),
            peak_of(&mean) as f64 / 1e6,
            pick(&base, 0),
            peak_of(&base) as f64 / 1e6,
            pick(&mean, 0) / wall,
            pick(&base, 0) / wall
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The 7B scale: two Llama-2-7B-shaped bf16 model folders written beforehand by
/// `cargo run --release --features cli --example llama_checkpoints -- DIR`, merged with
/// `burn-slerp merge` and with `burn-slerp yaml` into `DIR/out`, each run after the inputs'
/// pages are dropped from the page cache (`posix_fadvise(DONTNEED)` per file), against
/// `cat A/* B/* > /dev/null; cat A/* > OUT` (a plain read of both inputs and a write of one, no
/// `copy_file_range`) in the same run; peak anonymous memory sampled every millisecond; the
/// output checked against an f64 reference on a sample of tensors.
///
/// Usage: `BENCH_ONLY=scale BENCH_SCALE_DIR=DIR cargo bench --bench merge --features cli`.
#[cfg(feature = "cli")]
mod scale {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use half::bf16;
    use safetensors::SafeTensors;

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Drops the pages of every file in `dirs` from the page cache.
    fn drop_cache(dirs: &[&Path]) {
        let _ = Command::new("sync").status();
        for dir in dirs {
            for file in files(dir) {
                let handle = std::fs::File::open(&file).unwrap();
                // SAFETY: posix_fadvise on an open descriptor, over the whole file.
                unsafe {
                    use std::os::fd::AsRawFd;
                    libc::posix_fadvise(handle.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }

    fn remove(out: &Path) {
        let _ = std::fs::remove_dir_all(out);
        let _ = std::fs::remove_file(out);
        let _ = Command::new("sync").status();
    }

    /// The values of a bf16 tensor of a sharded folder.
    fn tensor(dir: &Path, name: &str) -> Vec<f64> {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let file = dir.join(index["weight_map"][name].as_str().unwrap());
        let handle = std::fs::File::open(file).unwrap();
        // SAFETY: a read-only map of a file nothing writes while the bench runs.
        let map = unsafe { memmap2::Mmap::map(&handle) }.unwrap();
        let st = SafeTensors::deserialize(&map).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect()
    }

    /// Whole-tensor SLERP of `a` and `b` at `t`, in f64 (the angle from the chord lengths).
    fn reference(a: &[f64], b: &[f64], t: f64) -> Vec<f64> {
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (mut minus, mut plus) = (0.0, 0.0);
        for (x, y) in a.iter().zip(b) {
            minus += (x / na - y / nb).powi(2);
            plus += (x / na + y / nb).powi(2);
        }
        let theta = 2.0 * minus.sqrt().atan2(plus.sqrt());
        let (c0, c1) = if theta == 0.0 {
            (1.0 - t, t)
        } else {
            (
                ((1.0 - t) * theta).sin() / theta.sin(),
                (t * theta).sin() / theta.sin(),
            )
        };
        a.iter().zip(b).map(|(x, y)| c0 * x + c1 * y).collect()
    }

    /// The largest difference between `out` and the reference, in bf16 units of the reference.
    fn check(dir: &Path, out: &Path, name: &str) -> f64 {
        let (a, b, got) = (
            tensor(&dir.join("a"), name),
            tensor(&dir.join("b"), name),
            tensor(out, name),
        );
        let want = reference(&a, &b, 0.5);
        got.iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / (w.abs() / 256.0).max(1e-30))
            .fold(0.0, f64::max)
    }

    pub fn figures() {
        let Ok(dir) = std::env::var("BENCH_SCALE_DIR") else {
            println!(
                "scale: set BENCH_SCALE_DIR to a folder written by the llama_checkpoints example"
            );
            return;
        };
        let dir = PathBuf::from(dir);
        let (a, b, out) = (dir.join("a"), dir.join("b"), dir.join("out"));
        let bytes: u64 = files(&a)
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        let recipe = dir.join("recipe.yml");
        std::fs::write(
            &recipe,
            format!(
                "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n\
                 parameters:\n  t: 0.5\ndtype: bfloat16\n",
                a.display(),
                a.display(),
                b.display()
            ),
        )
        .unwrap();
        let cli = || Command::new(env!("CARGO_BIN_EXE_burn-slerp"));
        remove(&out);
        drop_cache(&[&a, &b]);
        let cat = format!(
            "cat {a}/* {b}/* > /dev/null && mkdir -p {o} && cat {a}/*.safetensors > {o}/all && sync {o}/all",
            a = a.display(),
            b = b.display(),
            o = out.display()
        );
        let baseline = super::files::run(Command::new("sh").arg("-c").arg(&cat));
        remove(&out);
        drop_cache(&[&a, &b]);
        let merge = super::files::run(
            cli()
                .arg("merge")
                .args([&a, &b])
                .arg("-o")
                .arg(&out)
                .args(["-t", "0.5", "-q"]),
        );
        let samples = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.31.mlp.down_proj.weight",
            "lm_head.weight",
        ];
        let worst = samples
            .iter()
            .filter(|n| !n.contains("31") || out.join("model-00002-of-00002.safetensors").exists())
            .map(|n| check(&dir, &out, n))
            .fold(0.0, f64::max);
        remove(&out);
        drop_cache(&[&a, &b]);
        let yaml = super::files::run(cli().arg("yaml").arg(&recipe).arg(&out).arg("-q"));
        remove(&out);
        let line = |what: &str, r: (f64, f64, f64, u64)| {
            println!(
                "scale {what}: wall {:.1} s (user {:.1} s, system {:.1} s), peak anonymous {:.1} \
                 MB; / baseline {:.2}",
                r.0,
                r.1,
                r.2,
                r.3 as f64 / 1e6,
                r.0 / baseline.0
            );
        };
        println!(
            "scale: {:.2} GB per model; baseline cat A/* B/* > /dev/null; cat A/* > OUT; sync: \
             {:.1} s ({:.0} MB/s over the bytes read and written)",
            bytes as f64 / 1e9,
            baseline.0,
            3.0 * bytes as f64 / baseline.0 / 1e6
        );
        line("burn-slerp merge", merge);
        line("burn-slerp yaml", yaml);
        println!(
            "scale: merge output against the f64 reference on {} tensors: largest error {worst:.3} \
             bf16 half-ulps (1 = rounding alone)",
            samples.len()
        );
    }
}

#[cfg(feature = "cli")]
fn bench_scale(_: &mut Criterion) {
    if std::env::var("BENCH_ONLY").is_ok_and(|o| o == "scale") {
        scale::figures();
    }
}

#[cfg(not(feature = "cli"))]
fn bench_scale(_: &mut Criterion) {}

#[cfg(feature = "cli")]
fn bench_files(_: &mut Criterion) {
    if !only("files") {
        return;
    }
    let device = Device::flex();
    let (a, b, c) = (
        gpt2_small(&device),
        gpt2_small(&device),
        gpt2_small(&device),
    );
    let largest = host_tensors(&a).iter().map(|t| t.len()).max().unwrap() as u64 * 4;
    files::figures(&a, &b, &c, largest);
}

#[cfg(not(feature = "cli"))]
fn bench_files(_: &mut Criterion) {}

criterion_group!(benches, bench_merge, bench_files, bench_scale);
criterion_main!(benches);
