//! mergekit YAML recipes (`merge_method: slerp`), read as they are and merged as mergekit 0.1.5
//! merges them: `models:` or `slices:` of `sources:` with `layer_range`, `base_model` as the
//! `t = 0` side, `t` from the slice's `parameters`, then the top level (numbers, gradients, or
//! lists of `{filter, value}` entries matched by substring), `dtype` and `out_dtype`.
//!
//! Parsed with serde-saphyr, a maintained YAML deserializer for serde built on the saphyr parser
//! (`serde_yaml` and `serde_yml` are unmaintained); every struct denies unknown keys, so a key
//! this reader does not know is an error naming it (mergekit ignores such keys).

use std::path::Path;

use burn::tensor::{DType, Device};
use serde::Deserialize;

use super::family::{Family, Method, resolve_family};
use crate::checkpoint::plan::is_float;
use crate::checkpoint::renamed::{self, Listed, Renamed};
use crate::checkpoint::{
    Checkpoint, CheckpointError, FileMerge, OutDType, Progress, TokenizerSource, mean_files,
};
use crate::config::{Granularity, SlerpConfig, ZeroNorm};
use crate::module::mean::MeanStats;
use crate::report::MergeReport;

/// A recipe as written (the keys mergekit 0.1.5 reads for a slerp merge, and the ones refused by
/// name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Recipe {
    merge_method: String,
    #[serde(default)]
    pub(super) base_model: Option<String>,
    #[serde(default)]
    pub(super) models: Option<Vec<ModelEntry>>,
    #[serde(default)]
    pub(super) slices: Option<Vec<SliceEntry>>,
    #[serde(default)]
    pub(super) parameters: Option<Parameters>,
    #[serde(default)]
    pub(super) dtype: Option<String>,
    #[serde(default)]
    pub(super) out_dtype: Option<String>,
    #[serde(default)]
    pub(super) tokenizer_source: Option<String>,
    // Refused when present, with what to use instead.
    #[serde(default)]
    tokenizer: Option<serde_json::Value>,
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
    #[serde(default)]
    modules: Option<serde_json::Value>,
    /// A name for the merged model; read and not used, as mergekit uses it only for its card.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModelEntry {
    pub(super) model: String,
    #[serde(default)]
    pub(super) parameters: Option<Parameters>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SliceEntry {
    sources: Vec<Source>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    model: String,
    #[serde(default)]
    layer_range: Option<[usize; 2]>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

/// The parameters of a level (the top, a slice, a model or a source): `t` for slerp, the
/// others for the SLERP family's other members ([`super::family`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Parameters {
    #[serde(default)]
    pub(super) t: Option<TValue>,
    #[serde(default)]
    pub(super) weight: Option<TValue>,
    #[serde(default)]
    pub(super) eps: Option<TValue>,
    #[serde(default)]
    pub(super) normalize_weights: Option<TValue>,
    #[serde(default)]
    pub(super) nuslerp_flatten: Option<TValue>,
    #[serde(default)]
    pub(super) nuslerp_row_wise: Option<TValue>,
    #[serde(default)]
    pub(super) max_iter: Option<TValue>,
    #[serde(default)]
    pub(super) tol: Option<TValue>,
}

impl Parameters {
    /// The parameters given here, by name, other than those of `keep`.
    pub(super) fn given_except(&self, keep: &[&str]) -> Vec<&'static str> {
        [
            ("t", self.t.is_some()),
            ("weight", self.weight.is_some()),
            ("eps", self.eps.is_some()),
            ("normalize_weights", self.normalize_weights.is_some()),
            ("nuslerp_flatten", self.nuslerp_flatten.is_some()),
            ("nuslerp_row_wise", self.nuslerp_row_wise.is_some()),
            ("max_iter", self.max_iter.is_some()),
            ("tol", self.tol.is_some()),
        ]
        .into_iter()
        .filter(|(name, given)| *given && !keep.contains(name))
        .map(|(name, _)| name)
        .collect()
    }
}

/// A parameter's value: a number (or a boolean, read as 1 or 0, as Python does), a gradient,
/// or a list of filtered entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum TValue {
    Bool(bool),
    Number(f64),
    Gradient(Vec<f64>),
    Entries(Vec<Entry>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Entry {
    #[serde(default)]
    filter: Option<String>,
    value: EntryValue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EntryValue {
    Bool(bool),
    Number(f64),
    Gradient(Vec<f64>),
}

/// How a gradient is read: interpolated (numbers), or one entry picked (`values[⌊pos·(n −
/// 1)⌋]`: integers and booleans, as mergekit picks them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    Interpolated,
    Picked,
}

fn picked(values: &[f64], pos: f64) -> f64 {
    let n = values.len();
    values[((pos * (n - 1) as f64) as usize).min(n - 1)]
}

/// mergekit's gradient: `x = pos·(n − 1)`, linear between `v[⌊x⌋]` and `v[min(⌊x⌋ + 1, n − 1)]`.
fn gradient(values: &[f64], pos: f64) -> f64 {
    let n = values.len();
    if n == 1 {
        return values[0];
    }
    let x = pos * (n - 1) as f64;
    let i = (x.floor() as usize).min(n - 1);
    let j = (i + 1).min(n - 1);
    values[i] + (x - i as f64) * (values[j] - values[i])
}

/// Where a tensor's `t` came from, for the dry run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub(crate) t: f64,
    /// `slice k`, or `top level`.
    pub(crate) level: String,
    /// The entry that matched (`filter "self_attn"`, `entry 2 (no filter)`), or the value's kind.
    pub(crate) entry: String,
}

/// `t` for output tensor `name` at layer position `pos` in its slice: the slice's parameters,
/// then the top level's; the first matching entry of a list wins, a list that matches nothing
/// falls through.
fn resolve(name: &str, pos: f64, levels: &[(String, Option<&Parameters>)]) -> Option<Resolved> {
    let values: Vec<(String, Option<&TValue>)> = levels
        .iter()
        .map(|(level, p)| (level.clone(), p.and_then(|p| p.t.as_ref())))
        .collect();
    resolve_value(name, pos, &values, Read::Interpolated)
}

/// One parameter for tensor `name` at layer position `pos`, from the first level that gives a
/// value: a number, a gradient read as `read` says, or the first entry of a list whose filter
/// is a substring of `name`. A list that matches nothing, and an empty list (mergekit's "no
/// value"), fall through to the next level.
pub(super) fn resolve_value(
    name: &str,
    pos: f64,
    levels: &[(String, Option<&TValue>)],
    read: Read,
) -> Option<Resolved> {
    let at = |values: &[f64]| match read {
        Read::Interpolated => gradient(values, pos),
        Read::Picked => picked(values, pos),
    };
    for (level, value) in levels {
        let Some(value) = value else {
            continue;
        };
        let found = |t: f64, entry: String| {
            Some(Resolved {
                t,
                level: level.clone(),
                entry,
            })
        };
        match value {
            TValue::Bool(b) => return found(f64::from(u8::from(*b)), "a boolean".into()),
            TValue::Number(v) => return found(*v, "a number".into()),
            // An empty list is no value, as mergekit reads it: the next level decides.
            TValue::Gradient(values) if values.is_empty() => {}
            TValue::Gradient(values) => return found(at(values), "a gradient".into()),
            TValue::Entries(entries) => {
                for (k, entry) in entries.iter().enumerate() {
                    let matches = match entry.filter.as_deref() {
                        None | Some("*") => true,
                        Some(filter) => name.contains(filter),
                    };
                    // An entry whose value is an empty list gives no value either.
                    let empty = matches!(&entry.value, EntryValue::Gradient(v) if v.is_empty());
                    if matches && !empty {
                        let what = match &entry.filter {
                            Some(f) => format!("entry {k} (filter \"{f}\")"),
                            None => format!("entry {k} (no filter)"),
                        };
                        let v = match &entry.value {
                            EntryValue::Bool(b) => f64::from(u8::from(*b)),
                            EntryValue::Number(v) => *v,
                            EntryValue::Gradient(values) => at(values),
                        };
                        return found(v, what);
                    }
                }
            }
        }
    }
    None
}

/// The layer index of a tensor name: its first `.N.` segment.
pub(crate) fn layer_index(name: &str) -> Option<(usize, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    let mut offset = 0;
    for (i, part) in parts.iter().enumerate() {
        if i > 0
            && i + 1 < parts.len()
            && !part.is_empty()
            && part.bytes().all(|b| b.is_ascii_digit())
        {
            return part.parse().ok().map(|n| (n, offset));
        }
        offset += part.len() + 1;
    }
    None
}

/// `name` with its layer index replaced by `layer`.
fn renumber(name: &str, layer: usize) -> String {
    match layer_index(name) {
        Some((old, start)) => {
            let end = start + old.to_string().len();
            format!("{}{layer}{}", &name[..start], &name[end..])
        }
        None => name.to_string(),
    }
}

/// Whether a tensor outside the layers comes after them, for the architectures mergekit ships
/// templates for; `None` for an architecture this table does not know.
fn after_layers(architecture: &str, name: &str) -> Option<bool> {
    match architecture {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
        | "GemmaForCausalLM" | "Gemma2ForCausalLM" | "Phi3ForCausalLM" => {
            Some(name.starts_with("model.norm.") || name.starts_with("lm_head."))
        }
        "GPT2LMHeadModel" => {
            Some(name.starts_with("transformer.ln_f.") || name.starts_with("lm_head."))
        }
        _ => None,
    }
}

pub(super) fn dtype_of(text: &str, key: &str) -> Result<DType, CheckpointError> {
    match text {
        "float32" | "fp32" | "float" => Ok(DType::F32),
        "float16" | "fp16" | "half" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        other => Err(refused(format!(
            "`{key}: {other}` is not a dtype this merge writes (float32, float16, bfloat16)"
        ))),
    }
}

pub(super) fn refused(reason: String) -> CheckpointError {
    CheckpointError::Recipe { reason }
}

/// One output tensor of a recipe, resolved.
#[derive(Debug, Clone)]
pub struct YamlTensor {
    /// Its name in the output.
    pub name: String,
    /// Its name in A (the base model) and in B.
    pub sources: (String, String),
    /// Its factor; `None` for a tensor copied from A (integer and boolean tensors).
    pub t: Option<f64>,
    /// Where `t` came from: the level (`slice k`, `top level`) and the entry.
    pub matched: String,
    /// The layer offset `k / (len − 1)` inside its slice (0 outside the layers).
    pub position: f64,
    /// The weight of each input, in order, for `nuslerp`, `multislerp` and `karcher` (empty
    /// for `slerp`).
    pub weights: Vec<f64>,
}

/// A recipe resolved against its models: what [`yaml_files`] writes.
pub struct YamlPlan {
    /// Every output tensor, in A's order within each slice.
    pub tensors: Vec<YamlTensor>,
    /// Keys mergekit reads but ignores for slerp (source-level and per-model `t`).
    pub warnings: Vec<String>,
    /// The models, as the recipe names them: A (`base_model`) and B.
    pub models: (String, String),
    inputs: Option<(Checkpoint, Checkpoint)>,
    out_dtype: Option<DType>,
    input_dtype: Option<DType>,
    tokenizer_source: TokenizerSource,
    layers: Option<Vec<usize>>,
    exact: bool,
    /// What a `nuslerp`, `multislerp` or `karcher` recipe merges.
    family: Option<Family>,
}

impl YamlPlan {
    /// The plan of a `nuslerp`, `multislerp` or `karcher` recipe.
    pub(super) fn family(
        tensors: Vec<YamlTensor>,
        warnings: Vec<String>,
        models: (String, String),
        family: Family,
    ) -> Self {
        Self {
            tensors,
            warnings,
            models,
            inputs: None,
            out_dtype: None,
            input_dtype: None,
            tokenizer_source: TokenizerSource::A,
            layers: None,
            exact: false,
            family: Some(family),
        }
    }

    /// Whether the recipe is a mean (`nuslerp`, `multislerp`, `karcher`) rather than `slerp`:
    /// [`yaml_files`] then returns [`YamlResult::Mean`].
    pub fn is_mean(&self) -> bool {
        self.family.is_some()
    }
}

impl std::fmt::Display for YamlPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(family) = &self.family {
            let inputs: Vec<String> = family
                .inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            writeln!(f, "inputs: {}", inputs.join(", "))?;
            if let Some(base) = &family.base {
                writeln!(f, "base of the task vectors: {}", base.display())?;
            }
            for t in &self.tensors {
                let matched = if t.matched.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", t.matched)
                };
                writeln!(
                    f,
                    "{}  weights {:?}  offset {:.4}{matched}",
                    t.name, t.weights, t.position
                )?;
            }
            for w in &self.warnings {
                writeln!(f, "warning: {w}")?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "A (base_model, t = 0): {}; B: {}",
            self.models.0, self.models.1
        )?;
        for t in &self.tensors {
            let sources = if t.sources.0 == t.name && t.sources.1 == t.name {
                String::new()
            } else {
                format!(" <- A:{} B:{}", t.sources.0, t.sources.1)
            };
            match t.t {
                Some(v) => writeln!(
                    f,
                    "{}{sources}  t={v:.6}  ({})  offset {:.4}",
                    t.name, t.matched, t.position
                )?,
                None => writeln!(f, "{}{sources}  copied from A", t.name)?,
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Reads a mergekit YAML recipe and resolves it against its models (opened, nothing computed).
/// `exact` switches mergekit's numerics (threshold `|cos| > 0.9995` → lerp, a zero norm counted
/// as 1) to burn-slerp's exact SLERP and its zero-norm lerp.
///
/// # Errors
///
/// [`CheckpointError::Recipe`] for a recipe this reader refuses (another `merge_method`,
/// `modules:`, LoRA sources, `tokenizer:`, `chat_template`, `tokenizer_source: union`, `t`
/// outside [0, 1], a key it does not know, a tensor no `t` covers), and the errors of opening
/// the models.
pub fn plan_yaml(recipe: &Path, exact: bool) -> Result<YamlPlan, CheckpointError> {
    let text = std::fs::read_to_string(recipe).map_err(|source| CheckpointError::Io {
        path: recipe.to_path_buf(),
        source,
    })?;
    let format = |e: serde_saphyr::Error| CheckpointError::Format {
        path: recipe.to_path_buf(),
        message: format!("not a recipe this reader knows: {e}"),
    };
    // The method first: a recipe for another method is refused for that, not for a key of its
    // own this reader does not know.
    let method: MethodOnly = serde_saphyr::from_str(&text).map_err(format)?;
    let family = match method.merge_method.as_deref() {
        Some("slerp") => None,
        Some(other) => Some(Method::of(other).ok_or_else(|| unsupported_method(other))?),
        None => return Err(refused("the recipe has no `merge_method`".into())),
    };
    let parsed: Recipe = serde_saphyr::from_str(&text).map_err(format)?;
    common_refusals(&parsed)?;
    match family {
        Some(method) => resolve_family(parsed, method, exact),
        None => resolve_recipe(parsed, exact),
    }
}

/// The keys refused whatever the method, with what to do instead.
fn common_refusals(recipe: &Recipe) -> Result<(), CheckpointError> {
    if recipe.modules.is_some() {
        return Err(refused(
            "`modules:` is not supported; merge each model separately".into(),
        ));
    }
    if recipe.tokenizer.is_some() {
        return Err(refused(
            "`tokenizer:` is not supported: the tokenizer is copied from one input \
             (`tokenizer_source: base`, or the other model)"
                .into(),
        ));
    }
    if recipe.chat_template.is_some() {
        return Err(refused(
            "`chat_template` is not supported: the chat template comes with the tokenizer source's files"
                .into(),
        ));
    }
    Ok(())
}

/// The one key read before the others.
#[derive(Debug, Deserialize)]
struct MethodOnly {
    #[serde(default)]
    merge_method: Option<String>,
}

fn unsupported_method(method: &str) -> CheckpointError {
    refused(format!(
        "merge_method `{method}` is not supported: only the SLERP family is (`slerp`, `nuslerp`, \
         `multislerp`, `karcher`); for other means of N models see `burn-slerp mean --method`"
    ))
}

/// The recipe against its models, opened here.
fn resolve_recipe(recipe: Recipe, exact: bool) -> Result<YamlPlan, CheckpointError> {
    if recipe.merge_method != "slerp" {
        return Err(unsupported_method(&recipe.merge_method));
    }
    let base = recipe
        .base_model
        .clone()
        .ok_or_else(|| refused("slerp needs `base_model` (the model at t = 0)".into()))?;
    let mut warnings = Vec::new();
    let mut levels_given: Vec<(String, &Parameters)> = Vec::new();
    levels_given.extend(
        recipe
            .parameters
            .iter()
            .map(|p| ("the top level".to_string(), p)),
    );
    for (i, slice) in recipe.slices.iter().flatten().enumerate() {
        levels_given.extend(slice.parameters.iter().map(|p| (format!("slice {i}"), p)));
    }
    for (level, p) in levels_given {
        for unread in p.given_except(&["t"]) {
            warnings.push(format!(
                "`{unread}` at {level} is not a parameter of slerp; ignored, as mergekit ignores it"
            ));
        }
    }
    // (A's range, B's range, parameters) per slice; `None` ranges: every layer.
    type Slice = (Option<[usize; 2]>, Option<[usize; 2]>, Option<Parameters>);
    let (other, slices): (String, Vec<Slice>) = match (&recipe.models, &recipe.slices) {
        (Some(_), Some(_)) => {
            return Err(refused("give `models:` or `slices:`, not both".into()));
        }
        (None, None) => {
            return Err(refused(
                "the recipe has neither `models:` nor `slices:`".into(),
            ));
        }
        (Some(models), None) => {
            for m in models {
                if m.parameters.as_ref().is_some_and(|p| p.t.is_some()) {
                    warnings.push(format!(
                        "the `t` given for model `{}` is ignored, as mergekit ignores it",
                        m.model
                    ));
                }
            }
            let others: Vec<&String> = models
                .iter()
                .map(|m| &m.model)
                .filter(|m| **m != base)
                .collect();
            let other = match others.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(refused(format!(
                        "slerp merges `base_model` with exactly one other model; `models:` lists {}",
                        models.len()
                    )));
                }
            };
            (other, vec![(None, None, None)])
        }
        (None, Some(slices)) => {
            let mut other: Option<String> = None;
            let mut out = Vec::new();
            for (i, slice) in slices.iter().enumerate() {
                if slice.sources.len() != 2 {
                    return Err(refused(format!(
                        "slice {i} has {} sources; slerp takes two",
                        slice.sources.len()
                    )));
                }
                let mut a = None;
                let mut b = None;
                for source in &slice.sources {
                    if source.parameters.as_ref().is_some_and(|p| p.t.is_some()) {
                        warnings.push(format!(
                            "the `t` given for source `{}` of slice {i} is ignored, as mergekit ignores it",
                            source.model
                        ));
                    }
                    if source.model == base && a.is_none() {
                        a = Some(source.layer_range);
                    } else {
                        if other.as_ref().is_some_and(|o| *o != source.model) {
                            return Err(refused(format!(
                                "slice {i} merges `{}`, another model than the earlier slices' `{}`",
                                source.model,
                                other.unwrap_or_default()
                            )));
                        }
                        other = Some(source.model.clone());
                        b = Some(source.layer_range);
                    }
                }
                let (Some(ra), Some(rb)) = (a, b) else {
                    return Err(refused(format!(
                        "slice {i} does not take one source from `base_model` and one from the other model"
                    )));
                };
                if let (Some(x), Some(y)) = (ra, rb)
                    && x[1].saturating_sub(x[0]) != y[1].saturating_sub(y[0])
                {
                    return Err(refused(format!(
                        "slice {i}: layer_range {x:?} and {y:?} are not the same length"
                    )));
                }
                out.push((ra, rb, slice.parameters.clone()));
            }
            (
                other.ok_or_else(|| refused("no slice names a second model".into()))?,
                out,
            )
        }
    };
    for model in [&base, &other] {
        if model.contains('+') {
            return Err(refused(format!(
                "`{model}`: LoRA sources (`model+lora`) are not supported; merge the adapter into the model first"
            )));
        }
    }
    let tokenizer_source = match recipe.tokenizer_source.as_deref() {
        None | Some("base") => TokenizerSource::A,
        Some(m) if m == other => TokenizerSource::B,
        Some(m) if m == base => TokenizerSource::A,
        Some("union") => {
            return Err(refused(
                "`tokenizer_source: union` is not supported: it rebuilds the embeddings; give \
                 `base` or one of the models"
                    .into(),
            ));
        }
        Some(m) => {
            return Err(refused(format!(
                "`tokenizer_source: {m}` is not supported: give `base` or one of the models"
            )));
        }
    };
    let input_dtype = recipe
        .dtype
        .as_deref()
        .map(|d| dtype_of(d, "dtype"))
        .transpose()?;
    let out_dtype = match recipe.out_dtype.as_deref() {
        Some(d) => Some(dtype_of(d, "out_dtype")?),
        None => input_dtype,
    };
    let open = |model: &str| Checkpoint::open(Path::new(model));
    let (a, b) = (open(&base)?, open(&other)?);

    let layers_of = |c: &Checkpoint| {
        c.names()
            .iter()
            .filter_map(|n| layer_index(n).map(|(i, _)| i + 1))
            .max()
            .unwrap_or(0)
    };
    let (la, lb) = (layers_of(&a), layers_of(&b));
    let ranges: Vec<([usize; 2], [usize; 2], Option<Parameters>)> = slices
        .into_iter()
        .map(|(ra, rb, p)| (ra.unwrap_or([0, la]), rb.unwrap_or([0, lb]), p))
        .collect();
    for (i, (ra, rb, _)) in ranges.iter().enumerate() {
        if ra[1] > la || rb[1] > lb || ra[0] >= ra[1] {
            return Err(refused(format!(
                "slice {i}: layer_range {ra:?} / {rb:?} does not fit the models' {la} / {lb} layers"
            )));
        }
    }
    let architecture = a
        .folder()
        .and_then(|f| std::fs::read_to_string(f.join("config.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_default();

    let levels = |slice: usize| -> Vec<(String, Option<&Parameters>)> {
        vec![
            (format!("slice {slice}"), ranges[slice].2.as_ref()),
            ("top level".to_string(), recipe.parameters.as_ref()),
        ]
    };
    let missing = |name: &str| {
        refused(format!(
            "missing t for `{name}` (no level of the recipe gives one)"
        ))
    };
    let check_t = |r: &Resolved, name: &str| {
        if r.t.is_finite() && (0.0..=1.0).contains(&r.t) {
            Ok(())
        } else {
            Err(refused(format!(
                "t = {} for `{name}` ({}, {}) is outside [0, 1]",
                r.t, r.level, r.entry
            )))
        }
    };
    let mut tensors = Vec::new();
    let names = a.names();
    let float = |c: &Checkpoint, n: &str| c.entry(n).and_then(|e| e.dtype).is_some_and(is_float);
    let last = ranges.len() - 1;
    // Tensors outside the layers: before them, then the layers slice by slice, then after.
    let outside: Vec<&String> = names.iter().filter(|n| layer_index(n).is_none()).collect();
    let mut after = Vec::new();
    for name in &outside {
        let is_after = after_layers(&architecture, name);
        let resolved = if float(&a, name) {
            let first = resolve(name, 0.0, &levels(0)).ok_or_else(|| missing(name))?;
            let chosen = match is_after {
                Some(true) => resolve(name, 0.0, &levels(last)).ok_or_else(|| missing(name))?,
                Some(false) => first,
                None => {
                    let other = resolve(name, 0.0, &levels(last)).ok_or_else(|| missing(name))?;
                    if other.t != first.t {
                        return Err(refused(format!(
                            "`{name}` lies outside the layers of an architecture this reader \
                             does not know (`{architecture}`): mergekit would take its t from \
                             the first slice ({}), and the last slice gives {}; make them agree",
                            first.t, other.t
                        )));
                    }
                    first
                }
            };
            check_t(&chosen, name)?;
            Some(chosen)
        } else {
            None
        };
        let tensor = YamlTensor {
            name: (*name).clone(),
            sources: ((*name).clone(), (*name).clone()),
            t: resolved.as_ref().map(|r| r.t),
            matched: resolved
                .map(|r| format!("{}, {}", r.level, r.entry))
                .unwrap_or_default(),
            position: 0.0,
            weights: Vec::new(),
        };
        if is_after == Some(true) {
            after.push(tensor);
        } else {
            tensors.push(tensor);
        }
    }
    let mut layers = Vec::new();
    let mut counter = 0;
    for (s, (ra, rb, _)) in ranges.iter().enumerate() {
        let len = ra[1] - ra[0];
        for k in 0..len {
            let pos = if len == 1 {
                1.0
            } else {
                k as f64 / (len - 1) as f64
            };
            let (la_k, lb_k, out_k) = (ra[0] + k, rb[0] + k, counter + k);
            layers.push(la_k);
            for name in names
                .iter()
                .filter(|n| layer_index(n).map(|(i, _)| i) == Some(la_k))
            {
                let out_name = renumber(name, out_k);
                let b_name = renumber(name, lb_k);
                let resolved = if float(&a, name) {
                    let r =
                        resolve(&out_name, pos, &levels(s)).ok_or_else(|| missing(&out_name))?;
                    check_t(&r, &out_name)?;
                    Some(r)
                } else {
                    None
                };
                tensors.push(YamlTensor {
                    name: out_name,
                    sources: (name.clone(), b_name),
                    t: resolved.as_ref().map(|r| r.t),
                    matched: resolved
                        .map(|r| format!("{}, {}", r.level, r.entry))
                        .unwrap_or_default(),
                    position: pos,
                    weights: Vec::new(),
                });
            }
        }
        counter += len;
    }
    tensors.extend(after);
    // B holds every source, of A's shape and a float dtype where A's is.
    // The checks of every file merge, before anything is planned.
    renamed::check(&a, &b, &listed(&tensors))?;
    let identity = layers.len() == la && layers.iter().enumerate().all(|(i, l)| i == *l);
    Ok(YamlPlan {
        tensors,
        warnings,
        models: (base, other),
        inputs: Some((a, b)),
        out_dtype,
        input_dtype,
        tokenizer_source,
        layers: (!identity).then_some(layers),
        exact,
        family: None,
    })
}

/// The numerics of a recipe: mergekit 0.1.5's slerp (one angle per tensor, lerp when
/// `|cos| > 0.9995`, a zero norm counted as 1), or with `exact` burn-slerp's exact SLERP.
///
/// One angle per tensor, not per row: mergekit 0.1.5's kernel keeps "the leading output-batch
/// axis", and that axis is the batch of tensors it merges at once, so each tensor is one vector
/// (measured: its output equals whole-tensor slerp to the bit, and differs from per-row slerp).
fn config(exact: bool) -> SlerpConfig {
    let config = SlerpConfig::new(0.5).with_granularity(Granularity::Tensor);
    if exact {
        config
    } else {
        config
            .with_dot_threshold(Some(0.9995))
            .with_zero_norm(ZeroNorm::Mergekit)
    }
}

/// What [`yaml_files`] computed: the report of a `slerp` recipe, or what the mean computed for
/// each tensor of a `nuslerp`, `multislerp` or `karcher` recipe.
#[derive(Debug)]
pub enum YamlResult {
    /// `merge_method: slerp`.
    Slerp(MergeReport),
    /// `merge_method: nuslerp`, `multislerp` or `karcher`.
    Mean(Vec<MeanStats>),
}

/// Merges what `plan` resolved into `out` (a folder for a model folder, or a `.safetensors` /
/// `.bpk` file), on `device`, one tensor at a time, as
/// [`merge_files`](crate::checkpoint::merge_files) and [`mean_files`] do (atomic output, the
/// model files of a model folder).
///
/// # Errors
///
/// As [`merge_files`](crate::checkpoint::merge_files) and [`mean_files`].
pub fn yaml_files(
    mut plan: YamlPlan,
    out: &Path,
    device: Device,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<YamlResult, CheckpointError> {
    if let Some(family) = plan.family.take() {
        let mut options = FileMerge::new(config(plan.exact), device);
        options.base = family.base;
        options.out_dtype = family.out_dtype.map(out_dtype);
        options.cancel = cancel;
        options.check_cancel()?;
        let stats = mean_files(&family.inputs, &family.mean, out, &options, progress)?;
        return Ok(YamlResult::Mean(stats));
    }
    slerp_files(plan, out, device, cancel, progress).map(YamlResult::Slerp)
}

/// A dtype [`dtype_of`] reads, as the file layer's output dtype.
fn out_dtype(dtype: DType) -> OutDType {
    match dtype {
        DType::F16 => OutDType::F16,
        DType::BF16 => OutDType::BF16,
        _ => OutDType::F32,
    }
}

/// The output tensors of a `slerp` plan, as the file layer lists them.
fn listed(tensors: &[YamlTensor]) -> Vec<Listed> {
    tensors
        .iter()
        .map(|t| Listed {
            name: t.name.clone(),
            sources: t.sources.clone(),
            t: t.t,
            position: t.position,
        })
        .collect()
}

/// [`yaml_files`] for a `slerp` recipe.
fn slerp_files(
    mut plan: YamlPlan,
    out: &Path,
    device: Device,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<MergeReport, CheckpointError> {
    let (a, b) = plan
        .inputs
        .take()
        .ok_or_else(|| refused("this plan was written already: resolve the recipe again".into()))?;
    let mut options = FileMerge::new(config(plan.exact), device);
    options.out_dtype = plan.out_dtype.map(out_dtype);
    options.tokenizer_source = plan.tokenizer_source;
    options.cancel = cancel;
    let merge = Renamed {
        a,
        b,
        names: plan.models.clone(),
        tensors: listed(&plan.tensors),
        input_dtype: plan.input_dtype,
        layers: plan.layers.take(),
    };
    renamed::write_renamed(merge, out, &options, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(yaml: &str) -> Parameters {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn gradients_follow_mergekit_formula() {
        // Worked by hand: x = pos·(n − 1); v[i] + (x − i)·(v[i+1] − v[i]).
        let v = [0.0, 0.5, 0.3, 0.7, 1.0];
        assert_eq!(gradient(&v, 0.0), 0.0);
        assert_eq!(gradient(&v, 1.0), 1.0);
        assert!((gradient(&v, 0.5) - 0.3).abs() < 1e-15); // x = 2
        assert!((gradient(&v, 0.375) - 0.4).abs() < 1e-15); // x = 1.5: 0.5 + 0.5·(0.3 − 0.5)
        assert_eq!(gradient(&[0.25], 0.7), 0.25);
    }

    #[test]
    fn t_resolution_by_substring_level_and_fall_through() {
        let slice = params(
            "t:\n  - filter: self_attn\n    value: [0, 1]\n  - filter: layers.1\n    value: 0.9\n",
        );
        let top = params("t:\n  - filter: mlp\n    value: 0.2\n  - value: 0.5\n");
        let levels = vec![
            ("slice 0".to_string(), Some(&slice)),
            ("top level".to_string(), Some(&top)),
        ];
        let r = |name: &str, pos: f64| resolve(name, pos, &levels).unwrap();
        // The slice's first matching entry, a gradient over the offset.
        let attn = r("model.layers.3.self_attn.q_proj.weight", 0.25);
        assert_eq!((attn.t, attn.level.as_str()), (0.25, "slice 0"));
        // `layers.1` is a plain substring: it matches layers.10 too.
        assert_eq!(r("model.layers.10.mlp.up_proj.weight", 0.0).t, 0.9);
        assert_eq!(r("model.layers.1.mlp.up_proj.weight", 0.0).t, 0.9);
        // Nothing in the slice matches: the top level's list, first match.
        let mlp = r("model.layers.2.mlp.up_proj.weight", 0.0);
        assert_eq!((mlp.t, mlp.level.as_str()), (0.2, "top level"));
        assert_eq!(r("model.norm.weight", 0.0).t, 0.5);
        // No level gives one: an error, never a default.
        let only = params("t:\n  - filter: mlp\n    value: 0.2\n");
        assert!(
            resolve(
                "model.norm.weight",
                0.0,
                &[("top level".into(), Some(&only))]
            )
            .is_none()
        );
        // "*" matches everything.
        let star = params("t:\n  - filter: \"*\"\n    value: 0.7\n");
        assert_eq!(
            resolve("x", 0.0, &[("top level".into(), Some(&star))])
                .unwrap()
                .t,
            0.7
        );
    }

    #[test]
    fn layer_indices_and_renumbering() {
        assert_eq!(layer_index("model.layers.12.mlp.weight"), Some((12, 13)));
        assert_eq!(
            layer_index("transformer.h.0.attn.c_attn.weight").map(|x| x.0),
            Some(0)
        );
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(layer_index("lm_head.weight"), None);
        assert_eq!(
            layer_index("7.weight"),
            None,
            "a leading number is not a `.N.` segment"
        );
        assert_eq!(
            renumber("model.layers.12.mlp.weight", 3),
            "model.layers.3.mlp.weight"
        );
        assert_eq!(
            renumber("model.layers.3.mlp.weight", 12),
            "model.layers.12.mlp.weight"
        );
    }
}
