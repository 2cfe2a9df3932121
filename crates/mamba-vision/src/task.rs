//! `[task] kind = "image_classification"`: ImageFolder directories classified by a Vim or VMamba
//! model, with seeded random crops and flips for training and centre crops for validation (the
//! loss, metrics and confusion matrix are `mamba_grid::classify`'s).

use crate::{BadImages, ImageFolder, Transform};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;
use mamba_grid::classify::{
    check_classes, classify_files, ranked_lines, read_meta, Classify, Files, InputMeta, DECODED_BUDGET,
};
use mamba_grid::{resize_pos_embed, ImageShape, Size2d, VisionConfig, VisionModel};
use mamba_train::{
    check_input_size, check_standardisation, checkpoint_tensors, read_train_config, Checked, DynTask, Error,
    PredictOptions, Result, Split, TaskInput, TaskKind,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a checkpoint needs to classify new images without the training data: `image.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    pub classes: Vec<String>,
    pub transform: Transform,
}

impl Checked for ImageMeta {
    fn check(&self) -> std::result::Result<(), String> {
        let t = &self.transform;
        check_classes(&self.classes)?;
        if t.channels == 0 || t.crop == 0 || t.resize == 0 {
            return Err(format!(
                "channels {}, resize {}, crop {}: each must be at least 1",
                t.channels, t.resize, t.crop
            ));
        }
        let (resize, crop) = (t.resize as usize, t.crop as usize);
        check_input_size("channels x resize x resize", &[t.channels, resize, resize])?;
        check_input_size("channels x crop x crop", &[t.channels, crop, crop])?;
        if !(0.0..=1.0).contains(&t.hflip) {
            return Err(format!("hflip {}: a probability is in [0, 1]", t.hflip));
        }
        check_standardisation(&t.mean, &t.std, t.channels)
    }
}

impl InputMeta for ImageMeta {
    const FILE: &'static str = "image.json";

    fn classes(&self) -> &[String] {
        &self.classes
    }

    type Decoded = DynamicImage;

    fn decode(&self, path: &Path) -> Result<DynamicImage> {
        crate::decode(path).map_err(data_error)
    }

    fn decoded_bytes(img: &DynamicImage) -> usize {
        img.as_bytes().len()
    }

    fn input_from(&self, img: &DynamicImage, rng: Option<&mut StdRng>) -> Result<Tensor> {
        self.transform.apply(img.clone(), rng).map_err(data_error)
    }
}

pub type ImageTask = Classify<Files<ImageMeta>>;

/// `[task] kind = "image_classification"`: ImageFolder directories (paths relative to the config
/// file) and transforms, as [`ImageData`] reads them.
pub struct ImageClassification;

impl TaskKind for ImageClassification {
    fn name(&self) -> &'static str {
        "image_classification"
    }

    fn path_keys(&self) -> &'static [&'static str] {
        &["train", "validation"]
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let data: ImageData = input.section()?;
        let trained = input.checkpoint.map(read_meta).transpose()?;
        Ok(Box::new(data.task(input.model, input.backbone, input.source, input.seed, trained)?))
    }

    /// The images of an ImageFolder root are the validation set.
    fn evaluate_on(&self, task: &mut toml::Table, data: &Path) -> std::result::Result<(), String> {
        task.insert("validation".into(), toml::Value::String(data.display().to_string()));
        Ok(())
    }

    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        let (model, meta) = load_classifier(dir, options.image_size, device)?;
        Ok(ranked_lines(inputs, classify_files(&model, &meta, inputs, device)?, options))
    }
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

fn data_error(e: crate::DataError) -> Error {
    Error::Config { path: "[task]".into(), message: e.to_string() }
}

impl ImageData {
    /// The task: opens the folders (every image decoded once, in parallel, and kept when the set
    /// fits in memory: a corrupt one fails here or is skipped and listed), splits off
    /// validation if no folder is given, measures mean and std if not given, and builds the
    /// model config (image size, channels and classes from the data).
    ///
    /// With `trained` (a checkpoint's image.json), for evaluation: the transform and classes are
    /// the checkpoint's and only the validation images are read. The training folder is listed,
    /// not decoded, and only when validation is a fraction of it.
    pub fn task(
        self,
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        seed: u64,
        trained: Option<ImageMeta>,
    ) -> Result<ImageTask> {
        let d = self;
        let err = |message: String| Error::Config { path: source.to_string(), message };
        if d.channels != 1 && d.channels != 3 {
            return Err(err(format!("[task] channels = {}: 1 (grayscale) or 3 (RGB)", d.channels)));
        }
        let evaluating = trained.is_some();
        let open = |root: &Path, keep: bool| -> Result<ImageFolder> {
            let folder = match (keep, d.bad_images) {
                (true, _) => ImageFolder::open_keeping(root, d.bad_images, DECODED_BUDGET),
                // Training failed on any bad image, so the listing is what it split.
                (false, BadImages::Fail) if evaluating => ImageFolder::scan(root),
                (false, _) => ImageFolder::open(root, d.bad_images),
            }
            .map_err(data_error)?;
            report_skipped(&folder);
            Ok(folder)
        };
        let (classes, mut splits) = match &d.validation {
            Some(root) => {
                let val = open(root, true)?;
                let train = if evaluating { None } else { Some(open(&d.train, true)?) };
                let classes = train.as_ref().map_or(&val.classes, |t| &t.classes);
                if val.classes != *classes {
                    return Err(err(format!(
                        "[task] validation {}: classes {:?} differ from the training set's {:?}",
                        root.display(),
                        val.classes,
                        classes
                    )));
                }
                let train = train.map_or_else(SplitFiles::empty, SplitFiles::of);
                (val.classes.clone(), [train, SplitFiles::of(val)])
            }
            None => {
                if !(0.0..1.0).contains(&d.validation_fraction) {
                    return Err(err("[task] validation_fraction must be in [0, 1)".into()));
                }
                let folder = open(&d.train, !evaluating)?;
                // A seeded shuffle, then the last fraction: every class in both splits (likely).
                let mut order: Vec<usize> = (0..folder.items.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(seed));
                let n_val = (order.len() as f64 * d.validation_fraction).round() as usize;
                let val_order = order.split_off(order.len() - n_val);
                if evaluating {
                    order.clear();
                }
                (folder.classes.clone(), SplitFiles::split(folder, [&order, &val_order]))
            }
        };
        let transform = match trained {
            Some(meta) => {
                if meta.classes != classes {
                    return Err(err(format!(
                        "[task] the checkpoint's classes {:?} differ from the data's {classes:?}",
                        meta.classes
                    )));
                }
                meta.transform
            }
            None => {
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
                    (None, None) => channel_stats(&transform, &splits[0], seed)?,
                    _ => return Err(err("[task] give both mean and std, or neither (then they are measured)".into())),
                };
                if mean.len() != d.channels || std.len() != d.channels || std.iter().any(|&s| s <= 0.0) {
                    return Err(err(format!("[task] mean and std need {} values each, std positive", d.channels)));
                }
                (transform.mean, transform.std) = (mean, std);
                transform
            }
        };
        let shape = ImageShape {
            image_size: Size2d::square(transform.crop as usize),
            channels: transform.channels,
            num_classes: classes.len(),
        };
        let decoded = splits.each_mut().map(|s| s.decoded.take());
        let mut examples = Files::new(ImageMeta { classes, transform }, splits.map(|s| s.items));
        for (split, decoded) in [Split::Train, Split::Validation].into_iter().zip(decoded) {
            if let Some(images) = decoded {
                examples = examples.with_decoded(split, images);
            }
        }
        Classify::new(examples, shape, (model, backbone), source, d.label_smoothing, seed)
    }
}

/// A split's files and, when they were kept, their decoded images in the same order.
struct SplitFiles {
    items: Vec<(PathBuf, usize)>,
    decoded: Option<Vec<DynamicImage>>,
}

impl SplitFiles {
    fn empty() -> Self {
        Self { items: vec![], decoded: None }
    }
    fn of(folder: ImageFolder) -> Self {
        Self { items: folder.items, decoded: folder.decoded }
    }
    /// The folder's files at each part's indices, in that order (the parts do not overlap: the
    /// decoded images move, they are not copied).
    fn split(folder: ImageFolder, parts: [&[usize]; 2]) -> [Self; 2] {
        let mut decoded: Option<Vec<Option<DynamicImage>>> = folder.decoded.map(|d| d.into_iter().map(Some).collect());
        parts.map(|indices| Self {
            items: indices.iter().map(|&i| folder.items[i].clone()).collect(),
            decoded: decoded
                .as_mut()
                .map(|d| indices.iter().map(|&i| d[i].take().expect("the parts of a split do not overlap")).collect()),
        })
    }
    /// Image `i`, decoded now unless it was kept.
    fn image(&self, i: usize) -> Result<DynamicImage> {
        match &self.decoded {
            Some(d) => Ok(d[i].clone()),
            None => crate::decode(&self.items[i].0).map_err(data_error),
        }
    }
}

fn report_skipped(folder: &ImageFolder) {
    for (path, why) in &folder.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
}

/// Per-channel mean and std of the (centre-cropped) training images, over up to 2,000 of them.
fn channel_stats(t: &Transform, train: &SplitFiles, seed: u64) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut sample: Vec<usize> = (0..train.items.len()).collect();
    sample.shuffle(&mut StdRng::seed_from_u64(seed));
    sample.truncate(2000);
    let c = t.channels;
    let (mut sum, mut sq, mut n) = (vec![0f64; c], vec![0f64; c], 0usize);
    for i in sample {
        let x = t.apply(train.image(i)?, None::<&mut StdRng>).map_err(data_error)?;
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

/// A trained classifier from a checkpoint directory: its train.toml's `[model]` (and
/// `[backbone]`), image.json and weights (put on `device`). The training data is not read. With
/// `image_size`, the model runs at another size than it was trained at: Vim's position embedding
/// is resized over the new patch grid (VMamba has none), and the transform's crop and resize
/// scale with it.
pub fn load_classifier(dir: &Path, image_size: Option<usize>, device: &Device) -> Result<(VisionModel, ImageMeta)> {
    let mut meta: ImageMeta = read_meta(dir)?;
    let (table, source) = read_train_config(dir)?;
    let t = &meta.transform;
    let trained_shape = ImageShape {
        image_size: Size2d::square(t.crop as usize),
        channels: t.channels,
        num_classes: meta.classes.len(),
    };
    let trained = VisionConfig::from_file_table(table.clone(), &source, Some(trained_shape))?;
    let mut tensors = checkpoint_tensors(dir)?;
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
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok((VisionModel::load(vb, &config)?, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_file_that_training_could_not_have_written_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("mamba-image-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = Transform { channels: 1, resize: 28, crop: 28, hflip: 0.0, mean: vec![0.1], std: vec![0.3] };
        let write = |transform: Transform| {
            let meta = ImageMeta { classes: vec!["0".into(), "1".into()], transform };
            std::fs::write(dir.join("image.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        };
        write(good.clone());
        assert_eq!(read_meta::<ImageMeta>(&dir).unwrap().transform.std, [0.3]);
        for (bad, needle) in [
            (Transform { std: vec![0.0], ..good.clone() }, "a std of 0"),
            (Transform { crop: 0, ..good.clone() }, "crop 0"),
            (Transform { crop: u32::MAX, ..good.clone() }, "more than 268435456 values"),
            (Transform { resize: 1 << 15, ..good.clone() }, "channels x resize x resize"),
            (Transform { mean: vec![], ..good.clone() }, "0 means and 1 stds"),
        ] {
            write(bad);
            let err = read_meta::<ImageMeta>(&dir).unwrap_err().to_string();
            assert!(err.contains("image.json") && err.contains(needle), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
