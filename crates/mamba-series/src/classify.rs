//! `[task] kind = "series_classification"`: the UCR / UEA archives. Each case, (dimensions x length), is a
//! one-channel image for a Vim, whose patches `[dimensions, k]` are the series' patch tokens
//! (all dimensions of k steps) and whose raster / reverse-raster routes are a bidirectional scan
//! over time. Validation is the archive's own test split.

use crate::{read_ts, read_ucr_tsv, Labelled};
use candle_core::{Device, Tensor};
use mamba_grid::classify::{check_classes, check_finite, rank, ranked_lines, Classify, Examples};
use mamba_grid::{ImageShape, Size2d, VisionConfig, VisionModel};
use mamba_train::{
    check_input_size, checkpoint_weights, read_checked, read_train_config, Checked, DynTask, Error, PredictOptions,
    Result, Split, TaskInput, TaskKind,
};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[task]` keys of a series classification run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesData {
    /// `.ts` (sktime / UEA) or `.tsv` (UCR) files.
    pub train: PathBuf,
    pub test: PathBuf,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Training augmentation (Um et al. 2017): each case multiplied by a factor drawn from
    /// N(1, scaling^2), then Gaussian noise of std `jitter` added to every value.
    #[serde(default)]
    pub scaling: f64,
    #[serde(default)]
    pub jitter: f64,
}

/// What a checkpoint needs to read new cases: `series.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesMeta {
    pub classes: Vec<String>,
    pub dims: usize,
    /// Cases are zero-padded (at the end) or cut to this length.
    pub length: usize,
}

pub struct SeriesExamples {
    pub meta: SeriesMeta,
    /// (scaling, jitter) for training cases.
    augment: (f64, f64),
    /// Train and test cases, labels as indices into `meta.classes`, and their files.
    cases: [Labelled; 2],
    files: [PathBuf; 2],
}

pub type SeriesTask = Classify<SeriesExamples>;

/// `[task] kind = "series_classification"`: UCR / UEA archive files (`.ts`, `.tsv`; paths
/// relative to the config file), as [`SeriesData`] reads them.
pub struct SeriesClassification;

impl TaskKind for SeriesClassification {
    fn name(&self) -> &'static str {
        "series_classification"
    }

    fn path_keys(&self) -> &'static [&'static str] {
        &["train", "test"]
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let data: SeriesData = input.section()?;
        let trained = input.checkpoint.map(SeriesMeta::read).transpose()?;
        Ok(Box::new(data.task(input.model, input.backbone, input.source, input.seed, trained)?))
    }

    /// The cases of an archive file are the test (validation) set.
    fn evaluate_on(&self, task: &mut toml::Table, data: &Path) -> std::result::Result<(), String> {
        task.insert("test".into(), toml::Value::String(data.display().to_string()));
        Ok(())
    }

    /// A line per case of each archive file.
    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        let (model, meta) = load_series_classifier(dir, device)?;
        let mut lines = vec![];
        for input in inputs {
            let path = Path::new(input);
            let cases = read_archive(path)?;
            let names: Vec<String> = (1..=cases.series.len()).map(|i| format!("{input} case {i}")).collect();
            lines.extend(ranked_lines(&names, classify_cases(&model, &meta, &cases.series, path, device)?, options));
        }
        Ok(lines)
    }
}

/// A `.ts` or `.tsv` archive file with no missing value: the model takes none, at training or
/// at prediction, so the first one is named.
pub fn read_archive(path: &Path) -> Result<Labelled> {
    let read = match path.extension().and_then(|e| e.to_str()) {
        Some("ts") => read_ts,
        Some("tsv") => read_ucr_tsv,
        _ => {
            let message = "expected a .ts (sktime / UEA) or .tsv (UCR) file".into();
            return Err(Error::Config { path: path.display().to_string(), message });
        }
    };
    let set = read(path)?;
    if let Some((case, dim, step)) = set.first_missing() {
        let message = format!(
            "{} values are missing, the first at case {case}, dimension {dim}, step {step}; fill or drop them first",
            set.missing
        );
        return Err(Error::Config { path: path.display().to_string(), message });
    }
    Ok(set)
}

impl SeriesData {
    /// The task: reads both files, checks that they agree (dimensions, classes) and that no
    /// value is missing, and builds the model config (dimensions x length, one channel). With
    /// `trained` (a checkpoint's series.json), for evaluation: the classes, dimensions and length
    /// are the checkpoint's, and the training file is left unread.
    pub fn task(
        self,
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        seed: u64,
        trained: Option<SeriesMeta>,
    ) -> Result<SeriesTask> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        let train = match &trained {
            Some(meta) => Labelled { series: vec![], labels: vec![], classes: meta.classes.clone(), missing: 0 },
            None => read_archive(&self.train)?,
        };
        let mut test = read_archive(&self.test)?;
        for (set, path) in [(&train, &self.train), (&test, &self.test)] {
            if set.labels.len() != set.series.len() {
                return Err(Error::Config { path: path.display().to_string(), message: "cases without labels".into() });
            }
        }
        let dims = trained.as_ref().map_or(train.dims(), |m| m.dims);
        if dims != test.dims() {
            return Err(err(format!("[task] train has {dims} dimensions, test {}", test.dims())));
        }
        // Test labels as indices into the training classes.
        let mut labels = Vec::with_capacity(test.labels.len());
        for &l in &test.labels {
            let name = &test.classes[l];
            let i = train.classes.iter().position(|c| c == name);
            labels.push(i.ok_or_else(|| err(format!("[task] test class {name:?} is not among the training classes")))?);
        }
        (test.labels, test.classes) = (labels, train.classes.clone());
        let meta = trained.unwrap_or_else(|| SeriesMeta {
            classes: train.classes.clone(),
            dims: train.dims(),
            length: train.max_len(),
        });
        let shape = ImageShape {
            image_size: Size2d::new(meta.dims, meta.length),
            channels: 1,
            num_classes: meta.classes.len(),
        };
        let (augment, files) = ((self.scaling, self.jitter), [self.train, self.test]);
        let examples = SeriesExamples { meta, augment, cases: [train, test], files };
        Classify::new(examples, shape, (model, backbone), source, self.label_smoothing, seed)
    }
}

impl Checked for SeriesMeta {
    fn check(&self) -> std::result::Result<(), String> {
        check_classes(&self.classes)?;
        if self.dims == 0 || self.length == 0 {
            return Err(format!("dims {}, length {}: each must be at least 1", self.dims, self.length));
        }
        check_input_size("dims x length", &[self.dims, self.length])
    }
}

impl SeriesMeta {
    /// The checkpoint file it is saved as.
    const FILE: &'static str = "series.json";

    /// A checkpoint's series.json.
    pub fn read(dir: &Path) -> Result<Self> {
        read_checked(&dir.join(Self::FILE))
    }

    /// One case (dimensions x any length) as (1, dims, length).
    pub fn input(&self, case: &[Vec<f32>]) -> Result<Tensor> {
        let mut values = Vec::with_capacity(self.dims * self.length);
        for d in case {
            values.extend(d.iter().copied().chain(std::iter::repeat(0.0)).take(self.length));
        }
        Ok(Tensor::from_vec(values, (1, self.dims, self.length), &Device::Cpu)?)
    }
}

impl Examples for SeriesExamples {
    fn classes(&self) -> &[String] {
        &self.meta.classes
    }

    fn len(&self, split: Split) -> usize {
        self.cases[split as usize].series.len()
    }

    fn example(&self, split: Split, index: usize, rng: Option<&mut StdRng>) -> Result<(Tensor, usize)> {
        let set = &self.cases[split as usize];
        let case = &set.series[index];
        let (scaling, jitter) = self.augment;
        let input = match rng {
            Some(rng) if scaling > 0.0 || jitter > 0.0 => {
                let normal = |std: f64| {
                    Normal::new(0.0, std).map_err(|e| Error::Config { path: "[task]".into(), message: e.to_string() })
                };
                let (factor, noise) = (normal(scaling)?, normal(jitter)?);
                let k = 1.0 + factor.sample(rng) as f32;
                let moved: Vec<Vec<f32>> =
                    case.iter().map(|d| d.iter().map(|&v| v * k + noise.sample(rng) as f32).collect()).collect();
                self.meta.input(&moved)?
            }
            _ => self.meta.input(case)?,
        };
        Ok((input, set.labels[index]))
    }

    fn source(&self, split: Split, index: usize) -> String {
        format!("{} case {}", self.files[split as usize].display(), index + 1)
    }

    fn meta_file(&self) -> Result<(String, Vec<u8>)> {
        let json = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Config { path: SeriesMeta::FILE.into(), message: e.to_string() })?;
        Ok((SeriesMeta::FILE.into(), json))
    }
}

/// A series classification checkpoint: its model (on `device`) and `series.json`.
pub fn load_series_classifier(dir: &Path, device: &Device) -> Result<(VisionModel, SeriesMeta)> {
    let meta = SeriesMeta::read(dir)?;
    let (table, source) = read_train_config(dir)?;
    let image_size = Size2d::new(meta.dims, meta.length);
    let shape = ImageShape { image_size, channels: 1, num_classes: meta.classes.len() };
    let config = VisionConfig::from_file_table(table, &source, Some(shape))?;
    Ok((VisionModel::load(checkpoint_weights(dir, device)?, &config)?, meta))
}

/// Class probabilities of each case (dimensions x any length) of the archive file `source`,
/// highest first; `model` runs on `device`.
pub fn classify_cases(
    model: &VisionModel,
    meta: &SeriesMeta,
    cases: &[Vec<Vec<f32>>],
    source: &Path,
    device: &Device,
) -> Result<Vec<Vec<(String, f32)>>> {
    let inputs = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let name = || format!("{} case {}", source.display(), i + 1);
            if case.len() != meta.dims {
                let message = format!("{} dimensions; the model takes {}", case.len(), meta.dims);
                return Err(Error::Config { path: name(), message });
            }
            let x = meta.input(case)?;
            check_finite(&x, name)?;
            Ok(x)
        })
        .collect::<Result<Vec<_>>>()?;
    rank(model, &meta.classes, &inputs, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_json_describing_more_than_an_example_can_hold_is_refused_before_allocating() {
        let dir = std::env::temp_dir().join(format!("mamba-series-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let classes = vec!["a".to_string(), "b".to_string()];
        for (dims, length, needle) in
            [(usize::MAX / 2, 4, "dims x length"), (1 << 20, 1 << 9, "more than 268435456 values"), (3, 0, "length 0")]
        {
            let meta = SeriesMeta { classes: classes.clone(), dims, length };
            std::fs::write(dir.join("series.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
            let err = SeriesMeta::read(&dir).unwrap_err().to_string();
            assert!(err.contains("series.json") && err.contains(needle), "{err}");
        }
        let meta = SeriesMeta { classes, dims: 2, length: 150 };
        std::fs::write(dir.join("series.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert_eq!(SeriesMeta::read(&dir).unwrap().length, 150);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
