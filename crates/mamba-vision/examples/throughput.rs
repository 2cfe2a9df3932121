//! Images per second of the vision models on this machine: inference (forward, no gradients)
//! and training (forward + backward) at the models' own image size, random weights (the
//! reference initialisation) and random images.
//!
//!     cargo run --release -p mamba-vision --example throughput [-- CONFIG.toml BATCH]
//!
//! Without arguments: models/vision/vim-tiny.toml and vmamba-tiny.toml (224 x 224, 1000
//! classes) at batch 8, and the MNIST model of models/vision/mnist-vim.toml (28 x 28) at batch 64.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use mamba_vision::{ImageShape, Size2d, VisionConfig, VisionModel};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Timed batches per measurement.
const REPS: usize = 9;

/// The allocator of the `mamba` binary, whose training these numbers stand for.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vision");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: Vec<(PathBuf, usize)> = match args.as_slice() {
        [config, batch] => vec![(PathBuf::from(config), batch.parse()?)],
        _ => {
            vec![(root.join("vim-tiny.toml"), 8), (root.join("vmamba-tiny.toml"), 8), (root.join("mnist-vim.toml"), 64)]
        }
    };
    println!("| model | parameters | image | batch | inference images/s | training images/s |");
    println!("|---|---|---|---|---|---|");
    for (path, batch) in runs {
        let config = load(&path)?;
        let shape = config.shape();
        let params = config.init_params(0)?;
        let vars: Vec<(String, Var)> =
            params.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<candle_core::Result<_>>()?;
        let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model = VisionModel::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &config)?;
        let s = shape.image_size;
        let images = Tensor::randn(0f32, 1.0, (batch, shape.channels, s.height, s.width), &Device::Cpu)?;
        // The median of several timed batches: this shared machine's noise is one-sided.
        let time = |f: &dyn Fn() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
            f()?; // warm-up
            let mut secs = (0..REPS)
                .map(|_| {
                    let start = Instant::now();
                    f().map(|_| start.elapsed().as_secs_f64())
                })
                .collect::<Result<Vec<_>, _>>()?;
            secs.sort_by(f64::total_cmp);
            Ok(batch as f64 / secs[REPS / 2])
        };
        let infer = time(&|| {
            model.forward(&images, None)?;
            Ok(())
        })?;
        let train = time(&|| {
            let loss = model.forward(&images, None)?.sqr()?.mean_all()?;
            loss.backward()?;
            Ok(())
        })?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "| {name} | {:.2} M | {s} x {} | {batch} | {infer:.1} | {train:.1} |",
            config.num_params() as f64 / 1e6,
            shape.channels
        );
    }
    Ok(())
}

/// A model file, or a training config whose data would fix the image shape (MNIST: 28 x 28, one
/// channel, ten classes).
fn load(path: &Path) -> Result<VisionConfig, Box<dyn std::error::Error>> {
    let table: toml::Table = std::fs::read_to_string(path)?.parse()?;
    let data = table.contains_key("task").then_some(ImageShape {
        image_size: Size2d::square(28),
        channels: 1,
        num_classes: 10,
    });
    Ok(VisionConfig::from_file_table(table, &path.display().to_string(), data)?)
}
