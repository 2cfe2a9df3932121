//! The registry of the `mamba` program: the task kinds it trains, evaluates and predicts with,
//! by the `[task] kind` a config or checkpoint records. A modality is one line here.

use mamba_train::TaskKinds;

pub static TASKS: TaskKinds = TaskKinds(&[
    &mamba_text::SelectiveCopying,
    &mamba_text::InductionHeads,
    &mamba_text::Text,
    &mamba_vision::ImageClassification,
    &mamba_audio::AudioClassification,
    &mamba_series::SeriesClassification,
    &mamba_series::Forecasting,
]);
