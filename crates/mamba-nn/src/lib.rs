//! Layers and models on top of `mamba-ssm`: the Mamba-1, Mamba-2 and Mamba-3 mixers with their
//! reference parameterisation, RMSNorm, residual blocks, the backbone and a causal language
//! model, loaded from Hugging Face `save_pretrained` directories or initialised as the reference
//! initialises them.
//!
//! Every mixer has a parallel `forward` over a sequence, which also returns the inference cache
//! after its last token, and a single-token `step` that advances that cache (the [`Mixer`]
//! trait). Its config, one arm of [`MixerConfig`], declares its tensors once ([`MixerSpec`]).

mod config;
mod error;
mod hf_config;
mod init;
mod linear;
mod mamba1;
mod mamba2;
mod mamba3;
mod mixer;
mod model;
mod norm;
mod param;
mod routes;

pub use config::{BackboneConfig, LmConfig, MixerConfig};
pub use error::{Error, Result};
pub use init::{init_params, init_tensors, inverse_softplus, InitConfig};
pub use linear::{compute_dtype, Linear};
pub use mamba1::Mamba1Config;
pub use mamba2::Mamba2Config;
pub use mamba3::Mamba3Config;
pub use mixer::{ConvCache, Mixer, MixerCache, MixerSpec};
pub use model::{save_hf, Backbone, Block, MambaLm, MODEL_FILE};
pub use norm::RmsNorm;
pub use param::{fan_in_bound, num_params, Init, Param};
pub use routes::{gather, inverse, Merge, Route, RouteParams};
