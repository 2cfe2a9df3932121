//! The features against librosa's output for the same WAV file (tests/fixtures/audio, made by
//! make_features.py there), and WAV reading over every format.

use candle_core::{safetensors, Device, Tensor};
use mamba_audio::{fit_length, log_mel, mfcc, read_wav, resample, MelConfig, MelScale, Padding};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio")
}

fn reference(name: &str) -> Tensor {
    let mut t = safetensors::load(fixtures().join("features_librosa.safetensors"), &Device::Cpu).unwrap();
    t.remove(name).unwrap()
}

fn max_abs_diff(ours: &[Vec<f32>], theirs: &Tensor) -> f32 {
    let theirs = theirs.to_vec2::<f32>().unwrap();
    assert_eq!((ours.len(), ours[0].len()), (theirs.len(), theirs[0].len()), "shape");
    ours.iter().flatten().zip(theirs.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn base() -> MelConfig {
    MelConfig {
        sample_rate: 16000,
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

#[test]
fn wav_samples_are_librosas() {
    let audio = read_wav(&fixtures().join("go-en-gb.wav")).unwrap();
    assert_eq!(audio.sample_rate, 16000);
    let theirs = reference("samples").to_vec1::<f32>().unwrap();
    assert_eq!(audio.samples, theirs);
}

#[test]
fn log_mel_matches_librosa_to_1e_3_db() {
    let x = read_wav(&fixtures().join("go-en-gb.wav")).unwrap().samples;
    let ours = log_mel(&x, &base());
    let d = max_abs_diff(&ours, &reference("slaney_log_mel"));
    assert!(d < 1e-3, "Slaney: {d} dB");

    let htk = MelConfig {
        n_mels: 40,
        f_min: 20.0,
        f_max: Some(7600.0),
        scale: MelScale::Htk,
        slaney_norm: false,
        center: Some(Padding::Reflect),
        top_db: None,
        ..base()
    };
    let d = max_abs_diff(&log_mel(&x, &htk), &reference("htk_log_mel"));
    assert!(d < 1e-3, "HTK: {d} dB");

    let d = max_abs_diff(&mfcc(&ours, 13), &reference("mfcc"));
    assert!(d < 1e-3, "MFCC: {d}");
}

fn write_wav(path: &Path, spec: hound::WavSpec, frames: &[[f64; 2]]) {
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for frame in frames {
        for &v in &frame[..spec.channels as usize] {
            match spec.sample_format {
                hound::SampleFormat::Float => w.write_sample(v as f32).unwrap(),
                hound::SampleFormat::Int => {
                    let full = (1i64 << (spec.bits_per_sample - 1)) as f64;
                    let q = (v * full).round().clamp(-full, full - 1.0) as i32;
                    match spec.bits_per_sample {
                        8 => w.write_sample(q as i8).unwrap(),
                        16 => w.write_sample(q as i16).unwrap(),
                        _ => w.write_sample(q).unwrap(),
                    }
                }
            }
        }
    }
    w.finalize().unwrap();
}

#[test]
fn every_wav_format_loads_and_bad_files_name_their_path() {
    let dir = std::env::temp_dir().join(format!("mamba-audio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A stereo signal whose channels average to 0.5 sin: left 0.75 sin, right 0.25 sin.
    let frames: Vec<[f64; 2]> = (0..800).map(|i| (i as f64 * 0.05).sin()).map(|s| [0.75 * s, 0.25 * s]).collect();
    let formats = [
        (hound::SampleFormat::Int, 8, 2e-2),
        (hound::SampleFormat::Int, 16, 1e-4),
        (hound::SampleFormat::Int, 24, 1e-6),
        (hound::SampleFormat::Int, 32, 1e-6),
        (hound::SampleFormat::Float, 32, 1e-7),
    ];
    for (format, bits, tol) in formats {
        for channels in [1u16, 2] {
            let spec = hound::WavSpec { channels, sample_rate: 22050, bits_per_sample: bits, sample_format: format };
            let path = dir.join(format!("{format:?}{bits}-{channels}.wav"));
            write_wav(&path, spec, &frames);
            let audio = read_wav(&path).unwrap();
            assert_eq!((audio.sample_rate, audio.samples.len()), (22050, 800));
            let expect = |f: &[f64; 2]| if channels == 2 { (f[0] + f[1]) / 2.0 } else { f[0] };
            let err = audio.samples.iter().zip(&frames).map(|(a, f)| (*a as f64 - expect(f)).abs()).fold(0.0, f64::max);
            assert!(err < tol, "{format:?} {bits} bits, {channels} channels: {err}");
        }
    }
    // Truncated: the header promises more data than the file holds.
    let good = std::fs::read(dir.join("Int16-2.wav")).unwrap();
    let cut = dir.join("cut.wav");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let msg = read_wav(&cut).unwrap_err().to_string();
    assert!(msg.contains("cut.wav") && msg.contains("truncated"), "{msg}");
    let text = dir.join("notes.wav");
    std::fs::write(&text, "not a wav file at all").unwrap();
    let msg = read_wav(&text).unwrap_err().to_string();
    assert!(msg.contains("notes.wav") && msg.contains("not a readable WAV"), "{msg}");
    assert!(read_wav(&dir.join("missing.wav")).unwrap_err().to_string().contains("missing.wav"));
    // A header whose sample rate (bytes 24..28 of the canonical header) is 0: every later
    // length in samples or seconds would divide by it.
    let mut zero_rate = good.clone();
    zero_rate[24..32].fill(0); // and the byte rate, which hound checks against it
    let path = dir.join("zero-rate.wav");
    std::fs::write(&path, &zero_rate).unwrap();
    let msg = match read_wav(&path) {
        Ok(a) => panic!("read with sample rate {}", a.sample_rate),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("zero-rate.wav") && msg.contains("sample rate"), "{msg}");
    // A float WAV holding a NaN or an infinity: named by frame and channel, never features.
    for (bad, shown) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
        let mut frames = frames.clone();
        frames[10][1] = bad;
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 8000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let path = dir.join("nan.wav");
        write_wav(&path, spec, &frames);
        let msg = read_wav(&path).unwrap_err().to_string();
        assert!(msg.contains("nan.wav") && msg.contains(&format!("sample 10 of channel 2 is {shown}")), "{msg}");
    }
}

#[test]
fn resampling_keeps_the_tone_and_removes_what_the_new_rate_cannot_hold() {
    let tone = |f: f64, rate: f64, n: usize| -> Vec<f32> {
        (0..n).map(|i| (2.0 * std::f64::consts::PI * f * i as f64 / rate).sin() as f32).collect()
    };
    // 440 Hz at 44.1 kHz -> 16 kHz: the same tone, in phase, length scaled.
    let x = tone(440.0, 44100.0, 44100);
    let y = resample(&x, 44100, 16000).unwrap();
    assert_eq!(y.len(), 16000);
    let expect = tone(440.0, 16000.0, 16000);
    let err = y[500..15500].iter().zip(&expect[500..15500]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(err < 1e-2, "{err}");
    // 12 kHz at 44.1 kHz is above 16 kHz's Nyquist (8 kHz): filtered out, not aliased to 4 kHz.
    let y = resample(&tone(12000.0, 44100.0, 44100), 44100, 16000).unwrap();
    let rms = (y[500..15500].iter().map(|v| v * v).sum::<f32>() / 15000.0).sqrt();
    assert!(rms < 1e-2, "{rms}");
    // Same rate: unchanged.
    assert_eq!(resample(&x[..10], 8000, 8000).unwrap(), x[..10].to_vec());
}

#[test]
fn clips_are_padded_or_cropped_to_a_fixed_length() {
    let x: Vec<f32> = (0..10).map(|i| i as f32).collect();
    assert_eq!(fit_length(&x, 4), (vec![3.0, 4.0, 5.0, 6.0], 4));
    let (padded, valid) = fit_length(&x, 12);
    assert_eq!((padded.len(), valid, padded[11]), (12, 10, 0.0));
}
