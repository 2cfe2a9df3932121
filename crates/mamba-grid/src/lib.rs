//! Mamba over 2-D grids of patches, the part that every modality with 2-D inputs shares: scan
//! patterns, each a permutation of a patch grid that a mixer takes as a route; patch embeddings,
//! class tokens, position embeddings and drop-path; the Vim and VMamba classifiers, built from
//! config; and the classification task over examples that load as (channels, height, width):
//! images, spectrograms of audio clips, time series.

pub mod classify;
mod layers;
mod model;
mod scan;
mod vim;
mod vmamba;

pub use layers::{depthwise_conv2d, drop_path, patch_grid, patchify, resize_grid, LayerNorm, PatchEmbed, Size2d};
pub use model::{ImageShape, VisionConfig, VisionModel};
pub use scan::{draw_order, pattern, pattern_names, route, ClassToken, Grid};
pub use vim::{resize_pos_embed, Vim, VimConfig};
pub use vmamba::{Downsample, Ss2d, VMamba, VMambaConfig};
