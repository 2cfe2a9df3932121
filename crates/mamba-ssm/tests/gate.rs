//! The fused SiLU gate against candle's y * silu(z), forward and gradients, for contiguous and
//! strided z.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use mamba_ssm::silu_gate;

/// y * silu(z) and the gradients for y and for `z_leaf`, the Var z is taken from.
fn grads(y: &Tensor, z: &Tensor, z_leaf: &Tensor, fused: bool) -> (Tensor, Tensor, Tensor) {
    let out = if fused { silu_gate(y, z).unwrap() } else { (y * z.silu().unwrap()).unwrap() };
    let w = uniform(out.dims(), 9, -1.0, 1.0, out.dtype());
    let g = dot(&out, &w).backward().unwrap();
    (out, g.get(y).unwrap().clone(), g.get(z_leaf).unwrap().clone())
}

#[test]
fn matches_candle_ops_for_any_layout() {
    for shape in [vec![5usize], vec![3, 7], vec![2, 5, 9], vec![2, 3, 4, 5], vec![1, 40000]] {
        let y = var(&uniform(&shape, 1, -2.0, 2.0, DType::F64)).as_tensor().clone();
        let z = var(&uniform(&shape, 2, -6.0, 6.0, DType::F64)).as_tensor().clone();
        let (a, b) = (grads(&y, &z, &z, true), grads(&y, &z, &z, false));
        assert_close("y * silu(z)", &a.0, &b.0, 1e-14);
        assert_close("dy", &a.1, &b.1, 1e-14);
        assert_close("dz", &a.2, &b.2, 1e-14);
    }
    // z as a Mamba-1 mixer has it: a transposed slice of (batch, len, 2 dim) in_proj output.
    let y = var(&uniform(&[2, 6, 11], 3, -2.0, 2.0, DType::F32)).as_tensor().clone();
    let xz = var(&uniform(&[2, 11, 12], 4, -6.0, 6.0, DType::F32)).as_tensor().clone();
    let z = xz.narrow(2, 6, 6).unwrap().transpose(1, 2).unwrap();
    assert!(!z.is_contiguous());
    let (a, b) = (grads(&y, &z, &xz, true), grads(&y, &z, &xz, false));
    assert_close("strided y * silu(z)", &a.0, &b.0, 1e-6);
    assert_close("strided dy", &a.1, &b.1, 1e-6);
    assert_close("strided dz", &a.2, &b.2, 1e-6);
}

#[test]
fn wrong_shape_is_named() {
    let y = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    let z = Tensor::zeros((3, 2), DType::F32, &CPU).unwrap();
    let msg = silu_gate(&y, &z).unwrap_err().to_string();
    assert!(msg.contains("`z`") && msg.contains("[2, 3]") && msg.contains("[3, 2]"), "{msg}");
}
