//! Training configs (TOML): `[task]` (its `kind` picks the task), `[model]` and `[backbone]` (as
//! in `models/*.toml`), `[train]` and `[optim]`. `--set section.key=value` overrides apply before
//! anything is read; unknown keys, wrong types and missing files stop the run before it starts,
//! naming the file and the key.

use crate::optim::OptimConfig;
use crate::tasks::audio::{AudioData, AudioTask};
use crate::tasks::classify::{read_meta, read_train_config, Classify, Examples};
use crate::tasks::forecast::{ForecastData, ForecastTask};
use crate::tasks::image::{ImageData, ImageTask};
use crate::tasks::series::{SeriesData, SeriesMeta, SeriesTask};
use crate::tasks::{LmTask, Source, TextData};
use crate::trainer::{evaluate, train, Summary, TrainConfig};
use crate::Result;
use crate::{Error, Metrics, Task};
use candle_core::Device;
use mamba_series::Errors;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    task: TaskSection,
    model: toml::Table,
    backbone: Option<toml::Table>,
    train: TrainConfig,
    optim: OptimConfig,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TaskSection {
    SelectiveCopying {
        seq_len: usize,
        #[serde(default = "sixteen")]
        tokens: usize,
        train_examples: usize,
        validation_examples: usize,
        #[serde(default)]
        label_smoothing: f64,
    },
    InductionHeads {
        seq_len: usize,
        train_examples: usize,
        validation_examples: usize,
        #[serde(default)]
        label_smoothing: f64,
    },
    Text {
        /// Paths relative to the config file.
        data: PathBuf,
        tokenizer: PathBuf,
        context: usize,
        #[serde(default = "tenth")]
        validation_fraction: f64,
        #[serde(default)]
        label_smoothing: f64,
    },
    /// ImageFolder directories (paths relative to the config file) and transforms.
    ImageClassification(ImageData),
    /// An AudioFolder (path relative to the config file), its split, features and augmentation.
    AudioClassification(AudioData),
    /// UCR / UEA archive files (`.ts`, `.tsv`; paths relative to the config file).
    SeriesClassification(SeriesData),
    /// A CSV table (path relative to the config file), its windows and split.
    Forecasting(ForecastData),
}

fn sixteen() -> usize {
    16
}
fn tenth() -> f64 {
    0.1
}

/// The task of a run, with its data read.
pub enum AnyTask {
    Lm(LmTask),
    Image(ImageTask),
    Audio(AudioTask),
    Series(SeriesTask),
    Forecast(ForecastTask),
}

/// A parsed training config, its text (with overrides and resolved paths) and its task.
pub struct RunConfig {
    pub text: String,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub task: AnyTask,
}

impl RunConfig {
    /// Reads `path`, applies `sets` ("section.key=value", the value in TOML syntax or a bare
    /// string) and builds the task (reading its data).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        Self::read(path, sets, None, None)
    }

    /// A checkpoint directory's train.toml, its task built to evaluate the checkpoint: inputs
    /// are made as its meta file (image.json, audio.json) says, and the training data is not
    /// decoded or measured again. `data` replaces the set the run validated on (see
    /// [`evaluate_checkpoint`]).
    pub fn for_checkpoint(dir: &Path, data: Option<&Path>) -> Result<Self> {
        Self::read(&dir.join("train.toml"), &[], Some(dir), data)
    }

    /// Every error names the config file: the task's own checks name their section (`[task]`)
    /// and a data file's errors that file, so the config is put in front of any message that
    /// does not name it already.
    fn read(path: &Path, sets: &[String], checkpoint: Option<&Path>, data: Option<&Path>) -> Result<Self> {
        let source = path.display().to_string();
        Self::read_named(path, sets, checkpoint, data).map_err(|e| {
            let message = e.to_string();
            if message.contains(&source) {
                e
            } else {
                Error::Config { path: source, message }
            }
        })
    }

    fn read_named(path: &Path, sets: &[String], checkpoint: Option<&Path>, data: Option<&Path>) -> Result<Self> {
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
        if let Some(data) = data {
            evaluate_on(&mut table, data)?;
        }
        // Data paths are relative to the config file; the saved config holds them resolved.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(toml::Value::Table(task)) = table.get_mut("task") {
            for key in ["data", "tokenizer", "train", "validation", "validation_list", "test"] {
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
        }
        let text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        let file: RunFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let seed = file.train.seed;
        let task = match file.task {
            TaskSection::ImageClassification(data) => {
                let trained = checkpoint.map(read_meta).transpose()?;
                AnyTask::Image(data.task(file.model, file.backbone, &source, seed, trained)?)
            }
            TaskSection::AudioClassification(data) => {
                let trained = checkpoint.map(read_meta).transpose()?;
                AnyTask::Audio(data.task(file.model, file.backbone, &source, seed, trained)?)
            }
            TaskSection::SeriesClassification(data) => {
                let trained = checkpoint.map(SeriesMeta::read).transpose()?;
                AnyTask::Series(data.task(file.model, file.backbone, &source, seed, trained)?)
            }
            TaskSection::Forecasting(data) => AnyTask::Forecast(data.task(file.model, file.backbone, &source)?),
            lm => AnyTask::Lm(lm_task(lm, file.model, file.backbone, &source, seed)?),
        };
        Ok(Self { text, train: file.train, optim: file.optim, task })
    }
}

/// A language-model task: `[model]` and `[backbone]` as in `models/*.toml`.
fn lm_task(
    section: TaskSection,
    model: toml::Table,
    backbone: Option<toml::Table>,
    source: &str,
    seed: u64,
) -> Result<LmTask> {
    let err = |message: String| Error::Config { path: source.to_string(), message };
    let backbone = backbone.ok_or_else(|| err("missing [backbone] section".into()))?;
    let model_text = toml::to_string(&toml::Table::from_iter([
        ("model".to_string(), toml::Value::Table(model)),
        ("backbone".to_string(), toml::Value::Table(backbone)),
    ]))
    .map_err(|e| err(e.to_string()))?;
    let config = mamba_nn::LmConfig::from_toml(&model_text, source)?;
    let vocab = config.vocab_size;
    let (source_kind, label_smoothing) = match section {
        TaskSection::SelectiveCopying { seq_len, tokens, train_examples, validation_examples, label_smoothing } => {
            if vocab < 3 || tokens == 0 || tokens > seq_len {
                return Err(err(format!(
                    "[task] selective copying needs vocab_size >= 3 and 1 <= tokens <= seq_len (vocab {vocab}, tokens {tokens}, seq_len {seq_len})"
                )));
            }
            let examples = [train_examples, validation_examples];
            (Source::SelectiveCopying { seq_len, tokens, vocab, examples }, label_smoothing)
        }
        TaskSection::InductionHeads { seq_len, train_examples, validation_examples, label_smoothing } => {
            if vocab < 3 || seq_len < 3 {
                return Err(err("[task] induction heads needs vocab_size >= 3 and seq_len >= 3".into()));
            }
            let examples = [train_examples, validation_examples];
            (Source::InductionHeads { seq_len, vocab, examples }, label_smoothing)
        }
        TaskSection::Text { data, tokenizer, context, validation_fraction, label_smoothing } => {
            let t = TextData::load(&data, &tokenizer, context, validation_fraction)?;
            (Source::Text(t), label_smoothing)
        }
        TaskSection::ImageClassification(_)
        | TaskSection::AudioClassification(_)
        | TaskSection::SeriesClassification(_)
        | TaskSection::Forecasting(_) => return Err(err("[task] this task has no language model".into())),
    };
    Ok(LmTask { config, source: source_kind, label_smoothing, seed })
}

/// `mamba train`: trains the config at `path` into `out`, on `device`.
pub fn train_from_config(path: &Path, out: &Path, resume: bool, sets: &[String], device: &Device) -> Result<Summary> {
    let run = RunConfig::load(path, sets)?;
    let (train_config, optim) = (run.train.clone(), run.optim.clone());
    match run.task {
        AnyTask::Lm(t) => train(Arc::new(t), &train_config, &optim, &run.text, out, resume, device),
        AnyTask::Image(t) => train(Arc::new(t), &train_config, &optim, &run.text, out, resume, device),
        AnyTask::Audio(t) => train(Arc::new(t), &train_config, &optim, &run.text, out, resume, device),
        AnyTask::Series(t) => train(Arc::new(t), &train_config, &optim, &run.text, out, resume, device),
        AnyTask::Forecast(t) => train(Arc::new(t), &train_config, &optim, &run.text, out, resume, device),
    }
}

/// What `mamba eval` reports: the validation metrics; for classifiers, the class names and the
/// confusion matrix (`[true][predicted]`); for forecasters, the test split's errors of the model
/// and of the baselines, and its number of windows.
pub struct Evaluation {
    pub metrics: Metrics,
    pub confusion: Option<(Vec<String>, Vec<Vec<usize>>)>,
    pub test: Option<(usize, Vec<(String, Errors)>)>,
}

/// `mamba eval`: the validation metrics of a checkpoint directory (its train.toml and weights),
/// the model and batches on `device`; with `data`, the metrics on that ImageFolder or AudioFolder
/// root (image and audio classifiers) or archive file (series classifiers) instead.
pub fn evaluate_checkpoint(dir: &Path, data: Option<&Path>, device: &Device) -> Result<Evaluation> {
    let run = RunConfig::for_checkpoint(dir, data)?;
    let vb = checkpoint_weights(dir, device)?;
    Ok(match &run.task {
        AnyTask::Lm(t) => {
            Evaluation { metrics: evaluate(t, &t.build_model(vb)?, device)?, confusion: None, test: None }
        }
        AnyTask::Forecast(t) => {
            let model = t.build_model(vb)?;
            let test = Some(t.test(&model, device)?);
            Evaluation { metrics: evaluate(t, &model, device)?, confusion: None, test }
        }
        AnyTask::Image(t) => classifier_evaluation(t, vb, device)?,
        AnyTask::Audio(t) => classifier_evaluation(t, vb, device)?,
        AnyTask::Series(t) => classifier_evaluation(t, vb, device)?,
    })
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

/// Points a saved run's `[task]` at `data` for its evaluation: the held-out key of the task kinds
/// whose evaluated set is one folder or file.
fn evaluate_on(table: &mut toml::Table, data: &Path) -> Result<()> {
    let err = |message: String| Error::Config { path: data.display().to_string(), message };
    let Some(toml::Value::Table(task)) = table.get_mut("task") else {
        return Err(err("--data: the checkpoint's train.toml has no [task] section".into()));
    };
    let kind = task.get("kind").and_then(toml::Value::as_str).unwrap_or_default();
    let key = match kind {
        "image_classification" => "validation",
        "series_classification" => "test",
        "audio_classification" => {
            // Every clip of the folder is evaluated.
            task.remove("held_out");
            task.remove("validation_list");
            task.insert("validation_fraction".into(), toml::Value::Float(1.0));
            "data"
        }
        _ => {
            return Err(err(format!(
                "--data evaluates image, audio and series classification checkpoints (an ImageFolder root, an AudioFolder root, a .ts or .tsv file); this one is {kind:?}"
            )))
        }
    };
    let path = data.canonicalize().map_err(|e| Error::Io { path: data.display().to_string(), source: e })?;
    task.insert(key.into(), toml::Value::String(path.display().to_string()));
    Ok(())
}

fn classifier_evaluation<E: Examples>(
    task: &Classify<E>,
    vb: candle_nn::VarBuilder,
    device: &Device,
) -> Result<Evaluation> {
    let (metrics, matrix) = task.evaluate_with_confusion(&task.build_model(vb)?, device)?;
    Ok(Evaluation { metrics, confusion: Some((task.examples.classes().to_vec(), matrix)), test: None })
}

/// A checkpoint's model.safetensors as a VarBuilder (f32) that puts each tensor on `device`.
pub fn checkpoint_weights(dir: &Path, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    Ok(candle_nn::VarBuilder::from_tensors(checkpoint_tensors(dir)?, candle_core::DType::F32, device))
}

/// A checkpoint's model.safetensors by name (CPU).
pub fn checkpoint_tensors(dir: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: weights.display().to_string(), message: e.to_string() })
}
