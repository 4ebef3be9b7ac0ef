//! What merging gives you: two fine-tunes of one base model, merged at t = 0, 0.1, …, 1.
//!
//! Usage: cargo run --release --example mlp_merge [--features wgpu] [-- --seed N]
//!
//! 1. Generates a classification data set (8 Gaussian clusters in 16 dimensions) and a held-out
//!    split.
//! 2. Trains a base MLP briefly on all classes, then fine-tunes one copy on classes 0–3 and
//!    another on classes 4–7: two relatives, as real fine-tunes are.
//! 3. Sweeps t from 0 to 1 with SLERP and with linear interpolation, scoring every merged model
//!    by held-out accuracy; prints the table, the best t and a text plot.
//! 4. Merges the fine-tunes' task vectors (their differences from the base) at t = 0.5.
//! 5. Plans and reports a recipe with per-layer factors.
//! 6. For contrast, merges two independently initialised models trained on the same halves,
//!    and shows the report's warning.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_slerp::{MergeError, Method, Schedule, SlerpConfig, SlerpMerger};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FEATURES: usize = 16;
const CLASSES: usize = 8;
const HIDDEN: usize = 64;

#[derive(Module, Debug)]
struct Mlp {
    input: Linear,
    hidden: Linear,
    output: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            input: LinearConfig::new(FEATURES, HIDDEN).init(device),
            hidden: LinearConfig::new(HIDDEN, HIDDEN).init(device),
            output: LinearConfig::new(HIDDEN, CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = relu(self.input.forward(x));
        let x = relu(self.hidden.forward(x));
        self.output.forward(x)
    }
}

/// Features and labels on the host.
struct Split {
    x: Vec<f32>,
    y: Vec<i64>,
}

impl Split {
    fn len(&self) -> usize {
        self.y.len()
    }

    fn only(&self, classes: std::ops::Range<i64>) -> Split {
        let mut out = Split {
            x: Vec::new(),
            y: Vec::new(),
        };
        for (i, label) in self.y.iter().enumerate() {
            if classes.contains(label) {
                out.x
                    .extend_from_slice(&self.x[i * FEATURES..(i + 1) * FEATURES]);
                out.y.push(*label);
            }
        }
        out
    }

    fn tensors(&self, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let x = Tensor::from_data(
            TensorData::new(self.x.clone(), [self.len(), FEATURES]),
            device,
        );
        let y = Tensor::from_data(TensorData::new(self.y.clone(), [self.len()]), device);
        (x, y)
    }
}

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller.
    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// 8 clusters with random centres; the noise makes them overlap a little.
fn data(seed: u64, per_class: usize) -> (Split, Split) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<f32> = (0..CLASSES * FEATURES)
        .map(|_| gaussian(&mut rng))
        .collect();
    let mut sample = |n: usize| {
        let mut split = Split {
            x: Vec::new(),
            y: Vec::new(),
        };
        for i in 0..n * CLASSES {
            let class = i % CLASSES;
            for f in 0..FEATURES {
                split
                    .x
                    .push(centres[class * FEATURES + f] + 1.5 * gaussian(&mut rng));
            }
            split.y.push(class as i64);
        }
        split
    };
    (sample(per_class), sample(per_class / 2))
}

fn train(mut model: Mlp, split: &Split, steps: usize, lr: f64, device: &Device) -> Mlp {
    let mut optim = AdamConfig::new().init();
    let (x, y) = split.tensors(device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    for _ in 0..steps {
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    model
}

/// Held-out accuracy and cross-entropy loss.
fn evaluate(model: &Mlp, split: &Split, device: &Device) -> (f64, f64) {
    let model = model.valid();
    let device = device.clone().inner();
    let (x, y) = split.tensors(&device);
    let logits = model.forward(x);
    let loss = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits.clone(), y.clone())
        .into_scalar::<f32>() as f64;
    let correct = logits
        .argmax(1)
        .squeeze::<1>()
        .equal(y)
        .int()
        .sum()
        .into_scalar::<i64>();
    (correct as f64 / split.len() as f64, loss)
}

fn device() -> Device {
    #[cfg(feature = "wgpu")]
    let device = Device::wgpu(Default::default());
    #[cfg(not(feature = "wgpu"))]
    let device = Device::flex();
    device.autodiff()
}

fn main() -> Result<(), MergeError> {
    let mut seed = 7;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!(
                    "mlp_merge: trains two fine-tunes of one small MLP and prints what SLERP and \
                     linear merges of them score on held-out data.\n\n\
                     Usage: cargo run --release --example mlp_merge [--features wgpu] [-- --seed N]\n\n\
                     Options:\n  --seed N    seed of the data set and the initialisation (default 7)\n  \
                     -h, --help  print this help"
                );
                return Ok(());
            }
            "--seed" => {
                seed = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage("--seed needs a number"));
            }
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let started = std::time::Instant::now();
    let device = device();
    println!("device: {device:?}");

    // 1. Data.
    let (train_all, test) = data(seed, 500);
    let (first, second) = (train_all.only(0..4), train_all.only(4..8));
    println!(
        "data: {} training samples ({} in classes 0-3, {} in classes 4-7), {} held out",
        train_all.len(),
        first.len(),
        second.len(),
        test.len()
    );

    // 2. A base trained briefly on everything, then two fine-tunes of it.
    device.seed(seed);
    let base = train(Mlp::new(&device), &train_all, 10, 3e-3, &device);
    let tuned_a = train(base.clone(), &first, 100, 2e-3, &device);
    let tuned_b = train(base.clone(), &second, 100, 2e-3, &device);
    let (acc, loss) = evaluate(&base, &test, &device);
    println!("base (10 steps on all classes): accuracy {acc:.3}, loss {loss:.3}");

    // 3. The spectrum between the two fine-tunes: a sweep, scored by held-out accuracy.
    let ts: Vec<f64> = (0..=10).map(|step| step as f64 / 10.0).collect();
    let score = |model: &Mlp, _t: f64| evaluate(model, &test, &device).0;
    let slerp = SlerpMerger::new(SlerpConfig::new(0.5))?;
    let lerp = SlerpMerger::new(SlerpConfig::new(0.5).with_method(Method::Lerp))?;
    let slerp_sweep = slerp.sweep(&tuned_a, &tuned_b, ts.iter().copied(), score)?;
    let lerp_sweep = lerp.sweep(&tuned_a, &tuned_b, ts.iter().copied(), score)?;
    println!("\nfine-tune A (classes 0-3) at t = 0 ... fine-tune B (classes 4-7) at t = 1");
    println!("   t | SLERP acc | lerp acc");
    println!("-----+-----------+---------");
    for (s, l) in slerp_sweep.points.iter().zip(&lerp_sweep.points) {
        println!("{:>4.1} | {:>9.3} | {:>8.3}", s.t, s.score, l.score);
    }
    if let Some(best) = slerp_sweep.best {
        println!(
            "best SLERP merge: t = {:.1}, accuracy {:.3}",
            best.t, best.score
        );
    }
    println!("\nSLERP accuracy against t:\n{}", slerp_sweep.plot(8));

    // 4. Task vectors: the fine-tunes' differences from the base, merged on the sphere.
    let plain = slerp.merge(&tuned_a, &tuned_b)?;
    let task = slerp.merge_with_base(&base, &tuned_a, &tuned_b)?;
    let (pa, pl) = evaluate(&plain, &test, &device);
    let (ta, tl) = evaluate(&task, &test, &device);
    println!(
        "t = 0.5: SLERP of the weights gives accuracy {pa:.3} (loss {pl:.3}); SLERP of the task \
         vectors from the base gives {ta:.3} (loss {tl:.3})"
    );

    // 5. A recipe: the hidden layer leans to A, the output layer to B; the plan and the report.
    let recipe = SlerpConfig::new(0.5).with_schedule(Some(
        Schedule::new()
            .with_rule("hidden.*", 0.3.into())
            .with_rule("output.*", 0.7.into()),
    ));
    let merger = SlerpMerger::new(recipe)?;
    println!("\nplan:\n{}", merger.plan(&tuned_a, &tuned_b)?);
    let (merged, report) = merger.merge_with_report(&tuned_a, &tuned_b)?;
    let (ra, rl) = evaluate(&merged, &test, &device);
    println!("report:\n{report}recipe merge: accuracy {ra:.3}, loss {rl:.3}");

    // 6. Contrast: no common ancestor.
    device.seed(seed + 1);
    let lone_a = train(Mlp::new(&device), &first, 180, 3e-3, &device);
    let lone_b = train(Mlp::new(&device), &second, 180, 3e-3, &device);
    let (ea, _) = evaluate(&lone_a, &test, &device);
    let (eb, _) = evaluate(&lone_b, &test, &device);
    let (merged, report) = slerp.merge_with_report(&lone_a, &lone_b)?;
    let (sa, sl) = evaluate(&merged, &test, &device);
    println!(
        "\nindependently initialised pair (accuracy {ea:.3} and {eb:.3} alone): SLERP at t = 0.5 \
         gives accuracy {sa:.3}, loss {sl:.3}. Merging presumes relatives; the report says:"
    );
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn usage(message: &str) -> ! {
    eprintln!("error: {message}\nrun with --help for usage");
    std::process::exit(2)
}
