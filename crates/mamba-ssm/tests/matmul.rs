//! Projections with half-precision weights against widening the weight and multiplying in candle.

use candle_core::{DType, Device, Tensor};
use mamba_ssm::{half_weight_matmul, half_weight_matmul_ref};

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
        for dtype in [DType::BF16, DType::F16] {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
            let mut dims = lead.clone();
            dims.push(k);
            let x = Tensor::randn(0f32, 1., dims, &dev).unwrap();
            let got = half_weight_matmul(&x, &w).unwrap();
            let want = half_weight_matmul_ref(&x, &w).unwrap();
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
    let err =
        max_rel(&half_weight_matmul(&x, &w).unwrap(), &half_weight_matmul_ref(&x.contiguous().unwrap(), &w).unwrap());
    assert!(err < 1e-5, "{err}");
}

#[test]
fn bad_inputs_are_named() {
    let dev = Device::Cpu;
    let w = Tensor::zeros((4, 3), DType::BF16, &dev).unwrap();
    let msg = half_weight_matmul(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap(), &w).unwrap_err().to_string();
    assert!(msg.contains("`x`") && msg.contains("[2, 5]"), "{msg}");
    let msg = half_weight_matmul(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap(), &w.to_dtype(DType::F32).unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bf16 or f16"), "{msg}");
}
