//! Examples per second of time-series models on this machine, from their training configs and
//! data: inference (forward over the validation split) and training (forward + backward over
//! the training split), reference initialisation, at each config's batch size. An example is a
//! window (forecasting: all its variables) or a case (classification).
//!
//!     cargo run --release -p mamba-series --example series_throughput [-- CONFIG.toml ...]
//!
//! Default: every config in models/series.

use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;
use mamba_series::{ForecastTask, Forecasting, SeriesClassification, SeriesTask};
use mamba_train::{Split, Task, TaskKinds};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// (parameters, inference examples/s, training examples/s).
fn measure<T: Task>(task: &T, batch: usize) -> Result<(usize, f64, f64)> {
    let vars: Vec<(String, Var)> = task
        .init_params(0)?
        .into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
        .collect::<candle_core::Result<_>>()?;
    let params = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = task.build_model(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
    let rate = |split: Split, train: bool| -> Result<f64> {
        let n = task.len(split);
        let start = Instant::now();
        for b in (0..n).collect::<Vec<_>>().chunks(batch) {
            let (loss, _) = task.forward(&model, &task.batch(split, 0, b, &Device::Cpu)?, train)?;
            if train {
                loss.backward()?;
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    Ok((params, rate(Split::Validation, false)?, rate(Split::Train, true)?))
}

/// The allocator of the `mamba` binary, whose training these numbers stand for.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let mut paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/series");
        paths = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
        paths.sort();
    }
    println!("| config | parameters | batch | inference examples/s | training examples/s |");
    println!("|---|---|---|---|---|");
    for path in paths {
        let run = TaskKinds(&[&Forecasting, &SeriesClassification]).load(&path, &[])?;
        let batch = run.train.batch_size;
        let task = run.task.as_any();
        let (params, infer, train) = match (task.downcast_ref::<ForecastTask>(), task.downcast_ref::<SeriesTask>()) {
            (Some(t), _) => measure(t, batch)?,
            (_, Some(t)) => measure(t, batch)?,
            _ => return Err(format!("{}: not a time-series task", path.display()).into()),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!("| {name} | {:.1} k | {batch} | {infer:.0} | {train:.0} |", params as f64 / 1e3);
    }
    Ok(())
}
