//! The projection kernel (f32, bf16 and f16 weights) against widening the weight and multiplying in
//! candle, forward and gradients.

use candle_core::{DType, Device, Tensor};
use mamba_ssm::{weight_matmul, weight_matmul_ref};

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

#[test]
fn matches_the_widened_reference_for_odd_shapes() {
    let dev = Device::Cpu;
    // k not a multiple of the 16 accumulators, n not a multiple of the task size; rows on both
    // sides of the kernel / matmul switch; a leading batch dimension.
    for (lead, n, k) in
        [(vec![1], 1, 1), (vec![1], 130, 37), (vec![3], 65, 96), (vec![2, 7], 200, 33), (vec![40], 70, 50)]
    {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
            let mut dims = lead.clone();
            dims.push(k);
            let x = Tensor::randn(0f32, 1., dims, &dev).unwrap();
            let got = weight_matmul(&x, &w).unwrap();
            let want = weight_matmul_ref(&x, &w).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = max_rel(&got, &want);
            assert!(err < 1e-5, "{lead:?} n {n} k {k} {dtype:?}: {err}");
        }
    }
}

#[test]
fn strided_x_is_read_right() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (24, 10), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 10, 3), &dev).unwrap().transpose(1, 2).unwrap();
    let err = max_rel(&weight_matmul(&x, &w).unwrap(), &weight_matmul_ref(&x.contiguous().unwrap(), &w).unwrap());
    assert!(err < 1e-5, "{err}");
}

#[test]
fn bad_inputs_are_named() {
    let dev = Device::Cpu;
    let w = Tensor::zeros((4, 3), DType::BF16, &dev).unwrap();
    let msg = weight_matmul(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap(), &w).unwrap_err().to_string();
    assert!(msg.contains("`x`") && msg.contains("[2, 5]"), "{msg}");
    let msg = weight_matmul(&Tensor::zeros((2, 3), DType::F64, &dev).unwrap(), &w.to_dtype(DType::F32).unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("an f32 x") && msg.contains("F64"), "{msg}");
}

#[test]
fn gradients_match_the_reference() {
    let dev = Device::Cpu;
    for rows in [1, 3] {
        let x = candle_core::Var::randn(0f32, 1., (rows, 37), &dev).unwrap();
        let w = candle_core::Var::randn(0f32, 1., (70, 37), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1., (rows, 70), &dev).unwrap();
        let grads = |y: Tensor| {
            let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone())
        };
        let (gx, gw) = grads(weight_matmul(&x, &w).unwrap());
        let (rx, rw) = grads(weight_matmul_ref(&x, &w).unwrap());
        assert!(max_rel(&gx, &rx) < 1e-5 && max_rel(&gw, &rw) < 1e-5, "rows {rows}");
    }
}
