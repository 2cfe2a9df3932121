//! The front end from file to normalised log-mel: its config, its shape, its normalisation, and
//! augmentation only when asked for.

use mamba_audio::{log_mel, Augment, Frontend, MelConfig, MelScale, Padding};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;

fn clip() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio/go-en-gb.wav")
}

#[test]
fn mel_configs_read_from_toml_with_speech_defaults() {
    let c: MelConfig = toml::from_str("n_mels = 40\nscale = \"htk\"\ncenter = \"reflect\"").unwrap();
    assert_eq!((c.n_mels, c.scale, c.center), (40, MelScale::Htk, Some(Padding::Reflect)));
    assert_eq!((c.sample_rate, c.n_fft, c.win_length, c.hop_length), (16_000, 512, 400, 160));
    let c: MelConfig = toml::from_str("center = \"none\"\ntop_db = inf").unwrap();
    assert_eq!(c.center, None);
    assert_eq!(c.frames(16_000), 1 + (16_000 - 512) / 160);
    assert_eq!(MelConfig::default().frames(16_000), 101);
    for bad in ["n_mel = 40", "center = \"edge\"", "scale = \"bark\""] {
        assert!(toml::from_str::<MelConfig>(bad).is_err(), "{bad}");
    }
    // Round trip through JSON (a checkpoint's audio.json).
    let json = serde_json::to_string(&c).unwrap();
    let back: MelConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.center, None);

    let check = |text: &str| toml::from_str::<MelConfig>(text).unwrap().check();
    assert!(check("").is_ok());
    assert!(check("win_length = 600").unwrap_err().contains("win_length"));
    assert!(check("f_max = 9000.0").unwrap_err().contains("f_max"));
    assert!(check("hop_length = 0").is_err());
}

#[test]
fn the_frontend_normalises_and_augments_only_with_an_rng() {
    let features = MelConfig { n_mels: 32, ..MelConfig::default() };
    let mut f = Frontend::new(features.clone(), 0.8, Augment::default());
    assert_eq!(f.samples, 12_800);
    assert_eq!(f.shape(), (32, 81));
    // Unnormalised, the front end is the log-mel of the clip padded or cropped to 0.8 s.
    let samples = mamba_audio::load(&clip(), 16_000).unwrap();
    let (fitted, _) = mamba_audio::fit_length(&samples, 12_800);
    let direct: Vec<f32> = log_mel(&fitted, &features).into_iter().flatten().collect();
    assert_eq!(f.load(&clip(), None::<&mut StdRng>).unwrap(), direct);

    // Measured on the clip itself, the normalised spectrogram has mean 0 and std 1.
    f.measure([clip().as_path()]).unwrap();
    let x = f.load(&clip(), None::<&mut StdRng>).unwrap();
    let mean = x.iter().sum::<f32>() / x.len() as f32;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32;
    assert!(mean.abs() < 1e-4 && (var.sqrt() - 1.0).abs() < 1e-3, "{mean} {var}");

    // No augmentation configured: an rng changes nothing. Configured: it does, by seed.
    assert_eq!(f.load(&clip(), Some(&mut StdRng::seed_from_u64(1))).unwrap(), x);
    f.augment = Augment { speed: 0.1, time_shift: 0.1, freq_masks: 2, freq_width: 4, time_masks: 2, time_width: 8 };
    let a = f.load(&clip(), Some(&mut StdRng::seed_from_u64(1))).unwrap();
    let b = f.load(&clip(), Some(&mut StdRng::seed_from_u64(1))).unwrap();
    let c = f.load(&clip(), Some(&mut StdRng::seed_from_u64(2))).unwrap();
    assert_eq!(a.len(), x.len());
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, x);
    assert_eq!(f.load(&clip(), None::<&mut StdRng>).unwrap(), x, "evaluation is never augmented");

    // Bin means removed: every mel bin averages to zero over the clip, and a constant dB offset
    // per bin (a fixed colouring) is gone.
    let g = Frontend { bin_mean: true, augment: Augment::default(), mean: 0.0, std: 1.0, ..f };
    let y = g.load(&clip(), None::<&mut StdRng>).unwrap();
    for row in y.chunks(81) {
        assert!((row.iter().sum::<f32>() / 81.0).abs() < 1e-3);
    }
    let centred: Vec<f32> = direct
        .chunks(81)
        .flat_map(|row| {
            let m = row.iter().sum::<f32>() / 81.0;
            row.iter().map(move |v| v - m)
        })
        .collect();
    assert!(y.iter().zip(&centred).all(|(a, b)| (a - b).abs() < 1e-4));
}
