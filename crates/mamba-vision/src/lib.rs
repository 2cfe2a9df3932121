//! Vision Mamba. So far: images from ImageFolder directories with their transforms, and the 2-D
//! scan patterns, each a permutation of a patch grid that a mixer can take as a route.

mod data;
mod scan;

pub use data::{BadImages, DataError, ImageFolder, Transform};
pub use scan::{pattern, pattern_names, route, Grid};
