//! AdamW with two parameter groups, the learning-rate schedule, clipping by global norm and an
//! exponential moving average of the weights. candle_nn's AdamW has no parameter groups and keeps
//! its moments private, so a resumed run could not continue it exactly; this one saves and loads
//! every bit of its state.

use crate::{Error, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The model's trainable tensors by checkpoint name, in name order (so every run visits them in
/// the same order).
pub type Params = BTreeMap<String, Var>;

/// Whether a parameter takes weight decay: matrices do; A_log, D, dt biases, norms, biases,
/// position embeddings and class tokens do not (as in the reference recipes).
pub fn decays(name: &str) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let exempt = leaf.starts_with("A_") && leaf.ends_with("log")
        || leaf.starts_with('D')
        || leaf.starts_with("dt_bias")
        || leaf == "bias"
        || name.contains("norm")
        || name.contains("pos_embed")
        || name.contains("cls_token");
    !exempt
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Linear warmup from 0 over this many optimizer steps, then cosine decay to `min_lr`.
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub min_lr: f64,
    /// Clip the gradient's global L2 norm to this; 0 turns clipping off.
    #[serde(default = "default_clip")]
    pub clip_grad_norm: f64,
    /// Decay of the weights' moving average (at step t at most (1 + t) / (10 + t)); 0 turns it
    /// off.
    #[serde(default)]
    pub ema: f64,
}

fn default_weight_decay() -> f64 {
    0.1
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(c: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < c.warmup_steps {
        return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
    }
    let span = total.saturating_sub(c.warmup_steps).max(1);
    let progress = ((step - c.warmup_steps) as f64 / span as f64).min(1.0);
    c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

pub struct AdamW {
    config: OptimConfig,
    /// First and second moments by parameter name.
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    /// Moving average of the weights, when `ema` > 0.
    ema: HashMap<String, Tensor>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    pub fn new(config: OptimConfig, params: &Params) -> Result<Self> {
        let zeros = || -> Result<HashMap<String, Tensor>> {
            params.iter().map(|(n, p)| Ok((n.clone(), p.zeros_like()?))).collect()
        };
        let ema = if config.ema > 0.0 {
            params.iter().map(|(n, p)| Ok((n.clone(), p.as_tensor().detach().copy()?))).collect::<Result<_>>()?
        } else {
            HashMap::new()
        };
        Ok(Self { config, m: zeros()?, v: zeros()?, ema, step: 0 })
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(params: &Params, grads: &HashMap<String, Tensor>) -> Result<f64> {
        let mut sum = 0f64;
        for name in params.keys() {
            if let Some(g) = grads.get(name) {
                sum += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with `grads` (by parameter name) at learning rate `lr`; clips first. Returns the
    /// gradient norm before clipping.
    pub fn update(&mut self, params: &Params, grads: &HashMap<String, Tensor>, lr: f64) -> Result<f64> {
        let c = &self.config;
        let norm = Self::grad_norm(params, grads)?;
        let scale = if c.clip_grad_norm > 0.0 && norm > c.clip_grad_norm { c.clip_grad_norm / norm } else { 1.0 };
        self.step += 1;
        let (b1, b2) = c.betas;
        let (fix1, fix2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for (name, p) in params {
            let Some(g) = grads.get(name) else { continue };
            let g = (g.detach() * scale)?;
            let m = ((&self.m[name] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m / fix1)? / ((&v / fix2)?.sqrt()? + c.eps)?)?;
            let decay = if decays(name) { 1.0 - lr * c.weight_decay } else { 1.0 };
            p.set(&((p.as_tensor().detach() * decay)? - (step * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        if c.ema > 0.0 {
            // Warmed up as TensorFlow's ExponentialMovingAverage with num_updates: early on the
            // average follows the weights, so the random initialisation does not linger in it.
            let decay = c.ema.min((1.0 + self.step as f64) / (10.0 + self.step as f64));
            for (name, p) in params {
                // Detached: an op on a Var is recorded, and each average would hold the previous
                // one through its graph, every step's average kept alive to the end of the run.
                let avg = ((&self.ema[name] * decay)? + (p.as_tensor().detach() * (1.0 - decay))?)?;
                self.ema.insert(name.clone(), avg);
            }
        }
        Ok(norm)
    }

    /// The moving average of the weights, if kept.
    pub fn ema(&self) -> Option<&HashMap<String, Tensor>> {
        (!self.ema.is_empty()).then_some(&self.ema)
    }

    /// Every tensor of the state, named for a safetensors file (`m.NAME`, `v.NAME`, `ema.NAME`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (prefix, map) in [("m", &self.m), ("v", &self.v), ("ema", &self.ema)] {
            out.extend(map.iter().map(|(n, t)| (format!("{prefix}.{n}"), t.clone())));
        }
        out
    }

    /// Restores the state written by `state`; `step` comes from the trainer state.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: usize, source: &str) -> Result<()> {
        for (prefix, map) in [("m", &mut self.m), ("v", &mut self.v), ("ema", &mut self.ema)] {
            for (name, t) in map.iter_mut() {
                let key = format!("{prefix}.{name}");
                let stored = tensors.remove(&key).ok_or_else(|| Error::Checkpoint {
                    path: source.into(),
                    message: format!("the optimizer state has no `{key}`"),
                })?;
                if stored.dims() != t.dims() {
                    return Err(Error::Checkpoint {
                        path: source.into(),
                        message: format!("`{key}` has shape {:?}, the model {:?}", stored.dims(), t.dims()),
                    });
                }
                *t = stored;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The gradients of `params` in `store`, by name.
pub fn named_grads(params: &Params, store: &GradStore) -> HashMap<String, Tensor> {
    params.iter().filter_map(|(n, p)| store.get(p.as_tensor()).map(|g| (n.clone(), g.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The defaults of a config file that sets only `lr`.
    fn config(lr: f64) -> OptimConfig {
        toml::from_str(&format!("lr = {lr:?}")).unwrap()
    }

    #[test]
    fn weight_decay_skips_the_reference_exemptions() {
        for name in ["backbone.layers.0.mixer.in_proj.weight", "lm_head.weight", "backbone.embeddings.weight"] {
            assert!(decays(name), "{name}");
        }
        for name in [
            "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.A_b_log",
            "backbone.layers.0.mixer.D",
            "backbone.layers.0.mixer.D_b",
            "backbone.layers.0.mixer.dt_bias",
            "backbone.layers.0.mixer.dt_proj.bias",
            "backbone.layers.0.norm.weight",
            "backbone.norm_f.weight",
            "pos_embed",
            "cls_token",
        ] {
            assert!(!decays(name), "{name}");
        }
    }

    #[test]
    fn schedule_warms_up_then_follows_the_cosine() {
        let c = OptimConfig { warmup_steps: 4, min_lr: 0.1, clip_grad_norm: 0.0, ..config(1.0) };
        let lrs: Vec<f64> = (0..14).map(|s| learning_rate(&c, s, 14)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lrs[9] - 0.55).abs() < 1e-12, "{lrs:?}"); // halfway through the decay
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0]));
    }

    /// One step against Adam's formulas written out for a single number, with decoupled weight
    /// decay and clipping.
    #[test]
    fn one_step_follows_the_formulas() {
        let p = Var::new(&[2.0f64], &Device::Cpu).unwrap();
        let params: Params = [("w.weight".to_string(), p.clone())].into();
        let c = OptimConfig { weight_decay: 0.5, betas: (0.9, 0.99), ..config(0.1) };
        let mut opt = AdamW::new(c, &params).unwrap();
        let grads = [("w.weight".to_string(), Tensor::new(&[4.0f64], &Device::Cpu).unwrap())].into();
        let norm = opt.update(&params, &grads, 0.1).unwrap();
        assert_eq!(norm, 4.0);
        // Clipped gradient 1: m = 0.1, v = 0.01, unbiased 1 and 1: step 1 / (1 + eps).
        let want = 2.0 * (1.0 - 0.1 * 0.5) - 0.1 * (1.0 / (1.0 + 1e-8));
        let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    /// The optimizer's state must not record ops: a recorded average holds the previous one, and
    /// a run's memory grows every step (it did, by megabytes a step, before the fix).
    #[test]
    fn the_state_holds_no_graph() {
        let p = Var::new(&[2.0f32, 1.0], &Device::Cpu).unwrap();
        let params: Params = [("w.weight".to_string(), p.clone())].into();
        let mut opt = AdamW::new(OptimConfig { ema: 0.9, ..config(0.1) }, &params).unwrap();
        // A gradient that is itself the result of ops on the parameter, as backward's can be.
        let grads = [("w.weight".to_string(), (p.as_tensor() * 2.0).unwrap())].into();
        for _ in 0..3 {
            opt.update(&params, &grads, 0.1).unwrap();
        }
        for (name, t) in opt.state() {
            assert!(!t.track_op(), "{name} records ops");
        }
    }
}
