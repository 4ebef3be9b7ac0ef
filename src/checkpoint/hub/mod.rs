//! Models named as on the Hugging Face hub (`org/name`, `org/name@revision`), found in the
//! local cache as `huggingface_hub` lays it out. Nothing is ever downloaded.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model `org/name` lives
//! in `models--org--name/`: `refs/<revision>` holds the commit a branch or tag points at, and
//! `snapshots/<commit>/` the files, as relative symbolic links into `blobs/`.

use std::path::{Path, PathBuf};

use super::error::CheckpointError;

/// The cache folder, by the rule above.
pub(crate) fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// `(org/name, revision)` when `spec` reads as a hub model name: two non-empty parts of
/// letters, digits, `-`, `_` and `.` around one `/`, optionally `@revision`.
pub(crate) fn parse(spec: &str) -> Option<(&str, Option<&str>)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, revision)) if !revision.is_empty() => (repo, Some(revision)),
        Some(_) => return None,
        None => (spec, None),
    };
    let (org, name) = repo.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part(org) && part(name)).then_some((repo, revision))
}

/// The snapshot folder of `repo` at `revision` (default `main`) in `cache`.
///
/// # Errors
///
/// [`CheckpointError::Format`] naming where it looked: no such model in the cache, or no such
/// revision (listing the snapshots there are).
pub(crate) fn snapshot(
    cache: &Path,
    repo: &str,
    revision: Option<&str>,
) -> Result<PathBuf, CheckpointError> {
    let model = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = |message: String| CheckpointError::Format {
        path: model.clone(),
        message,
    };
    if !model.is_dir() {
        return Err(missing(format!(
            "`{repo}` is neither a file or folder here nor a model in the Hugging Face cache \
             (looked in {}; set HF_HUB_CACHE or HF_HOME to look elsewhere; nothing is downloaded)",
            cache.display()
        )));
    }
    let revision = revision.unwrap_or("main");
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        match std::fs::read_to_string(model.join("refs").join(revision)) {
            Ok(text) => text.trim().to_string(),
            Err(_) => String::new(),
        }
    };
    let dir = model.join("snapshots").join(&commit);
    if !commit.is_empty() && dir.is_dir() {
        return Ok(dir);
    }
    let (there, refs) = (
        names_in(&model.join("snapshots")),
        names_in(&model.join("refs")),
    );
    Err(missing(format!(
        "revision `{revision}` of `{repo}` is not in the Hugging Face cache (snapshots there: \
         [{}]; refs: [{}]; nothing is downloaded)",
        there.join(", "),
        refs.join(", ")
    )))
}

/// The entry names of a folder, sorted (none when it cannot be read).
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `spec` as a path when it names an existing file or folder, else as a hub model in the cache.
///
/// # Errors
///
/// As [`snapshot`]; [`CheckpointError::Io`] (not found) when `spec` reads neither way.
pub(crate) fn resolve(spec: &Path) -> Result<PathBuf, CheckpointError> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    match spec.to_str().and_then(parse) {
        Some((repo, revision)) => snapshot(&cache_dir(), repo, revision),
        None => Err(CheckpointError::Io {
            path: spec.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_and_paths() {
        assert_eq!(parse("gpt2/small"), Some(("gpt2/small", None)));
        assert_eq!(
            parse("meta-llama/Llama-3.2-1B@v1.0"),
            Some(("meta-llama/Llama-3.2-1B", Some("v1.0")))
        );
        for not_a_name in [
            "model", "a/b/c", "./a", "a/", "/a", "a/b@", "../x", "a b/c", "a/..",
        ] {
            assert_eq!(parse(not_a_name), None, "{not_a_name}");
        }
    }
}
