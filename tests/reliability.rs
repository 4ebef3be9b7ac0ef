//! Nothing lost, nothing left behind: every way a merge can end early (a panic, each signal, a
//! full disk, an input truncated under it, a run killed outright) leaves no temporary and the
//! previous output byte for byte; the next run removes what a killed run left; reports never
//! overwrite an input; hostile model folders are refused before anything is written; dotted
//! folder names are folders. Each merge stops at a deterministic point: the binary's
//! `BURN_SLERP_FAULT` hook (`panic:N`, or `pause:N:FILE`, which waits after the N-th tensor
//! until FILE exists or a signal arrives).

#[allow(dead_code, unused_imports)]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use safetensors::tensor::{Dtype, TensorView};

use common::scratch::Scratch;

fn scratch(name: &str) -> Scratch {
    common::scratch::scratch("reliability", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-slerp"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `tensors` f32 tensors of `len` values each, seeded.
fn write_model(path: &Path, tensors: usize, len: usize, seed: u64) {
    let data: Vec<(String, Vec<u8>)> = (0..tensors)
        .map(|i| {
            let bytes = (0..len)
                .flat_map(|j| {
                    let x = ((seed * 7919 + i as u64 * 104_729 + j as u64 * 31) % 1000) as f32;
                    (x / 500.0 - 1.0).to_le_bytes()
                })
                .collect();
            (format!("layers.{i}.weight"), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, bytes)| {
            let view = TensorView::new(Dtype::F32, vec![len], bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A and B of 6 tensors, and an output already there whose bytes must survive.
fn fixture(dir: &Path, len: usize) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    write_model(&a, 6, len, 1);
    write_model(&b, 6, len, 2);
    let out = dir.join("out.safetensors");
    let previous = b"the previous output".to_vec();
    std::fs::write(&out, &previous).unwrap();
    (a, b, out, previous)
}

/// Names in `dir` that look like temporaries.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// Starts a merge of A and B into `out` that pauses after the first tensor; returns once it
/// says it has paused (its temporary then exists), with the rest of its standard error.
fn paused_merge(
    a: &Path,
    b: &Path,
    out: &Path,
    go: &Path,
) -> (Child, std::io::Lines<BufReader<std::process::ChildStderr>>) {
    let mut child = bin()
        .args(["merge", s(a), s(b), "-o", s(out), "-t", "0.5", "--quiet"])
        .env("BURN_SLERP_FAULT", format!("pause:1:{}", go.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "paused after 1 tensors");
    (child, lines)
}

#[cfg(unix)]
fn kill(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for, so the id is its.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Each signal mid-merge (SIGINT, SIGTERM, SIGHUP, and two SIGINTs in a row), into a file and
/// into a folder: exit code 128 + the signal, the message, no temporary, the previous output
/// unchanged byte for byte.
#[cfg(unix)]
#[test]
fn signals_mid_merge_leave_the_previous_output() {
    let dir = scratch("signals");
    let (a, b, out, previous) = fixture(&dir, 4096);
    let folder = dir.join("folder-out");
    std::fs::create_dir(&folder).unwrap();
    let cases = [
        (vec![libc::SIGINT], 130, &out),
        (vec![libc::SIGTERM], 143, &out),
        (vec![libc::SIGHUP], 129, &out),
        (vec![libc::SIGINT, libc::SIGINT], 130, &out),
        (vec![libc::SIGTERM], 143, &folder),
    ];
    for (signals, code, target) in cases {
        let (mut child, lines) = paused_merge(&a, &b, target, &dir.join("never"));
        assert_eq!(temporaries(&dir).len(), 1, "the paused run's temporary");
        for signal in &signals {
            kill(&child, *signal);
        }
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{signals:?}: {rest:?}");
        assert!(
            rest.last().is_some_and(|l| l.contains("interrupted")),
            "{rest:?}"
        );
        assert_eq!(temporaries(&dir), Vec::<String>::new(), "{signals:?}");
        assert_eq!(std::fs::read(&out).unwrap(), previous);
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
    }
}

/// A panic after the first tensor (the binary is built with `panic = "unwind"`): the guard that
/// owns the temporary removes it as the stack unwinds; exit code 101. Into a safetensors file,
/// a burnpack file (whose writer is burn-store's) and a folder.
#[test]
fn a_panic_mid_merge_leaves_nothing() {
    let dir = scratch("panic");
    let (a, b, out, previous) = fixture(&dir, 1024);
    let bpk = dir.join("out.bpk");
    std::fs::write(&bpk, &previous).unwrap();
    for target in [out.clone(), bpk.clone(), dir.join("folder-out")] {
        let o = bin()
            .args([
                "merge",
                s(&a),
                s(&b),
                "-o",
                s(&target),
                "-t",
                "0.5",
                "--quiet",
            ])
            .env("BURN_SLERP_FAULT", "panic:1")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("fault injected after 1 tensors"),
            "{}",
            stderr(&o)
        );
        assert_eq!(
            temporaries(&dir),
            Vec::<String>::new(),
            "{}",
            target.display()
        );
    }
    assert_eq!(std::fs::read(&out).unwrap(), previous);
    assert_eq!(std::fs::read(&bpk).unwrap(), previous);
    assert!(!dir.join("folder-out").exists());
}

/// A run killed outright (SIGKILL: no cleanup can run) leaves its temporary; the next run into
/// the same output takes its lock, removes it and names it. A temporary whose lock is held (a
/// run still going) is left alone by another run into the same output.
#[cfg(unix)]
#[test]
fn stale_temporaries_are_removed_by_the_next_run() {
    let dir = scratch("stale");
    let (a, b, out, _) = fixture(&dir, 1024);
    let (mut killed, _) = paused_merge(&a, &b, &out, &dir.join("never"));
    kill(&killed, libc::SIGKILL);
    killed.wait().unwrap();
    let left = temporaries(&dir);
    assert_eq!(left.len(), 1);

    // The next run into the same output removes it before it begins; paused, it holds the
    // lock of its own temporary.
    let go = dir.join("go");
    let (mut live, lines) = paused_merge(&a, &b, &out, &go);
    let live_temps = temporaries(&dir);
    assert_eq!(live_temps.len(), 1);
    assert_ne!(live_temps, left, "the stopped run's temporary is gone");

    // A run into the same output meanwhile leaves the live run's temporary alone.
    let o = bin()
        .args(["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.5", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("removed"), "{}", stderr(&o));
    assert_eq!(
        temporaries(&dir),
        live_temps,
        "the live run's temporary stays"
    );

    std::fs::write(&go, b"").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(live.wait().unwrap().success(), "{rest:?}");
    let note = rest.join("\n");
    assert!(
        note.contains(&left[0]) && note.contains("a run that was stopped"),
        "{note}"
    );
    assert_eq!(temporaries(&dir), Vec::<String>::new());
}

/// `--report` naming an input, or the output, is refused before anything is computed: the
/// input is unchanged and no output is written.
#[test]
fn a_report_never_overwrites_an_input() {
    let dir = scratch("report");
    let (a, b, _, _) = fixture(&dir, 64);
    let before = std::fs::read(&a).unwrap();
    let fresh = dir.join("fresh.safetensors");
    let nowhere = dir.join("absent").join("report.json");
    for (report, what) in [
        (&a, "an input"),
        (&fresh, "the output"),
        (&nowhere, "does not exist"),
    ] {
        let o = bin()
            .args([
                "merge",
                s(&a),
                s(&b),
                "-o",
                s(&fresh),
                "-t",
                "0.5",
                "--report",
            ])
            .arg(report)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(s(report)), "{}", stderr(&o));
        assert!(stderr(&o).contains(what), "{}", stderr(&o));
        assert!(!fresh.exists());
    }
    let recipe = dir.join("recipe.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n\
             parameters:\n  t: 0.5\n",
            s(&a),
            s(&a),
            s(&b)
        ),
    )
    .unwrap();
    let o = bin()
        .args(["yaml", s(&recipe), s(&fresh), "--report", s(&b)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("an input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), before);
    assert!(!fresh.exists());
    // Elsewhere the report is written, through a temporary.
    let report = dir.join("report.json");
    let o = bin()
        .args([
            "merge",
            s(&a),
            s(&b),
            "-o",
            s(&fresh),
            "-t",
            "0.5",
            "--quiet",
        ])
        .args(["--report", s(&report)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["summary"]["tensors"], 6);
    assert_eq!(temporaries(&dir), Vec::<String>::new());
}

/// A full disk, as a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with
/// EFBIG, as ENOSPC would): an error naming the output, no temporary, the previous output kept.
#[cfg(unix)]
#[test]
fn a_full_disk_keeps_the_previous_output() {
    use std::os::unix::process::CommandExt;

    let dir = scratch("full");
    let (a, b, out, previous) = fixture(&dir, 16_384);
    let mut command = bin();
    command.args(["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.5", "--quiet"]);
    // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal).
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 100_000,
                rlim_max: 100_000,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = command.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let message = stderr(&o);
    assert!(message.contains(s(&out)), "{message}");
    assert!(message.to_lowercase().contains("too large"), "{message}");
    assert_eq!(temporaries(&dir), Vec::<String>::new());
    assert_eq!(std::fs::read(&out).unwrap(), previous);
}

/// An input truncated by another process during the merge faults on its memory map (SIGBUS):
/// the handler names the file, removes the temporary and exits with 1.
#[cfg(target_os = "linux")]
#[test]
fn an_input_truncated_mid_merge_is_named() {
    let dir = scratch("sigbus");
    let (a, b, out, previous) = fixture(&dir, 65_536);
    let go = dir.join("go");
    let (mut child, lines) = paused_merge(&a, &b, &out, &go);
    // Only the header stays: every tensor's bytes are past the end.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(64)
        .unwrap();
    std::fs::write(&go, b"").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{rest:?}");
    let message = rest.join("\n");
    assert!(message.contains(s(&a)), "{message}");
    assert!(message.contains("changed while it was read"), "{message}");
    assert_eq!(temporaries(&dir), Vec::<String>::new());
    assert_eq!(std::fs::read(&out).unwrap(), previous);
}

/// A model folder around A's and B's weights, with a side file (`name`) that is a link to
/// `target`.
#[cfg(unix)]
fn folder_with_link(dir: &Path, model: &str, weights: &Path, name: &str, target: &Path) -> PathBuf {
    let folder = dir.join(model);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(weights, folder.join("model.safetensors")).unwrap();
    std::fs::write(folder.join("config.json"), "{\"num_hidden_layers\": 6}").unwrap();
    std::os::unix::fs::symlink(target, folder.join(name)).unwrap();
    folder
}

/// Hostile model folders are refused before anything is written, naming the file: a side file
/// linking out of the folder (`additional_chat_templates -> /`), a link loop. Shard names that
/// leave the folder (`../x`, an absolute path) are refused too.
#[cfg(unix)]
#[test]
fn hostile_model_folders_are_refused() {
    let dir = scratch("hostile");
    let (a, b, _, _) = fixture(&dir, 64);
    let fb = dir.join("fb");
    std::fs::create_dir(&fb).unwrap();
    std::fs::copy(&b, fb.join("model.safetensors")).unwrap();
    let out = dir.join("merged");
    let cases = [
        ("root", "additional_chat_templates", PathBuf::from("/")),
        ("loop", "tokenizer.json", dir.join("loop/tokenizer.json")),
        ("outside", "tokenizer.json", a.clone()),
    ];
    for (model, name, target) in cases {
        let fa = folder_with_link(&dir, model, &a, name, &target);
        let o = bin()
            .args(["merge", s(&fa), s(&fb), "-o", s(&out), "-t", "0.5"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{model}: {}", stderr(&o));
        assert!(stderr(&o).contains(s(&fa.join(name))), "{}", stderr(&o));
        assert!(!out.exists(), "{model}");
        assert_eq!(temporaries(&dir), Vec::<String>::new());
    }
    // A link inside the folder is a file like any other.
    let fine = dir.join("fine");
    std::fs::create_dir(&fine).unwrap();
    std::fs::copy(&a, fine.join("model.safetensors")).unwrap();
    std::fs::write(fine.join("vocab.txt"), "a\nb\n").unwrap();
    std::os::unix::fs::symlink("vocab.txt", fine.join("tokenizer.json")).unwrap();
    let o = bin()
        .args([
            "merge",
            s(&fine),
            s(&fb),
            "-o",
            s(&out),
            "-t",
            "0.5",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"a\nb\n"
    );
    assert!(!out.join("tokenizer.json").is_symlink());

    for shard in ["../escape.safetensors", "/etc/passwd"] {
        let sharded = dir.join(format!("sharded-{}", shard.len()));
        std::fs::create_dir(&sharded).unwrap();
        let index = HashMap::from([("weight_map", HashMap::from([("layers.0.weight", shard)]))]);
        std::fs::write(
            sharded.join("model.safetensors.index.json"),
            serde_json::to_string(&index).unwrap(),
        )
        .unwrap();
        let o = bin()
            .args([
                "merge",
                s(&sharded),
                s(&fb),
                "-o",
                s(&dir.join("x")),
                "-t",
                "0.5",
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("not a file name in the folder"),
            "{}",
            stderr(&o)
        );
    }
}

/// Output names: `.safetensors` and `.bpk` are files; a dotted name such as
/// `Llama-3.2-merged` or a trailing `/` is a folder; a model extension that is not an output
/// format is an error saying so.
#[test]
fn dotted_names_are_folders() {
    let dir = scratch("names");
    let (a, b, _, _) = fixture(&dir, 64);
    for name in ["Llama-3.2-merged", "with-slash.v2/"] {
        let out = format!("{}/{name}", dir.display());
        let o = bin()
            .args(["merge", s(&a), s(&b), "-o", &out, "-t", "0.5", "--quiet"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let folder = Path::new(&out);
        assert!(folder.is_dir(), "{name}");
        let shards: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            shards.iter().any(|f| f.ends_with(".safetensors")),
            "{shards:?}"
        );
    }
    for ext in ["bin", "pt", "pth", "gguf"] {
        let out = dir.join(format!("out.{ext}"));
        let o = bin()
            .args(["merge", s(&a), s(&b), "-o", s(&out), "-t", "0.5"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("`.{ext}` is a model file")),
            "{}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
}
