//! Time series for Mamba models: readers for the formats people bring. `read_csv`: a
//! table with a time column and any number of variables (the ETT / Electricity / Weather
//! layout); `read_ts`: sktime / UEA `.ts` classification archives (univariate or multivariate,
//! equal or unequal length, `?` for missing values); `read_ucr_tsv`: the UCR archive's `.tsv`.
//! Malformed input is an error naming the file, line and column. Forecasting data as the
//! long-horizon papers prepare it (`forecast`): chronological splits (fractions or ETT's months),
//! standardisation fitted on the training rows, sliding windows, MSE / MAE, and the naive and
//! seasonal-naive baselines. Forecasting models (`model`): Mamba blocks over patch tokens
//! (channel-independent) or variate tokens, with RevIN and a linear head, and DLinear. The tasks:
//! forecasting (`[task] kind = "forecasting"`) and classification of archive cases
//! (`"series_classification"`, a Vim of `mamba-grid` over the cases).

mod classify;
mod error;
mod forecast;
mod model;
mod read;
mod task;
mod write;

pub use classify::{
    classify_cases, load_series_classifier, read_archive, SeriesClassification, SeriesData, SeriesExamples, SeriesMeta,
    SeriesTask,
};
pub use error::{Result, SeriesError};
pub use forecast::{evaluate, windows, Errors, Forecaster, Naive, Scaler, SeasonalNaive, SplitRule, Splits};
pub use model::{moving_average_matrix, ForecastArch, ForecastConfig, ForecastModel, ForecastShape, Revin, Tokens};
pub use read::{read_csv, read_ts, read_ucr_tsv, Labelled, Table};
pub use task::{
    forecast_table, load_forecaster, write_forecast, ForecastBatch, ForecastData, ForecastMeta, ForecastTask,
    Forecasting, SplitSection,
};
pub use write::{next_times, write_csv};
