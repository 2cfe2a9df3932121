//! The training loop: seeded batches prefetched on a thread, gradient accumulation, AdamW with the
//! schedule, checkpoints that a killed run resumes from exactly, metrics.jsonl and a progress bar.
//!
//! Every random choice derives from (seed, epoch, example index), so the trainer state needs only
//! positions (epoch, batch within the epoch, optimizer step) for a resumed run to see the same
//! batches in the same order as an uninterrupted one.

use crate::checkpoint::{io, read_json};
use crate::optim::{learning_rate, named_grads, AdamW, OptimConfig, Params};
use crate::task::{Metrics, Split, Task};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    #[serde(default = "one")]
    pub accumulate: usize,
    #[serde(default)]
    pub seed: u64,
    /// Optimizer steps between lines of metrics.jsonl.
    #[serde(default = "ten")]
    pub log_every: usize,
    /// Optimizer steps between checkpoints (`last`); every epoch ends with one too.
    #[serde(default = "hundred")]
    pub checkpoint_every: usize,
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}
fn hundred() -> usize {
    100
}

/// Where a run is; written with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub epoch: usize,
    /// Micro-batches of `epoch` already done.
    pub batch: usize,
    /// Optimizer steps done.
    pub step: usize,
    /// The best validation value of the task's best metric so far.
    pub best: Option<f64>,
}

/// What `train` returns: the last validation metrics and where the checkpoints are.
pub struct Summary {
    pub validation: Metrics,
    pub last: PathBuf,
    pub best: PathBuf,
}

/// Variables on `device` from named tensors (copies).
pub fn to_params(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Params> {
    tensors.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?))).collect()
}

/// A VarBuilder over the variables themselves, which live on `device`: the model built from it
/// trains them. (On another device it would build from copies, and train nothing.)
pub fn var_builder(params: &Params, device: &Device) -> VarBuilder<'static> {
    let map = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    VarBuilder::from_tensors(map, DType::F32, device)
}

/// Trains `task` as `train` and `optim` say, writing checkpoints, metrics.jsonl and the curves
/// under `out`. `config_text` is saved with every checkpoint. With `resume`, continues from
/// `out/last`. The parameters, the optimizer state, the batches and the computation are on
/// `device`; checkpoints are plain safetensors files, which load on any device.
pub fn train<T: Task>(
    task: Arc<T>,
    train: &TrainConfig,
    optim: &OptimConfig,
    config_text: &str,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<Summary> {
    if train.batch_size == 0 || train.accumulate == 0 || train.log_every == 0 || train.checkpoint_every == 0 {
        return Err(Error::Config {
            path: "[train]".into(),
            message: "batch_size, accumulate, log_every and checkpoint_every must be at least 1".into(),
        });
    }
    let n_train = task.len(Split::Train);
    if n_train == 0 {
        return Err(Error::Config { path: "[task]".into(), message: "the training split is empty".into() });
    }
    let declared = task.params();
    let (params, mut opt, mut state) = if resume {
        let dir = last_checkpoint(out)?;
        let state: TrainerState = read_json(&dir.join("trainer.json"))?;
        let params = to_params(read_safetensors(&dir.join("model.safetensors"), device)?, device)?;
        let mut opt = AdamW::new(optim.clone(), &params, &declared)?;
        let opt_path = dir.join("optimizer.safetensors");
        opt.load_state(read_safetensors(&opt_path, device)?, state.step, &opt_path.display().to_string())?;
        truncate_metrics(&out.join("metrics.jsonl"), state.step)?;
        (params, opt, state)
    } else {
        if out.join("last").exists() {
            return Err(Error::Config {
                path: out.display().to_string(),
                message: "holds a run already: pass --resume to continue it, or another --out".into(),
            });
        }
        std::fs::create_dir_all(out).map_err(io(out))?;
        std::fs::write(out.join("metrics.jsonl"), "").map_err(io(out))?;
        let params = to_params(task.init_params(train.seed)?, device)?;
        let opt = AdamW::new(optim.clone(), &params, &declared)?;
        (params, opt, TrainerState::default())
    };
    let model = task.build_model(var_builder(&params, device))?;
    let batches_per_epoch = n_train.div_ceil(train.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(train.accumulate);
    let total_steps = steps_per_epoch * train.epochs;
    let mut log = MetricsLog::open(&out.join("metrics.jsonl"))?;
    let mut validation = Metrics::default();
    let (best_name, higher_is_better) = task.best_metric();

    while state.epoch < train.epochs {
        let epoch = state.epoch;
        let batches = epoch_batches(n_train, train.batch_size, train.seed, epoch);
        let bar = progress_bar(batches.len() as u64, epoch, train.epochs);
        bar.set_position(state.batch as u64);
        let mut window = Metrics::default();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut in_step = 0;
        let mut timer = (Instant::now(), 0usize);
        let first = state.batch;
        let prefetch = prefetch(Arc::clone(&task), Split::Train, epoch, batches[first..].to_vec(), device.clone());
        for (b, batch) in (first..batches.len()).zip(prefetch) {
            let (loss, metrics) = task.forward(&model, &batch?, true)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Diverged { step: state.step, epoch, batch: b, value, last: out.join("last") });
            }
            let store = loss.backward()?;
            for (name, g) in named_grads(&params, &store) {
                let sum = match grads.remove(&name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                grads.insert(name, sum);
            }
            window.merge(&metrics);
            timer.1 += batches[b].len();
            in_step += 1;
            state.batch = b + 1;
            bar.inc(1);
            if in_step < train.accumulate && b + 1 < batches.len() {
                continue;
            }
            let averaged = match in_step {
                1 => std::mem::take(&mut grads),
                n => grads.drain().map(|(name, g)| Ok((name, (g / n as f64)?))).collect::<Result<HashMap<_, _>>>()?,
            };
            let lr = learning_rate(optim, state.step, total_steps);
            let norm = opt.update(&params, &averaged, lr)?;
            state.step += 1;
            in_step = 0;
            if state.step % train.log_every == 0 {
                let per_s = timer.1 as f64 / timer.0.elapsed().as_secs_f64();
                let mut line = serde_json::json!({
                    "step": state.step, "epoch": epoch, "split": "train", "lr": lr, "grad_norm": norm,
                    "examples_per_s": per_s,
                });
                for (k, v) in window.means() {
                    line[k] = v.into();
                }
                bar.set_message(format!("loss {:.4}, {per_s:.0} ex/s", window.mean("loss").unwrap_or(f64::NAN)));
                log.write(&line)?;
                window = Metrics::default();
                timer = (Instant::now(), 0);
            }
            if state.step % train.checkpoint_every == 0 && state.batch < batches.len() {
                save_checkpoint(&out.join("last"), &params, &opt, &state, config_text, task.as_ref(), false)?;
            }
        }
        bar.finish_and_clear();
        // With a moving average, the averaged weights are the ones validated and kept as `best`.
        validation = match opt.ema() {
            Some(ema) => {
                let vb = VarBuilder::from_tensors(ema.clone(), DType::F32, device);
                evaluate(task.as_ref(), &task.build_model(vb)?, device)?
            }
            None => evaluate(task.as_ref(), &model, device)?,
        };
        let mut line = serde_json::json!({ "step": state.step, "epoch": epoch, "split": "validation" });
        for (k, v) in validation.means() {
            line[k] = v.into();
        }
        log.write(&line)?;
        eprintln!("epoch {}/{}: validation {}", epoch + 1, train.epochs, summary_line(&validation));
        let value = validation.mean(best_name).unwrap_or(f64::NAN);
        let better = match state.best {
            None => value.is_finite(),
            Some(best) => (higher_is_better && value > best) || (!higher_is_better && value < best),
        };
        state.epoch += 1;
        state.batch = 0;
        if better {
            state.best = Some(value);
            save_checkpoint(&out.join("best"), &params, &opt, &state, config_text, task.as_ref(), true)?;
        }
        save_checkpoint(&out.join("last"), &params, &opt, &state, config_text, task.as_ref(), false)?;
    }
    if let Err(e) = crate::plot::plot_metrics(&out.join("metrics.jsonl"), &out.join("curves.svg")) {
        eprintln!("warning: no curves: {e}");
    }
    Ok(Summary { validation, last: out.join("last"), best: out.join("best") })
}

/// The validation split, in order, without gradients, with batches on `device` (the model's).
pub fn evaluate<T: Task>(task: &T, model: &T::Model, device: &Device) -> Result<Metrics> {
    let n = task.len(Split::Validation);
    let mut total = Metrics::default();
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(64) {
        let batch = task.batch(Split::Validation, 0, chunk, device)?;
        let (_, m) = task.forward(model, &batch, false)?;
        total.merge(&m);
    }
    Ok(total)
}

pub fn summary_line(m: &Metrics) -> String {
    m.means().iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(", ")
}

/// Epoch `epoch`'s batches: the training indices shuffled by (seed, epoch), cut into batches.
fn epoch_batches(n: usize, batch_size: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    order.chunks(batch_size).map(|c| c.to_vec()).collect()
}

/// Builds batches on `device` on a thread, two ahead of the loop.
fn prefetch<T: Task>(
    task: Arc<T>,
    split: Split,
    epoch: usize,
    batches: Vec<Vec<usize>>,
    device: Device,
) -> impl Iterator<Item = Result<T::Batch>> {
    let (tx, rx) = mpsc::sync_channel(2);
    std::thread::spawn(move || {
        for indices in batches {
            if tx.send(task.batch(split, epoch, &indices, &device)).is_err() {
                return; // the loop stopped
            }
        }
    });
    rx.into_iter()
}

fn progress_bar(len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    bar
}

fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::Checkpoint { path: path.display().to_string(), message: e.to_string() })
}

/// `out/last`, or the previous one if a crash fell between the two renames of `save_checkpoint`.
fn last_checkpoint(out: &Path) -> Result<PathBuf> {
    for dir in [out.join("last"), out.join(".last.old")] {
        if dir.join("trainer.json").exists() {
            return Ok(dir);
        }
    }
    Err(Error::Checkpoint { path: out.join("last").display().to_string(), message: "no checkpoint to resume".into() })
}

/// Writes a checkpoint directory atomically and durably: everything into `.NAME.tmp`, each file
/// and the directory flushed to the disk, then renamed, then the parent flushed (a rename alone
/// can point at data a power cut never let reach the disk). `best` holds the moving average of
/// the weights when one is kept.
fn save_checkpoint<T: Task>(
    dir: &Path,
    params: &Params,
    opt: &AdamW,
    state: &TrainerState,
    config_text: &str,
    task: &T,
    use_ema: bool,
) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (tmp, old) = (parent.join(format!(".{name}.tmp")), parent.join(format!(".{name}.old")));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let weights: HashMap<String, Tensor> = match (use_ema, opt.ema()) {
        (true, Some(ema)) => ema.clone(),
        _ => params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(),
    };
    let save = |tensors: &HashMap<String, Tensor>, file: &str| {
        let path = tmp.join(file);
        candle_core::safetensors::save(tensors, &path)
            .map_err(|e| Error::Checkpoint { path: path.display().to_string(), message: e.to_string() })
    };
    save(&weights, "model.safetensors")?;
    save(&opt.state(), "optimizer.safetensors")?;
    let state_json = serde_json::to_string_pretty(state).expect("plain data serialises");
    let mut files = vec![("trainer.json".to_string(), state_json.into_bytes())];
    files.push(("train.toml".into(), config_text.as_bytes().to_vec()));
    files.extend(task.checkpoint_files()?);
    for (file, bytes) in files {
        let path = tmp.join(&file);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
        sync(&entry.map_err(io(&tmp))?.path())?;
    }
    sync(&tmp)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    sync(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// fsync of a file or a directory.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Appends JSON lines, flushed as they come.
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io(path))?;
        Ok(Self { file })
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(|source| Error::Io { path: "metrics.jsonl".into(), source })
    }
}

/// Drops the lines a killed run logged after the checkpoint it resumes from.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        read => read.map_err(io(path))?,
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = vec![];
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v["step"].as_u64().is_some_and(|s| s as usize <= step) => kept.push(*line),
            Ok(_) => {}
            // A run killed while it appended leaves its last line cut short.
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                let path = format!("{}:{}", path.display(), i + 1);
                return Err(Error::Checkpoint { path, message: format!("not a metrics line ({e}): {line:?}") });
            }
        }
    }
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_keeps_the_metrics_up_to_the_checkpoint_and_names_a_corrupt_line() {
        let dir = std::env::temp_dir().join(format!("mamba-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        // Steps 1 to 3, then a line cut short by a kill: kept up to step 2, the torn line dropped.
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4,\"lo").unwrap();
        truncate_metrics(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
        // A line that does not parse in the middle is corruption, not a torn write.
        std::fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let err = truncate_metrics(&path, 2).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:2") && err.contains("not json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
