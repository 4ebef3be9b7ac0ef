//! The device-independent test bodies. Each `pub fn case(device: &Device)` is stamped out once
//! per enabled backend by `tests/backends.rs`.
//!
//! Expected values come from an f64 reference written here (the classic
//! `sin((1−t)θ)/sin θ` form, with the angle computed from the normalised vectors element by
//! element) or from closed forms, never from the crate's own output.

use std::collections::BTreeMap;

pub mod family;
pub mod in_place;
pub mod recipes;
pub mod scratch;
pub use family::*;
pub use in_place::*;
pub use recipes::*;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::attention::{MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm,
    LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};
use burn_slerp::{
    Branch, Granularity, LerpReason, MergeError, Method, SlerpConfig, SlerpMerger, slerp,
    slerp_generic,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------

/// A transformer-ish block: attention, a norm and an MLP held in a tuple.
#[derive(Module, Debug)]
pub struct Block {
    pub attn: MultiHeadAttention,
    pub norm: LayerNorm,
    pub mlp: (Linear, Linear),
}

/// An enum module: the variant name becomes part of the path.
#[derive(Module, Debug)]
pub enum Head {
    Dense(Linear),
    Conv(Conv1d),
}

/// Every kind of field the derive supports, and the burn-nn layers the issue names.
#[derive(Module, Debug)]
pub struct Net {
    pub emb: Embedding,
    pub conv: Conv2d,
    pub conv1: Conv1d,
    pub bn: BatchNorm,
    pub blocks: Vec<Block>,
    pub extra: Option<Linear>,
    pub norms: [LayerNorm; 2],
    pub head: Head,
    pub dropout: Dropout,
    pub ids: Param<Tensor<1, Int>>,
    pub mask: Param<Tensor<1, Bool>>,
    pub width: usize,
}

pub fn net(device: &Device, seed: u64) -> Net {
    let d = 8;
    let block = || Block {
        attn: MultiHeadAttentionConfig::new(d, 2).init(device),
        norm: LayerNormConfig::new(d).init(device),
        mlp: (
            LinearConfig::new(d, 16).init(device),
            LinearConfig::new(16, d).init(device),
        ),
    };
    let net = Net {
        emb: EmbeddingConfig::new(12, d).init(device),
        conv: Conv2dConfig::new([3, 4], [3, 3]).init(device),
        conv1: Conv1dConfig::new(4, 4, 3).init(device),
        bn: BatchNormConfig::new(4).init(device),
        blocks: vec![block(), block()],
        extra: Some(LinearConfig::new(d, 3).init(device)),
        norms: [
            LayerNormConfig::new(d).init(device),
            LayerNormConfig::new(d).init(device),
        ],
        head: Head::Dense(LinearConfig::new(d, 5).init(device)),
        dropout: DropoutConfig::new(0.1).init(),
        ids: Param::initialized(
            ParamId::new(),
            Tensor::from_data(TensorData::from([seed as i64, 2, 3]), device),
        ),
        mask: Param::initialized(
            ParamId::new(),
            Tensor::from_data(TensorData::from([seed.is_multiple_of(2), true]), device),
        ),
        width: 42,
    };
    randomize(net, seed)
}

/// Replaces every float parameter (BatchNorm running statistics included) with values from a
/// seeded host RNG, so that every backend sees the same numbers. Normal-ish values from a
/// uniform sum; LayerNorm-style all-ones and all-zero tensors are kept for some paths so the
/// colinear and zero-norm rows of the table are exercised by whole-model merges too.
pub fn randomize<M: Module>(module: M, seed: u64) -> M {
    struct Randomize {
        rng: ChaCha8Rng,
        path: Vec<String>,
    }
    impl ModuleMapper for Randomize {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            let keep = path.ends_with("norms.1.beta") || path.ends_with("norms.1.gamma");
            let rng = &mut self.rng;
            param.map(|t| {
                if keep {
                    return t;
                }
                let shape = t.dims();
                let n = shape.iter().product();
                let values = normal(rng, n);
                Tensor::from_data(TensorData::new(values, shape), &t.device())
                    .set_require_grad(t.is_require_grad())
            })
        }
    }
    module.map(&mut Randomize {
        rng: ChaCha8Rng::seed_from_u64(seed),
        path: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            u * 1.7
        })
        .collect()
}

pub fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Path → (shape, values as f32 bits) of every float parameter.
pub fn dump<M: Module>(module: &M) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    #[derive(Default)]
    struct Dump {
        path: Vec<String>,
        out: BTreeMap<String, (Vec<usize>, Vec<u32>)>,
    }
    impl ModuleVisitor for Dump {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let shape = t.dims().to_vec();
            let bits = t.into_data().iter::<f32>().map(f32::to_bits).collect();
            self.out.insert(self.path.join("."), (shape, bits));
        }
    }
    let mut d = Dump::default();
    module.visit(&mut d);
    d.out
}

fn floats(bits: &[u32]) -> Vec<f64> {
    bits.iter().map(|b| f32::from_bits(*b) as f64).collect()
}

/// The independent f64 reference of one pair of vectors.
pub fn reference(a: &[f64], b: &[f64], t: f64, eps: f64, threshold: Option<f64>) -> Vec<f64> {
    let lerp = || -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| (1.0 - t) * x + t * y)
            .collect()
    };
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na <= eps || nb <= eps {
        return lerp();
    }
    let cos = (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (na * nb)).clamp(-1.0, 1.0);
    if threshold.is_some_and(|th| cos.abs() > th) || cos < -(1.0 - 5e-4) {
        return lerp();
    }
    let minus = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x / na - y / nb).powi(2))
        .sum::<f64>()
        .sqrt();
    let plus = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x / na + y / nb).powi(2))
        .sum::<f64>()
        .sqrt();
    let theta = 2.0 * minus.atan2(plus);
    if theta == 0.0 {
        return lerp();
    }
    let c0 = ((1.0 - t) * theta).sin() / theta.sin();
    let c1 = (t * theta).sin() / theta.sin();
    a.iter().zip(b).map(|(x, y)| c0 * x + c1 * y).collect()
}

/// Per-row reference: each slice along the first axis on its own.
pub fn reference_rows(a: &[f64], b: &[f64], rows: usize, t: f64) -> Vec<f64> {
    let cols = a.len() / rows;
    (0..rows)
        .flat_map(|r| {
            let s = r * cols..(r + 1) * cols;
            reference(&a[s.clone()], &b[s], t, 1e-8, None)
        })
        .collect()
}

/// `‖out − ref‖₂ / ‖ref‖₂`.
pub fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let err: f64 = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (*o as f64 - r).powi(2))
        .sum();
    let norm: f64 = reference.iter().map(|r| r * r).sum();
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn assert_finite(v: &[f32]) {
    assert!(v.iter().all(|x| x.is_finite()), "non-finite output");
}

fn merger(t: f64) -> SlerpMerger {
    SlerpMerger::new(SlerpConfig::new(t)).unwrap()
}

fn assert_same_bits(
    got: &BTreeMap<String, (Vec<usize>, Vec<u32>)>,
    want: &BTreeMap<String, (Vec<usize>, Vec<u32>)>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (path, (shape, bits)) in want {
        assert_eq!(&got[path].0, shape, "{path}");
        assert!(got[path].1 == *bits, "{path} differs bit for bit");
    }
}

// ---------------------------------------------------------------------------------------------
// Cases: t = 0 and t = 1, whole models, granularity
// ---------------------------------------------------------------------------------------------

pub fn t0_is_a_bit_exact(device: &Device) {
    let (a, b) = (with_negative_zero(net(device, 1)), net(device, 2));
    let merged = merger(0.0).merge(&a, &b).unwrap();
    assert_same_bits(&dump(&merged), &dump(&a));
}

pub fn t1_is_b_bit_exact(device: &Device) {
    let (a, b) = (net(device, 1), with_negative_zero(net(device, 2)));
    let merged = merger(1.0).merge(&a, &b).unwrap();
    assert_same_bits(&dump(&merged), &dump(&b));
    // Ids, int and bool params, flags and plain fields still come from `a`.
    assert_eq!(merged.emb.weight.id, a.emb.weight.id);
    assert_eq!(values_int(&merged.ids), vec![1, 2, 3]);
}

/// Puts a −0.0 into the first element of `conv1.bias`: the SLERP formula would turn it into
/// +0.0, so t = 0/1 must return the input itself.
fn with_negative_zero(mut net: Net) -> Net {
    let bias = net.conv1.bias.take().unwrap();
    let bias = bias.map(|t| {
        let mut v = values(t.clone());
        v[0] = -0.0;
        tensor(v, [4], &t.device())
    });
    net.conv1.bias = Some(bias);
    net
}

fn values_int(p: &Param<Tensor<1, Int>>) -> Vec<i64> {
    p.val().into_data().iter::<i64>().collect()
}

fn values_bool(p: &Param<Tensor<1, Bool>>) -> Vec<bool> {
    p.val().into_data().iter::<bool>().collect()
}

pub fn whole_model_matches_reference(device: &Device) {
    let (a, b) = (net(device, 3), net(device, 4));
    for t in [0.3, 0.5, 0.9] {
        let merged = merger(t).merge(&a, &b).unwrap();
        let (da, db, dm) = (dump(&a), dump(&b), dump(&merged));
        assert_eq!(dm.len(), da.len(), "every float parameter is merged");
        for (path, (_, bits)) in &dm {
            let got: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
            assert_finite(&got);
            let want = reference(&floats(&da[path].1), &floats(&db[path].1), t, 1e-8, None);
            let err = rel_l2(&got, &want);
            assert!(err <= 1e-6, "{path} at t={t}: relative error {err:e}");
        }
    }
}

pub fn row_granularity_matches_reference(device: &Device) {
    let (a, b) = (net(device, 5), net(device, 6));
    let config = SlerpConfig::new(0.35).with_granularity(Granularity::Row);
    let merged = SlerpMerger::new(config).unwrap().merge(&a, &b).unwrap();
    let (da, db, dm) = (dump(&a), dump(&b), dump(&merged));
    for (path, (shape, bits)) in &dm {
        let got: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let want = reference_rows(&floats(&da[path].1), &floats(&db[path].1), shape[0], 0.35);
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-6, "{path}: relative error {err:e}");
    }
    // A 1-D tensor in row mode is n one-element rows: exactly lerp.
    let (va, vb) = (floats(&da["bn.beta"].1), floats(&db["bn.beta"].1));
    let lerp: Vec<f64> = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| 0.65 * x + 0.35 * y)
        .collect();
    let got: Vec<f32> = dm["bn.beta"].1.iter().map(|b| f32::from_bits(*b)).collect();
    assert!(rel_l2(&got, &lerp) <= 1e-7);
    // And row mode differs from tensor mode on a 2-D weight (the angles are per row).
    let whole = merger(0.35).merge(&a, &b).unwrap();
    assert_ne!(dump(&whole)["emb.weight"].1, dm["emb.weight"].1);
}

pub fn lerp_method_is_linear(device: &Device) {
    let (a, b) = (net(device, 7), net(device, 8));
    let config = SlerpConfig::new(0.25).with_method(Method::Lerp);
    let merged = SlerpMerger::new(config).unwrap().merge(&a, &b).unwrap();
    let (da, db, dm) = (dump(&a), dump(&b), dump(&merged));
    for (path, (_, bits)) in &dm {
        let got: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let want: Vec<f64> = floats(&da[path].1)
            .iter()
            .zip(floats(&db[path].1))
            .map(|(x, y)| 0.75 * x + 0.25 * y)
            .collect();
        assert!(rel_l2(&got, &want) <= 1e-7, "{path}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cases: the rows of the numerics table, on single tensors
// ---------------------------------------------------------------------------------------------

fn pair(seed: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (normal(&mut rng, n), normal(&mut rng, n))
}

fn run(device: &Device, a: &[f32], b: &[f32], config: &SlerpConfig) -> Vec<f32> {
    let n = a.len();
    let out = slerp(
        tensor(a.to_vec(), [n], device),
        tensor(b.to_vec(), [n], device),
        config,
    )
    .unwrap();
    values(out)
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

fn lerp64(a: &[f32], b: &[f32], t: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| (1.0 - t) * *x as f64 + t * *y as f64)
        .collect()
}

pub fn orthogonal_pair_follows_the_circle(device: &Device) {
    // Closed form: a = e1, b = e2, out = (cos(tπ/2), sin(tπ/2)).
    for t in [0.1, 0.5, 0.8] {
        let out = run(device, &[1.0, 0.0], &[0.0, 1.0], &SlerpConfig::new(t));
        let angle = t * std::f64::consts::FRAC_PI_2;
        // A few f32 roundings: the coefficients are f32 in the end (computed in f64 on the
        // host for the CPU backends, in f32 on CubeCL devices).
        assert!(rel_l2(&out, &[angle.cos(), angle.sin()]) <= 4e-7, "{out:?}");
    }
}

pub fn zero_tensor_gives_lerp(device: &Device) {
    let (_, b) = pair(11, 1000);
    let zero = vec![0.0; 1000];
    for t in [0.3, 0.5] {
        let out = run(device, &zero, &b, &SlerpConfig::new(t));
        assert!(rel_l2(&out, &lerp64(&zero, &b, t)) <= 1e-7);
        // mergekit would give sin(tπ/2)·b (0.707·b at t = 0.5): not what we return.
        let out = run(device, &b, &zero, &SlerpConfig::new(t));
        assert!(rel_l2(&out, &lerp64(&b, &zero, t)) <= 1e-7);
        let both = run(device, &zero, &zero, &SlerpConfig::new(t));
        assert!(both.iter().all(|x| *x == 0.0));
    }
    // Below eps counts as zero; eps = 0 makes a tiny tensor a real direction again.
    let tiny: Vec<f32> = b.iter().map(|x| x * 1e-12).collect();
    let (_, c) = pair(12, 1000);
    let out = run(device, &tiny, &c, &SlerpConfig::new(0.5));
    assert!(rel_l2(&out, &lerp64(&tiny, &c, 0.5)) <= 1e-7);
    let out = run(device, &tiny, &c, &SlerpConfig::new(0.5).with_eps(0.0));
    let want = reference(&to64(&tiny), &to64(&c), 0.5, 0.0, None);
    assert!(rel_l2(&out, &want) <= 1e-6);
}

pub fn antiparallel_gives_lerp(device: &Device) {
    let (a, _) = pair(13, 1000);
    let b: Vec<f32> = a.iter().map(|x| -2.0 * x).collect();
    let out = run(device, &a, &b, &SlerpConfig::new(0.4));
    assert_finite(&out);
    // 0.6·a − 0.8·a cancels to −0.2·a: f32 rounding of the two terms shows at ~1e-7 of that.
    assert!(rel_l2(&out, &lerp64(&a, &b, 0.4)) <= 1e-6);
}

pub fn identical_and_colinear_give_lerp(device: &Device) {
    let (a, _) = pair(14, 1000);
    for t in [0.2, 0.5, 0.7] {
        let same = run(device, &a, &a, &SlerpConfig::new(t));
        assert!(rel_l2(&same, &to64(&a)) <= 1e-7, "identical");
        let scaled: Vec<f32> = a.iter().map(|x| 3.0 * x).collect();
        let out = run(device, &a, &scaled, &SlerpConfig::new(t));
        assert!(rel_l2(&out, &lerp64(&a, &scaled, t)) <= 1e-6, "colinear");
        // Same-sign scalars: the seed's NaN case.
        let out = run(device, &[2.0], &[5.0], &SlerpConfig::new(t));
        assert!(rel_l2(&out, &[2.0 * (1.0 - t) + 5.0 * t]) <= 1e-7);
        // Opposite-sign scalars: antiparallel, lerp (the seed gives values near 1e7).
        let out = run(device, &[2.0], &[-5.0], &SlerpConfig::new(t));
        assert!(rel_l2(&out, &[2.0 * (1.0 - t) - 5.0 * t]) <= 1e-7);
    }
}

pub fn small_angles_are_continuous(device: &Device) {
    // b = a rotated by a tiny angle: exact mode follows the reference without a jump, and
    // mergekit mode takes lerp (|cos| > 0.9995).
    let (a, c) = pair(15, 4096);
    for delta in [1e-2f32, 1e-3, 1e-4] {
        let b: Vec<f32> = a.iter().zip(&c).map(|(x, y)| x + delta * y).collect();
        let out = run(device, &a, &b, &SlerpConfig::new(0.5));
        let want = reference(&to64(&a), &to64(&b), 0.5, 1e-8, None);
        assert!(rel_l2(&out, &want) <= 1e-6, "delta {delta}");
        let mk = SlerpConfig::new(0.5).with_dot_threshold(Some(0.9995));
        let out = run(device, &a, &b, &mk);
        assert!(
            rel_l2(&out, &lerp64(&a, &b, 0.5)) <= 1e-7,
            "mergekit delta {delta}"
        );
    }
    // Far from parallel, mergekit mode equals exact SLERP.
    let out = run(
        device,
        &a,
        &c,
        &SlerpConfig::new(0.5).with_dot_threshold(Some(0.9995)),
    );
    let want = reference(&to64(&a), &to64(&c), 0.5, 1e-8, None);
    assert!(rel_l2(&out, &want) <= 1e-6);
}

pub fn huge_values_do_not_overflow(device: &Device) {
    let (a, b) = pair(16, 100_000);
    let a: Vec<f32> = a.iter().map(|x| x * 1e18).collect();
    let b: Vec<f32> = b.iter().map(|x| x * 1e18).collect();
    let out = run(device, &a, &b, &SlerpConfig::new(0.3));
    assert_finite(&out);
    let want = reference(&to64(&a), &to64(&b), 0.3, 1e-8, None);
    assert!(rel_l2(&out, &want) <= 1e-6);
    // Squares beyond f32's range (|x| > 1.8e19) are still no overflow.
    let (c, d) = pair(24, 10_000);
    let c: Vec<f32> = c.iter().map(|x| x * 1e25).collect();
    let d: Vec<f32> = d.iter().map(|x| x * 1e25).collect();
    for granularity in [Granularity::Tensor, Granularity::Row] {
        let config = SlerpConfig::new(0.3).with_granularity(granularity);
        let out = values(
            slerp(
                tensor(c.clone(), [100, 100], device),
                tensor(d.clone(), [100, 100], device),
                &config,
            )
            .unwrap(),
        );
        assert_finite(&out);
        let want = match granularity {
            Granularity::Tensor => reference(&to64(&c), &to64(&d), 0.3, 1e-8, None),
            Granularity::Row => reference_rows(&to64(&c), &to64(&d), 100, 0.3),
        };
        assert!(rel_l2(&out, &want) <= 1e-6, "{granularity:?}");
    }
    // And tiny ones do not underflow into the zero-norm branch: values near 1e-25, whose f32
    // squares (1e-50) are below even f32's subnormals, per tensor and per row.
    let (c, d) = pair(25, 10_000);
    let c: Vec<f32> = c.iter().map(|x| x * 1e-25).collect();
    let d: Vec<f32> = d.iter().map(|x| x * 1e-25).collect();
    assert!(c.iter().all(|x| x.is_normal() || *x == 0.0));
    assert!(c.iter().all(|x| x * x < 1e-45));
    for granularity in [Granularity::Tensor, Granularity::Row] {
        let config = SlerpConfig::new(0.3)
            .with_eps(0.0)
            .with_granularity(granularity);
        let (ta, tb) = (
            tensor(c.clone(), [100, 100], device),
            tensor(d.clone(), [100, 100], device),
        );
        let (out, stats) = SlerpMerger::new(config.clone())
            .unwrap()
            .merge_with_stats(&Flat2::new(ta.clone()), &Flat2::new(tb.clone()))
            .unwrap();
        // eps = 0 here too: every row is interpolated spherically.
        let (c64, d64) = (to64(&c), to64(&d));
        let want: Vec<f64> = match granularity {
            Granularity::Tensor => reference(&c64, &d64, 0.3, 0.0, None),
            Granularity::Row => (0..100)
                .flat_map(|r| {
                    let s = r * 100..(r + 1) * 100;
                    reference(&c64[s.clone()], &d64[s], 0.3, 0.0, None)
                })
                .collect(),
        };
        let got = values(out.x.val());
        assert!(rel_l2(&got, &want) <= 1e-6, "{granularity:?}");
        // The norm itself, against f64: no digit lost to underflow.
        let norm = to64(&c).iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            (stats[0].norm_a / norm - 1.0).abs() < 1e-6,
            "{granularity:?}"
        );
        assert_ne!(stats[0].branch, Branch::Lerp(LerpReason::ZeroNorm));
    }
}

/// A module holding one 2-D float parameter.
#[derive(Module, Debug)]
pub struct Flat2 {
    pub x: Param<Tensor<2>>,
}

impl Flat2 {
    pub fn new(x: Tensor<2>) -> Self {
        Self {
            x: Param::from_tensor(x),
        }
    }
}

/// The accuracy bar: ≥ 1e7 elements, relative L2 error ≤ 1e-6 against the f64 reference, for
/// whole-tensor and per-row granularity.
pub fn accuracy_bar_at_ten_million(device: &Device) {
    let n = 10_000_000;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let a = normal(&mut rng, n);
    // Correlated, as fine-tunes are: cos ≈ 0.9.
    let b: Vec<f32> = a
        .iter()
        .zip(normal(&mut rng, n))
        .map(|(x, y)| x + 0.45 * y)
        .collect();
    let (a64, b64) = (to64(&a), to64(&b));
    let want = reference(&a64, &b64, 0.3, 1e-8, None);
    let out = run(device, &a, &b, &SlerpConfig::new(0.3));
    let err = rel_l2(&out, &want);
    println!("{device:?}: relative L2 error, tensor granularity: {err:.2e}");
    assert!(err <= 1e-6, "tensor granularity: {err:e}");
    // The generic tensor-op path, forced, holds the same bar.
    let generic = slerp_generic(
        tensor(a.clone(), [n], device),
        tensor(b.clone(), [n], device),
        &SlerpConfig::new(0.3),
    )
    .unwrap();
    let err = rel_l2(&values(generic), &want);
    println!("{device:?}: relative L2 error, generic path: {err:.2e}");
    assert!(err <= 1e-6, "generic path: {err:e}");

    let rows = 1000;
    let row = SlerpConfig::new(0.3).with_granularity(Granularity::Row);
    let out = slerp(
        tensor(a, [rows, n / rows], device),
        tensor(b, [rows, n / rows], device),
        &row,
    )
    .unwrap();
    let err = rel_l2(&values(out), &reference_rows(&a64, &b64, rows, 0.3));
    println!("{device:?}: relative L2 error, row granularity: {err:.2e}");
    assert!(err <= 1e-6, "row granularity: {err:e}");
}

/// Row shapes at the edges of the kernels' work split: more short rows than one grid axis
/// holds (65,535), rows of 1 to 3 elements, and long rows whose partial sums are folded more
/// than once. Each against the f64 reference, row by row. All values are positive, so every
/// pair of rows is less than 90° apart: short random rows are otherwise sometimes nearly
/// antiparallel, where `c0, c1 ~ 1/sin θ` and any f32 combine cancels digits away.
pub fn row_shapes_at_the_kernel_limits(device: &Device) {
    for (rows, cols) in [(70_000, 2), (4099, 3), (3, 300_001), (1, 1_000_003)] {
        let (a, b) = pair(29, rows * cols);
        let positive = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(f32::abs).collect() };
        let (a, b) = (positive(a), positive(b));
        let (a64, b64) = (to64(&a), to64(&b));
        let ta = tensor(a, [rows, cols], device);
        let tb = tensor(b, [rows, cols], device);
        let config = SlerpConfig::new(0.6).with_granularity(Granularity::Row);
        let out = values(slerp(ta.clone(), tb.clone(), &config).unwrap());
        let err = rel_l2(&out, &reference_rows(&a64, &b64, rows, 0.6));
        assert!(err <= 1e-6, "[{rows}, {cols}] rows: relative error {err:e}");
        let out = values(slerp(ta, tb, &SlerpConfig::new(0.6)).unwrap());
        let err = rel_l2(&out, &reference(&a64, &b64, 0.6, 1e-8, None));
        assert!(
            err <= 1e-6,
            "[{rows}, {cols}] whole: relative error {err:e}"
        );
    }
}

/// The fused kernels (where the backend has them) and the generic path agree, on contiguous
/// and on non-contiguous (transposed) inputs, for both granularities.
pub fn fused_and_generic_paths_agree(device: &Device) {
    let (a, b) = pair(23, 300 * 257);
    let (a64, b64) = (to64(&a), to64(&b));
    let ta = tensor(a, [300, 257], device);
    let tb = tensor(b, [300, 257], device);
    for granularity in [Granularity::Tensor, Granularity::Row] {
        for dot_threshold in [None, Some(0.9995)] {
            let config = SlerpConfig::new(0.45)
                .with_granularity(granularity)
                .with_dot_threshold(dot_threshold);
            let want = match granularity {
                Granularity::Tensor => reference(&a64, &b64, 0.45, 1e-8, dot_threshold),
                Granularity::Row => reference_rows(&a64, &b64, 300, 0.45),
            };
            let fused = values(slerp(ta.clone(), tb.clone(), &config).unwrap());
            let generic = values(slerp_generic(ta.clone(), tb.clone(), &config).unwrap());
            assert!(rel_l2(&fused, &want) <= 1e-6, "{granularity:?}");
            assert!(rel_l2(&generic, &want) <= 1e-6, "{granularity:?}");
            assert!(rel_l2(&fused, &to64(&generic)) <= 1e-6, "{granularity:?}");
        }
    }
    // Transposed views: rows of the view, not of the storage.
    let (at, bt) = (ta.swap_dims(0, 1), tb.swap_dims(0, 1));
    let host = |t: &Tensor<2>| to64(&values(t.clone()));
    let (at64, bt64) = (host(&at), host(&bt));
    let config = SlerpConfig::new(0.45).with_granularity(Granularity::Row);
    let fused = values(slerp(at.clone(), bt.clone(), &config).unwrap());
    assert!(rel_l2(&fused, &reference_rows(&at64, &bt64, 257, 0.45)) <= 1e-6);
    let whole = values(slerp(at, bt, &SlerpConfig::new(0.45)).unwrap());
    assert!(rel_l2(&whole, &reference(&at64, &bt64, 0.45, 1e-8, None)) <= 1e-6);
}

pub fn half_precision_is_f32_rounded_once(device: &Device) {
    for dtype in [FloatDType::F16, FloatDType::BF16] {
        if !device.supports_dtype(DType::from(dtype)) {
            // The backend cannot hold this dtype at all (ndarray has neither): nothing to merge.
            println!("{dtype:?} not supported on {device:?}");
            continue;
        }
        let (a, b) = pair(18, 3000);
        let a16 = tensor(a, [3, 1000], device).cast(dtype);
        let b16 = tensor(b, [3, 1000], device).cast(dtype);
        for granularity in [Granularity::Tensor, Granularity::Row] {
            let config = SlerpConfig::new(0.3).with_granularity(granularity);
            let out = slerp(a16.clone(), b16.clone(), &config).unwrap();
            assert_eq!(out.dtype(), DType::from(dtype));
            let via32 = slerp(
                a16.clone().cast(FloatDType::F32),
                b16.clone().cast(FloatDType::F32),
                &config,
            )
            .unwrap()
            .cast(dtype);
            let got: Vec<f32> = out.into_data().iter::<f32>().collect();
            let want: Vec<f32> = via32.into_data().iter::<f32>().collect();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dtype:?} {granularity:?}"
            );
        }
    }
}

pub fn f64_tensors_are_computed_in_f64(device: &Device) {
    if !device.supports_dtype(DType::F64) {
        println!("f64 not supported on {device:?}");
        return;
    }
    let (a, b) = pair(19, 5000);
    let want = reference(&to64(&a), &to64(&b), 0.6, 1e-8, None);
    let a = tensor(a, [5000], device).cast(FloatDType::F64);
    let b = tensor(b, [5000], device).cast(FloatDType::F64);
    let out = slerp(a, b, &SlerpConfig::new(0.6)).unwrap();
    assert_eq!(out.dtype(), DType::F64);
    let got: Vec<f64> = out.into_data().iter::<f64>().collect();
    let err: f64 = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
        / want.iter().map(|y| y * y).sum::<f64>().sqrt();
    assert!(err <= 1e-13, "{err:e}");

    // Per row: the coefficient columns are f64 too, whatever the device's default float dtype.
    let (a, b) = pair(20, 16 * 257);
    let want = reference_rows(&to64(&a), &to64(&b), 16, 0.35);
    let a = tensor(a, [16, 257], device).cast(FloatDType::F64);
    let b = tensor(b, [16, 257], device).cast(FloatDType::F64);
    let row = SlerpConfig::new(0.35).with_granularity(Granularity::Row);
    for out in [
        slerp(a.clone(), b.clone(), &row).unwrap(),
        slerp_generic(a, b, &row).unwrap(),
    ] {
        assert_eq!(out.dtype(), DType::F64);
        let got: Vec<f64> = out.into_data().iter::<f64>().collect();
        let err = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt()
            / want.iter().map(|y| y * y).sum::<f64>().sqrt();
        assert!(err <= 1e-13, "rows: {err:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cases: errors
// ---------------------------------------------------------------------------------------------

pub fn invalid_t_is_error(device: &Device) {
    for t in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            SlerpMerger::new(SlerpConfig::new(t)),
            Err(MergeError::InvalidT { .. })
        ));
        let x = tensor(vec![1.0, 2.0], [2], device);
        assert!(matches!(
            slerp(x.clone(), x, &SlerpConfig::new(t)),
            Err(MergeError::InvalidT { .. })
        ));
    }
}

pub fn invalid_config_is_error(device: &Device) {
    let x = tensor(vec![1.0, 2.0], [2], device);
    let bad = SlerpConfig::new(0.5).with_eps(-1.0);
    assert!(matches!(
        SlerpMerger::new(bad.clone()),
        Err(MergeError::InvalidConfig { field: "eps", .. })
    ));
    assert!(matches!(
        slerp(x.clone(), x.clone(), &bad),
        Err(MergeError::InvalidConfig { field: "eps", .. })
    ));
    let bad = SlerpConfig::new(0.5).with_dot_threshold(Some(1.5));
    assert!(matches!(
        slerp(x.clone(), x, &bad),
        Err(MergeError::InvalidConfig {
            field: "dot_threshold",
            ..
        })
    ));
}

pub fn shape_mismatch_is_error(device: &Device) {
    let a = LinearConfig::new(2, 2).init(device);
    let b = LinearConfig::new(3, 3).init(device);
    let err = merger(0.5).merge(&a, &b).unwrap_err();
    assert!(
        matches!(&err, MergeError::ShapeMismatch { path, a, b }
            if path == "weight" && a == &vec![2, 2] && b == &vec![3, 3]),
        "{err}"
    );
}

/// `[2, 3]` against `[1, 3]` would broadcast in Burn's ops: still a mismatch.
pub fn broadcastable_shape_is_mismatch(device: &Device) {
    #[derive(Module, Debug)]
    struct One {
        w: Param<Tensor<2>>,
    }
    let a = One {
        w: Param::from_tensor(tensor(vec![1.0; 6], [2, 3], device)),
    };
    let b = One {
        w: Param::from_tensor(tensor(vec![1.0; 3], [1, 3], device)),
    };
    assert!(matches!(
        merger(0.5).merge(&a, &b),
        Err(MergeError::ShapeMismatch { path, .. }) if path == "w"
    ));
    assert!(matches!(
        slerp(a.w.val(), b.w.val(), &SlerpConfig::new(0.5)),
        Err(MergeError::ShapeMismatch { path, .. }) if path.is_empty()
    ));
}

pub fn missing_and_unexpected_params_are_errors(device: &Device) {
    let a = net(device, 1);
    let mut b = net(device, 2);
    b.extra = None;
    assert!(matches!(
        merger(0.5).merge(&a, &b),
        Err(MergeError::MissingParam { path }) if path == "extra.weight"
    ));
    assert!(matches!(
        merger(0.5).merge(&b, &a),
        Err(MergeError::UnexpectedParam { path }) if path == "extra.weight"
    ));
    // A different enum variant is a different set of paths.
    let mut c = net(device, 3);
    c.head = Head::Conv(Conv1dConfig::new(8, 5, 1).init(device));
    assert!(matches!(
        merger(0.5).merge(&a, &c),
        Err(MergeError::MissingParam { path }) if path == "head.Dense.weight"
    ));
}

/// A hand-written module whose parameter at path `x` is a float tensor or an int tensor.
#[derive(Clone, Debug)]
pub enum Shifty {
    Float(Param<Tensor<1>>),
    Int(Param<Tensor<1, Int>>),
}

impl Module for Shifty {
    fn collect_devices(&self, devices: Vec<Device>) -> Vec<Device> {
        match self {
            Shifty::Float(p) => p.collect_devices(devices),
            Shifty::Int(p) => p.collect_devices(devices),
        }
    }
    fn fork(self, device: &Device) -> Self {
        self.to_device(device)
    }
    fn to_device(self, device: &Device) -> Self {
        match self {
            Shifty::Float(p) => Shifty::Float(p.to_device(device)),
            Shifty::Int(p) => Shifty::Int(p.to_device(device)),
        }
    }
    fn train(self) -> Self {
        self
    }
    fn valid(&self) -> Self {
        self.clone()
    }
    fn materialize(self) -> Self {
        self
    }
    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module("x", "Enum:Shifty");
        match self {
            Shifty::Float(p) => visitor.visit_float(p),
            Shifty::Int(p) => visitor.visit_int(p),
        }
        visitor.exit_module("x", "Enum:Shifty");
    }
    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        mapper.enter_module("x", "Enum:Shifty");
        let out = match self {
            Shifty::Float(p) => Shifty::Float(mapper.map_float(p)),
            Shifty::Int(p) => Shifty::Int(mapper.map_int(p)),
        };
        mapper.exit_module("x", "Enum:Shifty");
        out
    }
}

impl burn::module::ModuleDisplayDefault for Shifty {
    fn content(&self, content: burn::module::Content) -> Option<burn::module::Content> {
        Some(content)
    }
}
impl burn::module::ModuleDisplay for Shifty {}

pub fn kind_mismatch_is_error(device: &Device) {
    let a = Shifty::Float(Param::from_tensor(tensor(vec![1.0, 2.0], [2], device)));
    let b = Shifty::Int(Param::initialized(
        ParamId::new(),
        Tensor::from_data(TensorData::from([1i64, 2]), device),
    ));
    assert!(matches!(
        merger(0.5).merge(&a, &b),
        Err(MergeError::KindMismatch { path, a: "float", b: "int" }) if path == "x"
    ));
    // Same kind: the hand-written module merges like a derived one.
    let c = Shifty::Float(Param::from_tensor(tensor(vec![3.0, -1.0], [2], device)));
    let Shifty::Float(p) = merger(0.5).merge(&a, &c).unwrap() else {
        panic!("variant changed")
    };
    let want = reference(&[1.0, 2.0], &[3.0, -1.0], 0.5, 1e-8, None);
    assert!(rel_l2(&values(p.val()), &want) <= 1e-7);
}

/// A hand-written module that reports its two float parameters at one path, `x`.
#[derive(Clone, Debug)]
pub struct Twice {
    pub first: Param<Tensor<1>>,
    pub second: Param<Tensor<1>>,
}

impl Module for Twice {
    fn collect_devices(&self, devices: Vec<Device>) -> Vec<Device> {
        self.second
            .collect_devices(self.first.collect_devices(devices))
    }
    fn fork(self, device: &Device) -> Self {
        self.to_device(device)
    }
    fn to_device(self, device: &Device) -> Self {
        Twice {
            first: self.first.to_device(device),
            second: self.second.to_device(device),
        }
    }
    fn train(self) -> Self {
        self
    }
    fn valid(&self) -> Self {
        self.clone()
    }
    fn materialize(self) -> Self {
        self
    }
    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        for p in [&self.first, &self.second] {
            visitor.enter_module("x", "Struct:Twice");
            visitor.visit_float(p);
            visitor.exit_module("x", "Struct:Twice");
        }
    }
    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let mut one = |p| {
            mapper.enter_module("x", "Struct:Twice");
            let p = mapper.map_float(p);
            mapper.exit_module("x", "Struct:Twice");
            p
        };
        let first = one(self.first);
        let second = one(self.second);
        Twice { first, second }
    }
}

impl burn::module::ModuleDisplayDefault for Twice {
    fn content(&self, content: burn::module::Content) -> Option<burn::module::Content> {
        Some(content)
    }
}
impl burn::module::ModuleDisplay for Twice {}

/// Two parameters at one path cannot be paired: refused, naming the path and the model.
pub fn duplicate_paths_are_errors(device: &Device) {
    let twice = |x: f32, y: f32| Twice {
        first: Param::from_tensor(tensor(vec![x, 1.0], [2], device)),
        second: Param::from_tensor(tensor(vec![y, 2.0], [2], device)),
    };
    let (a, b) = (twice(1.0, 2.0), twice(3.0, 4.0));
    for (x, y, model) in [(&a, &b, "a"), (&b, &a, "a")] {
        let err = merger(0.5).merge(x, y).unwrap_err();
        assert!(
            matches!(&err, MergeError::DuplicateParam { path, model: m } if path == "x" && m == model),
            "{err}"
        );
        assert_eq!(err.to_string(), "parameter `x` appears twice in model a");
        assert!(matches!(
            merger(0.5).plan(x, y),
            Err(MergeError::DuplicateParam { .. })
        ));
    }
    // The mean names models by their index.
    let mean = burn_slerp::SphericalMean::new(vec![1.0, 1.0, 1.0]).unwrap();
    assert!(matches!(
        mean.merge(&[&a, &a, &b]),
        Err(MergeError::DuplicateParam { model, .. }) if model == "0"
    ));
}

pub fn non_finite_is_error(device: &Device) {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let a = net(device, 1);
        let mut b = net(device, 2);
        let w = b.blocks[1].mlp.0.weight.val();
        let mut v = values(w.clone());
        v[5] = bad;
        b.blocks[1].mlp.0.weight = Param::from_tensor(tensor(v, w.dims(), device));
        let before = (dump(&a), dump(&b));
        let err = merger(0.5).merge(&a, &b).unwrap_err();
        assert!(
            matches!(&err, MergeError::NonFinite { path } if path == "blocks.1.mlp.0.weight"),
            "{err}"
        );
        assert_same_bits(&dump(&a), &before.0);
        assert_same_bits(&dump(&b), &before.1);
        // Also in `a`, and through the free function.
        assert!(matches!(
            merger(0.5).merge(&b, &a),
            Err(MergeError::NonFinite { path }) if path == "blocks.1.mlp.0.weight"
        ));
        let x = tensor(vec![1.0, bad, 2.0], [3], device);
        let y = tensor(vec![1.0, 2.0, 3.0], [3], device);
        for granularity in [Granularity::Tensor, Granularity::Row] {
            let config = SlerpConfig::new(0.5).with_granularity(granularity);
            assert!(matches!(
                slerp(x.clone(), y.clone(), &config),
                Err(MergeError::NonFinite { .. })
            ));
        }
        let rows = tensor(vec![1.0, 2.0, bad, 4.0], [2, 2], device);
        let other = tensor(vec![1.0, 2.0, 3.0, 4.0], [2, 2], device);
        let row = SlerpConfig::new(0.5).with_granularity(Granularity::Row);
        assert!(matches!(
            slerp(other, rows, &row),
            Err(MergeError::NonFinite { .. })
        ));
    }
    // t = 0 and t = 1 return an input without looking at the values.
    let x = tensor(vec![f32::NAN, 1.0], [2], device);
    let y = tensor(vec![1.0, 1.0], [2], device);
    assert!(slerp(x.clone(), y.clone(), &SlerpConfig::new(0.0)).is_ok());
    assert!(slerp(x, y, &SlerpConfig::new(1.0)).is_ok());
}

/// A device of another backend than `device`, for the device-mismatch case.
#[allow(deprecated)] // Device::ndarray() is deprecated upstream; it is only the "other" device
fn other_device(device: &Device) -> Device {
    if *device == Device::flex() {
        Device::ndarray()
    } else {
        Device::flex()
    }
}

pub fn device_mismatch_is_error(device: &Device) {
    let other = other_device(device);
    let a = LinearConfig::new(3, 2).init(device);
    let b = LinearConfig::new(3, 2).init(&other);
    let err = merger(0.5).merge(&a, &b).unwrap_err();
    assert!(
        matches!(&err, MergeError::DeviceMismatch { path, a, b }
            if path == "weight" && **a == *device && **b == other),
        "{err}"
    );
    assert!(matches!(
        slerp(a.weight.val(), b.weight.val(), &SlerpConfig::new(0.5)),
        Err(MergeError::DeviceMismatch { .. })
    ));
}

pub fn error_messages_name_the_parameter(device: &Device) {
    let a = LinearConfig::new(2, 2).init(device);
    let b = LinearConfig::new(2, 3).init(device);
    let msg = merger(0.5).merge(&a, &b).unwrap_err().to_string();
    assert_eq!(
        msg,
        "shape mismatch in parameter `weight`: a has shape [2, 2], b has shape [2, 3]"
    );
}

// ---------------------------------------------------------------------------------------------
// Cases: what merge keeps and what it must not touch
// ---------------------------------------------------------------------------------------------

/// BatchNorm running statistics are shared between clones and `Module::map` writes them in
/// place: merging must leave `a`, `b` and their clones bit-identical.
pub fn inputs_are_unchanged(device: &Device) {
    let a = net(device, 21);
    let b = net(device, 22);
    let (a_clone, b_clone) = (a.clone(), b.clone());
    let (before_a, before_b) = (dump(&a), dump(&b));
    let (ids_a, mask_a) = (values_int(&a.ids), values_bool(&a.mask));
    for t in [0.0, 0.4, 1.0] {
        let merged = merger(t).merge(&a, &b).unwrap();
        // The merged running stats really differ from a's, so aliasing would show.
        if t == 0.4 {
            assert_ne!(
                dump(&merged)["bn.running_mean"],
                before_a["bn.running_mean"]
            );
        }
        drop(merged);
    }
    for module in [&a, &a_clone] {
        assert_same_bits(&dump(module), &before_a);
    }
    for module in [&b, &b_clone] {
        assert_same_bits(&dump(module), &before_b);
    }
    assert!(a.bn.training.val().is_enabled() && b.bn.training.val().is_enabled());
    assert_eq!(values_int(&a.ids), ids_a);
    assert_eq!(values_bool(&a.mask), mask_a);
}

pub fn discrete_params_and_flags_come_from_a(device: &Device) {
    let a = net(device, 31).valid(); // BatchNorm and Dropout flags off in a
    let b = net(device, 32);
    assert!(b.bn.training.val().is_enabled());
    let merged = merger(0.5).merge(&a, &b).unwrap();
    assert_eq!(values_int(&merged.ids), vec![31, 2, 3]);
    assert_eq!(values_bool(&merged.mask), vec![false, true]);
    assert_eq!(merged.ids.id, a.ids.id);
    assert!(!merged.bn.training.val().is_enabled());
    assert!(!merged.dropout.training.val().is_enabled());
    assert_eq!(merged.width, 42);
    // Every float param keeps a's id.
    assert_eq!(
        merged.blocks[1].attn.query.weight.id,
        a.blocks[1].attn.query.weight.id
    );
    assert_eq!(merged.bn.gamma.id, a.bn.gamma.id);
    // And stays on the device.
    assert_eq!(merged.devices(), vec![device.clone()]);
}

pub fn autodiff_params_are_fresh_leaves(device: &Device) {
    let ad = device.clone().autodiff();
    let a = LinearConfig::new(4, 3).init(&ad);
    let b = LinearConfig::new(4, 3).init(&ad);
    let a = randomize(a, 41);
    let b = randomize(b, 42);
    let merged = merger(0.5).merge(&a, &b).unwrap();
    assert!(merged.weight.val().is_autodiff());
    assert!(merged.weight.val().is_require_grad());
    // Gradients reach the merged leaves and nothing of a or b.
    let x = Tensor::<2>::ones([2, 4], &ad);
    let grads = merged.forward(x).sum().backward();
    assert!(merged.weight.grad(&grads).is_some());
    assert!(a.weight.grad(&grads).is_none());
    assert!(b.weight.grad(&grads).is_none());
    // Values equal those merged without autodiff.
    let inner = merger(0.5).merge(&a.valid(), &b.valid()).unwrap();
    assert_eq!(dump(&merged), dump(&inner));
    // A frozen `a` gives frozen merged params.
    let frozen = a.clone().no_grad();
    let merged = merger(0.5).merge(&frozen, &b).unwrap();
    assert!(!merged.weight.val().is_require_grad());
    // The free function: a fresh leaf with a's require-grad setting.
    let (ta, tb) = (a.weight.val(), b.weight.val());
    let out = slerp(ta, tb, &SlerpConfig::new(0.5)).unwrap();
    assert!(out.is_autodiff() && out.is_require_grad());
}

/// `merge_with_stats` reports norms, cosine, angle and branch per tensor, and per-row summaries.
pub fn stats_report_angles_and_branches(device: &Device) {
    #[derive(Module, Debug)]
    struct Two {
        w: Param<Tensor<2>>,
        z: Param<Tensor<1>>,
    }
    let two = |w: Vec<f32>, z: Vec<f32>| Two {
        w: Param::from_tensor(tensor(w, [3, 2], device)),
        z: Param::from_tensor(tensor(z, [2], device)),
    };
    // Rows: orthogonal (θ = π/2), identical (θ = 0), antiparallel (θ = π).
    let a = two(vec![1.0, 0.0, 2.0, 2.0, 1.0, 3.0], vec![0.0, 0.0]);
    let b = two(vec![0.0, 3.0, 2.0, 2.0, -2.0, -6.0], vec![1.0, 1.0]);
    let (merged, stats) = merger(0.5).merge_with_stats(&a, &b).unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].path, "w");
    // Whole-tensor values against an f64 computation.
    let (va, vb) = (
        [1.0f64, 0.0, 2.0, 2.0, 1.0, 3.0],
        [0.0f64, 3.0, 2.0, 2.0, -2.0, -6.0],
    );
    let na = va.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = vb.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos = va.iter().zip(&vb).map(|(x, y)| x * y).sum::<f64>() / (na * nb);
    let w = &stats[0];
    assert_eq!(w.numel, 6);
    // f64 sums on the CPU backends, scaled f32 blocks elsewhere: within 1e-6 either way.
    assert!((w.norm_a - na).abs() < 1e-6 * na && (w.norm_b - nb).abs() < 1e-6 * nb);
    assert!((w.cos.unwrap() - cos).abs() < 1e-6);
    assert!((w.theta.unwrap() - cos.acos()).abs() < 1e-6);
    assert_eq!(w.branch, Branch::Slerp);
    assert!(w.rows.is_none());
    assert_eq!(stats[1].path, "z");
    assert_eq!(stats[1].branch, Branch::Lerp(LerpReason::ZeroNorm));
    assert_eq!((stats[1].cos, stats[1].theta), (None, None));
    assert_eq!(values(merged.z.val()), vec![0.5, 0.5]);

    let row = SlerpMerger::new(SlerpConfig::new(0.5).with_granularity(Granularity::Row)).unwrap();
    let (_, stats) = row.merge_with_stats(&a, &b).unwrap();
    let rows = stats[0].rows.as_ref().unwrap();
    let pi = std::f64::consts::PI;
    assert_eq!(rows.count, 3);
    // Near 0 and π the angle is as exact as sqrt(1 ∓ cos): ~3e-4 rad with f32 sums.
    assert!(rows.theta_min.unwrap().abs() < 1e-3);
    assert!((rows.theta_median.unwrap() - pi / 2.0).abs() < 1e-6);
    assert!((rows.theta_max.unwrap() - pi).abs() < 1e-3);
    assert_eq!(
        (rows.slerp, rows.lerp_antiparallel, rows.lerp_zero_norm),
        (2, 1, 0)
    );
    // A 1-D tensor in row mode is lerp, reported as such.
    assert_eq!(stats[1].branch, Branch::Lerp(LerpReason::Method));

    // mergekit mode counts the near-parallel rows it lerps.
    let mk = SlerpConfig::new(0.5)
        .with_granularity(Granularity::Row)
        .with_dot_threshold(Some(0.9995));
    let (_, stats) = SlerpMerger::new(mk)
        .unwrap()
        .merge_with_stats(&a, &b)
        .unwrap();
    let rows = stats[0].rows.as_ref().unwrap();
    assert_eq!(
        (rows.slerp, rows.lerp_dot_threshold, rows.lerp_antiparallel),
        (1, 2, 0)
    );

    // t = 0 and t = 1 compute nothing.
    assert!(merger(0.0).merge_with_stats(&a, &b).unwrap().1.is_empty());
    // The statistics serialize for reports.
    let json = serde_json::to_string(&stats[0]).unwrap();
    assert!(json.contains("\"path\":\"w\""), "{json}");
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: 20,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

fn vectors() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, f64)> {
    (1usize..300).prop_flat_map(|n| {
        (
            prop::collection::vec(-100.0f32..100.0, n),
            prop::collection::vec(-100.0f32..100.0, n),
            0.0f64..=1.0,
        )
    })
}

pub fn swapping_inputs_mirrors_t(device: &Device) {
    runner()
        .run(&vectors(), |(a, b, t)| {
            let fwd = run(device, &a, &b, &SlerpConfig::new(t));
            let back = run(device, &b, &a, &SlerpConfig::new(1.0 - t));
            let err = rel_l2(&fwd, &to64(&back));
            prop_assert!(
                err <= 1e-6 || to64(&back).iter().all(|x| *x == 0.0),
                "{err:e}"
            );
            Ok(())
        })
        .unwrap();
}

pub fn results_stay_finite(device: &Device) {
    runner()
        .run(&vectors(), |(a, b, t)| {
            for granularity in [Granularity::Tensor, Granularity::Row] {
                let config = SlerpConfig::new(t).with_granularity(granularity);
                let out = run(device, &a, &b, &config);
                prop_assert!(out.iter().all(|x| x.is_finite()));
            }
            Ok(())
        })
        .unwrap();
}

/// The angle between the result and `a` grows with t (and the one to `b` shrinks).
pub fn angle_to_a_grows_with_t(device: &Device) {
    let angle = |x: &[f32], y: &[f32]| -> f64 {
        let (x, y) = (to64(x), to64(y));
        let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        let minus = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p / nx - q / ny).powi(2))
            .sum::<f64>();
        let plus = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p / nx + q / ny).powi(2))
            .sum::<f64>();
        2.0 * minus.sqrt().atan2(plus.sqrt())
    };
    let strategy = (2usize..200).prop_flat_map(|n| {
        (
            prop::collection::vec(-10.0f32..10.0, n),
            prop::collection::vec(-10.0f32..10.0, n),
        )
    });
    runner()
        .run(&strategy, |(a, b)| {
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            prop_assume!(norm(&a) > 1e-3 && norm(&b) > 1e-3);
            prop_assume!(angle(&a, &b) < std::f64::consts::PI - 0.1);
            let mut last = -1.0;
            for step in 1..10 {
                let t = step as f64 / 10.0;
                let out = run(device, &a, &b, &SlerpConfig::new(t));
                let theta = angle(&a, &out);
                prop_assert!(theta > last - 1e-6, "t={t}: {theta} after {last}");
                last = theta;
            }
            Ok(())
        })
        .unwrap();
}
