//! `[task] kind = "audio_classification"`: keyword spotting and sound events over an
//! AudioFolder. Each clip's
//! normalised log-mel spectrogram is a one-channel image (mel bins x frames) for a Vim or VMamba
//! backbone, the Audio Mamba recipe: patches or frame tokens, bidirectional routes. Validation
//! clips are held-out speakers, a Speech Commands list, or a seeded fraction.

use crate::{AudioError, AudioFolder, Augment, Frontend, MelConfig};
use candle_core::{Device, Tensor};
use mamba_grid::classify::{check_classes, classify_files, ranked_lines, read_meta, Classify, Files, InputMeta};
use mamba_grid::{ImageShape, Size2d, VisionConfig, VisionModel};
use mamba_train::{
    check_input_size, check_standardisation, checkpoint_weights, read_train_config, Checked, DynTask, Error,
    PredictOptions, Result, TaskInput, TaskKind,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a checkpoint needs to classify new clips without the training data: `audio.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AudioMeta {
    pub classes: Vec<String>,
    pub frontend: Frontend,
}

/// The `[task]` keys of an audio classification run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioData {
    /// An AudioFolder root: `LABEL/*.wav`.
    pub data: PathBuf,
    /// Validation is one of: the clips whose file name contains one of these strings (speakers
    /// held out from training), ...
    #[serde(default)]
    pub held_out: Vec<String>,
    /// ... the clips listed in this file (`LABEL/FILE.wav` per line, Speech Commands'
    /// validation_list.txt), or a seeded fraction of the clips.
    pub validation_list: Option<PathBuf>,
    pub validation_fraction: Option<f64>,
    /// Seconds per clip (cropped or padded).
    #[serde(default = "one")]
    pub duration: f64,
    #[serde(default)]
    pub features: MelConfig,
    #[serde(default)]
    pub augment: Augment,
    /// Log-mel normalisation (dB); measured on the training clips when left out.
    pub mean: Option<f32>,
    pub std: Option<f32>,
    /// Subtract each mel bin's mean over the clip first.
    #[serde(default)]
    pub bin_mean: bool,
    #[serde(default)]
    pub label_smoothing: f64,
}

fn one() -> f64 {
    1.0
}

pub type AudioTask = Classify<Files<AudioMeta>>;

impl From<AudioError> for Error {
    fn from(e: AudioError) -> Self {
        Error::Data(Box::new(e))
    }
}

/// `[task] kind = "audio_classification"`: an AudioFolder (path relative to the config file), its
/// split, features and augmentation, as [`AudioData`] reads them.
pub struct AudioClassification;

impl TaskKind for AudioClassification {
    fn name(&self) -> &'static str {
        "audio_classification"
    }

    fn path_keys(&self) -> &'static [&'static str] {
        &["data", "validation_list"]
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let data: AudioData = input.section()?;
        let trained = input.checkpoint.map(read_meta).transpose()?;
        Ok(Box::new(data.task(input.model, input.backbone, input.source, input.seed, trained)?))
    }

    /// Every clip of an AudioFolder root is evaluated.
    fn evaluate_on(&self, task: &mut toml::Table, data: &Path) -> std::result::Result<(), String> {
        task.remove("held_out");
        task.remove("validation_list");
        task.insert("validation_fraction".into(), toml::Value::Float(1.0));
        task.insert("data".into(), toml::Value::String(data.display().to_string()));
        Ok(())
    }

    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        let (model, meta) = load_audio_classifier(dir, device)?;
        Ok(ranked_lines(inputs, classify_files(&model, &meta, inputs, device)?, options))
    }
}

impl AudioData {
    /// The task: opens the folder (every file's WAV header read), splits it, measures the normalisation
    /// if not given, and builds the model config (mel bins x frames, one channel, the classes).
    /// With `trained` (a checkpoint's audio.json), for evaluation: the front end and classes are
    /// the checkpoint's, and the training clips are left unread.
    pub fn task(
        self,
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        seed: u64,
        trained: Option<AudioMeta>,
    ) -> Result<AudioTask> {
        let d = self;
        let err = |message: String| Error::Config { path: source.to_string(), message };
        d.features.check().map_err(|m| err(format!("[task.features] {m}")))?;
        if d.duration.is_nan() || d.duration <= 0.0 {
            return Err(err(format!("[task] duration = {}: a clip needs a positive length", d.duration)));
        }
        let folder = AudioFolder::open(&d.data)?;
        let (train, validation) = match (&d.held_out[..], &d.validation_list, d.validation_fraction) {
            ([_, ..], None, None) => folder.split_where(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
                d.held_out.iter().any(|s| name.contains(s.as_str()))
            }),
            ([], Some(list), None) => folder.split_by_list(list)?,
            ([], None, fraction) => {
                let fraction = fraction.unwrap_or(0.1);
                // 1: every clip, which only evaluating a checkpoint on another folder asks for.
                let all = trained.is_some() && fraction == 1.0;
                if !(0.0..1.0).contains(&fraction) && !all {
                    return Err(err("[task] validation_fraction must be in [0, 1)".into()));
                }
                let mut items = folder.items.clone();
                items.shuffle(&mut StdRng::seed_from_u64(seed));
                let held = items.split_off(items.len() - (items.len() as f64 * fraction).round() as usize);
                (items, held)
            }
            _ => return Err(err("[task] give one of held_out, validation_list and validation_fraction".into())),
        };
        let (train, frontend) = match trained {
            Some(meta) if meta.classes != folder.classes => {
                return Err(err(format!(
                    "[task] the checkpoint's classes {:?} differ from the data's {:?}",
                    meta.classes, folder.classes
                )))
            }
            Some(meta) => (vec![], meta.frontend),
            None => {
                let mut frontend = Frontend::new(d.features, d.duration, d.augment);
                frontend.bin_mean = d.bin_mean;
                match (d.mean, d.std) {
                    (Some(mean), Some(std)) if std > 0.0 => (frontend.mean, frontend.std) = (mean, std),
                    (None, None) => frontend.measure(train.iter().map(|(p, _)| p.as_path()))?,
                    _ => {
                        let message = "[task] give mean and std (positive), or neither (then they are measured)";
                        return Err(err(message.into()));
                    }
                }
                (train, frontend)
            }
        };
        let (bins, frames) = frontend.shape();
        let shape =
            ImageShape { image_size: Size2d::new(bins, frames), channels: 1, num_classes: folder.classes.len() };
        let examples = Files::new(AudioMeta { classes: folder.classes, frontend }, [train, validation]);
        Classify::new(examples, shape, (model, backbone), source, d.label_smoothing, seed)
    }
}

impl Checked for AudioMeta {
    fn check(&self) -> std::result::Result<(), String> {
        let (f, mel) = (&self.frontend, &self.frontend.features);
        check_classes(&self.classes)?;
        if mel.sample_rate == 0 || mel.n_fft == 0 || mel.hop_length == 0 || mel.n_mels == 0 || f.samples == 0 {
            return Err(format!(
                "sample_rate {}, n_fft {}, hop_length {}, n_mels {}, samples {}: each must be at least 1",
                mel.sample_rate, mel.n_fft, mel.hop_length, mel.n_mels, f.samples
            ));
        }
        let (bins, frames) = f.shape();
        if frames == 0 {
            return Err(format!("{} samples give no frame of n_fft {}", f.samples, mel.n_fft));
        }
        check_input_size("samples", &[f.samples])?;
        check_input_size("n_fft", &[mel.n_fft])?;
        check_input_size("bins x frames", &[bins, frames])?;
        check_standardisation(&[f.mean], &[f.std], 1)
    }
}

impl InputMeta for AudioMeta {
    const FILE: &'static str = "audio.json";

    fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The clip's samples at the front end's rate.
    type Decoded = Vec<f32>;

    fn decode(&self, path: &Path) -> Result<Vec<f32>> {
        Ok(crate::load(path, self.frontend.features.sample_rate)?)
    }

    fn decoded_bytes(samples: &Vec<f32>) -> usize {
        samples.len() * 4
    }

    /// A clip's normalised log-mel, (1, mel bins, frames).
    fn input_from(&self, samples: &Vec<f32>, rng: Option<&mut StdRng>) -> Result<Tensor> {
        let (bins, frames) = self.frontend.shape();
        Ok(Tensor::from_vec(self.frontend.spectrogram(samples, rng)?, (1, bins, frames), &Device::Cpu)?)
    }
}

/// A trained audio classifier from a checkpoint directory: its train.toml's `[model]` (and
/// `[backbone]`), audio.json and weights (put on `device`). The training data is not read.
pub fn load_audio_classifier(dir: &Path, device: &Device) -> Result<(VisionModel, AudioMeta)> {
    let meta: AudioMeta = read_meta(dir)?;
    let (table, source) = read_train_config(dir)?;
    let (bins, frames) = meta.frontend.shape();
    let shape = ImageShape { image_size: Size2d::new(bins, frames), channels: 1, num_classes: meta.classes.len() };
    let config = VisionConfig::from_file_table(table, &source, Some(shape))?;
    Ok((VisionModel::load(checkpoint_weights(dir, device)?, &config)?, meta))
}
