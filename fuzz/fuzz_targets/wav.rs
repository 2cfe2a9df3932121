//! A WAV file of an AudioFolder: read (every sample format, any channels), resampled to 16 kHz as
//! the speech configs ask, and turned into the log-mel a classifier takes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_audio::{Augment, Frontend, MelConfig};
use mamba_fuzz::{check, scratch, write};

fuzz_target!(|bytes: &[u8]| {
    let path = write(scratch(), "clip.wav", bytes);
    let frontend = Frontend::new(MelConfig { sample_rate: 16000, ..MelConfig::default() }, 0.25, Augment::default());
    let Some(samples) = check(frontend.load(&path, None::<&mut rand::rngs::StdRng>), &path) else { return };
    check(frontend.spectrogram(&samples, None::<&mut rand::rngs::StdRng>), &path);
});
