//! An image of an ImageFolder (PNG or JPEG, by its first bytes), decoded and transformed as
//! training and `mamba predict` transform it: to 1 and 3 channels, resized, cropped (centre and
//! random) and flipped.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{check, scratch, write};
use mamba_vision::{decode, Transform};
use rand::SeedableRng;

fuzz_target!(|bytes: &[u8]| {
    let name = if bytes.starts_with(&[0xFF, 0xD8]) { "image.jpg" } else { "image.png" };
    let path = write(scratch(), name, bytes);
    let Some(image) = check(decode(&path), &path) else { return };
    for channels in [1, 3] {
        let transform = Transform {
            channels,
            resize: 12,
            crop: 10,
            hflip: 0.5,
            mean: vec![0.5; channels],
            std: vec![0.25; channels],
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        check(transform.apply(image.clone(), None::<&mut rand::rngs::StdRng>), &path);
        check(transform.apply(image.clone(), Some(&mut rng)), &path);
    }
});
