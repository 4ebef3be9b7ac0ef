//! Merge benchmarks: a whole model with GPT-2-small shapes (124,439,808 f32 parameters in 148
//! tensors) and one 4096×4096 pair, on every backend this build enables.
//!
//! Usage: cargo bench --bench merge [--features ndarray,wgpu]

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use burn_slerp::{SlerpConfig, SlerpMerger, slerp};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

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

fn gpt2_small(device: &Device) -> Gpt2Small {
    let d = 768;
    let model = Gpt2Small {
        wte: EmbeddingConfig::new(50257, d).init(device),
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

fn bench_merge(c: &mut Criterion) {
    let merger = SlerpMerger::new(SlerpConfig::new(0.5)).unwrap();
    for (name, device) in devices() {
        let (a, b) = (gpt2_small(&device), gpt2_small(&device));
        let params = a.num_params() as u64;
        assert_eq!(params, 124_439_808);
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
    }
}

criterion_group!(benches, bench_merge);
criterion_main!(benches);
