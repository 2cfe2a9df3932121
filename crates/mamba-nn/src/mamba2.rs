//! The Mamba-2 mixer: in_proj to [z, x, B, C, dt] -> causal depthwise conv + SiLU over xBC ->
//! SSD scan (scalar A per head, D skip) -> y * silu(z) -> grouped RMSNorm (group size
//! d_inner / ngroups) -> out_proj. Names and shapes follow transformers' Mamba2Mixer. Over several
//! routes, in_proj, the norm and out_proj are shared; conv, dt_bias, A and D are shared or per
//! route (`conv1d_b`, `dt_bias_b`, `A_b_log`, `D_b` for the second, as for Mamba-1).

use crate::mixer::{conv_mixer_params, foreign_cache, ConvCache, Mixer, MixerCache, MixerSpec};
use crate::norm::normalize;
use crate::routes::{check_causal, gather, route_suffix, run_routes, Merge, Route, RouteParams};
use crate::{compute_dtype, fan_in_bound, BackboneConfig, Init, Linear, Param, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{causal_conv1d_update, mamba2_inner, rms_norm, silu_gate, ssd_state_update, Mamba2Weights, SsdParams};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A Mamba-2 mixer's keys of `[backbone]` (`kind = "mamba2"`), with the reference's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mamba2Config {
    pub d_conv: usize,
    pub conv_bias: bool,
    /// Bias on in_proj and out_proj.
    pub proj_bias: bool,
    /// Channels per head.
    pub headdim: usize,
    /// B/C groups: head h reads group h / (nheads / ngroups).
    pub ngroups: usize,
    /// The SSD's chunk length.
    pub chunk_size: usize,
    /// The clamp of dt after the softplus.
    pub dt_limit: (f64, f64),
}

impl Default for Mamba2Config {
    fn default() -> Self {
        Self {
            d_conv: 4,
            conv_bias: true,
            proj_bias: false,
            headdim: 64,
            ngroups: 1,
            chunk_size: 256,
            dt_limit: (0.0, f64::INFINITY),
        }
    }
}

impl Mamba2Config {
    pub fn nheads(&self, b: &BackboneConfig) -> usize {
        b.d_inner() / self.headdim.max(1)
    }

    /// The channels of the conv: x, B and C.
    fn conv_dim(&self, b: &BackboneConfig) -> usize {
        b.d_inner() + 2 * self.ngroups * b.d_state
    }

    /// in_proj's output size: z, xBC and dt.
    fn in_proj_rows(&self, b: &BackboneConfig) -> usize {
        b.d_inner() + self.conv_dim(b) + self.nheads(b)
    }

    /// Route `i`'s own tensors.
    fn ssm_params(&self, b: &BackboneConfig, i: usize) -> Vec<Param> {
        let (h, conv_dim, k) = (self.nheads(b), self.conv_dim(b), self.d_conv);
        let s = route_suffix(i);
        let mut v = vec![
            Param::fan_in(format!("conv1d{s}.weight"), vec![conv_dim, 1, k]),
            Param::new(format!("dt_bias{s}"), vec![h], Init::DtBias).no_decay(),
            Param::new(format!("A{s}_log"), vec![h], Init::LogUniformA).no_decay(),
            Param::new(format!("D{s}"), vec![h], Init::Ones).no_decay(),
        ];
        if self.conv_bias {
            let bound = fan_in_bound(&[conv_dim, 1, k]);
            v.push(Param::new(format!("conv1d{s}.bias"), vec![conv_dim], Init::Uniform(bound)).no_decay());
        }
        v
    }
}

impl MixerSpec for Mamba2Config {
    fn validate(&self, b: &BackboneConfig) -> std::result::Result<(), String> {
        if self.d_conv == 0 {
            return Err("`d_conv` must be at least 1".into());
        }
        crate::config::check_heads(b.d_inner(), self.headdim, self.ngroups, self.chunk_size)
    }

    /// in_proj's rows are [z, xBC, dt]; the gated norm's weight one.
    fn params(&self, b: &BackboneConfig) -> Vec<Param> {
        let norm = Param::new("norm.weight", vec![b.d_inner()], Init::Ones).no_decay();
        conv_mixer_params(b, self.proj_bias, self.in_proj_rows(b), vec![norm], |r| self.ssm_params(b, r))
    }

    fn load(&self, vb: VarBuilder, b: &BackboneConfig, routes: Vec<Route>) -> Result<Arc<dyn Mixer>> {
        Ok(Arc::new(Mamba2Mixer::new(vb, b, self, routes)?))
    }
}

/// The per-route part: conv over xBC, dt bias, A and D.
#[derive(Debug, Clone)]
struct Ssm {
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    dt_bias: Tensor,
    a_log: Tensor,
    d: Tensor,
}

impl Ssm {
    fn load(vb: &VarBuilder, b: &BackboneConfig, m: &Mamba2Config, sfx: &str) -> Result<Self> {
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let (h, conv_dim) = (m.nheads(b), m.conv_dim(b));
        Ok(Self {
            conv_weight: small.get((conv_dim, 1, m.d_conv), &format!("conv1d{sfx}.weight"))?,
            conv_bias: if m.conv_bias { Some(small.get(conv_dim, &format!("conv1d{sfx}.bias"))?) } else { None },
            dt_bias: small.get(h, &format!("dt_bias{sfx}"))?,
            a_log: small.get(h, &format!("A{sfx}_log"))?,
            d: small.get(h, &format!("D{sfx}"))?,
        })
    }

    fn params(&self, m: &Mamba2Config) -> SsdParams<'_> {
        SsdParams { d: Some(&self.d), z: None, dt_bias: Some(&self.dt_bias), dt_softplus: true, dt_limit: m.dt_limit }
    }

    /// A = -exp(A_log): (nheads).
    fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.exp()?.neg()?)
    }
}

#[derive(Debug, Clone)]
pub struct Mamba2Mixer {
    in_proj: Linear,
    /// One for all routes, or one per route.
    ssms: Vec<Ssm>,
    routes: Vec<Route>,
    merge: Merge,
    norm_weight: Tensor,
    out_proj: Linear,
    backbone: BackboneConfig,
    cfg: Mamba2Config,
}

impl Mamba2Mixer {
    /// Over `routes`, one per name in `b.routes`.
    fn new(vb: VarBuilder, b: &BackboneConfig, m: &Mamba2Config, routes: Vec<Route>) -> Result<Self> {
        let (d, di) = (b.d_model, b.d_inner());
        let n_ssm = if b.route_params == RouteParams::PerRoute { routes.len() } else { 1 };
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (m.in_proj_rows(b), d), m.proj_bias)?,
            ssms: (0..n_ssm).map(|i| Ssm::load(&vb, b, m, &route_suffix(i))).collect::<Result<_>>()?,
            routes,
            merge: b.merge,
            norm_weight: small.get(di, "norm.weight")?,
            out_proj: Linear::load(&vb, "out_proj", (d, di), m.proj_bias)?,
            backbone: b.clone(),
            cfg: m.clone(),
        })
    }

    fn ssm(&self, route: usize) -> &Ssm {
        &self.ssms[route.min(self.ssms.len() - 1)]
    }

    /// Sizes of z, xBC and dt in the in_proj output.
    fn split(&self) -> (usize, usize, usize) {
        let b = &self.backbone;
        (b.d_inner(), self.cfg.conv_dim(b), self.cfg.nheads(b))
    }

    /// y * silu(z), then [`Self::norm`]. y, z: (..., d_inner).
    fn gated_norm(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.norm(&silu_gate(y, z)?)
    }

    /// RMSNorm within each of the ngroups groups, times the norm weight.
    fn norm(&self, y: &Tensor) -> Result<Tensor> {
        if self.cfg.ngroups == 1 {
            return Ok(rms_norm(y, &self.norm_weight, self.backbone.norm_eps)?);
        }
        let mut grouped = y.dims().to_vec();
        let di = grouped.pop().unwrap_or(0);
        grouped.extend([self.cfg.ngroups, di / self.cfg.ngroups]);
        let normed = normalize(&y.reshape(grouped)?, self.backbone.norm_eps)?.reshape(y.shape())?;
        Ok(normed.broadcast_mul(&self.norm_weight)?)
    }

    /// One route over in_proj's output zxbcdt (batch, len, ·), visiting the positions in `order`:
    /// the gated, normed SSM output (batch, len, d_inner) in sequence order and the cache after
    /// the route's last token.
    fn route_forward(&self, ssm: &Ssm, zxbcdt: &Tensor, order: Option<&[u32]>) -> Result<(Tensor, ConvCache)> {
        let (di, conv_dim, _) = self.split();
        let cfg = &self.cfg;
        let w = Mamba2Weights {
            conv_weight: &ssm.conv_weight,
            conv_bias: ssm.conv_bias.as_ref(),
            dt_bias: &ssm.dt_bias,
            a_log: &ssm.a_log,
            d: &ssm.d,
            headdim: cfg.headdim,
            groups: cfg.ngroups,
            state: self.backbone.d_state,
            dt_limit: cfg.dt_limit,
            norm: Some((&self.norm_weight, self.backbone.norm_eps)),
        };
        let out = mamba2_inner(zxbcdt, &w, order)?;
        // The conv's last inputs along the route.
        let last = match order {
            Some(o) => gather(zxbcdt, &o[o.len().saturating_sub(cfg.d_conv)..])?,
            None => zxbcdt.clone(),
        };
        let conv = ConvCache::last_inputs(&last.narrow(2, di, conv_dim)?.transpose(1, 2)?, cfg.d_conv)?;
        Ok((out.y, ConvCache { conv, ssm: out.last_state }))
    }
}

impl Mixer for Mamba2Mixer {
    /// Each route runs conv, SSD, gate and norm in its own order; the routes are merged before
    /// out_proj.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)> {
        let zxbcdt = self.in_proj.forward(x)?;
        let (y, cache) = run_routes(&self.routes, self.merge, zxbcdt.dim(1)?, |i, order| {
            self.route_forward(self.ssm(i), &zxbcdt, order)
        })?;
        Ok((self.out_proj.forward(&y)?, MixerCache::Conv(cache)))
    }

    fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        check_causal(&self.routes)?;
        let MixerCache::Conv(cache) = cache else { return Err(foreign_cache()) };
        let batch = x.dim(0)?;
        let (h, p, g, n) = (self.cfg.nheads(&self.backbone), self.cfg.headdim, self.cfg.ngroups, self.backbone.d_state);
        let (di, conv_dim, _) = self.split();
        let ssm = self.ssm(0);
        let zxbcdt = self.in_proj.forward(x)?;
        let (z, xbc, dt) =
            (zxbcdt.narrow(1, 0, di)?, zxbcdt.narrow(1, di, conv_dim)?, zxbcdt.narrow(1, di + conv_dim, h)?);
        let (xbc, conv) = causal_conv1d_update(&cache.conv, &xbc, &ssm.conv_weight, ssm.conv_bias.as_ref(), true)?;
        let xs = xbc.narrow(1, 0, di)?.reshape((batch, h, p))?;
        let b = xbc.narrow(1, di, g * n)?.reshape((batch, g, n))?;
        let c = xbc.narrow(1, di + g * n, g * n)?.reshape((batch, g, n))?;
        let (y, ssm_state) = ssd_state_update(&cache.ssm, &xs, &dt, &ssm.a()?, &b, &c, &ssm.params(&self.cfg))?;
        *cache = ConvCache { conv, ssm: ssm_state };
        self.out_proj.forward(&self.gated_norm(&y.reshape((batch, di))?, &z)?)
    }

    /// Zeros: conv (batch, conv_dim, d_conv), ssm (batch, nheads, headdim, d_state).
    fn empty_cache(&self, batch: usize) -> Result<MixerCache> {
        let (_, conv_dim, h) = self.split();
        let a_log = &self.ssm(0).a_log;
        let (dt, dev) = (a_log.dtype(), a_log.device());
        Ok(MixerCache::Conv(ConvCache {
            conv: Tensor::zeros((batch, conv_dim, self.cfg.d_conv), dt, dev)?,
            ssm: Tensor::zeros((batch, h, self.cfg.headdim, self.backbone.d_state), dt, dev)?,
        }))
    }
}
