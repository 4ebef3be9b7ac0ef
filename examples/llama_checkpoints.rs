//! Writes two Llama-2-7B-shaped model folders in bf16 (Hugging Face names and layout: two
//! safetensors shards, their index, `config.json`), for measuring `burn-slerp` at the size its
//! users merge: 6,738,415,616 parameters, about 13.5 GB per model.
//!
//! Usage: cargo run --release --features cli --example llama_checkpoints -- DIR [LAYERS]
//!
//! Writes `DIR/a` and `DIR/b`. `LAYERS` (default 32, Llama-2-7B) sets the number of decoder
//! layers (about 0.4 GB each). `B` is `A` plus 1% noise, as a fine-tune of `A` would be, so that
//! every tensor pair has a cosine above 0.9999 (mergekit's lerp branch; burn-slerp's sinc form).
//! Nothing holds a model in memory: each tensor is generated (in parallel, in chunks with seeds
//! of their own) when the writer reaches it, written, and dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};

/// Values generated per chunk (each chunk has its own seed, so chunks are independent).
const CHUNK: usize = 1 << 20;

/// A fast deterministic stream in [-1, 1), from a xorshift seeded by `seed`.
fn fill(seed: u64, out: &mut [f32]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
}

struct Generated {
    shape: Vec<usize>,
    /// The tensor's seed, and its scale.
    seed: u64,
    scale: f32,
    /// B: A's values plus this relative noise.
    noise: Option<f32>,
}

impl View for &Generated {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let mut bytes = vec![0u8; n * 2];
        bytes
            .par_chunks_mut(CHUNK * 2)
            .enumerate()
            .for_each(|(i, out)| {
                let len = out.len() / 2;
                let mut values = vec![0f32; len];
                let chunk_seed = self.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
                fill(chunk_seed, &mut values);
                let mut noise = vec![0f32; if self.noise.is_some() { len } else { 0 }];
                if self.noise.is_some() {
                    fill(chunk_seed ^ 0x005E_ED0F_B0B0, &mut noise);
                }
                for (j, pair) in out.chunks_exact_mut(2).enumerate() {
                    let mut v = values[j];
                    if let Some(level) = self.noise {
                        v += level * noise[j];
                    }
                    pair.copy_from_slice(&bf16::from_f32(v * self.scale).to_le_bytes());
                }
            });
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Llama-2-7B's tensors, in the order of its checkpoint, with a scale per kind.
fn tensors(layers: usize) -> Vec<(String, Vec<usize>, f32)> {
    let (d, ff, vocab) = (4096, 11008, 32000);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![vocab, d],
        0.02,
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![d, d], 0.02));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, d], 0.02));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![ff, d], 0.02));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, ff], 0.02));
        out.push((format!("{p}.input_layernorm.weight"), vec![d], 1.0));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d], 1.0));
    }
    out.push(("model.norm.weight".to_string(), vec![d], 1.0));
    out.push(("lm_head.weight".to_string(), vec![vocab, d], 0.02));
    out
}

/// Writes one model folder: shards of at most ~10 GB in order, the index, `config.json`.
fn write_model(dir: &Path, layers: usize, noise: Option<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    let all = tensors(layers);
    let limit = 10_000_000_000usize;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, (_, shape, _)) in all.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() * 2;
        if size + bytes > limit && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes;
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let generated: Vec<(String, Generated)> = members
            .iter()
            .map(|&i| {
                let (name, shape, scale) = &all[i];
                total += shape.iter().product::<usize>() * 2;
                weight_map.insert(name.clone(), file.clone());
                let tensor = Generated {
                    shape: shape.clone(),
                    seed: 1 + i as u64,
                    scale: *scale,
                    noise,
                };
                (name.clone(), tensor)
            })
            .collect();
        let views = generated.iter().map(|(name, t)| (name.clone(), t));
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize_to_file(views, metadata, &dir.join(&file)).unwrap();
        println!("{}", dir.join(&file).display());
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": layers,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: llama_checkpoints DIR [LAYERS]"));
    let layers = args
        .next()
        .map_or(32, |l| l.parse().expect("LAYERS is a number"));
    let params: usize = tensors(layers)
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    println!("{layers} layers, {params} parameters per model");
    write_model(&dir.join("a"), layers, None);
    write_model(&dir.join("b"), layers, Some(0.01));
}
