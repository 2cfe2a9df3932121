//! A training config (TOML) and its `--set` overrides, through everything `mamba train` does before
//! the first step: parsing, overrides, data paths, reading the data, the model's parameter list.
//! The input is the config's text; its lines that start with `--set ` are taken out as overrides.
//! The data the configs may name lies beside the config file (see `data_dir`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{bundled, check, copy, scratch, write};
use mamba_cli::TASKS;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Small real data of every task kind, in the scratch folder: `data/text.txt` and
/// `data/tokenizer.json`, the ImageFolders `data/images/{train,val}`, the AudioFolder
/// `data/speech`, `data/train.ts`, `data/test.ts` and `data/series.csv`.
fn data_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let data = scratch().join("data");
        let copy = |from: &str, to: &str| copy(&bundled(from), &data.join(to));
        let text = std::fs::read(bundled("examples/data/text/shakespeare-1mb.txt")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("text.txt"), &text[..4096]).unwrap();
        copy("examples/data/text/tokenizer-bpe512.json", "tokenizer.json");
        for split in ["train", "val"] {
            for (digit, file) in [("0", "0000.png"), ("0", "0001.png"), ("1", "0502.png"), ("1", "0504.png")] {
                copy(
                    &format!("examples/data/mnist-5k/train/{digit}/{file}"),
                    &format!("images/{split}/{digit}/{file}"),
                );
            }
        }
        for word in ["yes", "no"] {
            for voice in ["espeak_en-029_s140_p50.wav", "espeak_en-us_s140_p50.wav", "espeak_en-gb_s140_p50.wav"] {
                copy(&format!("examples/data/speech-words/{word}/{voice}"), &format!("speech/{word}/{voice}"));
            }
        }
        copy("examples/data/ucr/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts", "train.ts");
        copy("examples/data/ucr/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts", "test.ts");
        copy("examples/data/forecasting/seatbelts-monthly.csv", "series.csv");
        scratch().to_path_buf()
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let (sets, lines): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| l.starts_with("--set "));
    let sets: Vec<String> = sets.iter().map(|s| s["--set ".len()..].to_string()).collect();
    let path = write(data_dir(), "fuzz.toml", lines.join("\n").as_bytes());
    let Some(run) = check(TASKS.load(&path, &sets), &path) else { return };
    let params = run.task.params();
    // The count a run reports before it allocates anything.
    let _ = mamba_nn::num_params(&params);
});
