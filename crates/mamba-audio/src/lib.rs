//! The audio front end: WAV files of every common format read and mixed down to mono
//! (`wav`), resampled with a band-limited sinc resampler, and the features speech models take
//! (`features`): STFT power spectra, mel filterbanks (HTK and Slaney), log-mel spectrograms and
//! MFCC, with librosa's conventions (checked against librosa's own output in the tests);
//! `AudioFolder` data sets (`root/LABEL/*.wav`) with list or speaker splits, SpecAugment and
//! time shifts (`data`); `Frontend`, which turns a file into a classifier's normalised,
//! optionally augmented log-mel input; and the audio classification task (`task`), a Vim or
//! VMamba of `mamba-grid` over those spectrograms.

mod data;
mod features;
mod frontend;
mod task;
mod wav;

pub use data::{spec_augment, time_shift, AudioFolder, Clips};

pub use features::{log_mel, mel_filterbank, mfcc, power_spectrogram, power_to_db, MelConfig, MelScale, Padding};
pub use frontend::{Augment, Frontend};
pub use task::{load_audio_classifier, AudioClassification, AudioData, AudioMeta, AudioTask};
pub use wav::{fit_length, load, read_wav, resample, Audio, AudioError, Result};
