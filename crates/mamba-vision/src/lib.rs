//! Vision Mamba: images from ImageFolder directories with their transforms; 2-D scan patterns,
//! each a permutation of a patch grid that a mixer takes as a route; patch embeddings, class
//! tokens, position embeddings and drop-path; the Vim and VMamba classifiers, built from config.

mod data;
mod layers;
mod model;
mod scan;
mod vim;
mod vmamba;

pub use data::{decode, BadImages, DataError, ImageFolder, Transform};
pub use layers::{depthwise_conv2d, drop_path, patch_grid, patchify, resize_grid, LayerNorm, PatchEmbed, Size2d};
pub use model::{ImageShape, VisionConfig, VisionModel};
pub use scan::{draw_order, pattern, pattern_names, route, ClassToken, Grid};
pub use vim::{resize_pos_embed, Vim, VimConfig};
pub use vmamba::{Downsample, Ss2d, VMamba, VMambaConfig};
