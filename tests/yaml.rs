//! `burn-slerp yaml`: mergekit recipes read as they are. Expectations are worked out by hand in
//! the test (which tensor comes from which layers, at which `t`) and held to an f64 reference of
//! mergekit's slerp (one angle per tensor, lerp when `|cos| > 0.9995`).

#[allow(dead_code, unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use common::scratch::Scratch;

fn scratch(name: &str) -> Scratch {
    common::scratch::scratch("yaml", name)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-slerp"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn succeeds(dir: &Path, args: &[&str]) -> Output {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert_eq!(o.status.code(), Some(1), "{args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f64> {
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

const LAYERS: usize = 4;

/// The names of a 4-layer Llama-shaped model: embeddings, per layer an attention and an MLP
/// weight, the final norm and the head.
fn names() -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..LAYERS {
        names.push(format!("model.layers.{i}.self_attn.q_proj.weight"));
        names.push(format!("model.layers.{i}.mlp.up_proj.weight"));
    }
    names.push("model.norm.weight".into());
    names.push("lm_head.weight".into());
    names
}

/// The f32-rounded values of tensor `name` of model `seed` (B is A plus noise, so that the
/// angles are small but above mergekit's threshold).
fn tensor(seed: u64, name: &str) -> Vec<f64> {
    let key = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let base = values(key, 24);
    let noise = values(key ^ seed, 24);
    base.iter()
        .zip(noise)
        .map(|(b, n)| (b + if seed == 0 { 0.0 } else { 0.3 * n }) as f32 as f64)
        .collect()
}

/// A model folder of [`names`] with `config.json` naming `architecture`.
fn model(dir: &Path, folder: &str, seed: u64, architecture: &str, zero: Option<&str>) -> PathBuf {
    let path = dir.join(folder);
    std::fs::create_dir_all(&path).unwrap();
    let data: Vec<(String, Vec<u8>)> = names()
        .into_iter()
        .map(|n| {
            let v = if zero == Some(n.as_str()) {
                vec![0.0; 24]
            } else {
                tensor(seed, &n)
            };
            let bytes = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
            (n, bytes)
        })
        .collect();
    let views = data.iter().map(|(n, b)| {
        (
            n.clone(),
            TensorView::new(Dtype::F32, vec![4, 6], b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &path.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": [architecture],
        "num_hidden_layers": LAYERS,
        "layer_types": ["full", "sliding", "full", "sliding"],
        "torch_dtype": "float32",
    });
    std::fs::write(path.join("config.json"), config.to_string()).unwrap();
    std::fs::write(path.join("tokenizer.json"), folder).unwrap();
    path
}

fn read(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            (n, v)
        })
        .collect()
}

fn close(name: &str, got: &[f64], want: &[f64]) {
    let got32: Vec<f32> = got.iter().map(|v| *v as f32).collect();
    let err = common::rel_l2(&got32, want);
    assert!(err <= 1e-6, "{name}: relative error {err:e}");
}

/// The canonical mergekit gradient recipe: per-layer `t` over one slice, by substring filter.
#[test]
fn gradient_recipe_matches_the_reference() {
    let dir = scratch("gradient");
    model(&dir, "a", 0, "LlamaForCausalLM", None);
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    std::fs::write(
        dir.join("recipe.yml"),
        "slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 4]\n      - model: ./b\n        layer_range: [0, 4]\n\
         merge_method: slerp\nbase_model: ./a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n\
         \x20   - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: float32\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "recipe.yml", "out", "-q"]);
    let got = read(&dir.join("out/model.safetensors"));
    // Worked by hand: positions k/3 over 4 layers; gradient x = pos·4.
    // self_attn: k=0 → 0; k=1 → x=4/3: 0.5 + (1/3)(0.3 − 0.5); k=2 → x=8/3: 0.3 + (2/3)(0.4);
    // k=3 → 1. mlp: the mirror values.
    let attn = [0.0, 0.5 - 0.2 / 3.0, 0.3 + 0.8 / 3.0, 1.0];
    let mlp = [1.0, 0.5 + 0.2 / 3.0, 0.7 - 0.8 / 3.0, 0.0];
    let mut want_t: BTreeMap<String, f64> = BTreeMap::new();
    for k in 0..LAYERS {
        want_t.insert(format!("model.layers.{k}.self_attn.q_proj.weight"), attn[k]);
        want_t.insert(format!("model.layers.{k}.mlp.up_proj.weight"), mlp[k]);
    }
    // Outside the layers: the last entry (no filter), at position 0.
    for n in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        want_t.insert(n.into(), 0.5);
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want_t.keys().collect::<Vec<_>>()
    );
    for (name, t) in &want_t {
        let want = common::reference(&tensor(0, name), &tensor(5, name), *t, 1e-8, Some(0.9995));
        close(name, &got[name], &want);
    }
    // The model files and the card, as for `merge`.
    assert_eq!(std::fs::read(dir.join("out/tokenizer.json")).unwrap(), b"a");
    // The dry run names the entry and level that matched.
    let o = succeeds(&dir, &["yaml", "recipe.yml", "out2", "--dry-run"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("model.layers.1.mlp.up_proj.weight  t=0.566667  (top level, entry 1 (filter \"mlp\"))  offset 0.3333"),
        "{text}"
    );
    assert!(!dir.join("out2").exists());
}

/// Slices that pick and repeat layers: output layers renumbered, each from (slice, offset);
/// gradients restart per slice; a one-layer slice sits at position 1; `num_hidden_layers` and
/// per-layer lists follow; tensors after the layers take the last slice's parameters.
#[test]
fn sliced_recipe_renumbers_layers() {
    let dir = scratch("sliced");
    model(&dir, "a", 0, "LlamaForCausalLM", None);
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    std::fs::write(
        dir.join("recipe.yml"),
        "slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 2]\n      - model: ./b\n        layer_range: [1, 3]\n\
         \x20   parameters:\n      t: [0.2, 0.8]\n\
         \x20 - sources:\n      - model: ./a\n        layer_range: [3, 4]\n      - model: ./b\n        layer_range: [3, 4]\n\
         \x20   parameters:\n      t: [0.0, 0.9]\n\
         \x20 - sources:\n      - model: ./a\n        layer_range: [1, 3]\n      - model: ./b\n        layer_range: [1, 3]\n\
         merge_method: slerp\nbase_model: ./a\nparameters:\n  t:\n    - filter: mlp\n      value: 0.3\n    - value: 0.6\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "recipe.yml", "out", "-q"]);
    let got = read(&dir.join("out/model.safetensors"));
    // (output layer, A's layer, B's layer, t of q_proj, t of up_proj), worked by hand.
    let table = [
        (0, 0, 1, 0.2, 0.2), // slice 0, offset 0: gradient [0.2, 0.8] at 0
        (1, 1, 2, 0.8, 0.8), // offset 1 of 1
        (2, 3, 3, 0.9, 0.9), // a one-layer slice: position 1
        (3, 1, 1, 0.6, 0.3), // slice 2: the top level (mlp 0.3, else 0.6)
        (4, 2, 2, 0.6, 0.3),
    ];
    for (out, la, lb, t_attn, t_mlp) in table {
        for (kind, t) in [("self_attn.q_proj", t_attn), ("mlp.up_proj", t_mlp)] {
            let name = format!("model.layers.{out}.{kind}.weight");
            let want = common::reference(
                &tensor(0, &format!("model.layers.{la}.{kind}.weight")),
                &tensor(5, &format!("model.layers.{lb}.{kind}.weight")),
                t,
                1e-8,
                Some(0.9995),
            );
            close(&name, &got[&name], &want);
        }
    }
    assert_eq!(got.len(), 3 + 2 * 5);
    // Before the layers: the first slice at position 0; after (Llama): the last slice's.
    for (name, t) in [
        ("model.embed_tokens.weight", 0.2),
        ("model.norm.weight", 0.6),
        ("lm_head.weight", 0.6),
    ] {
        let want = common::reference(&tensor(0, name), &tensor(5, name), t, 1e-8, Some(0.9995));
        close(name, &got[name], &want);
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["num_hidden_layers"], 5);
    assert_eq!(
        config["layer_types"],
        serde_json::json!(["full", "sliding", "sliding", "sliding", "full"])
    );

    // An architecture the table does not know: every tensor outside the layers is "before";
    // first and last slices that disagree on them are refused, by name.
    model(&dir, "c", 0, "SomethingNewForCausalLM", None);
    model(&dir, "d", 5, "SomethingNewForCausalLM", None);
    let recipe = std::fs::read_to_string(dir.join("recipe.yml"))
        .unwrap()
        .replace("./a", "./c")
        .replace("./b", "./d");
    std::fs::write(dir.join("unknown.yml"), recipe).unwrap();
    let e = fails(&dir, &["yaml", "unknown.yml", "out3"]);
    assert!(
        e.contains("lies outside the layers") && e.contains("SomethingNewForCausalLM"),
        "{e}"
    );
}

/// mergekit counts a zero norm as 1: a zero tensor against `b` gives `sin(tπ/2)·b`; `--exact`
/// lerps.
#[test]
fn zero_tensors_follow_mergekit_or_exact() {
    let dir = scratch("zero");
    let zero = "model.layers.2.mlp.up_proj.weight";
    model(&dir, "a", 0, "LlamaForCausalLM", Some(zero));
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    std::fs::write(
        dir.join("recipe.yml"),
        "models:\n  - model: ./a\n  - model: ./b\nmerge_method: slerp\nbase_model: ./a\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "recipe.yml", "mergekit", "-q"]);
    succeeds(&dir, &["yaml", "recipe.yml", "exact", "--exact", "-q"]);
    let b = tensor(5, zero);
    let s = (std::f64::consts::FRAC_PI_4).sin();
    let want: Vec<f64> = b.iter().map(|y| s * y).collect();
    close(
        zero,
        &read(&dir.join("mergekit/model.safetensors"))[zero],
        &want,
    );
    let half: Vec<f64> = b.iter().map(|y| 0.5 * y).collect();
    close(
        zero,
        &read(&dir.join("exact/model.safetensors"))[zero],
        &half,
    );
}

#[test]
fn refused_recipes_say_what_instead() {
    let dir = scratch("refused");
    model(&dir, "a", 0, "LlamaForCausalLM", None);
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    let head = "models:\n  - model: ./a\n  - model: ./b\nbase_model: ./a\n";
    let cases = [
        (
            "merge_method: ties\nparameters:\n  t: 0.5\n",
            "burn-slerp mean",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 0.5\nmodules: {}\n",
            "`modules:`",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 0.5\ntokenizer_source: union\n",
            "union",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 0.5\ntokenizer:\n  source: base\n",
            "`tokenizer:`",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 0.5\nchat_template: chatml\n",
            "chat_template",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 1.5\n",
            "outside [0, 1]",
        ),
        (
            "merge_method: slerp\nparameters:\n  t: 0.5\nfancy: 1\n",
            "unknown field `fancy`",
        ),
        (
            "merge_method: slerp\nparameters:\n  t:\n    - filter: mlp\n      value: 0.5\n",
            "missing t for `lm_head.weight`",
        ),
    ];
    for (i, (tail, expect)) in cases.iter().enumerate() {
        let file = format!("r{i}.yml");
        std::fs::write(dir.join(&file), format!("{head}{tail}")).unwrap();
        let e = fails(&dir, &["yaml", &file, "out"]);
        assert!(e.contains(expect), "case {i}: {e}");
    }
    std::fs::write(
        dir.join("lora.yml"),
        "models:\n  - model: ./a\n  - model: ./b+./adapter\nbase_model: ./a\nmerge_method: slerp\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    assert!(fails(&dir, &["yaml", "lora.yml", "out"]).contains("LoRA"));
    std::fs::write(
        dir.join("nobase.yml"),
        "models:\n  - model: ./a\n  - model: ./b\nmerge_method: slerp\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    assert!(fails(&dir, &["yaml", "nobase.yml", "out"]).contains("base_model"));
    // Per-model t is read but ignored, as mergekit ignores it: a warning.
    std::fs::write(
        dir.join("warn.yml"),
        "models:\n  - model: ./a\n  - model: ./b\n    parameters:\n      t: 0.9\nbase_model: ./a\nmerge_method: slerp\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    let o = succeeds(&dir, &["yaml", "warn.yml", "out"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is ignored, as mergekit ignores it"));
    assert!(dir.join("out/model.safetensors").exists());
}

/// mergekit reads an empty list as no value: `t: []` (or an entry whose value is `[]`) falls
/// through to the next level. The results equal those of the same recipe with the value the
/// fall-through reaches written directly.
#[test]
fn empty_lists_fall_through_as_in_mergekit() {
    let dir = scratch("empty");
    model(&dir, "a", 0, "LlamaForCausalLM", None);
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    let slices = "slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 4]\n      - model: ./b\n        layer_range: [0, 4]\n";
    let head = "base_model: ./a\nmerge_method: slerp\n";
    let recipes = [
        // The reference: the top level's 0.25 everywhere.
        (
            "direct.yml",
            format!("{slices}{head}parameters:\n  t: 0.25\n"),
        ),
        // The slice's empty list falls through to the top level.
        (
            "slice.yml",
            format!(
                "{}    parameters:\n      t: []\n{head}parameters:\n  t: 0.25\n",
                slices
            ),
        ),
        // An entry with an empty value is skipped; the next entry matches.
        (
            "entry.yml",
            format!(
                "{slices}{head}parameters:\n  t:\n    - filter: mlp\n      value: []\n    - value: 0.25\n"
            ),
        ),
    ];
    for (file, text) in &recipes {
        std::fs::write(dir.join(file), text).unwrap();
        let out = format!("out-{}", file.trim_end_matches(".yml"));
        succeeds(&dir, &["yaml", file, &out, "--quiet"]);
    }
    let want = read(&dir.join("out-direct/model.safetensors"));
    for (file, _) in &recipes[1..] {
        let stem = file.trim_end_matches(".yml");
        let got = read(&dir.join(format!("out-{stem}/model.safetensors")));
        assert_eq!(got, want, "{file}");
    }
    // With nothing left to fall through to, the tensor is named.
    std::fs::write(
        dir.join("none.yml"),
        format!("{slices}{head}parameters:\n  t: []\n"),
    )
    .unwrap();
    assert!(fails(&dir, &["yaml", "none.yml", "out-none"]).contains("missing t for"));
}

/// A recipe is refused for its method before its keys, and a tensor Burn has no type for (fp8)
/// is an error naming it, with nothing written.
#[test]
fn methods_before_keys_and_unknown_dtypes_by_name() {
    let dir = scratch("method-first");
    model(&dir, "a", 0, "LlamaForCausalLM", None);
    model(&dir, "b", 5, "LlamaForCausalLM", None);
    std::fs::write(
        dir.join("karcher.yml"),
        "models:\n  - model: ./a\n  - model: ./b\nmerge_method: ties\nparameters:\n  density: 0.5\n  max_iter: 3\n",
    )
    .unwrap();
    let e = fails(&dir, &["yaml", "karcher.yml", "out"]);
    assert!(e.contains("merge_method `ties`"), "{e}");
    assert!(!e.contains("unknown field"), "{e}");
    // An fp8 tensor in B (safetensors `F8_E4M3`).
    let path = dir.join("fp8");
    std::fs::create_dir_all(&path).unwrap();
    let data: Vec<(String, Vec<u8>, Dtype)> = names()
        .into_iter()
        .map(|n| {
            if n == "model.norm.weight" {
                (n, vec![0x38u8; 24], Dtype::F8_E4M3)
            } else {
                let b = tensor(5, &n)
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                (n, b, Dtype::F32)
            }
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, b, d)| (n.clone(), TensorView::new(*d, vec![4, 6], b).unwrap()));
    safetensors::serialize_to_file(views, None, &path.join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("b/config.json"), path.join("config.json")).unwrap();
    std::fs::write(
        dir.join("fp8.yml"),
        "models:\n  - model: ./a\n  - model: ./fp8\nbase_model: ./a\nmerge_method: slerp\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    let e = fails(&dir, &["yaml", "fp8.yml", "out"]);
    assert!(e.contains("model.norm.weight"), "{e}");
    assert!(!dir.join("out").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

/// A YAML value of the recipe fuzz: scalars, lists and maps of the keys recipes use (and
/// some they do not), nested a few levels.
fn fuzz_value(depth: u32) -> proptest::prelude::BoxedStrategy<String> {
    use proptest::prelude::*;
    let scalar = prop_oneof![
        Just("0.5".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just(".nan".to_string()),
        Just("true".to_string()),
        Just("slerp".to_string()),
        Just("karcher".to_string()),
        Just("A".to_string()),
        Just("B".to_string()),
        Just("./missing".to_string()),
        Just("A+B".to_string()),
        Just("''".to_string()),
        Just("null".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[0, 4]".to_string()),
        Just("[4, 0]".to_string()),
        Just("[0, 1, 2]".to_string()),
        Just("[0.0, 0.5, 1.0]".to_string()),
        Just("bfloat16".to_string()),
        Just("float8".to_string()),
    ];
    if depth == 0 {
        return scalar.boxed();
    }
    let keys = prop::sample::select(vec![
        "merge_method",
        "base_model",
        "models",
        "slices",
        "sources",
        "model",
        "layer_range",
        "parameters",
        "t",
        "filter",
        "value",
        "weight",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "name",
        "max_iter",
        "zzz",
    ]);
    prop_oneof![
        2 => scalar,
        1 => prop::collection::vec(fuzz_value(depth - 1), 0..3)
            .prop_map(|items| format!("[{}]", items.join(", "))),
        2 => prop::collection::vec((keys, fuzz_value(depth - 1)), 0..4).prop_map(|pairs| {
            let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{{}}}", body.join(", "))
        }),
    ]
    .boxed()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Recipe text of random keys, values and nesting (around a valid skeleton, so that deep
    /// checks are reached too) gives a plan or an error, never a panic.
    #[test]
    fn recipes_never_panic(
        method in proptest::sample::select(vec![
            "slerp", "slerp", "slerp", "nuslerp", "multislerp", "karcher", "ties", "",
        ]),
        t in proptest::prop_oneof![
            3 => fuzz_value(2),
            1 => proptest::sample::select(vec![
                "[]".to_string(),
                "[{filter: mlp, value: []}]".to_string(),
                "[{filter: mlp, value: [0.1, 2]}, {value: []}]".to_string(),
                "[{value: 0.5}, {filter: 7}]".to_string(),
            ]),
        ],
        ranges in (fuzz_value(0), fuzz_value(0)),
        models in fuzz_value(3),
        extra in (proptest::sample::select(vec!["dtype", "out_dtype", "tokenizer_source", "zzz"]), fuzz_value(1)),
        whole in fuzz_value(3),
        shape in 0u8..5,
    ) {
        let dir = scratch("fuzz");
        let (a, b) = (
            model(&dir, "a", 0, "LlamaForCausalLM", None),
            model(&dir, "b", 5, "LlamaForCausalLM", None),
        );
        let text = match shape {
            0 => format!(
                "merge_method: {method}\n{}models: [{{model: A}}, {{model: B, \
                 parameters: {{weight: {t}}}}}]\nparameters: {{t: {t}, weight: {t}, eps: {t}, \
                 max_iter: {t}, normalize_weights: {t}}}\n",
                // nuslerp and multislerp without a base, so that both models are merged.
                if method.ends_with("slerp") && method != "slerp" { "" } else { "base_model: A\n" }
            ),
            3 => format!(
                "merge_method: slerp\nbase_model: A\nmodels: [{{model: A}}, {{model: B}}]\n\
                 parameters: {{t: 0.5}}\n{}: {}\n",
                extra.0, extra.1
            ),
            1 => format!(
                "merge_method: {method}\nbase_model: A\nslices: [{{sources: [{{model: A, \
                 layer_range: {}}}, {{model: B, layer_range: {}}}], parameters: {{t: {t}}}}}]\n\
                 parameters: {{t: 0.5}}\n",
                ranges.0, ranges.1
            ),
            2 => format!("merge_method: {method}\nbase_model: A\nmodels: {models}\nparameters: {{t: {t}}}\n"),
            _ => whole,
        };
        let text = text
            .replace("A+B", &format!("{}+{}", a.display(), b.display()))
            .replace('A', &a.display().to_string())
            .replace('B', &b.display().to_string());
        let recipe = dir.join(format!("r{}.yml", std::process::id()));
        std::fs::write(&recipe, &text).unwrap();
        let _ = burn_slerp::mergekit::plan_yaml(&recipe, false);
    }
}

/// Relative L2 distance of `got` from `want`.
fn rel(got: &[f64], want: &[f64]) -> f64 {
    let d: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let n: f64 = want.iter().map(|w| w * w).sum();
    (d / n).sqrt()
}

/// The layer position of a test tensor, as mergekit gives it for a `models:` recipe: the layer
/// index over `LAYERS − 1`, 0 outside the layers.
fn position(name: &str) -> f64 {
    name.split('.')
        .find_map(|p| p.parse::<usize>().ok())
        .map_or(0.0, |i| i as f64 / (LAYERS - 1) as f64)
}

/// `nuslerp`, `multislerp` and `karcher` recipes, with per-model weights given as numbers,
/// gradients and filter lists, against mergekit's formulas in f64 written in the test, weights
/// worked out by hand per tensor.
#[test]
fn slerp_family_recipes_match_their_formulas() {
    use common::family::{karcher64, multislerp64, nuslerp64};
    let dir = scratch("family");
    model(&dir, "base", 0, "LlamaForCausalLM", None);
    model(&dir, "a", 5, "LlamaForCausalLM", None);
    model(&dir, "b", 9, "LlamaForCausalLM", None);
    // multislerp with a base: a's weight a gradient 1 → 3 over the layers, b's 2 on the MLPs
    // and 0.5 elsewhere.
    std::fs::write(
        dir.join("multi.yml"),
        "models:\n  - model: ./a\n    parameters:\n      weight: [1.0, 3.0]\n  - model: ./b\n    parameters:\n      weight:\n        - filter: mlp\n          value: 2.0\n        - value: 0.5\n  - model: ./base\nbase_model: ./base\nmerge_method: multislerp\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "multi.yml", "out-multi", "--quiet"]);
    let got = read(&dir.join("out-multi/model.safetensors"));
    assert_eq!(got.len(), names().len());
    let mut wants = BTreeMap::new();
    for name in names() {
        let pos = position(&name);
        let w = [
            1.0 + 2.0 * pos,
            if name.contains("mlp") { 2.0 } else { 0.5 },
        ];
        let base = tensor(0, &name);
        let tv: Vec<Vec<f64>> = [5, 9]
            .iter()
            .map(|s| {
                tensor(*s, &name)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| x - b)
                    .collect()
            })
            .collect();
        let mean = multislerp64(&tv, &w, true, 1e-8);
        let want: Vec<f64> = base.iter().zip(&mean).map(|(b, d)| b + d).collect();
        let err = rel(&got[&name], &want);
        assert!(err <= 1e-6, "multislerp {name}: {err:e}");
        wants.insert(name, want);
    }
    // `out_dtype: bfloat16`: the same mean, rounded to bf16 (within bf16's half ulp, 2⁻⁹ of
    // each value, plus the f32 rounding before it).
    std::fs::write(
        dir.join("multi16.yml"),
        std::fs::read_to_string(dir.join("multi.yml")).unwrap() + "out_dtype: bfloat16\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "multi16.yml", "out-multi16", "--quiet"]);
    let bytes = std::fs::read(dir.join("out-multi16/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    for name in names() {
        let view = file.tensor(&name).unwrap();
        assert_eq!(view.dtype(), Dtype::BF16, "{name}");
        for (b, w) in view.data().chunks_exact(2).zip(&wants[&name]) {
            let v = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16) as f64;
            assert!(
                (v - w).abs() <= w.abs() * (1.0 / 256.0) + 1e-30,
                "{name}: {v} vs {w}"
            );
        }
    }
    // nuslerp without a base: t = w_b/(w_a + w_b) = 3/4, the weights from the top level and
    // from b's own parameters.
    std::fs::write(
        dir.join("nu.yml"),
        "models:\n  - model: ./a\n  - model: ./b\n    parameters:\n      weight: 3\nmerge_method: nuslerp\nparameters:\n  weight: 1\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "nu.yml", "out-nu", "--quiet"]);
    let got = read(&dir.join("out-nu/model.safetensors"));
    for name in names() {
        let want = nuslerp64(&tensor(5, &name), &tensor(9, &name), 0.75);
        let err = rel(&got[&name], &want);
        assert!(err <= 1e-6, "nuslerp {name}: {err:e}");
    }
    // karcher: the base joins as one more input of equal weight; mergekit's 10 steps and
    // tolerance 1e-5 by default, `--exact` the Karcher mean to convergence. A weight is ignored,
    // with a warning.
    std::fs::write(
        dir.join("karcher.yml"),
        "models:\n  - model: ./a\n  - model: ./b\nbase_model: ./base\nmerge_method: karcher\nparameters:\n  weight: 0.3\n  max_iter: 4\n",
    )
    .unwrap();
    let o = succeeds(&dir, &["yaml", "karcher.yml", "out-karcher"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("`weight` is ignored by karcher"));
    succeeds(
        &dir,
        &["yaml", "karcher.yml", "out-exact", "--exact", "--quiet"],
    );
    let (got, exact) = (
        read(&dir.join("out-karcher/model.safetensors")),
        read(&dir.join("out-exact/model.safetensors")),
    );
    for name in names() {
        let xs: Vec<Vec<f64>> = [5, 9, 0].iter().map(|s| tensor(*s, &name)).collect();
        let err = rel(&got[&name], &karcher64(&xs, &[1.0; 3], Some((4, 1e-5))));
        assert!(err <= 1e-6, "karcher {name}: {err:e}");
        let err = rel(&exact[&name], &karcher64(&xs, &[1.0; 3], None));
        assert!(err <= 1e-6, "exact karcher {name}: {err:e}");
    }
}

/// What the family recipes refuse, by name.
#[test]
fn slerp_family_refusals_name_what_is_wrong() {
    let dir = scratch("family-refused");
    for (folder, seed) in [("base", 0), ("a", 5), ("b", 9), ("c", 11)] {
        model(&dir, folder, seed, "LlamaForCausalLM", None);
    }
    let cases = [
        (
            "models:\n  - model: ./a\n  - model: ./b\n  - model: ./c\nmerge_method: nuslerp\nparameters:\n  weight: 1\n",
            "exactly two models",
        ),
        (
            "models:\n  - model: ./a\n    parameters:\n      weight: 1\n  - model: ./b\n    parameters:\n      weight:\n        - filter: mlp\n          value: 1\nmerge_method: multislerp\n",
            "missing weight for model `./b` at `lm_head.weight`",
        ),
        (
            "models:\n  - model: ./a\n  - model: ./b\nmerge_method: nuslerp\nparameters:\n  weight: 1\n  nuslerp_flatten: false\n",
            "nuslerp_flatten: false",
        ),
        (
            "models:\n  - model: ./a\n  - model: ./b\nmerge_method: nuslerp\nparameters:\n  weight: 1\n  nuslerp_row_wise: true\n",
            "nuslerp_row_wise: true",
        ),
        (
            "models:\n  - model: ./a\n  - model: ./b\nmerge_method: multislerp\nparameters:\n  weight: 1\n  eps: [0.0, 1.0e-3]\n",
            "`eps` is",
        ),
        (
            "slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 4]\n      - model: ./b\n        layer_range: [0, 4]\nmerge_method: karcher\n",
            "`slices:` with merge_method `karcher`",
        ),
        (
            "models:\n  - model: ./a\n    parameters:\n      weight: 1\n  - model: ./b\n    parameters:\n      weight: -1\nmerge_method: multislerp\n",
            "sum to 0",
        ),
        (
            "models:\n  - model: ./a\n  - model: ./b\nmerge_method: karcher\ndtype: bfloat16\n",
            "`dtype`",
        ),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let file = format!("r{i}.yml");
        std::fs::write(dir.join(&file), text).unwrap();
        let e = fails(&dir, &["yaml", &file, "out"]);
        assert!(e.contains(expect), "case {i}: {e}");
        assert!(!dir.join("out").exists());
    }
}

/// mergekit's multislerp returns a lone model as it is: its tensors (converted to `out_dtype`
/// when the recipe gives one), with the model folder's files.
#[test]
fn multislerp_of_one_model_is_that_model() {
    let dir = scratch("multislerp-one");
    model(&dir, "a", 5, "LlamaForCausalLM", None);
    std::fs::write(
        dir.join("one.yml"),
        "models:\n  - model: ./a\nmerge_method: multislerp\nparameters:\n  weight: 1\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "one.yml", "out"]);
    assert!(
        std::fs::read(dir.join("out/model.safetensors")).unwrap()
            == std::fs::read(dir.join("a/model.safetensors")).unwrap(),
        "the model, byte for byte"
    );
    assert_eq!(std::fs::read(dir.join("out/tokenizer.json")).unwrap(), b"a");
    std::fs::write(
        dir.join("half.yml"),
        "models:\n  - model: ./a\nmerge_method: multislerp\nparameters:\n  weight: 1\nout_dtype: bfloat16\n",
    )
    .unwrap();
    succeeds(&dir, &["yaml", "half.yml", "half"]);
    let bytes = std::fs::read(dir.join("half/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    for name in names() {
        let got: Vec<f64> = file
            .tensor(&name)
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect();
        let want: Vec<f64> = tensor(5, &name)
            .iter()
            .map(|v| half::bf16::from_f32(*v as f32).to_f64())
            .collect();
        assert_eq!(got, want, "{name}: each value rounded once to bf16");
    }
}
