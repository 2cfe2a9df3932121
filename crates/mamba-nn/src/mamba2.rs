//! The Mamba-2 mixer: in_proj to [z, x, B, C, dt] -> causal depthwise conv + SiLU over xBC ->
//! SSD scan (scalar A per head, D skip) -> y * silu(z) -> grouped RMSNorm (group size
//! d_inner / ngroups) -> out_proj. Names and shapes follow transformers' Mamba2Mixer. Over several
//! routes, in_proj, the norm and out_proj are shared; conv, dt_bias, A and D are shared or per
//! route (`conv1d_b`, `dt_bias_b`, `A_b_log`, `D_b` for the second, as for Mamba-1).

use crate::model::ConvCache;
use crate::norm::normalize;
use crate::routes::{check_causal, gather, route_suffix, run_routes, Merge, Route, RouteParams};
use crate::{compute_dtype, fan_in_bound, BackboneConfig, Init, Linear, Param, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{causal_conv1d_update, mamba2_inner, rms_norm, silu_gate, ssd_state_update, Mamba2Weights, SsdParams};

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
    fn load(vb: &VarBuilder, cfg: &BackboneConfig, sfx: &str) -> Result<Self> {
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let (h, conv_dim) = (cfg.nheads(), cfg.d_inner() + 2 * cfg.ngroups * cfg.d_state);
        Ok(Self {
            conv_weight: small.get((conv_dim, 1, cfg.d_conv), &format!("conv1d{sfx}.weight"))?,
            conv_bias: if cfg.conv_bias { Some(small.get(conv_dim, &format!("conv1d{sfx}.bias"))?) } else { None },
            dt_bias: small.get(h, &format!("dt_bias{sfx}"))?,
            a_log: small.get(h, &format!("A{sfx}_log"))?,
            d: small.get(h, &format!("D{sfx}"))?,
        })
    }

    fn params(&self, cfg: &BackboneConfig) -> SsdParams<'_> {
        SsdParams { d: Some(&self.d), z: None, dt_bias: Some(&self.dt_bias), dt_softplus: true, dt_limit: cfg.dt_limit }
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
    cfg: BackboneConfig,
}

impl Mamba2Mixer {
    pub fn load(vb: VarBuilder, cfg: &BackboneConfig) -> Result<Self> {
        Self::load_routed(vb, cfg, Route::by_names(&cfg.routes)?)
    }

    /// With routes made elsewhere (e.g. 2-d scan patterns over a patch grid), one per name in
    /// `cfg.routes`.
    pub fn load_routed(vb: VarBuilder, cfg: &BackboneConfig, routes: Vec<Route>) -> Result<Self> {
        let (d, di) = (cfg.d_model, cfg.d_inner());
        let in_dim = Self::in_proj_rows(cfg);
        let n_ssm = if cfg.route_params == RouteParams::PerRoute { routes.len() } else { 1 };
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (in_dim, d), cfg.proj_bias)?,
            ssms: (0..n_ssm).map(|i| Ssm::load(&vb, cfg, &route_suffix(i))).collect::<Result<_>>()?,
            routes,
            merge: cfg.merge,
            norm_weight: small.get(di, "norm.weight")?,
            out_proj: Linear::load(&vb, "out_proj", (d, di), cfg.proj_bias)?,
            cfg: cfg.clone(),
        })
    }

    /// The mixer's tensors and their initialisation (see `init.rs`): in_proj's rows are
    /// [z, xBC, dt]; the gated norm's weight one.
    pub fn params(cfg: &BackboneConfig) -> Vec<Param> {
        let norm = Param::new("norm.weight", vec![cfg.d_inner()], Init::Ones).no_decay();
        crate::model::conv_mixer_params(cfg, Self::in_proj_rows(cfg), vec![norm], |r| Self::ssm_params(cfg, r))
    }

    /// in_proj's output size: z, xBC and dt.
    fn in_proj_rows(cfg: &BackboneConfig) -> usize {
        2 * cfg.d_inner() + 2 * cfg.ngroups * cfg.d_state + cfg.nheads()
    }

    /// Route `i`'s own tensors.
    fn ssm_params(cfg: &BackboneConfig, i: usize) -> Vec<Param> {
        let (h, conv_dim, k) = (cfg.nheads(), cfg.d_inner() + 2 * cfg.ngroups * cfg.d_state, cfg.d_conv);
        let s = route_suffix(i);
        let mut v = vec![
            Param::fan_in(format!("conv1d{s}.weight"), vec![conv_dim, 1, k]),
            Param::new(format!("dt_bias{s}"), vec![h], Init::DtBias).no_decay(),
            Param::new(format!("A{s}_log"), vec![h], Init::LogUniformA).no_decay(),
            Param::new(format!("D{s}"), vec![h], Init::Ones).no_decay(),
        ];
        if cfg.conv_bias {
            let bound = fan_in_bound(&[conv_dim, 1, k]);
            v.push(Param::new(format!("conv1d{s}.bias"), vec![conv_dim], Init::Uniform(bound)).no_decay());
        }
        v
    }

    fn ssm(&self, route: usize) -> &Ssm {
        &self.ssms[route.min(self.ssms.len() - 1)]
    }

    /// Sizes of z, xBC and dt in the in_proj output.
    fn split(&self) -> (usize, usize, usize) {
        let di = self.cfg.d_inner();
        (di, di + 2 * self.cfg.ngroups * self.cfg.d_state, self.cfg.nheads())
    }

    /// y * silu(z), then [`Self::norm`]. y, z: (..., d_inner).
    fn gated_norm(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.norm(&silu_gate(y, z)?)
    }

    /// RMSNorm within each of the ngroups groups, times the norm weight.
    fn norm(&self, y: &Tensor) -> Result<Tensor> {
        if self.cfg.ngroups == 1 {
            return Ok(rms_norm(y, &self.norm_weight, self.cfg.norm_eps)?);
        }
        let mut grouped = y.dims().to_vec();
        let di = grouped.pop().unwrap_or(0);
        grouped.extend([self.cfg.ngroups, di / self.cfg.ngroups]);
        let normed = normalize(&y.reshape(grouped)?, self.cfg.norm_eps)?.reshape(y.shape())?;
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
            state: cfg.d_state,
            dt_limit: cfg.dt_limit,
            norm: Some((&self.norm_weight, cfg.norm_eps)),
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

    /// x: (batch, len, d_model) -> (batch, len, d_model), and the cache after the last token of
    /// the first route. Each route runs conv, SSD, gate and norm in its own order; the routes
    /// are merged before out_proj.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, ConvCache)> {
        let zxbcdt = self.in_proj.forward(x)?;
        let (y, cache) = run_routes(&self.routes, self.merge, zxbcdt.dim(1)?, |i, order| {
            self.route_forward(self.ssm(i), &zxbcdt, order)
        })?;
        Ok((self.out_proj.forward(&y)?, cache))
    }

    /// One token, x: (batch, d_model) -> (batch, d_model); advances the cache. Causal mixers
    /// (one forward route) only.
    pub fn step(&self, x: &Tensor, cache: &mut ConvCache) -> Result<Tensor> {
        check_causal(&self.routes)?;
        let batch = x.dim(0)?;
        let (h, p, g, n) = (self.cfg.nheads(), self.cfg.headdim, self.cfg.ngroups, self.cfg.d_state);
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

    /// A cache for a sequence not yet started: zeros. conv (batch, conv_dim, d_conv), ssm
    /// (batch, nheads, headdim, d_state).
    pub fn empty_cache(&self, batch: usize) -> Result<ConvCache> {
        let (_, conv_dim, h) = self.split();
        let a_log = &self.ssm(0).a_log;
        let (dt, dev) = (a_log.dtype(), a_log.device());
        Ok(ConvCache {
            conv: Tensor::zeros((batch, conv_dim, self.cfg.d_conv), dt, dev)?,
            ssm: Tensor::zeros((batch, h, self.cfg.headdim, self.cfg.d_state), dt, dev)?,
        })
    }
}
