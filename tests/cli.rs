//! The `burn-slerp` command end to end. Models saved with burn-store (`.safetensors` and
//! `.bpk`) are merged by the binary and compared bit for bit with `SlerpMerger::merge` on the
//! same modules in memory; hand-written safetensors files cover dtypes, sharded folders and
//! every error path; damaged files are fuzzed.

#[allow(dead_code, unused_imports)]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use burn::store::burn_pack::{self, Bytes};
use burn::store::{BurnpackStore, ModuleSnapshot, ModuleStore, SafetensorsStore};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use burn_slerp::checkpoint::{Checkpoint, FileMerge, merge_files};
use burn_slerp::{Factor, Granularity, Schedule, SlerpConfig, SlerpMerger, slerp};
use half::{bf16, f16};
use proptest::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use common::scratch::Scratch;

fn scratch(name: &str) -> Scratch {
    common::scratch::scratch("cli", name)
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

/// The Burn dtype of a safetensors dtype.
fn burn_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        other => panic!("{other:?}"),
    }
}

/// The values of little-endian float bytes, exactly.
fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()).into())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// The values a [`Spec`] holds once written: rounded to its dtype.
fn stored(dtype: Dtype, values: &[f64]) -> Vec<f64> {
    decode(burn_dtype(dtype), &encode(dtype, values))
}

/// Writes `specs` as a burnpack file with burn's burnpack writer.
fn write_bpk(path: &Path, specs: &[Spec]) {
    let tensors = specs
        .iter()
        .map(|(name, dtype, shape, v)| {
            burn_pack::Tensor::new(
                name.to_string(),
                burn_dtype(*dtype),
                shape.clone(),
                None,
                Bytes::from_bytes_vec(encode(*dtype, v)),
            )
        })
        .collect();
    burn_pack::Writer::new(tensors)
        .auto_extension(false)
        .write_to_file(path)
        .unwrap();
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

/// `model(seed)` changed by `edit`, written to `DIR/NAME.safetensors`.
fn variant(dir: &Path, name: &str, seed: u64, edit: impl FnOnce(&mut Vec<Spec>)) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    let mut specs = model(seed);
    edit(&mut specs);
    write(&path, &specs, None);
    path
}

fn pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write(&a, &model(1), Some(meta));
    write(&b, &model(10), None);
    (a, b)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-slerp"))
}

fn burn_slerp(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `burn_slerp(args)`, which must succeed.
fn succeeds(args: &[&str]) -> Output {
    let o = burn_slerp(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// `burn_slerp(args)`, failing the test if the command has not finished within `limit` (its
/// output must fit the pipes: it is read once the command has ended).
fn burn_slerp_within(args: &[&str], limit: Duration) -> Output {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// No temporary output (`.NAME.partial-PID-N`) is left in `dir`.
fn assert_no_partial(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".partial-"))
        .collect();
    assert!(left.is_empty(), "temporary outputs left: {left:?}");
}

/// A tensor name made at run time, for [`Spec`].
fn leak(name: String) -> &'static str {
    name.leak()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `slerp` of one tensor in memory, in the tensor's dtype, as little-endian bytes.
fn in_memory(dtype: Dtype, shape: &[usize], a: &[u8], b: &[u8], config: &SlerpConfig) -> Vec<u8> {
    let device = Device::flex();
    let load = |bytes: &[u8]| -> Tensor<2> {
        // f32, f16 and bf16 values are all exact in f32.
        let values: Vec<f32> = decode(burn_dtype(dtype), bytes)
            .into_iter()
            .map(|v| v as f32)
            .collect();
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
    // The output has the permissions of any new file (the safetensors writer's own temporary
    // file is private).
    let fresh = dir.join("fresh");
    std::fs::write(&fresh, b"").unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions(),
        std::fs::metadata(&fresh).unwrap().permissions()
    );
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
    // A factor outside [0, 1] on the command line is a usage error too.
    let factors: [(&[&str], &str); 5] = [
        (&["-t", "1.5"], "1.5 is not in [0, 1]"),
        (&["-t=-0.1"], "-0.1 is not in [0, 1]"),
        (&["-t", "-0.1"], "-0.1 is not in [0, 1]"),
        (&["-t", "nan"], "NaN is not in [0, 1]"),
        (&["-t", "inf"], "inf is not in [0, 1]"),
    ];
    for (t, needle) in factors {
        fails(
            &[&["merge", s(&a), s(&b), "-o", s(&out)], t].concat(),
            2,
            needle,
        );
    }
    // Merge errors: 1. Out of range in a recipe is one.
    let recipe = dir.join("recipe.json");
    for (text, needle) in [
        (
            r#"{"t": 1.5}"#,
            "interpolation factor t must be a finite number in [0, 1], got 1.5",
        ),
        (
            r#"{"t": 0.5, "schedule": [{"filter": "layers.*.w", "t": [0.2, 1.2]}]}"#,
            "t = 1.2 is not a number in [0, 1]",
        ),
    ] {
        std::fs::write(&recipe, text).unwrap();
        fails(
            &["merge", s(&a), s(&b), "-o", s(&out), "--recipe", s(&recipe)],
            1,
            needle,
        );
    }
    fails(
        &["merge", s(&a), s(&b), "-o", s(&a), "-t", "0.5"],
        1,
        "refusing to write over input",
    );

    let extra = variant(&dir, "extra", 20, |specs| {
        specs.push(("head.w", Dtype::F32, vec![2, 2], values(3, 4)));
    });
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

    let wide = variant(&dir, "wide", 21, |specs| {
        specs[0] = ("embed.weight", Dtype::F16, vec![7, 3], values(4, 21));
    });
    fails(
        &["merge", s(&a), s(&wide), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `embed.weight`: A has shape [5, 3], B has shape [7, 3]: the vocabularies differ",
    );
    let ints = variant(&dir, "ints", 22, |specs| {
        specs[1] = ("layers.0.w", Dtype::I64, vec![4, 6], values(5, 24));
    });
    fails(
        &["merge", s(&a), s(&ints), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `layers.0.w`: cannot merge dtype F32 (A) with I64 (B)",
    );

    let nan = variant(&dir, "nan", 23, |specs| {
        specs[2].3[5] = f64::NAN;
    });
    fails(
        &["merge", s(&a), s(&nan), "-o", s(&out), "-t", "0.5"],
        1,
        "tensor `layers.1.w`: an input holds a NaN",
    );
    // f16 output overflows: caught after the cast.
    let big = variant(&dir, "big", 24, |specs| {
        specs[1].3[0] = 1e6;
    });
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
    assert_no_partial(&dir);
}

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// A (`model(1)`) split in two shards with its index, as Hugging Face writes them: the folder
/// and the index.
fn sharded_a(dir: &Path) -> (PathBuf, serde_json::Value) {
    let folder = dir.join("a-sharded");
    std::fs::create_dir_all(&folder).unwrap();
    let specs = model(1);
    write(&folder.join(SHARDS[0]), &specs[..2], None);
    write(&folder.join(SHARDS[1]), &specs[2..], None);
    let map: serde_json::Map<String, serde_json::Value> = specs
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| (name.to_string(), SHARDS[usize::from(i >= 2)].into()))
        .collect();
    let index = serde_json::json!({ "metadata": {"source": "test"}, "weight_map": map });
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    (folder, index)
}

#[test]
fn sharded_folders_merge_like_single_files() {
    let dir = scratch("sharded");
    let (a, b) = pair(&dir);
    let (folder, index) = sharded_a(&dir);
    let specs = model(1);

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
    // Independent random tensors are far apart; a file and itself are at angle 0.
    assert!(text.contains("angles over 4 float tensors"), "{text}");
    assert!(text.contains("do not look like relatives"), "{text}");
    let o = burn_slerp(&["inspect", s(&a), s(&a)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("theta min/median/max 0.0000/0.0000/0.0000 rad; mean cos 1.000000"),
        "{text}"
    );
}

/// The bytes of a valid A and a valid B, made once.
fn fuzz_inputs() -> &'static (Vec<u8>, Vec<u8>) {
    static INPUTS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = scratch("fuzz-inputs");
        let (a, b) = pair(&dir);
        (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap())
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
        let (valid, valid_b) = fuzz_inputs();
        let dir = scratch("fuzz-safetensors");
        let (damaged, b) = (dir.join("damaged.safetensors"), dir.join("b.safetensors"));
        std::fs::write(&damaged, mutated(valid, kind, at, value)).unwrap();
        std::fs::write(&b, valid_b).unwrap();
        let out = dir.join("out.safetensors");
        let options = FileMerge::new(SlerpConfig::new(0.5), Device::flex());
        let _ = Checkpoint::open(&damaged);
        let result = merge_files(&damaged, &b, &out, &options, |_| {});
        if result.is_err() {
            prop_assert!(!out.exists());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models saved with burn-store
// ---------------------------------------------------------------------------------------------

/// Name → (dtype, shape, bytes, param id) of every tensor of a module, as burn-store sees it.
type Snapshot = BTreeMap<String, (DType, Vec<usize>, Vec<u8>, Option<u64>)>;

fn snapshot_of(tensors: impl IntoIterator<Item = burn::store::burn_pack::Tensor>) -> Snapshot {
    tensors
        .into_iter()
        .map(|t| {
            let (name, dtype, shape, id, bytes) = t.into_parts().unwrap();
            (name, (dtype, shape.to_vec(), bytes.to_vec(), id))
        })
        .collect()
}

fn module_snapshot<M: ModuleSnapshot>(module: &M) -> Snapshot {
    snapshot_of(module.collect(None, None, false))
}

/// Every tensor of a merged checkpoint: through burn-store for single files, through the
/// index and the safetensors crate for a sharded folder.
fn file_snapshot(path: &Path) -> Snapshot {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => {
            let mut store = SafetensorsStore::from_file(path);
            snapshot_of(store.get_all_tensors().unwrap().values().cloned())
        }
        Some("bpk") => {
            let mut store = BurnpackStore::from_file(path);
            snapshot_of(store.get_all_tensors().unwrap().values().cloned())
        }
        _ => {
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(path.join("model.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            let mut out = Snapshot::new();
            for (name, file) in index["weight_map"].as_object().unwrap() {
                let bytes = std::fs::read(path.join(file.as_str().unwrap())).unwrap();
                let view = SafeTensors::deserialize(&bytes).unwrap();
                let t = view.tensor(name).unwrap();
                out.insert(
                    name.clone(),
                    (
                        burn_dtype(t.dtype()),
                        t.shape().to_vec(),
                        t.data().to_vec(),
                        None,
                    ),
                );
            }
            out
        }
    }
}

/// Two models saved in both formats: `a.safetensors`, `a.bpk`, `b.safetensors`, `b.bpk`.
fn saved_pair(dir: &Path, device: &Device) -> (common::Net, common::Net) {
    let (a, b) = (common::net(device, 1), common::net(device, 2));
    for (model, stem) in [(&a, "a"), (&b, "b")] {
        let mut store = SafetensorsStore::from_file(dir.join(format!("{stem}.safetensors")));
        model.save_into(&mut store).unwrap();
        let mut store = BurnpackStore::from_file(dir.join(format!("{stem}.bpk")));
        model.save_into(&mut store).unwrap();
    }
    (a, b)
}

/// The binary's merge of two saved models equals `SlerpMerger::merge` of the modules, bit for
/// bit, tensor by tensor (integer and boolean tensors from A); with `ids`, the output carries
/// A's parameter ids (burnpack to burnpack).
fn assert_file_equals_module(
    out: &Path,
    merged: &impl ModuleSnapshot,
    a: &impl ModuleSnapshot,
    ids: bool,
) {
    let (got, want, from_a) = (
        file_snapshot(out),
        module_snapshot(merged),
        module_snapshot(a),
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}",
        out.display()
    );
    for (name, (dtype, shape, bytes, id)) in &got {
        let (want_dtype, want_shape, want_bytes, _) = &want[name];
        assert_eq!(shape, want_shape, "{name}");
        // Booleans are stored as the backend keeps them (a wgpu module's as u32 in
        // safetensors); their bytes are compared.
        if !matches!(dtype, DType::Bool(_)) && !matches!(want_dtype, DType::Bool(_)) {
            assert_eq!(dtype, want_dtype, "{name}");
        }
        assert!(
            bytes == want_bytes,
            "{name} in {} differs from the in-memory merge",
            out.display()
        );
        if ids {
            assert_eq!(*id, from_a[name].3, "{name}: A's parameter id is kept");
            assert!(id.is_some(), "{name}");
        }
    }
}

#[test]
fn burn_store_files_merge_like_modules() {
    let dir = scratch("modules");
    let device = Device::flex();
    let (a, b) = saved_pair(&dir, &device);
    let merged = SlerpMerger::new(SlerpConfig::new(0.3))
        .unwrap()
        .merge(&a, &b)
        .unwrap();
    let cases = [
        ("a.safetensors", "b.safetensors", "out.safetensors"),
        ("a.bpk", "b.bpk", "out.bpk"),
        ("a.bpk", "b.safetensors", "out-sharded"),
        ("a.safetensors", "b.bpk", "mixed.bpk"),
    ];
    for (fa, fb, fo) in cases {
        let out = dir.join(fo);
        let o = burn_slerp(&[
            "merge",
            s(&dir.join(fa)),
            s(&dir.join(fb)),
            "-o",
            s(&out),
            "-t",
            "0.3",
            "-q",
        ]);
        assert!(o.status.success(), "{fa} {fb} {fo}: {}", stderr(&o));
        assert_file_equals_module(
            &out,
            &merged,
            &a,
            fa.ends_with(".bpk") && fo.ends_with(".bpk"),
        );
    }

    // The burnpack output loads back into the module with nothing missing.
    let mut loaded = common::net(&device, 9);
    let result = loaded
        .load_from(&mut BurnpackStore::from_file(dir.join("out.bpk")))
        .unwrap();
    assert!(
        result.errors.is_empty() && result.missing.is_empty(),
        "{result:?}"
    );
    assert_eq!(common::dump(&loaded), common::dump(&merged));

    // A recipe with gradients over the layers and everything else, per row: file positions
    // match the module's, for the tensors outside the layers too (`emb`, `conv`, `bn` and
    // `head` at 0 in both; the array `norms` a stack of two, at 0 and 1).
    let config = SlerpConfig::new(0.6)
        .with_granularity(Granularity::Row)
        .with_schedule(Some(
            Schedule::new()
                .with_rule("blocks.**", Factor::Gradient(vec![0.1, 0.9]))
                .with_rule("**", Factor::Gradient(vec![0.2, 0.8])),
        ));
    let recipe = dir.join("recipe.json");
    std::fs::write(&recipe, config.to_string()).unwrap();
    let merger = SlerpMerger::new(config).unwrap();
    let plan = merger.plan(&a, &b).unwrap();
    let t_of = |path: &str| plan.entries.iter().find(|e| e.path == path).unwrap().t;
    for (path, t) in [
        ("emb.weight", 0.2),
        ("conv.weight", 0.2),
        ("bn.running_mean", 0.2),
        ("head.Dense.weight", 0.2),
        ("norms.0.gamma", 0.2),
        ("norms.1.gamma", 0.8),
        ("blocks.0.norm.gamma", 0.1),
        ("blocks.1.norm.gamma", 0.9),
    ] {
        assert_eq!(t_of(path), t, "{path}");
    }
    let merged = merger.merge(&a, &b).unwrap();
    let out = dir.join("recipe.bpk");
    let o = burn_slerp(&[
        "merge",
        s(&dir.join("a.safetensors")),
        s(&dir.join("b.bpk")),
        "-o",
        s(&out),
        "--recipe",
        s(&recipe),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_file_equals_module(&out, &merged, &a, false);
}

/// The same on the GPU backend: the binary built with `wgpu` merges on `--device wgpu` exactly
/// as `merge` does on wgpu modules.
#[cfg(feature = "wgpu")]
#[test]
fn burn_store_files_merge_like_modules_on_wgpu() {
    let dir = scratch("modules-wgpu");
    let device = Device::wgpu(Default::default());
    let (a, b) = saved_pair(&dir, &device);
    let merged = SlerpMerger::new(SlerpConfig::new(0.7))
        .unwrap()
        .merge(&a, &b)
        .unwrap();
    // Each format alone: burn-store writes a wgpu module's booleans as u32 in safetensors and
    // as bool in burnpack, and a u32 tensor does not pair with a bool one.
    for format in ["safetensors", "bpk"] {
        let out = dir.join(format!("out.{format}"));
        let o = burn_slerp(&[
            "merge",
            s(&dir.join(format!("a.{format}"))),
            s(&dir.join(format!("b.{format}"))),
            "-o",
            s(&out),
            "-t",
            "0.7",
            "--device",
            "wgpu",
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_file_equals_module(&out, &merged, &a, format == "bpk");
    }
}

#[test]
fn output_formats_and_their_errors() {
    let dir = scratch("formats");
    let (a, b) = pair(&dir);
    let fails = |input: &Path, out: &Path, needle: &str| {
        let o = burn_slerp(&["merge", s(input), s(&b), "-o", s(out), "-t", "0.5"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    };
    fails(
        &a,
        &dir.join("out.pt"),
        "`.pt` is a model file burn-slerp reads but does not write",
    );
    fails(
        &a,
        &dir.join("absent").join("out.safetensors"),
        "the folder it would go in does not exist",
    );
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    fails(&a, &full, "this one is not empty");
    assert_eq!(
        std::fs::read_to_string(full.join("keep.txt")).unwrap(),
        "mine"
    );
    // A sharded input may not be overwritten, nor any of its shards; B neither.
    let (folder, _) = sharded_a(&dir);
    let shard = folder.join(SHARDS[0]);
    let before = std::fs::read(&shard).unwrap();
    for out in [&shard, &folder, &b] {
        fails(&folder, out, "refusing to write over input");
    }
    assert!(
        std::fs::read(&shard).unwrap() == before,
        "the shard changed"
    );
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 3);

    // safetensors -> bpk -> safetensors at t = 0 gives A's bytes back, metadata included.
    let bpk = dir.join("a.bpk");
    let back = dir.join("back.safetensors");
    for (input, out) in [(&a, &bpk), (&bpk, &back)] {
        let o = burn_slerp(&["merge", s(input), s(&b), "-o", s(out), "-t", "0", "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (fa, fback) = (std::fs::read(&a).unwrap(), std::fs::read(&back).unwrap());
    let (ta, tback) = (
        SafeTensors::deserialize(&fa).unwrap(),
        SafeTensors::deserialize(&fback).unwrap(),
    );
    for (name, view) in ta.tensors() {
        let got = tback.tensor(&name).unwrap();
        assert_eq!(got.dtype(), view.dtype(), "{name}");
        assert_eq!(got.data(), view.data(), "{name}");
    }
    let (_, meta) = SafeTensors::read_metadata(&fback).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    // A burnpack file is recognised by its content too, whatever its name.
    let renamed = dir.join("a-copy");
    std::fs::copy(&bpk, &renamed).unwrap();
    let o = burn_slerp(&["inspect", s(&renamed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("layers.0.w  F32  [4, 6]"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn sharded_output_follows_the_input_shards() {
    let dir = scratch("sharded-out");
    let (_, b) = pair(&dir);
    let (folder, index) = sharded_a(&dir);
    let files = SHARDS;

    let (out, single) = (dir.join("merged"), dir.join("single.safetensors"));
    for target in [&out, &single] {
        let o = burn_slerp(&[
            "merge",
            s(&folder),
            s(&b),
            "-o",
            s(target),
            "-t",
            "0.4",
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["weight_map"], index["weight_map"]);
    assert_eq!(written["metadata"]["source"], "test");
    let fs = std::fs::read(&single).unwrap();
    let ts = SafeTensors::deserialize(&fs).unwrap();
    let mut total = 0;
    for file in files {
        let bytes = std::fs::read(out.join(file)).unwrap();
        let shard = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in shard.tensors() {
            assert_eq!(view.data(), ts.tensor(&name).unwrap().data(), "{name}");
            total += view.data().len();
        }
    }
    assert_eq!(written["metadata"]["total_size"], total);
    // A sharded folder is a model folder: the shards, the index and the model card (A has no
    // config or tokenizer to copy); nothing else, no temporary folder beside it.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec![
        "README.md",
        "model.safetensors.index.json",
        files[0],
        files[1],
    ];
    want.sort();
    assert_eq!(names, want);
    assert_no_partial(&dir);
}

// ---------------------------------------------------------------------------------------------
// File merges against the f64 reference
// ---------------------------------------------------------------------------------------------

/// `got`, merged values written as `dtype`, against the f64 reference `want`: f32 within a
/// relative L2 of 1e-6; f16 and bf16 within one unit in the last place of the reference rounded
/// to that dtype (the f32 result is rounded once), give or take the f32 result's own error.
fn assert_rounded(name: &str, dtype: DType, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    if dtype == DType::F32 {
        let got: Vec<f32> = got.iter().map(|v| *v as f32).collect();
        let err = common::rel_l2(&got, want);
        assert!(err <= 1e-6, "{name}: relative error {err:e}");
        return;
    }
    let f32_error = 8.0 * f64::from(f32::EPSILON) * want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // The reference rounded to `dtype`, and the gap to the next value away from zero.
        let (rounded, ulp) = match dtype {
            DType::F16 => {
                let r = f16::from_f64(*w);
                (
                    r.to_f64(),
                    f16::from_bits(r.to_bits() + 1).to_f64() - r.to_f64(),
                )
            }
            DType::BF16 => {
                let r = bf16::from_f64(*w);
                (
                    r.to_f64(),
                    bf16::from_bits(r.to_bits() + 1).to_f64() - r.to_f64(),
                )
            }
            other => panic!("{other:?}"),
        };
        assert!(
            (g - rounded).abs() <= ulp.abs() + f32_error,
            "{name}[{i}]: {g}, the reference {w} rounded to {dtype:?} is {rounded}"
        );
    }
}

/// The merged checkpoint `out` (any format) against its inputs `a` and `b`: it holds the
/// tensors present in both; float tensors are `want(a, b, shape)`, the f64 reference over the
/// stored input values, written in `out_dtype` (default: A's dtype); integer tensors are A's.
fn assert_reference(
    out: &Path,
    a: &[Spec],
    b: &[Spec],
    out_dtype: Option<DType>,
    want: impl Fn(&[f64], &[f64], &[usize]) -> Vec<f64>,
) {
    let spec = |specs: &[Spec], name: &str| specs.iter().find(|s| s.0 == name).cloned();
    let got = file_snapshot(out);
    let mut both: Vec<&str> = a
        .iter()
        .map(|s| s.0)
        .filter(|n| spec(b, n).is_some())
        .collect();
    both.sort();
    assert_eq!(got.keys().collect::<Vec<_>>(), both, "{}", out.display());
    for (name, (dtype, shape, bytes, _)) in got {
        let ((_, da, sa, va), (_, db, _, vb)) = (spec(a, &name).unwrap(), spec(b, &name).unwrap());
        assert_eq!(shape, sa, "{name}");
        if da == Dtype::I64 {
            assert_eq!(dtype, DType::I64, "{name}");
            assert_eq!(bytes, encode(da, &va), "{name} is A's");
            continue;
        }
        assert_eq!(dtype, out_dtype.unwrap_or(burn_dtype(da)), "{name}");
        let reference = want(&stored(da, &va), &stored(db, &vb), &shape);
        assert_rounded(&name, dtype, &decode(dtype, &bytes), &reference);
    }
}

#[test]
fn every_output_format_matches_the_f64_reference() {
    let dir = scratch("reference");
    let (a, b) = pair(&dir);
    for out in ["out.safetensors", "out-sharded", "out.bpk"] {
        let out = dir.join(out);
        succeeds(&["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.3", "-q"]);
        assert_reference(&out, &model(1), &model(10), None, |x, y, _| {
            common::reference(x, y, 0.3, 1e-8, None)
        });
    }
}

#[test]
fn intersection_writes_the_tensors_in_both() {
    let dir = scratch("intersection");
    let extra = |name: &'static str, seed| {
        move |specs: &mut Vec<Spec>| specs.push((name, Dtype::F32, vec![2, 2], values(seed, 4)))
    };
    let a = variant(&dir, "a", 1, extra("head.w", 3));
    let b = variant(&dir, "b", 10, extra("tail.w", 4));
    let out = dir.join("out.safetensors");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0.6",
        "--intersection",
        "-q",
    ]);
    let bytes = std::fs::read(&out).unwrap();
    let mut names: Vec<String> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["embed.weight", "layers.0.w", "layers.1.w", "norm.b", "step"]
    );
    let (mut sa, mut sb) = (model(1), model(10));
    extra("head.w", 3)(&mut sa);
    extra("tail.w", 4)(&mut sb);
    assert_reference(&out, &sa, &sb, None, |x, y, _| {
        common::reference(x, y, 0.6, 1e-8, None)
    });
}

/// `--mergekit` lerps a near-parallel pair (|cos| > 0.9995) and slerps a far one.
#[test]
fn mergekit_lerps_near_parallel_tensors() {
    let dir = scratch("mergekit");
    let near = values(40, 128);
    let nudged: Vec<f64> = near
        .iter()
        .zip(values(41, 128))
        .map(|(x, e)| x + 0.02 * e)
        .collect();
    let tensors = |near: Vec<f64>, far| -> Vec<Spec> {
        vec![
            ("near.w", Dtype::F32, vec![8, 16], near),
            ("far.w", Dtype::F32, vec![8, 16], far),
        ]
    };
    let (sa, sb) = (
        tensors(near, values(42, 128)),
        tensors(nudged, values(43, 128)),
    );
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    write(&a, &sa, None);
    write(&b, &sb, None);
    let cos = |i: usize| {
        let (x, y) = (stored(Dtype::F32, &sa[i].3), stored(Dtype::F32, &sb[i].3));
        let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f64>();
        dot(&x, &y) / (dot(&x, &x) * dot(&y, &y)).sqrt()
    };
    assert!(
        cos(0) > 0.9995 && cos(1).abs() < 0.9,
        "{} {}",
        cos(0),
        cos(1)
    );
    let lerp: Vec<f64> = stored(Dtype::F32, &sa[0].3)
        .iter()
        .zip(stored(Dtype::F32, &sb[0].3))
        .map(|(x, y)| 0.7 * x + 0.3 * y)
        .collect();
    let near_out = |out: &Path| -> Vec<f32> {
        let (_, _, bytes, _) = &file_snapshot(out)["near.w"];
        decode(DType::F32, bytes)
            .iter()
            .map(|v| *v as f32)
            .collect()
    };
    for (flags, threshold) in [(&["--mergekit"][..], Some(0.9995)), (&[][..], None)] {
        let out = dir.join(format!("out{}.safetensors", flags.len()));
        let args = [
            &["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.3", "-q"][..],
            flags,
        ];
        succeeds(&args.concat());
        assert_reference(&out, &sa, &sb, None, |x, y, _| {
            common::reference(x, y, 0.3, 1e-8, threshold)
        });
        let err = common::rel_l2(&near_out(&out), &lerp);
        if threshold.is_some() {
            assert!(err <= 2e-7, "not the lerp: {err:e}");
        } else {
            // Without it the near pair is slerped, measurably off the lerp.
            assert!(err > 1e-5, "{err:e}");
        }
    }
}

#[test]
fn bf16_output_is_the_result_rounded_once() {
    let dir = scratch("bf16");
    let (a, b) = pair(&dir);
    for out in ["out.safetensors", "out.bpk"] {
        let out = dir.join(out);
        succeeds(&[
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&out),
            "-t",
            "0.3",
            "--out-dtype",
            "bf16",
            "-q",
        ]);
        assert_reference(&out, &model(1), &model(10), Some(DType::BF16), |x, y, _| {
            common::reference(x, y, 0.3, 1e-8, None)
        });
    }
}

#[test]
fn row_granularity_matches_the_row_reference() {
    let dir = scratch("rows");
    let (a, b) = pair(&dir);
    let out = dir.join("out.safetensors");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0.35",
        "--granularity",
        "row",
        "-q",
    ]);
    // A 1-D tensor is one-element rows.
    let rows = |x: &[f64], y: &[f64], shape: &[usize]| {
        let rows = if shape.len() >= 2 { shape[0] } else { x.len() };
        common::reference_rows(x, y, rows, 0.35)
    };
    assert_reference(&out, &model(1), &model(10), None, rows);
    // The row reference is not the whole-tensor one on a 2-D tensor.
    let (x, y) = (
        stored(Dtype::F32, &model(1)[1].3),
        stored(Dtype::F32, &model(10)[1].3),
    );
    let whole: Vec<f32> = common::reference(&x, &y, 0.35, 1e-8, None)
        .iter()
        .map(|v| *v as f32)
        .collect();
    assert!(common::rel_l2(&whole, &rows(&x, &y, &[4, 6])) > 1e-3);
}

/// `(done, total)` of each progress line `[done/total] name (N bytes)` on standard error.
fn progress_lines(o: &Output) -> Vec<(usize, usize)> {
    stderr(o)
        .lines()
        .filter_map(|line| {
            let (count, _) = line.strip_prefix('[')?.split_once("] ")?;
            let (done, total) = count.split_once('/')?;
            Some((done.parse().unwrap(), total.parse().unwrap()))
        })
        .collect()
}

/// Progress counts every tensor written: merged, copied (integers) and `--union` extras.
#[test]
fn progress_counts_every_tensor_written() {
    let dir = scratch("progress");
    let a = variant(&dir, "a", 1, |specs| {
        specs.push(("head.w", Dtype::F32, vec![2, 2], values(3, 4)));
    });
    let b = variant(&dir, "b", 10, |specs| {
        specs.push(("tail.b", Dtype::I64, vec![3], vec![1.0, 2.0, 3.0]));
    });
    for out in ["out.safetensors", "out.bpk"] {
        let out = dir.join(out);
        let o = succeeds(&["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.5", "--union"]);
        let written = file_snapshot(&out).len();
        assert_eq!(written, 7);
        let lines = progress_lines(&o);
        let want: Vec<(usize, usize)> = (1..=written).map(|k| (k, written)).collect();
        assert_eq!(lines, want, "{}", stderr(&o));
    }
}

/// At t = 0 and t = 1 the output is an input, a NaN in it included, converted once to another
/// output dtype; a finite value that does not fit that dtype is refused.
#[test]
fn t0_and_t1_copy_an_input_nan_included() {
    let dir = scratch("copies");
    let with_nan = |specs: &mut Vec<Spec>| specs[2].3[5] = f64::NAN;
    let a = variant(&dir, "a", 1, with_nan);
    let b = variant(&dir, "b", 10, |_| {});
    let read = |p: &Path| std::fs::read(p).unwrap();
    let fa = read(&a);
    let ta = SafeTensors::deserialize(&fa).unwrap();
    for (t, from) in [("0", &a), ("1", &b)] {
        let out = dir.join(format!("t{t}.safetensors"));
        succeeds(&["merge", s(&a), s(&b), "-o", s(&out), "-t", t, "-q"]);
        let (ff, fo) = (read(from), read(&out));
        let (tf, to) = (
            SafeTensors::deserialize(&ff).unwrap(),
            SafeTensors::deserialize(&fo).unwrap(),
        );
        assert_eq!(to.len(), 5);
        for (name, view) in to.tensors() {
            // Integer tensors are A's whatever t.
            let source = if name == "step" { &ta } else { &tf };
            let want = source.tensor(&name).unwrap();
            assert_eq!(view.dtype(), want.dtype(), "{name}");
            assert!(view.data() == want.data(), "{name} at t = {t}");
        }
    }

    let half = dir.join("half.safetensors");
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&half),
        "-t",
        "0",
        "--out-dtype",
        "f16",
        "-q",
    ]);
    let fh = read(&half);
    let th = SafeTensors::deserialize(&fh).unwrap();
    let mut specs = model(1);
    with_nan(&mut specs);
    for (name, dtype, _, v) in &specs {
        let view = th.tensor(name).unwrap();
        if *dtype == Dtype::I64 {
            assert_eq!(view.data(), ta.tensor(name).unwrap().data());
            continue;
        }
        assert_eq!(view.dtype(), Dtype::F16, "{name}");
        let got = decode(DType::F16, view.data());
        for (i, (g, w)) in got.iter().zip(stored(*dtype, v)).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{name}[{i}]");
            } else {
                assert_eq!(
                    g.to_bits(),
                    f16::from_f64(w).to_f64().to_bits(),
                    "{name}[{i}]"
                );
            }
        }
    }

    let big = variant(&dir, "big", 1, |specs| specs[1].3[0] = 70000.0);
    let out = dir.join("big-out.safetensors");
    let o = burn_slerp(&[
        "merge",
        s(&big),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0",
        "--out-dtype",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tensor `layers.0.w`: the merged values do not fit F16"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    assert_no_partial(&dir);
}

/// The report lists the merged tensors in A's order, not in the order the writer asked for
/// them (the safetensors writer sorts by dtype alignment, then name).
#[test]
fn the_report_follows_a() {
    let dir = scratch("report-order");
    let specs = |seed: u64| -> Vec<Spec> {
        vec![
            ("l.0.x", Dtype::F16, vec![4, 4], values(seed, 16)),
            ("l.1.y", Dtype::F32, vec![4, 4], values(seed + 1, 16)),
            ("l.2.z", Dtype::F16, vec![8], values(seed + 2, 8)),
            ("l.3.w", Dtype::F32, vec![8], values(seed + 3, 8)),
            ("n", Dtype::I64, vec![1], vec![seed as f64]),
        ]
    };
    let (a, b) = (dir.join("a.bpk"), dir.join("b.safetensors"));
    write_bpk(&a, &specs(1));
    write(&b, &specs(20), None);
    let (out, report) = (dir.join("out.safetensors"), dir.join("report.json"));
    succeeds(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "-t",
        "0.4",
        "--report",
        s(&report),
        "-q",
    ]);
    let opened = Checkpoint::open(&a).unwrap();
    let merged: Vec<String> = opened
        .names()
        .into_iter()
        .filter(|n| opened.info(n).unwrap().0 != "I64")
        .collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let paths: Vec<&str> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, merged);
    // The writer's order differs, so the order above is the report's own.
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let written: Vec<String> = meta
        .offset_keys()
        .into_iter()
        .filter(|n| merged.contains(n))
        .collect();
    assert_ne!(written, merged);
}

/// A filter of 40 `**` before a segment nothing has, over names of 60 segments, takes a
/// backtracking matcher forever; the plan comes at once, warning that the rule matched nothing.
#[test]
fn a_hostile_filter_is_matched_in_linear_time() {
    let dir = scratch("hostile");
    let long = leak(vec!["x"; 60].join("."));
    let with_long = |seed| {
        move |specs: &mut Vec<Spec>| {
            specs.push((long, Dtype::F32, vec![4], values(seed, 4)));
        }
    };
    let a = variant(&dir, "a", 1, with_long(5));
    let b = variant(&dir, "b", 10, with_long(6));
    let filter = format!("{}nothing", "**.".repeat(40));
    let recipe = dir.join("recipe.json");
    let json = serde_json::json!({ "t": 0.5, "schedule": [{ "filter": filter, "t": 0.2 }] });
    std::fs::write(&recipe, json.to_string()).unwrap();
    let out = dir.join("out.safetensors");
    let o = burn_slerp_within(
        &[
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&out),
            "--recipe",
            s(&recipe),
            "--dry-run",
        ],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(
        plan.contains(long) && plan.contains("5 tensors, 73 parameters"),
        "{plan}"
    );
    assert!(
        plan.contains(&format!(
            "warning: schedule rule 0 (`{filter}`) matches no tensor"
        )),
        "{plan}"
    );
    assert!(!out.exists());
}

/// `burn-slerp inspect … | head` and the like: a closed standard output ends the command with
/// exit code 0 and nothing on standard error.
#[test]
fn a_closed_standard_output_ends_quietly() {
    let dir = scratch("closed-stdout");
    let (a, b) = pair(&dir);
    let out = dir.join("out.safetensors");
    let commands: [&[&str]; 3] = [
        &["inspect", s(&a)],
        &["inspect", s(&a), s(&b)],
        &[
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&out),
            "-t",
            "0.5",
            "--dry-run",
        ],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = bin()
            .args(args)
            .stdout(Stdio::from(writer))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert!(o.stderr.is_empty(), "{args:?}: {}", stderr(&o));
    }
    assert!(!out.exists());
}

/// Ctrl-C during a merge stops it at the next tensor and leaves no partial output. Without
/// timing: the progress lines of 5000 tensors (about 180 KB) overflow the pipe of standard
/// error, which is read only after the signal is sent, so the merge cannot have finished first.
#[cfg(target_os = "linux")]
#[test]
fn an_interrupted_merge_leaves_nothing() {
    use std::io::{BufRead, BufReader};

    const N: u64 = 5000;
    let dir = scratch("interrupt");
    let many = |seed: u64| -> Vec<Spec> {
        (0..N)
            .map(|i| {
                let name = leak(format!("layers.{i}.w"));
                (name, Dtype::F32, vec![2], values(seed + i, 2))
            })
            .collect()
    };
    let (a, b, out) = (
        dir.join("a.safetensors"),
        dir.join("b.safetensors"),
        dir.join("out.safetensors"),
    );
    write(&a, &many(1), None);
    write(&b, &many(10_000), None);
    let mut child = bin()
        .args(["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with(&format!("[1/{N}] layers.")), "{first}");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for, so the id is its.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    let tail = &rest[rest.len().saturating_sub(3)..];
    assert_eq!(status.code(), Some(130), "{tail:?}");
    assert!(
        tail.last().is_some_and(|l| l.contains("interrupted")),
        "{tail:?}"
    );
    assert!(!rest.iter().any(|l| l.starts_with("merged")), "{tail:?}");
    assert!(!out.exists());
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// A signal while the inputs are still being read ends the command at once with 130, nothing
/// written. Deterministic without timing: A is a named pipe, so the command blocks reading it
/// (before anything is written) until the test writes, and the test knows it is blocked there
/// once a non-blocking open for writing succeeds (that needs a reader).
#[cfg(target_os = "linux")]
#[test]
fn a_signal_before_writing_ends_the_command_at_once() {
    use std::os::unix::fs::OpenOptionsExt;

    let dir = scratch("interrupt-early");
    let (_, b) = pair(&dir);
    let (fifo, out) = (dir.join("fifo.safetensors"), dir.join("out.safetensors"));
    let path = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path that nothing else holds.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let child = bin()
        .args(["merge", s(&fifo), s(&b), "-o", s(&out), "-t", "0.5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(file) => break file,
            Err(_) if start.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("the command never opened its input: {e}"),
        }
    };
    // The command now waits for A's first bytes, which never come.
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for, so the id is its.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let output = child.wait_with_output().unwrap();
    drop(writer);
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(!out.exists());
    assert_no_partial(&dir);
}

/// The bytes of a valid burnpack file, made once.
fn fuzz_burnpack() -> &'static Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = scratch("fuzz-burnpack-input");
        let model = common::net(&Device::flex(), 3);
        let path = dir.join("valid.bpk");
        model
            .save_into(&mut BurnpackStore::from_file(&path))
            .unwrap();
        std::fs::read(&path).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Damaged burnpack files give errors (or a merge), never a panic: truncated, a byte
    /// flipped anywhere, the metadata length rewritten, a byte of the metadata rewritten.
    #[test]
    fn damaged_burnpack_files_never_panic(kind in 0u8..4, at in 0usize..100_000, value in any::<u8>()) {
        let valid = fuzz_burnpack();
        let mut v = valid.clone();
        match kind {
            0 => v.truncate(at % v.len()),
            1 => { let i = at % v.len(); v[i] ^= value.max(1); }
            2 => v[6 + at % 4] = value,
            _ => {
                let size = u32::from_le_bytes(v[6..10].try_into().unwrap()) as usize;
                let i = 10 + at % size.max(1);
                v[i] = value;
            }
        }
        let dir = scratch("fuzz-burnpack");
        let (damaged, valid_path) = (dir.join("damaged.bpk"), dir.join("valid.bpk"));
        std::fs::write(&damaged, &v).unwrap();
        std::fs::write(&valid_path, valid).unwrap();
        let out = dir.join("out.bpk");
        let options = FileMerge::new(SlerpConfig::new(0.5), Device::flex());
        let result = merge_files(&damaged, &valid_path, &out, &options, |_| {});
        if result.is_err() {
            prop_assert!(!out.exists());
        }
    }
}

/// The output is written by this crate's own safetensors writer (the data from reused
/// buffers): at t = 0 it is A's tensors in A's dtypes with A's metadata, so it must be the file
/// the safetensors crate wrote for A, byte for byte, header layout included.
#[test]
fn the_written_file_is_the_one_the_safetensors_crate_writes() {
    let dir = scratch("layout");
    let (a, b) = pair(&dir);
    let out = dir.join("out.safetensors");
    succeeds(&["merge", s(&a), s(&b), "-o", s(&out), "-t", "0", "-q"]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap(),
        "the output differs from A's file"
    );
}

/// Writes a safetensors file by hand whose first tensor is 3 bytes of U8, so that every f32
/// tensor after it starts 3 bytes past a 4-byte boundary (legal in the format; the safetensors
/// crate's own writer never does it).
fn write_unaligned(path: &Path, specs: &[Spec]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = vec![1, 2, 3];
    header.insert(
        "flags".into(),
        serde_json::json!({ "dtype": "U8", "shape": [3], "data_offsets": [0, 3] }),
    );
    for (name, dtype, shape, v) in specs {
        let bytes = encode(*dtype, v);
        let start = data.len();
        data.extend(&bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [start, data.len()],
            }),
        );
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn unaligned_tensors_merge_like_aligned_ones() {
    let dir = scratch("unaligned");
    let specs = |seed| -> Vec<Spec> {
        vec![
            ("layers.0.w", Dtype::F32, vec![4, 6], values(seed, 24)),
            ("layers.1.w", Dtype::F32, vec![5], values(seed + 1, 5)),
        ]
    };
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    write_unaligned(&a, &specs(3));
    write_unaligned(&b, &specs(30));
    let file = std::fs::read(&a).unwrap();
    let header = SafeTensors::deserialize(&file).unwrap();
    let start = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let offset = header.tensor("layers.0.w").unwrap().data().as_ptr() as usize
        - file.as_ptr() as usize
        - start;
    assert_eq!(offset % 4, 3, "the f32 data is off a 4-byte boundary");
    let out = dir.join("out.safetensors");
    succeeds(&["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.3", "-q"]);
    let got = file_snapshot(&out);
    assert_eq!(
        got["flags"].2,
        vec![1, 2, 3],
        "A's integer tensor, as it is"
    );
    for (name, _, shape, _) in specs(3) {
        let (x, y) = (
            specs(3).into_iter().find(|s| s.0 == name).unwrap().3,
            specs(30).into_iter().find(|s| s.0 == name).unwrap().3,
        );
        let want = common::reference(
            &stored(Dtype::F32, &x),
            &stored(Dtype::F32, &y),
            0.3,
            1e-8,
            None,
        );
        let (dtype, got_shape, bytes, _) = &got[name];
        assert_eq!((dtype, got_shape), (&DType::F32, &shape), "{name}");
        assert_rounded(name, DType::F32, &decode(DType::F32, bytes), &want);
    }
}
