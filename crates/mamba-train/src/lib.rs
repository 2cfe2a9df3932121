//! The one training loop of the framework. A modality plugs in through the [`Task`] trait (its
//! parameters, model, batches, loss and metrics); the loop brings seeded shuffling and background
//! prefetch, AdamW with parameter groups, warmup + cosine, clipping, accumulation, an optional
//! moving average of the weights, atomic checkpoints that resume exactly, `metrics.jsonl`, a
//! progress bar and the curves as SVG. `run` reads a training config (TOML) and dispatches on
//! its task kind.

mod error;
mod optim;
mod plot;
mod run;
mod task;
pub mod tasks;
mod trainer;

pub use error::{Error, Result};
pub use optim::{learning_rate, AdamW, OptimConfig, Params};
pub use plot::{plot_confusion, plot_forecast, plot_metrics};
pub use run::{
    checkpoint_kind, checkpoint_weights, evaluate_checkpoint, train_from_config, AnyTask, Evaluation, RunConfig,
};
pub use task::{Metrics, Split, Task};
pub use trainer::{evaluate, summary_line, train, Summary, TrainConfig, TrainerState};
