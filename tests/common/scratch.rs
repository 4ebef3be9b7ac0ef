//! Scratch folders for the tests that write files (`tests/cli.rs`, `tests/folders.rs`,
//! `tests/yaml.rs`); the device suite has no use for them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A scratch folder of its own per test, removed when the test passes (kept for a look when it
/// fails).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A new, empty `burn-slerp-SUITE-PID-NAME` folder in the system's temporary folder.
pub fn scratch(suite: &str, name: &str) -> Scratch {
    let dir =
        std::env::temp_dir().join(format!("burn-slerp-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}
