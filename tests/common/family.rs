//! The SLERP family beyond two models: every mean method against its formula evaluated in f64
//! on the vectors themselves (written here, not taken from the crate), fine-tunes with nearly
//! singular Gram matrices, task vectors close to their base, the documented fallbacks and
//! errors, mixed dtypes, the consuming form and the control.

use std::sync::atomic::AtomicBool;

use burn::tensor::{DType, Device, Tensor};
use burn_slerp::{
    Branch, LerpReason, MeanMethod, MergeControl, MergeError, Schedule, SlerpConfig, SlerpMerger,
    SphericalMean,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Net, dump, net, normal, rel_l2, tensor, values};

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = norm(v);
    v.iter().map(|x| x / n).collect()
}

/// `Σ cᵢ·xᵢ`.
fn weighted(xs: &[Vec<f64>], c: &[f64]) -> Vec<f64> {
    (0..xs[0].len())
        .map(|e| xs.iter().zip(c).map(|(x, c)| c * x[e]).sum())
        .collect()
}

/// The weighted Karcher mean iterated on the vectors, in f64: Riemannian gradient steps from
/// the normalised weighted mean until the step is below 1e-15 or stops shrinking (or 50
/// steps), times the
/// weighted mean of the norms. With `equal_mergekit`, mergekit 0.1.5's loop instead: equal
/// weights, inputs of norm ≤ tol dropped, θ < tol skipped, stop below tol, at most `max_iter`.
pub fn karcher64(xs: &[Vec<f64>], w: &[f64], mergekit: Option<(usize, f64)>) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    let w: Vec<f64> = w.iter().map(|x| x / total).collect();
    let n = xs[0].len();
    let keep: Vec<usize> = (0..xs.len())
        .filter(|i| mergekit.is_none_or(|(_, tol)| norm(&xs[*i]) > tol))
        .collect();
    let units: Vec<Vec<f64>> = keep.iter().map(|i| unit(&xs[*i])).collect();
    let alphas: Vec<f64> = match mergekit {
        Some(_) => vec![1.0 / keep.len() as f64; keep.len()],
        None => keep.iter().map(|i| w[*i]).collect(),
    };
    let mut m = unit(&weighted(&units, &alphas));
    let (steps, tol) = mergekit.unwrap_or((50, 0.0));
    let mut previous = f64::INFINITY;
    for _ in 0..steps {
        let mut v = vec![0.0; n];
        for (u, a) in units.iter().zip(&alphas) {
            let c = dot(&m, u).clamp(-1.0, 1.0);
            let theta = c.acos();
            if mergekit.is_some() && theta < tol {
                continue;
            }
            let f = if theta == 0.0 {
                1.0
            } else {
                theta / theta.sin()
            };
            for e in 0..n {
                v[e] += a * f * (u[e] - c * m[e]);
            }
        }
        let s = norm(&v);
        // mergekit stops below its tol; the exact iteration once f64 has nothing more to give.
        if s < tol.max(1e-15) || (mergekit.is_none() && s >= previous) {
            break;
        }
        previous = s;
        for e in 0..n {
            m[e] = s.cos() * m[e] + s.sin() / s * v[e];
        }
        m = unit(&m);
    }
    let scale: f64 = match mergekit {
        Some(_) => xs.iter().map(|x| norm(x) / xs.len() as f64).sum(),
        None => xs.iter().zip(&w).map(|(x, w)| w * norm(x)).sum(),
    };
    m.iter().map(|x| x * scale).collect()
}

/// mergekit 0.1.5's `multislerp`, step by step as it is written (tangent projection and
/// exponential map included), in f64.
pub fn multislerp64(xs: &[Vec<f64>], w: &[f64], normalize: bool, eps: f64) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    let w: Vec<f64> = w
        .iter()
        .map(|x| if normalize { x / total } else { *x })
        .collect();
    let norms: Vec<f64> = xs.iter().map(|x| norm(x)).collect();
    let units: Vec<Vec<f64>> = xs
        .iter()
        .zip(&norms)
        .map(|(x, n)| x.iter().map(|v| v / (n + eps)).collect())
        .collect();
    let mean = weighted(&units, &w);
    let m = unit(&mean);
    let tangents: Vec<Vec<f64>> = units
        .iter()
        .map(|u| {
            let d = dot(u, &m);
            u.iter().zip(&m).map(|(a, b)| a - d * b).collect()
        })
        .collect();
    let t = weighted(&tangents, &w);
    let tn = norm(&t) + eps;
    let avg: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum();
    m.iter()
        .zip(&t)
        .map(|(m, t)| (m * tn.cos() + t * tn.sin() / tn) * avg)
        .collect()
}

/// mergekit 0.1.5's `nuslerp` (flattened), in f64.
pub fn nuslerp64(x0: &[f64], x1: &[f64], t: f64) -> Vec<f64> {
    let (n0, n1) = (norm(x0).max(1e-7), norm(x1).max(1e-7));
    let cos = (dot(x0, x1) / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return x0
            .iter()
            .zip(x1)
            .map(|(a, b)| (1.0 - t) * a + t * b)
            .collect();
    }
    let th = cos.acos();
    let s = th.sin();
    x0.iter()
        .zip(x1)
        .map(|(a, b)| ((1.0 - t) * th).sin() / s * a + (t * th).sin() / s * b)
        .collect()
}

fn mean_of(device: &Device, xs: &[Vec<f32>], mean: &SphericalMean) -> Vec<f32> {
    let n = xs[0].len();
    let tensors = xs.iter().map(|x| tensor(x.clone(), [n], device)).collect();
    values(mean.mean(tensors).unwrap().0)
}

/// Every method of the family, for two, three, eight and twelve inputs, against its formula in
/// f64.
pub fn mean_methods_match_their_formulas(device: &Device) {
    let n = 20_000;
    let mut rng = ChaCha8Rng::seed_from_u64(70);
    // Twelve: more than one pass of the CPU kernels takes, reduced in tiles.
    for k in [2, 3, 8, 12] {
        let xs: Vec<Vec<f32>> = (0..k).map(|_| normal(&mut rng, n)).collect();
        let x64: Vec<Vec<f64>> = xs.iter().map(|x| f64s(x)).collect();
        // Weights that do not sum to 1.
        let w: Vec<f64> = (0..k).map(|i| 0.5 + i as f64 * 0.75).collect();
        let new = || SphericalMean::new(w.clone()).unwrap();
        let cases: Vec<(&str, SphericalMean, Vec<f64>)> = vec![
            ("karcher", new(), karcher64(&x64, &w, None)),
            (
                "mergekit karcher",
                new().with_method(MeanMethod::MergekitKarcher {
                    max_iter: 10,
                    tol: 1e-5,
                }),
                karcher64(&x64, &w, Some((10, 1e-5))),
            ),
            (
                "multislerp",
                new().with_method(MeanMethod::Multislerp {
                    normalize_weights: true,
                    eps: 1e-8,
                }),
                multislerp64(&x64, &w, true, 1e-8),
            ),
            (
                "multislerp, raw weights",
                new().with_method(MeanMethod::Multislerp {
                    normalize_weights: false,
                    eps: 1e-8,
                }),
                multislerp64(&x64, &w, false, 1e-8),
            ),
            ("linear", new().with_method(MeanMethod::Linear), {
                let total: f64 = w.iter().sum();
                weighted(&x64, &w.iter().map(|v| v / total).collect::<Vec<_>>())
            }),
        ];
        for (name, mean, want) in cases {
            let err = rel_l2(&mean_of(device, &xs, &mean), &want);
            assert!(err <= 1e-6, "{name}, k = {k}: relative error {err:e}");
        }
        if k == 2 {
            let mean = new().with_method(MeanMethod::Nuslerp);
            let t = w[1] / (w[0] + w[1]);
            let err = rel_l2(
                &mean_of(device, &xs, &mean),
                &nuslerp64(&x64[0], &x64[1], t),
            );
            assert!(err <= 1e-6, "nuslerp: relative error {err:e}");
        }
    }
}

/// Fine-tunes of one base with cosines of about 0.9999 and 0.999999 (a nearly singular Gram
/// matrix), at 1e7 elements: the Karcher mean against the f64 iteration on the tensors.
pub fn karcher_of_fine_tunes_holds_the_bar(device: &Device) {
    let n = 10_000_000;
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let base = normal(&mut rng, n);
    let noise: Vec<Vec<f32>> = (0..3).map(|_| normal(&mut rng, n)).collect();
    for scale in [1.4e-2f32, 1.4e-3] {
        let xs: Vec<Vec<f32>> = noise
            .iter()
            .map(|d| base.iter().zip(d).map(|(b, d)| b + scale * d).collect())
            .collect();
        let x64: Vec<Vec<f64>> = xs.iter().map(|x| f64s(x)).collect();
        let cos = dot(&x64[0], &x64[1]) / (norm(&x64[0]) * norm(&x64[1]));
        let w = [0.2, 0.5, 0.3];
        let (out, stats) = SphericalMean::new(w.to_vec())
            .unwrap()
            .mean(xs.iter().map(|x| tensor(x.clone(), [n], device)).collect())
            .unwrap();
        assert_eq!(stats.branch, Branch::Slerp);
        let err = rel_l2(&values(out), &karcher64(&x64, &w, None));
        assert!(err <= 1e-6, "cos {cos}: relative error {err:e}");
    }
}

/// The bar for methods on task vectors: `out − base` against the f64 `want` (= result − base),
/// within 1e-6 relative or twice what rounding the f64 result once to f32 costs.
fn assert_task_vector_bar(out: &[f32], base: &[f64], want: &[f64], what: &str) {
    let rel = |d: f64| d.sqrt() / norm(want);
    let err = rel((0..want.len())
        .map(|e| (out[e] as f64 - base[e] - want[e]).powi(2))
        .sum());
    let rounding = rel((0..want.len())
        .map(|e| ((base[e] + want[e]) as f32 as f64 - base[e] - want[e]).powi(2))
        .sum());
    assert!(
        err <= 1e-6_f64.max(2.0 * rounding),
        "{what}: {err:e} (rounding alone {rounding:e})"
    );
}

/// Task vectors 0.1% and 3% of their base: `result − base` against the f64 `result − base`,
/// within 1e-6 or twice the cost of rounding the f64 result once to f32.
pub fn task_vectors_hold_the_bar_near_their_base(device: &Device) {
    let n = 1_000_000;
    let mut rng = ChaCha8Rng::seed_from_u64(72);
    let base = normal(&mut rng, n);
    let (u, v) = (normal(&mut rng, n), normal(&mut rng, n));
    for size in [1e-3f32, 3e-2] {
        let a: Vec<f32> = base.iter().zip(&u).map(|(b, d)| b + size * d).collect();
        let b: Vec<f32> = base.iter().zip(&v).map(|(b, d)| b + size * d).collect();
        let (b64, da, db) = (
            f64s(&base),
            f64s(&a)
                .iter()
                .zip(f64s(&base))
                .map(|(x, y)| x - y)
                .collect::<Vec<_>>(),
            f64s(&b)
                .iter()
                .zip(f64s(&base))
                .map(|(x, y)| x - y)
                .collect::<Vec<_>>(),
        );
        let t = 0.4;
        // SLERP of the task vectors, in f64: θ from atan2 of the unit differences.
        let (na, nb) = (norm(&da), norm(&db));
        let cos = dot(&da, &db) / (na * nb);
        let th = 2.0 * (2.0 - 2.0 * cos).sqrt().atan2((2.0 + 2.0 * cos).sqrt());
        let (c0, c1) = (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin());
        let want: Vec<f64> = (0..n).map(|e| c0 * da[e] + c1 * db[e]).collect();
        let layer = |w: &[f32]| burn::nn::Linear {
            weight: burn::module::Param::from_tensor(tensor(w.to_vec(), [1000, 1000], device)),
            bias: None,
        };
        let merger = SlerpMerger::new(SlerpConfig::new(t)).unwrap();
        let merged = merger
            .merge_with_base(&layer(&base), &layer(&a), &layer(&b))
            .unwrap();
        let out = values(merged.weight.val());
        assert_task_vector_bar(&out, &b64, &want, &format!("task vectors {size}"));
        // The mean methods on the same task vectors: mergekit's nuslerp and multislerp with a
        // base, and the exact Karcher mean, each against its formula on the task vectors.
        let w = [0.6, 0.4];
        let tv = [da.clone(), db.clone()];
        let flat = |v: &[f32]| tensor(v.to_vec(), [n], device);
        for (name, method, want) in [
            (
                "nuslerp",
                MeanMethod::Nuslerp,
                nuslerp64(&da, &db, w[1] / (w[0] + w[1])),
            ),
            (
                "multislerp",
                MeanMethod::Multislerp {
                    normalize_weights: true,
                    eps: 1e-8,
                },
                multislerp64(&tv, &w, true, 1e-8),
            ),
            ("karcher", MeanMethod::Karcher, karcher64(&tv, &w, None)),
        ] {
            let mean = SphericalMean::new(w.to_vec()).unwrap().with_method(method);
            let (out, _) = mean
                .mean_with_base(flat(&base), vec![flat(&a), flat(&b)])
                .unwrap();
            let what = format!("{name} of task vectors {size}");
            assert_task_vector_bar(&values(out), &b64, &want, &what);
        }
        // The consuming form writes the same bits.
        let into = merger
            .merge_with_base_into(&layer(&base), layer(&a), &layer(&b))
            .unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(values(into.weight.val())), bits(out));
    }
}

/// The documented fallbacks and errors: a zero tensor under each method, cancelling inputs.
pub fn mean_fallbacks_and_errors(device: &Device) {
    let n = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(73);
    let x = normal(&mut rng, n);
    let x64 = f64s(&x);
    let zero = vec![0.0f32; n];
    let neg: Vec<f32> = x.iter().map(|v| -v).collect();
    // nuslerp: a zero tensor against x gives sin(tπ/2)·x: 0.707·x at t = 0.5.
    let nuslerp = SphericalMean::new(vec![1.0, 1.0])
        .unwrap()
        .with_method(MeanMethod::Nuslerp);
    let got = mean_of(device, &[zero.clone(), x.clone()], &nuslerp);
    let want: Vec<f64> = x64
        .iter()
        .map(|v| v * std::f64::consts::FRAC_1_SQRT_2)
        .collect();
    assert!(rel_l2(&got, &want) <= 1e-6);
    // The exact Karcher mean: the weighted linear mean.
    let (out, stats) = SphericalMean::new(vec![1.0, 3.0])
        .unwrap()
        .mean(vec![
            tensor(zero.clone(), [n], device),
            tensor(x.clone(), [n], device),
        ])
        .unwrap();
    assert_eq!(stats.branch, Branch::Lerp(LerpReason::ZeroNorm));
    let want: Vec<f64> = x64.iter().map(|v| 0.75 * v).collect();
    assert!(rel_l2(&values(out), &want) <= 1e-6);
    // mergekit's karcher drops the zero input but counts it in the norms' mean: x·(1/2).
    let mk = SphericalMean::new(vec![1.0, 1.0])
        .unwrap()
        .with_method(MeanMethod::MergekitKarcher {
            max_iter: 10,
            tol: 1e-5,
        });
    let want: Vec<f64> = x64.iter().map(|v| 0.5 * v).collect();
    assert!(rel_l2(&mean_of(device, &[zero, x.clone()], &mk), &want) <= 1e-6);
    // multislerp: x and −x cancel; two inputs give their weighted sum, three an error.
    let ms = |w: Vec<f64>| {
        SphericalMean::new(w)
            .unwrap()
            .with_method(MeanMethod::Multislerp {
                normalize_weights: true,
                eps: 1e-8,
            })
    };
    let got = mean_of(device, &[x.clone(), neg.clone()], &ms(vec![1.0, 1.0]));
    assert!(got.iter().all(|v| *v == 0.0));
    let three = vec![
        tensor(x.clone(), [n], device),
        tensor(neg, [n], device),
        tensor(x.clone(), [n], device),
    ];
    let err = ms(vec![1.0, 2.0, 1.0]).mean(three).unwrap_err();
    assert!(
        matches!(err, MergeError::CancellingDirections { .. }),
        "{err}"
    );
    // Negative weights: multislerp and nuslerp take them as mergekit does (nuslerp's
    // t = w₂/(w₁ + w₂) = 1.5 extrapolates); the exact Karcher mean refuses them by name.
    let y = normal(&mut rng, n);
    let y64 = f64s(&y);
    let pair = [x.clone(), y.clone()];
    let w = vec![-0.5, 1.5];
    let got = mean_of(device, &pair, &ms(w.clone()));
    let want = multislerp64(&[x64.clone(), y64.clone()], &w, true, 1e-8);
    assert!(rel_l2(&got, &want) <= 1e-6);
    let nu = SphericalMean::new(w.clone())
        .unwrap()
        .with_method(MeanMethod::Nuslerp);
    let want = nuslerp64(&x64, &y64, 1.5);
    assert!(rel_l2(&mean_of(device, &pair, &nu), &want) <= 1e-6);
    let err = SphericalMean::new(w)
        .unwrap()
        .mean(vec![tensor(x.clone(), [n], device), tensor(y, [n], device)])
        .unwrap_err();
    assert!(
        matches!(&err, MergeError::InvalidWeights { reason } if reason.contains("Karcher")),
        "{err}"
    );
    // nuslerp takes exactly two models.
    let err = SphericalMean::new(vec![1.0, 1.0, 1.0])
        .unwrap()
        .with_method(MeanMethod::Nuslerp)
        .mean(vec![tensor(x.clone(), [n], device); 3])
        .unwrap_err();
    assert!(matches!(err, MergeError::InvalidWeights { .. }), "{err}");
}

/// Inputs at 1e-30 and 1e25 (whose squares leave f32's range), and three fine-tunes of a base
/// merged as task vectors: each method against its formula in f64.
pub fn mean_of_extreme_magnitudes_and_a_base(device: &Device) {
    let n = 50_000;
    let mut rng = ChaCha8Rng::seed_from_u64(75);
    let raw: Vec<Vec<f32>> = (0..3).map(|_| normal(&mut rng, n)).collect();
    let w = vec![0.5, 1.0, 2.0];
    let multislerp = MeanMethod::Multislerp {
        normalize_weights: true,
        eps: 0.0,
    };
    for scale in [1e-30f32, 1e25] {
        let xs: Vec<Vec<f32>> = raw
            .iter()
            .map(|x| x.iter().map(|v| v * scale).collect())
            .collect();
        let x64: Vec<Vec<f64>> = xs.iter().map(|x| f64s(x)).collect();
        for (name, method, want) in [
            ("karcher", MeanMethod::Karcher, karcher64(&x64, &w, None)),
            ("multislerp", multislerp, multislerp64(&x64, &w, true, 0.0)),
        ] {
            // Norms of 2e-28 are not zero here.
            let mean = SphericalMean::new(w.clone())
                .unwrap()
                .with_eps(0.0)
                .with_method(method);
            let err = rel_l2(&mean_of(device, &xs, &mean), &want);
            assert!(err <= 1e-6, "{name} at {scale:e}: relative error {err:e}");
        }
    }
    // Three fine-tunes 0.5% off their base: the task vectors' Karcher mean and multislerp.
    let base = normal(&mut rng, n);
    let xs: Vec<Vec<f32>> = raw
        .iter()
        .map(|d| base.iter().zip(d).map(|(b, d)| b + 5e-3 * d).collect())
        .collect();
    let b64 = f64s(&base);
    let tv: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| f64s(x).iter().zip(&b64).map(|(x, b)| x - b).collect())
        .collect();
    let flat = |v: &[f32]| tensor(v.to_vec(), [n], device);
    for (name, method, want) in [
        ("karcher", MeanMethod::Karcher, karcher64(&tv, &w, None)),
        ("multislerp", multislerp, multislerp64(&tv, &w, true, 0.0)),
    ] {
        let mean = SphericalMean::new(w.clone()).unwrap().with_method(method);
        let (out, _) = mean
            .mean_with_base(flat(&base), xs.iter().map(|x| flat(x)).collect())
            .unwrap();
        let what = format!("{name} of three task vectors");
        assert_task_vector_bar(&values(out), &b64, &want, &what);
    }
}

/// Inputs of mixed float dtypes are widened to one compute dtype: the mean of an f32 and a
/// bf16 tensor equals the mean of the f32 tensor and the bf16 values widened, bit for bit,
/// in the first input's dtype.
pub fn mean_of_mixed_dtypes(device: &Device) {
    if !supports_bf16(device) {
        return;
    }
    let n = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(74);
    let (x, y) = (normal(&mut rng, n), normal(&mut rng, n));
    let half = tensor(y, [n], device).cast(DType::BF16);
    let widened = half.clone().cast(DType::F32);
    let mean = SphericalMean::new(vec![0.3, 0.7]).unwrap();
    let (mixed, _) = mean
        .mean(vec![tensor(x.clone(), [n], device), half])
        .unwrap();
    let (plain, _) = mean.mean(vec![tensor(x, [n], device), widened]).unwrap();
    assert_eq!(mixed.dtype(), DType::F32);
    let bits = |t: Tensor<1>| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(mixed), bits(plain));
}

/// bf16 tensors: flex holds them; ndarray has no bf16, and lavapipe's wgpu no 16-bit floats.
fn supports_bf16(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
}

/// Every method on whole models: `merge_into` bit for bit with `merge`, progress for every
/// tensor of both passes, cancellation before the first write handing the model back; weight
/// schedules giving each tensor its own weights.
pub fn mean_methods_on_models(device: &Device) {
    let models: Vec<Net> = (0..3).map(|s| net(device, 80 + s)).collect();
    let refs: Vec<&Net> = models.iter().collect();
    for method in [
        MeanMethod::Karcher,
        MeanMethod::MergekitKarcher {
            max_iter: 10,
            tol: 1e-5,
        },
        MeanMethod::Multislerp {
            normalize_weights: true,
            eps: 1e-8,
        },
        MeanMethod::Linear,
    ] {
        let mean = SphericalMean::new(vec![0.2, 0.3, 0.5])
            .unwrap()
            .with_method(method);
        let (merged, stats) = mean.merge(&refs).unwrap();
        let mut seen = 0;
        let mut control = MergeControl::new().on_progress(|_| seen += 1);
        let (into, _) = mean
            .merge_into_with_control(net(device, 80), &refs[1..], &mut control)
            .unwrap();
        drop(control);
        assert_eq!(dump(&into), dump(&merged), "{method:?}");
        assert_eq!(seen, 2 * stats.len(), "{method:?}");
    }
    // A weight schedule: the third model takes no part in the biases, and weighs 4 in the
    // rest; each tensor equals the mean with that tensor's weights, bit for bit.
    let scheduled = SphericalMean::new(vec![0.2, 0.3, 0.5])
        .unwrap()
        .with_weight_schedule(
            2,
            Schedule::new()
                .with_rule("**.bias", 0.0.into())
                .with_rule("**", 4.0.into()),
        );
    let (merged, _) = scheduled.merge(&refs).unwrap();
    let biases = SphericalMean::new(vec![0.2, 0.3, 0.0]).unwrap();
    let rest = SphericalMean::new(vec![0.2, 0.3, 4.0]).unwrap();
    let (by_bias, by_rest) = (
        dump(&biases.merge(&refs).unwrap().0),
        dump(&rest.merge(&refs).unwrap().0),
    );
    for (path, got) in dump(&merged) {
        let want = if path.ends_with(".bias") {
            &by_bias[&path]
        } else {
            &by_rest[&path]
        };
        assert_eq!(&got, want, "{path}");
    }
    // Weights that vanish at a parameter are refused, naming it.
    let err = SphericalMean::new(vec![1.0, 0.0, 0.0])
        .unwrap()
        .with_weight_schedule(0, Schedule::new().with_rule("**.bias", 0.0.into()))
        .merge(&refs)
        .unwrap_err();
    assert!(err.to_string().contains(".bias` sum to 0"), "{err}");
    let stop = AtomicBool::new(true);
    let mut control = MergeControl::new().cancel_when(&stop);
    let mean = SphericalMean::new(vec![1.0, 1.0, 1.0]).unwrap();
    let err = mean
        .merge_into_with_control(net(device, 80), &refs[1..], &mut control)
        .unwrap_err();
    assert!(matches!(err.error(), MergeError::Cancelled));
    assert_eq!(dump(&err.into_model()), dump(&models[0]));
    let mut control = MergeControl::new().cancel_when(&stop);
    assert!(matches!(
        mean.merge_with_control(&refs, &mut control),
        Err(MergeError::Cancelled)
    ));
}
