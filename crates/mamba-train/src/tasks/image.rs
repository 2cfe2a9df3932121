//! Image classification over ImageFolder directories with a Vim or VMamba model: seeded random
//! crops and flips for training, centre crops for validation, cross-entropy with optional label
//! smoothing, accuracy and top-5; a confusion matrix for `mamba eval`.

use super::{example_seed, smoothed};
use crate::task::{Metrics, Split, Task};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use mamba_vision::{
    resize_pos_embed, BadImages, ImageFolder, ImageShape, Size2d, Transform, VisionConfig, VisionModel,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a checkpoint needs to classify new images without the training data: `image.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    pub classes: Vec<String>,
    pub transform: Transform,
}

pub struct ImageBatch {
    pub images: Tensor,
    pub labels: Tensor,
    /// Seeds drop-path when training.
    pub seed: u64,
}

pub struct ImageTask {
    pub config: VisionConfig,
    pub meta: ImageMeta,
    /// (file, class) per split.
    items: [Vec<(PathBuf, usize)>; 2],
    label_smoothing: f64,
    seed: u64,
}

/// The `[task]` keys of an image classification run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageData {
    /// ImageFolder roots.
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// Used when there is no validation root.
    #[serde(default = "tenth")]
    pub validation_fraction: f64,
    /// The square crop the model sees.
    pub image_size: usize,
    /// The shorter side before cropping (default: image_size).
    pub resize: Option<usize>,
    #[serde(default = "three")]
    pub channels: usize,
    #[serde(default)]
    pub hflip: f64,
    /// Per channel; measured on the training images when left out.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Images that cannot be read: "fail" (default) or "skip".
    #[serde(default)]
    pub bad_images: BadImages,
    #[serde(default)]
    pub label_smoothing: f64,
}

fn tenth() -> f64 {
    0.1
}
fn three() -> usize {
    3
}

fn data_error(e: mamba_vision::DataError) -> Error {
    Error::Config { path: "[task]".into(), message: e.to_string() }
}

impl ImageTask {
    /// Opens the folders (every image decoded once: a corrupt one fails here or is skipped and
    /// listed), splits off validation if no folder is given, measures mean and std if not given,
    /// and builds the model config (image size, channels and classes from the data).
    pub fn load(
        d: ImageData,
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        seed: u64,
    ) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        if d.channels != 1 && d.channels != 3 {
            return Err(err(format!("[task] channels = {}: 1 (grayscale) or 3 (RGB)", d.channels)));
        }
        let train = ImageFolder::open(&d.train, d.bad_images).map_err(data_error)?;
        report_skipped(&train);
        let (train_items, val_items) = match &d.validation {
            Some(root) => {
                let val = ImageFolder::open(root, d.bad_images).map_err(data_error)?;
                report_skipped(&val);
                if val.classes != train.classes {
                    return Err(err(format!(
                        "[task] validation {}: classes {:?} differ from the training set's {:?}",
                        root.display(),
                        val.classes,
                        train.classes
                    )));
                }
                (train.items.clone(), val.items)
            }
            None => {
                if !(0.0..1.0).contains(&d.validation_fraction) {
                    return Err(err("[task] validation_fraction must be in [0, 1)".into()));
                }
                // A seeded shuffle, then the last fraction: every class in both splits (likely).
                let mut items = train.items.clone();
                items.shuffle(&mut StdRng::seed_from_u64(seed));
                let n_val = (items.len() as f64 * d.validation_fraction).round() as usize;
                let val = items.split_off(items.len() - n_val);
                (items, val)
            }
        };
        if train_items.is_empty() || val_items.is_empty() {
            return Err(err("[task] both the training and the validation split need images".into()));
        }
        let resize = d.resize.unwrap_or(d.image_size) as u32;
        let mut transform = Transform {
            channels: d.channels,
            resize,
            crop: d.image_size as u32,
            hflip: d.hflip,
            mean: vec![0.0; d.channels],
            std: vec![1.0; d.channels],
        };
        let (mean, std) = match (d.mean, d.std) {
            (Some(m), Some(s)) => (m, s),
            (None, None) => channel_stats(&transform, &train_items, seed)?,
            _ => return Err(err("[task] give both mean and std, or neither (then they are measured)".into())),
        };
        if mean.len() != d.channels || std.len() != d.channels || std.iter().any(|&s| s <= 0.0) {
            return Err(err(format!("[task] mean and std need {} values each, std positive", d.channels)));
        }
        (transform.mean, transform.std) = (mean, std);
        let shape = ImageShape {
            image_size: Size2d::square(d.image_size),
            channels: d.channels,
            num_classes: train.classes.len(),
        };
        let config = VisionConfig::from_tables(model, backbone, source, Some(shape))?;
        Ok(Self {
            config,
            meta: ImageMeta { classes: train.classes, transform },
            items: [train_items, val_items],
            label_smoothing: d.label_smoothing,
            seed,
        })
    }

    /// A batch's logits, mean loss and metrics (loss, accuracy, top-5 past five classes).
    fn scored(&self, model: &VisionModel, batch: &ImageBatch, train: bool) -> Result<(Tensor, Tensor, Metrics)> {
        let mut rng = StdRng::seed_from_u64(batch.seed);
        let logits = model.forward(&batch.images, train.then_some(&mut rng))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&batch.labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let loss = smoothed(&nll, &logp, self.label_smoothing)?.mean_all()?;
        let n = batch.labels.dim(0)? as f64;
        let mut m = Metrics::default();
        m.add("loss", loss.to_scalar::<f32>()? as f64 * n, n);
        // Rank of the true class: how many classes score higher.
        let true_logit = logits.gather(&batch.labels.unsqueeze(1)?, 1)?;
        let rank = logits.broadcast_gt(&true_logit)?.to_dtype(DType::F32)?.sum(D::Minus1)?.to_vec1::<f32>()?;
        m.add("accuracy", rank.iter().filter(|&&r| r < 1.0).count() as f64, n);
        if self.meta.classes.len() > 5 {
            m.add("top5", rank.iter().filter(|&&r| r < 5.0).count() as f64, n);
        }
        Ok((logits, loss, m))
    }

    /// The validation split's metrics (as `trainer::evaluate` gives them) and its confusion
    /// matrix, `[true class][predicted class]` counts, in one pass over the images.
    pub fn evaluate_with_confusion(&self, model: &VisionModel) -> Result<(Metrics, Vec<Vec<usize>>)> {
        let k = self.meta.classes.len();
        let (mut total, mut confusion) = (Metrics::default(), vec![vec![0; k]; k]);
        let indices: Vec<usize> = (0..self.len(Split::Validation)).collect();
        for chunk in indices.chunks(64) {
            let batch = self.batch(Split::Validation, 0, chunk)?;
            let (logits, _, m) = self.scored(model, &batch, false)?;
            total.merge(&m);
            for (&i, p) in chunk.iter().zip(logits.argmax(D::Minus1)?.to_vec1::<u32>()?) {
                confusion[self.items[1][i].1][p as usize] += 1;
            }
        }
        Ok((total, confusion))
    }
}

fn report_skipped(folder: &ImageFolder) {
    for (path, why) in &folder.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
}

/// Per-channel mean and std of the (centre-cropped) training images, over up to 2,000 of them.
fn channel_stats(t: &Transform, items: &[(PathBuf, usize)], seed: u64) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut sample: Vec<&PathBuf> = items.iter().map(|(p, _)| p).collect();
    sample.shuffle(&mut StdRng::seed_from_u64(seed));
    sample.truncate(2000);
    let c = t.channels;
    let (mut sum, mut sq, mut n) = (vec![0f64; c], vec![0f64; c], 0usize);
    for path in sample {
        let x = t.load(path, None::<&mut StdRng>).map_err(data_error)?;
        let x = x.reshape((c, ()))?.to_vec2::<f32>()?;
        for (ch, row) in x.iter().enumerate() {
            sum[ch] += row.iter().map(|&v| v as f64).sum::<f64>();
            sq[ch] += row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        }
        n += x[0].len();
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
    let std = sq.iter().zip(&mean).map(|(q, &m)| ((q / n as f64 - (m as f64).powi(2)).max(1e-12).sqrt()) as f32);
    let std = std.collect();
    Ok((mean, std))
}

impl Task for ImageTask {
    type Model = VisionModel;
    type Batch = ImageBatch;

    fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        Ok(self.config.init_params(seed)?)
    }

    fn build_model(&self, vb: VarBuilder) -> Result<VisionModel> {
        Ok(VisionModel::load(vb, &self.config)?)
    }

    fn len(&self, split: Split) -> usize {
        self.items[split as usize].len()
    }

    fn batch(&self, split: Split, epoch: usize, indices: &[usize]) -> Result<ImageBatch> {
        let transform = &self.meta.transform;
        let mut images = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (path, class) = &self.items[split as usize][i];
            let mut rng = StdRng::seed_from_u64(example_seed(self.seed, split, epoch, i));
            let rng = (split == Split::Train).then_some(&mut rng);
            images.push(transform.load(path, rng).map_err(data_error)?);
            labels.push(*class as u32);
        }
        Ok(ImageBatch {
            images: Tensor::stack(&images, 0)?,
            labels: Tensor::new(labels, &Device::Cpu)?,
            seed: example_seed(self.seed ^ 0xD0_D0, split, epoch, indices.first().copied().unwrap_or(0)),
        })
    }

    fn forward(&self, model: &VisionModel, batch: &ImageBatch, train: bool) -> Result<(Tensor, Metrics)> {
        let (_, loss, m) = self.scored(model, batch, train)?;
        Ok((loss, m))
    }

    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let json = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Config { path: "image.json".into(), message: e.to_string() })?;
        Ok(vec![("image.json".into(), json)])
    }

    fn best_metric(&self) -> (&'static str, bool) {
        ("accuracy", true)
    }
}

/// A trained classifier from a checkpoint directory: its train.toml's `[model]` (and
/// `[backbone]`), image.json and weights. The training data is not read. With `image_size`, the
/// model runs at another size than it was trained at: Vim's position embedding is resized over
/// the new patch grid (VMamba has none), and the transform's crop and resize scale with it.
pub fn load_classifier(dir: &Path, image_size: Option<usize>) -> Result<(VisionModel, ImageMeta)> {
    let meta_path = dir.join("image.json");
    let mut meta: ImageMeta =
        serde_json::from_slice(&std::fs::read(&meta_path).map_err(crate::trainer::io(&meta_path))?)
            .map_err(|e| Error::Checkpoint { path: meta_path.display().to_string(), message: e.to_string() })?;
    let config_path = dir.join("train.toml");
    let source = config_path.display().to_string();
    let text = std::fs::read_to_string(&config_path).map_err(crate::trainer::io(&config_path))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| Error::Config { path: source.clone(), message: e.to_string() })?;
    let t = &meta.transform;
    let trained_shape = ImageShape {
        image_size: Size2d::square(t.crop as usize),
        channels: t.channels,
        num_classes: meta.classes.len(),
    };
    let trained = VisionConfig::from_file_table(table.clone(), &source, Some(trained_shape))?;
    let mut tensors = crate::run::checkpoint_tensors(dir)?;
    let config = match image_size {
        Some(size) if Size2d::square(size) != trained_shape.image_size => {
            let shape = ImageShape { image_size: Size2d::square(size), ..trained_shape };
            let config = VisionConfig::from_file_table(table, &source, Some(shape))?;
            if let (VisionConfig::Vim(from), VisionConfig::Vim(to), Some(pos)) =
                (&trained, &config, tensors.get("pos_embed"))
            {
                let resized = resize_pos_embed(pos, from, to)?;
                tensors.insert("pos_embed".into(), resized);
            }
            let t = &mut meta.transform;
            t.resize = (t.resize as f64 * size as f64 / t.crop as f64).round() as u32;
            t.crop = size as u32;
            config
        }
        _ => trained,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok((VisionModel::load(vb, &config)?, meta))
}

/// Class probabilities of each image at `paths`, highest first.
pub fn classify(model: &VisionModel, meta: &ImageMeta, paths: &[PathBuf]) -> Result<Vec<Vec<(String, f32)>>> {
    let transform = &meta.transform;
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(32) {
        let images = chunk
            .iter()
            .map(|p| transform.load(p, None::<&mut StdRng>).map_err(data_error))
            .collect::<Result<Vec<_>>>()?;
        let probs = candle_nn::ops::softmax(&model.forward(&Tensor::stack(&images, 0)?, None)?, D::Minus1)?;
        for row in probs.to_vec2::<f32>()? {
            let mut ranked: Vec<(String, f32)> = meta.classes.iter().cloned().zip(row).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.push(ranked);
        }
    }
    Ok(out)
}
