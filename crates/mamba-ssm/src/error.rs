//! The one error type of this crate: every message names the tensor it is about.

use candle_core::{DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor `{tensor}` has shape {got:?}, expected {expected}")]
    Shape { tensor: &'static str, expected: String, got: Vec<usize> },
    #[error("tensor `{tensor}` has dtype {got:?}, expected a float type (f32, f64, bf16 or f16)")]
    DType { tensor: &'static str, got: DType },
    #[error("invalid argument `{name}`: {message}")]
    Argument { name: &'static str, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One expected dimension: its paper name and its value.
pub(crate) type Dim = (&'static str, usize);

/// Checks that `t` is a float tensor of exactly the named dimensions.
pub(crate) fn check(tensor: &'static str, t: &Tensor, dims: &[Dim]) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::DType { tensor, got: t.dtype() });
    }
    if t.dims().len() != dims.len() || t.dims().iter().zip(dims).any(|(&g, &(_, e))| g != e) {
        let names: Vec<_> = dims.iter().map(|(n, _)| *n).collect();
        let sizes: Vec<_> = dims.iter().map(|(_, s)| s.to_string()).collect();
        let expected = format!("({}) = ({})", names.join(", "), sizes.join(", "));
        return Err(Error::Shape { tensor, expected, got: t.dims().to_vec() });
    }
    Ok(())
}

/// The sizes of a float tensor of rank N, or an error naming it and the expected dimensions.
pub(crate) fn dims<const N: usize>(tensor: &'static str, t: &Tensor, names: [&str; N]) -> Result<[usize; N]> {
    if !t.dtype().is_float() {
        return Err(Error::DType { tensor, got: t.dtype() });
    }
    t.dims().try_into().map_err(|_| Error::Shape {
        tensor,
        expected: format!("rank {N} ({})", names.join(", ")),
        got: t.dims().to_vec(),
    })
}

pub(crate) fn argument(name: &'static str, message: impl Into<String>) -> Error {
    Error::Argument { name, message: message.into() }
}
