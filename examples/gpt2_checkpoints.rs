//! Writes two GPT-2-small-shaped `.safetensors` checkpoints (Hugging Face names, PyTorch
//! layout), for trying the `burn-slerp` command on files of a realistic size.
//!
//! Usage: cargo run --release --features cli --example gpt2_checkpoints -- DIR [LAYERS]
//!
//! `LAYERS` (default 12, GPT-2 small) adds blocks of the same shapes: 64 layers give files of
//! about 2 GB with the same largest tensor. `B` is `A` plus 5% noise, as a fine-tune would be.
//! Tensors are generated one at a time while the file is written.

use std::borrow::Cow;
use std::path::PathBuf;

use safetensors::tensor::{Dtype, View};

struct Generated {
    shape: Vec<usize>,
    seed: u64,
    noise: Option<u64>,
}

/// A fast deterministic stream of values in [-0.05, 0.05).
fn stream(seed: u64, n: usize) -> impl Iterator<Item = f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    })
}

impl View for &Generated {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let base = stream(self.seed, n);
        let bytes: Vec<u8> = match self.noise {
            None => base.flat_map(f32::to_le_bytes).collect(),
            Some(noise) => base
                .zip(stream(noise, n))
                .flat_map(|(x, e)| (x + 0.05 * e).to_le_bytes())
                .collect(),
        };
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

fn shapes(layers: usize) -> Vec<(String, Vec<usize>)> {
    let d = 768;
    let mut out = vec![
        ("wte.weight".to_string(), vec![50257, d]),
        ("wpe.weight".to_string(), vec![1024, d]),
    ];
    for i in 0..layers {
        for (name, shape) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![3 * d, d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![4 * d, d]),
            ("mlp.c_fc.bias", vec![4 * d]),
            ("mlp.c_proj.weight", vec![d, 4 * d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            out.push((format!("h.{i}.{name}"), shape));
        }
    }
    out.push(("ln_f.weight".into(), vec![d]));
    out.push(("ln_f.bias".into(), vec![d]));
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: gpt2_checkpoints DIR [LAYERS]");
        std::process::exit(2);
    };
    let layers: usize = args
        .next()
        .map_or(12, |l| l.parse().expect("LAYERS is a number"));
    std::fs::create_dir_all(&dir).expect("DIR can be created");
    let shapes = shapes(layers);
    for (file, noise) in [("a.safetensors", false), ("b.safetensors", true)] {
        let tensors: Vec<(String, Generated)> = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let generated = Generated {
                    shape: shape.clone(),
                    seed: i as u64 + 1,
                    noise: noise.then_some(i as u64 + 100_000),
                };
                (name.clone(), generated)
            })
            .collect();
        let path = dir.join(file);
        safetensors::serialize_to_file(tensors.iter().map(|(n, g)| (n.clone(), g)), None, &path)
            .expect("the file can be written");
        let params: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        println!(
            "{}: {} tensors, {params} parameters",
            path.display(),
            shapes.len()
        );
    }
}
