//! mergekit's recipe syntax, read as mergekit 0.1.5 reads it: the YAML types, and how a
//! parameter's value is found for a tensor (levels, numbers, gradients, filter lists).

use burn::tensor::DType;
use serde::Deserialize;

use crate::checkpoint::CheckpointError;

/// A recipe as written (the keys mergekit 0.1.5 reads for a slerp merge, and the ones refused by
/// name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Recipe {
    pub(super) merge_method: String,
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
    pub(super) tokenizer: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) chat_template: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) modules: Option<serde_json::Value>,
    /// A name for the merged model; read and not used, as mergekit uses it only for its card.
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) name: Option<String>,
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
    pub(super) sources: Vec<Source>,
    #[serde(default)]
    pub(super) parameters: Option<Parameters>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Source {
    pub(super) model: String,
    #[serde(default)]
    pub(super) layer_range: Option<[usize; 2]>,
    #[serde(default)]
    pub(super) parameters: Option<Parameters>,
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
    pub(super) filter: Option<String>,
    pub(super) value: EntryValue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum EntryValue {
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

pub(super) fn picked(values: &[f64], pos: f64) -> f64 {
    let n = values.len();
    values[((pos * (n - 1) as f64) as usize).min(n - 1)]
}

/// mergekit's gradient: `x = pos·(n − 1)`, linear between `v[⌊x⌋]` and `v[min(⌊x⌋ + 1, n − 1)]`.
pub(super) fn gradient(values: &[f64], pos: f64) -> f64 {
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
pub(super) fn resolve(
    name: &str,
    pos: f64,
    levels: &[(String, Option<&Parameters>)],
) -> Option<Resolved> {
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

/// The number of layers of a model with these tensor names: one more than the highest layer
/// index, 0 when no name has one.
pub(super) fn layer_count(names: &[String]) -> usize {
    names
        .iter()
        .filter_map(|n| layer_index(n).map(|(i, _)| i + 1))
        .max()
        .unwrap_or(0)
}

/// `name` with its layer index replaced by `layer`.
pub(super) fn renumber(name: &str, layer: usize) -> String {
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
pub(super) fn after_layers(architecture: &str, name: &str) -> Option<bool> {
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

/// Refuses a LoRA source (`model+lora`) among `models`, the first one named.
pub(super) fn no_lora<'a>(
    models: impl IntoIterator<Item = &'a String>,
) -> Result<(), CheckpointError> {
    for model in models {
        if model.contains('+') {
            return Err(refused(format!(
                "`{model}`: LoRA sources (`model+lora`) are not supported; merge the adapter into \
                 the model first"
            )));
        }
    }
    Ok(())
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
