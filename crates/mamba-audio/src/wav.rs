//! WAV files: 8, 16, 24 and 32-bit integer and 32-bit float PCM, any number of channels (averaged
//! to mono), any sample rate (resampled to the model's).

use hound::{SampleFormat, WavReader};
use rubato::{FftFixedIn, Resampler};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("resampling {from} Hz to {to} Hz: {message}")]
    Resample { from: u32, to: u32, message: String },
}

pub type Result<T> = std::result::Result<T, AudioError>;

/// Mono samples in [-1, 1] and their rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

/// Reads a WAV file and averages its channels. Integer samples are scaled by 2^(bits - 1), so
/// full scale is 1.0 whatever the bit depth (librosa and torchaudio do the same).
pub fn read_wav(path: &Path) -> Result<Audio> {
    let bad = |message: String| AudioError::File { path: path.display().to_string(), message };
    let mut reader = WavReader::open(path).map_err(|e| bad(format!("not a readable WAV file: {e}")))?;
    let spec = reader.spec();
    if spec.channels == 0 {
        return Err(bad("the file has no channels".into()));
    }
    // hound accepts a zero rate when the byte rate is zero too; every duration divides by it.
    if spec.sample_rate == 0 {
        return Err(bad("the header gives a sample rate of 0".into()));
    }
    // The sample iterators reserve what the header claims: a claim past the file's size is a
    // corrupt header, not a reason to allocate gigabytes.
    let claimed = reader.len() as u64 * spec.bits_per_sample.div_ceil(8) as u64;
    let size = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
    if claimed > size {
        return Err(bad(format!(
            "truncated or corrupt: the header claims {claimed} bytes of samples, the file has {size}"
        )));
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (SampleFormat::Float, 32) => reader.samples::<f32>().collect::<std::result::Result<_, _>>(),
        (SampleFormat::Int, bits @ 1..=32) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect::<std::result::Result<_, _>>()
        }
        (format, bits) => return Err(bad(format!("unsupported sample format {format:?} with {bits} bits"))),
    }
    .map_err(|e| bad(format!("truncated or corrupt sample data: {e}")))?;
    let c = spec.channels as usize;
    if let Some(i) = interleaved.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("sample {} of channel {} is {}", i / c, i % c + 1, interleaved[i])));
    }
    let samples = interleaved.chunks_exact(c).map(|frame| frame.iter().sum::<f32>() / c as f32).collect();
    Ok(Audio { samples, sample_rate: spec.sample_rate })
}

/// Band-limited resampling for a fixed ratio (rubato's FFT resampler: the spectrum is cut at the
/// lower Nyquist frequency, so nothing aliases). The output has round(len * to / from) samples,
/// aligned with the input (the resampler's delay removed).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |message: String| AudioError::Resample { from, to, message };
    let chunk = 1024;
    let mut resampler =
        FftFixedIn::<f32>::new(from as usize, to as usize, chunk, 2, 1).map_err(|e| err(e.to_string()))?;
    let delay = resampler.output_delay();
    let expected = (samples.len() as f64 * to as f64 / from as f64).round() as usize;
    let mut out = Vec::with_capacity(expected + delay + chunk);
    // Whole chunks, then zeros until the delayed output is complete.
    let mut pos = 0;
    while out.len() < expected + delay {
        let need = resampler.input_frames_next();
        let end = (pos + need).min(samples.len());
        let mut block = samples.get(pos..end).unwrap_or(&[]).to_vec();
        block.resize(need, 0.0);
        let y = resampler.process(&[block], None).map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&y[0]);
        pos += need;
    }
    Ok(out[delay..delay + expected].to_vec())
}

/// A WAV file as mono samples at `sample_rate`.
pub fn load(path: &Path, sample_rate: u32) -> Result<Vec<f32>> {
    let audio = read_wav(path)?;
    resample(&audio.samples, audio.sample_rate, sample_rate)
}

/// Pads with zeros or crops (the centre) to `len` samples; also returns how many samples are
/// real audio, for masks over variable-length clips.
pub fn fit_length(samples: &[f32], len: usize) -> (Vec<f32>, usize) {
    if samples.len() >= len {
        let start = (samples.len() - len) / 2;
        (samples[start..start + len].to_vec(), len)
    } else {
        let mut out = samples.to_vec();
        out.resize(len, 0.0);
        (out, samples.len())
    }
}
