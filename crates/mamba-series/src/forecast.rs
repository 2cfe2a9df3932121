//! Forecasting data as the long-horizon papers (Informer, Autoformer, PatchTST, S-Mamba) prepare
//! it: a chronological split whose validation and test windows may look back into the split
//! before, per-variable standardisation fitted on the training rows, sliding windows of
//! (lookback, horizon) with a stride, and MSE / MAE on the standardised values. The naive
//! baselines are here too, computed by the same code on the same windows.

use std::ops::Range;

/// How the rows are divided in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitRule {
    /// The first `train` fraction, the next `validation` fraction, the rest for testing (the
    /// custom-data convention of those papers: 0.7 / 0.1 / 0.2).
    Fractions { train: f64, validation: f64 },
    /// ETT's 12 / 4 / 4 months of 30 days, at `rows_per_day` rows a day (24 for ETTh, 96 for
    /// ETTm).
    EttMonths { rows_per_day: usize },
}

/// The rows each split's windows may use: targets fall inside the split, lookbacks may start
/// up to `lookback` rows before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Range<usize>,
    pub validation: Range<usize>,
    pub test: Range<usize>,
}

impl SplitRule {
    /// The splits of `rows` rows for windows looking back `lookback` rows; None when a split
    /// would hold no row.
    pub fn split(&self, rows: usize, lookback: usize) -> Option<Splits> {
        let (train_end, val_end) = match *self {
            SplitRule::Fractions { train, validation } => {
                let n_train = (rows as f64 * train) as usize;
                let n_test = (rows as f64 * (1.0 - train - validation)).round() as usize;
                (n_train, rows.checked_sub(n_test)?)
            }
            SplitRule::EttMonths { rows_per_day } => {
                let month = 30 * rows_per_day;
                (12 * month, (16 * month).min(rows))
            }
        };
        let test_end = match *self {
            SplitRule::EttMonths { rows_per_day } => (20 * 30 * rows_per_day).min(rows),
            SplitRule::Fractions { .. } => rows,
        };
        if train_end <= lookback || val_end <= train_end || test_end <= val_end {
            return None;
        }
        Some(Splits {
            train: 0..train_end,
            validation: train_end - lookback..val_end,
            test: val_end - lookback..test_end,
        })
    }
}

/// Per-variable standardisation: (x - mean) / std, fitted on some rows (NaN ignored).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scaler {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Scaler {
    /// Fitted on `rows` of each column (`columns[v][t]`).
    pub fn fit(columns: &[Vec<f32>], rows: Range<usize>) -> Self {
        let (mut mean, mut std) = (vec![], vec![]);
        for col in columns {
            let values: Vec<f64> = col[rows.clone()].iter().filter(|v| !v.is_nan()).map(|&v| v as f64).collect();
            let n = values.len().max(1) as f64;
            let m = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n;
            mean.push(m as f32);
            // A constant column is left unscaled rather than divided by zero.
            std.push(if var > 0.0 { var.sqrt() as f32 } else { 1.0 });
        }
        Self { mean, std }
    }

    pub fn transform(&self, columns: &[Vec<f32>]) -> Vec<Vec<f32>> {
        columns
            .iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(col, (m, s))| col.iter().map(|v| (v - m) / s).collect())
            .collect()
    }

    pub fn inverse(&self, variable: usize, values: &[f32]) -> Vec<f32> {
        values.iter().map(|v| v * self.std[variable] + self.mean[variable]).collect()
    }
}

/// The start rows of the windows in `rows`: each window is `lookback` rows of input followed by
/// `horizon` rows of target, every `stride` rows.
pub fn windows(rows: Range<usize>, lookback: usize, horizon: usize, stride: usize) -> Vec<usize> {
    let span = lookback + horizon;
    if rows.len() < span || stride == 0 {
        return vec![];
    }
    (rows.start..=rows.end - span).step_by(stride).collect()
}

/// Squared and absolute errors summed over every (window, variable, step), and their count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Errors {
    pub squared: f64,
    pub absolute: f64,
    pub count: usize,
}

impl Errors {
    pub fn add(&mut self, forecast: &[f32], truth: &[f32]) {
        for (f, t) in forecast.iter().zip(truth) {
            let e = (f - t) as f64;
            self.squared += e * e;
            self.absolute += e.abs();
            self.count += 1;
        }
    }

    pub fn mse(&self) -> f64 {
        self.squared / self.count.max(1) as f64
    }

    pub fn mae(&self) -> f64 {
        self.absolute / self.count.max(1) as f64
    }
}

/// A forecast of `horizon` steps from a lookback alone.
pub trait Forecaster {
    fn forecast(&self, lookback: &[f32], horizon: usize) -> Vec<f32>;
}

/// Repeats the last value.
pub struct Naive;

impl Forecaster for Naive {
    fn forecast(&self, lookback: &[f32], horizon: usize) -> Vec<f32> {
        vec![lookback.last().copied().unwrap_or(0.0); horizon]
    }
}

/// Repeats the last season: step h is the value `period` steps before it (cycling through the
/// last period for horizons longer than one period). A lookback shorter than the period is
/// taken as the period.
pub struct SeasonalNaive {
    pub period: usize,
}

impl Forecaster for SeasonalNaive {
    fn forecast(&self, lookback: &[f32], horizon: usize) -> Vec<f32> {
        let p = self.period.clamp(1, lookback.len().max(1));
        let last = &lookback[lookback.len() - p..];
        (0..horizon).map(|h| last[h % p]).collect()
    }
}

/// The errors of a channel-independent forecaster over the windows of `rows` of standardised
/// `columns` (each variable of each window forecast from its own lookback).
pub fn evaluate(
    model: &dyn Forecaster,
    columns: &[Vec<f32>],
    rows: Range<usize>,
    lookback: usize,
    horizon: usize,
) -> Errors {
    let mut errors = Errors::default();
    for start in windows(rows, lookback, horizon, 1) {
        for col in columns {
            let input = &col[start..start + lookback];
            let truth = &col[start + lookback..start + lookback + horizon];
            errors.add(&model.forecast(input, horizon), truth);
        }
    }
    errors
}
