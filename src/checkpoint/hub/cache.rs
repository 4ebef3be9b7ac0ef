//! The local Hugging Face cache as `huggingface_hub` lays it out, and the names and revisions
//! that lead into it, checked before they become paths.

use std::path::{Path, PathBuf};

use crate::checkpoint::error::CheckpointError;

/// The cache folder, by the rule above.
pub(super) fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    huggingface_home().join("hub")
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub(super) fn huggingface_home() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = var("HF_HOME") {
        return home;
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface")
}

/// Whether `HF_HUB_OFFLINE` forbids the network.
pub(super) fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// A part of a repository id or a revision: letters, digits, `-`, `_`, `.`, not `.` or `..`.
fn is_part(p: &str) -> bool {
    !p.is_empty()
        && p != "."
        && p != ".."
        && p.len() <= 96
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `revision` is a commit hash (40 hex digits).
pub(super) fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `revision` may name a branch, a tag, `refs/pr/N` or a commit: segments of
/// [`is_part`] joined by `/`, never absolute, no `..`.
pub(super) fn is_revision(revision: &str) -> bool {
    revision.len() <= 256 && revision.split('/').all(is_part)
}

/// `(repository, revision)` when `spec` reads as a Hub model name: `org/name` or `name` (parts
/// of letters, digits, `-`, `_` and `.`), optionally `@revision` (see [`is_revision`]).
pub(super) fn parse(spec: &str) -> Option<(&str, Option<&str>)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, revision)) if is_revision(revision) => (repo, Some(revision)),
        Some(_) => return None,
        None => (spec, None),
    };
    let valid = match repo.split_once('/') {
        Some((org, name)) => is_part(org) && is_part(name),
        None => is_part(repo),
    };
    valid.then_some((repo, revision))
}

/// The folder of `repo` in `cache`.
pub(super) fn model_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The commit a ref file holds: 40 hex digits, or an error naming the file.
fn read_ref(path: &Path) -> Result<Option<String>, CheckpointError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let commit = text.trim();
    if !is_commit(commit) {
        return Err(CheckpointError::Format {
            path: path.to_path_buf(),
            message: "a ref that does not hold a commit hash (40 hexadecimal digits)".into(),
        });
    }
    Ok(Some(commit.to_string()))
}

/// The snapshot folder of `repo` at `revision` (default `main`) in `cache`, when the cache
/// holds it with a checkpoint in it; `None` when it does not.
///
/// # Errors
///
/// [`CheckpointError::Format`] for a ref that does not hold a commit, or a snapshot that is not
/// inside the cache.
pub(super) fn cached(
    cache: &Path,
    repo: &str,
    revision: Option<&str>,
) -> Result<Option<PathBuf>, CheckpointError> {
    let model = model_dir(cache, repo);
    let revision = revision.unwrap_or("main");
    let commit = if is_commit(revision) {
        Some(revision.to_ascii_lowercase())
    } else {
        read_ref(&model.join("refs").join(revision))?
    };
    let Some(commit) = commit else {
        return Ok(None);
    };
    let dir = model.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Ok(None);
    }
    // The snapshot is inside the cache (its path is built from checked parts; links inside
    // it may point into `blobs/`, which the folder reader allows).
    let holds_weights = crate::checkpoint::read::FOLDER_WEIGHTS
        .iter()
        .any(|f| dir.join(f).is_file());
    Ok(holds_weights.then_some(dir))
}

/// The error for a model the cache does not hold when nothing may be downloaded.
pub(super) fn not_cached(cache: &Path, repo: &str, revision: Option<&str>) -> CheckpointError {
    let model = model_dir(cache, repo);
    let (there, refs) = (
        names_in(&model.join("snapshots")),
        names_in(&model.join("refs")),
    );
    CheckpointError::Format {
        path: model,
        message: format!(
            "`{repo}`{} is neither a file or folder here nor in the Hugging Face cache (looked \
             in {}; snapshots there: [{}]; refs: [{}]), and HF_HUB_OFFLINE is set: nothing is \
             downloaded",
            revision
                .map(|r| format!(" at revision `{r}`"))
                .unwrap_or_default(),
            cache.display(),
            there.join(", "),
            refs.join(", ")
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_and_paths() {
        assert_eq!(parse("gpt2/small"), Some(("gpt2/small", None)));
        assert_eq!(parse("gpt2"), Some(("gpt2", None)));
        assert_eq!(
            parse("meta-llama/Llama-3.2-1B@v1.0"),
            Some(("meta-llama/Llama-3.2-1B", Some("v1.0")))
        );
        assert_eq!(
            parse("org/m@refs/pr/12"),
            Some(("org/m", Some("refs/pr/12")))
        );
        for not_a_name in [
            "a/b/c",
            "./a",
            "a/",
            "/a",
            "a/b@",
            "../x",
            "a b/c",
            "a/..",
            "..",
            "org/m@/abs/path",
            "org/m@../../x",
            "org/m@refs/../x",
            "org/m@a//b",
        ] {
            assert_eq!(parse(not_a_name), None, "{not_a_name}");
        }
    }

    /// A ref holding anything but a commit hash is an error naming it, never a path.
    #[test]
    fn refs_must_hold_commits() {
        let dir = std::env::temp_dir().join(format!("burn-slerp-refs-{}", std::process::id()));
        let model = model_dir(&dir, "org/m");
        std::fs::create_dir_all(model.join("refs")).unwrap();
        std::fs::write(model.join("refs/main"), "../../../../etc").unwrap();
        let e = cached(&dir, "org/m", None).unwrap_err().to_string();
        assert!(e.contains("refs/main") && e.contains("commit hash"), "{e}");
        std::fs::write(
            model.join("refs/main"),
            "0123456789abcdef0123456789abcdef01234567\n",
        )
        .unwrap();
        assert_eq!(
            cached(&dir, "org/m", None).unwrap(),
            None,
            "no snapshot yet"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
