//! Vision Mamba. So far: the 2-D scan patterns, each a permutation of a patch grid that a mixer
//! can take as a route.

mod scan;

pub use scan::{pattern, pattern_names, route, Grid};
