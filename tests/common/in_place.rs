//! Suite cases for the consuming merges (`merge_into` and its kin) and for progress and
//! cancellation: the consuming merges are held to the borrowed ones bit for bit (the borrowed
//! merges are held to f64 references by the other cases), and the storage a result lives in is
//! read back to tell a tensor written over from a new one.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::tensor::{DType, Device, FloatDType, Tensor};
use burn_slerp::{
    Granularity, MergeControl, MergeError, SlerpConfig, SlerpMerger, SphericalMean, Stage,
    storage_address,
};

use super::{Flat2, Net, assert_same_bits, dump, net, randomize, tensor, values};

fn merger(t: f64) -> SlerpMerger {
    SlerpMerger::new(SlerpConfig::new(t)).unwrap()
}

/// Where the CPU backends keep a tensor's values (`None` on other devices, whose buffers the
/// crate cannot address from the host).
fn address(param: &Param<Tensor<2>>) -> Option<usize> {
    storage_address(&param.val())
}

/// `b` with a NaN in its last float parameter in visiting order (the head's bias), so that a
/// merge finds it only after every other tensor.
fn with_nan_at_the_end(mut b: Net) -> (Net, &'static str) {
    let super::Head::Dense(head) = &mut b.head else {
        unreachable!("net() builds a dense head")
    };
    let bias = head.bias.take().expect("a bias");
    let mut v = values(bias.val());
    v[3] = f32::NAN;
    head.bias = Some(Param::from_tensor(tensor(v, [5], &bias.val().device())));
    (b, "head.Dense.bias")
}

pub fn merge_into_matches_merge_bit_for_bit(device: &Device) {
    let b = net(device, 62);
    for t in [0.0, 0.3, 0.75, 1.0] {
        for granularity in [Granularity::Tensor, Granularity::Row] {
            let merger =
                SlerpMerger::new(SlerpConfig::new(t).with_granularity(granularity)).unwrap();
            let expected = merger.merge(&net(device, 61), &b).unwrap();
            let a = net(device, 61);
            let id = a.emb.weight.id;
            let merged = merger.merge_into(a, &b).unwrap();
            assert_same_bits(&dump(&merged), &dump(&expected));
            // What the result takes from `a`: ids, int and bool params, flags, plain fields.
            assert_eq!(merged.emb.weight.id, id);
            assert_eq!(
                merged
                    .ids
                    .val()
                    .into_data()
                    .iter::<i64>()
                    .collect::<Vec<_>>(),
                vec![61, 2, 3]
            );
            assert_eq!(
                merged
                    .mask
                    .val()
                    .into_data()
                    .iter::<bool>()
                    .collect::<Vec<_>>(),
                vec![false, true]
            );
            assert!(merged.bn.training.val().is_enabled());
            assert_eq!(merged.width, 42);
        }
    }
    // Half precision, where the backend holds it: written over in place on flex.
    for dtype in [FloatDType::F16, FloatDType::BF16] {
        if !device.supports_dtype(DType::from(dtype)) {
            println!("{dtype:?} not supported on {device:?}");
            continue;
        }
        let flat = |seed| {
            let w = randomize(Flat2::new(Tensor::zeros([24, 40], device)), seed);
            Flat2::new(w.x.val().cast(dtype))
        };
        let b = flat(64);
        for granularity in [Granularity::Tensor, Granularity::Row] {
            let merger =
                SlerpMerger::new(SlerpConfig::new(0.4).with_granularity(granularity)).unwrap();
            let expected = merger.merge(&flat(63), &b).unwrap().x.val();
            let merged = merger.merge_into(flat(63), &b).unwrap().x.val();
            assert_eq!(merged.dtype(), DType::from(dtype));
            let bits = |t: Tensor<2>| -> Vec<u32> {
                t.into_data().iter::<f32>().map(f32::to_bits).collect()
            };
            assert!(bits(merged) == bits(expected), "{dtype:?} {granularity:?}");
        }
    }
    // An autodiff device: the same values, fresh leaves with a's require-grad settings.
    let ad = device.clone().autodiff();
    let linear = |seed| randomize(LinearConfig::new(6, 5).init(&ad), seed);
    let b = linear(66);
    let expected = merger(0.5).merge(&linear(65), &b).unwrap();
    let merged = merger(0.5).merge_into(linear(65), &b).unwrap();
    assert_eq!(dump(&merged), dump(&expected));
    assert!(merged.weight.val().is_autodiff() && merged.weight.val().is_require_grad());
    let grads = merged
        .forward(Tensor::<2>::ones([2, 6], &ad))
        .sum()
        .backward();
    assert!(merged.weight.grad(&grads).is_some());
}

pub fn merge_into_writes_over_a_and_spares_clones(device: &Device) {
    let b = net(device, 72);
    let before_b = dump(&b);
    let expected = merger(0.4).merge(&net(device, 71), &b).unwrap();

    // `a` alone: its tensors are written over (the CPU backends say where they live).
    let a = net(device, 71);
    let weight_at = address(&a.blocks[1].mlp.0.weight);
    let merged = merger(0.4).merge_into(a, &b).unwrap();
    assert_same_bits(&dump(&merged), &dump(&expected));
    if weight_at.is_some() {
        assert_eq!(address(&merged.blocks[1].mlp.0.weight), weight_at);
    }

    // A clone of `a` alive: nothing it holds is written (running statistics included, which
    // clones share through one cell), and the result is allocated.
    let a = net(device, 71);
    let keep = a.clone();
    let before_a = dump(&keep);
    let merged = merger(0.4).merge_into(a, &b).unwrap();
    assert_same_bits(&dump(&merged), &dump(&expected));
    assert_same_bits(&dump(&keep), &before_a);
    assert_ne!(
        dump(&merged)["bn.running_mean"],
        before_a["bn.running_mean"],
        "the merged running statistics differ, so sharing would show"
    );
    if let Some(kept) = address(&keep.blocks[1].mlp.0.weight) {
        assert_ne!(address(&merged.blocks[1].mlp.0.weight), Some(kept));
    }
    assert_same_bits(&dump(&b), &before_b);

    // One tensor shared (a handle kept outside the model): that one is allocated, the rest
    // are still written over.
    let a = net(device, 71);
    let held = a.blocks[0].mlp.1.weight.val();
    let held_bits = values(held.clone());
    let other_at = address(&a.blocks[1].mlp.0.weight);
    let merged = merger(0.4).merge_into(a, &b).unwrap();
    assert_same_bits(&dump(&merged), &dump(&expected));
    assert_eq!(values(held.clone()), held_bits);
    if let Some(held_at) = storage_address(&held) {
        assert_ne!(address(&merged.blocks[0].mlp.1.weight), Some(held_at));
        assert_eq!(address(&merged.blocks[1].mlp.0.weight), other_at);
    }
}

pub fn merge_into_errors_hand_a_back(device: &Device) {
    let (b, bad) = with_nan_at_the_end(net(device, 82));
    let a = net(device, 81);
    let before = dump(&a);
    let err = merger(0.5).merge_into(a, &b).unwrap_err();
    assert!(
        matches!(err.error(), MergeError::NonFinite { path } if path == bad),
        "{err}"
    );
    let a = err.into_model();
    assert_same_bits(&dump(&a), &before);
    assert!(a.bn.training.val().is_enabled());

    // Checks before any work: the model comes back too.
    let other = SlerpMerger::new(SlerpConfig::new(0.5)).unwrap();
    let wrong = Flat2::new(Tensor::zeros([2, 3], device));
    let err = other
        .merge_into(Flat2::new(Tensor::ones([3, 2], device)), &wrong)
        .unwrap_err();
    assert!(matches!(err.error(), MergeError::ShapeMismatch { .. }));
    assert_eq!(values(err.into_model().x.val()), vec![1.0; 6]);

    // Task vectors and the mean: the same promise.
    let base = net(device, 80);
    let err = merger(0.5).merge_with_base_into(&base, a, &b).unwrap_err();
    assert!(matches!(err.error(), MergeError::NonFinite { path } if path == bad));
    let a = err.into_model();
    assert_same_bits(&dump(&a), &before);
    let mean = SphericalMean::new(vec![0.5, 0.5]).unwrap();
    let err = mean.merge_into(a, &[&b]).unwrap_err();
    assert!(matches!(err.error(), MergeError::NonFinite { path } if path == bad));
    assert_same_bits(&dump(&err.into_model()), &before);

    // `?` keeps the error alone.
    let plain = || -> Result<Net, MergeError> { Ok(merger(0.5).merge_into(net(device, 81), &b)?) };
    assert!(matches!(plain(), Err(MergeError::NonFinite { .. })));
}

pub fn consuming_task_vectors_and_mean_match(device: &Device) {
    let (base, b) = (net(device, 90), net(device, 92));
    for t in [0.0, 0.35, 1.0] {
        let expected = merger(t)
            .merge_with_base(&base, &net(device, 91), &b)
            .unwrap();
        let merged = merger(t)
            .merge_with_base_into(&base, net(device, 91), &b)
            .unwrap();
        assert_same_bits(&dump(&merged), &dump(&expected));
    }
    let mean = SphericalMean::new(vec![0.5, 0.3, 0.2]).unwrap();
    let (first, c) = (net(device, 91), net(device, 93));
    let (expected, expected_stats) = mean.merge(&[&first, &b, &c]).unwrap();
    let (merged, stats) = mean.merge_into(first, &[&b, &c]).unwrap();
    assert_same_bits(&dump(&merged), &dump(&expected));
    assert_eq!(stats.len(), expected_stats.len());
    for (got, want) in stats.iter().zip(&expected_stats) {
        assert_eq!((&got.path, got.steps), (&want.path, want.steps));
    }
}

/// The float tensors of [`Net`] and their bytes, counted by hand from its layers.
fn net_totals(device: &Device) -> (usize, u64) {
    let n = net(device, 0);
    (dump(&n).len(), n.num_params() as u64 * 4)
}

pub fn progress_counts_every_tensor(device: &Device) {
    let (tensors, bytes) = net_totals(device);
    let b = net(device, 102);
    let mut seen: Vec<(Stage, String, usize, usize, u64, u64)> = Vec::new();
    let mut control = MergeControl::new().on_progress(|p| {
        seen.push((
            p.stage,
            p.path.to_string(),
            p.tensors_done,
            p.tensors_total,
            p.bytes_done,
            p.bytes_total,
        ))
    });
    let merged = merger(0.5)
        .merge_into_with_control(net(device, 101), &b, &mut control)
        .unwrap();
    drop(control);
    let paths: Vec<String> = dump(&merged).into_keys().collect();
    for stage in [Stage::Statistics, Stage::Combine] {
        let of_stage: Vec<_> = seen.iter().filter(|s| s.0 == stage).collect();
        assert_eq!(
            of_stage.len(),
            tensors,
            "{stage:?}: one report per float tensor"
        );
        for (i, s) in of_stage.iter().enumerate() {
            assert_eq!((s.2, s.3, s.5), (i + 1, tensors, bytes), "{stage:?}");
        }
        assert_eq!(of_stage.last().unwrap().4, bytes);
        let mut reported: Vec<String> = of_stage.iter().map(|s| s.1.clone()).collect();
        reported.sort();
        assert_eq!(reported, paths);
    }
    // Every statistic comes before the first write.
    let first_write = seen.iter().position(|s| s.0 == Stage::Combine).unwrap();
    assert_eq!(first_write, tensors);

    // The borrowed merge writes tensor by tensor: one report each.
    let mut count = 0;
    let mut control = MergeControl::new().on_progress(|p| {
        assert_eq!(p.stage, Stage::Combine);
        count += 1;
    });
    let a = net(device, 101);
    let with_control = merger(0.5)
        .merge_with_control(&a, &b, &mut control)
        .unwrap();
    drop(control);
    assert_eq!(count, tensors);
    assert_same_bits(&dump(&with_control), &dump(&merged));
}

pub fn cancelled_merges_leave_models_intact(device: &Device) {
    let b = net(device, 112);
    let before_b = dump(&b);
    let before_a = dump(&net(device, 111));

    // Set before the merge.
    let stop = AtomicBool::new(true);
    let mut control = MergeControl::new().cancel_when(&stop);
    let err = merger(0.5)
        .merge_into_with_control(net(device, 111), &b, &mut control)
        .unwrap_err();
    assert!(matches!(err.error(), MergeError::Cancelled), "{err}");
    assert_same_bits(&dump(&err.into_model()), &before_a);

    // Set in the middle of the statistics pass: nothing was written yet.
    let stop = AtomicBool::new(false);
    let mut reports = 0;
    let mut control = MergeControl::new()
        .on_progress(|_| {
            reports += 1;
            if reports == 3 {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .cancel_when(&stop);
    let err = merger(0.5)
        .merge_into_with_control(net(device, 111), &b, &mut control)
        .unwrap_err();
    drop(control);
    assert_eq!(reports, 3, "nothing is done after the flag is seen");
    assert!(matches!(err.error(), MergeError::Cancelled));
    assert_same_bits(&dump(&err.into_model()), &before_a);

    // The borrowed merge stops in its only pass; its inputs were never written.
    let stop = AtomicBool::new(false);
    let mut reports = 0;
    let mut control = MergeControl::new()
        .on_progress(|_| {
            reports += 1;
            if reports == 5 {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .cancel_when(&stop);
    let a = net(device, 111);
    let err = merger(0.5)
        .merge_with_control(&a, &b, &mut control)
        .unwrap_err();
    drop(control);
    assert_eq!(reports, 5);
    assert!(matches!(err, MergeError::Cancelled));
    assert_same_bits(&dump(&a), &before_a);
    assert_same_bits(&dump(&b), &before_b);
}
