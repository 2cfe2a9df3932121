//! What the training loop knows of a task: how to make its parameters and its model, how many
//! examples each split has, how to build a batch (on the prefetch thread), and the loss and
//! metrics of a batch.

use crate::{evaluate, Result};
use candle_core::{Device, Tensor, D};
use candle_nn::VarBuilder;
use mamba_nn::{init_tensors, InitConfig, Param};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

pub trait Task: Send + Sync + 'static {
    type Model;
    type Batch: Send + 'static;

    /// The model's tensors: names, shapes, initialisation and weight-decay groups.
    fn params(&self) -> Vec<Param>;
    /// Fresh parameters by name, seeded, drawn as [`Task::params`] declares them.
    fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        Ok(init_tensors(&self.params(), &InitConfig::default(), seed)?)
    }
    /// The model over parameters held by `vb` (whose tensors are the trainer's variables).
    fn build_model(&self, vb: VarBuilder) -> Result<Self::Model>;
    /// Examples in a split (one epoch of training).
    fn len(&self, split: Split) -> usize;
    /// The batch of examples `indices`, on `device` (the model's): read and decoded on the CPU,
    /// then moved once. `epoch` lets tasks that generate data draw fresh examples every epoch;
    /// the same arguments always give the same batch.
    fn batch(&self, split: Split, epoch: usize, indices: &[usize], device: &Device) -> Result<Self::Batch>;
    /// The mean loss of a batch (a scalar the parameters' gradients flow from) and its metrics.
    fn forward(&self, model: &Self::Model, batch: &Self::Batch, train: bool) -> Result<(Tensor, Metrics)>;
    /// Files a checkpoint carries besides the weights and the training config, e.g. a Hugging
    /// Face config.json and tokenizer.json that make it a model directory for `mamba generate`.
    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![])
    }
    /// The metric that decides the best checkpoint, and whether higher is better.
    fn best_metric(&self) -> (&'static str, bool) {
        ("loss", false)
    }
    /// What `mamba eval` reports of `model` (on `device`): by default the validation metrics.
    fn evaluation(&self, model: &Self::Model, device: &Device) -> Result<Evaluation>
    where
        Self: Sized,
    {
        Ok(Evaluation::of(&evaluate(self, model, device)?))
    }
}

/// What `mamba eval` reports: the validation metrics, and for classifiers the class names and the
/// confusion matrix, for other tasks a table of further results (a forecaster's test errors
/// beside those of the baselines).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Each metric's mean.
    pub metrics: BTreeMap<String, f64>,
    /// Class names and counts, `[true][predicted]`.
    pub confusion: Option<(Vec<String>, Vec<Vec<usize>>)>,
    pub table: Option<ResultTable>,
}

impl Evaluation {
    pub fn of(metrics: &Metrics) -> Self {
        Self { metrics: metrics.means(), confusion: None, table: None }
    }
}

/// Named rows of numbers under named columns.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultTable {
    /// Printed above the table.
    pub title: String,
    /// Its key in `mamba eval --json`.
    pub key: String,
    /// The heading of the row names.
    pub rows_are: String,
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<f64>)>,
}

/// Cross-entropy with label smoothing `eps` from the negative log-likelihood of the targets and
/// the log-probabilities (last dimension: classes): (1 - eps) nll + eps mean(-log p).
pub fn smoothed(nll: &Tensor, logp: &Tensor, eps: f64) -> Result<Tensor> {
    if eps == 0.0 {
        return Ok(nll.clone());
    }
    Ok(((nll * (1.0 - eps))? + (logp.mean(D::Minus1)?.neg()? * eps)?)?)
}

/// A seed for example `index` of `split` in `epoch` (validation examples do not change), for
/// tasks that generate or augment their examples.
pub fn example_seed(seed: u64, split: Split, epoch: usize, index: usize) -> u64 {
    let epoch = if split == Split::Validation { u64::MAX } else { epoch as u64 };
    let mut h = seed ^ 0x243F_6A88_85A3_08D3;
    for v in [split as u64, epoch, index as u64] {
        h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    h
}

/// Sums and counts of named quantities, so that batches of different sizes average right.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    totals: BTreeMap<String, (f64, f64)>,
}

impl Metrics {
    /// Adds `sum` over `count` items to the metric `name`.
    pub fn add(&mut self, name: &str, sum: f64, count: f64) {
        let e = self.totals.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += count;
    }

    pub fn merge(&mut self, other: &Metrics) {
        for (name, (s, c)) in &other.totals {
            self.add(name, *s, *c);
        }
    }

    /// Each metric's mean.
    pub fn means(&self) -> BTreeMap<String, f64> {
        self.totals.iter().map(|(n, (s, c))| (n.clone(), if *c > 0.0 { s / c } else { f64::NAN })).collect()
    }

    pub fn mean(&self, name: &str) -> Option<f64> {
        self.totals.get(name).map(|(s, c)| s / c)
    }
}
