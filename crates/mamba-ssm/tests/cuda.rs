//! The CUDA kernels against the CPU kernels (which the other tests hold to the plain references
//! and PyTorch): forward outputs and every gradient, over odd shapes (length 1, lengths around
//! the kernels' chunks of 1024 (selective scan) and 64 (SSD) steps, batch > 1, B/C groups, every
//! optional part), f32 and bf16.
//! Built with `--features cuda`, run on a machine with an NVIDIA GPU (the bundle of scripts/gpu-bundle.sh).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, uniform, CPU};
use mamba_ssm::{causal_conv1d, selective_scan, ScanParams};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// The inputs of one scan case, as CPU variables.
struct Case {
    vars: Vec<Var>,
    has_d: bool,
    has_bias: bool,
    has_h0: bool,
    softplus: bool,
}

impl Case {
    fn new(batch: usize, dim: usize, len: usize, state: usize, groups: usize, all: bool, seed: u64) -> Self {
        let mut shapes: Vec<(Vec<usize>, f64, f64)> = vec![
            (vec![batch, dim, len], -1.0, 1.0),
            (vec![batch, dim, len], -3.0, 0.5),
            (vec![dim, state], -2.0, -0.2),
            (vec![batch, groups, state, len], -1.0, 1.0),
            (vec![batch, groups, state, len], -1.0, 1.0),
        ];
        if all {
            shapes.push((vec![dim], -1.0, 1.0));
            shapes.push((vec![dim], -1.0, 0.0));
            shapes.push((vec![batch, dim, state], -1.0, 1.0));
        }
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, (s, lo, hi))| Var::from_tensor(&uniform(s, seed + i as u64, *lo, *hi, DType::F32)).unwrap())
            .collect();
        Self { vars, has_d: all, has_bias: all, has_h0: all, softplus: all }
    }

    /// y and the last state (each weighted by fixed random values so every output matters) on
    /// `dev` in `dtype`, the gradients of their weighted sum with respect to every input (CPU, f32).
    fn run(&self, dev: &Device, dtype: DType) -> (Tensor, Tensor, Vec<Tensor>) {
        let t: Vec<Tensor> =
            self.vars.iter().map(|v| v.as_tensor().to_device(dev).unwrap().to_dtype(dtype).unwrap()).collect();
        let p = ScanParams {
            d: self.has_d.then_some(&t[5]),
            z: None,
            delta_bias: self.has_bias.then_some(&t[6]),
            delta_softplus: self.softplus,
        };
        let out = selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &p, self.has_h0.then_some(&t[7])).unwrap();
        let wy = uniform(out.y.dims(), 99, -1.0, 1.0, DType::F32).to_device(dev).unwrap().to_dtype(dtype).unwrap();
        let ws =
            uniform(out.last_state.dims(), 98, -1.0, 1.0, DType::F32).to_device(dev).unwrap().to_dtype(dtype).unwrap();
        let loss = ((&out.y * wy).unwrap().sum_all().unwrap() + (&out.last_state * ws).unwrap().sum_all().unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient for every input").to_device(&CPU).unwrap())
            .collect();
        let host = |t: &Tensor| t.to_device(&CPU).unwrap().to_dtype(DType::F32).unwrap();
        (host(&out.y), host(&out.last_state), g)
    }
}

const NAMES: [&str; 8] = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dh0"];

#[test]
fn the_selective_scan_on_the_gpu_matches_the_cpu_forward_and_backward() {
    let dev = gpu();
    // (batch, dim, len, state, groups, every optional part)
    let shapes = [
        (1, 3, 1, 4, 1, true),
        (2, 5, 37, 16, 1, true),
        (2, 4, 1023, 8, 2, true),
        (1, 3, 1024, 16, 1, false),
        (2, 6, 1025, 16, 3, true),
        (1, 2, 3000, 16, 1, true),
    ];
    for (i, &(batch, dim, len, state, groups, all)) in shapes.iter().enumerate() {
        let case = Case::new(batch, dim, len, state, groups, all, 10 * i as u64);
        let (y, last, grads) = case.run(&CPU, DType::F32);
        let (gy, glast, ggrads) = case.run(&dev, DType::F32);
        let at = format!("batch {batch} dim {dim} len {len} state {state} groups {groups}");
        assert_close(&format!("y, {at}"), &gy, &y, 1e-4);
        assert_close(&format!("last state, {at}"), &glast, &last, 1e-4);
        for ((name, g), want) in NAMES.iter().zip(&ggrads).zip(&grads) {
            assert_close(&format!("{name}, {at}"), g, want, 2e-4);
        }
        // bf16 inputs, f32 arithmetic: within bf16's rounding of the inputs.
        let (by, blast, _) = case.run(&dev, DType::BF16);
        assert_close(&format!("bf16 y, {at}"), &by, &y, 3e-2);
        assert_close(&format!("bf16 last state, {at}"), &blast, &last, 3e-2);
    }
}

/// The SSD scan (kernels/ssd.cu on the GPU, candle ops on the CPU) with every optional part:
/// y, the last state and the gradients of x, dt, A, B, C, D, z, dt_bias and h0.
fn ssd_case(dev: &Device, dtype: DType, vars: &[Var]) -> (Tensor, Tensor, Vec<Tensor>) {
    use mamba_ssm::{ssd_chunk_scan, SsdParams};
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().to_device(dev).unwrap().to_dtype(dtype).unwrap()).collect();
    let p = SsdParams { d: Some(&t[5]), z: Some(&t[6]), dt_bias: Some(&t[7]), dt_softplus: true, dt_limit: (0.0, 5.0) };
    let out = ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], 256, &p, Some(&t[8])).unwrap();
    let weight = |like: &Tensor, seed| uniform(like.dims(), seed, -1.0, 1.0, DType::F32).to_device(dev).unwrap();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let loss = ((f32(&out.y) * weight(&out.y, 97)).unwrap().sum_all().unwrap()
        + (f32(&out.last_state) * weight(&out.last_state, 96)).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient for every input").to_device(&CPU).unwrap());
    (f32(&out.y).to_device(&CPU).unwrap(), f32(&out.last_state).to_device(&CPU).unwrap(), g.collect())
}

#[test]
fn the_ssd_scan_on_the_gpu_matches_the_cpu_forward_and_backward() {
    let dev = gpu();
    // (batch, len, heads, headdim, groups, state): lengths around the kernels' 64-step chunk.
    let shapes =
        [(1, 1, 2, 4, 1, 8), (2, 37, 4, 8, 2, 16), (2, 64, 4, 8, 1, 16), (1, 65, 3, 16, 3, 32), (2, 300, 8, 16, 2, 64)];
    for (i, &(batch, len, heads, headdim, groups, state)) in shapes.iter().enumerate() {
        let inputs: [(Vec<usize>, f64, f64); 9] = [
            (vec![batch, len, heads, headdim], -1.0, 1.0),
            (vec![batch, len, heads], -3.0, 1.0),
            (vec![heads], -2.0, -0.2),
            (vec![batch, len, groups, state], -1.0, 1.0),
            (vec![batch, len, groups, state], -1.0, 1.0),
            (vec![heads], -1.0, 1.0),
            (vec![batch, len, heads, headdim], -1.0, 1.0),
            (vec![heads], -1.0, 0.0),
            (vec![batch, heads, headdim, state], -1.0, 1.0),
        ];
        let vars: Vec<Var> = inputs
            .iter()
            .enumerate()
            .map(|(k, (s, lo, hi))| {
                Var::from_tensor(&uniform(s, 20 * i as u64 + k as u64, *lo, *hi, DType::F32)).unwrap()
            })
            .collect();
        let (y, last, grads) = ssd_case(&CPU, DType::F32, &vars);
        let (gy, glast, ggrads) = ssd_case(&dev, DType::F32, &vars);
        let at = format!("batch {batch} len {len} heads {heads} headdim {headdim} groups {groups} state {state}");
        assert_close(&format!("SSD y, {at}"), &gy, &y, 1e-4);
        assert_close(&format!("SSD last state, {at}"), &glast, &last, 1e-4);
        let names = ["dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dh0"];
        for ((name, g), want) in names.iter().zip(&ggrads).zip(&grads) {
            assert_close(&format!("SSD {name}, {at}"), g, want, 2e-4);
        }
        let (by, blast, _) = ssd_case(&dev, DType::BF16, &vars);
        assert_close(&format!("SSD bf16 y, {at}"), &by, &y, 3e-2);
        assert_close(&format!("SSD bf16 last state, {at}"), &blast, &last, 3e-2);
    }
}

#[test]
fn the_conv_on_the_gpu_matches_the_cpu_forward_and_backward() {
    let dev = gpu();
    for (batch, channels, len, width, silu) in [(1, 3, 1, 4, true), (2, 5, 37, 4, true), (2, 4, 300, 3, false)] {
        // x as a transposed (batch, len, channels) tensor, as the mixers pass it.
        let x = Var::from_tensor(&uniform(&[batch, len, channels], 1, -1.0, 1.0, DType::F32)).unwrap();
        let w = Var::from_tensor(&uniform(&[channels, width], 2, -1.0, 1.0, DType::F32)).unwrap();
        let b = Var::from_tensor(&uniform(&[channels], 3, -1.0, 1.0, DType::F32)).unwrap();
        let run = |dev: &Device| {
            let on = |v: &Var| v.as_tensor().to_device(dev).unwrap();
            let y = causal_conv1d(&on(&x).transpose(1, 2).unwrap(), &on(&w), Some(&on(&b)), silu).unwrap();
            let wy = uniform(y.dims(), 4, -1.0, 1.0, DType::F32).to_device(dev).unwrap();
            let grads = (y.clone() * wy).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> =
                [&x, &w, &b].iter().map(|v| grads.get(v.as_tensor()).unwrap().to_device(&CPU).unwrap()).collect();
            (y.to_device(&CPU).unwrap(), g)
        };
        let ((y, g), (gy, gg)) = (run(&CPU), run(&dev));
        let at = format!("batch {batch} channels {channels} len {len} width {width} silu {silu}");
        assert_close(&format!("conv y, {at}"), &gy, &y, 1e-5);
        for ((name, got), want) in ["dx", "dw", "dbias"].iter().zip(&gg).zip(&g) {
            assert_close(&format!("conv {name}, {at}"), got, want, 1e-4);
        }
    }
}

#[test]
fn the_decode_steps_on_the_gpu_match_the_cpu() {
    use mamba_ssm::{selective_state_update, ssd_state_update, SsdParams};
    let dev = gpu();
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let back = |t: &Tensor| t.to_device(&CPU).unwrap().to_dtype(DType::F32).unwrap();
    // Mamba-1: (batch, dim, state, groups), with D, z, delta bias and softplus.
    for (batch, dim, state, groups) in [(1, 3, 1, 1), (2, 6, 16, 2)] {
        let u = |shape: &[usize], seed: u64, lo: f64, hi: f64| uniform(shape, seed, lo, hi, DType::F32);
        let (h, x, delta) =
            (u(&[batch, dim, state], 1, -1.0, 1.0), u(&[batch, dim], 2, -1.0, 1.0), u(&[batch, dim], 3, -2.0, 1.0));
        let (a, b, c) = (
            u(&[dim, state], 4, -2.0, -0.2),
            u(&[batch, groups, state], 5, -1.0, 1.0),
            u(&[batch, groups, state], 6, -1.0, 1.0),
        );
        let (d, z, bias) = (u(&[dim], 7, -1.0, 1.0), u(&[batch, dim], 8, -1.0, 1.0), u(&[dim], 9, -1.0, 0.0));
        let p = ScanParams { d: Some(&d), z: Some(&z), delta_bias: Some(&bias), delta_softplus: true };
        let (y, new) = selective_state_update(&h, &x, &delta, &a, &b, &c, &p).unwrap();
        let (gd, gz, gbias) = (on(&d), on(&z), on(&bias));
        let gp = ScanParams { d: Some(&gd), z: Some(&gz), delta_bias: Some(&gbias), delta_softplus: true };
        let (gy, gnew) = selective_state_update(&on(&h), &on(&x), &on(&delta), &on(&a), &on(&b), &on(&c), &gp).unwrap();
        assert_close("Mamba-1 step y", &back(&gy), &y, 1e-5);
        assert_close("Mamba-1 step state", &back(&gnew), &new, 1e-5);
    }
    // Mamba-2: (batch, heads, headdim, state, groups), dt bias, softplus and a clamp.
    for (batch, heads, headdim, state, groups) in [(1, 1, 1, 1, 1), (2, 4, 3, 16, 2)] {
        let u = |shape: &[usize], seed: u64, lo: f64, hi: f64| uniform(shape, seed, lo, hi, DType::F32);
        let h = u(&[batch, heads, headdim, state], 1, -1.0, 1.0);
        let (x, dt, a) =
            (u(&[batch, heads, headdim], 2, -1.0, 1.0), u(&[batch, heads], 3, -2.0, 1.0), u(&[heads], 4, -2.0, -0.2));
        let (b, c) = (u(&[batch, groups, state], 5, -1.0, 1.0), u(&[batch, groups, state], 6, -1.0, 1.0));
        let bias = u(&[heads], 7, -1.0, 0.0);
        let p = SsdParams { dt_bias: Some(&bias), dt_softplus: true, dt_limit: (0.01, 2.0), ..Default::default() };
        let (y, new) = ssd_state_update(&h, &x, &dt, &a, &b, &c, &p).unwrap();
        let gbias = on(&bias);
        let gp = SsdParams { dt_bias: Some(&gbias), dt_softplus: true, dt_limit: (0.01, 2.0), ..Default::default() };
        let (gy, gnew) = ssd_state_update(&on(&h), &on(&x), &on(&dt), &on(&a), &on(&b), &on(&c), &gp).unwrap();
        assert_close("Mamba-2 step y", &back(&gy), &y, 1e-5);
        assert_close("Mamba-2 step state", &back(&gnew), &new, 1e-5);
    }
}

#[test]
fn the_conv_update_on_the_gpu_matches_the_cpu() {
    use mamba_ssm::causal_conv1d_update;
    let dev = gpu();
    for (batch, channels, width, silu, with_bias) in
        [(1, 1, 1, true, false), (2, 5, 4, true, true), (3, 2, 3, false, true)]
    {
        let state = uniform(&[batch, channels, width], 1, -1.0, 1.0, DType::F32);
        let x = uniform(&[batch, channels], 2, -1.0, 1.0, DType::F32);
        let w = uniform(&[channels, width], 3, -1.0, 1.0, DType::F32);
        let b = uniform(&[channels], 4, -1.0, 1.0, DType::F32);
        let bias = with_bias.then_some(&b);
        let (y, new) = causal_conv1d_update(&state, &x, &w, bias, silu).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let gb = on(&b);
        let (gy, gnew) = causal_conv1d_update(&on(&state), &on(&x), &on(&w), with_bias.then_some(&gb), silu).unwrap();
        let at = format!("batch {batch} channels {channels} width {width} silu {silu} bias {with_bias}");
        assert_close(&format!("conv update y, {at}"), &gy.to_device(&CPU).unwrap(), &y, 1e-6);
        assert_close(&format!("conv update state, {at}"), &gnew.to_device(&CPU).unwrap(), &new, 0.0);
    }
}
