//! The causal depthwise conv1d op against its candle-ops reference, the single-token update and
//! finite differences.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use mamba_ssm::{causal_conv1d, causal_conv1d_ref, causal_conv1d_update};

type Conv = fn(&Tensor, &Tensor, Option<&Tensor>, bool) -> mamba_ssm::Result<Tensor>;

fn grads(conv: Conv, x: &Tensor, w: &Tensor, b: &Tensor, silu: bool, dy: &Tensor) -> (Tensor, Vec<Tensor>) {
    let y = conv(x, w, Some(b), silu).unwrap();
    let g = dot(&y, dy).backward().unwrap();
    let gs = [x, w, b].iter().map(|t| g.get(t).cloned().expect("gradient")).collect();
    (y, gs)
}

fn inputs(batch: usize, ch: usize, len: usize, width: usize, dtype: DType) -> [Tensor; 4] {
    let x = var(&uniform(&[batch, ch, len], 1, -1.0, 1.0, dtype)).as_tensor().clone();
    let w = var(&uniform(&[ch, 1, width], 2, -1.0, 1.0, dtype)).as_tensor().clone();
    let b = var(&uniform(&[ch], 3, -1.0, 1.0, dtype)).as_tensor().clone();
    let dy = uniform(&[batch, ch, len], 4, -1.0, 1.0, dtype);
    [x, w, b, dy]
}

#[test]
fn matches_reference_forward_and_gradients() {
    for (batch, ch, len, width) in [(2, 5, 17, 4), (1, 3, 1, 4), (3, 8, 2, 4), (2, 4, 9, 1), (1, 2, 5, 7)] {
        for silu in [false, true] {
            let [x, w, b, dy] = inputs(batch, ch, len, width, DType::F64);
            let (y, g) = grads(causal_conv1d, &x, &w, &b, silu, &dy);
            let (y_ref, g_ref) = grads(causal_conv1d_ref, &x, &w, &b, silu, &dy);
            assert_close("y", &y, &y_ref, 1e-12);
            for (name, (g, r)) in ["dx", "dw", "dbias"].iter().zip(g.iter().zip(&g_ref)) {
                assert_close(name, g, r, 1e-12);
            }
        }
    }
}

#[test]
fn reads_transposed_input_in_place() {
    // Mamba-2 convolves (batch, len, channels) activations: a transposed view.
    let x = uniform(&[2, 11, 6], 9, -1.0, 1.0, DType::F32);
    let [_, w, b, _] = inputs(2, 6, 11, 4, DType::F32);
    let xt = x.transpose(1, 2).unwrap();
    let got = causal_conv1d(&xt, &w, Some(&b), true).unwrap();
    let want = causal_conv1d_ref(&xt.contiguous().unwrap(), &w, Some(&b), true).unwrap();
    assert_close("y", &got, &want, 1e-6);
    // Without a bias, and with a (channels, width) weight.
    let got = causal_conv1d(&xt, &w.squeeze(1).unwrap(), None, false).unwrap();
    let want = causal_conv1d_ref(&xt, &w, None, false).unwrap();
    assert_close("y without bias", &got, &want, 1e-6);
}

#[test]
fn update_steps_match_parallel() {
    let [x, w, b, _] = inputs(2, 5, 13, 4, DType::F32);
    let y = causal_conv1d(&x, &w, Some(&b), true).unwrap();
    let mut state = Tensor::zeros((2, 5, 4), DType::F32, &CPU).unwrap();
    for t in 0..13 {
        let (yt, next) =
            causal_conv1d_update(&state, &x.narrow(2, t, 1).unwrap().squeeze(2).unwrap(), &w, Some(&b), true).unwrap();
        assert_close(&format!("step {t}"), &yt, &y.narrow(2, t, 1).unwrap().squeeze(2).unwrap(), 1e-6);
        state = next;
    }
    // The state holds the last `width` inputs.
    assert_close("state", &state, &x.narrow(2, 9, 4).unwrap(), 0.0);
}

#[test]
fn finite_differences_f64() {
    let [x, w, b, dy] = inputs(2, 3, 6, 4, DType::F64);
    let (_, g) = grads(causal_conv1d, &x, &w, &b, true, &dy);
    let loss =
        |a: &[Tensor]| dot(&causal_conv1d(&a[0], &a[1], Some(&a[2]), true).unwrap(), &dy).to_scalar::<f64>().unwrap();
    let inputs = [x, w, b];
    for (i, name) in ["x", "w", "bias"].iter().enumerate() {
        check_finite_differences(name, &inputs, i, &g[i], &loss);
    }
}

#[test]
fn bad_shapes_are_named() {
    let [x, w, b, _] = inputs(2, 5, 7, 4, DType::F32);
    let msg = causal_conv1d(&x, &w.narrow(0, 0, 4).unwrap(), Some(&b), true).unwrap_err().to_string();
    assert!(msg.contains("`conv weight`") && msg.contains("(channels, 1, width) = (5, 1, 4)"), "{msg}");
    let msg = causal_conv1d(&x, &w, Some(&b.narrow(0, 0, 2).unwrap()), true).unwrap_err().to_string();
    assert!(msg.contains("`conv bias`"), "{msg}");
    let state = Tensor::zeros((2, 5, 3), DType::F32, &CPU).unwrap();
    let msg = causal_conv1d_update(&state, &x.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(), &w, None, true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`conv weight`") && msg.contains("width"), "{msg}");
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    let [x, w, b, _] = inputs(2, 5, 9, 4, DType::F32);
    for dt in [DType::BF16, DType::F16] {
        let [xl, wl, bl] = [&x, &w, &b].map(|t| t.to_dtype(dt).unwrap());
        let y = causal_conv1d(&xl, &wl, Some(&bl), true).unwrap();
        assert_eq!(y.dtype(), dt);
        let [xb, wb, bb] = [&xl, &wl, &bl].map(|t| t.to_dtype(DType::F32).unwrap());
        let want = causal_conv1d_ref(&xb, &wb, Some(&bb), true).unwrap();
        assert_close("y", &y.to_dtype(DType::F32).unwrap(), &want, 1e-2);
    }
}

#[test]
fn empty_dimensions_do_not_panic() {
    for (batch, ch) in [(0, 3), (2, 0)] {
        let x = var(&Tensor::zeros((batch, ch, 5), DType::F32, &CPU).unwrap()).as_tensor().clone();
        let w = Tensor::zeros((ch, 4), DType::F32, &CPU).unwrap();
        let y = causal_conv1d(&x, &w, None, true).unwrap();
        assert_eq!(y.dims(), &[batch, ch, 5]);
        assert_eq!(y.sum_all().unwrap().backward().unwrap().get(&x).unwrap().dims(), &[batch, ch, 5]);
    }
}
