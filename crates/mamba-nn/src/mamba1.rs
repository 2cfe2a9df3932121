//! The Mamba-1 mixer (selective SSM block): in_proj -> causal depthwise conv + SiLU -> x_proj
//! (dt, B, C) -> dt_proj -> selective scan with D skip and z gate -> out_proj.
//! Parameter names and shapes follow transformers' MambaMixer, so `VarBuilder::pp` paths are the
//! checkpoint keys. Over several routes, in_proj and out_proj are shared and each route either
//! shares the SSM parameters or has its own (Vim's names: `conv1d_b`, `x_proj_b`, `dt_proj_b`,
//! `A_b_log`, `D_b` for the second route).

use crate::mixer::{conv_mixer_params, foreign_cache, ConvCache, Mixer, MixerCache, MixerSpec};
use crate::routes::{check_causal, gathered, route_suffix, run_routes, Merge, Route, RouteParams};
use crate::{compute_dtype, fan_in_bound, BackboneConfig, Init, Linear, Param, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{
    causal_conv1d, causal_conv1d_update, mamba_inner, selective_scan, selective_state_update, InnerWeights, ScanParams,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A Mamba-1 mixer's keys of `[backbone]` (`kind = "mamba1"`), with the reference's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mamba1Config {
    pub d_conv: usize,
    pub conv_bias: bool,
    /// Bias on in_proj and out_proj.
    pub proj_bias: bool,
    /// The rank of the dt projection; None: ceil(d_model / 16), the reference's "auto".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dt_rank: Option<usize>,
    /// false: the ablation of the paper's Table 1, a time-invariant SSM: dt, B and C do not
    /// depend on the input (dt = softplus(dt_bias) per channel, B and C learned vectors), so the
    /// mixer cannot select what to remember.
    pub selective: bool,
}

impl Default for Mamba1Config {
    fn default() -> Self {
        Self { d_conv: 4, conv_bias: true, proj_bias: false, dt_rank: None, selective: true }
    }
}

impl Mamba1Config {
    /// The rank of the dt projection in a model of width `d_model`.
    pub fn dt_rank(&self, d_model: usize) -> usize {
        self.dt_rank.unwrap_or(d_model.div_ceil(16))
    }

    /// Route `i`'s own tensors.
    fn ssm_params(&self, b: &BackboneConfig, i: usize) -> Vec<Param> {
        let (di, r, n, k) = (b.d_inner(), self.dt_rank(b.d_model), b.d_state, self.d_conv);
        let s = route_suffix(i);
        let mut v = vec![
            Param::fan_in(format!("conv1d{s}.weight"), vec![di, 1, k]),
            Param::new(format!("A{s}_log"), vec![di, n], Init::S4dReal).no_decay(),
            Param::new(format!("D{s}"), vec![di], Init::Ones).no_decay(),
        ];
        if self.selective {
            v.push(Param::fan_in(format!("x_proj{s}.weight"), vec![r + 2 * n, di]).matrix());
            v.push(Param::new(format!("dt_proj{s}.weight"), vec![di, r], Init::DtProj { dt_rank: r }).matrix());
            v.push(Param::new(format!("dt_proj{s}.bias"), vec![di], Init::DtBias).no_decay());
        } else {
            // The time-invariant ablation's input and output vectors (decayed, as the ablation
            // was run).
            v.extend([
                Param::new(format!("dt_bias{s}"), vec![di], Init::DtBias).no_decay(),
                Param::new(format!("B{s}"), vec![n], Init::Ones),
                Param::new(format!("C{s}"), vec![n], Init::Uniform(1.0 / (n as f64).sqrt())),
            ]);
        }
        if self.conv_bias {
            // A conv bias's fan-in is its weight's: 1 x d_conv.
            v.push(
                Param::new(format!("conv1d{s}.bias"), vec![di], Init::Uniform(fan_in_bound(&[di, 1, k]))).no_decay(),
            );
        }
        v
    }
}

impl MixerSpec for Mamba1Config {
    fn validate(&self, _: &BackboneConfig) -> std::result::Result<(), String> {
        if self.d_conv == 0 {
            return Err("`d_conv` must be at least 1".into());
        }
        if self.dt_rank == Some(0) {
            return Err("`dt_rank` must be at least 1".into());
        }
        Ok(())
    }

    /// in_proj's rows are [x, z]; then each route's conv, A, D and selection.
    fn params(&self, b: &BackboneConfig) -> Vec<Param> {
        conv_mixer_params(b, self.proj_bias, 2 * b.d_inner(), vec![], |r| self.ssm_params(b, r))
    }

    fn load(&self, vb: VarBuilder, b: &BackboneConfig, routes: Vec<Route>) -> Result<Arc<dyn Mixer>> {
        Ok(Arc::new(Mamba1Mixer::new(vb, b, self, routes)?))
    }
}

/// How dt, B and C are made.
#[derive(Debug, Clone)]
enum Selection {
    /// From the input, through x_proj and dt_proj: the selection mechanism.
    Selective { x_proj: Linear, dt_proj: Linear, dt_rank: usize },
    /// dt = softplus(dt_bias) per channel, B and C learned vectors: the time-invariant ablation.
    Fixed { dt_bias: Tensor, b: Tensor, c: Tensor },
}

/// The per-route part: conv, dt / B / C, A, D.
#[derive(Debug, Clone)]
struct Ssm {
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    selection: Selection,
    a_log: Tensor,
    d: Tensor,
    d_state: usize,
}

impl Ssm {
    fn load(vb: &VarBuilder, b: &BackboneConfig, m: &Mamba1Config, sfx: &str) -> Result<Self> {
        let (di, r, n, k) = (b.d_inner(), m.dt_rank(b.d_model), b.d_state, m.d_conv);
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let selection = if m.selective {
            Selection::Selective {
                x_proj: Linear::load(vb, &format!("x_proj{sfx}"), (r + 2 * n, di), false)?,
                dt_proj: Linear::load(vb, &format!("dt_proj{sfx}"), (di, r), true)?,
                dt_rank: r,
            }
        } else {
            Selection::Fixed {
                dt_bias: small.get(di, &format!("dt_bias{sfx}"))?,
                b: small.get(n, &format!("B{sfx}"))?,
                c: small.get(n, &format!("C{sfx}"))?,
            }
        };
        Ok(Self {
            conv_weight: small.get((di, 1, k), &format!("conv1d{sfx}.weight"))?,
            conv_bias: if m.conv_bias { Some(small.get(di, &format!("conv1d{sfx}.bias"))?) } else { None },
            selection,
            a_log: small.get((di, n), &format!("A{sfx}_log"))?,
            d: small.get(di, &format!("D{sfx}"))?,
            d_state: n,
        })
    }

    /// A = -exp(A_log): (d_inner, d_state).
    fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.exp()?.neg()?)
    }

    /// dt (without its bias, which the scan adds before the softplus), B and C for the conv
    /// output `u`: (..., d_inner) -> (..., d_inner), (..., d_state), (..., d_state).
    fn dt_b_c(&self, u: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let n = self.d_state;
        match &self.selection {
            Selection::Selective { x_proj, dt_proj, dt_rank: r } => {
                let x_dbl = x_proj.forward(u)?;
                let last = x_dbl.rank() - 1;
                let dt = dt_proj.matmul(&x_dbl.narrow(last, 0, *r)?)?;
                Ok((dt, x_dbl.narrow(last, *r, n)?, x_dbl.narrow(last, r + n, n)?))
            }
            Selection::Fixed { b, c, .. } => {
                let mut shape = u.dims().to_vec();
                *shape.last_mut().expect("u has a channel dimension") = n;
                Ok((u.zeros_like()?, b.broadcast_as(shape.as_slice())?, c.broadcast_as(shape.as_slice())?))
            }
        }
    }

    fn params<'a>(&'a self, z: &'a Tensor) -> ScanParams<'a> {
        let delta_bias = match &self.selection {
            Selection::Selective { dt_proj, .. } => dt_proj.bias(),
            Selection::Fixed { dt_bias, .. } => Some(dt_bias),
        };
        ScanParams { d: Some(&self.d), z: Some(z), delta_bias, delta_softplus: true }
    }

    /// xz: (batch, len, 2 d_inner), in_proj's output in sequence order, through the route
    /// `order` -> y (batch, len, d_inner) in sequence order, and the cache after the route's last
    /// token. The selective SSM is one fused op that reads through the order.
    fn forward(&self, xz: &Tensor, order: Option<&[u32]>) -> Result<(Tensor, ConvCache)> {
        if let Selection::Selective { x_proj, dt_proj, .. } = &self.selection {
            let w = InnerWeights {
                conv_weight: &self.conv_weight,
                conv_bias: self.conv_bias.as_ref(),
                x_proj: x_proj.weight(),
                dt_proj: dt_proj.weight(),
                dt_bias: dt_proj.bias().ok_or_else(|| crate::Error::Config {
                    path: "dt_proj".into(),
                    message: "the selective SSM needs dt_proj.bias".into(),
                })?,
                a_log: &self.a_log,
                d: &self.d,
            };
            let out = mamba_inner(xz, &w, order)?;
            return Ok((out.y, ConvCache { conv: out.conv_state, ssm: out.last_state }));
        }
        gathered(xz, order, |t| {
            let di = t.dim(2)? / 2;
            // (batch, len, d_inner) viewed as (batch, d_inner, len): the kernels read it in place.
            let (x, z) = (t.narrow(2, 0, di)?.transpose(1, 2)?, t.narrow(2, di, di)?.transpose(1, 2)?);
            let u = causal_conv1d(&x, &self.conv_weight, self.conv_bias.as_ref(), true)?;
            let (dt, b, c) = self.dt_b_c(&u.transpose(1, 2)?)?;
            let (dt, b, c) = (dt.transpose(1, 2)?, b.transpose(1, 2)?, c.transpose(1, 2)?);
            let out = selective_scan(&u, &dt, &self.a()?, &b, &c, &self.params(&z), None)?;
            let conv = ConvCache::last_inputs(&x, self.conv_weight.dim(2)?)?;
            Ok((out.y.transpose(1, 2)?, ConvCache { conv, ssm: out.last_state }))
        })
    }

    /// x, z: (batch, d_inner) -> y (batch, d_inner); advances the cache.
    fn step(&self, x: &Tensor, z: &Tensor, cache: &mut ConvCache) -> Result<Tensor> {
        let (u, conv) = causal_conv1d_update(&cache.conv, x, &self.conv_weight, self.conv_bias.as_ref(), true)?;
        let (dt, b, c) = self.dt_b_c(&u)?;
        let (y, ssm) = selective_state_update(&cache.ssm, &u, &dt, &self.a()?, &b, &c, &self.params(z))?;
        *cache = ConvCache { conv, ssm };
        Ok(y)
    }
}

#[derive(Debug, Clone)]
pub struct Mamba1Mixer {
    in_proj: Linear,
    /// One for all routes, or one per route.
    ssms: Vec<Ssm>,
    routes: Vec<Route>,
    merge: Merge,
    out_proj: Linear,
    d_inner: usize,
}

impl Mamba1Mixer {
    /// Over `routes`, one per name in `b.routes`.
    fn new(vb: VarBuilder, b: &BackboneConfig, m: &Mamba1Config, routes: Vec<Route>) -> Result<Self> {
        let (d, di) = (b.d_model, b.d_inner());
        let n_ssm = if b.route_params == RouteParams::PerRoute { routes.len() } else { 1 };
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (2 * di, d), m.proj_bias)?,
            ssms: (0..n_ssm).map(|i| Ssm::load(&vb, b, m, &route_suffix(i))).collect::<Result<_>>()?,
            routes,
            merge: b.merge,
            out_proj: Linear::load(&vb, "out_proj", (d, di), m.proj_bias)?,
            d_inner: di,
        })
    }

    fn ssm(&self, route: usize) -> &Ssm {
        &self.ssms[route.min(self.ssms.len() - 1)]
    }
}

impl Mixer for Mamba1Mixer {
    /// The routes are merged before out_proj.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)> {
        let xz = self.in_proj.forward(x)?;
        let (y, cache) = run_routes(&self.routes, self.merge, xz.dim(1)?, |i, order| self.ssm(i).forward(&xz, order))?;
        Ok((self.out_proj.forward(&y)?, MixerCache::Conv(cache)))
    }

    fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        check_causal(&self.routes)?;
        let MixerCache::Conv(cache) = cache else { return Err(foreign_cache()) };
        let di = self.d_inner;
        let xz = self.in_proj.forward(x)?;
        let y = self.ssm(0).step(&xz.narrow(1, 0, di)?, &xz.narrow(1, di, di)?, cache)?;
        self.out_proj.forward(&y)
    }

    /// Zeros: conv (batch, d_inner, d_conv), ssm (batch, d_inner, d_state).
    fn empty_cache(&self, batch: usize) -> Result<MixerCache> {
        let s = self.ssm(0);
        let k = s.conv_weight.dim(2)?;
        let (dt, dev) = (s.a_log.dtype(), s.a_log.device());
        Ok(MixerCache::Conv(ConvCache {
            conv: Tensor::zeros((batch, self.d_inner, k), dt, dev)?,
            ssm: Tensor::zeros((batch, self.d_inner, s.d_state), dt, dev)?,
        }))
    }
}
