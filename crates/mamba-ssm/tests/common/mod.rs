//! Helpers for the kernel tests: seeded inputs, error measures, fixtures, finite differences.
#![allow(dead_code)]

use candle_core::{safetensors, DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;

pub const CPU: Device = Device::Cpu;

/// Uniform values in [lo, hi), seeded.
pub fn uniform(shape: &[usize], seed: u64, lo: f64, hi: f64, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &CPU).unwrap().to_dtype(dtype).unwrap()
}

pub fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff / scale.max(1e-30)
}

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    safetensors::load(&path, &CPU).unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}

/// Central finite differences of `f` (a scalar function of the inputs) with respect to a few
/// entries of input `which`, compared with `grad` (f64).
pub fn check_finite_differences(
    what: &str,
    inputs: &[Tensor],
    which: usize,
    grad: &Tensor,
    f: &dyn Fn(&[Tensor]) -> f64,
) {
    let flat: Vec<f64> = inputs[which].flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    let picks: Vec<usize> = (0..flat.len()).step_by((flat.len() / 7).max(1)).chain([flat.len() - 1]).collect();
    for i in picks {
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let mut args = inputs.to_vec();
            args[which] = Tensor::from_vec(v, inputs[which].dims(), &CPU).unwrap();
            f(&args)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1e-3);
        assert!(err < 1e-5, "{what}[{i}]: analytic {} vs numeric {numeric}", g[i]);
    }
}

/// sum(t * w) as a scalar f64 tensor op (a loss whose gradient is w).
pub fn dot(t: &Tensor, w: &Tensor) -> Tensor {
    (t * w).unwrap().sum_all().unwrap()
}
