//! RMSNorm over the last dimension as one op with its backward: y = x / sqrt(mean(x^2) + eps) * w.
//! From candle ops it is seven passes forward and about fourteen backward, each a tensor of its
//! own; a residual block runs one per layer.

use crate::cpu::{sum_in_order, Flat, FlatOp2};
use crate::error::{Error, Result};
use crate::math::Real;
use candle_core::{DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS: usize = 64;

/// x: (..., d), weight: (d) -> (..., d), computed in f32 (f64 stays f64); differentiable in both.
/// The fused op on the CPU, [`rms_norm_ref`] elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] {
        return Err(Error::Shape {
            tensor: "weight",
            expected: format!("({d}), the last dimension of x"),
            got: weight.dims().to_vec(),
        });
    }
    let dt = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    if !x.device().is_cpu() || d == 0 {
        return rms_norm_ref(x, weight, eps);
    }
    Ok(x.to_dtype(dt)?.contiguous()?.apply_op2(&weight.to_dtype(dt)?.contiguous()?, Flat(RmsNormOp { eps }))?)
}

/// The reference from candle ops, on any device.
pub fn rms_norm_ref(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let x = x.to_dtype(dt)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&weight.to_dtype(dt)?)?)
}

struct RmsNormOp {
    eps: f64,
}

/// 1 / sqrt(mean(row^2) + eps), summed in f64.
fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let ms = row.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>() / row.len() as f64;
    T::from_f64(1.0 / (ms + eps).sqrt())
}

impl FlatOp2 for RmsNormOp {
    const NAME: &'static str = "rms-norm";

    fn out_shape(&self, x: &Layout) -> Shape {
        x.shape().clone()
    }

    fn fwd<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut y = vec![T::ZERO; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(ROWS).for_each(|(y, x)| norm_row(x, w, self.eps, y));
        y
    }

    fn bwd<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let d = w.len();
        let mut dx = vec![T::ZERO; x.len()];
        let parts: Vec<Vec<T>> = dx
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d).zip(g.par_chunks(ROWS * d)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![T::ZERO; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    norm_row_grad(x, w, g, self.eps, dx, &mut dw);
                }
                dw
            })
            .collect();
        let dw = sum_in_order(parts, d);
        Ok((dx, dw))
    }
}

/// One row: y = x r w, r = 1 / sqrt(mean(x^2) + eps).
pub(crate) fn norm_row<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T]) {
    let r = inv_rms(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
}

/// One row's gradients for the output gradient g: with x̂ = x r, dx = r (g w - x̂ mean(g w x̂))
/// (written), dw += g x̂.
pub(crate) fn norm_row_grad<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64, dx: &mut [T], dw: &mut [T]) {
    let d = w.len();
    let r = inv_rms(x, eps);
    let mut dot = T::ZERO;
    for i in 0..d {
        let xh = x[i] * r;
        dot += g[i] * w[i] * xh;
        dw[i] += g[i] * xh;
    }
    let mean = dot / T::from_f64(d as f64);
    for i in 0..d {
        dx[i] = r * (g[i] * w[i] - x[i] * r * mean);
    }
}
