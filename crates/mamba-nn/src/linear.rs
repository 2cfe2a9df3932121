//! y = x W^T + b. candle_nn's Linear multiplies a 3-d input by the weight broadcast over the
//! batch, which candle 0.11.1 computes wrongly when the input is a transposed view (as the
//! mixers' inputs are): measured 175 % relative error for a (2, 3, 8) view. This one uses
//! `mamba_ssm::weight_matmul` (f32 input; f32, bf16 or f16 weight), which handles any strides,
//! or `broadcast_matmul` for other dtypes.

use crate::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// The dtype a model computes in when its projections are stored in `weights`: f32 for the half
/// types (weights are widened on the fly, see `mamba_ssm::weight_matmul`), else `weights`.
pub fn compute_dtype(weights: DType) -> DType {
    match weights {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `{name}.weight` (out, in) in the VarBuilder's dtype and, with `bias`, `{name}.bias` (out)
    /// in the compute dtype (see `compute_dtype`).
    pub fn load(vb: &VarBuilder, name: &str, (out, inp): (usize, usize), bias: bool) -> Result<Self> {
        let vb = vb.pp(name);
        let b = if bias { Some(vb.clone().set_dtype(compute_dtype(vb.dtype())).get(out, "bias")?) } else { None };
        Ok(Self::new(vb.get((out, inp), "weight")?, b))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// x W^T without the bias: (..., in) -> (..., out).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 {
            return Ok(mamba_ssm::weight_matmul(x, &self.weight)?);
        }
        Ok(x.broadcast_matmul(&self.weight.t()?)?)
    }

    /// x: (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn transposed_batched_input_is_multiplied_right() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..48).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let x = Tensor::from_vec(v, (2, 8, 3), &dev).unwrap().transpose(1, 2).unwrap(); // (2, 3, 8) view
        let w: Vec<f32> = (0..40).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
        let w = Tensor::from_vec(w, (5, 8), &dev).unwrap();
        let want = x.contiguous().unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        let got = Linear::new(w.clone(), None).forward(&x).unwrap();
        let diff = |a: &Tensor| (a - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&got), 0.0);
        // The reason this type exists: candle_nn's Linear gets this input wrong in candle 0.11.1.
        // If this starts failing, candle fixed it and candle_nn::Linear can be used again.
        assert!(diff(&candle_nn::Linear::new(w, None).forward(&x).unwrap()) > 1.0);
    }
}
