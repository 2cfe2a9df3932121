//! The fused decoding steps against their candle-op references, over odd shapes and every
//! optional part.

mod common;
use candle_core::{DType, Tensor};
use common::{assert_close, uniform};
use mamba_ssm::{
    selective_state_update, selective_state_update_ref, ssd_state_update, ssd_state_update_ref, ScanParams, SsdParams,
};

#[test]
fn selective_step_matches_the_reference() {
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        // (batch, dim, state, groups: 0 for 2-d B and C)
        for (batch, dim, n, groups) in [(1, 1, 1, 0), (3, 5, 7, 0), (2, 40, 16, 2), (1, 36, 9, 4)] {
            let s = (batch * 100 + dim * 10 + n) as u64;
            let h = uniform(&[batch, dim, n], s, -1.0, 1.0, dtype);
            let x = uniform(&[batch, dim], s + 1, -1.0, 1.0, dtype);
            let delta = uniform(&[batch, dim], s + 2, -3.0, 1.0, dtype);
            let a = uniform(&[dim, n], s + 3, -2.0, -0.1, dtype);
            let bc_shape = if groups == 0 { vec![batch, n] } else { vec![batch, groups, n] };
            let (b, c) = (uniform(&bc_shape, s + 4, -1.0, 1.0, dtype), uniform(&bc_shape, s + 5, -1.0, 1.0, dtype));
            let (d, z, bias) = (
                uniform(&[dim], s + 6, -1.0, 1.0, dtype),
                uniform(&[batch, dim], s + 7, -2.0, 2.0, dtype),
                uniform(&[dim], s + 8, -1.0, 1.0, dtype),
            );
            for full in [false, true] {
                let p = if full {
                    ScanParams { d: Some(&d), z: Some(&z), delta_bias: Some(&bias), delta_softplus: true }
                } else {
                    ScanParams::default()
                };
                let (y, new) = selective_state_update(&h, &x, &delta, &a, &b, &c, &p).unwrap();
                let (y_ref, new_ref) = selective_state_update_ref(&h, &x, &delta, &a, &b, &c, &p).unwrap();
                let what = format!("{dtype:?} batch {batch} dim {dim} state {n} groups {groups} full {full}");
                assert_close(&format!("{what} y"), &y, &y_ref, tol);
                assert_close(&format!("{what} state"), &new, &new_ref, tol);
            }
        }
    }
}

#[test]
fn ssd_step_matches_the_reference() {
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for (batch, heads, headdim, n, groups) in [(1, 1, 1, 1, 1), (2, 4, 3, 5, 2), (1, 6, 8, 16, 3), (3, 2, 5, 9, 1)]
        {
            let s = (batch * 1000 + heads * 100 + headdim * 10 + n) as u64;
            let h = uniform(&[batch, heads, headdim, n], s, -1.0, 1.0, dtype);
            let x = uniform(&[batch, heads, headdim], s + 1, -1.0, 1.0, dtype);
            let dt = uniform(&[batch, heads], s + 2, -3.0, 1.0, dtype);
            let a = uniform(&[heads], s + 3, -2.0, -0.1, dtype);
            let b = uniform(&[batch, groups, n], s + 4, -1.0, 1.0, dtype);
            let c = uniform(&[batch, groups, n], s + 5, -1.0, 1.0, dtype);
            let d_heads = uniform(&[heads], s + 6, -1.0, 1.0, dtype);
            let d_full = uniform(&[heads, headdim], s + 7, -1.0, 1.0, dtype);
            let z = uniform(&[batch, heads, headdim], s + 8, -2.0, 2.0, dtype);
            let bias = uniform(&[heads], s + 9, -1.0, 1.0, dtype);
            let params: [SsdParams; 3] = [
                SsdParams::default(),
                SsdParams {
                    d: Some(&d_heads),
                    z: Some(&z),
                    dt_bias: Some(&bias),
                    dt_softplus: true,
                    dt_limit: (0.0, f64::INFINITY),
                },
                SsdParams { d: Some(&d_full), z: None, dt_bias: Some(&bias), dt_softplus: true, dt_limit: (0.05, 0.5) },
            ];
            for (i, p) in params.iter().enumerate() {
                let (y, new) = ssd_state_update(&h, &x, &dt, &a, &b, &c, p).unwrap();
                let (y_ref, new_ref) = ssd_state_update_ref(&h, &x, &dt, &a, &b, &c, p).unwrap();
                let what = format!(
                    "{dtype:?} batch {batch} heads {heads} headdim {headdim} state {n} groups {groups} params {i}"
                );
                assert_close(&format!("{what} y"), &y, &y_ref, tol);
                assert_close(&format!("{what} state"), &new, &new_ref, tol);
            }
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    let h = Tensor::zeros((1, 4, 3), DType::F32, &common::CPU).unwrap();
    let x = Tensor::zeros((1, 5), DType::F32, &common::CPU).unwrap();
    let a = Tensor::zeros((4, 3), DType::F32, &common::CPU).unwrap();
    let b = Tensor::zeros((1, 3), DType::F32, &common::CPU).unwrap();
    let msg = selective_state_update(&h, &x, &x, &a, &b, &b, &ScanParams::default()).unwrap_err().to_string();
    assert!(msg.contains("`x`") && msg.contains("[1, 5]"), "{msg}");
}
