//! Audio end to end: a folder of WAV files in mixed formats and rates trains a keyword-style
//! classifier judged on a held-out speaker, `mamba eval` reports it, `mamba predict` labels WAV
//! files with a probability, and bad configs or files stop with the file named.

mod common;

use common::{eval_accuracy, eval_on_data, mamba, scratch, text};
use std::f64::consts::PI;
use std::path::Path;

/// Three "words" as pitch contours of 0.4 to 0.55 s (rising, falling, level), said by
/// "speakers" at different base pitches, each speaker's files in its own format: 16-bit mono at
/// 16 kHz, 24-bit stereo at 44.1 kHz, 8-bit mono at 8 kHz, 32-bit float at 22.05 kHz.
fn word_folder(root: &Path, takes: usize) {
    let speakers: [(&str, f64, u32, u16, u16, hound::SampleFormat); 4] = [
        ("anna", 300.0, 16_000, 1, 16, hound::SampleFormat::Int),
        ("bert", 420.0, 44_100, 2, 24, hound::SampleFormat::Int),
        ("cleo", 520.0, 8_000, 1, 8, hound::SampleFormat::Int),
        ("dirk", 360.0, 22_050, 1, 32, hound::SampleFormat::Float),
    ];
    // Pitch relative to the speaker's base at time t in [0, 1] of the word.
    let contour = |word: &str, t: f64| match word {
        "up" => 1.0 + t,
        "down" => 2.0 - t,
        _ => 1.5,
    };
    for word in ["up", "down", "flat"] {
        let dir = root.join(word);
        std::fs::create_dir_all(&dir).unwrap();
        for (speaker, base, rate, channels, bits, format) in speakers {
            for take in 0..takes {
                let spec = hound::WavSpec { channels, sample_rate: rate, bits_per_sample: bits, sample_format: format };
                let path = dir.join(format!("{speaker}_{take}.wav"));
                let mut w = hound::WavWriter::create(&path, spec).unwrap();
                // Takes differ in onset and speed.
                let (onset, len) = (0.05 * take as f64, 0.4 + 0.05 * take as f64);
                let n = ((onset + len + 0.1) * rate as f64) as usize;
                let mut phase = 0.0;
                for i in 0..n {
                    let t = i as f64 / rate as f64 - onset;
                    let on = (0.0..len).contains(&t);
                    phase += 2.0 * PI * base * contour(word, (t / len).clamp(0.0, 1.0)) / rate as f64;
                    let v = if on { 0.5 * phase.sin() } else { 0.0 };
                    for _ in 0..channels {
                        match (format, bits) {
                            (hound::SampleFormat::Float, _) => w.write_sample(v as f32).unwrap(),
                            (_, 8) => w.write_sample((v * 127.0) as i8).unwrap(),
                            (_, 16) => w.write_sample((v * 32767.0) as i16).unwrap(),
                            _ => w.write_sample((v * 8_388_607.0) as i32).unwrap(),
                        }
                    }
                }
                w.finalize().unwrap();
            }
        }
    }
}

fn config(data: &Path, backbone: &str, split: &str) -> String {
    format!(
        r#"
[task]
kind = "audio_classification"
data = "{data}"
{split}
duration = 0.8

[task.features]
n_mels = 16
n_fft = 512
win_length = 400
hop_length = 160
f_max = 2000.0

[task.augment]
speed = 0.15
time_shift = 0.05
freq_masks = 1
freq_width = 2

[model]
kind = "vim"
patch_size = [16, 2]
patch_stride = [16, 1]
class_token = "middle"

{backbone}

[train]
epochs = 40
batch_size = 8
seed = 3
log_every = 5
checkpoint_every = 100

[optim]
lr = 1e-2
warmup_steps = 5
"#,
        data = data.display()
    )
}

const MAMBA1: &str = "[backbone]\nkind = \"mamba1\"\nd_model = 32\nn_layer = 2\nd_state = 8\n";
const MAMBA2: &str =
    "[backbone]\nkind = \"mamba2\"\nd_model = 32\nn_layer = 2\nd_state = 8\nheaddim = 16\nchunk_size = 8\n";

#[test]
fn a_wav_folder_trains_on_some_speakers_and_labels_another() {
    let dir = scratch("words");
    let data = dir.join("words");
    word_folder(&data, 4);
    for (name, backbone) in [("mamba1", MAMBA1), ("mamba2", MAMBA2)] {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config(&data, backbone, "held_out = [\"dirk\"]")).unwrap();
        let out = dir.join(format!("run-{name}"));
        let o = mamba(&["train", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o));

        let best = out.join("best");
        let o = mamba(&["eval", "--checkpoint", best.to_str().unwrap()]);
        let report = text(&o);
        assert!(o.status.success(), "{report}");
        let accuracy = eval_accuracy(&report);
        // Twelve clips of a speaker never heard, three words: chance is 1/3. Over seeds 0 to
        // 4 (`--set train.seed=N`, on an AVX-512 CPU) the worst run got 11 of 12 right.
        assert!(accuracy >= 0.9, "{name}: accuracy {accuracy}\n{report}");
        // --data: every clip of another folder (two takes per speaker and word: 24 clips, where
        // the held-out speaker has 12).
        let other = dir.join(format!("other-{name}"));
        word_folder(&other, 2);
        let (clips, accuracy) = eval_on_data(&best, &other);
        assert_eq!(clips, 24, "{name}");
        assert!(accuracy >= 0.75, "{name}: accuracy {accuracy}, chance is 1/3");

        // Predict reads the checkpoint's audio.json: no training data needed, any format. It
        // ranks all three words, `flat` first, with probabilities that sum to 1. How sure the
        // model is of one clip is not asserted: it depends on the rounding of the CPU's gemm
        // kernels (this seed's Mamba-2 run gave 0.38 on AVX-512 CPUs, above 0.4 on an AVX2 one)
        // and ranged from 0.38 to 0.92 over seeds 0 to 4 on one CPU.
        let clip = data.join("flat/dirk_1.wav");
        let o = mamba(&["predict", "--checkpoint", best.to_str().unwrap(), "--top", "3", clip.to_str().unwrap()]);
        let line = text(&o);
        assert!(o.status.success(), "{name}: {line}");
        let ranked: Vec<(&str, f64)> = line
            .trim()
            .rsplit_once(": ")
            .unwrap()
            .1
            .split(", ")
            .map(|e| e.split_once(' ').map(|(c, p)| (c, p.parse().unwrap())).unwrap())
            .collect();
        let mut words: Vec<&str> = ranked.iter().map(|r| r.0).collect();
        assert_eq!(words[0], "flat", "{name}: {line}");
        words.sort();
        assert_eq!(words, ["down", "flat", "up"], "{name}: {line}");
        assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: {line}");
        assert!((ranked.iter().map(|r| r.1).sum::<f64>() - 1.0).abs() < 1e-3, "{name}: {line}");
    }
}

#[test]
fn bad_audio_configs_and_files_are_named() {
    let dir = scratch("bad");
    let data = dir.join("words");
    word_folder(&data, 1);
    let check = |cfg_text: String, expect: &[&str]| {
        let cfg = dir.join("bad.toml");
        std::fs::write(&cfg, cfg_text).unwrap();
        let o = mamba(&["train", cfg.to_str().unwrap(), "--out", dir.join("run").to_str().unwrap()]);
        let msg = text(&o);
        assert!(!o.status.success(), "should fail: {msg}");
        for e in expect {
            assert!(msg.contains(e), "{e:?} not in: {msg}");
        }
        assert!(!msg.contains("panicked"), "{msg}");
    };
    let good = config(&data, MAMBA1, "held_out = [\"dirk\"]");
    check(good.replace("n_mels = 16", "n_mels = 16\nn_mesl = 3"), &["bad.toml", "n_mesl"]);
    check(good.replace("win_length = 400", "win_length = 600"), &["bad.toml", "win_length"]);
    check(good.replace("held_out = [\"dirk\"]", "held_out = [\"dirk\"]\nvalidation_fraction = 0.2"), &["held_out"]);
    check(good.replace("held_out = [\"dirk\"]", "held_out = [\"nobody\"]"), &["validation split need"]);
    check(good.replace("patch_size = [16, 2]", "patch_size = [17, 2]"), &["patch_size", "16x"]);
    check(good.replace("duration = 0.8", "duration = 0"), &["duration"]);
    // A file that is not a WAV stops the run before training, named.
    std::fs::write(data.join("up/broken.wav"), b"RIFF....not really").unwrap();
    check(good, &["broken.wav"]);
}
