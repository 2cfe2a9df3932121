//! Clips per second of an audio classifier on this machine, from its training config and data:
//! the front end alone (WAV -> normalised log-mel; over the validation clips, and over the
//! training clips with the training augmentation), inference (front end + forward, validation
//! clips) and training (augmented front end + forward + backward, training clips), reference
//! initialisation, at the config's batch size.
//!
//!     cargo run --release -p mamba-audio --example audio_throughput [-- CONFIG.toml]
//!
//! Default: models/audio/speech-words-mamba1.toml.

use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;
use mamba_audio::{AudioClassification, AudioTask};
use mamba_train::{Split, Task, TaskKinds};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The allocator of the `mamba` binary, whose training these numbers stand for.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/audio/speech-words-mamba1.toml");
    let path = std::env::args().nth(1).map(PathBuf::from).unwrap_or(default);
    let run = TaskKinds(&[&AudioClassification]).load(&path, &[])?;
    let task: &AudioTask = run.task.as_any().downcast_ref().ok_or("not an audio task")?;
    let batch = run.train.batch_size;
    let vars: Vec<(String, Var)> = task
        .init_params(0)?
        .into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
        .collect::<candle_core::Result<_>>()?;
    let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = task.build_model(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
    // Clips per second over one pass of a split (training: augmented; validation: not).
    let rate = |split: Split, f: &dyn Fn(&[usize]) -> Result<()>| {
        let n = task.len(split);
        let start = Instant::now();
        for b in (0..n).collect::<Vec<_>>().chunks(batch) {
            f(b)?;
        }
        Ok::<f64, Box<dyn std::error::Error>>(n as f64 / start.elapsed().as_secs_f64())
    };
    let (val, train) = (Split::Validation, Split::Train);
    let features = rate(val, &|b| task.batch(val, 0, b, &Device::Cpu).map(|_| ()).map_err(Into::into))?;
    let augmented = rate(train, &|b| task.batch(train, 0, b, &Device::Cpu).map(|_| ()).map_err(Into::into))?;
    let infer = rate(val, &|b| {
        task.forward(&model, &task.batch(val, 0, b, &Device::Cpu)?, false)?;
        Ok(())
    })?;
    let training = rate(train, &|b| {
        let (loss, _) = task.forward(&model, &task.batch(train, 0, b, &Device::Cpu)?, true)?;
        loss.backward()?;
        Ok(())
    })?;
    let (bins, frames) = task.examples.meta.frontend.shape();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!("| config | parameters | input | batch | front end clips/s (augmented) | inference clips/s | training clips/s |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {name} | {:.3} M | {bins} x {frames} | {batch} | {features:.0} ({augmented:.0}) | {infer:.1} | {training:.1} |",
        task.config.num_params() as f64 / 1e6
    );
    Ok(())
}
