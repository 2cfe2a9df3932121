//! Reading a checkpoint directory: its train.toml and recorded task kind, its weights, and the
//! JSON side files a task writes beside them, checked as they are read.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Maps an I/O error to one naming `path`.
pub fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// A checkpoint's JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_slice(&std::fs::read(path).map_err(io(path))?)
        .map_err(|e| Error::Checkpoint { path: path.display().to_string(), message: e.to_string() })
}

/// A checkpoint side file whose values are checked as it is read: a std of 0, a crop of 0 or no
/// classes could not have come from training, and would reach the model as infinities or a
/// division by zero.
pub trait Checked {
    /// What is wrong, if anything.
    fn check(&self) -> std::result::Result<(), String>;
}

/// A checkpoint's JSON side file, checked.
pub fn read_checked<T: serde::de::DeserializeOwned + Checked>(path: &Path) -> Result<T> {
    let value: T = read_json(path)?;
    value.check().map_err(|message| Error::Checkpoint { path: path.display().to_string(), message })?;
    Ok(value)
}

/// `count` finite means and positive, finite stds.
pub fn check_standardisation(mean: &[f32], std: &[f32], count: usize) -> std::result::Result<(), String> {
    if mean.len() != count || std.len() != count {
        return Err(format!("{} means and {} stds for {count} channels", mean.len(), std.len()));
    }
    if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
        return Err(format!("a mean of {m}"));
    }
    match std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        Some(s) => Err(format!("a std of {s}: every std must be positive")),
        None => Ok(()),
    }
}

/// The most values one example's input may hold: 2^28 (1 GiB of f32). A side file that describes
/// more could not have come from training on a machine of this size, and would allocate without bound.
pub const MAX_INPUT_VALUES: usize = 1 << 28;

/// The sizes named in `what`, multiplied, are at most [`MAX_INPUT_VALUES`].
pub fn check_input_size(what: &str, sizes: &[usize]) -> std::result::Result<(), String> {
    match sizes.iter().try_fold(1usize, |n, &s| n.checked_mul(s)) {
        Some(n) if n <= MAX_INPUT_VALUES => Ok(()),
        _ => Err(format!("{what} {sizes:?}: more than {MAX_INPUT_VALUES} values in one example")),
    }
}

/// A checkpoint's train.toml as a table, and the file's name for errors.
pub fn read_train_config(dir: &Path) -> Result<(toml::Table, String)> {
    let path = dir.join("train.toml");
    let source = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let table =
        text.parse().map_err(|e: toml::de::Error| Error::Config { path: source.clone(), message: e.to_string() })?;
    Ok((table, source))
}

/// The `[task] kind` that a checkpoint's train.toml records, or None for a directory without one
/// (a Hugging Face or state-spaces model directory).
pub fn checkpoint_kind(dir: &Path) -> Result<Option<String>> {
    if !dir.join("train.toml").exists() {
        return Ok(None);
    }
    let (table, source) = read_train_config(dir)?;
    match table.get("task").and_then(|t| t.get("kind")).and_then(toml::Value::as_str) {
        Some(kind) => Ok(Some(kind.to_string())),
        None => Err(Error::Config { path: source, message: "no [task] kind".into() }),
    }
}

/// A checkpoint's model.safetensors as a VarBuilder (f32) that puts each tensor on `device`.
pub fn checkpoint_weights(dir: &Path, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    Ok(candle_nn::VarBuilder::from_tensors(checkpoint_tensors(dir)?, candle_core::DType::F32, device))
}

/// A checkpoint's model.safetensors by name (CPU).
pub fn checkpoint_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: weights.display().to_string(), message: e.to_string() })
}
