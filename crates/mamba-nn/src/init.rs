//! The reference initialisation of a fresh model (mamba_ssm's `Mamba`, `Mamba2` and
//! `MambaLMHeadModel._init_weights`), seeded so that runs repeat.
//!
//! - Projections and convs: PyTorch's default, U(±1/sqrt(fan_in)); in_proj / out_proj biases zero.
//! - out_proj is then divided by sqrt(n_layer) (GPT-2's prenorm residual rescaling).
//! - dt: dt_proj weight U(±dt_scale / sqrt(dt_rank)); the dt bias is the inverse softplus of dt
//!   drawn log-uniformly in [dt_min, dt_max] and floored at dt_init_floor, so that softplus(bias)
//!   starts at that dt.
//! - A: Mamba-1 S4D-real, A_log[d, n] = log(n + 1); Mamba-2 one A per head, U(a_init_range).
//! - D and every norm weight one; embeddings (and an untied head) N(0, 0.02).
//! - Mamba-3's MIMO weights of x and of the outputs 1 / rank, of z one.
//! - The time-invariant ablation (`selective = false`): B ones, C U(±1/sqrt(d_state)).
//!
//! Each layer states its tensors' rules in its parameter list ([`crate::Param`]); this file
//! draws them.

use crate::{Error, Init, LmConfig, Param, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

/// The ranges the reference draws from, with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct InitConfig {
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_init_floor: f64,
    pub dt_scale: f64,
    /// Mamba-2: A per head drawn uniformly from this range (A_log = log A).
    pub a_init_range: (f64, f64),
    pub embedding_std: f64,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            dt_min: 1e-3,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            dt_scale: 1.0,
            a_init_range: (1.0, 16.0),
            embedding_std: 0.02,
        }
    }
}

/// Every tensor of a fresh `config` language model, f32 on the CPU, under its checkpoint name.
pub fn init_params(config: &LmConfig, init: &InitConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    init_tensors(&crate::MambaLm::params(config), init, seed)
}

/// Fresh tensors for `params`, drawn in their order from one generator seeded with `seed`, f32
/// on the CPU, by name.
pub fn init_tensors(params: &[Param], init: &InitConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    params.iter().map(|p| Ok((p.name.clone(), init_tensor(p, init, &mut rng)?))).collect()
}

/// One fresh tensor by its rule, f32 on the CPU.
fn init_tensor(p: &Param, init: &InitConfig, rng: &mut StdRng) -> Result<Tensor> {
    let numel = p.numel();
    let uniform = |rng: &mut StdRng, bound: f64| -> Vec<f32> {
        (0..numel).map(|_| rng.random_range(-bound..=bound) as f32).collect()
    };
    let normal = |rng: &mut StdRng, std: f64| -> Result<Vec<f32>> {
        let normal = Normal::new(0.0, std).map_err(|e| bad(&p.name, e.to_string()))?;
        Ok((0..numel).map(|_| normal.sample(rng) as f32).collect())
    };
    let values = match p.init {
        Init::Zeros => vec![0.0; numel],
        Init::Ones => vec![1.0; numel],
        Init::Constant(c) => vec![c as f32; numel],
        Init::Uniform(bound) => uniform(rng, bound),
        Init::Normal(std) => normal(rng, std)?,
        Init::Embedding => normal(rng, init.embedding_std)?,
        Init::DtProj { dt_rank } => uniform(rng, init.dt_scale / (dt_rank as f64).sqrt()),
        Init::DtBias => dt_biases(numel, init, rng),
        Init::S4dReal => {
            let n = *p.shape.last().ok_or_else(|| bad(&p.name, "S4D-real A needs a state dimension".into()))?;
            (0..numel).map(|i| ((i % n + 1) as f32).ln()).collect()
        }
        Init::LogUniformA => {
            let (lo, hi) = init.a_init_range;
            (0..numel).map(|_| rng.random_range(lo..=hi).ln() as f32).collect()
        }
    };
    Ok(Tensor::from_vec(values, p.shape.as_slice(), &Device::Cpu)?)
}

/// dt biases: the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], floored.
fn dt_biases(n: usize, init: &InitConfig, rng: &mut StdRng) -> Vec<f32> {
    let (lo, hi) = (init.dt_min.ln(), init.dt_max.ln());
    (0..n)
        .map(|_| {
            let dt = (lo + rng.random::<f64>() * (hi - lo)).exp().max(init.dt_init_floor);
            inverse_softplus(dt) as f32
        })
        .collect()
}

/// x such that softplus(x) = log(1 + e^x) = y, for y > 0: y + log(1 - e^-y).
pub fn inverse_softplus(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

fn bad(name: &str, message: String) -> Error {
    Error::Config { path: name.into(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_softplus_inverts_softplus() {
        for y in [1e-4, 1e-3, 0.05, 0.1, 1.0, 5.0] {
            let x = inverse_softplus(y);
            assert!(((x.exp()).ln_1p() - y).abs() < 1e-12 * y.max(1.0), "{y}");
        }
    }
}
