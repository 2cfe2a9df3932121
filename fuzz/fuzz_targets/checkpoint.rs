//! A Hugging Face checkpoint's weights: `model.safetensors` beside a fixed config.json (the tiny
//! Mamba-1 of tests/fixtures), loaded as `mamba generate` loads it, in f32 and bf16; when it
//! loads, one forward pass over two tokens. Shapes, dtypes and names that do not match the config
//! must be named, as must a header that lies about its offsets.

#![no_main]

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{bundled, check, copy, scratch, write};
use mamba_nn::MambaLm;

fuzz_target!(|bytes: &[u8]| {
    let dir = scratch().join("checkpoint");
    if !dir.join("config.json").exists() {
        copy(&bundled("tests/fixtures/mamba_tiny/config.json"), &dir.join("config.json"));
    }
    let path = write(&dir, "model.safetensors", bytes);
    for dtype in [DType::F32, DType::BF16] {
        let Some(model) = check(MambaLm::load_hf(&dir, dtype, &Device::Cpu), &dir) else { return };
        let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        check(model.forward(&ids), &path);
    }
});
