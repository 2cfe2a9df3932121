//! RMSNorm with its gradient (candle_nn's fused version records none on contiguous inputs): the
//! fused `mamba_ssm::rms_norm`.

use crate::Result;
use candle_core::{Tensor, D};

/// y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// x: (..., d) -> (..., d) in f32 (f64 stays f64).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(mamba_ssm::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// x / sqrt(mean(x^2) + eps) over the last dimension, in f32.
pub(crate) fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?)
}
