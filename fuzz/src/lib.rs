//! What every fuzz target shares: a scratch folder per process, where the input is written as the
//! file a user would hand us, and the contract each target asserts.
//!
//! The contract: a loader returns `Ok`, or an `Err` whose message names the file it read. It
//! never panics, aborts or hangs, and stays within the bounds `scripts/fuzz.sh` sets (2 GiB of
//! memory, 10 s an input).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch folder (created once).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mamba-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// `bytes` written as `name` in `dir`, and its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("a scratch file");
    path
}

/// `from` copied to `to`, folders made. Not `std::fs::copy`: it does not retry a call
/// interrupted by a signal, and libFuzzer's timers send them.
pub fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("a folder")).expect("a scratch folder");
    std::fs::write(to, std::fs::read(from).expect("a bundled file")).expect("a scratch file");
}

/// A file of the bundled data (examples/data) or the test fixtures, by its path from the
/// repository's root.
pub fn bundled(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The contract: `Ok`, or an error whose message names `file` (its file name is enough, as
/// messages may show the path resolved).
pub fn check<T, E: std::fmt::Display>(result: Result<T, E>, file: &Path) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            let message = e.to_string();
            // To see what a corpus exercises: `FUZZ_VERBOSE=1 fuzz/target/.../TARGET FILES`.
            if std::env::var_os("FUZZ_VERBOSE").is_some() {
                eprintln!("{message}");
            }
            let name = file.file_name().expect("a file name").to_string_lossy();
            assert!(message.contains(name.as_ref()), "the error does not name {name}: {message}");
            None
        }
    }
}
