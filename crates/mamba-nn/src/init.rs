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
//! - The time-invariant ablation (`selective = false`): B ones, C U(±1/sqrt(d_state)).

use crate::model::expected_tensors;
use crate::{BackboneConfig, Error, LmConfig, MixerKind, Result};
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

/// Every tensor of a fresh `config` model, f32 on the CPU, under its checkpoint name.
pub fn init_params(config: &LmConfig, init: &InitConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in expected_tensors(config) {
        let t = init_tensor(&name, &shape, &config.backbone, init, &mut rng)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// One fresh tensor of a backbone by its checkpoint name (the rules above), f32 on the CPU.
/// Models that embed Mamba blocks (vision, audio) use it for their blocks' tensors.
pub fn init_tensor(
    name: &str,
    shape: &[usize],
    b: &BackboneConfig,
    init: &InitConfig,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    // The parameter's own name, without its layer path and route suffix.
    let leaf = name.rsplit("mixer.").next().unwrap_or(name);
    let uniform = |rng: &mut StdRng, bound: f64| -> Vec<f32> {
        (0..numel).map(|_| rng.random_range(-bound..=bound) as f32).collect()
    };
    let fan_in_bound = 1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt();
    let values: Vec<f32> = if name.ends_with("embeddings.weight") || name == "lm_head.weight" {
        let normal = Normal::new(0.0, init.embedding_std).map_err(|e| bad(name, e.to_string()))?;
        (0..numel).map(|_| normal.sample(rng) as f32).collect()
    } else if name.ends_with("norm.weight") || name.ends_with("norm_f.weight") || leaf.starts_with('D') {
        vec![1.0; numel]
    } else if leaf == "in_proj.bias" || leaf == "out_proj.bias" {
        vec![0.0; numel]
    } else if leaf == "out_proj.weight" {
        uniform(rng, fan_in_bound / (b.n_layer as f64).sqrt())
    } else if leaf.starts_with("in_proj.") || leaf.starts_with("x_proj") || leaf.starts_with("conv1d") {
        // A conv bias's fan-in is the weight's: 1 x d_conv.
        let bound = if leaf.ends_with(".bias") { 1.0 / (b.d_conv as f64).sqrt() } else { fan_in_bound };
        uniform(rng, bound)
    } else if leaf.starts_with("dt_proj") && leaf.ends_with(".weight") {
        uniform(rng, init.dt_scale / (b.dt_rank as f64).sqrt())
    } else if (leaf.starts_with("dt_proj") && leaf.ends_with(".bias")) || leaf.starts_with("dt_bias") {
        dt_biases(numel, init, rng)
    } else if leaf == "B" || leaf.starts_with("B_") {
        // The time-invariant ablation's input and output vectors.
        vec![1.0; numel]
    } else if leaf == "C" || leaf.starts_with("C_") {
        uniform(rng, 1.0 / (b.d_state as f64).sqrt())
    } else if leaf.starts_with('A') && leaf.ends_with("_log") {
        match b.kind {
            MixerKind::Mamba1 => (0..numel).map(|i| ((i % b.d_state + 1) as f32).ln()).collect(),
            MixerKind::Mamba2 => {
                let (lo, hi) = init.a_init_range;
                (0..numel).map(|_| rng.random_range(lo..=hi).ln() as f32).collect()
            }
        }
    } else {
        return Err(bad(name, "no initialisation rule for this tensor".into()));
    };
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// dt biases: the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], floored.
pub fn dt_biases(n: usize, init: &InitConfig, rng: &mut StdRng) -> Vec<f32> {
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
