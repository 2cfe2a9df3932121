//! Task kinds: what turns a config's `[task]` section into a task. Each modality crate defines
//! its kinds; a program lists the kinds it knows in a [`TaskKinds`](crate::TaskKinds), which
//! trains, evaluates and predicts by the `[task] kind` a config or checkpoint records.

use crate::{train, Error, Evaluation, OptimConfig, Result, Summary, Task, TrainConfig};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use mamba_nn::Param;
use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a task is built from: a training config's sections, as read.
pub struct TaskInput<'a> {
    /// `[task]` without its `kind`, with its path keys resolved against the config's folder.
    pub task: toml::Table,
    pub model: toml::Table,
    pub backbone: Option<toml::Table>,
    /// The config file, for errors.
    pub source: &'a str,
    /// `[train] seed`.
    pub seed: u64,
    /// When a checkpoint is evaluated: its directory, whose side files say how inputs are made
    /// (only the evaluated data is read).
    pub checkpoint: Option<&'a Path>,
}

impl TaskInput<'_> {
    /// The `[task]` keys as `T`, whose deserialisation refuses what it does not know.
    pub fn section<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(self.task.clone()).map_err(|e| self.error(format!("[task] {e}")))
    }

    /// An error about the config file.
    pub fn error(&self, message: String) -> Error {
        Error::Config { path: self.source.to_string(), message }
    }
}

/// What `mamba predict` takes besides the checkpoint and its inputs.
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// Classifiers: how many classes to show per input.
    pub top: usize,
    /// Image classifiers: the size to run at (the trained size if None).
    pub image_size: Option<usize>,
    /// Forecasters: the folder for the written forecasts (beside each input if None).
    pub out: Option<PathBuf>,
    /// Language models: tokens to generate.
    pub max_new_tokens: usize,
}

/// A `[task] kind`.
pub trait TaskKind: Sync {
    /// As `[task] kind` writes it.
    fn name(&self) -> &'static str;
    /// The `[task]` keys that hold paths, relative to the config file.
    fn path_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// The task, its data read.
    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>>;
    /// Points a saved run's `[task]` at `data` for `mamba eval --data`, or says which data this
    /// kind cannot evaluate on.
    fn evaluate_on(&self, _task: &mut toml::Table, _data: &Path) -> std::result::Result<(), String> {
        Err(format!("--data is not supported for {} checkpoints", self.name()))
    }
    /// `mamba predict`: a line per input (a file, a case of an archive, a prompt).
    fn predict(
        &self,
        checkpoint: &Path,
        inputs: &[String],
        options: &PredictOptions,
        device: &Device,
    ) -> Result<Vec<String>>;
}

/// A built task, whatever its model and batch types are.
pub trait DynTask: Send + Sync {
    fn params(&self) -> Vec<Param>;
    fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>>;
    /// Trains it (see [`train`]).
    fn train(
        self: Box<Self>,
        config: &TrainConfig,
        optim: &OptimConfig,
        config_text: &str,
        out: &Path,
        resume: bool,
        device: &Device,
    ) -> Result<Summary>;
    /// [`Task::evaluation`] of the model over `weights`.
    fn evaluate(&self, weights: VarBuilder, device: &Device) -> Result<Evaluation>;
    /// The task itself, for code that knows its type (`downcast_ref`).
    fn as_any(&self) -> &dyn Any;
}

impl<T: Task> DynTask for T {
    fn params(&self) -> Vec<Param> {
        Task::params(self)
    }

    fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        Task::init_params(self, seed)
    }

    fn train(
        self: Box<Self>,
        config: &TrainConfig,
        optim: &OptimConfig,
        config_text: &str,
        out: &Path,
        resume: bool,
        device: &Device,
    ) -> Result<Summary> {
        train(Arc::<T>::from(self), config, optim, config_text, out, resume, device)
    }

    fn evaluate(&self, weights: VarBuilder, device: &Device) -> Result<Evaluation> {
        self.evaluation(&self.build_model(weights)?, device)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
