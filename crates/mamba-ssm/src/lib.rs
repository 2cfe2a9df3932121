//! The numerical core of the framework: Mamba-1's selective scan, Mamba-2's SSD chunked scan,
//! Mamba-3's scan and the causal depthwise conv1d of the mixers, each with its backward pass, a
//! single-token step for decoding, and a slow, obviously-right reference beside it.
//!
//! Layouts follow the reference implementations (`mamba_ssm.ops`): the selective scan takes
//! (batch, dim, len), the SSD (batch, len, heads, headdim). Every function checks its inputs and
//! returns an [`Error`] naming the tensor and the expected shape.

mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod gate;
mod mamba2_inner;
mod mamba3;
mod mamba_inner;
mod math;
mod matmul;
mod norm;
mod selective_scan;
mod ssd;
mod ssd_cpu;
mod step;

pub use conv::{causal_conv1d, causal_conv1d_ref, causal_conv1d_update};
#[cfg(feature = "cuda")]
pub use cuda::missing_cuda_libraries;
pub use error::{Error, Result};
pub use gate::silu_gate;
pub use mamba2_inner::{mamba2_inner, mamba2_inner_ref, Mamba2Output, Mamba2Weights};
pub use mamba3::{
    mamba3_chunk_scan, mamba3_chunk_scan_ref, mamba3_scan_ref, mamba3_state_update_ref, Mamba3Inputs, Mamba3Output,
    Mamba3State, Mimo,
};
pub use mamba_inner::{mamba_inner, mamba_inner_ref, InnerOutput, InnerWeights};
pub use math::{cpu_isa, set_cpu_isa, CpuIsa};
pub use matmul::{weight_matmul, weight_matmul_ref};
pub use norm::{rms_norm, rms_norm_ref};
pub use selective_scan::{selective_scan, selective_scan_ref, selective_state_update_ref, ScanOutput, ScanParams};
pub use ssd::{ssd_chunk_scan, ssd_chunk_scan_ref, ssd_quadratic, ssd_scan_ref, ssd_state_update_ref, SsdParams};
pub use step::{selective_state_update, ssd_state_update};

use candle_core::Tensor;

/// torch's softplus, log(1 + e^x), from differentiable candle ops (candle has none):
/// relu(x) + log(1 + e^-|x|) never overflows.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
}
