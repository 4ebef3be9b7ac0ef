//! Models by name from the Hugging Face Hub, against a Hub served by the test itself on
//! 127.0.0.1 (never the network): the metadata request, resolve URLs with `X-Repo-Commit`,
//! `ETag`/`X-Linked-Etag` and `X-Linked-Size`, a 302 from an LFS file's resolve URL to a CDN
//! path that serves ranges (and, like the CDN of hf-hub's bug #141, answers a ranged request
//! that accepts gzip whole, compressed, without `Content-Range`), and failures on demand.

#[allow(dead_code, unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tiny_http::{Header, Response, Server, StatusCode};

use common::scratch::Scratch;

fn scratch(name: &str) -> Scratch {
    common::scratch::scratch("hub", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const COMMIT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// What the test Hub does wrong, on demand.
#[derive(Clone, Debug, PartialEq)]
enum Fault {
    None,
    RepoNotFound,
    /// Gated: 401 `GatedRepo` without a token; with one, `token_ok` decides (else 403).
    Gated {
        token_ok: bool,
    },
    /// The first GET of each LFS file stops after this many bytes.
    Cut(usize),
    /// LFS files are served with one byte changed.
    WrongChecksum,
    /// HEAD of this file answers 404 `EntryNotFound`.
    Missing(String),
}

/// One file of the repository: its bytes, and whether it is stored in LFS.
struct RepoFile {
    bytes: Vec<u8>,
    lfs: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn git_blob(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

/// A request as the Hub saw it: method, URL, and the headers that matter here.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    url: String,
    range: Option<String>,
    accept_encoding: Option<String>,
    authorization: Option<String>,
}

struct MockHub {
    server: Arc<Server>,
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Arc<Mutex<Fault>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockHub {
    fn start(repos: BTreeMap<String, BTreeMap<String, RepoFile>>) -> Self {
        let server = Arc::new(Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fault = Arc::new(Mutex::new(Fault::None));
        let repos = Arc::new(repos);
        // The CDN LFS files redirect to: another port, as another host would be.
        let cdn_port = cdn(Arc::clone(&repos), Arc::clone(&seen), Arc::clone(&fault));
        let thread = {
            let (server, seen, fault) =
                (Arc::clone(&server), Arc::clone(&seen), Arc::clone(&fault));
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    let header = |name: &'static str| {
                        request
                            .headers()
                            .iter()
                            .find(|h| h.field.equiv(name))
                            .map(|h| h.value.as_str().to_string())
                    };
                    let entry = Seen {
                        method: request.method().as_str().to_string(),
                        url: request.url().to_string(),
                        range: header("Range"),
                        accept_encoding: header("Accept-Encoding"),
                        authorization: header("Authorization"),
                    };
                    seen.lock().unwrap().push(entry.clone());
                    let fault = fault.lock().unwrap().clone();
                    let response = answer(&repos, &entry, &fault, cdn_port);
                    let _ = request.respond(response);
                }
            })
        };
        Self {
            server,
            port,
            seen,
            fault,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn h(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
}

type Reply = Response<Box<dyn Read + Send>>;

fn reply(status: u16, body: Vec<u8>, headers: Vec<Header>) -> Reply {
    let len = body.len();
    Response::new(
        StatusCode(status),
        headers,
        Box::new(std::io::Cursor::new(body)),
        Some(len),
        None,
    )
}

fn error(status: u16, code: &str) -> Reply {
    reply(status, b"{}".to_vec(), vec![h("X-Error-Code", code)])
}

/// The CDN: LFS bytes by sha256 over plain HTTP/1.1 (one request per connection), with
/// ranges; a ranged request that accepts gzip gets the whole file, marked compressed, without
/// `Content-Range` (the behaviour behind hf-hub's bug #141); `Fault::Cut` sends the first
/// bytes of each file's first download and closes the connection; `Fault::WrongChecksum`
/// changes one byte. Returns its port.
fn cdn(
    repos: Arc<BTreeMap<String, BTreeMap<String, RepoFile>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Arc<Mutex<Fault>>,
) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut_done = Arc::new(Mutex::new(std::collections::HashSet::new()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let url = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let mut headers = BTreeMap::new();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let entry = Seen {
                method: line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                url: url.clone(),
                range: headers.get("range").cloned(),
                accept_encoding: headers.get("accept-encoding").cloned(),
                authorization: headers.get("authorization").cloned(),
            };
            seen.lock().unwrap().push(entry.clone());
            let fault = fault.lock().unwrap().clone();
            let sha = url.strip_prefix("/cdn/").unwrap_or_default().to_string();
            let file = repos
                .values()
                .flat_map(|r| r.values())
                .find(|f| f.lfs && sha256(&f.bytes) == sha);
            let Some(file) = file else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let mut bytes = file.bytes.clone();
            if fault == Fault::WrongChecksum {
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
            }
            let len = bytes.len();
            let from = entry
                .range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            let (head, body) = match from {
                Some(_)
                    if entry
                        .accept_encoding
                        .as_deref()
                        .is_some_and(|a| a.contains("gzip")) =>
                {
                    (
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len}\r\n"
                        ),
                        bytes,
                    )
                }
                Some(from) => (
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\n",
                        len - 1,
                        len - from.min(len)
                    ),
                    bytes[from.min(len)..].to_vec(),
                ),
                None => (
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
                    bytes,
                ),
            };
            let cut = match fault {
                Fault::Cut(limit) if from.is_none() && cut_done.lock().unwrap().insert(sha) => {
                    Some(limit)
                }
                _ => None,
            };
            let _ = stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
            let _ = stream.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())]);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
    port
}

fn answer(
    repos: &BTreeMap<String, BTreeMap<String, RepoFile>>,
    seen: &Seen,
    fault: &Fault,
    cdn_port: u16,
) -> Reply {
    let path = seen.url.split('?').next().unwrap_or_default();
    // The Hub: metadata and resolve URLs. Repository ids are `org/name` or `name`.
    let (repo, rest) = if let Some(rest) = path.strip_prefix("/api/models/") {
        match rest.split_once("/revision/") {
            Some((repo, revision)) => (repo.to_string(), format!("revision/{revision}")),
            None => return error(404, "RepoNotFound"),
        }
    } else {
        match path.trim_start_matches('/').split_once("/resolve/") {
            Some((repo, rest)) => (repo.to_string(), format!("resolve/{rest}")),
            None => return error(404, "RepoNotFound"),
        }
    };
    let Some(files) = repos.get(&repo) else {
        return error(401, "RepoNotFound");
    };
    match fault {
        Fault::RepoNotFound => return error(401, "RepoNotFound"),
        Fault::Gated { token_ok } => match (&seen.authorization, token_ok) {
            (None, _) => return error(401, "GatedRepo"),
            (Some(_), false) => return error(403, "GatedRepo"),
            (Some(_), true) => {}
        },
        _ => {}
    }
    if let Some(revision) = rest.strip_prefix("revision/") {
        if !(revision == "main" || revision == COMMIT || revision == "refs/pr/1") {
            return error(404, "RevisionNotFound");
        }
        let siblings: Vec<serde_json::Value> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings });
        return reply(200, body.to_string().into_bytes(), vec![]);
    }
    let rest = rest.strip_prefix("resolve/").unwrap_or_default();
    let Some((commit, name)) = rest.split_once('/') else {
        return error(404, "EntryNotFound");
    };
    if commit != COMMIT {
        return error(404, "RevisionNotFound");
    }
    let Some(file) = files.get(name) else {
        return error(404, "EntryNotFound");
    };
    if *fault == Fault::Missing(name.to_string()) {
        return error(404, "EntryNotFound");
    }
    let mut headers = vec![h("X-Repo-Commit", COMMIT)];
    if file.lfs {
        let sha = sha256(&file.bytes);
        headers.push(h("ETag", &format!("\"{}\"", git_blob(b"pointer"))));
        headers.push(h("X-Linked-Etag", &format!("\"{sha}\"")));
        headers.push(h("X-Linked-Size", &file.bytes.len().to_string()));
        headers.push(h(
            "Location",
            &format!("http://127.0.0.1:{cdn_port}/cdn/{sha}"),
        ));
        return reply(302, Vec::new(), headers);
    }
    headers.push(h("ETag", &format!("\"{}\"", git_blob(&file.bytes))));
    reply(200, file.bytes.clone(), headers)
}

/// A safetensors file of three f32 tensors, seeded.
fn weights(names: &[&str], seed: u64) -> Vec<u8> {
    let data: Vec<(String, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let bytes = (0..64)
                .flat_map(|j| (((seed + i as u64 * 7 + j) % 13) as f32 / 6.5 - 1.0).to_le_bytes())
                .collect();
            (name.to_string(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, b)| (n.clone(), TensorView::new(Dtype::F32, vec![64], b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

/// `org/tiny`: two LFS shards and their index, a config, a tokenizer, and files a merge never
/// needs (training state, PyTorch weights beside the safetensors ones, the card).
fn tiny_repo() -> BTreeMap<String, RepoFile> {
    let index = serde_json::json!({
        "metadata": {"total_size": 768},
        "weight_map": {
            "layers.0.weight": "model-00001-of-00002.safetensors",
            "layers.1.weight": "model-00001-of-00002.safetensors",
            "layers.2.weight": "model-00002-of-00002.safetensors",
        }
    });
    let mut files = BTreeMap::new();
    let mut add = |name: &str, bytes: Vec<u8>, lfs: bool| {
        files.insert(name.to_string(), RepoFile { bytes, lfs });
    };
    add(
        "model.safetensors.index.json",
        index.to_string().into_bytes(),
        false,
    );
    add(
        "model-00001-of-00002.safetensors",
        weights(&["layers.0.weight", "layers.1.weight"], 1),
        true,
    );
    add(
        "model-00002-of-00002.safetensors",
        weights(&["layers.2.weight"], 1),
        true,
    );
    add(
        "config.json",
        br#"{"num_hidden_layers": 3, "model_type": "tiny"}"#.to_vec(),
        false,
    );
    add("tokenizer.json", br#"{"version": "1.0"}"#.to_vec(), false);
    add("training_args.bin", vec![7; 100], true);
    add("optimizer.pt", vec![8; 100], true);
    add("pytorch_model.bin", vec![9; 100], true);
    add("README.md", b"# tiny".to_vec(), false);
    files
}

fn repos() -> BTreeMap<String, BTreeMap<String, RepoFile>> {
    let mut repos = BTreeMap::new();
    repos.insert("org/tiny".to_string(), tiny_repo());
    repos.insert("tiny".to_string(), tiny_repo());
    repos
}

/// B: the same tensors, other values, as one local file.
fn write_b(dir: &Path) -> PathBuf {
    let b = dir.join("b.safetensors");
    std::fs::write(
        &b,
        weights(
            &["layers.0.weight", "layers.1.weight", "layers.2.weight"],
            5,
        ),
    )
    .unwrap();
    b
}

/// The command, with the test Hub as endpoint, `cache` as the cache, no token.
fn bin(hub: &str, cache: &Path, home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_burn-slerp"));
    command
        .env("HF_ENDPOINT", hub)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN_PATH");
    command
}

/// The merged output against the f64 reference of A (the repository's shards) and B.
fn check_merge(out: &Path, b: &Path) {
    let out_bytes = std::fs::read(out).unwrap();
    let merged = SafeTensors::deserialize(&out_bytes).unwrap();
    let b_bytes = std::fs::read(b).unwrap();
    let b = SafeTensors::deserialize(&b_bytes).unwrap();
    let shards = [
        weights(&["layers.0.weight", "layers.1.weight"], 1),
        weights(&["layers.2.weight"], 1),
    ];
    for name in ["layers.0.weight", "layers.1.weight", "layers.2.weight"] {
        let shard = if name == "layers.2.weight" {
            &shards[1]
        } else {
            &shards[0]
        };
        let a = SafeTensors::deserialize(shard).unwrap();
        let want = common::reference(
            &f32s(a.tensor(name).unwrap().data()),
            &f32s(b.tensor(name).unwrap().data()),
            0.5,
            1e-8,
            None,
        );
        let got: Vec<f32> = f32s(merged.tensor(name).unwrap().data())
            .iter()
            .map(|v| *v as f32)
            .collect();
        let err = common::rel_l2(&got, &want);
        assert!(err <= 1e-6, "{name}: {err:e}");
    }
}

/// Files under `dir`, relative, sorted, links shown with their targets.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.push(format!(
                    "{rel} -> {}",
                    std::fs::read_link(&p).unwrap().display()
                ));
            } else if meta.is_dir() {
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// A merge naming `org/tiny` downloads only what it needs, into the layout `huggingface_hub`
/// writes; the merge equals the f64 reference; a second run makes no request; with
/// `HF_HUB_OFFLINE=1` none either; a name without an organisation works, and a local folder
/// of that name wins.
#[cfg(unix)]
#[test]
fn a_hub_model_is_downloaded_into_the_cache_once() {
    let dir = scratch("download");
    let hub = MockHub::start(repos());
    let (cache, home) = (dir.join("cache"), dir.join("home"));
    let b = write_b(&dir);
    let out = dir.join("out.safetensors");
    let merge = |spec: &str, out: &Path| {
        bin(&hub.endpoint(), &cache, &home)
            .args(["merge", spec, s(&b), "-o", s(out), "-t", "0.5"])
            .output()
            .unwrap()
    };
    let o = merge("org/tiny", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    check_merge(&out, &b);
    let log = stderr(&o);
    assert!(
        log.contains("downloading org/tiny/model-00001-of-00002.safetensors"),
        "{log}"
    );
    let seen = hub.take();
    for never in [
        "training_args.bin",
        "optimizer.pt",
        "pytorch_model.bin",
        "README.md",
    ] {
        assert!(
            !seen.iter().any(|r| r.url.ends_with(never)),
            "{never}: {seen:?}"
        );
    }
    assert!(seen.iter().all(|r| r.accept_encoding.is_none()), "{seen:?}");
    // Each file's etag and size from HEAD of its resolve URL; the bytes of LFS files by GET
    // from the CDN the resolve URL redirects to, without the token.
    assert!(
        seen.iter()
            .filter(|r| r.url.contains("/resolve/"))
            .any(|r| r.method == "HEAD"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|r| r.url.starts_with("/cdn/"))
            .all(|r| r.method == "GET"),
        "{seen:?}"
    );

    let repo = tiny_repo();
    let blob = |name: &str| {
        let f = &repo[name];
        if f.lfs {
            sha256(&f.bytes)
        } else {
            git_blob(&f.bytes)
        }
    };
    let mut want: Vec<String> = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    .iter()
    .flat_map(|name| {
        [
            format!("models--org--tiny/blobs/{}", blob(name)),
            format!(
                "models--org--tiny/snapshots/{COMMIT}/{name} -> ../../blobs/{}",
                blob(name)
            ),
            format!(".locks/models--org--tiny/{}.lock", blob(name)),
        ]
    })
    .collect();
    want.push("models--org--tiny/refs/main".into());
    want.sort();
    assert_eq!(listing(&cache), want);
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny/refs/main")).unwrap(),
        COMMIT
    );

    // Again: from the cache, no request.
    let o = merge("org/tiny", &dir.join("again.safetensors"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hub.take().is_empty());
    // Offline, with nothing cached: an error, no request.
    let o = bin(&hub.endpoint(), &dir.join("empty-cache"), &home)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "merge",
            "org/tiny",
            s(&b),
            "-o",
            s(&dir.join("x.safetensors")),
            "-t",
            "0.5",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));
    assert!(hub.take().is_empty());
    // No organisation; then a local folder of that name, which wins.
    let o = merge("tiny", &dir.join("plain.safetensors"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(cache.join("models--tiny/refs/main").is_file());
    hub.take();
    let local = dir.join("local");
    std::fs::create_dir_all(local.join("tiny")).unwrap();
    std::fs::copy(&b, local.join("tiny/model.safetensors")).unwrap();
    let o = bin(&hub.endpoint(), &dir.join("other-cache"), &home)
        .current_dir(&local)
        .args([
            "merge",
            "tiny",
            s(&b),
            "-o",
            s(&dir.join("local.safetensors")),
            "-t",
            "0.5",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hub.take().is_empty(), "the local folder wins");
    // A mergekit recipe naming Hub models runs as it is: the cached one is not fetched again.
    let recipe = dir.join("recipe.yml");
    std::fs::write(
        &recipe,
        "merge_method: slerp\nbase_model: org/tiny\nmodels:\n  - model: org/tiny\n  - model: \
         tiny\nparameters:\n  t: 0.5\n",
    )
    .unwrap();
    let merged = dir.join("merged");
    let o = bin(&hub.endpoint(), &cache, &home)
        .args(["yaml", s(&recipe), s(&merged)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hub.take().is_empty(), "both models are cached");
    assert_eq!(
        std::fs::read(merged.join("tokenizer.json")).unwrap(),
        br#"{"version": "1.0"}"#
    );
    assert!(!merged.join("config.json").is_symlink());
    // A pull request's ref.
    let o = merge("org/tiny@refs/pr/1", &dir.join("pr.safetensors"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny/refs/refs/pr/1")).unwrap(),
        COMMIT
    );
}

/// `--dry-run` lists what would be downloaded and how many bytes, and downloads nothing.
#[test]
fn a_dry_run_downloads_nothing() {
    let dir = scratch("dry-run");
    let hub = MockHub::start(repos());
    let (cache, home) = (dir.join("cache"), dir.join("home"));
    let b = write_b(&dir);
    let o = bin(&hub.endpoint(), &cache, &home)
        .args([
            "merge",
            "org/tiny",
            s(&b),
            "-o",
            s(&dir.join("o.safetensors")),
        ])
        .args(["-t", "0.5", "--dry-run"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let repo = tiny_repo();
    let bytes: usize = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    .iter()
    .map(|n| repo[*n].bytes.len())
    .sum();
    assert!(
        text.contains(&format!(
            "org/tiny at {COMMIT}: 5 files to download, {bytes} bytes"
        )),
        "{text}"
    );
    assert!(!text.contains("training_args"), "{text}");
    let seen = hub.take();
    assert!(!seen.iter().any(|r| r.url.starts_with("/cdn/")), "{seen:?}");
    assert!(!cache.join("models--org--tiny/blobs").exists());
}

/// A connection cut in the middle of a file leaves an `.incomplete` blob that nothing trusts
/// (no snapshot, no ref); the next run resumes it with a range and no gzip. A file whose bytes
/// do not match the announced checksum is removed, and nothing is trusted.
#[cfg(unix)]
#[test]
fn cut_downloads_resume_and_wrong_ones_leave_nothing() {
    let dir = scratch("resume");
    let hub = MockHub::start(repos());
    let (cache, home) = (dir.join("cache"), dir.join("home"));
    let b = write_b(&dir);
    let merge = |cache: &Path, out: &Path| {
        bin(&hub.endpoint(), cache, &home)
            .args(["merge", "org/tiny", s(&b), "-o", s(out), "-t", "0.5", "-q"])
            .output()
            .unwrap()
    };
    hub.set(Fault::Cut(100));
    let o = merge(&cache, &dir.join("o.safetensors"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("run again to resume"), "{}", stderr(&o));
    let left = listing(&cache);
    assert!(left.iter().any(|f| f.ends_with(".incomplete")), "{left:?}");
    assert!(
        !left
            .iter()
            .any(|f| f.contains("snapshots") || f.contains("refs")),
        "{left:?}"
    );
    hub.take();
    hub.set(Fault::None);
    let out = dir.join("o.safetensors");
    let o = merge(&cache, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    check_merge(&out, &b);
    let seen = hub.take();
    assert!(
        seen.iter()
            .any(|r| r.url.starts_with("/cdn/") && r.range.as_deref() == Some("bytes=100-")),
        "{seen:?}"
    );
    assert!(!listing(&cache).iter().any(|f| f.ends_with(".incomplete")));

    let fresh = dir.join("cache-2");
    hub.set(Fault::WrongChecksum);
    let o = merge(&fresh, &dir.join("w.safetensors"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("checksum"), "{}", stderr(&o));
    let left = listing(&fresh);
    assert!(
        !left
            .iter()
            .any(|f| f.contains("snapshots") || f.contains("refs") || f.contains(".incomplete")),
        "{left:?}"
    );
    let lfs_blobs = left
        .iter()
        .filter(|f| f.contains("/blobs/") && f.rsplit('/').next().unwrap().len() == 64)
        .count();
    assert_eq!(lfs_blobs, 0, "{left:?}");
}

/// Every failure is an error naming the repository and what to do, exit code 1, and nothing
/// in the cache a later run would trust.
#[test]
fn hub_failures_are_named() {
    let dir = scratch("failures");
    let hub = MockHub::start(repos());
    let (cache, home) = (dir.join("cache"), dir.join("home"));
    let b = write_b(&dir);
    let cases: Vec<(Fault, Option<&str>, &str, &str)> = vec![
        (Fault::RepoNotFound, None, "org/tiny", "no such repository"),
        (Fault::Gated { token_ok: false }, None, "org/tiny", "gated"),
        (
            Fault::Gated { token_ok: false },
            Some("hf_x"),
            "org/tiny",
            "gated",
        ),
        (Fault::Gated { token_ok: true }, None, "org/tiny", "gated"),
        (
            Fault::Missing("config.json".into()),
            None,
            "org/tiny",
            "config.json: no such file",
        ),
        (Fault::None, None, "org/absent", "no such repository"),
        (Fault::None, None, "org/tiny@v9", "no such revision"),
    ];
    for (fault, token, spec, needle) in cases {
        hub.set(fault.clone());
        let mut command = bin(&hub.endpoint(), &cache, &home);
        if let Some(token) = token {
            command.env("HF_TOKEN", token);
        }
        let o = command
            .args([
                "merge",
                spec,
                s(&b),
                "-o",
                s(&dir.join("o.safetensors")),
                "-t",
                "0.5",
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{fault:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(spec.split('@').next().unwrap()) && e.contains(needle),
            "{fault:?}: {e}"
        );
        if cache.exists() {
            let left = listing(&cache);
            assert!(
                !left
                    .iter()
                    .any(|f| f.contains("snapshots") || f.contains("refs")),
                "{left:?}"
            );
        }
    }
    // A token sent where the Hub wants one.
    hub.set(Fault::Gated { token_ok: true });
    hub.take();
    let o = bin(&hub.endpoint(), &cache, &home)
        .env("HF_TOKEN", "hf_token")
        .args([
            "merge",
            "org/tiny",
            s(&b),
            "-o",
            s(&dir.join("g.safetensors")),
            "-t",
            "0.5",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = hub.take();
    assert!(
        seen.iter()
            .filter(|r| !r.url.starts_with("/cdn/"))
            .all(|r| r.authorization.as_deref() == Some("Bearer hf_token")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|r| r.url.starts_with("/cdn/"))
            .all(|r| r.authorization.is_none()),
        "the token stays on the Hub: {seen:?}"
    );
    // The network unreachable: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let o = bin(
        &format!("http://127.0.0.1:{port}"),
        &dir.join("cache-3"),
        &home,
    )
    .args([
        "merge",
        "org/tiny",
        s(&b),
        "-o",
        s(&dir.join("n.safetensors")),
        "-t",
        "0.5",
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot reach") && stderr(&o).contains("HF_HUB_OFFLINE"),
        "{}",
        stderr(&o)
    );
    // Revisions that would leave the cache are not Hub names at all.
    let o = bin(&hub.endpoint(), &cache, &home)
        .args([
            "merge",
            "org/tiny@../../x",
            s(&b),
            "-o",
            s(&dir.join("r.safetensors")),
        ])
        .args(["-t", "0.5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no such file or folder"),
        "{}",
        stderr(&o)
    );
}
