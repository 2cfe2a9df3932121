//! The error type of this crate: messages name the file, key, step or tensor they are about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "the loss is {value} at step {step} (epoch {}, batch {batch}): training stopped; the last good checkpoint is {} (lower the learning rate or clip harder)",
        epoch + 1,
        last.display()
    )]
    Diverged { step: usize, epoch: usize, batch: usize, value: f64, last: PathBuf },
    #[error(transparent)]
    Model(#[from] mamba_nn::Error),
    /// A modality's own error (reading audio, series, text), which names its file.
    #[error(transparent)]
    Data(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
