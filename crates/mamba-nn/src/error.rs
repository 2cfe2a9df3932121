//! The error type of this crate: messages name the file, key or tensor they are about.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{path}: the checkpoint does not fit the model:\n{problems}")]
    Checkpoint { path: String, problems: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Kernel(#[from] mamba_ssm::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
