//! The Mamba-2 mixer: in_proj to [z, x, B, C, dt] -> causal depthwise conv + SiLU over xBC ->
//! SSD scan (scalar A per head, D skip) -> y * silu(z) -> grouped RMSNorm (group size
//! d_inner / ngroups) -> out_proj. Names and shapes follow transformers' Mamba2Mixer.

use crate::model::MixerCache;
use crate::norm::normalize;
use crate::{compute_dtype, Linear};
use crate::{BackboneConfig, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{causal_conv1d, causal_conv1d_update, silu_gate, ssd_chunk_scan, ssd_state_update, SsdParams};

#[derive(Debug, Clone)]
pub struct Mamba2Mixer {
    in_proj: Linear,
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    dt_bias: Tensor,
    a_log: Tensor,
    d: Tensor,
    norm_weight: Tensor,
    out_proj: Linear,
    cfg: BackboneConfig,
}

impl Mamba2Mixer {
    pub fn load(vb: VarBuilder, cfg: &BackboneConfig) -> Result<Self> {
        let (d, di, h, k) = (cfg.d_model, cfg.d_inner(), cfg.nheads(), cfg.d_conv);
        let conv_dim = di + 2 * cfg.ngroups * cfg.d_state;
        let in_dim = 2 * di + 2 * cfg.ngroups * cfg.d_state + h;
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let lin = |name: &str, shape: (usize, usize)| Linear::load(&vb, name, shape, cfg.proj_bias);
        Ok(Self {
            in_proj: lin("in_proj", (in_dim, d))?,
            conv_weight: small.get((conv_dim, 1, k), "conv1d.weight")?,
            conv_bias: if cfg.conv_bias { Some(small.get(conv_dim, "conv1d.bias")?) } else { None },
            dt_bias: small.get(h, "dt_bias")?,
            a_log: small.get(h, "A_log")?,
            d: small.get(h, "D")?,
            norm_weight: small.get(di, "norm.weight")?,
            out_proj: lin("out_proj", (d, di))?,
            cfg: cfg.clone(),
        })
    }

    fn params(&self) -> SsdParams<'_> {
        SsdParams {
            d: Some(&self.d),
            z: None,
            dt_bias: Some(&self.dt_bias),
            dt_softplus: true,
            dt_limit: self.cfg.dt_limit,
        }
    }

    /// Sizes of z, xBC and dt in the in_proj output.
    fn split(&self) -> (usize, usize, usize) {
        let di = self.cfg.d_inner();
        (di, di + 2 * self.cfg.ngroups * self.cfg.d_state, self.cfg.nheads())
    }

    /// y * silu(z), RMSNorm within each of the ngroups groups, times the norm weight, out_proj.
    /// y, z: (..., d_inner).
    fn gated_norm_out(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let y = silu_gate(y, z)?;
        let mut grouped = y.dims().to_vec();
        let di = grouped.pop().unwrap_or(0);
        grouped.extend([self.cfg.ngroups, di / self.cfg.ngroups]);
        let normed = normalize(&y.reshape(grouped)?, self.cfg.norm_eps)?.reshape(y.shape())?;
        self.out_proj.forward(&normed.broadcast_mul(&self.norm_weight)?)
    }

    /// A = -exp(A_log): (nheads).
    fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.exp()?.neg()?)
    }

    /// x: (batch, len, d_model) -> (batch, len, d_model), and the cache after the last token.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)> {
        let (batch, len, _) = x.dims3()?;
        let (h, p, g, n) = (self.cfg.nheads(), self.cfg.headdim, self.cfg.ngroups, self.cfg.d_state);
        let (di, conv_dim, _) = self.split();
        let zxbcdt = self.in_proj.forward(x)?;
        let z = zxbcdt.narrow(2, 0, di)?;
        let xbc = zxbcdt.narrow(2, di, conv_dim)?.transpose(1, 2)?; // (batch, conv_dim, len), read in place
        let dt = zxbcdt.narrow(2, di + conv_dim, h)?.contiguous()?;
        let conv = causal_conv1d(&xbc, &self.conv_weight, self.conv_bias.as_ref(), true)?.transpose(1, 2)?;
        let part = |start: usize, size: usize, shape: &[usize]| conv.narrow(2, start, size)?.reshape(shape);
        let xs = part(0, di, &[batch, len, h, p])?;
        let (b, c) = (part(di, g * n, &[batch, len, g, n])?, part(di + g * n, g * n, &[batch, len, g, n])?);
        let out = ssd_chunk_scan(&xs, &dt, &self.a()?, &b, &c, self.cfg.chunk_size, &self.params(), None)?;
        let y = self.gated_norm_out(&out.y.reshape((batch, len, di))?, &z)?;
        let conv = MixerCache::last_inputs(&xbc, self.cfg.d_conv)?;
        Ok((y, MixerCache { conv, ssm: out.last_state }))
    }

    /// One token, x: (batch, d_model) -> (batch, d_model); advances the cache.
    pub fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let (h, p, g, n) = (self.cfg.nheads(), self.cfg.headdim, self.cfg.ngroups, self.cfg.d_state);
        let (di, conv_dim, _) = self.split();
        let zxbcdt = self.in_proj.forward(x)?;
        let (z, xbc, dt) =
            (zxbcdt.narrow(1, 0, di)?, zxbcdt.narrow(1, di, conv_dim)?, zxbcdt.narrow(1, di + conv_dim, h)?);
        let (xbc, conv) = causal_conv1d_update(&cache.conv, &xbc, &self.conv_weight, self.conv_bias.as_ref(), true)?;
        let xs = xbc.narrow(1, 0, di)?.reshape((batch, h, p))?;
        let b = xbc.narrow(1, di, g * n)?.reshape((batch, g, n))?;
        let c = xbc.narrow(1, di + g * n, g * n)?.reshape((batch, g, n))?;
        let (y, ssm) = ssd_state_update(&cache.ssm, &xs, &dt, &self.a()?, &b, &c, &self.params())?;
        *cache = MixerCache { conv, ssm };
        self.gated_norm_out(&y.reshape((batch, di))?, &z)
    }

    /// A cache for a sequence not yet started: zeros. conv (batch, conv_dim, d_conv), ssm
    /// (batch, nheads, headdim, d_state).
    pub fn empty_cache(&self, batch: usize) -> Result<MixerCache> {
        let (_, conv_dim, h) = self.split();
        let (dt, dev) = (self.a_log.dtype(), self.a_log.device());
        Ok(MixerCache {
            conv: Tensor::zeros((batch, conv_dim, self.cfg.d_conv), dt, dev)?,
            ssm: Tensor::zeros((batch, h, self.cfg.headdim, self.cfg.d_state), dt, dev)?,
        })
    }
}
