//! What a mixer kind provides. Its config (one arm of [`MixerConfig`]) implements [`MixerSpec`]:
//! its checks, its tensors and how to build it; the mixer it builds implements [`Mixer`]. The
//! blocks, loading, initialisation, optimizer groups and dtypes see mixers only through these two
//! traits.

use crate::{fan_in_bound, BackboneConfig, Error, Init, Param, Result, Route, RouteParams};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::Mamba3State;
use std::sync::Arc;

/// A mixer kind's keys of `[backbone]` beyond the shared sizes, and what follows from them.
pub trait MixerSpec {
    /// Sizes that cannot build the mixer, named by their keys.
    fn validate(&self, backbone: &BackboneConfig) -> std::result::Result<(), String>;

    /// Whether each route can have tensors of its own (`route_params = "per_route"`), or every
    /// route shares the mixer's.
    fn routes_own_params(&self) -> bool {
        true
    }

    /// Every tensor of one mixer, in the order initialisation draws them: name (under the
    /// mixer's path), shape, init rule, weight-decay group and dtype role.
    fn params(&self, backbone: &BackboneConfig) -> Vec<Param>;

    /// The mixer, its tensors read from `vb` (the mixer's path), scanning over `routes` (one per
    /// name in `backbone.routes`; made elsewhere for 2-d patterns over a patch grid).
    fn load(&self, vb: VarBuilder, backbone: &BackboneConfig, routes: Vec<Route>) -> Result<Arc<dyn Mixer>>;
}

/// A sequence mixer: a whole sequence at once, or one token at a time with a cache.
pub trait Mixer: std::fmt::Debug + Send + Sync {
    /// x: (batch, len, d_model) -> (batch, len, d_model), and the cache after the last token of
    /// the first route.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)>;

    /// One token, x: (batch, d_model) -> (batch, d_model); advances the cache. Causal mixers
    /// (one forward route) only.
    fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor>;

    /// The cache of `batch` sequences not yet started.
    fn empty_cache(&self, batch: usize) -> Result<MixerCache>;
}

/// What a mixer carries from one token to the next, by the shape of its state.
#[derive(Debug, Clone)]
pub enum MixerCache {
    /// Mamba-1 and Mamba-2.
    Conv(ConvCache),
    /// Mamba-3, which has no conv.
    Mamba3(Mamba3State),
}

/// The cache of a mixer with a causal conv in front of its scan.
#[derive(Debug, Clone)]
pub struct ConvCache {
    /// The last d_conv inputs of the conv: (batch, channels, d_conv).
    pub conv: Tensor,
    /// The SSM state: (batch, d_inner, d_state) for Mamba-1, (batch, nheads, headdim, d_state) for
    /// Mamba-2.
    pub ssm: Tensor,
}

impl ConvCache {
    /// The last `width` columns of x (batch, channels, len), zeros in front when len < width.
    pub(crate) fn last_inputs(x: &Tensor, width: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let x = if len < width { x.pad_with_zeros(2, width - len, 0)? } else { x.narrow(2, len - width, width)? };
        Ok(x.contiguous()?)
    }
}

/// The error of a cache handed to a mixer of another kind.
pub(crate) fn foreign_cache() -> Error {
    Error::Config { path: "cache".into(), message: "the cache was made by another kind of mixer".into() }
}

/// The tensors of a Mamba-1 or Mamba-2 mixer, in the order they are drawn: in_proj (`in_out` rows),
/// the mixer's own `extra` tensors, out_proj (scaled down by sqrt(n_layer), GPT-2's prenorm
/// residual rescaling), the projections' biases (`proj_bias`), and the SSM tensors of each route
/// that has its own (`ssm(route)`).
pub(crate) fn conv_mixer_params(
    c: &BackboneConfig,
    proj_bias: bool,
    in_out: usize,
    extra: Vec<Param>,
    ssm: impl Fn(usize) -> Vec<Param>,
) -> Vec<Param> {
    let (d, di) = (c.d_model, c.d_inner());
    let mut mixer = vec![Param::fan_in("in_proj.weight", vec![in_out, d]).matrix()];
    mixer.extend(extra);
    let out_bound = fan_in_bound(&[d, di]) / (c.n_layer as f64).sqrt();
    mixer.push(Param::new("out_proj.weight", vec![d, di], Init::Uniform(out_bound)).matrix());
    if proj_bias {
        mixer.push(Param::new("in_proj.bias", vec![in_out], Init::Zeros).no_decay());
        mixer.push(Param::new("out_proj.bias", vec![d], Init::Zeros).no_decay());
    }
    let own = if c.route_params == RouteParams::PerRoute { c.routes.len() } else { 1 };
    mixer.extend((0..own).flat_map(ssm));
    mixer
}
