//! The fused RMSNorm against its candle-ops reference and f64 finite differences.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use mamba_ssm::{rms_norm, rms_norm_ref};

type Norm = fn(&Tensor, &Tensor, f64) -> mamba_ssm::Result<Tensor>;

/// y and the gradients of x and the weight for the loss sum(y * w_loss).
fn run(f: Norm, x: &Tensor, w: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (xv, wv) = (var(x), var(w));
    let y = f(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap();
    let weights = uniform(y.dims(), 99, -1.0, 1.0, y.dtype());
    let grads = dot(&y, &weights).backward().unwrap();
    (y, grads.get(xv.as_tensor()).unwrap().clone(), grads.get(wv.as_tensor()).unwrap().clone())
}

#[test]
fn fused_equals_the_reference() {
    // One row, a width of 1, rows not a multiple of the 64 rows per task, a 3-d input.
    for (shape, dtype, tol) in [
        (vec![1, 7], DType::F32, 1e-5),
        (vec![5, 1], DType::F64, 1e-10),
        (vec![3, 50, 64], DType::F32, 1e-5),
        (vec![131, 19], DType::F64, 1e-10),
    ] {
        let d = *shape.last().unwrap();
        let x = uniform(&shape, 1, -2.0, 2.0, dtype);
        let w = uniform(&[d], 2, 0.5, 1.5, dtype);
        let (y, dx, dw) = run(rms_norm, &x, &w);
        let (y_ref, dx_ref, dw_ref) = run(rms_norm_ref, &x, &w);
        assert_close(&format!("y {shape:?}"), &y, &y_ref, tol);
        assert_close(&format!("dx {shape:?}"), &dx, &dx_ref, tol);
        assert_close(&format!("dw {shape:?}"), &dw, &dw_ref, tol);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let x = uniform(&[4, 6], 3, -2.0, 2.0, DType::F64);
    let w = uniform(&[6], 4, 0.5, 1.5, DType::F64);
    let (_, dx, dw) = run(rms_norm, &x, &w);
    let weights = uniform(&[4, 6], 99, -1.0, 1.0, DType::F64);
    let f = |a: &[Tensor]| dot(&rms_norm(&a[0], &a[1], 1e-5).unwrap(), &weights).to_scalar::<f64>().unwrap();
    let inputs = [x, w];
    check_finite_differences("x", &inputs, 0, &dx, &f);
    check_finite_differences("weight", &inputs, 1, &dw, &f);
}

#[test]
fn a_weight_of_another_width_is_named() {
    let x = uniform(&[2, 5], 1, -1.0, 1.0, DType::F32);
    let err = rms_norm(&x, &uniform(&[4], 1, 0.5, 1.5, DType::F32), 1e-5).unwrap_err().to_string();
    assert!(err.contains("weight") && err.contains("(5)"), "{err}");
}
