//! The `burn-slerp` command end to end, on small safetensors files written here; the merged
//! files are compared bit for bit with `slerp` on the same tensors in memory (flex).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use burn_slerp::checkpoint::{Checkpoint, FileMerge, Pairing, merge_files};
use burn_slerp::{SlerpConfig, slerp};
use half::{bf16, f16};
use proptest::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A scratch directory of its own per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-slerp-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One tensor to write: name, dtype, shape, f64 values (converted to the dtype).
type Spec = (&'static str, Dtype, Vec<usize>, Vec<f64>);

fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| match dtype {
            Dtype::F32 => (*v as f32).to_le_bytes().to_vec(),
            Dtype::F16 => f16::from_f64(*v).to_le_bytes().to_vec(),
            Dtype::BF16 => bf16::from_f64(*v).to_le_bytes().to_vec(),
            Dtype::I64 => (*v as i64).to_le_bytes().to_vec(),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn write(path: &Path, specs: &[Spec], metadata: Option<HashMap<String, String>>) {
    let bytes: Vec<Vec<u8>> = specs.iter().map(|(_, d, _, v)| encode(*d, v)).collect();
    let views: Vec<(String, TensorView<'_>)> = specs
        .iter()
        .zip(&bytes)
        .map(|((name, dtype, shape, _), b)| {
            (
                name.to_string(),
                TensorView::new(*dtype, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

fn values(seed: u64, n: usize) -> Vec<f64> {
    // A small deterministic generator: no RNG state shared with other tests.
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn model(seed: u64) -> Vec<Spec> {
    vec![
        ("embed.weight", Dtype::F16, vec![5, 3], values(seed, 15)),
        ("layers.0.w", Dtype::F32, vec![4, 6], values(seed + 1, 24)),
        ("layers.1.w", Dtype::F32, vec![4, 6], values(seed + 2, 24)),
        ("norm.b", Dtype::BF16, vec![6], values(seed + 3, 6)),
        ("step", Dtype::I64, vec![1], vec![seed as f64]),
    ]
}

fn pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write(&a, &model(1), Some(meta));
    write(&b, &model(10), None);
    (a, b)
}

fn burn_slerp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-slerp"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `slerp` of one tensor in memory, in the tensor's dtype, as little-endian bytes.
fn in_memory(dtype: Dtype, shape: &[usize], a: &[u8], b: &[u8], config: &SlerpConfig) -> Vec<u8> {
    let device = Device::flex();
    let load = |bytes: &[u8]| -> Tensor<2> {
        let values: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("{other:?}"),
        };
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        let n = values.len();
        let t = Tensor::<2>::from_data(TensorData::new(values, [rows, n / rows]), &device);
        match dtype {
            Dtype::F16 => t.cast(FloatDType::F16),
            Dtype::BF16 => t.cast(FloatDType::BF16),
            _ => t,
        }
    };
    let out = slerp(load(a), load(b), config).unwrap();
    match dtype {
        Dtype::F32 => out
            .into_data()
            .iter::<f32>()
            .flat_map(f32::to_le_bytes)
            .collect(),
        Dtype::F16 => out
            .into_data()
            .iter::<f32>()
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => out
            .into_data()
            .iter::<f32>()
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn merged_file_equals_the_in_memory_merge() {
    let dir = scratch("equal");
    let (a, b) = pair(&dir);
    let out = dir.join("out.safetensors");
    let report = dir.join("report.json");
    let o = burn_slerp(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0.3",
        "--report",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (fa, fb, fo) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&out).unwrap(),
    );
    let (ta, tb, to) = (
        SafeTensors::deserialize(&fa).unwrap(),
        SafeTensors::deserialize(&fb).unwrap(),
        SafeTensors::deserialize(&fo).unwrap(),
    );
    let config = SlerpConfig::new(0.3);
    for name in ["embed.weight", "layers.0.w", "layers.1.w", "norm.b"] {
        let (va, vb, vo) = (
            ta.tensor(name).unwrap(),
            tb.tensor(name).unwrap(),
            to.tensor(name).unwrap(),
        );
        assert_eq!(vo.dtype(), va.dtype(), "{name}");
        assert_eq!(vo.shape(), va.shape(), "{name}");
        let want = in_memory(va.dtype(), va.shape(), va.data(), vb.data(), &config);
        assert!(
            vo.data() == want.as_slice(),
            "{name} differs from the in-memory merge"
        );
    }
    // Integer tensors come from A; A's metadata is kept.
    assert_eq!(
        to.tensor("step").unwrap().data(),
        ta.tensor("step").unwrap().data()
    );
    let (_, meta) = SafeTensors::read_metadata(&fo).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["summary"]["tensors"], 4);
    // No temporary file is left beside the output.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 4, "{left:?}");
}

#[test]
fn recipes_dry_runs_and_dtypes() {
    let dir = scratch("recipe");
    let (a, b) = pair(&dir);
    let recipe = dir.join("recipe.json");
    std::fs::write(
        &recipe,
        r#"{"t": 0.5, "schedule": [{"filter": "layers.*.w", "t": [0.2, 0.8]}]}"#,
    )
    .unwrap();
    let out = dir.join("out.safetensors");
    let o = burn_slerp(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "--recipe",
        s(&recipe),
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(
        plan.contains("layers.1.w") && plan.contains("0.8000"),
        "{plan}"
    );
    assert!(plan.contains("embed.weight"), "{plan}");
    assert!(!out.exists(), "a dry run writes nothing");

    let o = burn_slerp(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "--recipe",
        s(&recipe),
        "--out-dtype",
        "f32",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty() && o.stdout.is_empty());
    let (fa, fb, fo) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&out).unwrap(),
    );
    let (ta, tb, to) = (
        SafeTensors::deserialize(&fa).unwrap(),
        SafeTensors::deserialize(&fb).unwrap(),
        SafeTensors::deserialize(&fo).unwrap(),
    );
    assert_eq!(to.tensor("embed.weight").unwrap().dtype(), Dtype::F32);
    let layer1 = |t: &SafeTensors| t.tensor("layers.1.w").unwrap().data().to_vec();
    let want = in_memory(
        Dtype::F32,
        &[4, 6],
        &layer1(&ta),
        &layer1(&tb),
        &SlerpConfig::new(0.8),
    );
    assert_eq!(layer1(&to), want);
}

#[test]
fn every_error_is_named_and_leaves_nothing() {
    let dir = scratch("errors");
    let (a, b) = pair(&dir);
    let out = dir.join("out.safetensors");
    let fails = |args: &[&str], code: i32, needle: &str| {
        let o = burn_slerp(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "{args:?} left an output");
    };
    // Usage errors: 2.
    fails(&["merge", s(&a), s(&b), "-o", s(&out)], 2, "-t");
    fails(
        &[
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&out),
            "-t",
            "0.5",
            "--granularity",
            "x",
        ],
        2,
        "x",
    );
    fails(&["frobnicate"], 2, "frobnicate");
    // Merge errors: 1.
    fails(
        &["merge", s(&a), s(&b), "-o", s(&out), "-t", "1.5"],
        1,
        "1.5",
    );
    fails(
        &["merge", s(&a), s(&b), "-o", s(&a), "-t", "0.5"],
        1,
        "refusing to write over input",
    );

    let extra = dir.join("extra.safetensors");
    let mut specs = model(20);
    specs.push(("head.w", Dtype::F32, vec![2, 2], values(3, 4)));
    write(&extra, &specs, None);
    fails(
        &["merge", s(&a), s(&extra), "-o", s(&out), "-t", "0.5"],
        1,
        "missing from A: [head.w]",
    );
    let o = burn_slerp(&[
        "merge",
        s(&a),
        s(&extra),
        "-o",
        s(&out),
        "-t",
        "0.5",
        "--union",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fo = std::fs::read(&out).unwrap();
    assert!(
        SafeTensors::deserialize(&fo)
            .unwrap()
            .tensor("head.w")
            .is_ok()
    );
    std::fs::remove_file(&out).unwrap();

    let wide = dir.join("wide.safetensors");
    let mut specs = model(21);
    specs[0] = ("embed.weight", Dtype::F16, vec![7, 3], values(4, 21));
    write(&wide, &specs, None);
    fails(
        &["merge", s(&a), s(&wide), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `embed.weight`: A has shape [5, 3], B has shape [7, 3]: the vocabularies differ",
    );
    let ints = dir.join("ints.safetensors");
    let mut specs = model(22);
    specs[1] = ("layers.0.w", Dtype::I64, vec![4, 6], values(5, 24));
    write(&ints, &specs, None);
    fails(
        &["merge", s(&a), s(&ints), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `layers.0.w`: cannot merge dtype F32 (A) with I64 (B)",
    );

    let nan = dir.join("nan.safetensors");
    let mut specs = model(23);
    specs[2].3[5] = f64::NAN;
    write(&nan, &specs, None);
    fails(
        &["merge", s(&a), s(&nan), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `layers.1.w`: an input holds a NaN",
    );
    // f16 output overflows: caught after the cast.
    let big = dir.join("big.safetensors");
    let mut specs = model(24);
    specs[1].3[0] = 1e6;
    write(&big, &specs, None);
    fails(
        &[
            "merge",
            s(&big),
            s(&big),
            "-o",
            s(&out),
            "-t",
            "0.5",
            "--out-dtype",
            "f16",
        ],
        1,
        "tensor `layers.0.w`: the merged values do not fit F16",
    );

    // Damaged files name the file.
    let bytes = std::fs::read(&a).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
    fails(
        &["merge", s(&truncated), s(&b), "-o", s(&out), "-t", "0.5"],
        1,
        "truncated.safetensors: not a valid safetensors file",
    );
    let header = dir.join("header.safetensors");
    let mut broken = bytes.clone();
    broken[10] = b'{';
    std::fs::write(&header, &broken).unwrap();
    fails(
        &["merge", s(&header), s(&b), "-o", s(&out), "-t", "0.5"],
        1,
        "header.safetensors",
    );
    fails(
        &[
            "merge",
            s(&dir.join("absent")),
            s(&b),
            "-o",
            s(&out),
            "-t",
            "0.5",
        ],
        1,
        "absent",
    );
    // Nothing but the inputs and test files is left: no temporary output.
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial"))
    );
}

#[test]
fn sharded_folders_merge_like_single_files() {
    let dir = scratch("sharded");
    let (a, b) = pair(&dir);
    // A split in two shards with its index, as Hugging Face writes them.
    let folder = dir.join("a-sharded");
    std::fs::create_dir_all(&folder).unwrap();
    let specs = model(1);
    write(
        &folder.join("model-00001-of-00002.safetensors"),
        &specs[..2],
        None,
    );
    write(
        &folder.join("model-00002-of-00002.safetensors"),
        &specs[2..],
        None,
    );
    let map: serde_json::Map<String, serde_json::Value> = specs
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| {
            let file = if i < 2 {
                "model-00001-of-00002"
            } else {
                "model-00002-of-00002"
            };
            (name.to_string(), format!("{file}.safetensors").into())
        })
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let (single, sharded) = (
        dir.join("single.safetensors"),
        dir.join("sharded.safetensors"),
    );
    for (input, out) in [(&a, &single), (&folder, &sharded)] {
        let o = burn_slerp(&["merge", s(input), s(&b), "-o", s(out), "-t", "0.4", "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (fs, fh) = (
        std::fs::read(&single).unwrap(),
        std::fs::read(&sharded).unwrap(),
    );
    let (ts, th) = (
        SafeTensors::deserialize(&fs).unwrap(),
        SafeTensors::deserialize(&fh).unwrap(),
    );
    for (name, ..) in &specs {
        assert_eq!(
            th.tensor(name).unwrap().data(),
            ts.tensor(name).unwrap().data(),
            "{name}"
        );
    }

    // A missing shard, and an index that promises a tensor its shard lacks, name the file.
    let out = dir.join("out.safetensors");
    std::fs::rename(
        folder.join("model-00002-of-00002.safetensors"),
        dir.join("moved.safetensors"),
    )
    .unwrap();
    let o = burn_slerp(&["merge", s(&folder), s(&b), "-o", s(&out), "-t", "0.4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("model-00002-of-00002.safetensors"),
        "{}",
        stderr(&o)
    );
    std::fs::rename(
        dir.join("moved.safetensors"),
        folder.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let mut wrong = index.clone();
    wrong["weight_map"]["step"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        wrong.to_string(),
    )
    .unwrap();
    let o = burn_slerp(&["merge", s(&folder), s(&b), "-o", s(&out), "-t", "0.4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("missing from their shard: step (in model-00001-of-00002.safetensors)"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn inspect_lists_and_pairs() {
    let dir = scratch("inspect");
    let (a, b) = pair(&dir);
    let o = burn_slerp(&["inspect", s(&a), s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("layers.0.w  F32  [4, 6]"), "{text}");
    assert!(text.contains("5 tensors, 70 parameters"), "{text}");
    assert!(text.contains("5 in both, 0 only in A"), "{text}");
}

/// The fuzz cases' directory, a valid B and the bytes of a valid A, made once.
fn fuzz_inputs() -> &'static (PathBuf, PathBuf, Vec<u8>) {
    static INPUTS: std::sync::OnceLock<(PathBuf, PathBuf, Vec<u8>)> = std::sync::OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = scratch("fuzz");
        let (a, b) = pair(&dir);
        let valid = std::fs::read(&a).unwrap();
        (dir, b, valid)
    })
}

/// A valid file with one of: truncated, a byte flipped, the header length rewritten, a header
/// offset rewritten.
fn mutated(valid: &[u8], kind: u8, at: usize, value: u8) -> Vec<u8> {
    let mut v = valid.to_vec();
    match kind % 4 {
        0 => v.truncate(at % v.len()),
        1 => {
            let i = at % v.len();
            v[i] ^= value.max(1);
        }
        2 => v[at % 8] = value,
        _ => {
            // Rewrite a digit inside the JSON header (offsets, lengths, shapes).
            let header = u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
            let digits: Vec<usize> = (8..8 + header).filter(|i| v[*i].is_ascii_digit()).collect();
            if !digits.is_empty() {
                v[digits[at % digits.len()]] = b'0' + value % 10;
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Damaged files give errors (or, when the damage is harmless, a merge), never a panic.
    #[test]
    fn damaged_files_never_panic(kind in 0u8..4, at in 0usize..10_000, value in any::<u8>()) {
        let (dir, b, valid) = fuzz_inputs();
        let damaged = dir.join("damaged.safetensors");
        std::fs::write(&damaged, mutated(valid, kind, at, value)).unwrap();
        let out = dir.join("out.safetensors");
        let options = FileMerge {
            config: SlerpConfig::new(0.5),
            device: Device::flex(),
            pairing: Pairing::Strict,
            out_dtype: None,
        };
        let _ = Checkpoint::open(&damaged);
        let result = merge_files(&damaged, b, &out, &options, &mut |_, _| {});
        if result.is_err() {
            prop_assert!(!out.exists());
        }
        let _ = std::fs::remove_file(&damaged);
        let _ = std::fs::remove_file(&out);
    }
}
