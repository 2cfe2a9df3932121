//! The selective scan at issue 16's shape (batch 1, dim 1536, state 16, len 4096; D, z, delta
//! bias and softplus), timed as the fastest of many runs: on a shared machine the noise only ever
//! adds time, so the minimum tells two builds apart where criterion's median does not.
//!
//! It runs on the `mamba` binary's allocator; set `MIMALLOC_PURGE_DELAY=-1`, as the binary does,
//! to keep freed buffers mapped (otherwise each run pays for fresh pages, as glibc's malloc makes
//! criterion's benches do).
//!
//!     MIMALLOC_PURGE_DELAY=-1 cargo run --release -p mamba-ssm --example scan_timing -- [runs]

use candle_core::{Device, Tensor, Var};
use mamba_ssm::{selective_scan, ScanParams};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let (dim, state, len) = (1536, 16, 4096);
    let rand = |shape: &[usize], lo: f64, hi: f64| Tensor::rand(lo as f32, hi as f32, shape, &Device::Cpu);
    let vars = [
        rand(&[1, dim, len], -1.0, 1.0)?,
        rand(&[1, dim, len], -3.0, 0.0)?,
        rand(&[dim, state], -4.0, -0.5)?,
        rand(&[1, state, len], -1.0, 1.0)?,
        rand(&[1, state, len], -1.0, 1.0)?,
        rand(&[dim], -1.0, 1.0)?,
        rand(&[1, dim, len], -2.0, 2.0)?,
        rand(&[dim], -1.0, 0.0)?,
    ]
    .map(|t| Var::from_tensor(&t).unwrap());
    let run = |train: bool| -> anyhow::Result<Duration> {
        let t: Vec<Tensor> =
            vars.iter().map(|v| if train { v.as_tensor().clone() } else { v.as_detached_tensor() }).collect();
        let p = ScanParams { d: Some(&t[5]), z: Some(&t[6]), delta_bias: Some(&t[7]), delta_softplus: true };
        let start = Instant::now();
        let y = selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &p, None)?.y;
        if train {
            y.sum_all()?.backward()?;
        }
        Ok(start.elapsed())
    };
    let fastest = |train: bool| -> anyhow::Result<Duration> {
        run(train)?;
        (0..runs).map(|_| run(train)).try_fold(Duration::MAX, |m, d| Ok(m.min(d?)))
    };
    let (fwd, fwd_bwd) = (fastest(false)?, fastest(true)?);
    println!(
        "forward {:.2} ms, forward + backward {:.2} ms ({:.2}x the forward), fastest of {runs}",
        fwd.as_secs_f64() * 1e3,
        fwd_bwd.as_secs_f64() * 1e3,
        fwd_bwd.as_secs_f64() / fwd.as_secs_f64()
    );
    Ok(())
}
