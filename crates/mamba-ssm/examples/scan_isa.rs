//! The selective scan and the SSD on each instruction set this CPU has, side by side in one run:
//! `cargo run --release -p mamba-ssm --example scan_isa [-- REPS]`.
//!
//! Selective scan: batch 1, dim 1536, state 16, len 4096, with D, z, delta bias and softplus (a
//! Mamba block's scan), forward on plain tensors and forward + backward on `Var`s. Median of REPS
//! (default 7) after one warm-up.

use candle_core::{Device, Tensor, Var};
use mamba_ssm::{selective_scan, set_cpu_isa, CpuIsa, ScanParams};
use std::time::Instant;

fn rand(shape: &[usize], lo: f32, hi: f32) -> Tensor {
    Tensor::rand(lo, hi, shape, &Device::Cpu).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let reps: usize = std::env::args().nth(1).map_or(7, |s| s.parse().expect("REPS: a count"));
    let (dim, state, len) = (1536, 16, 4096);
    let shapes: [(&[usize], f32, f32); 8] = [
        (&[1, dim, len], -1.0, 1.0),
        (&[1, dim, len], -3.0, 0.0),
        (&[dim, state], -4.0, -0.5),
        (&[1, state, len], -1.0, 1.0),
        (&[1, state, len], -1.0, 1.0),
        (&[dim], -1.0, 1.0),
        (&[1, dim, len], -2.0, 2.0),
        (&[dim], -1.0, 0.0),
    ];
    let vars: Vec<Var> = shapes.iter().map(|&(s, lo, hi)| Var::from_tensor(&rand(s, lo, hi)).unwrap()).collect();
    let run = |train: bool| {
        let t: Vec<Tensor> =
            vars.iter().map(|v| if train { v.as_tensor().clone() } else { v.as_detached_tensor() }).collect();
        let p = ScanParams { d: Some(&t[5]), z: Some(&t[6]), delta_bias: Some(&t[7]), delta_softplus: true };
        let y = selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &p, None).unwrap().y;
        if train {
            y.sum_all().unwrap().backward().unwrap();
        }
    };
    let best = CpuIsa::detect();
    println!("selective scan, batch 1, dim {dim}, state {state}, len {len}; best instruction set here: {best:?}");
    println!("| instruction set | forward | forward + backward | (fwd + bwd) / fwd | G state updates/s (fwd) |");
    println!("|---|---|---|---|---|");
    let mut forward_by_isa = Vec::new();
    for isa in [CpuIsa::Avx2, CpuIsa::Avx512].into_iter().filter(|&i| i <= best) {
        assert_eq!(set_cpu_isa(isa), isa);
        let fwd = time(reps, || run(false));
        let both = time(reps, || run(true));
        let updates = (dim * state * len) as f64 / fwd / 1e9;
        println!("| {isa:?} | {:.1} ms | {:.1} ms | {:.2} | {updates:.2} |", fwd * 1e3, both * 1e3, both / fwd);
        forward_by_isa.push((isa, fwd));
    }
    if let [(_, avx2), (_, avx512)] = forward_by_isa[..] {
        println!("AVX-512 forward speed-up over AVX2: {:.2}x", avx2 / avx512);
    }
}
