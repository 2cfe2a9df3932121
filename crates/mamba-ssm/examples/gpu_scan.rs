//! The scans on an NVIDIA GPU (feature `cuda`): selective scan forward, forward + backward, the
//! causal conv, and Mamba-2's SSD chunked scan, at the sizes, f32 and bf16.
//! The selective scan's forward is compared with the memory-bandwidth limit: it must read u and
//! delta and write y (B and C are shared by every channel and stay in cache), so its least time
//! is those bytes over the GPU's bandwidth.
//!
//!     cargo run --release -p mamba-ssm --features cuda --example gpu_scan [-- PEAK_GB_PER_S]
//!
//! Default peak: 4800 GB/s (H200 SXM); 3350 for H100 SXM, 2039 for A100 80GB SXM.

use candle_core::{DType, Device, Tensor, Var};
use mamba_ssm::{causal_conv1d, selective_scan, ssd_chunk_scan, ScanParams, SsdParams};
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Median seconds of `f` over `runs` runs after two warm-ups, the device synchronised around each.
fn time(dev: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut times = vec![];
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn main() -> Result<()> {
    let peak_gb_s: f64 = std::env::args().nth(1).map_or(Ok(4800.0), |a| a.parse())?;
    let dev = Device::new_cuda(0)?;
    let (batch, dim, state, len) = (8, 1536, 16, 4096);
    let rand = |shape: &[usize], lo: f32, hi: f32| Tensor::rand(lo, hi, shape, &dev);
    println!("| kernel | dtype | shape | median time | note |");
    println!("|---|---|---|---|---|");
    for dtype in [DType::F32, DType::BF16] {
        let vars: Vec<Var> = [
            rand(&[batch, dim, len], -1.0, 1.0)?,
            rand(&[batch, dim, len], -3.0, 0.0)?,
            rand(&[dim, state], -4.0, -0.5)?,
            rand(&[batch, state, len], -1.0, 1.0)?,
            rand(&[batch, state, len], -1.0, 1.0)?,
            rand(&[dim], -1.0, 1.0)?,
            rand(&[dim], -1.0, 0.0)?,
        ]
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
        .collect::<candle_core::Result<_>>()?;
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let p = ScanParams { d: Some(t[5]), z: None, delta_bias: Some(t[6]), delta_softplus: true };
        let shape = format!("batch {batch}, dim {dim}, state {state}, len {len}");
        // Inference: detached inputs, so no states are kept for a backward pass.
        let detached: Vec<Tensor> = t.iter().map(|x| x.detach()).collect();
        let fwd = time(&dev, 20, || {
            let d = &detached;
            let p = ScanParams { d: Some(&d[5]), z: None, delta_bias: Some(&d[6]), delta_softplus: true };
            selective_scan(&d[0], &d[1], &d[2], &d[3], &d[4], &p, None)?;
            Ok(())
        })?;
        let bytes = 3.0 * (batch * dim * len) as f64 * dtype.size_in_bytes() as f64;
        let floor = bytes / (peak_gb_s * 1e9);
        println!(
            "| selective scan forward | {dtype:?} | {shape} | {:.3} ms | {:.0} GB/s moved; {:.2}x the bandwidth floor ({:.3} ms at {peak_gb_s} GB/s) |",
            fwd * 1e3,
            bytes / fwd / 1e9,
            fwd / floor,
            floor * 1e3
        );
        let train = time(&dev, 10, || {
            let out = selective_scan(t[0], t[1], t[2], t[3], t[4], &p, None)?;
            out.y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            Ok(())
        })?;
        println!("| selective scan forward + backward | {dtype:?} | {shape} | {:.3} ms | |", train * 1e3);
        let (x, w, b) = (
            detached[0].transpose(1, 2)?.contiguous()?.transpose(1, 2)?,
            rand(&[dim, 4], -1.0, 1.0)?.to_dtype(dtype)?,
            detached[5].clone(),
        );
        let conv = time(&dev, 20, || {
            causal_conv1d(&x, &w, Some(&b), true)?;
            Ok(())
        })?;
        println!("| causal conv1d forward (width 4, SiLU) | {dtype:?} | batch {batch}, channels {dim}, len {len} | {:.3} ms | |", conv * 1e3);
    }
    // Mamba-2's SSD at the same width: 24 heads of 64 channels, state 128 (kernels/ssd.cu).
    let (heads, headdim, ssd_state, groups) = (24, 64, 128, 1);
    let shape = format!("batch {batch}, len {len}, heads {heads} x {headdim}, state {ssd_state}");
    for dtype in [DType::F32, DType::BF16] {
        let vars: Vec<Var> = [
            rand(&[batch, len, heads, headdim], -1.0, 1.0)?,
            rand(&[batch, len, heads], -3.0, 0.0)?,
            rand(&[heads], -4.0, -0.5)?,
            rand(&[batch, len, groups, ssd_state], -1.0, 1.0)?,
            rand(&[batch, len, groups, ssd_state], -1.0, 1.0)?,
        ]
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
        .collect::<candle_core::Result<_>>()?;
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let detached: Vec<Tensor> = t.iter().map(|x| x.detach()).collect();
        let p = SsdParams { dt_softplus: true, ..Default::default() };
        let fwd = time(&dev, 10, || {
            let d = &detached;
            ssd_chunk_scan(&d[0], &d[1], &d[2], &d[3], &d[4], 256, &p, None)?;
            Ok(())
        })?;
        println!("| SSD chunked scan forward | {dtype:?} | {shape} | {:.3} ms | |", fwd * 1e3);
        let train = time(&dev, 5, || {
            let out = ssd_chunk_scan(t[0], t[1], t[2], t[3], t[4], 256, &p, None)?;
            out.y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            Ok(())
        })?;
        println!("| SSD chunked scan forward + backward | {dtype:?} | {shape} | {:.3} ms | |", train * 1e3);
    }
    Ok(())
}
