//! AudioFolder on the bundled speech-words set, speaker and list splits, bad files, SpecAugment
//! and time shifts.

use mamba_audio::{spec_augment, time_shift, AudioFolder};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;

fn words() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/speech-words")
}

#[test]
fn the_speech_words_folder_splits_by_voice_and_by_list() {
    let folder = AudioFolder::open(&words()).unwrap();
    assert_eq!(folder.classes.len(), 20);
    assert_eq!(folder.items.len(), 240);
    assert_eq!(&folder.classes[..3], &["down", "eight", "five"]);
    // Hold out the en-029 voices: 4 of 12 per word.
    let (train, test) = folder.split_where(|p| p.to_string_lossy().contains("en-029"));
    assert_eq!((train.len(), test.len()), (160, 80));
    assert!(test.iter().all(|(p, _)| p.to_string_lossy().contains("en-029")));

    let dir = std::env::temp_dir().join(format!("mamba-audio-list-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = dir.join("testing_list.txt");
    std::fs::write(&list, "go/espeak_en-gb_s140_p50.wav\nyes/espeak_en-us_s180_p50.wav\n\n").unwrap();
    let (kept, held) = folder.split_by_list(&list).unwrap();
    assert_eq!((kept.len(), held.len()), (238, 2));
    let go = folder.classes.iter().position(|c| c == "go").unwrap();
    assert!(held.iter().any(|(p, c)| *c == go && p.ends_with("go/espeak_en-gb_s140_p50.wav")));
}

#[test]
fn a_file_that_is_not_a_wav_is_named() {
    let dir = std::env::temp_dir().join(format!("mamba-audio-bad-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("yes")).unwrap();
    std::fs::write(dir.join("yes/clip.wav"), b"RIFF....not audio").unwrap();
    let msg = AudioFolder::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("clip.wav") && msg.contains("not a readable WAV"), "{msg}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(AudioFolder::open(&empty).unwrap_err().to_string().contains("no root/LABEL/*.wav"));
}

#[test]
fn spec_augment_masks_bands_and_spans_with_the_mean() {
    let base: Vec<Vec<f32>> = (0..16).map(|b| (0..40).map(|t| (b * 40 + t) as f32).collect()).collect();
    let mean = base.iter().flatten().sum::<f32>() / 640.0;
    let mut spec = base.clone();
    spec_augment(&mut spec, (2, 4), (2, 8), &mut StdRng::seed_from_u64(3));
    let masked_rows = spec.iter().filter(|r| r.iter().all(|&v| v == mean)).count();
    let masked_cols = (0..40).filter(|&t| spec.iter().all(|r| r[t] == mean)).count();
    assert!(masked_rows <= 8 && masked_cols <= 16);
    // Everything not masked is untouched, and the same seed masks the same places.
    for (r, (a, b)) in spec.iter().zip(&base).enumerate() {
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(x == y || *x == mean, "({r}, {t})");
        }
    }
    let mut again = base.clone();
    spec_augment(&mut again, (2, 4), (2, 8), &mut StdRng::seed_from_u64(3));
    assert_eq!(again, spec);
    assert_ne!(spec, base, "seed 3 masks something");
}

#[test]
fn time_shift_moves_the_clip_and_fills_with_silence() {
    let x: Vec<f32> = (1..=10).map(|i| i as f32).collect();
    for seed in 0..20 {
        let y = time_shift(&x, 3, &mut StdRng::seed_from_u64(seed));
        assert_eq!(y.len(), 10);
        // The shift: leading zeros (a shift right), or where y's first sample sits in x (left).
        let s = match y[0] {
            0.0 => y.iter().take_while(|&&v| v == 0.0).count() as i64,
            first => -(x.iter().position(|&v| v == first).unwrap() as i64),
        };
        assert!(s.abs() <= 3);
        for (i, &v) in y.iter().enumerate() {
            let j = i as i64 - s;
            let expect = if (0..10).contains(&j) { x[j as usize] } else { 0.0 };
            assert_eq!(v, expect, "seed {seed}, shift {s}");
        }
    }
}
