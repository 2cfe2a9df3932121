//! The one training loop of the framework, which names no modality. A task plugs in through the
//! [`Task`] trait (its parameters, model, batches, loss and metrics); the loop brings seeded
//! shuffling and background prefetch, AdamW with parameter groups, warmup + cosine, clipping,
//! accumulation, an optional moving average of the weights, atomic checkpoints that resume
//! exactly, `metrics.jsonl`, a progress bar and the curves as SVG. A [`TaskKind`] builds a task
//! from a training config's `[task]` section; modality crates define the kinds, and a program's
//! [`TaskKinds`] reads a config (TOML) or checkpoint and dispatches on its `[task] kind`.

mod checkpoint;
mod error;
mod kind;
mod optim;
mod plot;
mod run;
mod task;
mod trainer;

pub use checkpoint::{
    check_input_size, check_standardisation, checkpoint_kind, checkpoint_tensors, checkpoint_weights, io, read_checked,
    read_json, read_train_config, Checked, MAX_INPUT_VALUES,
};
pub use error::{Error, Result};
pub use kind::{DynTask, PredictOptions, TaskInput, TaskKind};
pub use optim::{learning_rate, AdamW, OptimConfig, Params};
pub use plot::{plot_confusion, plot_forecast, plot_metrics};
pub use run::{RunConfig, TaskKinds};
pub use task::{example_seed, smoothed, Evaluation, Metrics, ResultTable, Split, Task};
pub use trainer::{evaluate, summary_line, train, Summary, TrainConfig, TrainerState};
