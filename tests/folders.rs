//! Hugging Face model folders, PyTorch checkpoints and the local hub cache on the command line,
//! end to end: every input layout, the errors, the loadable output folder, and `--base`.
//! Expected values are literals (the PyTorch fixtures, made once by
//! `tests/fixtures/pytorch/make.py`) or f64 references written here.

#[allow(dead_code, unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::DType;
use half::bf16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use common::scratch::Scratch;

fn scratch(name: &str) -> Scratch {
    common::scratch::scratch("folders", name)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch")
        .join(name)
}

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_burn-slerp"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn succeeds(args: &[&str]) -> Output {
    let o = run(args, &[]);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Name → (dtype, shape, bytes) of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

fn bf16s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
        .collect()
}

/// The fixtures' values, as `make.py` writes them: A's `w[k] = k/8 − 0.5`, B's
/// `w[k] = (11 − k)/16 − 0.25`, `wt` the transpose, `w_tied` the same storage as `w`.
fn fixture_w(a: bool) -> Vec<f64> {
    (0..12)
        .map(|k| {
            let k = k as f64;
            if a {
                k / 8.0 - 0.5
            } else {
                (11.0 - k) / 16.0 - 0.25
            }
        })
        .collect()
}

fn transposed(w: &[f64]) -> Vec<f64> {
    // [3, 4] → [4, 3].
    (0..4)
        .flat_map(|j| (0..3).map(move |i| (i, j)))
        .map(|(i, j)| w[4 * i + j])
        .collect()
}

fn fixture_h(a: bool) -> Vec<f64> {
    if a {
        vec![1.5, -2.25, 0.125]
    } else {
        vec![0.75, 1.0, -0.5]
    }
}

/// Every PyTorch layout of A: the file (zip and legacy formats), a folder with
/// `pytorch_model.bin`, and a folder of two shards with `pytorch_model.bin.index.json`.
fn pytorch_layouts(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join("pt-folder");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::copy(fixture("a.pt"), single.join("pytorch_model.bin")).unwrap();
    let sharded = dir.join("pt-sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let shards = [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ];
    std::fs::copy(fixture("a-00001-of-00002.bin"), sharded.join(shards[0])).unwrap();
    std::fs::copy(fixture("a-00002-of-00002.bin"), sharded.join(shards[1])).unwrap();
    let index = serde_json::json!({
        "metadata": {"total_size": 160},
        "weight_map": {
            "w": shards[0], "wt": shards[0], "w_tied": shards[0],
            "h": shards[1], "step": shards[1],
        }
    });
    std::fs::write(
        sharded.join("pytorch_model.bin.index.json"),
        index.to_string(),
    )
    .unwrap();
    vec![fixture("a.pt"), fixture("a_legacy.pt"), single, sharded]
}

#[test]
fn pytorch_checkpoints_read_as_their_values() {
    let dir = scratch("pytorch");
    let mut merged_files = Vec::new();
    for (i, a) in pytorch_layouts(&dir).into_iter().enumerate() {
        // t = 0 writes A's tensors as they are: the values torch saved, layouts included.
        let out = dir.join(format!("copy-{i}.safetensors"));
        succeeds(&[
            "merge",
            s(&a),
            s(&fixture("b.bin")),
            "-o",
            s(&out),
            "-t",
            "0",
            "-q",
        ]);
        let got = tensors(&out);
        let w = fixture_w(true);
        assert_eq!(got["w"].1, [3, 4], "{}", a.display());
        assert_eq!(f32s(&got["w"].2), w, "{}", a.display());
        assert_eq!(got["wt"].1, [4, 3]);
        assert_eq!(
            f32s(&got["wt"].2),
            transposed(&w),
            "the transposed view, in its order"
        );
        assert_eq!(f32s(&got["w_tied"].2), w, "tied storage read twice");
        assert_eq!(got["h"].0, Dtype::BF16);
        assert_eq!(bf16s(&got["h"].2), fixture_h(true));
        assert_eq!(got["step"].0, Dtype::I64);
        assert_eq!(got["step"].2, 7i64.to_le_bytes());

        // t = 0.3 against the f64 reference of the literals.
        let out = dir.join(format!("merged-{i}.safetensors"));
        succeeds(&[
            "merge",
            s(&a),
            s(&fixture("b.bin")),
            "-o",
            s(&out),
            "-t",
            "0.3",
            "-q",
        ]);
        let got = tensors(&out);
        let want = common::reference(&w, &fixture_w(false), 0.3, 1e-8, None);
        let err = common::rel_l2(
            &f32s(&got["w"].2)
                .iter()
                .map(|v| *v as f32)
                .collect::<Vec<_>>(),
            &want,
        );
        assert!(err <= 1e-6, "w: relative error {err:e}");
        let want_h = common::reference(&fixture_h(true), &fixture_h(false), 0.3, 1e-8, None);
        for (g, w) in bf16s(&got["h"].2).iter().zip(&want_h) {
            assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "h: {g} vs {w}");
        }
        merged_files.push(std::fs::read(&out).unwrap());
    }
    // Every layout of the same tensors gives the same file.
    assert!(merged_files.windows(2).all(|w| w[0] == w[1]));
}

/// A safetensors checkpoint of [`model`] tensors, as the safetensors crate writes it.
fn write(path: &Path, seed: u64) {
    let specs = spec(seed);
    let bytes: Vec<Vec<u8>> = specs
        .iter()
        .map(|(_, v)| v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect())
        .collect();
    let views = specs.iter().zip(&bytes).map(|((name, _), b)| {
        let shape = if name.ends_with("weight") {
            vec![4, 6]
        } else {
            vec![24]
        };
        (
            name.to_string(),
            TensorView::new(Dtype::F32, shape, b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn spec(seed: u64) -> Vec<(&'static str, Vec<f64>)> {
    let values = |s: u64| -> Vec<f64> {
        let mut x = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..24)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    };
    vec![
        ("model.layers.0.weight", values(seed)),
        ("model.layers.1.weight", values(seed + 1)),
        ("model.norm.bias", values(seed + 2)),
    ]
}

/// A model folder as `save_pretrained` lays it out, with the files a merged folder copies and
/// one it must not (`training_args.bin`).
fn model_folder(dir: &Path, name: &str, seed: u64, tokenizer: &str) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir_all(folder.join("additional_chat_templates")).unwrap();
    write(&folder.join("model.safetensors"), seed);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "float32",
        "hidden_size": 6,
        "auto_map": {"AutoModel": "modeling_custom.CustomModel"},
    });
    std::fs::write(
        folder.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        folder.join("generation_config.json"),
        "{\"do_sample\": false}\n",
    )
    .unwrap();
    std::fs::write(folder.join("modeling_custom.py"), "# custom code\n").unwrap();
    std::fs::write(folder.join("tokenizer.json"), tokenizer).unwrap();
    std::fs::write(
        folder.join("tokenizer_config.json"),
        "{\"model_max_length\": 8}",
    )
    .unwrap();
    std::fs::write(folder.join("special_tokens_map.json"), "{}").unwrap();
    std::fs::write(
        folder.join("additional_chat_templates/tool.jinja"),
        "{{ x }}",
    )
    .unwrap();
    std::fs::write(folder.join("training_args.bin"), b"not for the output").unwrap();
    folder
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = walk(dir, dir);
    names.sort();
    names
}

fn walk(root: &Path, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(root, &path));
        } else {
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    out
}

#[test]
fn model_folders_in_give_loadable_folders_out() {
    let dir = scratch("folders");
    let a = model_folder(&dir, "a", 1, "{\"tokenizer\": \"A\"}");
    let b = model_folder(&dir, "b", 10, "{\"tokenizer\": \"B\"}");
    // The file-to-file merge of the same weights, for the bits.
    let flat = dir.join("flat.safetensors");
    succeeds(&[
        "merge",
        s(&a.join("model.safetensors")),
        s(&b.join("model.safetensors")),
        "-o",
        s(&flat),
        "-t",
        "0.4",
        "--out-dtype",
        "bf16",
        "-q",
    ]);
    let out = dir.join("merged");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0.4",
        "--out-dtype",
        "bf16",
        "-q",
    ]);
    assert_eq!(
        listing(&out),
        [
            "README.md",
            "additional_chat_templates/tool.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "modeling_custom.py",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
        "A's files, the weights and the card; nothing else"
    );
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == std::fs::read(&flat).unwrap());
    for file in [
        "generation_config.json",
        "modeling_custom.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "additional_chat_templates/tool.jinja",
    ] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(a.join(file)).unwrap(),
            "{file} is A's, byte for byte"
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16", "the output dtype");
    assert_eq!(config["hidden_size"], 6);
    assert!(config.get("dtype").is_none());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(s(&a)) && card.contains(s(&b)) && card.contains("\"t\": 0.4"),
        "{card}"
    );

    // B's tokenizer on request; without --out-dtype the config is A's, byte for byte.
    let out_b = dir.join("merged-b");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out_b),
        "-t",
        "0.4",
        "--tokenizer-source",
        "b",
        "-q",
    ]);
    assert_eq!(
        std::fs::read(out_b.join("tokenizer.json")).unwrap(),
        b"{\"tokenizer\": \"B\"}"
    );
    assert_eq!(
        std::fs::read(out_b.join("config.json")).unwrap(),
        std::fs::read(a.join("config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(out_b.join("generation_config.json")).unwrap(),
        std::fs::read(a.join("generation_config.json")).unwrap()
    );

    // A file output from folder inputs is the weights alone, as before.
    let single = dir.join("single.safetensors");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&single),
        "-t",
        "0.4",
        "--out-dtype",
        "bf16",
        "-q",
    ]);
    assert!(std::fs::read(&single).unwrap() == std::fs::read(&flat).unwrap());

    // A sharded folder A: the same shards and an index, and A's other files.
    let sharded = dir.join("a-sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(a.join(file), sharded.join(file)).unwrap();
    }
    let specs = spec(1);
    let part = |names: &[&str], file: &str| {
        let bytes: Vec<(String, Vec<u8>)> = specs
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = bytes.iter().map(|(n, b)| {
            let shape = if n.ends_with("weight") {
                vec![4, 6]
            } else {
                vec![24]
            };
            (n.clone(), TensorView::new(Dtype::F32, shape, b).unwrap())
        });
        safetensors::serialize_to_file(views, None, &sharded.join(file)).unwrap();
    };
    part(
        &["model.layers.0.weight"],
        "model-00001-of-00002.safetensors",
    );
    part(
        &["model.layers.1.weight", "model.norm.bias"],
        "model-00002-of-00002.safetensors",
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "model.layers.0.weight": "model-00001-of-00002.safetensors",
        "model.layers.1.weight": "model-00002-of-00002.safetensors",
        "model.norm.bias": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let out_s = dir.join("merged-sharded");
    succeeds(&[
        "merge",
        s(&sharded),
        s(&b),
        "-o",
        s(&out_s),
        "-t",
        "0.4",
        "-q",
    ]);
    assert_eq!(
        listing(&out_s),
        [
            "README.md",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    );
    let flat32 = dir.join("flat32.safetensors");
    succeeds(&[
        "merge",
        s(&a.join("model.safetensors")),
        s(&b.join("model.safetensors")),
        "-o",
        s(&flat32),
        "-t",
        "0.4",
        "-q",
    ]);
    let mut merged = tensors(&out_s.join("model-00001-of-00002.safetensors"));
    merged.extend(tensors(&out_s.join("model-00002-of-00002.safetensors")));
    assert_eq!(merged, tensors(&flat32));
}

#[test]
fn folders_without_a_checkpoint_are_errors() {
    let dir = scratch("folder-errors");
    let (b, out) = (dir.join("b.safetensors"), dir.join("out.safetensors"));
    write(&b, 2);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(
        &["merge", s(&empty), s(&b), "-o", s(&out), "-t", "0.5"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(s(&empty))
            && e.contains("model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin"),
        "{e}"
    );
    // An index naming a shard that is not there.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let index = serde_json::json!({"weight_map": {"w": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        broken.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let o = run(
        &["merge", s(&broken), s(&b), "-o", s(&out), "-t", "0.5"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("model-00001-of-00002.safetensors"),
        "{}",
        stderr(&o)
    );
    // A PyTorch index naming a shard that is not there.
    let broken_pt = dir.join("broken-pt");
    std::fs::create_dir_all(&broken_pt).unwrap();
    let index = serde_json::json!({"weight_map": {"w": "pytorch_model-00001-of-00002.bin"}});
    std::fs::write(
        broken_pt.join("pytorch_model.bin.index.json"),
        index.to_string(),
    )
    .unwrap();
    let o = run(
        &["merge", s(&broken_pt), s(&b), "-o", s(&out), "-t", "0.5"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("pytorch_model-00001-of-00002.bin"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// A fake Hugging Face cache: `models--org--name/{refs,snapshots,blobs}`, snapshot files as
/// relative symbolic links into `blobs/`, as `huggingface_hub` lays them out.
#[cfg(unix)]
fn fake_cache(cache: &Path, repo: &str, revisions: &[(&str, &str, u64)]) {
    let model = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(model.join("blobs")).unwrap();
    std::fs::create_dir_all(model.join("refs")).unwrap();
    for (i, (reference, commit, seed)) in revisions.iter().enumerate() {
        std::fs::write(model.join("refs").join(reference), commit).unwrap();
        let snapshot = model.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        let weights = model.join("blobs").join(format!("weights{i}"));
        write(&weights, *seed);
        let config = model.join("blobs").join(format!("config{i}"));
        std::fs::write(
            &config,
            format!("{{\"torch_dtype\": \"float32\", \"seed\": {seed}}}"),
        )
        .unwrap();
        for (link, blob) in [("model.safetensors", &weights), ("config.json", &config)] {
            let target = Path::new("../../blobs").join(blob.file_name().unwrap());
            std::os::unix::fs::symlink(target, snapshot.join(link)).unwrap();
        }
    }
}

#[cfg(unix)]
#[test]
fn hub_names_are_found_in_the_local_cache() {
    let dir = scratch("hub");
    let cache = dir.join("cache");
    let main = "0123456789abcdef0123456789abcdef01234567";
    let tagged = "fedcba9876543210fedcba9876543210fedcba98";
    fake_cache(
        &cache,
        "org/model-a",
        &[("main", main, 1), ("v1", tagged, 5)],
    );
    let b = dir.join("b.safetensors");
    write(&b, 10);
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let merge =
        |a: &str, out: &Path| run(&["merge", a, s(&b), "-o", s(out), "-t", "0.5", "-q"], &env);
    // By name (main), by tag, by commit: the snapshot each names.
    let expect = |seed: u64, out: &Path| {
        let reference = dir.join(format!("ref-{seed}.safetensors"));
        let a = dir.join(format!("a-{seed}.safetensors"));
        write(&a, seed);
        succeeds(&[
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&reference),
            "-t",
            "0.5",
            "-q",
        ]);
        assert!(
            std::fs::read(out.join("model.safetensors")).unwrap()
                == std::fs::read(&reference).unwrap()
        );
        let config = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(config.contains(&format!("\"seed\": {seed}")), "{config}");
        assert!(
            !out.join("config.json").is_symlink(),
            "the blob is copied, not the link"
        );
    };
    for (name, seed) in [
        ("org/model-a".to_string(), 1),
        ("org/model-a@v1".to_string(), 5),
        (format!("org/model-a@{main}"), 1),
    ] {
        let out = dir.join(format!("out-{}", name.replace(['/', '@'], "_")));
        let o = merge(&name, &out);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        expect(seed, &out);
    }
    // HF_HOME/hub is looked at when HF_HUB_CACHE is not set.
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let out = dir.join("out-home");
    let o = run(
        &[
            "merge",
            "org/model-a",
            s(&b),
            "-o",
            s(&out),
            "-t",
            "0.5",
            "-q",
        ],
        &[("HF_HOME", home.as_path())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    expect(1, &out);
    let cache = home.join("hub");
    // Offline (the network is never reached in tests): where it looked, and for a revision
    // that is not there, the snapshots there are.
    let env = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_HUB_OFFLINE", Path::new("1")),
    ];
    let out = dir.join("never");
    let o = run(
        &["merge", "org/other", s(&b), "-o", s(&out), "-t", "0.5"],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(s(&cache)) && stderr(&o).contains("nothing is downloaded"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &["merge", "org/model-a@v2", s(&b), "-o", s(&out), "-t", "0.5"],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("v2") && e.contains(main) && e.contains(tagged),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn base_gives_task_vector_slerp() {
    let dir = scratch("base");
    let (a, b, base) = (
        dir.join("a.safetensors"),
        dir.join("b.safetensors"),
        dir.join("base.safetensors"),
    );
    write(&a, 1);
    write(&b, 10);
    write(&base, 20);
    let out = dir.join("out.safetensors");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "--base",
        s(&base),
        "-o",
        s(&out),
        "-t",
        "0.3",
        "-q",
    ]);
    let got = tensors(&out);
    let stored = |seed: u64| -> BTreeMap<&'static str, Vec<f64>> {
        spec(seed)
            .into_iter()
            .map(|(n, v)| (n, v.iter().map(|x| *x as f32 as f64).collect()))
            .collect()
    };
    let (sa, sb, sbase) = (stored(1), stored(10), stored(20));
    for (name, (_, _, bytes)) in &got {
        let (x, y, z) = (
            &sa[name.as_str()],
            &sb[name.as_str()],
            &sbase[name.as_str()],
        );
        let da: Vec<f64> = x.iter().zip(z).map(|(x, z)| x - z).collect();
        let db: Vec<f64> = y.iter().zip(z).map(|(y, z)| y - z).collect();
        let want: Vec<f64> = common::reference(&da, &db, 0.3, 1e-8, None)
            .iter()
            .zip(z)
            .map(|(d, z)| z + d)
            .collect();
        let got: Vec<f32> = f32s(bytes).iter().map(|v| *v as f32).collect();
        let err = common::rel_l2(&got, &want);
        assert!(err <= 1e-6, "{name}: relative error {err:e}");
    }
    // A base that lacks a tensor, or has another shape: refused, naming it.
    let short = dir.join("short.safetensors");
    let v: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let views = [(
        "model.layers.0.weight",
        TensorView::new(Dtype::F32, vec![6, 4], &v).unwrap(),
    )];
    safetensors::serialize_to_file(views, None, &short).unwrap();
    let o = run(
        &[
            "merge",
            s(&a),
            s(&b),
            "--base",
            s(&short),
            "-o",
            s(&out),
            "-t",
            "0.3",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("model.layers.0.weight") && stderr(&o).contains("[6, 4]"),
        "{}",
        stderr(&o)
    );
    let views = [(
        "model.layers.0.weight",
        TensorView::new(Dtype::F32, vec![4, 6], &v).unwrap(),
    )];
    safetensors::serialize_to_file(views, None, &short).unwrap();
    let o = run(
        &[
            "merge",
            s(&a),
            s(&b),
            "--base",
            s(&short),
            "-o",
            s(&out),
            "-t",
            "0.3",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("model.layers.1.weight, model.norm.bias"),
        "{}",
        stderr(&o)
    );
}

/// A checkpoint of one `[4, 6]` tensor `w` (f32) and one integer tensor.
fn write_w(path: &Path, w: &[f64]) {
    let bytes: Vec<u8> = w.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
    let step = 3i64.to_le_bytes();
    let views = [
        (
            "w",
            TensorView::new(Dtype::F32, vec![4, 6], &bytes).unwrap(),
        ),
        ("step", TensorView::new(Dtype::I64, vec![1], &step).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn mean_of_checkpoints_matches_the_closed_forms() {
    let dir = scratch("mean");
    let stored = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|x| *x as f32 as f64).collect() };
    let x: Vec<f64> = stored(spec(1)[0].1.clone());
    // y with x's norm: for two models of equal norms, weights (1 − t, t) give the slerp.
    let raw = spec(2)[0].1.clone();
    let y: Vec<f64> = stored(raw.iter().map(|v| v * norm(&x) / norm(&raw)).collect());
    let z: Vec<f64> = stored(spec(3)[0].1.clone());
    let (a, b, c) = (
        dir.join("a.safetensors"),
        dir.join("b.safetensors"),
        dir.join("c.safetensors"),
    );
    write_w(&a, &x);
    write_w(&b, &y);
    write_w(&c, &z);
    let out = dir.join("two.safetensors");
    succeeds(&[
        "mean",
        s(&a),
        s(&b),
        "--weights",
        "0.7,0.3",
        "-o",
        s(&out),
        "-q",
    ]);
    let got = tensors(&out);
    let want = common::reference(&x, &y, 0.3, 1e-8, None);
    let w: Vec<f32> = f32s(&got["w"].2).iter().map(|v| *v as f32).collect();
    let err = common::rel_l2(&w, &want);
    assert!(err <= 1e-6, "relative error {err:e}");
    assert_eq!(
        got["step"].2,
        3i64.to_le_bytes(),
        "integer tensors are the first input's"
    );

    // Three: the Karcher condition in f64 (Σ wᵢ log_m(uᵢ) = 0) and the weighted mean of norms.
    let out = dir.join("three.safetensors");
    let report = dir.join("mean.json");
    succeeds(&[
        "mean",
        s(&a),
        s(&b),
        s(&c),
        "--weights",
        "0.5,0.3,0.2",
        "-o",
        s(&out),
        "--report",
        s(&report),
        "-q",
    ]);
    let m = f32s(&tensors(&out)["w"].2);
    let weights = [0.5, 0.3, 0.2];
    let inputs = [&x, &y, &z];
    let norm_mean: f64 = inputs.iter().zip(weights).map(|(v, w)| w * norm(v)).sum();
    assert!((norm(&m) - norm_mean).abs() <= 1e-6 * norm_mean);
    let unit: Vec<f64> = m.iter().map(|v| v / norm(&m)).collect();
    let mut step = vec![0.0; unit.len()];
    for (v, w) in inputs.iter().zip(weights) {
        let u: Vec<f64> = v.iter().map(|x| x / norm(v)).collect();
        let cos: f64 = u
            .iter()
            .zip(&unit)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            .clamp(-1.0, 1.0);
        let theta = cos.acos();
        let scale = if theta < 1e-12 {
            1.0
        } else {
            theta / theta.sin()
        };
        for ((s, u), m) in step.iter_mut().zip(&u).zip(&unit) {
            *s += w * scale * (u - cos * m);
        }
    }
    assert!(
        norm(&step) <= 1e-5,
        "Karcher condition: |step| = {:e}",
        norm(&step)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json[0]["path"], "w");

    // One weight per checkpoint; every input holds what the first two average.
    let o = run(
        &[
            "mean",
            s(&a),
            s(&b),
            s(&c),
            "--weights",
            "0.5,0.5",
            "-o",
            s(&out),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("2 weights for 3 checkpoints"),
        "{}",
        stderr(&o)
    );
    let lacking = dir.join("lacking.safetensors");
    let step_bytes = 3i64.to_le_bytes();
    let views = [(
        "step",
        TensorView::new(Dtype::I64, vec![1], &step_bytes).unwrap(),
    )];
    safetensors::serialize_to_file(views, None, &lacking).unwrap();
    let o = run(
        &[
            "mean",
            s(&a),
            s(&b),
            s(&lacking),
            "-o",
            s(&dir.join("x.safetensors")),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("input 3 lacks tensors A and B merge: [w]"),
        "{}",
        stderr(&o)
    );
}

/// `burn-slerp mean` (every method) and `merge --base` write the bits the library computes in
/// memory on the same tensors: the file merge runs the same engine on its memory maps.
#[test]
fn mean_and_base_files_equal_the_library_in_memory() {
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::tensor::{Device, Tensor, TensorData};
    use burn_slerp::{MeanMethod, SlerpConfig, SlerpMerger, SphericalMean};

    let dir = scratch("engine");
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| dir.join(format!("{i}.safetensors")))
        .collect();
    for (path, seed) in paths.iter().zip([31, 32, 33]) {
        write(path, seed);
    }
    let device = Device::flex();
    let stored = |seed: u64| -> BTreeMap<&'static str, Vec<f32>> {
        spec(seed)
            .into_iter()
            .map(|(n, v)| (n, v.iter().map(|x| *x as f32).collect()))
            .collect()
    };
    let inputs = [stored(31), stored(32), stored(33)];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let flat = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    for (arg, method) in [
        ("karcher", MeanMethod::Karcher),
        (
            "mergekit-karcher",
            MeanMethod::MergekitKarcher {
                max_iter: 10,
                tol: 1e-5,
            },
        ),
        (
            "multislerp",
            MeanMethod::Multislerp {
                normalize_weights: true,
                eps: 1e-8,
            },
        ),
        ("linear", MeanMethod::Linear),
    ] {
        let out = dir.join(format!("{arg}.safetensors"));
        succeeds(&[
            "mean",
            s(&paths[0]),
            s(&paths[1]),
            s(&paths[2]),
            "--weights",
            "0.5,0.3,0.2",
            "--method",
            arg,
            "-o",
            s(&out),
            "-q",
        ]);
        let mean = SphericalMean::new(vec![0.5, 0.3, 0.2])
            .unwrap()
            .with_method(method);
        for (name, (_, _, bytes)) in tensors(&out) {
            let tensors = inputs.iter().map(|m| flat(&m[name.as_str()])).collect();
            let (want, _) = mean.mean(tensors).unwrap();
            let want: Vec<f32> = want.into_data().iter::<f32>().collect();
            let got: Vec<f32> = f32s(&bytes).iter().map(|v| *v as f32).collect();
            assert_eq!(bits(&got), bits(&want), "{arg}: {name}");
        }
    }
    // nuslerp takes two checkpoints: three are refused before anything is written.
    let refused = dir.join("nuslerp.safetensors");
    let o = run(
        &[
            "mean",
            s(&paths[0]),
            s(&paths[1]),
            s(&paths[2]),
            "--method",
            "nuslerp",
            "-o",
            s(&refused),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("nuslerp merges exactly two models, got 3"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 3 + 4);
    // The mean of task vectors: the first two inputs over the third as their base.
    let out = dir.join("mean-base.safetensors");
    succeeds(&[
        "mean",
        s(&paths[0]),
        s(&paths[1]),
        "--base",
        s(&paths[2]),
        "--weights",
        "0.6,0.4",
        "--method",
        "multislerp",
        "-o",
        s(&out),
        "-q",
    ]);
    let mean = SphericalMean::new(vec![0.6, 0.4])
        .unwrap()
        .with_method(MeanMethod::Multislerp {
            normalize_weights: true,
            eps: 1e-8,
        });
    for (name, (_, _, bytes)) in tensors(&out) {
        let base = flat(&inputs[2][name.as_str()]);
        let tensors = inputs[..2]
            .iter()
            .map(|m| flat(&m[name.as_str()]))
            .collect();
        let (want, _) = mean.mean_with_base(base, tensors).unwrap();
        let want: Vec<f32> = want.into_data().iter::<f32>().collect();
        let got: Vec<f32> = f32s(&bytes).iter().map(|v| *v as f32).collect();
        assert_eq!(bits(&got), bits(&want), "mean --base: {name}");
    }
    let out = dir.join("base.safetensors");
    succeeds(&[
        "merge",
        s(&paths[0]),
        s(&paths[1]),
        "--base",
        s(&paths[2]),
        "-o",
        s(&out),
        "-t",
        "0.3",
        "-q",
    ]);
    let merger = SlerpMerger::new(SlerpConfig::new(0.3)).unwrap();
    let layer = |v: &[f32]| Linear {
        weight: Param::from_tensor(Tensor::<2>::from_data(
            TensorData::new(v.to_vec(), [4, 6]),
            &device,
        )),
        bias: None,
    };
    for (name, (_, _, bytes)) in tensors(&out) {
        let [a, b, base] = [0, 1, 2].map(|i| layer(&inputs[i][name.as_str()]));
        let want: Vec<f32> = merger
            .merge_with_base(&base, &a, &b)
            .unwrap()
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .collect();
        let got: Vec<f32> = f32s(&bytes).iter().map(|v| *v as f32).collect();
        assert_eq!(bits(&got), bits(&want), "--base: {name}");
    }
}

/// What burn-store's PyTorch reader returns for a file, by name: dtype, shape and bytes;
/// `None` where it refuses the file, or panics on it.
type Read = BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn read_with_burn_store(path: &Path) -> Option<Read> {
    use burn::store::{ModuleStore, PytorchStore};
    std::panic::catch_unwind(|| {
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        let all = store.get_all_tensors().ok()?;
        all.iter()
            .map(|(name, t)| {
                let bytes = t.to_bytes().ok()?;
                Some((name.clone(), (t.dtype, t.shape.to_vec(), bytes.to_vec())))
            })
            .collect()
    })
    .ok()
    .flatten()
}

fn values_of(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => f32s(bytes),
        DType::BF16 => bf16s(bytes),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// A damaged input either fails with an error that names a file or a tensor, with nothing
/// written, or merges to what the f64 reference computes from the values the reader returns
/// for it (whole-tensor SLERP at t = 0.5, within the accuracy bar of its dtype; other dtypes
/// copied as they are).
fn check_damaged_merge(damaged: &Path, reader_path: &Path, b: &Path, out: &Path) {
    use burn_slerp::checkpoint::{CheckpointError, FileMerge, merge_files};
    let config =
        burn_slerp::SlerpConfig::new(0.5).with_granularity(burn_slerp::Granularity::Tensor);
    let options = FileMerge::new(config, burn::tensor::Device::flex());
    match merge_files(damaged, b, out, &options, |_| {}) {
        Err(e) => {
            assert!(!out.exists(), "{e}");
            let message = e.to_string();
            let names_something = matches!(
                e,
                CheckpointError::Pairing { .. }
                    | CheckpointError::Shape { .. }
                    | CheckpointError::DType { .. }
                    | CheckpointError::NonFinite { .. }
            ) || message.contains(s(damaged))
                || message.contains(s(damaged.parent().unwrap()));
            assert!(names_something, "{message}");
        }
        Ok(_) => {
            let read_a = read_with_burn_store(reader_path).expect("merged, so readable");
            let read_b = read_with_burn_store(b).unwrap();
            let got = tensors(out);
            for (name, (dtype, shape, bytes)) in &read_a {
                let Some((_, out_shape, out_bytes)) = got.get(name) else {
                    continue;
                };
                assert_eq!(out_shape, shape, "{name}");
                if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
                    assert_eq!(out_bytes, bytes, "{name}: copied as read");
                    continue;
                }
                let (a, b) = (values_of(*dtype, bytes), values_of(*dtype, &read_b[name].2));
                let want = common::reference(&a, &b, 0.5, 1e-8, None);
                let have = values_of(*dtype, out_bytes);
                let ulp = match dtype {
                    DType::BF16 => 1.0 / 128.0,
                    DType::F16 => 1.0 / 1024.0,
                    _ => 0.0,
                };
                if ulp == 0.0 {
                    let have: Vec<f32> = have.iter().map(|v| *v as f32).collect();
                    let err = common::rel_l2(&have, &want);
                    assert!(err <= 1e-6, "{name}: relative error {err:e}");
                } else {
                    for (h, w) in have.iter().zip(&want) {
                        assert!((h - w).abs() <= w.abs() * ulp + 1e-30, "{name}: {h} vs {w}");
                    }
                }
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 384,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    /// Damaged PyTorch files (zip and legacy pickle): truncated, a byte flipped, eight bytes
    /// overwritten (sizes, offsets, lengths in the archive or the pickle stream).
    #[test]
    fn damaged_pytorch_files_fail_clearly_or_merge_right(
        legacy in proptest::bool::ANY,
        kind in 0u8..3,
        at in 0usize..100_000,
        value in proptest::num::u64::ANY,
    ) {
        let valid = std::fs::read(fixture(if legacy { "a_legacy.pt" } else { "a.pt" })).unwrap();
        let mut v = valid.clone();
        let i = at % v.len();
        match kind {
            0 => v.truncate(i),
            1 => v[i] ^= (value as u8).max(1),
            _ => {
                let end = (i + 8).min(v.len());
                v[i..end].copy_from_slice(&value.to_le_bytes()[..end - i]);
            }
        }
        let dir = scratch("fuzz-pytorch");
        let damaged = dir.join("damaged.pt");
        std::fs::write(&damaged, &v).unwrap();
        check_damaged_merge(&damaged, &damaged, &fixture("b.bin"), &dir.join("out.safetensors"));
    }

    /// Damaged index files of sharded checkpoints (PyTorch and safetensors shards): bytes
    /// flipped or cut, and entries pointing at other shards, at files that are not there, out
    /// of the folder, or at non-strings.
    #[test]
    fn damaged_index_files_fail_clearly_or_merge_right(
        safetensors in proptest::bool::ANY,
        kind in 0u8..4,
        at in 0usize..10_000,
        value in 0u8..=255,
    ) {
        let dir = scratch("fuzz-index");
        let layouts = pytorch_layouts(&dir);
        let mut folder = layouts[3].clone();
        if safetensors {
            // The same shards, as safetensors: A at t = 0 into a folder keeps A's shards.
            let converted = dir.join("st-sharded");
            succeeds(&["merge", s(&folder), s(&fixture("b.bin")), "-o", s(&converted), "-t", "0", "-q"]);
            folder = converted;
        }
        let index = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| s(p).ends_with(".index.json"))
            .unwrap();
        let text = std::fs::read(&index).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let names: Vec<String> = json["weight_map"].as_object().unwrap().keys().cloned().collect();
        let name = &names[at % names.len()];
        let damaged = match kind {
            0 => { let mut t = text.clone(); t.truncate(at % t.len()); t }
            1 => { let mut t = text.clone(); let i = at % t.len(); t[i] ^= value.max(1); t }
            2 => {
                let shards: Vec<String> = std::fs::read_dir(&folder).unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                let choices = [
                    shards[value as usize % shards.len()].clone(),
                    "absent.safetensors".into(),
                    "../outside.bin".into(),
                    "/abs.bin".into(),
                    "".into(),
                ];
                json["weight_map"][name] = choices[value as usize % choices.len()].clone().into();
                serde_json::to_vec(&json).unwrap()
            }
            _ => {
                match value % 3 {
                    0 => { json["weight_map"].as_object_mut().unwrap().remove(name); }
                    1 => json["weight_map"][name] = serde_json::json!(value),
                    _ => json["weight_map"] = serde_json::json!([name]),
                }
                serde_json::to_vec(&json).unwrap()
            }
        };
        std::fs::write(&index, damaged).unwrap();
        let out = dir.join("out.safetensors");
        let config = burn_slerp::SlerpConfig::new(0.5).with_granularity(burn_slerp::Granularity::Tensor);
        let options = burn_slerp::checkpoint::FileMerge::new(config, burn::tensor::Device::flex());
        match burn_slerp::checkpoint::merge_files(&folder, &fixture("b.bin"), &out, &options, |_| {}) {
            Err(e) => {
                proptest::prop_assert!(!out.exists());
                let message = e.to_string();
                proptest::prop_assert!(
                    message.contains(s(&folder)) || matches!(e, burn_slerp::checkpoint::CheckpointError::Pairing { .. }),
                    "{}", message
                );
            }
            Ok(_) => {
                // Whatever the index says, each tensor is A's: its values are the fixture's.
                let got = tensors(&out);
                let w = fixture_w(true);
                let want = common::reference(&w, &fixture_w(false), 0.5, 1e-8, None);
                let err = common::rel_l2(&f32s(&got["w"].2).iter().map(|v| *v as f32).collect::<Vec<_>>(), &want);
                proptest::prop_assert!(err <= 1e-6, "w: {:e}", err);
                proptest::prop_assert_eq!(&got["step"].2, &7i64.to_le_bytes().to_vec());
            }
        }
    }
}
