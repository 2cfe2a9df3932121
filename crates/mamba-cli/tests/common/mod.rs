//! What every CLI test does: run the built `mamba`, read what it printed, make a scratch folder.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn mamba(args: &[&str]) -> Output {
    Command::new(mamba_bin()).args(args).output().expect("run mamba")
}

/// The `mamba` binary cargo built, or `$MAMBA_BIN` (the GPU bundle runs these tests away from
/// the build: scripts/gpu-bundle.sh).
pub fn mamba_bin() -> PathBuf {
    std::env::var_os("MAMBA_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mamba")), PathBuf::from)
}

/// The repository root the tests read fixtures and data from, or `$MAMBA_REPO` (the bundle's
/// copy of those files).
pub fn repo() -> PathBuf {
    std::env::var_os("MAMBA_REPO")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from)
}

/// stdout then stderr.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A `--device cuda` run of a build without the `cuda` feature: it failed, saying how to build
/// one with CUDA.
pub fn assert_cuda_refused(o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("built without CUDA") && err.contains("--features cuda"), "{err}");
}

/// An empty folder of this process (test binaries run as separate processes).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mamba-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `accuracy` line of a `mamba eval` report.
pub fn eval_accuracy(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("accuracy "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {report}"))
}

/// `mamba eval --checkpoint CHECKPOINT --data DATA --json`: how many examples it scored (the
/// confusion matrix's total) and the accuracy.
pub fn eval_on_data(checkpoint: &Path, data: &Path) -> (u64, f64) {
    let args = ["eval", "--checkpoint", checkpoint.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"];
    let o = mamba(&args);
    let value: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let rows = value["confusion"].as_array().unwrap_or_else(|| panic!("no confusion matrix: {value}"));
    let examples = rows.iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    (examples, value["accuracy"].as_f64().unwrap())
}
