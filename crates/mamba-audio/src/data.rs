//! Folders of labelled clips and the augmentations speech models train with.

use crate::wav::{AudioError, Result};
use rand::Rng;
use std::path::{Path, PathBuf};

/// Labelled clips: (file, class index).
pub type Clips = Vec<(PathBuf, usize)>;

/// `root/LABEL/*.wav` (the Speech Commands layout): the labels are the sub-directories, in name
/// order. Every file's header is read when the folder is opened, so a file that is not a WAV is
/// reported with its path before training.
#[derive(Debug, Clone)]
pub struct AudioFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    /// (file, class index), in class then file-name order.
    pub items: Clips,
}

fn io_error(path: &Path, e: std::io::Error) -> AudioError {
    AudioError::File { path: path.display().to_string(), message: e.to_string() }
}

fn sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| io_error(dir, e))?;
    v.sort();
    Ok(v)
}

impl AudioFolder {
    pub fn open(root: &Path) -> Result<Self> {
        let (mut classes, mut items) = (vec![], vec![]);
        for dir in sorted(root)?.into_iter().filter(|p| p.is_dir()) {
            let class = classes.len();
            classes.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            for file in sorted(&dir)? {
                if file.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")) {
                    hound::WavReader::open(&file).map_err(|e| AudioError::File {
                        path: file.display().to_string(),
                        message: format!("not a readable WAV file: {e}"),
                    })?;
                    items.push((file, class));
                }
            }
        }
        if items.is_empty() {
            return Err(AudioError::File {
                path: root.display().to_string(),
                message: "no root/LABEL/*.wav files".into(),
            });
        }
        Ok(Self { root: root.to_path_buf(), classes, items })
    }

    /// (kept, held out): the files whose path relative to the root (`LABEL/FILE.wav`, as in
    /// Speech Commands' validation_list.txt and testing_list.txt) is a line of `list` are held out.
    pub fn split_by_list(&self, list: &Path) -> Result<(Clips, Clips)> {
        let text = std::fs::read_to_string(list).map_err(|e| io_error(list, e))?;
        let listed: std::collections::HashSet<PathBuf> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| self.root.join(l)).collect();
        Ok(self.split_where(|p| listed.contains(p)))
    }

    /// (kept, held out): the files for which `held_out(path)` is true are held out, e.g. every clip
    /// of some speakers, so that a model is judged on voices it never heard.
    pub fn split_where(&self, held_out: impl Fn(&Path) -> bool) -> (Clips, Clips) {
        self.items.iter().cloned().partition(|(p, _)| !held_out(p))
    }
}

/// SpecAugment's masking (Park et al. 2019) on a spectrogram (bins x frames): `freq_masks` bands
/// of up to `max_freq` bins and `time_masks` spans of up to `max_time` frames, each width drawn
/// uniformly from 0 to its maximum, set to the spectrogram's mean.
pub fn spec_augment(
    spec: &mut [Vec<f32>],
    (freq_masks, max_freq): (usize, usize),
    (time_masks, max_time): (usize, usize),
    rng: &mut impl Rng,
) {
    let (bins, frames) = (spec.len(), spec.first().map_or(0, |r| r.len()));
    if bins == 0 || frames == 0 {
        return;
    }
    let mean = spec.iter().flatten().sum::<f32>() / (bins * frames) as f32;
    for _ in 0..freq_masks {
        let width = rng.random_range(0..=max_freq.min(bins));
        let start = rng.random_range(0..=bins - width);
        spec[start..start + width].iter_mut().for_each(|row| row.fill(mean));
    }
    for _ in 0..time_masks {
        let width = rng.random_range(0..=max_time.min(frames));
        let start = rng.random_range(0..=frames - width);
        spec.iter_mut().for_each(|row| row[start..start + width].fill(mean));
    }
}

/// Shifts a clip by up to `max_shift` samples either way, filling with silence.
pub fn time_shift(samples: &[f32], max_shift: usize, rng: &mut impl Rng) -> Vec<f32> {
    let n = samples.len();
    let shift = rng.random_range(-(max_shift.min(n) as i64)..=max_shift.min(n) as i64);
    (0..n as i64)
        .map(|i| usize::try_from(i - shift).ok().and_then(|j| samples.get(j)).copied().unwrap_or(0.0))
        .collect()
}
