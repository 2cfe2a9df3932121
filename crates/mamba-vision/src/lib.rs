//! Vision Mamba: images from ImageFolder directories with their transforms, and the image
//! classification task (`[task] kind = "image_classification"`). The models (scan patterns,
//! patch embeddings, Vim and VMamba) are `mamba-grid`'s, shared with the audio and series
//! classifiers, and re-exported here.

mod data;
mod task;

pub use data::{decode, BadImages, DataError, ImageFolder, Transform};
pub use mamba_grid::*;
pub use task::{load_classifier, ImageClassification, ImageData, ImageMeta, ImageTask};
