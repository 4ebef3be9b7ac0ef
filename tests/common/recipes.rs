//! Suite cases for recipes: schedules, plans, reports, task vectors, N-model means, sweeps.
//! Expected values come from f64 computations written here and from closed forms.

use std::collections::BTreeMap;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::tensor::{Device, Tensor};
use burn_slerp::{
    Branch, Factor, LerpReason, MergeError, Schedule, SlerpConfig, SlerpMerger, SphericalMean,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Net, dump, net, normal, reference, rel_l2, tensor, values};

fn floats(bits: &[u32]) -> Vec<f64> {
    bits.iter().map(|b| f32::from_bits(*b) as f64).collect()
}

/// The schedule the recipe cases use, and what it must give each path of [`Net`] (written out
/// by hand from the rules and the layer-position rule: the first numeric segment of a path is
/// its layer index, so `blocks` (a Vec of 2) and `norms` (an array of 2) are stacks of two
/// layers at positions 0 and 1, and everything outside them (`emb`, `conv`, `bn`, `head`) is
/// at position 0).
fn schedule() -> Schedule {
    Schedule::new()
        .with_rule("blocks.*.attn.**", vec![0.2, 0.8].into())
        .with_rule("**.bias", 0.9.into())
        .with_rule("emb.*", vec![0.1, 0.3].into())
        .with_rule("head.**", vec![0.3, 0.6].into())
        .with_rule("nothing.*", 0.4.into())
        .with_rule("norms.*.gamma", vec![0.2, 0.7].into())
}

fn expected_t(path: &str) -> f64 {
    if path.starts_with("blocks.0.attn.") {
        0.2
    } else if path.starts_with("blocks.1.attn.") {
        0.8
    } else if path.ends_with(".bias") {
        0.9
    } else if path.starts_with("emb.") {
        0.1
    } else if path.starts_with("head.") {
        0.3
    } else if path == "norms.0.gamma" {
        0.2
    } else if path == "norms.1.gamma" {
        0.7
    } else {
        0.5
    }
}

/// The layer position of each path of [`Net`], by hand.
fn expected_position(path: &str) -> f64 {
    if path.starts_with("blocks.1.") || path.starts_with("norms.1.") {
        1.0
    } else {
        0.0
    }
}

pub fn schedule_gives_each_tensor_its_t(device: &Device) {
    let (a, b) = (net(device, 41), net(device, 42));
    let config = SlerpConfig::new(0.5).with_schedule(Some(schedule()));
    let merger = SlerpMerger::new(config).unwrap();
    let (merged, stats) = merger.merge_with_stats(&a, &b).unwrap();
    let (da, db, dm) = (dump(&a), dump(&b), dump(&merged));
    let mut seen = BTreeMap::new();
    for (path, (_, bits)) in &dm {
        let t = expected_t(path);
        let got: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let want = reference(&floats(&da[path].1), &floats(&db[path].1), t, 1e-8, None);
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-6, "{path} at t={t}: relative error {err:e}");
        *seen.entry(t.to_bits()).or_insert(0) += 1;
    }
    // Seven factors: rule 0 at two positions, rules 1 to 3, rule 5 at two positions (one of
    // them 0.2 again), and the default (rule 4 matches nothing).
    assert_eq!(seen.len(), 7, "{seen:?}");
    for s in &stats {
        assert_eq!(s.t, expected_t(&s.path), "{}", s.path);
    }

    // The recipe saved to a file and loaded back replays the same model, bit for bit.
    let file = std::env::temp_dir().join(format!(
        "burn-slerp-recipe-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    merger.config().save(&file).unwrap();
    let replayed = SlerpMerger::new(SlerpConfig::load(&file).unwrap())
        .unwrap()
        .merge(&a, &b)
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        dump(&replayed) == dm,
        "the replayed recipe gave another model"
    );
}

pub fn plan_lists_tensors_without_computing(device: &Device) {
    let (a, b) = (net(device, 43), net(device, 44));
    let config = SlerpConfig::new(0.5).with_schedule(Some(schedule()));
    let merger = SlerpMerger::new(config).unwrap();
    let plan = merger.plan(&a, &b).unwrap();
    let floats_of_a = dump(&a);
    assert_eq!(plan.entries.len(), floats_of_a.len());
    for e in &plan.entries {
        assert_eq!(e.shape, floats_of_a[&e.path].0, "{}", e.path);
        assert_eq!(e.t, expected_t(&e.path), "{}", e.path);
        assert_eq!(e.position, expected_position(&e.path), "{}", e.path);
        assert_eq!(e.dtype.as_deref(), Some("F32"));
    }
    let blocks1 = plan
        .entries
        .iter()
        .find(|e| e.path == "blocks.1.attn.query.weight")
        .unwrap();
    assert_eq!((blocks1.rule, blocks1.position), (Some(0), 1.0));
    // Outside the layers, after them too: position 0, as in mergekit.
    let head = plan.entries.iter().find(|e| e.path == "head.Dense.weight");
    assert_eq!(head.map(|e| (e.position, e.t)), Some((0.0, 0.3)));
    assert_eq!(plan.warnings.len(), 1);
    assert!(
        plan.warnings[0].contains("nothing.*"),
        "{:?}",
        plan.warnings
    );
    let text = plan.to_string();
    assert!(text.starts_with("path "), "{text}");
    assert!(text.contains("blocks.1.attn.query.weight"));
    assert!(text.contains("warning: schedule rule 4"));

    // Lazy parameters stay lazy: the plan reads shapes only.
    let lazy_a = LinearConfig::new(6, 3).init(device);
    let lazy_b = LinearConfig::new(6, 3).init(device);
    let plan = SlerpMerger::new(SlerpConfig::new(0.5))
        .unwrap()
        .plan(&lazy_a, &lazy_b)
        .unwrap();
    assert_eq!(plan.entries[0].dtype, None);
    assert!(!lazy_a.weight.is_initialized() && !lazy_b.weight.is_initialized());

    // The checks of merge, before anything is computed.
    let other = LinearConfig::new(6, 4).init(device);
    assert!(matches!(
        merger.plan(&lazy_a, &other),
        Err(MergeError::ShapeMismatch { .. })
    ));
    let bad =
        SlerpConfig::new(0.5).with_schedule(Some(Schedule::new().with_rule("a..b", 0.5.into())));
    assert!(matches!(
        SlerpMerger::new(bad),
        Err(MergeError::InvalidSchedule { rule: 0, .. })
    ));
}

pub fn report_summarises_and_warns_on_strangers(device: &Device) {
    let (a, stranger) = (net(device, 45), net(device, 46));
    let merger = SlerpMerger::new(SlerpConfig::new(0.4)).unwrap();
    let (_, report) = merger.merge_with_report(&a, &stranger).unwrap();
    let (da, ds) = (dump(&a), dump(&stranger));
    assert_eq!(report.summary.tensors, da.len());
    assert_eq!(
        report.summary.params,
        da.values()
            .map(|(s, _)| s.iter().product::<usize>())
            .sum::<usize>()
    );
    // Angles against an f64 computation, and the distribution over them.
    let mut thetas = Vec::new();
    for s in &report.tensors {
        let (x, y) = (floats(&da[&s.path].1), floats(&ds[&s.path].1));
        let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        if nx == 0.0 || ny == 0.0 {
            continue;
        }
        let cos = x.iter().zip(&y).map(|(p, q)| p * q).sum::<f64>() / (nx * ny);
        let theta = cos.clamp(-1.0, 1.0).acos();
        assert!((s.theta.unwrap() - theta).abs() < 1e-5, "{}", s.path);
        thetas.push(theta);
    }
    thetas.sort_by(f64::total_cmp);
    assert!((report.summary.theta_min.unwrap() - thetas[0]).abs() < 1e-5);
    assert!((report.summary.theta_max.unwrap() - thetas[thetas.len() - 1]).abs() < 1e-5);
    let s = &report.summary;
    let counted =
        s.slerp + s.lerp_zero_norm + s.lerp_antiparallel + s.lerp_dot_threshold + s.lerp_method;
    assert_eq!(counted, s.tensors);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("relatives"));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["summary"]["tensors"], s.tensors);
    assert!(
        report
            .to_string()
            .contains("warning: the models do not look like relatives")
    );

    // A fine-tune: a plus a few percent of noise. No warning.
    let tuned = perturb(net(device, 45), 0.03, 47);
    let (_, report) = merger.merge_with_report(&a, &tuned).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert!(report.summary.mean_cos.unwrap() > 0.99);
}

/// `module + scale · noise`, parameter by parameter.
fn perturb<M: Module>(module: M, scale: f32, seed: u64) -> M {
    struct Perturb {
        rng: ChaCha8Rng,
        scale: f32,
    }
    impl burn::module::ModuleMapper for Perturb {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (rng, scale) = (&mut self.rng, self.scale);
            param.map(|t| {
                let shape = t.dims();
                let noise = normal(rng, shape.iter().product());
                let v: Vec<f32> = values(t.clone())
                    .iter()
                    .zip(noise)
                    .map(|(x, n)| x + scale * n)
                    .collect();
                tensor(v, shape, &t.device())
            })
        }
    }
    module.map(&mut Perturb {
        rng: ChaCha8Rng::seed_from_u64(seed),
        scale,
    })
}

#[derive(Module, Debug)]
pub struct Flat {
    pub x: Param<Tensor<1>>,
}

fn flat(v: Vec<f32>, device: &Device) -> Flat {
    let n = v.len();
    Flat {
        x: Param::from_tensor(tensor(v, [n], device)),
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

pub fn task_vectors_keep_their_norm(device: &Device) {
    let n = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(48);
    let base: Vec<f64> = normal(&mut rng, n).iter().map(|x| *x as f64).collect();
    // Two orthogonal task vectors of equal norm (Gram-Schmidt in f64), 3% of the base's norm.
    let u: Vec<f64> = normal(&mut rng, n).iter().map(|x| *x as f64).collect();
    let v: Vec<f64> = normal(&mut rng, n).iter().map(|x| *x as f64).collect();
    let uu = u.iter().map(|x| x * x).sum::<f64>();
    let uv = u.iter().zip(&v).map(|(x, y)| x * y).sum::<f64>();
    let v: Vec<f64> = v.iter().zip(&u).map(|(y, x)| y - uv / uu * x).collect();
    let size = 0.03 * norm(&base);
    let (su, sv) = (size / norm(&u), size / norm(&v));
    let a: Vec<f32> = base
        .iter()
        .zip(&u)
        .map(|(b, x)| (b + su * x) as f32)
        .collect();
    let b: Vec<f32> = base
        .iter()
        .zip(&v)
        .map(|(b, y)| (b + sv * y) as f32)
        .collect();
    let base32: Vec<f32> = base.iter().map(|x| *x as f32).collect();
    let (mb, ma, mbb) = (
        flat(base32.clone(), device),
        flat(a.clone(), device),
        flat(b.clone(), device),
    );
    // The f64 reference: base + slerp(a − base, b − base), from the f32 inputs.
    let tv = |x: &[f32]| -> Vec<f64> {
        x.iter()
            .zip(&base32)
            .map(|(p, q)| *p as f64 - *q as f64)
            .collect()
    };
    let (ta, tb) = (tv(&a), tv(&b));
    let slerped = reference(&ta, &tb, 0.5, 1e-8, None);
    let want: Vec<f64> = base32
        .iter()
        .zip(&slerped)
        .map(|(q, s)| *q as f64 + s)
        .collect();

    let merger = SlerpMerger::new(SlerpConfig::new(0.5)).unwrap();
    let merged = values(merger.merge_with_base(&mb, &ma, &mbb).unwrap().x.val());
    assert!(rel_l2(&merged, &want) <= 1e-6);
    // SLERP of the task vectors keeps their norm; lerp keeps ~1/√2 of it.
    let kept = norm(&tv(&merged)) / norm(&ta);
    assert!((kept - 1.0).abs() < 1e-3, "SLERP kept {kept}");
    let lerped = values(merger.merge(&ma, &mbb).unwrap().x.val());
    let kept_plain = norm(&tv(&lerped)) / norm(&ta);
    assert!(
        (kept_plain - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-2,
        "{kept_plain}"
    );

    // t = 0 and t = 1 are a and b bit for bit; discrete parts come from a.
    let (na, nb, nbase) = (net(device, 49), net(device, 50), net(device, 51));
    for (t, want) in [(0.0, &na), (1.0, &nb)] {
        let m = SlerpMerger::new(SlerpConfig::new(t)).unwrap();
        let merged: Net = m.merge_with_base(&nbase, &na, &nb).unwrap();
        assert_eq!(dump(&merged), dump(want), "t = {t}");
        assert_eq!(merged.ids.val().into_data(), na.ids.val().into_data());
    }
    let mismatched = LinearConfig::new(3, 3).init(device);
    let small = LinearConfig::new(3, 2).init(device);
    assert!(matches!(
        merger.merge_with_base(&mismatched, &small, &small),
        Err(MergeError::ShapeMismatch { .. })
    ));
}

/// The f64 Karcher condition: `Σ wᵢ log_m(uᵢ) = 0` at the returned direction `m`.
fn karcher_residual(m: &[f64], xs: &[Vec<f64>], weights: &[f64]) -> f64 {
    let unit = |v: &[f64]| -> Vec<f64> {
        let n = norm(v);
        v.iter().map(|x| x / n).collect()
    };
    let m = unit(m);
    let mut g = vec![0.0; m.len()];
    for (x, w) in xs.iter().zip(weights) {
        let u = unit(x);
        let cos = m
            .iter()
            .zip(&u)
            .map(|(p, q)| p * q)
            .sum::<f64>()
            .clamp(-1.0, 1.0);
        let theta = cos.acos();
        let scale = if theta < 1e-12 {
            1.0
        } else {
            theta / theta.sin()
        };
        for ((gi, ui), mi) in g.iter_mut().zip(&u).zip(&m) {
            *gi += w * scale * (ui - cos * mi);
        }
    }
    norm(&g) / weights.iter().sum::<f64>()
}

pub fn spherical_mean_of_n_models(device: &Device) {
    let n = 3000;
    let mut rng = ChaCha8Rng::seed_from_u64(52);
    let raw: Vec<Vec<f32>> = (0..3).map(|_| normal(&mut rng, n)).collect();
    let as64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| *x as f64).collect() };

    // Two models, equal norms, weights (1 − t, t): the slerp.
    let scale = norm(&as64(&raw[0])) / norm(&as64(&raw[1]));
    let b_eq: Vec<f32> = raw[1].iter().map(|x| (*x as f64 * scale) as f32).collect();
    for t in [0.3, 0.5, 0.85] {
        let (mean, stats) = SphericalMean::new(vec![1.0 - t, t])
            .unwrap()
            .mean(vec![
                tensor(raw[0].clone(), [n], device),
                tensor(b_eq.clone(), [n], device),
            ])
            .unwrap();
        assert_eq!(stats.branch, Branch::Slerp);
        let want = reference(&as64(&raw[0]), &as64(&b_eq), t, 1e-8, None);
        let err = rel_l2(&values(mean), &want);
        assert!(err <= 1e-6, "t = {t}: relative error {err:e}");
    }

    // Three models: the Karcher condition holds in f64, the norm is the weighted mean of
    // norms, and the order of the models does not matter.
    let weights = [0.5, 0.3, 0.2];
    let xs: Vec<Vec<f64>> = raw.iter().map(|v| as64(v)).collect();
    let run = |order: [usize; 3]| -> Vec<f32> {
        let (mean, stats) = SphericalMean::new(order.iter().map(|i| weights[*i]).collect())
            .unwrap()
            .mean(
                order
                    .iter()
                    .map(|i| tensor(raw[*i].clone(), [n], device))
                    .collect(),
            )
            .unwrap();
        assert_eq!(stats.branch, Branch::Slerp);
        assert!(stats.steps <= 32);
        values(mean)
    };
    let m = run([0, 1, 2]);
    let m64 = as64(&m);
    assert!(karcher_residual(&m64, &xs, &weights) < 1e-5);
    let norm_mean: f64 = xs.iter().zip(&weights).map(|(x, w)| w * norm(x)).sum();
    assert!((norm(&m64) / norm_mean - 1.0).abs() < 1e-6);
    for order in [[2, 0, 1], [1, 2, 0]] {
        let err = rel_l2(&run(order), &m64);
        assert!(err <= 1e-6, "{order:?}: {err:e}");
    }

    // Fallbacks: a zero tensor, antipodal models.
    let zero = vec![0.0f32; n];
    let (mean, stats) = SphericalMean::new(vec![1.0, 3.0])
        .unwrap()
        .mean(vec![
            tensor(zero, [n], device),
            tensor(raw[0].clone(), [n], device),
        ])
        .unwrap();
    assert_eq!(stats.branch, Branch::Lerp(LerpReason::ZeroNorm));
    let want: Vec<f64> = xs[0].iter().map(|x| 0.75 * x).collect();
    assert!(rel_l2(&values(mean), &want) <= 1e-6);
    // x and −x weighted 1 : 3: the mean direction is −x̂, antipodal to x, so the result is the
    // weighted linear mean (x − 3x)/4 = −x/2.
    let neg: Vec<f32> = raw[0].iter().map(|x| -x).collect();
    let (mean, stats) = SphericalMean::new(vec![1.0, 3.0])
        .unwrap()
        .mean(vec![
            tensor(raw[0].clone(), [n], device),
            tensor(neg, [n], device),
        ])
        .unwrap();
    assert_eq!(stats.branch, Branch::Lerp(LerpReason::Antiparallel));
    let want: Vec<f64> = xs[0].iter().map(|x| -0.5 * x).collect();
    assert!(rel_l2(&values(mean), &want) <= 1e-6);

    // Weights are validated.
    for w in [vec![1.0], vec![0.0, 0.0], vec![1.0, f64::NAN]] {
        assert!(matches!(
            SphericalMean::new(w),
            Err(MergeError::InvalidWeights { .. })
        ));
    }
    // A negative weight is for the methods that take one; the exact Karcher mean refuses it
    // when merging.
    let negative = SphericalMean::new(vec![1.0, -0.1, 1.0]).unwrap();
    assert!(matches!(
        negative.mean(raw.iter().map(|v| tensor(v.clone(), [n], device)).collect()),
        Err(MergeError::InvalidWeights { .. })
    ));

    // Whole models: every float tensor against the f64 conditions (the Karcher condition and
    // the weighted mean of the norms, or the weighted linear mean where the mean falls back to
    // it), discrete parts from the first.
    let models = [net(device, 53), net(device, 54), net(device, 55)];
    let weights = [0.25, 0.25, 0.5];
    let mean = SphericalMean::new(vec![1.0, 1.0, 2.0]).unwrap();
    let (merged, stats) = mean.merge(&[&models[0], &models[1], &models[2]]).unwrap();
    let dumps: Vec<_> = models.iter().map(dump).collect();
    let got = dump(&merged);
    assert_eq!(stats.len(), dumps[0].len());
    for s in &stats {
        let xs: Vec<Vec<f64>> = dumps.iter().map(|d| floats(&d[&s.path].1)).collect();
        let m = floats(&got[&s.path].1);
        match s.branch {
            Branch::Slerp => {
                let residual = karcher_residual(&m, &xs, &weights);
                assert!(residual < 1e-5, "{}: {residual:e}", s.path);
                let norm_mean: f64 = xs.iter().zip(&weights).map(|(x, w)| w * norm(x)).sum();
                assert!((norm(&m) / norm_mean - 1.0).abs() < 1e-6, "{}", s.path);
            }
            Branch::Lerp(_) => {
                let linear: Vec<f64> = (0..m.len())
                    .map(|i| xs.iter().zip(&weights).map(|(x, w)| w * x[i]).sum())
                    .collect();
                let m32: Vec<f32> = m.iter().map(|v| *v as f32).collect();
                let close = rel_l2(&m32, &linear) <= 1e-6 || linear.iter().all(|v| *v == 0.0);
                assert!(close && m.iter().all(|v| v.is_finite()), "{}", s.path);
            }
        }
    }
    // The LayerNorm kept at zeros takes the linear mean (a zero norm); the rest are spherical.
    let branch = |path: &str| stats.iter().find(|s| s.path == path).unwrap().branch;
    assert_eq!(branch("norms.1.beta"), Branch::Lerp(LerpReason::ZeroNorm));
    assert_eq!(branch("blocks.0.attn.query.weight"), Branch::Slerp);
    assert_eq!(
        merged.ids.val().into_data(),
        models[0].ids.val().into_data()
    );
    assert!(matches!(
        mean.merge(&[&models[0], &models[1]]),
        Err(MergeError::InvalidWeights { .. })
    ));
}

pub fn sweep_merges_each_t_from_the_inputs(device: &Device) {
    let n = 500;
    let mut rng = ChaCha8Rng::seed_from_u64(56);
    let (a, b) = (normal(&mut rng, n), normal(&mut rng, n));
    let as64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| *x as f64).collect() };
    // The target is the f64 slerp at t = 0.25: the sweep must find it.
    let target = reference(&as64(&a), &as64(&b), 0.25, 1e-8, None);
    let (ma, mb) = (flat(a.clone(), device), flat(b, device));
    let merger = SlerpMerger::new(SlerpConfig::new(0.9)).unwrap();
    let mut seen = Vec::new();
    let sweep = merger
        .sweep(&ma, &mb, [0.0, 0.25, 0.5, 0.75, 1.0], |model: &Flat, t| {
            let got = values(model.x.val());
            seen.push((t, got.clone()));
            -rel_l2(&got, &target)
        })
        .unwrap();
    assert_eq!(sweep.points.len(), 5);
    assert_eq!(sweep.best.unwrap().t, 0.25);
    assert!(sweep.best.unwrap().score > -1e-6);
    // t = 0 is a itself: nothing accumulated from earlier points.
    assert_eq!(seen[0].1, a);
    let mut calls = 0;
    let err = merger.sweep(&ma, &mb, [0.5, 1.5], |_: &Flat, _| {
        calls += 1;
        0.0
    });
    assert!(matches!(err, Err(MergeError::InvalidT { .. })));
    assert_eq!(calls, 0);
    assert!(sweep.to_string().contains("<- best"));
    // The plot, by hand: the best score (t = 0.25, the target) on the top line, the worst
    // (t = 1, the farthest from it along the circle) on the bottom one, then the axis.
    let plot = sweep.plot(5);
    let lines: Vec<&str> = plot.lines().collect();
    assert_eq!(lines.len(), 7, "{plot}");
    let row = |line: &str| line.split_once('|').unwrap().1.to_string();
    assert_eq!(
        row(lines[0]),
        format!("   {}{}", " * ", "   ".repeat(3)),
        "{plot}"
    );
    assert_eq!(row(lines[4]), format!("{} * ", "   ".repeat(4)), "{plot}");
    assert_eq!(lines[6], format!("{:>9}  .0 .2 .5 .8 1.0", "t"), "{plot}");

    // Schedule rules keep their own factor whatever t is swept: a rule at 0 gives a itself at
    // every point.
    let pinned = SlerpMerger::new(
        SlerpConfig::new(0.5)
            .with_schedule(Some(Schedule::new().with_rule("x", Factor::Constant(0.0)))),
    )
    .unwrap();
    let sweep = pinned
        .sweep(&ma, &mb, [0.3, 0.6, 1.0], |model: &Flat, _| {
            assert!(values(model.x.val()) == a, "the rule's factor was replaced");
            1.0
        })
        .unwrap();
    assert_eq!(sweep.points.len(), 3);
}
