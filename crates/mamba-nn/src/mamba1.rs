//! The Mamba-1 mixer (selective SSM block): in_proj -> causal depthwise conv + SiLU -> x_proj
//! (dt, B, C) -> dt_proj -> selective scan with D skip and z gate -> out_proj.
//! Parameter names and shapes follow transformers' MambaMixer, so `VarBuilder::pp` paths are the
//! checkpoint keys.

use crate::model::MixerCache;
use crate::Linear;
use crate::{BackboneConfig, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update, ScanParams};

#[derive(Debug, Clone)]
pub struct Mamba1Mixer {
    in_proj: Linear,
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    x_proj: Linear,
    dt_proj: Linear,
    a_log: Tensor,
    d: Tensor,
    out_proj: Linear,
    d_inner: usize,
    dt_rank: usize,
    d_state: usize,
}

impl Mamba1Mixer {
    pub fn load(vb: VarBuilder, cfg: &BackboneConfig) -> Result<Self> {
        let (d, di, r, n, k) = (cfg.d_model, cfg.d_inner(), cfg.dt_rank, cfg.d_state, cfg.d_conv);
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (2 * di, d), cfg.proj_bias)?,
            conv_weight: vb.get((di, 1, k), "conv1d.weight")?,
            conv_bias: if cfg.conv_bias { Some(vb.get(di, "conv1d.bias")?) } else { None },
            x_proj: Linear::load(&vb, "x_proj", (r + 2 * n, di), false)?,
            dt_proj: Linear::load(&vb, "dt_proj", (di, r), true)?,
            a_log: vb.get((di, n), "A_log")?,
            d: vb.get(di, "D")?,
            out_proj: Linear::load(&vb, "out_proj", (d, di), cfg.proj_bias)?,
            d_inner: di,
            dt_rank: r,
            d_state: n,
        })
    }

    /// A = -exp(A_log): (d_inner, d_state).
    fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.exp()?.neg()?)
    }

    /// dt (without its bias, which the scan adds before the softplus), B and C from the conv output
    /// `u`: (..., d_inner) -> (..., d_inner), (..., d_state), (..., d_state).
    fn dt_b_c(&self, u: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (r, n) = (self.dt_rank, self.d_state);
        let x_dbl = self.x_proj.forward(u)?;
        let last = x_dbl.rank() - 1;
        let dt = x_dbl.narrow(last, 0, r)?.broadcast_matmul(&self.dt_proj.weight().t()?)?;
        Ok((dt, x_dbl.narrow(last, r, n)?, x_dbl.narrow(last, r + n, n)?))
    }

    fn params<'a>(&'a self, z: &'a Tensor) -> ScanParams<'a> {
        ScanParams { d: Some(&self.d), z: Some(z), delta_bias: self.dt_proj.bias(), delta_softplus: true }
    }

    /// x: (batch, len, d_model) -> (batch, len, d_model), and the cache after the last token.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)> {
        let di = self.d_inner;
        let xz = self.in_proj.forward(x)?;
        // (batch, len, d_inner) halves viewed as (batch, d_inner, len): the kernels read them in place.
        let x_in = xz.narrow(2, 0, di)?.transpose(1, 2)?;
        let z = xz.narrow(2, di, di)?.transpose(1, 2)?;
        let u = causal_conv1d(&x_in, &self.conv_weight, self.conv_bias.as_ref(), true)?;
        let (dt, b, c) = self.dt_b_c(&u.transpose(1, 2)?)?;
        let (dt, b, c) = (dt.transpose(1, 2)?, b.transpose(1, 2)?, c.transpose(1, 2)?);
        let out = selective_scan(&u, &dt, &self.a()?, &b, &c, &self.params(&z), None)?;
        let y = self.out_proj.forward(&out.y.transpose(1, 2)?)?;
        let conv = MixerCache::last_inputs(&x_in, self.conv_weight.dim(2)?)?;
        Ok((y, MixerCache { conv, ssm: out.last_state }))
    }

    /// One token, x: (batch, d_model) -> (batch, d_model); advances the cache.
    pub fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        let di = self.d_inner;
        let xz = self.in_proj.forward(x)?;
        let (x_in, z) = (xz.narrow(1, 0, di)?, xz.narrow(1, di, di)?);
        let (u, conv) = causal_conv1d_update(&cache.conv, &x_in, &self.conv_weight, self.conv_bias.as_ref(), true)?;
        let (dt, b, c) = self.dt_b_c(&u)?;
        let (y, ssm) = selective_state_update(&cache.ssm, &u, &dt, &self.a()?, &b, &c, &self.params(&z))?;
        *cache = MixerCache { conv, ssm };
        self.out_proj.forward(&y)
    }

    /// A cache for a sequence not yet started: zeros. conv (batch, d_inner, d_conv), ssm
    /// (batch, d_inner, d_state).
    pub fn empty_cache(&self, batch: usize) -> Result<MixerCache> {
        let k = self.conv_weight.dim(2)?;
        let (dt, dev) = (self.a_log.dtype(), self.a_log.device());
        Ok(MixerCache {
            conv: Tensor::zeros((batch, self.d_inner, k), dt, dev)?,
            ssm: Tensor::zeros((batch, self.d_inner, self.d_state), dt, dev)?,
        })
    }
}
