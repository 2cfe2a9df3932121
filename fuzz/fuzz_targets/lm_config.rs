//! A language model's config: a Hugging Face / state-spaces `config.json` (input starting with
//! `{`) or our TOML (`models/*.toml`), then the model's parameter list, whose shapes a load or an
//! initialisation would allocate.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{check, scratch, write};
use mamba_nn::{LmConfig, MambaLm};

fuzz_target!(|bytes: &[u8]| {
    let json = bytes.first() == Some(&b'{');
    let path = write(scratch(), if json { "config.json" } else { "model.toml" }, bytes);
    let config = if json { LmConfig::from_hf_file(&path) } else { LmConfig::from_toml_file(&path) };
    if let Some(config) = check(config, &path) {
        let _ = mamba_nn::num_params(&MambaLm::params(&config));
    }
});
