//! A Mamba-1 block against a Mamba-2 block of the same width, on this machine: the block of
//! mamba-130m and of mamba2-130m (d_model 768, d_inner 1536; Mamba-2: 24 heads of 64, state
//! 128), reference initialisation, f32, the rayon threads of the environment.
//!
//! - prefill: the block's forward pass over one 512-token prompt;
//! - training: forward and backward (of the output's sum) over a batch of 8 x 256 tokens.
//!
//! Each timing is the median of 9 after one warm-up run; the two kinds alternate, so that a
//! slow spell of a shared machine hits both.
//!
//!     cargo run --release -p mamba-nn --example mixer_speed

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use mamba_nn::{init_tensors, Block, InitConfig, LmConfig};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The allocator of the `mamba` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 9;

struct Case {
    name: &'static str,
    block: Block,
    weights: Vec<Var>,
}

fn load(name: &'static str, file: &str) -> Result<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(file);
    let cfg = LmConfig::from_toml_file(&path)?.backbone;
    let vars = init_tensors(&Block::params(&cfg), &InitConfig::default(), 0)?
        .into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let weights = vars.into_values().collect();
    let block = Block::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg)?;
    Ok(Case { name, block, weights })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let cases = [load("Mamba-1", "mamba-130m.toml")?, load("Mamba-2", "mamba2-130m.toml")?];
    let prompt = Tensor::randn(0f32, 1.0, (1, 512, 768), &Device::Cpu)?;
    let batch = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 256, 768), &Device::Cpu)?)?;
    let prefill = |c: &Case| -> Result<()> {
        c.block.forward(&prompt)?;
        Ok(())
    };
    let train = |c: &Case| -> Result<()> {
        let grads = c.block.forward(batch.as_tensor())?.0.sum_all()?.backward()?;
        assert!(c.weights.iter().all(|w| grads.get(w).is_some()), "every weight gets a gradient");
        Ok(())
    };
    println!("| block | prefill, 512 tokens (ms) | training step, 8 x 256 tokens (ms) |");
    println!("|---|---:|---:|");
    let mut times = vec![(Vec::new(), Vec::new()); cases.len()];
    for run in 0..=RUNS {
        for (c, (p, t)) in cases.iter().zip(times.iter_mut()) {
            let start = Instant::now();
            prefill(c)?;
            let mid = Instant::now();
            train(c)?;
            if run > 0 {
                p.push((mid - start).as_secs_f64() * 1e3);
                t.push(mid.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for (c, (p, t)) in cases.iter().zip(times) {
        println!("| {} | {:.1} | {:.1} |", c.name, median(p), median(t));
    }
    Ok(())
}
