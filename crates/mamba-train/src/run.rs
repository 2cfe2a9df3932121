//! Training configs (TOML): `[task]` (its `kind` picks the task), `[model]` and `[backbone]` (as
//! in `models/*.toml`), `[train]` and `[optim]`. `--set section.key=value` overrides apply before
//! anything is read; unknown keys, wrong types and missing files stop the run before it starts,
//! naming the file and the key. [`TaskKinds`] is the list of kinds a program knows, and what
//! trains, evaluates and predicts by the kind a config or checkpoint records.

use crate::checkpoint::{checkpoint_kind, checkpoint_weights};
use crate::kind::{DynTask, PredictOptions, TaskInput, TaskKind};
use crate::optim::OptimConfig;
use crate::trainer::{Summary, TrainConfig};
use crate::{Error, Evaluation, Result};
use candle_core::Device;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    task: toml::Table,
    model: toml::Table,
    backbone: Option<toml::Table>,
    train: TrainConfig,
    optim: OptimConfig,
}

/// A parsed training config, its text (with overrides and resolved paths) and its task.
pub struct RunConfig {
    pub text: String,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub task: Box<dyn DynTask>,
}

/// The task kinds a program knows.
#[derive(Clone, Copy)]
pub struct TaskKinds(pub &'static [&'static dyn TaskKind]);

impl TaskKinds {
    /// The kind named `name`, or an error about `source` that lists the known ones.
    pub fn get(&self, name: &str, source: &str) -> Result<&'static dyn TaskKind> {
        self.0.iter().copied().find(|k| k.name() == name).ok_or_else(|| {
            let known: Vec<&str> = self.0.iter().map(|k| k.name()).collect();
            Error::Config {
                path: source.to_string(),
                message: format!("[task] kind = {name:?} is not a task kind (known: {})", known.join(", ")),
            }
        })
    }

    /// Reads the config at `path`, applies `sets` ("section.key=value", the value in TOML
    /// syntax or a bare string) and builds its task (reading its data).
    pub fn load(&self, path: &Path, sets: &[String]) -> Result<RunConfig> {
        self.read(path, sets, None, None)
    }

    /// A checkpoint directory's train.toml, its task built to evaluate the checkpoint: inputs
    /// are made as its side files (image.json, audio.json, ...) say, and the training data is not
    /// decoded or measured again. `data` replaces the set the run validated on (see
    /// [`TaskKind::evaluate_on`]).
    pub fn for_checkpoint(&self, dir: &Path, data: Option<&Path>) -> Result<RunConfig> {
        self.read(&dir.join("train.toml"), &[], Some(dir), data)
    }

    /// `mamba train`: trains the config at `path` into `out`, on `device`.
    pub fn train(&self, path: &Path, out: &Path, resume: bool, sets: &[String], device: &Device) -> Result<Summary> {
        let run = self.load(path, sets)?;
        run.task.train(&run.train, &run.optim, &run.text, out, resume, device)
    }

    /// `mamba eval`: what the task reports of a checkpoint directory (its train.toml and
    /// weights), the model and batches on `device`; with `data`, over that data set instead of
    /// the run's validation split.
    pub fn evaluate(&self, dir: &Path, data: Option<&Path>, device: &Device) -> Result<Evaluation> {
        let run = self.for_checkpoint(dir, data)?;
        run.task.evaluate(checkpoint_weights(dir, device)?, device)
    }

    /// `mamba predict` with a checkpoint of a training run: what its task kind predicts, a line
    /// per input. None for a directory without a train.toml (a model directory).
    pub fn predict(
        &self,
        dir: &Path,
        inputs: &[String],
        options: &PredictOptions,
        device: &Device,
    ) -> Result<Option<Vec<String>>> {
        let Some(name) = checkpoint_kind(dir)? else { return Ok(None) };
        let kind = self.get(&name, &dir.join("train.toml").display().to_string())?;
        kind.predict(dir, inputs, options, device).map(Some)
    }

    /// Every error names the config file: the task's own checks name their section (`[task]`)
    /// and a data file's errors that file, so the config is put in front of any message that
    /// does not name it already.
    fn read(&self, path: &Path, sets: &[String], checkpoint: Option<&Path>, data: Option<&Path>) -> Result<RunConfig> {
        let source = path.display().to_string();
        self.read_named(path, sets, checkpoint, data).map_err(|e| {
            let message = e.to_string();
            if message.contains(&source) {
                e
            } else {
                Error::Config { path: source, message }
            }
        })
    }

    fn read_named(
        &self,
        path: &Path,
        sets: &[String],
        checkpoint: Option<&Path>,
        data: Option<&Path>,
    ) -> Result<RunConfig> {
        let source = path.display().to_string();
        let err = |message: String| Error::Config { path: source.clone(), message };
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: source.clone(), source: e })?;
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
        for set in sets {
            let (key, value) =
                set.split_once('=').ok_or_else(|| err(format!("--set {set}: expected section.key=value")))?;
            let (section, field) =
                key.split_once('.').ok_or_else(|| err(format!("--set {set}: expected section.key=value")))?;
            let value: toml::Value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let Some(toml::Value::Table(s)) = table.get_mut(section) else {
                return Err(err(format!("--set {set}: there is no [{section}] section")));
            };
            s.insert(field.to_string(), value);
        }
        let Some(toml::Value::Table(task)) = table.get_mut("task") else {
            return Err(err("a training config needs a [task] section (with its `kind`)".into()));
        };
        let kind = match task.get("kind") {
            Some(toml::Value::String(name)) => self.get(name, &source)?,
            Some(other) => return Err(err(format!("[task] kind = {other}: expected a string"))),
            None => return Err(err("[task] needs a `kind`".into())),
        };
        if let Some(data) = data {
            let path = data.canonicalize().map_err(|e| Error::Io { path: data.display().to_string(), source: e })?;
            let message = |m: String| Error::Config { path: data.display().to_string(), message: m };
            kind.evaluate_on(task, &path).map_err(message)?;
        }
        // Data paths are relative to the config file; the saved config holds them resolved.
        let base = path.parent().unwrap_or(Path::new("."));
        for &key in kind.path_keys() {
            if let Some(toml::Value::String(p)) = task.get(key) {
                let resolved = base.join(p);
                // A checkpoint's evaluation reads only what it needs (not the training data).
                if !resolved.exists() && checkpoint.is_none() {
                    return Err(err(format!("[task] {key} = {p:?}: no such file ({})", resolved.display())));
                }
                let resolved = resolved.canonicalize().unwrap_or(resolved);
                task.insert(key.into(), toml::Value::String(resolved.display().to_string()));
            }
        }
        let text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        let mut file: RunFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        file.task.remove("kind");
        let input = TaskInput {
            task: file.task,
            model: file.model,
            backbone: file.backbone,
            source: &source,
            seed: file.train.seed,
            checkpoint,
        };
        let task = kind.build(input)?;
        Ok(RunConfig { text, train: file.train, optim: file.optim, task })
    }
}
