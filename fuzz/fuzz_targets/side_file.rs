//! A checkpoint's side file, read as `mamba predict` and `mamba eval` read it, then used on a real
//! input: image.json on a bundled PNG, audio.json on a bundled WAV, series.json on a case,
//! forecast.json through its scaler. The first byte picks the file; the rest is its JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{bundled, check, scratch, write};
use mamba_audio::AudioMeta;
use mamba_grid::classify::{read_meta, InputMeta};
use mamba_series::{ForecastMeta, SeriesMeta};
use mamba_train::read_checked;
use mamba_vision::ImageMeta;

fuzz_target!(|bytes: &[u8]| {
    let Some((&pick, json)) = bytes.split_first() else { return };
    let dir = scratch().join("side");
    std::fs::create_dir_all(&dir).unwrap();
    let none = None::<&mut rand::rngs::StdRng>;
    match pick % 4 {
        0 => {
            let path = write(&dir, ImageMeta::FILE, json);
            if let Some(meta) = check(read_meta::<ImageMeta>(&dir), &path) {
                let _ = meta.input(&bundled("examples/data/mnist-5k/test/3/1501.png"), none);
            }
        }
        1 => {
            let path = write(&dir, AudioMeta::FILE, json);
            if let Some(meta) = check(read_meta::<AudioMeta>(&dir), &path) {
                let _ = meta.input(&bundled("examples/data/speech-words/no/espeak_en-us_s140_p50.wav"), none);
            }
        }
        2 => {
            let path = write(&dir, "series.json", json);
            if let Some(meta) = check(SeriesMeta::read(&dir), &path) {
                let case = vec![vec![0.5f32; 24]; meta.dims.min(4)];
                let _ = meta.input(&case);
            }
        }
        _ => {
            let path = write(&dir, "forecast.json", json);
            if let Some(meta) = check(read_checked::<ForecastMeta>(&path), &path) {
                let _ = meta.scaler.transform(&[vec![1.0; 8]]);
            }
        }
    }
});
