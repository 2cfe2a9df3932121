//! Classification with a Vim or VMamba backbone over any labelled examples that load as
//! (channels, height, width) tensors: images, spectrograms of audio clips, time series.
//! Cross-entropy with optional label smoothing, accuracy and top-5; a confusion matrix for
//! `mamba eval`; checkpoints that classify new inputs without the training data.

use crate::{ImageShape, VisionConfig, VisionModel};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use mamba_nn::Param;
use mamba_train::{
    example_seed, read_checked, smoothed, Checked, Error, Evaluation, Metrics, PredictOptions, Result, Split, Task,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A labelled data set split in two.
pub trait Examples: Send + Sync + 'static {
    fn classes(&self) -> &[String];
    fn len(&self, split: Split) -> usize;
    /// Example `index` of `split` as (channels, height, width) and its class; with `rng`
    /// (training), augmented.
    fn example(&self, split: Split, index: usize, rng: Option<&mut StdRng>) -> Result<(Tensor, usize)>;
    /// Where example `index` of `split` comes from, for errors: its file, or its case of one.
    fn source(&self, split: Split, index: usize) -> String;
    /// The file a checkpoint carries to turn new inputs into examples (`image.json`, ...).
    fn meta_file(&self) -> Result<(String, Vec<u8>)>;
}

/// What turns a file into a model input, as a checkpoint carries it (`image.json`, `audio.json`),
/// so that new files can be classified without the training data.
pub trait InputMeta: Checked + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {
    /// The checkpoint file it is saved as.
    const FILE: &'static str;
    /// A file decoded, before any augmentation (pixels, samples).
    type Decoded: Send + Sync + 'static;
    fn classes(&self) -> &[String];
    fn decode(&self, path: &Path) -> Result<Self::Decoded>;
    /// The bytes `decoded` holds (for the budget of [`Files::new`]).
    fn decoded_bytes(decoded: &Self::Decoded) -> usize;
    /// The input (channels, height, width) of a decoded file; with `rng`, augmented.
    fn input_from(&self, decoded: &Self::Decoded, rng: Option<&mut StdRng>) -> Result<Tensor>;

    /// The input of the file at `path`.
    fn input(&self, path: &Path, rng: Option<&mut StdRng>) -> Result<Tensor> {
        self.input_from(&self.decode(path)?, rng)
    }
}

/// At most this much decoded data of a split is kept in memory; a larger split is decoded as it
/// is read.
pub const DECODED_BUDGET: usize = 2 << 30;

/// Labelled files, (path, class) per split, and how they load: each split decoded once, the
/// first time an example of it is read, when it fits in memory (so `mamba eval` decodes only
/// the validation files), else in every epoch.
pub struct Files<M: InputMeta> {
    pub meta: M,
    pub items: [Vec<(PathBuf, usize)>; 2],
    decoded: [OnceLock<Option<Vec<M::Decoded>>>; 2],
}

impl<M: InputMeta> Files<M> {
    pub fn new(meta: M, items: [Vec<(PathBuf, usize)>; 2]) -> Self {
        Self { meta, items, decoded: Default::default() }
    }

    /// With `split`'s files already decoded (in the order of its items), as opening the data
    /// did to check them.
    pub fn with_decoded(self, split: Split, decoded: Vec<M::Decoded>) -> Self {
        assert_eq!(decoded.len(), self.items[split as usize].len(), "one decoded file per item");
        let _ = self.decoded[split as usize].set(Some(decoded));
        self
    }

    /// Every file of `split` decoded (in parallel), or None past the budget or on a bad file
    /// (which then fails, by name, when its example is read).
    fn decode_split(&self, split: Split) -> Option<Vec<M::Decoded>> {
        let mut bytes = 0;
        let mut out = Vec::new();
        // In blocks, so that a split past the budget stops early.
        for block in self.items[split as usize].chunks(256) {
            let decoded = block.par_iter().map(|(path, _)| self.meta.decode(path)).collect::<Result<Vec<_>>>().ok()?;
            bytes += decoded.iter().map(M::decoded_bytes).sum::<usize>();
            if bytes > DECODED_BUDGET {
                return None;
            }
            out.extend(decoded);
        }
        Some(out)
    }
}

impl<M: InputMeta> Examples for Files<M> {
    fn classes(&self) -> &[String] {
        self.meta.classes()
    }

    fn len(&self, split: Split) -> usize {
        self.items[split as usize].len()
    }

    fn example(&self, split: Split, index: usize, rng: Option<&mut StdRng>) -> Result<(Tensor, usize)> {
        let (path, class) = &self.items[split as usize][index];
        let input = match self.decoded[split as usize].get_or_init(|| self.decode_split(split)) {
            Some(decoded) => self.meta.input_from(&decoded[index], rng)?,
            None => self.meta.input(path, rng)?,
        };
        Ok((input, *class))
    }

    fn source(&self, split: Split, index: usize) -> String {
        self.items[split as usize][index].0.display().to_string()
    }

    fn meta_file(&self) -> Result<(String, Vec<u8>)> {
        let json = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Config { path: M::FILE.into(), message: e.to_string() })?;
        Ok((M::FILE.into(), json))
    }
}

pub struct ClassifyBatch {
    pub inputs: Tensor,
    pub labels: Tensor,
    /// Seeds drop-path when training.
    pub seed: u64,
}

pub struct Classify<E> {
    pub config: VisionConfig,
    pub examples: E,
    pub label_smoothing: f64,
    pub seed: u64,
}

impl<E: Examples> Classify<E> {
    /// The model config from `[model]` and `[backbone]`, with the input size, channels and
    /// classes the examples have.
    pub fn new(
        examples: E,
        shape: ImageShape,
        (model, backbone): (toml::Table, Option<toml::Table>),
        source: &str,
        label_smoothing: f64,
        seed: u64,
    ) -> Result<Self> {
        // An empty training split is the trainer's to refuse: evaluation reads only validation.
        if examples.len(Split::Validation) == 0 {
            let message = "[task] the validation split needs examples".into();
            return Err(Error::Config { path: source.to_string(), message });
        }
        let config = VisionConfig::from_tables(model, backbone, source, Some(shape))?;
        Ok(Self { config, examples, label_smoothing, seed })
    }

    /// A batch's logits, mean loss and metrics (loss, accuracy, top-5 past five classes).
    fn scored(&self, model: &VisionModel, batch: &ClassifyBatch, train: bool) -> Result<(Tensor, Tensor, Metrics)> {
        let mut rng = StdRng::seed_from_u64(batch.seed);
        let logits = model.forward(&batch.inputs, train.then_some(&mut rng))?;
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
        if self.examples.classes().len() > 5 {
            m.add("top5", rank.iter().filter(|&&r| r < 5.0).count() as f64, n);
        }
        Ok((logits, loss, m))
    }

    /// The validation split's metrics (as `trainer::evaluate` gives them) and its confusion
    /// matrix, `[true class][predicted class]` counts, in one pass; batches on `device` (the
    /// model's).
    pub fn evaluate_with_confusion(&self, model: &VisionModel, device: &Device) -> Result<(Metrics, Vec<Vec<usize>>)> {
        let k = self.examples.classes().len();
        let (mut total, mut confusion) = (Metrics::default(), vec![vec![0; k]; k]);
        let indices: Vec<usize> = (0..self.len(Split::Validation)).collect();
        for chunk in indices.chunks(64) {
            let batch = self.batch(Split::Validation, 0, chunk, device)?;
            let (logits, _, m) = self.scored(model, &batch, false)?;
            total.merge(&m);
            let truth = batch.labels.to_vec1::<u32>()?;
            for (t, p) in truth.into_iter().zip(logits.argmax(D::Minus1)?.to_vec1::<u32>()?) {
                confusion[t as usize][p as usize] += 1;
            }
        }
        Ok((total, confusion))
    }
}

impl<E: Examples> Task for Classify<E> {
    type Model = VisionModel;
    type Batch = ClassifyBatch;

    fn params(&self) -> Vec<Param> {
        self.config.params()
    }

    fn build_model(&self, vb: VarBuilder) -> Result<VisionModel> {
        Ok(VisionModel::load(vb, &self.config)?)
    }

    fn len(&self, split: Split) -> usize {
        self.examples.len(split)
    }

    fn batch(&self, split: Split, epoch: usize, indices: &[usize], device: &Device) -> Result<ClassifyBatch> {
        let mut inputs = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let mut rng = StdRng::seed_from_u64(example_seed(self.seed, split, epoch, i));
            let (x, class) = self.examples.example(split, i, (split == Split::Train).then_some(&mut rng))?;
            check_finite(&x, || self.examples.source(split, i))?;
            inputs.push(x);
            labels.push(class as u32);
        }
        Ok(ClassifyBatch {
            inputs: Tensor::stack(&inputs, 0)?.to_device(device)?,
            labels: Tensor::new(labels, device)?,
            seed: example_seed(self.seed ^ 0xD0_D0, split, epoch, indices.first().copied().unwrap_or(0)),
        })
    }

    fn forward(&self, model: &VisionModel, batch: &ClassifyBatch, train: bool) -> Result<(Tensor, Metrics)> {
        let (_, loss, m) = self.scored(model, batch, train)?;
        Ok((loss, m))
    }

    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![self.examples.meta_file()?])
    }

    fn best_metric(&self) -> (&'static str, bool) {
        ("accuracy", true)
    }

    fn evaluation(&self, model: &VisionModel, device: &Device) -> Result<Evaluation> {
        let (metrics, matrix) = self.evaluate_with_confusion(model, device)?;
        Ok(Evaluation { confusion: Some((self.examples.classes().to_vec(), matrix)), ..Evaluation::of(&metrics) })
    }
}

/// An input (channels, height, width) with no NaN or infinity, which would reach the loss or the
/// prediction as NaN; else an error naming `source` and the first such value's position. Loaders
/// refuse what they can see (a NaN sample, a missing value); this also catches what arises on the
/// way, such as a float WAV whose power spectrum overflows.
pub fn check_finite(input: &Tensor, source: impl FnOnce() -> String) -> Result<()> {
    let values = input.flatten_all()?.to_vec1::<f32>()?;
    let Some(i) = values.iter().position(|v| !v.is_finite()) else { return Ok(()) };
    let (_, h, w) = input.dims3()?;
    let message = format!(
        "the model input holds {} at channel {}, row {}, column {} (counting from 0); inputs must be finite",
        values[i],
        i / (h * w),
        i / w % h,
        i % w
    );
    Err(Error::Config { path: source(), message })
}

/// A checkpoint's meta file (`M::FILE`), parsed and checked.
pub fn read_meta<M: InputMeta>(dir: &Path) -> Result<M> {
    read_checked(&dir.join(M::FILE))
}

/// At least one class.
pub fn check_classes(classes: &[String]) -> std::result::Result<(), String> {
    if classes.is_empty() {
        return Err("no classes".into());
    }
    Ok(())
}

/// Class probabilities of each file at `paths`, highest first; `model` runs on `device`.
pub fn classify_files<M: InputMeta>(
    model: &VisionModel,
    meta: &M,
    paths: &[impl AsRef<Path>],
    device: &Device,
) -> Result<Vec<Vec<(String, f32)>>> {
    let inputs = paths
        .iter()
        .map(|p| {
            let p = p.as_ref();
            let x = meta.input(p, None)?;
            check_finite(&x, || p.display().to_string())?;
            Ok(x)
        })
        .collect::<Result<Vec<_>>>()?;
    rank(model, meta.classes(), &inputs, device)
}

/// Class probabilities of each input (channels, height, width), highest first; `model` runs on
/// `device`.
pub fn rank(
    model: &VisionModel,
    classes: &[String],
    inputs: &[Tensor],
    device: &Device,
) -> Result<Vec<Vec<(String, f32)>>> {
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(32) {
        let batch = Tensor::stack(chunk, 0)?.to_device(device)?;
        let probs = candle_nn::ops::softmax(&model.forward(&batch, None)?, D::Minus1)?;
        for row in probs.to_vec2::<f32>()? {
            let mut ranked: Vec<(String, f32)> = classes.iter().cloned().zip(row).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.push(ranked);
        }
    }
    Ok(out)
}

/// `mamba predict`'s lines: each input's name and its `options.top` most probable classes.
pub fn ranked_lines(names: &[String], ranked: Vec<Vec<(String, f32)>>, options: &PredictOptions) -> Vec<String> {
    names
        .iter()
        .zip(ranked)
        .map(|(name, ranked)| {
            let shown: Vec<String> =
                ranked.iter().take(options.top.max(1)).map(|(c, p)| format!("{c} {p:.4}")).collect();
            format!("{name}: {}", shown.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files whose bytes are the input.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Bytes {
        classes: Vec<String>,
    }

    impl Checked for Bytes {
        fn check(&self) -> std::result::Result<(), String> {
            check_classes(&self.classes)
        }
    }

    impl InputMeta for Bytes {
        const FILE: &'static str = "bytes.json";
        type Decoded = Vec<u8>;

        fn classes(&self) -> &[String] {
            &self.classes
        }
        fn decode(&self, path: &Path) -> Result<Vec<u8>> {
            std::fs::read(path).map_err(|e| Error::Config { path: path.display().to_string(), message: e.to_string() })
        }
        fn decoded_bytes(b: &Vec<u8>) -> usize {
            b.len()
        }
        fn input_from(&self, b: &Vec<u8>, _: Option<&mut StdRng>) -> Result<Tensor> {
            let v: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            Ok(Tensor::from_vec(v, (1, 1, b.len()), &Device::Cpu)?)
        }
    }

    #[test]
    fn files_are_decoded_once() {
        let dir = std::env::temp_dir().join(format!("mamba-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths: Vec<PathBuf> = (0..3u8).map(|i| dir.join(format!("{i}.bin"))).collect();
        for (i, p) in paths.iter().enumerate() {
            std::fs::write(p, [i as u8, 7, 9]).unwrap();
        }
        let items = [vec![(paths[0].clone(), 0), (paths[1].clone(), 1)], vec![(paths[2].clone(), 1)]];
        let files = Files::new(Bytes { classes: vec!["a".into(), "b".into()] }, items);
        // Reading one example of each split decodes the split.
        files.example(Split::Train, 0, None).unwrap();
        files.example(Split::Validation, 0, None).unwrap();
        let want: Vec<Vec<f32>> = paths
            .iter()
            .map(|p| files.meta.input(p, None).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        // The files are gone: what the examples return was decoded when the split was first read.
        std::fs::remove_dir_all(&dir).unwrap();
        for (split, index, file) in [(Split::Train, 0, 0), (Split::Train, 1, 1), (Split::Validation, 0, 2)] {
            let (x, class) = files.example(split, index, None).unwrap();
            assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want[file]);
            assert_eq!(class, files.items[split as usize][index].1);
        }
        assert!(files.meta.input(&paths[0], None).is_err(), "reading the file again fails");
    }

    #[test]
    fn a_value_that_is_not_finite_is_named_by_source_and_position() {
        let mut v = vec![0.5f32; 2 * 3 * 4];
        check_finite(&Tensor::from_vec(v.clone(), (2, 3, 4), &Device::Cpu).unwrap(), || unreachable!()).unwrap();
        for (bad, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
            v[12 + 2 * 4 + 3] = bad; // channel 1, row 2, column 3
            let x = Tensor::from_vec(v.clone(), (2, 3, 4), &Device::Cpu).unwrap();
            let msg = check_finite(&x, || "a.wav".into()).unwrap_err().to_string();
            assert!(
                msg.starts_with("a.wav: ") && msg.contains(&format!("holds {shown} at channel 1, row 2, column 3")),
                "{msg}"
            );
        }
    }
}
