//! Spectral features with librosa's conventions (librosa 0.10/0.11):
//! - frames: centred (padded by n_fft / 2 on both sides, zeros as `pad_mode="constant"`, or a
//!   reflection), hop `hop_length`, a periodic Hann window of `win_length` centred in `n_fft`;
//! - power spectrum |STFT|^2 (librosa `power=2.0`);
//! - mel filterbank as `librosa.filters.mel` (Slaney scale and area normalisation by default,
//!   HTK scale on request);
//! - dB as `librosa.power_to_db(ref=1.0, amin=1e-10, top_db=80)`;
//! - MFCC as `librosa.feature.mfcc`: DCT-II with orthonormal scaling of the dB mel spectrogram.

use realfft::RealFftPlanner;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MelScale {
    /// 2595 log10(1 + f / 700).
    Htk,
    /// Linear below 1 kHz, logarithmic above (librosa's default, Slaney's Auditory Toolbox).
    Slaney,
}

/// How a centred STFT pads the signal's ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    Zeros,
    Reflect,
}

/// Log-mel parameters. In config files every key is optional: the defaults are librosa's except
/// the frame sizes, which are speech's usual 25 ms windows every 10 ms at 16 kHz (n_fft 512,
/// win_length 400, hop_length 160), and 64 mel bands. `center = "none"` frames without padding;
/// `top_db = inf` keeps the whole dB range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MelConfig {
    pub sample_rate: u32,
    pub n_fft: usize,
    pub win_length: usize,
    pub hop_length: usize,
    pub n_mels: usize,
    pub f_min: f64,
    /// None: sample_rate / 2.
    pub f_max: Option<f64>,
    pub scale: MelScale,
    /// Divide each triangle by its width in Hz (Slaney's "area" normalisation).
    pub slaney_norm: bool,
    #[serde(with = "centre")]
    pub center: Option<Padding>,
    /// `power_to_db`'s floor below the peak, dB; None keeps everything.
    pub top_db: Option<f64>,
}

impl Default for MelConfig {
    fn default() -> Self {
        Self {
            sample_rate: 16_000,
            n_fft: 512,
            win_length: 400,
            hop_length: 160,
            n_mels: 64,
            f_min: 0.0,
            f_max: None,
            scale: MelScale::Slaney,
            slaney_norm: true,
            center: Some(Padding::Zeros),
            top_db: Some(80.0),
        }
    }
}

impl MelConfig {
    /// Why these parameters cannot make a spectrogram, if they cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        let nyquist = self.sample_rate as f64 / 2.0;
        let f_max = self.f_max.unwrap_or(nyquist);
        if self.sample_rate == 0 || self.n_fft < 2 || self.hop_length == 0 || self.n_mels == 0 {
            return Err("sample_rate, n_fft (>= 2), hop_length and n_mels must be positive".into());
        }
        if self.win_length == 0 || self.win_length > self.n_fft {
            return Err(format!("win_length {} must be between 1 and n_fft {}", self.win_length, self.n_fft));
        }
        if !(0.0 <= self.f_min && self.f_min < f_max && f_max <= nyquist) {
            return Err(format!("need 0 <= f_min ({}) < f_max ({f_max}) <= sample_rate / 2", self.f_min));
        }
        Ok(())
    }

    /// Frames of a clip of `samples` samples.
    pub fn frames(&self, samples: usize) -> usize {
        match self.center {
            Some(_) => 1 + samples / self.hop_length,
            None if samples >= self.n_fft => 1 + (samples - self.n_fft) / self.hop_length,
            None => 0,
        }
    }
}

/// `center` in config files: "zeros", "reflect" or "none".
mod centre {
    use super::Padding;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<Padding>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(p) => p.serialize(s),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Padding>, D::Error> {
        match String::deserialize(d)?.as_str() {
            "zeros" => Ok(Some(Padding::Zeros)),
            "reflect" => Ok(Some(Padding::Reflect)),
            "none" => Ok(None),
            other => Err(serde::de::Error::custom(format!("center = {other:?}: \"zeros\", \"reflect\" or \"none\""))),
        }
    }
}

fn hz_to_mel(f: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 2595.0 * (1.0 + f / 700.0).log10(),
        MelScale::Slaney => {
            let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
            let logstep = 6.4f64.ln() / 27.0;
            if f >= min_log_hz {
                min_log_hz / f_sp + (f / min_log_hz).ln() / logstep
            } else {
                f / f_sp
            }
        }
    }
}

fn mel_to_hz(m: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 700.0 * (10f64.powf(m / 2595.0) - 1.0),
        MelScale::Slaney => {
            let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
            let (min_log_mel, logstep) = (min_log_hz / f_sp, 6.4f64.ln() / 27.0);
            if m >= min_log_mel {
                min_log_hz * (logstep * (m - min_log_mel)).exp()
            } else {
                f_sp * m
            }
        }
    }
}

/// The mel filterbank: `n_mels` rows over the n_fft / 2 + 1 frequency bins.
pub fn mel_filterbank(c: &MelConfig) -> Vec<Vec<f32>> {
    let n_freqs = c.n_fft / 2 + 1;
    let f_max = c.f_max.unwrap_or(c.sample_rate as f64 / 2.0);
    let (lo, hi) = (hz_to_mel(c.f_min, c.scale), hz_to_mel(f_max, c.scale));
    let hz: Vec<f64> =
        (0..c.n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (c.n_mels + 1) as f64, c.scale)).collect();
    let fft_hz: Vec<f64> = (0..n_freqs).map(|k| k as f64 * c.sample_rate as f64 / c.n_fft as f64).collect();
    (0..c.n_mels)
        .map(|m| {
            let (left, centre, right) = (hz[m], hz[m + 1], hz[m + 2]);
            let norm = if c.slaney_norm { 2.0 / (right - left) } else { 1.0 };
            fft_hz
                .iter()
                .map(|&f| {
                    let up = (f - left) / (centre - left);
                    let down = (right - f) / (right - centre);
                    (up.min(down).max(0.0) * norm) as f32
                })
                .collect()
        })
        .collect()
}

/// |STFT|^2: frames x (n_fft / 2 + 1).
pub fn power_spectrogram(x: &[f32], c: &MelConfig) -> Vec<Vec<f32>> {
    let (n_fft, hop) = (c.n_fft, c.hop_length.max(1));
    let pad = n_fft / 2;
    let signal: Vec<f64> = match c.center {
        None => x.iter().map(|&v| v as f64).collect(),
        Some(mode) => {
            let at = |i: isize| -> f64 {
                let n = x.len() as isize;
                if (0..n).contains(&i) {
                    return x[i as usize] as f64;
                }
                match mode {
                    Padding::Zeros => 0.0,
                    // Reflection without repeating the edge sample (numpy's "reflect").
                    Padding::Reflect if n > 1 => {
                        let period = 2 * (n - 1);
                        let j = i.rem_euclid(period);
                        x[(if j < n { j } else { period - j }) as usize] as f64
                    }
                    Padding::Reflect => x.first().copied().unwrap_or(0.0) as f64,
                }
            };
            (-(pad as isize)..(x.len() + pad) as isize).map(at).collect()
        }
    };
    if signal.len() < n_fft {
        return vec![];
    }
    // A periodic Hann window of win_length, centred in n_fft.
    let w = c.win_length.min(n_fft);
    let offset = (n_fft - w) / 2;
    let mut window = vec![0f64; n_fft];
    for i in 0..w {
        window[offset + i] = 0.5 - 0.5 * (2.0 * PI * i as f64 / w as f64).cos();
    }
    let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n_fft);
    let (mut input, mut spectrum) = (fft.make_input_vec(), fft.make_output_vec());
    let frames = 1 + (signal.len() - n_fft) / hop;
    (0..frames)
        .map(|t| {
            for (i, v) in input.iter_mut().enumerate() {
                *v = signal[t * hop + i] * window[i];
            }
            fft.process(&mut input, &mut spectrum).expect("buffers made by the plan");
            spectrum.iter().map(|z| z.norm_sqr() as f32).collect()
        })
        .collect()
}

/// 10 log10(max(S, 1e-10)), floored at (peak - top_db).
pub fn power_to_db(s: &mut [Vec<f32>], top_db: Option<f64>) {
    let mut peak = f32::NEG_INFINITY;
    for v in s.iter_mut().flatten() {
        *v = 10.0 * v.max(1e-10).log10();
        peak = peak.max(*v);
    }
    if let Some(top) = top_db {
        let floor = peak - top as f32;
        s.iter_mut().flatten().for_each(|v| *v = v.max(floor));
    }
}

/// The log-mel spectrogram in dB: n_mels x frames.
pub fn log_mel(x: &[f32], c: &MelConfig) -> Vec<Vec<f32>> {
    let power = power_spectrogram(x, c);
    let bank = mel_filterbank(c);
    let mut mel: Vec<Vec<f32>> = bank
        .iter()
        .map(|filter| power.iter().map(|frame| frame.iter().zip(filter).map(|(p, w)| p * w).sum()).collect())
        .collect();
    power_to_db(&mut mel, c.top_db);
    mel
}

/// MFCC: the first `n_mfcc` coefficients of the orthonormal DCT-II over the mel axis of a dB
/// mel spectrogram (n_mels x frames) -> n_mfcc x frames.
pub fn mfcc(log_mel_db: &[Vec<f32>], n_mfcc: usize) -> Vec<Vec<f32>> {
    let m = log_mel_db.len();
    let frames = log_mel_db.first().map_or(0, |r| r.len());
    (0..n_mfcc.min(m))
        .map(|k| {
            let scale = if k == 0 { (1.0 / m as f64).sqrt() } else { (2.0 / m as f64).sqrt() };
            (0..frames)
                .map(|t| {
                    let sum: f64 = (0..m)
                        .map(|n| log_mel_db[n][t] as f64 * (PI * k as f64 * (2 * n + 1) as f64 / (2 * m) as f64).cos())
                        .sum();
                    (sum * scale) as f32
                })
                .collect()
        })
        .collect()
}
