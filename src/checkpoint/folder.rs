//! What a merged Hugging Face model folder holds besides its weights: the model's files copied
//! from the inputs (`config.json` with its dtype updated when the output dtype changes it, the
//! generation config, the code `auto_map` names, the tokenizer) and a short model card.
//! Nothing else is written: apart from the card and the dtype field, every file is one of an
//! input's, byte for byte.

use std::path::{Path, PathBuf};

use burn::tensor::DType;

use super::durable::write_new;
use super::error::CheckpointError;
use super::options::{FileMerge, TokenizerSource};

/// The tokenizer's files, whichever exist; `additional_chat_templates` is a folder.
pub(crate) const TOKENIZER_FILES: [&str; 11] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
];

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a model folder's card says was done.
pub(super) struct Card {
    /// Every input, as it was given.
    pub(super) names: Vec<String>,
    /// The base of the task vectors, as it was given.
    pub(super) base: Option<String>,
    pub(super) method: &'static str,
    pub(super) recipe: String,
    /// For each output layer, the input layer it comes from, when the layers change
    /// (`config.json`'s layer count and per-layer lists follow).
    pub(super) layers: Option<Vec<usize>>,
}

/// One file a model folder output takes from an input's folder: where it is read (a regular
/// file, reached through links that stay inside the model's folder) and its name in the output.
#[derive(Debug, Clone)]
pub(super) struct SideFile {
    from: PathBuf,
    to: PathBuf,
}

/// What a model folder output holds besides its weights, worked out and checked when the merge
/// is planned: `config.json`'s new text, the files copied as they are, and the model card.
#[derive(Debug, Clone, Default)]
pub(super) struct ModelFiles {
    config: Option<String>,
    files: Vec<SideFile>,
}

/// How deep `additional_chat_templates` (the one side folder) is read, and how many files.
const MAX_DEPTH: usize = 2;
const MAX_FILES: usize = 256;

/// The folder a model folder's links may point into: the folder itself, or for a snapshot of
/// the Hugging Face cache (`models--org--name/snapshots/REV`, whose files link to `../../blobs`)
/// the repository's folder.
fn link_root(folder: &Path) -> PathBuf {
    let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
    let snapshot = folder
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .filter(|r| {
            r.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("models--"))
        });
    snapshot.map_or(folder.clone(), Path::to_path_buf)
}

/// What `path` (an entry of a model folder) is once its links are followed: `None` when it
/// does not exist; an error naming it when a link leads out of `root`, or nowhere.
fn resolve_inside(path: &Path, root: &Path) -> Result<Option<(PathBuf, bool)>, CheckpointError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    let refuse = |why: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message: why,
    };
    let target = if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(path)
            .map_err(|e| refuse(format!("a link that leads nowhere ({e})")))?;
        if !target.starts_with(root) {
            return Err(refuse(format!(
                "a link to {}, outside the model's folder {}: burn-slerp copies only the model's \
                 own files (replace the link with the file, or remove it)",
                target.display(),
                root.display()
            )));
        }
        target
    } else {
        path.to_path_buf()
    };
    let meta = std::fs::metadata(&target).map_err(io(path))?;
    if meta.is_file() {
        Ok(Some((target, false)))
    } else if meta.is_dir() {
        Ok(Some((target, true)))
    } else {
        Err(refuse("neither a file nor a folder".into()))
    }
}

/// The side file `name` of `folder` (and, for a folder, the files in it), added to `files`.
fn add_side_file(
    folder: &Path,
    root: &Path,
    name: &Path,
    depth: usize,
    files: &mut Vec<SideFile>,
) -> Result<(), CheckpointError> {
    let path = folder.join(name);
    let Some((from, is_dir)) = resolve_inside(&path, root)? else {
        return Ok(());
    };
    if !is_dir {
        files.push(SideFile {
            from,
            to: name.to_path_buf(),
        });
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        return Err(CheckpointError::Format {
            path,
            message: format!(
                "a folder nested more than {MAX_DEPTH} deep among the tokenizer's files"
            ),
        });
    }
    let mut entries: Vec<_> = std::fs::read_dir(&from)
        .map_err(io(&path))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io(&path))?;
    entries.sort();
    for entry in entries {
        add_side_file(folder, root, &name.join(entry), depth + 1, files)?;
        if files.len() > MAX_FILES {
            return Err(CheckpointError::Format {
                path,
                message: format!("more than {MAX_FILES} files among the tokenizer's files"),
            });
        }
    }
    Ok(())
}

/// Plans what a model folder output holds besides its weights (see [`write_model_files`]),
/// reading only the files a model folder is known to hold, each checked (links stay inside the
/// model's folder, regular files, a bounded folder), before anything is written. `warnings`
/// gets what the layer update of `config.json` could not map.
pub(super) fn plan_model_files(
    a_folder: Option<&Path>,
    b_folder: Option<&Path>,
    out_dtype: Option<DType>,
    options: &FileMerge,
    layers: Option<&[usize]>,
    warnings: &mut Vec<String>,
) -> Result<ModelFiles, CheckpointError> {
    let Some(model) = a_folder.or(b_folder) else {
        return Ok(ModelFiles::default());
    };
    let root = link_root(model);
    let mut planned = ModelFiles::default();
    let config_path = model.join("config.json");
    if let Some((config_file, false)) = resolve_inside(&config_path, &root)? {
        let text = read_small(&config_file, &config_path)?;
        let config = parse_config(&text, &config_path)?;
        let text = match out_dtype {
            Some(dtype) => with_dtype(&text, dtype, &config_path)?,
            None => text,
        };
        let text = match layers {
            Some(layers) => with_layers(&text, layers, &config_path, warnings)?,
            None => text,
        };
        planned.config = Some(text);
        for file in auto_map_files(&config) {
            add_side_file(
                model,
                &root,
                Path::new(&file),
                MAX_DEPTH,
                &mut planned.files,
            )?;
        }
    }
    add_side_file(
        model,
        &root,
        Path::new("generation_config.json"),
        MAX_DEPTH,
        &mut planned.files,
    )?;
    let tokenizer = match options.tokenizer_source {
        TokenizerSource::A => a_folder,
        TokenizerSource::B => b_folder,
    };
    if let Some(tokenizer) = tokenizer {
        let root = link_root(tokenizer);
        for file in TOKENIZER_FILES {
            // Only `additional_chat_templates` may be a folder.
            let depth = if file == "additional_chat_templates" {
                0
            } else {
                MAX_DEPTH
            };
            add_side_file(tokenizer, &root, Path::new(file), depth, &mut planned.files)?;
        }
    }
    Ok(planned)
}

/// The largest `config.json` read (a real one is a few kilobytes).
const MAX_CONFIG: u64 = 16 << 20;

/// A small text file, refused above [`MAX_CONFIG`] bytes before it is read.
fn read_small(file: &Path, named: &Path) -> Result<String, CheckpointError> {
    let len = std::fs::metadata(file).map_err(io(named))?.len();
    if len > MAX_CONFIG {
        return Err(CheckpointError::Format {
            path: named.to_path_buf(),
            message: format!("{len} bytes, more than a model's configuration holds"),
        });
    }
    std::fs::read_to_string(file).map_err(io(named))
}

/// The `.py` files a `config.json`'s `auto_map` names (`"modeling_x.ModelX"`, or
/// `"repo--modeling_x.ModelX"` for code of another repository, which is not copied).
pub(crate) fn auto_map_files(config: &serde_json::Value) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    let mut add = |reference: &str| {
        if reference.contains("--") {
            return;
        }
        if let Some((module, _)) = reference.rsplit_once('.') {
            let file = format!("{module}.py");
            if !files.contains(&file) && Path::new(&file).components().count() == 1 {
                files.push(file);
            }
        }
    };
    if let Some(map) = config.get("auto_map").and_then(|m| m.as_object()) {
        for value in map.values() {
            match value {
                serde_json::Value::String(s) => add(s),
                serde_json::Value::Array(items) => {
                    items.iter().filter_map(|v| v.as_str()).for_each(&mut add)
                }
                _ => {}
            }
        }
    }
    files
}

fn parse_config(text: &str, path: &Path) -> Result<serde_json::Value, CheckpointError> {
    serde_json::from_str(text).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("not a valid config.json: {e}"),
    })
}

/// The name `transformers` gives a dtype in `config.json`.
fn torch_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// `config.json`'s text, with `dtype` and `torch_dtype` (whichever it has) set to `dtype`, or
/// unchanged (byte for byte) when it has neither or already says so.
fn with_dtype(text: &str, dtype: DType, path: &Path) -> Result<String, CheckpointError> {
    let Some(name) = torch_name(dtype) else {
        return Ok(text.to_string());
    };
    let mut config = parse_config(text, path)?;
    let Some(object) = config.as_object_mut() else {
        return Ok(text.to_string());
    };
    let mut changed = false;
    for key in ["dtype", "torch_dtype"] {
        if let Some(value) = object.get_mut(key)
            && value.as_str() != Some(name)
        {
            *value = name.into();
            changed = true;
        }
    }
    if !changed {
        return Ok(text.to_string());
    }
    let out = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    Ok(out + "\n")
}

/// The keys a configuration counts its layers with (`n_layer`: GPT-2).
const LAYER_COUNTS: [&str; 4] = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// `config.json`'s text with the layer count set to the number of output layers, in the top
/// object and in every nested configuration that has one (`text_config` of a vision-language
/// model, …), and in each such object every per-layer list (a list as long as the layer count,
/// such as `layer_types`) taken layer by layer from the input layer each output layer comes
/// from. Other lists whose key names layers (index lists such as `mlp_only_layers`) cannot be
/// mapped: left as they are, with a warning in `warnings`.
fn with_layers(
    text: &str,
    layers: &[usize],
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<String, CheckpointError> {
    let mut config = parse_config(text, path)?;
    let mut changed = false;
    remap_layers(&mut config, layers, path, "", &mut changed, warnings);
    if !changed {
        return Ok(text.to_string());
    }
    let out = serde_json::to_string_pretty(&config).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(out + "\n")
}

/// [`with_layers`] in one object and the objects nested in it (`at` names it in warnings).
fn remap_layers(
    value: &mut serde_json::Value,
    layers: &[usize],
    path: &Path,
    at: &str,
    changed: &mut bool,
    warnings: &mut Vec<String>,
) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    let count = LAYER_COUNTS.into_iter().find_map(|k| {
        object
            .get(k)
            .and_then(|n| n.as_u64())
            .map(|n| (k, n as usize))
    });
    if let Some((key, count)) = count {
        let identity = count == layers.len() && layers.iter().enumerate().all(|(i, l)| i == *l);
        if !identity {
            for (name, value) in object.iter_mut() {
                let serde_json::Value::Array(items) = value else {
                    continue;
                };
                if items.len() == count && layers.iter().all(|l| *l < items.len()) {
                    *items = layers.iter().map(|l| items[*l].clone()).collect();
                } else if name.contains("layer") {
                    warnings.push(format!(
                        "{}: `{at}{name}` lists layers but not one entry per layer: left as it \
                         is; check it against the merged model's {} layers",
                        path.display(),
                        layers.len()
                    ));
                }
            }
            object.insert(key.into(), layers.len().into());
            *changed = true;
        }
    }
    for (name, nested) in object.iter_mut() {
        if nested.is_object() {
            let at = format!("{at}{name}.");
            remap_layers(nested, layers, path, &at, changed, warnings);
        }
    }
}

/// The model card: the inputs, the method and the recipe.
fn model_card(
    names: &[String],
    base: Option<&str>,
    method: &str,
    options: &FileMerge,
    recipe: &str,
) -> String {
    let inputs: String = names
        .iter()
        .enumerate()
        .map(|(i, name)| match (i, names.len()) {
            (0, 2) => format!("- A (t = 0): `{name}`\n"),
            (1, 2) => format!("- B (t = 1): `{name}`\n"),
            _ => format!("- `{name}`\n"),
        })
        .collect();
    let base = base
        .map(|name| format!("- base: `{name}`\n"))
        .unwrap_or_default();
    let tokenizer = match options.tokenizer_source {
        TokenizerSource::A => "the first input's",
        TokenizerSource::B => "the second input's",
    };
    format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- burn-slerp\n---\n\n\
         # Merged model\n\nMerged with burn-slerp {} by {method}.\n\n\
         ## Inputs\n\n{inputs}{base}\n\
         The configuration and generation settings are the first input's; the tokenizer is \
         {tokenizer}.\n\n## Recipe\n\n```json\n{recipe}\n```\n",
        env!("CARGO_PKG_VERSION"),
    )
}

/// Writes what [`plan_model_files`] planned into `dir`: `config.json`, each side file copied
/// as a regular file (created exclusively), and `README.md`, the model card.
pub(super) fn write_model_files(
    dir: &Path,
    planned: &ModelFiles,
    options: &FileMerge,
    card: &Card,
) -> Result<(), CheckpointError> {
    if let Some(config) = &planned.config {
        write_new(&dir.join("config.json"), config.as_bytes())?;
    }
    for file in &planned.files {
        let to = dir.join(&file.to);
        if let Some(parent) = to.parent()
            && parent != dir
        {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut from = std::fs::File::open(&file.from).map_err(io(&file.from))?;
        let mut out = std::fs::File::create_new(&to).map_err(io(&to))?;
        std::io::copy(&mut from, &mut out).map_err(io(&file.from))?;
    }
    let text = model_card(
        &card.names,
        card.base.as_deref(),
        card.method,
        options,
        &card.recipe,
    );
    write_new(&dir.join("README.md"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_fields_and_auto_map() {
        let path = Path::new("config.json");
        let text = "{\"torch_dtype\": \"bfloat16\", \"hidden_size\": 8}";
        let out = with_dtype(text, DType::F16, path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["torch_dtype"], "float16");
        assert_eq!(json["hidden_size"], 8);
        assert!(json.get("dtype").is_none(), "no field is invented");
        // Already right, or no field at all: the text is left as it is.
        assert_eq!(with_dtype(text, DType::BF16, path).unwrap(), text);
        assert_eq!(with_dtype("{}", DType::F16, path).unwrap(), "{}");
        let both = "{\"dtype\": \"float32\", \"torch_dtype\": \"float32\"}";
        let json: serde_json::Value =
            serde_json::from_str(&with_dtype(both, DType::BF16, path).unwrap()).unwrap();
        assert_eq!(
            (&json["dtype"], &json["torch_dtype"]),
            (&"bfloat16".into(), &"bfloat16".into())
        );

        let config = serde_json::json!({"auto_map": {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModel": "modeling_x.XModel",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
            "AutoTokenizer": ["tokenization_x.XTokenizer", null],
            "AutoProcessor": "other/repo--processing_x.XProcessor",
        }});
        let mut files = auto_map_files(&config);
        files.sort();
        assert_eq!(
            files,
            ["configuration_x.py", "modeling_x.py", "tokenization_x.py"]
        );
    }

    /// Four layers made into three (input layers 0, 2, 3): the count and per-layer lists of
    /// the top object and of a nested `text_config`, under each name a configuration counts
    /// its layers with; an index list such as `mlp_only_layers` is left, with a warning naming
    /// it; a configuration without a count is left as it is.
    #[test]
    fn layer_counts_and_per_layer_lists() {
        let path = Path::new("config.json");
        let layers = [0, 2, 3];
        let text = serde_json::json!({
            "num_layers": 4,
            "layer_types": ["a", "b", "c", "d"],
            "mlp_only_layers": [1],
            "hidden_size": 8,
            "text_config": {
                "num_hidden_layers": 4,
                "sliding": [true, false, true, false],
                "n_layers_note": "x",
            },
            "vision_config": {"n_layers": 4, "widths": [1, 2, 3, 4]},
        })
        .to_string();
        let mut warnings = Vec::new();
        let out = with_layers(&text, &layers, path, &mut warnings).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["num_layers"], 3);
        assert_eq!(json["layer_types"], serde_json::json!(["a", "c", "d"]));
        assert_eq!(json["mlp_only_layers"], serde_json::json!([1]));
        assert_eq!(json["hidden_size"], 8);
        assert_eq!(json["text_config"]["num_hidden_layers"], 3);
        assert_eq!(
            json["text_config"]["sliding"],
            serde_json::json!([true, true, false])
        );
        assert_eq!(json["vision_config"]["n_layers"], 3);
        assert_eq!(
            json["vision_config"]["widths"],
            serde_json::json!([1, 3, 4])
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("`mlp_only_layers`"), "{warnings:?}");
        let plain = "{\"hidden_size\": 8}";
        assert_eq!(
            with_layers(plain, &layers, path, &mut warnings).unwrap(),
            plain
        );
    }
}
