//! `[task] kind = "forecasting"`, as the long-horizon papers set it up: a CSV table (time, then variables) split
//! chronologically, standardised with the training rows' statistics and cut into (lookback,
//! horizon) windows; the loss is the MSE over every forecast value. Validation MSE picks `best`;
//! `mamba eval` adds the test split, beside the naive and seasonal-naive forecasts of the same
//! windows. A checkpoint forecasts new CSV files of the same variables (`forecast_table`).

use crate::{
    evaluate, next_times, read_csv, windows, write_csv, Errors, ForecastConfig, ForecastModel, ForecastShape, Naive,
    Scaler, SeasonalNaive, SeriesError, SplitRule, Splits, Table,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mamba_nn::Param;
use mamba_train::{
    check_input_size, check_standardisation, checkpoint_weights, plot_forecast, read_checked, read_train_config,
    Checked, DynTask, Error, Evaluation, Metrics, PredictOptions, Result, ResultTable, Split, Task, TaskInput,
    TaskKind,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[task]` keys of a forecasting run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastData {
    /// A CSV file: a header, the time in the first column, one column per variable.
    pub data: PathBuf,
    pub lookback: usize,
    pub horizon: usize,
    /// Rows between the starts of training windows (validation and test use every window).
    #[serde(default = "one")]
    pub stride: usize,
    /// `[train, validation]` fractions (the rest is the test split), or "ett_hourly" /
    /// "ett_15min" for ETT's 12 / 4 / 4 months.
    #[serde(default)]
    pub split: SplitSection,
    /// The seasonal-naive baseline's period in rows; without it that baseline is not reported.
    pub period: Option<usize>,
    /// The variables to model, by column name (default: all).
    pub columns: Option<Vec<String>>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SplitSection {
    Fractions([f64; 2]),
    Named(String),
}

impl Default for SplitSection {
    fn default() -> Self {
        SplitSection::Fractions([0.7, 0.1])
    }
}

impl SplitSection {
    fn rule(&self) -> std::result::Result<SplitRule, String> {
        match self {
            SplitSection::Fractions([train, validation]) => {
                let ok = *train > 0.0 && *validation > 0.0 && train + validation < 1.0;
                ok.then_some(SplitRule::Fractions { train: *train, validation: *validation }).ok_or_else(|| {
                    format!("[task] split = [{train}, {validation}]: two positive fractions summing below 1")
                })
            }
            SplitSection::Named(name) => match name.as_str() {
                "ett_hourly" => Ok(SplitRule::EttMonths { rows_per_day: 24 }),
                "ett_15min" => Ok(SplitRule::EttMonths { rows_per_day: 96 }),
                other => Err(format!(
                    "[task] split = {other:?}: expected [train, validation] fractions, \"ett_hourly\" or \"ett_15min\""
                )),
            },
        }
    }
}

/// What a checkpoint needs to forecast a new table: `forecast.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastMeta {
    pub shape: ForecastShape,
    /// The variables' column names, in model order.
    pub variables: Vec<String>,
    /// The training rows' standardisation.
    pub scaler: Scaler,
    pub period: Option<usize>,
}

impl Checked for ForecastMeta {
    fn check(&self) -> std::result::Result<(), String> {
        let s = self.shape;
        if s.lookback == 0 || s.horizon == 0 || s.variables != self.variables.len() || s.variables == 0 {
            return Err(format!(
                "lookback {}, horizon {}, {} variables named for {}: each must be at least 1, and the names one per variable",
                s.lookback,
                s.horizon,
                self.variables.len(),
                s.variables
            ));
        }
        check_input_size("lookback x variables", &[s.lookback, s.variables])?;
        check_input_size("horizon x variables", &[s.horizon, s.variables])?;
        if self.period == Some(0) {
            return Err("period 0".into());
        }
        check_standardisation(&self.scaler.mean, &self.scaler.std, s.variables)
    }
}

impl ForecastMeta {
    const FILE: &'static str = "forecast.json";
}

/// Where data row `row` (from 0) of `table` is, for errors: `in row 5 (time "2000-05")`.
fn first_at(table: &Table, row: usize) -> String {
    format!("in row {} (time {:?})", row + 1, table.time[row])
}

/// The columns of `table` named `names`, in that order.
fn named_columns<'a>(table: &'a Table, names: &[String], source: &str) -> Result<Vec<&'a Vec<f32>>> {
    names
        .iter()
        .map(|name| {
            let i = table.names.iter().position(|n| n == name).ok_or_else(|| Error::Config {
                path: source.to_string(),
                message: format!("no column {name:?} (columns: {})", table.names.join(", ")),
            })?;
            Ok(&table.columns[i])
        })
        .collect()
}

pub struct ForecastBatch {
    /// (batch, variables, lookback) and (batch, variables, horizon), standardised.
    pub inputs: Tensor,
    pub targets: Tensor,
}

pub struct ForecastTask {
    pub config: ForecastConfig,
    pub meta: ForecastMeta,
    /// Standardised `columns[v][t]`.
    columns: Vec<Vec<f32>>,
    pub splits: Splits,
    /// Window starts of the training and validation splits.
    starts: [Vec<usize>; 2],
}

impl ForecastData {
    /// Reads the table, checks it (no missing values in the chosen variables, enough rows for
    /// every split), fits the scaler on the training rows and builds the model config. With
    /// `trained` (a checkpoint's forecast.json), for evaluation: the variables and the scaler
    /// are the checkpoint's, so a table other than the training one is read as training read its.
    pub fn task(
        self,
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        trained: Option<ForecastMeta>,
    ) -> Result<ForecastTask> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        let data = self.data.display().to_string();
        let table = read_csv(&self.data).map_err(|e| err(format!("[task] data: {e}")))?;
        let variables = match &trained {
            Some(meta) => meta.variables.clone(),
            None => self.columns.clone().unwrap_or_else(|| table.names.clone()),
        };
        if variables.is_empty() {
            return Err(err("[task] columns: name at least one variable".into()));
        }
        let rule = self.split.rule().map_err(&err)?;
        let (lookback, horizon) = (self.lookback, self.horizon);
        if lookback == 0 || horizon == 0 || self.stride == 0 {
            return Err(err("[task] lookback, horizon and stride must be at least 1".into()));
        }
        if let Some(p) = self.period.filter(|&p| p == 0 || p > lookback) {
            return Err(err(format!("[task] period {p} must be at least 1 and fit in the lookback ({lookback})")));
        }
        let raw: Vec<Vec<f32>> = named_columns(&table, &variables, &data)?.into_iter().cloned().collect();
        for (name, col) in variables.iter().zip(&raw) {
            if let Some(first) = col.iter().position(|v| v.is_nan()) {
                let missing = col.iter().filter(|v| v.is_nan()).count();
                let at = first_at(&table, first);
                let message =
                    format!("column {name:?} has {missing} missing values, the first {at}; fill or drop them first");
                return Err(Error::Config { path: data.clone(), message });
            }
        }
        let splits = rule.split(table.len(), lookback).ok_or_else(|| {
            err(format!("[task] {data}: {} rows are too few for the split with lookback {lookback}", table.len()))
        })?;
        let starts = [
            windows(splits.train.clone(), lookback, horizon, self.stride),
            windows(splits.validation.clone(), lookback, horizon, 1),
        ];
        let test_windows = windows(splits.test.clone(), lookback, horizon, 1).len();
        if starts.iter().any(|s| s.is_empty()) || test_windows == 0 {
            return Err(err(format!(
                "[task] {data}: a split has no window of lookback {lookback} + horizon {horizon} (rows: train {:?}, validation {:?}, test {:?})",
                splits.train, splits.validation, splits.test
            )));
        }
        let scaler = match trained {
            Some(meta) => meta.scaler,
            None => Scaler::fit(&raw, splits.train.clone()),
        };
        let columns = scaler.transform(&raw);
        let meta = ForecastMeta {
            shape: ForecastShape { lookback, horizon, variables: variables.len() },
            variables,
            scaler,
            period: self.period,
        };
        let config = ForecastConfig::from_tables(model, backbone, source, meta.shape)?;
        Ok(ForecastTask { config, meta, columns, splits, starts })
    }
}

impl ForecastTask {
    /// Windows starting at `starts` as (inputs, targets) tensors on `device`.
    fn windows_at(&self, starts: &[usize], device: &Device) -> Result<ForecastBatch> {
        let ForecastShape { lookback, horizon, variables } = self.meta.shape;
        let (mut inputs, mut targets) = (vec![], vec![]);
        for &s in starts {
            for col in &self.columns {
                inputs.extend_from_slice(&col[s..s + lookback]);
                targets.extend_from_slice(&col[s + lookback..s + lookback + horizon]);
            }
        }
        let n = starts.len();
        Ok(ForecastBatch {
            inputs: Tensor::from_vec(inputs, (n, variables, lookback), device)?,
            targets: Tensor::from_vec(targets, (n, variables, horizon), device)?,
        })
    }

    /// The number of test windows, and the test-split errors of `model` (run on `device`) and of
    /// the naive baselines on those windows, named.
    pub fn test(&self, model: &ForecastModel, device: &Device) -> Result<(usize, Vec<(String, Errors)>)> {
        let ForecastShape { lookback, horizon, .. } = self.meta.shape;
        let rows = self.splits.test.clone();
        let starts = windows(rows.clone(), lookback, horizon, 1);
        let mut errors = Errors::default();
        for chunk in starts.chunks(64) {
            let batch = self.windows_at(chunk, device)?;
            let forecast = model.forward(&batch.inputs)?;
            errors.add(&forecast.flatten_all()?.to_vec1()?, &batch.targets.flatten_all()?.to_vec1()?);
        }
        let mut out = vec![
            ("model".to_string(), errors),
            ("naive (last value)".into(), evaluate(&Naive, &self.columns, rows.clone(), lookback, horizon)),
        ];
        if let Some(period) = self.meta.period {
            let seasonal = evaluate(&SeasonalNaive { period }, &self.columns, rows, lookback, horizon);
            out.push((format!("seasonal naive ({period})"), seasonal));
        }
        Ok((starts.len(), out))
    }
}

impl Task for ForecastTask {
    type Model = ForecastModel;
    type Batch = ForecastBatch;

    fn params(&self) -> Vec<Param> {
        self.config.params()
    }

    fn build_model(&self, vb: VarBuilder) -> Result<ForecastModel> {
        Ok(ForecastModel::load(vb, &self.config)?)
    }

    fn len(&self, split: Split) -> usize {
        self.starts[split as usize].len()
    }

    fn batch(&self, split: Split, _epoch: usize, indices: &[usize], device: &Device) -> Result<ForecastBatch> {
        let starts: Vec<usize> = indices.iter().map(|&i| self.starts[split as usize][i]).collect();
        self.windows_at(&starts, device)
    }

    fn forward(&self, model: &ForecastModel, batch: &ForecastBatch, _train: bool) -> Result<(Tensor, Metrics)> {
        let diff = (model.forward(&batch.inputs)? - &batch.targets)?;
        let loss = diff.sqr()?.mean_all()?;
        let count = diff.elem_count() as f64;
        let mse = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut m = Metrics::default();
        m.add("loss", mse * count, count);
        m.add("mse", mse * count, count);
        m.add("mae", diff.abs()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?, count);
        Ok((loss, m))
    }

    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let json = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Config { path: ForecastMeta::FILE.into(), message: e.to_string() })?;
        Ok(vec![(ForecastMeta::FILE.into(), json)])
    }

    fn best_metric(&self) -> (&'static str, bool) {
        ("mse", false)
    }

    /// The validation metrics, and the test split's errors beside the baselines'.
    fn evaluation(&self, model: &ForecastModel, device: &Device) -> Result<Evaluation> {
        let (windows, errors) = self.test(model, device)?;
        let table = ResultTable {
            title: format!("test split ({windows} windows, standardised values)"),
            key: "test".into(),
            rows_are: "forecaster".into(),
            columns: vec!["MSE".into(), "MAE".into()],
            rows: errors.into_iter().map(|(name, e)| (name, vec![e.mse(), e.mae()])).collect(),
        };
        Ok(Evaluation { table: Some(table), ..Evaluation::of(&mamba_train::evaluate(self, model, device)?) })
    }
}

impl From<SeriesError> for Error {
    fn from(e: SeriesError) -> Self {
        Error::Data(Box::new(e))
    }
}

/// `[task] kind = "forecasting"`: a CSV table (path relative to the config file), its windows and
/// split, as [`ForecastData`] reads them.
pub struct Forecasting;

impl TaskKind for Forecasting {
    fn name(&self) -> &'static str {
        "forecasting"
    }

    fn path_keys(&self) -> &'static [&'static str] {
        &["data"]
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let data: ForecastData = input.section()?;
        let trained = input.checkpoint.map(|dir| read_checked(&dir.join(ForecastMeta::FILE))).transpose()?;
        Ok(Box::new(data.task(input.model, input.backbone, input.source, trained)?))
    }

    /// Another CSV with the model's columns, split by the run's rule and standardised as in
    /// training: its validation and test windows are evaluated.
    fn evaluate_on(&self, task: &mut toml::Table, data: &Path) -> std::result::Result<(), String> {
        task.insert("data".into(), toml::Value::String(data.display().to_string()));
        Ok(())
    }

    /// Each CSV file's forecast, written as NAME.forecast.csv and NAME.forecast.png in
    /// `options.out` or beside it; a line per file says where.
    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        let (model, meta) = load_forecaster(dir, device)?;
        let mut lines = vec![];
        for input in inputs {
            let path = Path::new(input);
            let table = read_csv(path)?;
            let stem = path.file_stem().map_or("series".into(), |s| s.to_string_lossy().into_owned());
            let folder = options.out.as_deref().or(path.parent()).unwrap_or(Path::new("."));
            let (csv, png) = (folder.join(format!("{stem}.forecast.csv")), folder.join(format!("{stem}.forecast.png")));
            write_forecast(&model, &meta, &table, input, (&csv, &png), device)?;
            let last = table.time.last().map_or("", |t| t.as_str());
            let horizon = meta.shape.horizon;
            lines.push(format!("{input}: {horizon} rows after {last} -> {} and {}", csv.display(), png.display()));
        }
        Ok(lines)
    }
}

/// A forecasting checkpoint: its model (on `device`) and `forecast.json`.
pub fn load_forecaster(dir: &Path, device: &Device) -> Result<(ForecastModel, ForecastMeta)> {
    let meta: ForecastMeta = read_checked(&dir.join(ForecastMeta::FILE))?;
    let (mut table, source) = read_train_config(dir)?;
    let mut section = |name: &str| match table.remove(name) {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    };
    let model = section("model").ok_or_else(|| Error::Config { path: source.clone(), message: "no [model]".into() })?;
    let config = ForecastConfig::from_tables(model, section("backbone"), &source, meta.shape)?;
    Ok((ForecastModel::load(checkpoint_weights(dir, device)?, &config)?, meta))
}

/// The forecast, in the table's units, of the `horizon` rows after the last row of `table`
/// (`forecast[v][h]`, the model's variables in order), from its last `lookback` rows; `model`
/// runs on `device`.
pub fn forecast_table(
    model: &ForecastModel,
    meta: &ForecastMeta,
    table: &Table,
    source: &str,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let ForecastShape { lookback, variables, .. } = meta.shape;
    let err = |message: String| Error::Config { path: source.to_string(), message };
    if table.len() < lookback {
        return Err(err(format!("{} rows; the model looks back {lookback}", table.len())));
    }
    let raw: Vec<Vec<f32>> =
        named_columns(table, &meta.variables, source)?.into_iter().map(|c| c[c.len() - lookback..].to_vec()).collect();
    for (name, col) in meta.variables.iter().zip(&raw) {
        if let Some(first) = col.iter().position(|v| v.is_nan()) {
            let at = first_at(table, table.len() - lookback + first);
            return Err(err(format!("column {name:?} has missing values in its last {lookback} rows, the first {at}")));
        }
    }
    let input = meta.scaler.transform(&raw).concat();
    let out = model.forward(&Tensor::from_vec(input, (1, variables, lookback), device)?)?;
    let rows = out.squeeze(0)?.to_vec2::<f32>()?;
    Ok(rows.iter().enumerate().map(|(v, r)| meta.scaler.inverse(v, r)).collect())
}

/// Forecasts the rows after `table` (`model` on `device`) and writes them to `csv` (the time
/// column continued, see `next_times`) and, after the last rows of history (the lookback, or
/// three horizons when that is longer), to `png`.
pub fn write_forecast(
    model: &ForecastModel,
    meta: &ForecastMeta,
    table: &Table,
    source: &str,
    (csv, png): (&Path, &Path),
    device: &Device,
) -> Result<()> {
    let forecast = forecast_table(model, meta, table, source, device)?;
    let shown = meta.shape.lookback.max(3 * meta.shape.horizon).min(table.len());
    let history: Vec<Vec<f32>> =
        named_columns(table, &meta.variables, source)?.into_iter().map(|c| c[c.len() - shown..].to_vec()).collect();
    plot_forecast(&meta.variables, &history, &forecast, png)?;
    let rows = Table {
        time_name: table.time_name.clone(),
        time: next_times(&table.time, meta.shape.horizon),
        names: meta.variables.clone(),
        missing: vec![0; forecast.len()],
        columns: forecast,
    };
    Ok(write_csv(csv, &rows)?)
}
