//! Downloading a model from the Hugging Face Hub into the local cache, with the guarantees a
//! merge needs: only what a merge reads is fetched; each file is resumable, and checked (its
//! size, and its hash: the sha256 an LFS file's etag is, or the git blob id of a small file)
//! before it enters `blobs/`; the snapshot's links and its ref are written only once every file
//! of the snapshot is in place, so an interrupted download leaves nothing a later run trusts.
//!
//! The protocol is the Hub's documented one: `GET {endpoint}/api/models/{repo}/revision/{rev}`
//! for the commit and the file list, `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` for each
//! file's etag and size (`X-Linked-Etag` and `X-Linked-Size` for LFS files, whose resolve URL
//! redirects to where the bytes are), then `GET` of the resolve URL with `Range: bytes=N-` to
//! resume. Requests go through `ureq` with compression off, so that a ranged request never
//! asks for gzip (a CDN may then answer a ranged request whole and compressed, without
//! `Content-Range`); a ranged answer that is not `206` with the asked start restarts the file.
//!
//! Environment: `HF_ENDPOINT` (a mirror; tests use a local server), `HF_TOKEN`, else the token
//! file `huggingface_hub` writes (`$HF_TOKEN_PATH`, else `$HF_HOME/token`), `HF_HUB_OFFLINE`
//! (see the module `hub`).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::cache::{
    cache_dir, cached, huggingface_home, is_commit, model_dir, not_cached, offline, parse,
};
use crate::checkpoint::durable;
use crate::checkpoint::error::CheckpointError;
use crate::checkpoint::folder::TOKENIZER_FILES;
use crate::checkpoint::read::{INDEX, PYTORCH_INDEX, PYTORCH_SINGLE, SINGLE};

/// The Hub's address unless `HF_ENDPOINT` names another.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What a download reports, file by file.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum DownloadEvent<'a> {
    /// A file starts (or resumes at `from` bytes of `size`).
    Start {
        /// The repository.
        repo: &'a str,
        /// The file, as the repository names it.
        file: &'a str,
        /// Its size in bytes.
        size: u64,
        /// Bytes an earlier run downloaded already.
        from: u64,
    },
    /// Bytes of the file so far.
    Progress {
        /// The file, as the repository names it.
        file: &'a str,
        /// Bytes in the cache so far.
        done: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// The file is checked and in the cache.
    Done {
        /// The repository.
        repo: &'a str,
        /// The file, as the repository names it.
        file: &'a str,
    },
}

type Observer = Box<dyn Fn(DownloadEvent<'_>) + Send + Sync>;

fn observer() -> &'static Mutex<Option<Observer>> {
    static OBSERVER: OnceLock<Mutex<Option<Observer>>> = OnceLock::new();
    OBSERVER.get_or_init(|| Mutex::new(None))
}

/// Sets what is called as files are downloaded (a progress bar); none by default.
pub fn set_download_progress(report: impl Fn(DownloadEvent<'_>) + Send + Sync + 'static) {
    *observer().lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(report));
}

fn report(event: DownloadEvent<'_>) {
    if let Some(report) = &*observer().lock().unwrap_or_else(|e| e.into_inner()) {
        report(event);
    }
}

/// What a download of one model would fetch: the commit and each file missing from the cache,
/// with its size in bytes.
#[derive(Debug, Clone)]
pub struct DownloadList {
    /// The repository.
    pub repo: String,
    /// The commit the revision points at.
    pub commit: String,
    /// Files not in the cache yet, with their sizes.
    pub files: Vec<(String, u64)>,
    /// Files of the snapshot the cache holds already.
    pub cached: Vec<String>,
}

impl DownloadList {
    /// Bytes to download.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, size)| size).sum()
    }
}

/// One file of a snapshot on the Hub.
#[derive(Debug, Clone)]
struct Remote {
    name: String,
    /// The blob's name: the sha256 of an LFS file, the git blob id of another.
    etag: String,
    size: u64,
    /// Where its bytes are (the resolve URL, or where it redirects).
    url: String,
}

/// The Hub, as this process reaches it.
struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

/// A response's header, as text.
fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An etag without its quotes and weak marker.
fn unquote(etag: &str) -> String {
    etag.trim_start_matches("W/").trim_matches('"').to_string()
}

fn hub_error(repo: &str, message: String) -> CheckpointError {
    CheckpointError::Hub {
        repo: repo.to_string(),
        message,
    }
}

impl Hub {
    fn new() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(concat!("burn-slerp/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            agent,
            endpoint,
            token: token(),
        }
    }

    /// A request to `url`, with the token where the Hub wants it.
    fn call(
        &self,
        head: bool,
        url: &str,
        range: Option<u64>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut request = if head {
            self.agent.head(url)
        } else {
            self.agent.get(url)
        };
        // The token goes to the Hub's own API and resolve URLs only, never to where a
        // resolve URL redirects (a CDN).
        let path = url.strip_prefix(&self.endpoint).unwrap_or_default();
        if let Some(token) = &self.token
            && (path.starts_with("/api/") || path.contains("/resolve/"))
        {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(from) = range {
            request = request.header("Range", format!("bytes={from}-"));
        }
        request.call()
    }

    /// A request, following redirects (at most 5; the token only on the endpoint's host).
    fn follow(
        &self,
        repo: &str,
        head: bool,
        url: &str,
        range: Option<u64>,
    ) -> Result<(ureq::http::Response<ureq::Body>, String), CheckpointError> {
        let mut url = url.to_string();
        for _ in 0..6 {
            let response = self
                .call(head, &url, range)
                .map_err(|e| self.unreachable(repo, &e))?;
            if !response.status().is_redirection() {
                return Ok((response, url));
            }
            let Some(location) = header(&response, "location") else {
                return Err(hub_error(
                    repo,
                    format!("{url}: a redirect without a location"),
                ));
            };
            url = self.absolute(&url, &location);
        }
        Err(hub_error(repo, format!("{url}: too many redirects")))
    }

    /// `location` as an absolute URL, relative to `from`.
    fn absolute(&self, from: &str, location: &str) -> String {
        if location.contains("://") {
            return location.to_string();
        }
        let origin_end = from
            .find("://")
            .and_then(|i| from[i + 3..].find('/').map(|j| i + 3 + j))
            .unwrap_or(from.len());
        if location.starts_with('/') {
            format!("{}{location}", &from[..origin_end])
        } else {
            let base = from.rsplit_once('/').map_or(from, |(b, _)| b);
            format!("{base}/{location}")
        }
    }

    fn unreachable(&self, repo: &str, e: &ureq::Error) -> CheckpointError {
        hub_error(
            repo,
            format!(
                "cannot reach {} ({e}): check the network, or set HF_HUB_OFFLINE=1 to use only \
                 the local cache",
                self.endpoint
            ),
        )
    }

    /// The error of a response that is not a success, as the Hub tells them apart.
    fn refused(
        &self,
        repo: &str,
        what: &str,
        response: &ureq::http::Response<ureq::Body>,
    ) -> CheckpointError {
        let status = response.status().as_u16();
        let code = header(response, "x-error-code").unwrap_or_default();
        let token = if self.token.is_some() {
            "the token given (HF_TOKEN or the token file)"
        } else {
            "no token (set HF_TOKEN, or log in with `huggingface-cli login`)"
        };
        let message = match (status, code.as_str()) {
            (401, "GatedRepo") | (403, "GatedRepo") => format!(
                "a gated repository: accept its conditions on its page on the Hub, then set \
                 HF_TOKEN to a token of that account (sent: {token})"
            ),
            (401, "RepoNotFound") | (404, "RepoNotFound") => format!(
                "no such repository on {} (or a private one: set HF_TOKEN to a token with access; \
                 sent: {token})",
                self.endpoint
            ),
            (404, "RevisionNotFound") => format!("{what}: no such revision"),
            (404, "EntryNotFound") | (404, _) => format!("{what}: no such file in the repository"),
            (401, _) => format!("{what}: the Hub refused the token (401; sent: {token})"),
            (403, _) => format!(
                "{what}: the token has no access to this repository (403): request access on its \
                 page, or use a token of an account that has it"
            ),
            _ => format!("{what}: the Hub answered {status}"),
        };
        hub_error(repo, message)
    }

    /// The commit `revision` points at, and every file of the repository there.
    fn revision(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<(String, BTreeSet<String>), CheckpointError> {
        let url = format!("{}/api/models/{repo}/revision/{revision}", self.endpoint);
        let (response, _) = self.follow(repo, false, &url, None)?;
        if !response.status().is_success() {
            return Err(self.refused(repo, &format!("revision `{revision}`"), &response));
        }
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| self.unreachable(repo, &e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| hub_error(repo, format!("{url}: not the Hub's answer ({e})")))?;
        let commit = json["sha"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !is_commit(&commit) {
            return Err(hub_error(repo, format!("{url}: no commit in the answer")));
        }
        let files = json["siblings"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|f| f["rfilename"].as_str())
                    .filter(|f| safe_name(f))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok((commit, files))
    }

    /// A file's etag, size and where its bytes are, from `HEAD` of its resolve URL.
    fn head(&self, repo: &str, commit: &str, name: &str) -> Result<Remote, CheckpointError> {
        let url = format!("{}/{repo}/resolve/{commit}/{name}", self.endpoint);
        let response = self
            .call(true, &url, None)
            .map_err(|e| self.unreachable(repo, &e))?;
        let status = response.status();
        if !(status.is_success() || status.is_redirection()) {
            return Err(self.refused(repo, name, &response));
        }
        let linked = header(&response, "x-linked-etag");
        let etag = linked
            .clone()
            .or_else(|| header(&response, "etag"))
            .map(|e| unquote(&e))
            .unwrap_or_default();
        let size = header(&response, "x-linked-size")
            .or_else(|| header(&response, "content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        let served = header(&response, "x-repo-commit").unwrap_or_default();
        if !served.is_empty() && !served.eq_ignore_ascii_case(commit) {
            return Err(hub_error(
                repo,
                format!("{name}: served from commit {served}, not {commit}"),
            ));
        }
        let (Some(size), false) = (size, etag.is_empty()) else {
            return Err(hub_error(
                repo,
                format!("{name}: no etag or size in the answer"),
            ));
        };
        if !etag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(hub_error(
                repo,
                format!("{name}: an etag that is not a blob name"),
            ));
        }
        let url = match (status.is_redirection(), header(&response, "location")) {
            (true, Some(location)) => self.absolute(&url, &location),
            _ => url,
        };
        Ok(Remote {
            name: name.to_string(),
            etag,
            size,
            url,
        })
    }

    /// A small file's text, read whole (an index, a configuration).
    fn text(&self, repo: &str, remote: &Remote) -> Result<String, CheckpointError> {
        if remote.size > 64 << 20 {
            return Err(hub_error(
                repo,
                format!("{}: too large to read", remote.name),
            ));
        }
        let (response, _) = self.follow(repo, false, &remote.url, None)?;
        if !response.status().is_success() {
            return Err(self.refused(repo, &remote.name, &response));
        }
        response
            .into_body()
            .read_to_string()
            .map_err(|e| self.unreachable(repo, &e))
    }
}

/// A repository file name that stays inside a snapshot: relative, no `..`, no empty segment.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// `HF_TOKEN`, else the token file `huggingface_hub` writes.
fn token() -> Option<String> {
    let from_env = std::env::var("HF_TOKEN")
        .ok()
        .or_else(|| std::env::var("HUGGING_FACE_HUB_TOKEN").ok())
        .filter(|t| !t.trim().is_empty());
    if from_env.is_some() {
        return from_env.map(|t| t.trim().to_string());
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| huggingface_home().join("token"));
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The files a merge reads, among `files`: the weights in the layout the folder reader
/// prefers, the configuration, the generation settings and the tokenizer's files (the code
/// `auto_map` names is added once `config.json` is read).
fn wanted(files: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for weights in [INDEX, SINGLE, PYTORCH_INDEX, PYTORCH_SINGLE] {
        if files.contains(weights) {
            out.push(weights.to_string());
            break;
        }
    }
    for name in ["config.json", "generation_config.json"]
        .into_iter()
        .chain(TOKENIZER_FILES)
    {
        if files.contains(name) {
            out.push(name.to_string());
        }
    }
    out.extend(
        files
            .iter()
            .filter(|f| f.starts_with("additional_chat_templates/"))
            .cloned(),
    );
    out
}

/// Every file of the snapshot a merge needs, with its etag and size: the weights (an index's
/// shards read from it), the side files, and the code `config.json`'s `auto_map` names.
fn select(
    hub: &Hub,
    repo: &str,
    commit: &str,
    files: &BTreeSet<String>,
) -> Result<Vec<Remote>, CheckpointError> {
    let mut remotes: Vec<Remote> = Vec::new();
    for name in wanted(files) {
        let remote = hub.head(repo, commit, &name)?;
        if name.ends_with(".index.json") {
            let text = hub.text(repo, &remote)?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| hub_error(repo, format!("{name}: not a valid index ({e})")))?;
            let shards: BTreeSet<String> = index["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            for shard in shards {
                if !safe_name(&shard) || shard.contains('/') {
                    return Err(hub_error(
                        repo,
                        format!("{name} names `{shard}`, which is not a file beside it"),
                    ));
                }
                remotes.push(hub.head(repo, commit, &shard)?);
            }
        }
        if name == "config.json" {
            let text = hub.text(repo, &remote)?;
            if let Ok(config) = serde_json::from_str::<serde_json::Value>(&text) {
                for code in crate::checkpoint::folder::auto_map_files(&config) {
                    if files.contains(&code) {
                        remotes.push(hub.head(repo, commit, &code)?);
                    }
                }
            }
        }
        remotes.push(remote);
    }
    Ok(remotes)
}

/// Whether a blob is in the cache, complete.
fn has_blob(model: &Path, remote: &Remote) -> bool {
    std::fs::metadata(model.join("blobs").join(&remote.etag))
        .is_ok_and(|m| m.is_file() && m.len() == remote.size)
}

/// What a run would download for `spec` (a Hub name not on disk and not in the cache):
/// `None` when nothing is to be downloaded (a path, or a model the cache holds).
///
/// # Errors
///
/// As the download itself (see the module), and [`CheckpointError::Format`] when `HF_HUB_OFFLINE` forbids the download.
pub fn plan_download(spec: &str) -> Result<Option<DownloadList>, CheckpointError> {
    if Path::new(spec).exists() {
        return Ok(None);
    }
    let Some((repo, revision)) = parse(spec) else {
        return Ok(None);
    };
    let cache = cache_dir();
    if cached(&cache, repo, revision)?.is_some() {
        return Ok(None);
    }
    if offline() {
        return Err(not_cached(&cache, repo, revision));
    }
    let hub = Hub::new();
    let (commit, files) = hub.revision(repo, revision.unwrap_or("main"))?;
    let remotes = select(&hub, repo, &commit, &files)?;
    let model = model_dir(&cache, repo);
    let (cached, missing): (Vec<Remote>, Vec<Remote>) =
        remotes.into_iter().partition(|r| has_blob(&model, r));
    Ok(Some(DownloadList {
        repo: repo.to_string(),
        commit,
        files: missing.into_iter().map(|r| (r.name, r.size)).collect(),
        cached: cached.into_iter().map(|r| r.name).collect(),
    }))
}

/// Downloads `repo` at `revision` (default `main`) into `cache` and returns its snapshot
/// folder.
///
/// # Errors
///
/// [`CheckpointError::Hub`] naming the repository and what to do: a repository that does not
/// exist or is private, a gated one without a token, a token without access, a missing file or
/// revision, the network unreachable, a file whose size or hash is not the one announced;
/// [`CheckpointError::Io`] naming the cache path that cannot be written or lacks the space.
pub(crate) fn fetch(
    cache: &Path,
    repo: &str,
    revision: Option<&str>,
) -> Result<PathBuf, CheckpointError> {
    let hub = Hub::new();
    let revision = revision.unwrap_or("main");
    let (commit, files) = hub.revision(repo, revision)?;
    let remotes = select(&hub, repo, &commit, &files)?;
    let model = model_dir(cache, repo);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    let blobs = model.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let missing: Vec<&Remote> = remotes.iter().filter(|r| !has_blob(&model, r)).collect();
    check_space(&blobs, &missing)?;
    let locks = cache.join(".locks").join(
        model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    std::fs::create_dir_all(&locks).map_err(io(&locks))?;
    for remote in missing {
        let lock_path = locks.join(format!("{}.lock", remote.etag));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // Another process downloading the same blob finishes it first.
        lock.lock().map_err(io(&lock_path))?;
        if !has_blob(&model, remote) {
            download(&hub, repo, &blobs, remote)?;
        }
        drop(lock);
    }
    // Every blob is in place: the snapshot's links, then the ref.
    let snapshot = model.join("snapshots").join(&commit);
    for remote in &remotes {
        link(&snapshot, remote)?;
    }
    durable::sync_dir(&snapshot).map_err(io(&snapshot))?;
    if !is_commit(revision) {
        let refs = model.join("refs");
        let path = refs.join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let temp = refs.join(format!(".{}.incomplete", revision.replace('/', "--")));
        let _ = std::fs::remove_file(&temp);
        durable::write_new(&temp, commit.as_bytes())?;
        std::fs::rename(&temp, &path).map_err(io(&path))?;
    }
    Ok(snapshot)
}

/// The link `snapshots/<commit>/<name>` → `../../blobs/<etag>` (one `..` more per folder in
/// the name), as `huggingface_hub` writes it.
fn link(snapshot: &Path, remote: &Remote) -> Result<(), CheckpointError> {
    let path = snapshot.join(&remote.name);
    let io = |source| CheckpointError::Io {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let depth = remote.name.matches('/').count();
    let target = PathBuf::from(format!(
        "{}../../blobs/{}",
        "../".repeat(depth),
        remote.etag
    ));
    if std::fs::read_link(&path).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, &path).map_err(io)
    }
    #[cfg(not(unix))]
    {
        // Where links need privileges, the blob is copied, as `huggingface_hub` does.
        let blob = snapshot.join(&target);
        std::fs::copy(blob, &path).map(drop).map_err(io)
    }
}

/// Refuses a download that the file system cannot hold, before its first byte.
fn check_space(blobs: &Path, missing: &[&Remote]) -> Result<(), CheckpointError> {
    let partial = |r: &Remote| {
        std::fs::metadata(blobs.join(format!("{}.incomplete", r.etag)))
            .map_or(0, |m| m.len().min(r.size))
    };
    let needed: u64 = missing.iter().map(|r| r.size - partial(r)).sum();
    if let Some(free) = free_space(blobs)
        && free < needed
    {
        return Err(CheckpointError::Io {
            path: blobs.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "the download needs {needed} bytes and the cache's file system has {free} \
                     free (set HF_HUB_CACHE to a folder with room)"
                ),
            ),
        });
    }
    Ok(())
}

/// Bytes available to this user on the file system of `path`.
fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path.
        let stat = unsafe {
            let mut stat: libc::statvfs = std::mem::zeroed();
            (libc::statvfs(c_path.as_ptr(), &mut stat) == 0).then_some(stat)
        }?;
        Some(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// How a blob is checked: its sha256 (an LFS file's etag), or its git blob id (another file's).
enum Check {
    Sha256(Sha256),
    GitBlob(Sha1),
    SizeOnly,
}

impl Check {
    fn new(remote: &Remote) -> Self {
        let hex = remote.etag.chars().all(|c| c.is_ascii_hexdigit());
        match remote.etag.len() {
            64 if hex => Check::Sha256(Sha256::new()),
            40 if hex => {
                let mut hasher = Sha1::new();
                hasher.update(format!("blob {}\0", remote.size).as_bytes());
                Check::GitBlob(hasher)
            }
            _ => Check::SizeOnly,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Check::Sha256(h) => h.update(bytes),
            Check::GitBlob(h) => h.update(bytes),
            Check::SizeOnly => {}
        }
    }

    /// The hash, when it can be compared with the etag.
    fn finish(self) -> Option<String> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match self {
            Check::Sha256(h) => Some(hex(&h.finalize())),
            Check::GitBlob(h) => Some(hex(&h.finalize())),
            Check::SizeOnly => None,
        }
    }
}

/// Downloads one blob into `blobs/<etag>.incomplete` (resuming what is there), checks its size
/// and hash, syncs it and renames it to `blobs/<etag>`. A file that fails its check is removed.
fn download(hub: &Hub, repo: &str, blobs: &Path, remote: &Remote) -> Result<(), CheckpointError> {
    let partial = blobs.join(format!("{}.incomplete", remote.etag));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .map_err(io(&partial))?;
    let mut check = Check::new(remote);
    // What an earlier run got is hashed again, then resumed.
    let mut from = file.metadata().map_err(io(&partial))?.len();
    if from > remote.size {
        file.set_len(0).map_err(io(&partial))?;
        from = 0;
    }
    let mut buffer = vec![0u8; 1 << 20];
    let mut hashed = 0;
    while hashed < from {
        let n = file
            .read(&mut buffer[..(from - hashed).min(1 << 20) as usize])
            .map_err(io(&partial))?;
        if n == 0 {
            break;
        }
        check.update(&buffer[..n]);
        hashed += n as u64;
    }
    report(DownloadEvent::Start {
        repo,
        file: &remote.name,
        size: remote.size,
        from,
    });
    if from < remote.size {
        let (response, _) = hub.follow(repo, false, &remote.url, (from > 0).then_some(from))?;
        let status = response.status().as_u16();
        let resumed = status == 206
            && header(&response, "content-range")
                .is_some_and(|r| r.starts_with(&format!("bytes {from}-")));
        if status != 200 && !resumed {
            if !response.status().is_success() {
                return Err(hub.refused(repo, &remote.name, &response));
            }
            return Err(hub_error(
                repo,
                format!(
                    "{}: the server answered a ranged request with {status}",
                    remote.name
                ),
            ));
        }
        if !resumed && from > 0 {
            // Answered whole: start again.
            file.set_len(0).map_err(io(&partial))?;
            check = Check::new(remote);
            from = 0;
        }
        file.seek(SeekFrom::Start(from)).map_err(io(&partial))?;
        let mut body = response.into_body().into_reader();
        let mut done = from;
        loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().map_err(io(&partial))?;
                    return Err(hub_error(
                        repo,
                        format!(
                            "{}: the download stopped at {done} of {} bytes ({e}); run again to \
                             resume it",
                            remote.name, remote.size
                        ),
                    ));
                }
            };
            if done + n as u64 > remote.size {
                break;
            }
            file.write_all(&buffer[..n]).map_err(io(&partial))?;
            check.update(&buffer[..n]);
            done += n as u64;
            report(DownloadEvent::Progress {
                file: &remote.name,
                done,
                size: remote.size,
            });
        }
        if done != remote.size {
            let _ = std::fs::remove_file(&partial);
            return Err(hub_error(
                repo,
                format!(
                    "{}: {done} bytes received where {} were announced; removed, run again",
                    remote.name, remote.size
                ),
            ));
        }
    }
    if let Some(hash) = check.finish()
        && !hash.eq_ignore_ascii_case(&remote.etag)
    {
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(hub_error(
            repo,
            format!(
                "{}: the bytes received do not match the checksum the Hub announced (got {hash}, \
                 expected {}); removed, run again",
                remote.name, remote.etag
            ),
        ));
    }
    durable::sync_file(&file).map_err(io(&partial))?;
    drop(file);
    let blob = blobs.join(&remote.etag);
    std::fs::rename(&partial, &blob).map_err(io(&blob))?;
    durable::sync_dir(blobs).map_err(io(blobs))?;
    report(DownloadEvent::Done {
        repo,
        file: &remote.name,
    });
    Ok(())
}
