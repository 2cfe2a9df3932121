//! From a WAV file to what a classifier sees: a fixed-length clip at the model's rate, its dB
//! log-mel spectrogram (n_mels x frames), normalised by the data set's mean and std (as AST and
//! Audio Mamba do); for training, optionally perturbed in speed, shifted in time and masked
//! (SpecAugment).

use crate::data::{spec_augment, time_shift};
use crate::features::{log_mel, MelConfig};
use crate::wav::{fit_length, load, resample, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Training-time augmentation; every kind is off by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Speed perturbation (Ko et al. 2015): the clip resampled by a factor drawn from
    /// [1 - speed, 1 + speed] in steps of 0.01, which changes tempo and pitch together.
    pub speed: f64,
    /// Shift by up to this many seconds either way, filling with silence.
    pub time_shift: f64,
    /// SpecAugment: this many frequency bands of up to `freq_width` mel bins...
    pub freq_masks: usize,
    pub freq_width: usize,
    /// ...and time spans of up to `time_width` frames, set to the spectrogram's mean.
    pub time_masks: usize,
    pub time_width: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frontend {
    pub features: MelConfig,
    /// Clip length at `features.sample_rate`: longer clips are cropped around their centre,
    /// shorter ones padded with silence at the end.
    pub samples: usize,
    /// The log-mel's mean and std over the training clips, in dB.
    pub mean: f32,
    pub std: f32,
    /// Subtract each mel bin's mean over the clip first (cepstral mean normalisation), which
    /// removes a fixed spectral colouring: the microphone's, and part of the speaker's.
    #[serde(default)]
    pub bin_mean: bool,
    pub augment: Augment,
}

impl Frontend {
    /// A front end with unit normalisation; `measure` fills in the data set's.
    pub fn new(features: MelConfig, seconds: f64, augment: Augment) -> Self {
        let samples = (seconds * features.sample_rate as f64).round() as usize;
        Self { features, samples, mean: 0.0, std: 1.0, bin_mean: false, augment }
    }

    /// (mel bins, frames) of every spectrogram.
    pub fn shape(&self) -> (usize, usize) {
        (self.features.n_mels, self.features.frames(self.samples))
    }

    /// The normalised log-mel of a WAV file, mel bins x frames flattened row by row. With `rng`,
    /// the training augmentation.
    pub fn load(&self, path: &Path, rng: Option<&mut impl Rng>) -> Result<Vec<f32>> {
        self.spectrogram(&load(path, self.features.sample_rate)?, rng)
    }

    /// As `load`, from samples at `features.sample_rate`.
    pub fn spectrogram(&self, samples: &[f32], mut rng: Option<&mut impl Rng>) -> Result<Vec<f32>> {
        let rate = self.features.sample_rate;
        let a = &self.augment;
        let mut clip = match rng.as_deref_mut() {
            Some(rng) if a.speed > 0.0 => {
                let steps = (a.speed * 100.0).round() as i64;
                let factor = 1.0 + rng.random_range(-steps..=steps) as f64 / 100.0;
                resample(samples, (rate as f64 * factor).round() as u32, rate)?
            }
            _ => samples.to_vec(),
        };
        clip = fit_length(&clip, self.samples).0;
        if let Some(rng) = rng.as_deref_mut() {
            clip = time_shift(&clip, (a.time_shift * rate as f64).round() as usize, rng);
        }
        let mut mel = log_mel(&clip, &self.features);
        if self.bin_mean {
            for row in &mut mel {
                let m = row.iter().sum::<f32>() / row.len().max(1) as f32;
                row.iter_mut().for_each(|v| *v -= m);
            }
        }
        if let Some(rng) = rng {
            spec_augment(&mut mel, (a.freq_masks, a.freq_width), (a.time_masks, a.time_width), rng);
        }
        Ok(mel.into_iter().flatten().map(|v| (v - self.mean) / self.std).collect())
    }

    /// Sets `mean` and `std` to those of the (unaugmented) log-mels of `paths`.
    pub fn measure<'a>(&mut self, paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
        (self.mean, self.std) = (0.0, 1.0);
        let (mut sum, mut sq, mut n) = (0f64, 0f64, 0usize);
        for path in paths {
            for v in self.load(path, None::<&mut rand::rngs::StdRng>)? {
                sum += v as f64;
                sq += (v as f64).powi(2);
                n += 1;
            }
        }
        let mean = sum / n.max(1) as f64;
        self.mean = mean as f32;
        self.std = (sq / n.max(1) as f64 - mean * mean).max(1e-12).sqrt() as f32;
        Ok(())
    }
}
