//! AdamW with two parameter groups, the learning-rate schedule, clipping by global norm and an
//! exponential moving average of the weights. candle_nn's AdamW has no parameter groups and keeps
//! its moments private, so a resumed run could not continue it exactly; this one saves and loads
//! every bit of its state.

use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var, WithDType};
use mamba_nn::Param;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The model's trainable tensors by checkpoint name, in name order (so every run visits them in
/// the same order).
pub type Params = BTreeMap<String, Var>;

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
    /// First and second moments by parameter name, stacked: (2, parameter shape...).
    moments: HashMap<String, Tensor>,
    /// Moving average of the weights, when `ema` > 0.
    ema: HashMap<String, Tensor>,
    /// The parameters that take weight decay, as the model declares them.
    decayed: HashSet<String>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// An optimizer for `params`, each decayed or not as `declared` (the model's tensor list)
    /// says.
    pub fn new(config: OptimConfig, params: &Params, declared: &[Param]) -> Result<Self> {
        let known: HashSet<&str> = declared.iter().map(|p| p.name.as_str()).collect();
        if let Some(name) = params.keys().find(|n| !known.contains(n.as_str())) {
            return Err(Error::Config { path: name.clone(), message: "a parameter the model does not declare".into() });
        }
        let decayed = declared.iter().filter(|p| p.decay).map(|p| p.name.clone()).collect();
        let moments = params
            .iter()
            .map(|(n, p)| {
                let mut shape = vec![2];
                shape.extend(p.dims());
                Ok((n.clone(), Tensor::zeros(shape, p.dtype(), p.device())?))
            })
            .collect::<Result<_>>()?;
        let ema = if config.ema > 0.0 {
            params.iter().map(|(n, p)| Ok((n.clone(), p.as_tensor().detach().copy()?))).collect::<Result<_>>()?
        } else {
            HashMap::new()
        };
        Ok(Self { config, moments, ema, decayed, step: 0 })
    }

    /// The global L2 norm of the gradients: read in place on the CPU, else one host sync.
    pub fn grad_norm(params: &Params, grads: &HashMap<String, Tensor>) -> Result<f64> {
        let present: Vec<&Tensor> = params.keys().filter_map(|n| grads.get(n)).collect();
        let mut sum = 0f64;
        let mut elsewhere = Vec::new();
        for g in present {
            match squares_in_place(g)? {
                Some(s) => sum += s,
                None => elsewhere.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?),
            }
        }
        if !elsewhere.is_empty() {
            sum += Tensor::stack(&elsewhere, 0)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// One update with `grads` (by parameter name) at learning rate `lr`; clips first. Returns the
    /// gradient norm before clipping. On the CPU each parameter takes three passes in place (the
    /// moments, the weight, its average) and allocates nothing; elsewhere candle ops do it.
    pub fn update(&mut self, params: &Params, grads: &HashMap<String, Tensor>, lr: f64) -> Result<f64> {
        let c = self.config.clone();
        let norm = Self::grad_norm(params, grads)?;
        let scale = if c.clip_grad_norm > 0.0 && norm > c.clip_grad_norm { c.clip_grad_norm / norm } else { 1.0 };
        self.step += 1;
        let (b1, b2) = c.betas;
        let fix = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        // Warmed up as TensorFlow's ExponentialMovingAverage with num_updates: early on the
        // average follows the weights, so the random initialisation does not linger in it.
        let ema_decay = c.ema.min((1.0 + self.step as f64) / (10.0 + self.step as f64));
        for (name, p) in params {
            let Some(g) = grads.get(name) else { continue };
            let decay = if self.decayed.contains(name) { 1.0 - lr * c.weight_decay } else { 1.0 };
            let step = AdamStep { betas: c.betas, fix, eps: c.eps, lr, decay, scale };
            let moments = &self.moments[name];
            let g = g.detach().contiguous()?;
            if fused(&[p.as_tensor(), moments, &g]) {
                moments.inplace_op2(&g, &Moments(&step))?;
                p.as_tensor().inplace_op2(moments, &Weight(&step))?;
            } else {
                let (m, v, w) = step.reference(moments, p.as_tensor(), &g)?;
                p.set(&w)?;
                self.moments.insert(name.clone(), Tensor::stack(&[m, v], 0)?);
            }
        }
        for (name, p) in params.iter().filter(|_| c.ema > 0.0) {
            let (avg, p) = (&self.ema[name], p.as_tensor());
            if fused(&[avg, p]) {
                avg.inplace_op2(p, &Average(ema_decay))?;
            } else {
                // Detached: an op on a Var is recorded, and each average would hold the previous
                // one through its graph, every step's average kept alive to the end of the run.
                let avg = ((avg * ema_decay)? + (p.detach() * (1.0 - ema_decay))?)?;
                self.ema.insert(name.clone(), avg);
            }
        }
        Ok(norm)
    }

    /// The moving average of the weights, if kept; the next update changes it in place.
    pub fn ema(&self) -> Option<&HashMap<String, Tensor>> {
        (!self.ema.is_empty()).then_some(&self.ema)
    }

    /// Every tensor of the state, named for a safetensors file (`m.NAME`, `v.NAME`, `ema.NAME`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (n, mv) in &self.moments {
            for (i, prefix) in ["m", "v"].into_iter().enumerate() {
                // A copy: the moments change in place at the next step.
                out.insert(format!("{prefix}.{n}"), mv.get(i).and_then(|t| t.copy()).expect("moments are (2, ...)"));
            }
        }
        out.extend(self.ema.iter().map(|(n, t)| (format!("ema.{n}"), t.copy().expect("a CPU or GPU copy"))));
        out
    }

    /// Restores the state written by `state`; `step` comes from the trainer state.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: usize, source: &str) -> Result<()> {
        let mut take = |key: String, like: &Tensor| {
            let stored = tensors.remove(&key).ok_or_else(|| Error::Checkpoint {
                path: source.into(),
                message: format!("the optimizer state has no `{key}`"),
            })?;
            if stored.dims() != like.dims() {
                return Err(Error::Checkpoint {
                    path: source.into(),
                    message: format!("`{key}` has shape {:?}, the model {:?}", stored.dims(), like.dims()),
                });
            }
            Ok(stored.to_dtype(like.dtype())?)
        };
        for (name, mv) in self.moments.iter_mut() {
            let like = mv.get(0)?;
            *mv = Tensor::stack(&[take(format!("m.{name}"), &like)?, take(format!("v.{name}"), &like)?], 0)?;
        }
        for (name, t) in self.ema.iter_mut() {
            *t = take(format!("ema.{name}"), t)?.contiguous()?;
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW step's constants for one parameter.
struct AdamStep {
    betas: (f64, f64),
    /// The bias corrections 1 - beta^t.
    fix: (f64, f64),
    eps: f64,
    lr: f64,
    /// The decoupled weight decay factor 1 - lr wd (1 for exempt parameters).
    decay: f64,
    /// The clipping factor of the gradient.
    scale: f64,
}

impl AdamStep {
    /// The moments for gradient g: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2.
    fn moments(&self, m: f64, v: f64, g: f64) -> (f64, f64) {
        let g = g * self.scale;
        let (b1, b2) = self.betas;
        (b1 * m + (1.0 - b1) * g, b2 * v + (1.0 - b2) * g * g)
    }

    /// The weight after the step with the new moments.
    fn weight(&self, w: f64, m: f64, v: f64) -> f64 {
        w * self.decay - self.lr * (m / self.fix.0) / ((v / self.fix.1).sqrt() + self.eps)
    }

    /// The same with candle ops, on any device: (m', v', w').
    fn reference(&self, moments: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b1, b2) = self.betas;
        let g = (g * self.scale)?;
        let m = ((moments.get(0)? * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((moments.get(1)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let step = ((&m / self.fix.0)? / ((&v / self.fix.1)?.sqrt()? + self.eps)?)?;
        let w = ((w.detach() * self.decay)? - (step * self.lr)?)?;
        Ok((m, v, w))
    }
}

/// The moving average's step: avg' = d avg + (1 - d) w.
struct Average(f64);

/// Whether the in-place CPU passes apply: CPU tensors of one float type that candle stores
/// contiguously.
fn fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.is_contiguous() && t.dtype() == ts[0].dtype())
        && matches!(ts[0].dtype(), DType::F32 | DType::F64)
}

/// The elements of a contiguous CPU storage of type T.
fn elems<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// The same, mutable (f32 and f64).
fn elems_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<Floats<'a>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(Floats::F32(&mut v[start..end])),
        CpuStorage::F64(v) => Ok(Floats::F64(&mut v[start..end])),
        s => candle_core::bail!("the optimizer runs in f32 or f64, got {:?}", s.dtype()),
    }
}

enum Floats<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// Runs `f(dst, src)` on a destination and a source of the same float type, both contiguous.
macro_rules! with_floats {
    ($dst:expr, $l1:expr, $src:expr, $l2:expr, |$d:ident, $s:ident| $body:expr) => {
        match elems_mut($dst, $l1)? {
            Floats::F32($d) => {
                let $s = elems::<f32>($src, $l2)?;
                $body
            }
            Floats::F64($d) => {
                let $s = elems::<f64>($src, $l2)?;
                $body
            }
        }
    };
}

/// The moments (2, n) from the gradient (n), in place.
struct Moments<'a>(&'a AdamStep);

/// The weight (n) from the new moments (2, n), in place.
struct Weight<'a>(&'a AdamStep);

impl InplaceOp2 for Moments<'_> {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        with_floats!(s1, l1, s2, l2, |mv, g| {
            let (m, v) = mv.split_at_mut(g.len());
            for ((m, v), g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                let (m2, v2) = self.0.moments(m.to_f64(), v.to_f64(), g.to_f64());
                (*m, *v) = (WithDType::from_f64(m2), WithDType::from_f64(v2));
            }
        });
        Ok(())
    }
}

impl InplaceOp2 for Weight<'_> {
    fn name(&self) -> &'static str {
        "adamw-weight"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        with_floats!(s1, l1, s2, l2, |w, mv| {
            let (m, v) = mv.split_at(w.len());
            for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                *w = WithDType::from_f64(self.0.weight(w.to_f64(), m.to_f64(), v.to_f64()));
            }
        });
        Ok(())
    }
}

impl InplaceOp2 for Average {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let d = self.0;
        with_floats!(s1, l1, s2, l2, |avg, w| {
            for (a, w) in avg.iter_mut().zip(w) {
                *a = WithDType::from_f64(d * a.to_f64() + (1.0 - d) * w.to_f64());
            }
        });
        Ok(())
    }
}

/// The sum of squares of a contiguous f32 or f64 CPU tensor, read in place; `None` elsewhere.
fn squares_in_place(g: &Tensor) -> Result<Option<f64>> {
    if !g.device().is_cpu() || !g.is_contiguous() {
        return Ok(None);
    }
    let (s, l) = g.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else { return Ok(None) };
    Ok(match s {
        CpuStorage::F32(_) => Some(elems::<f32>(s, l)?.iter().map(|&x| (x as f64) * (x as f64)).sum()),
        CpuStorage::F64(_) => Some(elems::<f64>(s, l)?.iter().map(|&x| x * x).sum()),
        _ => None,
    })
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

    /// `params` declared as a model would: biases exempt from weight decay, the rest decayed.
    fn declared(params: &Params) -> Vec<Param> {
        params
            .iter()
            .map(|(n, p)| {
                let d = Param::new(n.as_str(), p.dims().to_vec(), mamba_nn::Init::Zeros);
                if n.ends_with(".bias") {
                    d.no_decay()
                } else {
                    d
                }
            })
            .collect()
    }

    #[test]
    fn a_parameter_the_model_does_not_declare_is_an_error() {
        let params: Params = [("w.weight".to_string(), Var::new(&[1.0f32], &Device::Cpu).unwrap())].into();
        let err = AdamW::new(config(0.1), &params, &[]).err().expect("an undeclared parameter").to_string();
        assert!(err.contains("w.weight"), "{err}");
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
        let mut opt = AdamW::new(c, &params, &declared(&params)).unwrap();
        let grads = [("w.weight".to_string(), Tensor::new(&[4.0f64], &Device::Cpu).unwrap())].into();
        let norm = opt.update(&params, &grads, 0.1).unwrap();
        assert_eq!(norm, 4.0);
        // Clipped gradient 1: m = 0.1, v = 0.01, unbiased 1 and 1: step 1 / (1 + eps).
        let want = 2.0 * (1.0 - 0.1 * 0.5) - 0.1 * (1.0 / (1.0 + 1e-8));
        let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    /// Several steps of the in-place passes (f32) against AdamW and the average written out per
    /// element in f64, for a decayed and an exempt parameter, with clipping and a state saved and
    /// restored half-way.
    #[test]
    fn in_place_steps_follow_the_formulas() {
        let init = [("a.weight", vec![0.5f32, -1.0, 2.0]), ("a.bias", vec![0.25f32, 0.75])];
        let params: Params =
            init.iter().map(|(n, v)| (n.to_string(), Var::new(v.as_slice(), &Device::Cpu).unwrap())).collect();
        let c = OptimConfig { weight_decay: 0.1, betas: (0.8, 0.95), ema: 0.9, clip_grad_norm: 1.5, ..config(0.05) };
        let mut opt = AdamW::new(c.clone(), &params, &declared(&params)).unwrap();
        // The expected state per element: weight, m, v, average.
        let mut want: Vec<(String, Vec<[f64; 4]>)> = init
            .iter()
            .map(|(n, v)| (n.to_string(), v.iter().map(|&w| [w as f64, 0.0, 0.0, w as f64]).collect()))
            .collect();
        for step in 1..=6 {
            let grads: HashMap<String, Tensor> = want
                .iter()
                .map(|(n, e)| {
                    let g: Vec<f32> = (0..e.len()).map(|i| ((step * 3 + i) % 5) as f32 - 1.5).collect();
                    (n.clone(), Tensor::new(g.as_slice(), &Device::Cpu).unwrap())
                })
                .collect();
            let norm: f64 = grads
                .values()
                .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
                .sum::<f64>()
                .sqrt();
            let scale = if norm > c.clip_grad_norm { c.clip_grad_norm / norm } else { 1.0 };
            let (lr, (b1, b2)) = (0.05 / step as f64, c.betas);
            let d = c.ema.min((1.0 + step as f64) / (10.0 + step as f64));
            for (name, elems) in want.iter_mut() {
                let g: Vec<f32> = grads[name].to_vec1().unwrap();
                let decay = if name.ends_with(".bias") { 1.0 } else { 1.0 - lr * c.weight_decay };
                for (e, &g) in elems.iter_mut().zip(&g) {
                    let g = g as f64 * scale;
                    e[1] = b1 * e[1] + (1.0 - b1) * g;
                    e[2] = b2 * e[2] + (1.0 - b2) * g * g;
                    let (mh, vh) = (e[1] / (1.0 - b1.powi(step as i32)), e[2] / (1.0 - b2.powi(step as i32)));
                    e[0] = e[0] * decay - lr * mh / (vh.sqrt() + c.eps);
                    e[3] = d * e[3] + (1.0 - d) * e[0];
                }
            }
            let got_norm = opt.update(&params, &grads, lr).unwrap();
            assert!((got_norm - norm).abs() < 1e-5 * norm, "norm {got_norm} vs {norm}");
            if step == 3 {
                let (state, at) = (opt.state(), opt.step);
                opt = AdamW::new(c.clone(), &params, &declared(&params)).unwrap();
                opt.load_state(state, at, "memory").unwrap();
            }
            for (name, elems) in &want {
                let w: Vec<f32> = params[name].as_tensor().to_vec1().unwrap();
                let avg: Vec<f32> = opt.ema().unwrap()[name].to_vec1().unwrap();
                for (i, e) in elems.iter().enumerate() {
                    assert!((w[i] as f64 - e[0]).abs() < 1e-6, "{name}[{i}] at step {step}: {} vs {}", w[i], e[0]);
                    assert!((avg[i] as f64 - e[3]).abs() < 1e-6, "ema {name}[{i}] at step {step}");
                }
            }
        }
    }

    /// The optimizer's state must not record ops: a recorded average holds the previous one, and
    /// a run's memory grows every step (it did, by megabytes a step, before the fix).
    #[test]
    fn the_state_holds_no_graph() {
        let p = Var::new(&[2.0f32, 1.0], &Device::Cpu).unwrap();
        let params: Params = [("w.weight".to_string(), p.clone())].into();
        let mut opt = AdamW::new(OptimConfig { ema: 0.9, ..config(0.1) }, &params, &declared(&params)).unwrap();
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
