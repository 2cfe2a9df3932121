//! The scan-pattern experiment: the same small Vision Mamba trained on the bundled MNIST subset
//! once per set of scan patterns and seed (seeds 0, 1, ...: the initialisation, the batch order
//! and the augmentation), for the same number of epochs; prints a Markdown table of held-out
//! accuracy, training images/s (mean over the run's logged steps) and inference images/s (the
//! 1,000 test images, batches of 64), each as the mean over the seeds and its spread (min-max).
//!
//!     cargo run --release -p mamba-vision --example scan_patterns [-- EPOCHS [SEEDS]]
//!
//! Runs go to runs/scan-patterns/NAME-sSEED; the config is models/vision/mnist-vim.toml.

use candle_core::Device;
use mamba_train::{Split, Task, TaskKinds};
use mamba_vision::{load_classifier, ImageClassification, ImageTask};
use std::path::Path;
use std::time::Instant;

const PATTERNS: [(&str, &str); 7] = [
    ("raster (Vim)", r#"["raster", "reverse_raster"]"#),
    ("column", r#"["column", "reverse_column"]"#),
    ("snake", r#"["snake", "reverse_snake"]"#),
    ("hilbert", r#"["hilbert", "reverse_hilbert"]"#),
    ("spiral", r#"["spiral", "reverse_spiral"]"#),
    ("window2", r#"["window2", "reverse_window2"]"#),
    ("cross-scan (VMamba's 4)", r#"["raster", "column", "reverse_raster", "reverse_column"]"#),
];

/// The allocator of the `mamba` binary, whose training these numbers stand for.
const TASKS: TaskKinds = TaskKinds(&[&ImageClassification]);

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg =
        |i: usize, default: usize| std::env::args().nth(i).map(|a| a.parse()).transpose().map(|v| v.unwrap_or(default));
    let (epochs, seeds) = (arg(1, 4)?, arg(2, 1)?);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vision/mnist-vim.toml");
    let mut rows = vec![];
    for (name, scan) in PATTERNS {
        let mut runs = vec![];
        for seed in 0..seeds {
            let short = name.split(' ').next().unwrap_or(name);
            let out = Path::new("runs/scan-patterns").join(format!("{short}-s{seed}"));
            let _ = std::fs::remove_dir_all(&out);
            let sets = [format!("model.scan={scan}"), format!("train.epochs={epochs}"), format!("train.seed={seed}")];
            let summary = TASKS.train(&config, &out, false, &sets, &Device::Cpu)?;
            let accuracy = summary.validation.mean("accuracy").unwrap_or(f64::NAN);
            let train_rate = mean_rate(&out.join("metrics.jsonl"))?;
            // Inference: the test images through the best checkpoint, decoding included.
            let run = TASKS.for_checkpoint(&summary.best, None)?;
            let (model, _) = load_classifier(&summary.best, None, &Device::Cpu)?;
            let task: &ImageTask = run.task.as_any().downcast_ref().ok_or("not an image task")?;
            let n = task.len(Split::Validation);
            let start = Instant::now();
            for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
                let batch = task.batch(Split::Validation, 0, chunk, &Device::Cpu)?;
                model.forward(&batch.inputs, None)?;
            }
            let infer_rate = n as f64 / start.elapsed().as_secs_f64();
            println!("{name}, seed {seed}: accuracy {accuracy:.4}, train {train_rate:.0} images/s, inference {infer_rate:.0} images/s");
            runs.push([accuracy * 100.0, train_rate, infer_rate]);
        }
        let cell = |i: usize, digits: usize| {
            let v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            format!("{mean:.digits$} ({lo:.digits$}-{hi:.digits$})")
        };
        rows.push(format!("| {name} | `{scan}` | {} | {} | {} |", cell(0, 1), cell(1, 0), cell(2, 0)));
    }
    println!("\n{seeds} seeds, {epochs} epochs: mean (min-max)\n");
    println!("| patterns | routes | test accuracy % | train images/s | inference images/s |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The mean of `examples_per_s` over a run's logged training steps.
fn mean_rate(metrics: &Path) -> Result<f64, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(metrics)?;
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("examples_per_s").and_then(|r| r.as_f64()))
        .collect();
    Ok(rates.iter().sum::<f64>() / rates.len().max(1) as f64)
}
