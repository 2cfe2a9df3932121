//! The `mamba` binary end to end on the fixtures: logits and greedy generation against
//! transformers (on the CPU, and on the GPU too in a build with `--features cuda`), inspect, and
//! errors.

mod common;

use candle_core::{safetensors, Device, Tensor};
use common::mamba;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures")
}

/// The prompt ids and the fixture tensors of a tiny model.
fn io(name: &str) -> (String, std::collections::HashMap<String, Tensor>) {
    let io = safetensors::load(fixtures().join(format!("{name}_io.safetensors")), &Device::Cpu).unwrap();
    let ids: Vec<i64> = io["input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    (ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","), io)
}

/// The devices to run on: the CPU, and the GPU in a build with `--features cuda`.
fn devices() -> Vec<&'static str> {
    if cfg!(feature = "cuda") {
        vec!["cpu", "cuda"]
    } else {
        vec!["cpu"]
    }
}

#[test]
fn logits_match_transformers() {
    // bf16 matrices: within bf16's rounding of transformers' f32 logits (see hf_parity.rs).
    for device in devices() {
        for (dtype, tolerance) in [("f32", 1e-4), ("bf16", 5e-2)] {
            for name in ["mamba_tiny", "mamba2_tiny"] {
                let (ids, io) = io(name);
                let out = std::env::temp_dir()
                    .join(format!("mamba-cli-{name}-{dtype}-{device}-{}.safetensors", std::process::id()));
                let model = fixtures().join(name);
                let (model, out_path) = (model.to_str().unwrap(), out.to_str().unwrap());
                let run = mamba(&[
                    "logits", "--model", model, "--ids", &ids, "--out", out_path, "--dtype", dtype, "--device", device,
                ]);
                assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
                let got = safetensors::load(&out, &Device::Cpu).unwrap().remove("logits").unwrap();
                std::fs::remove_file(&out).unwrap();
                let e = (got - &io["logits"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(e <= tolerance, "{name} {dtype} on {device}: max abs error {e}");
            }
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for device in devices() {
        for name in ["mamba_tiny", "mamba2_tiny"] {
            let (ids, io) = io(name);
            let model = fixtures().join(name);
            let model = model.to_str().unwrap();
            let run =
                mamba(&["generate", "--model", model, "--ids", &ids, "--max-new-tokens", "8", "--device", device]);
            assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
            let got: Vec<i64> =
                String::from_utf8(run.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect();
            let want: Vec<i64> = io["decode.new_ids"].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{name} on {device}");
        }
    }
}

#[test]
fn inspect_counts_the_checkpoint_parameters() {
    let model = fixtures().join("mamba_tiny");
    let stored = safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let count: usize = stored.values().map(|t| t.elem_count()).sum();
    let run = mamba(&["inspect", "--model", model.to_str().unwrap()]);
    let text = String::from_utf8(run.stdout).unwrap();
    assert!(text.contains(&format!("parameters: {count} ")), "{text}");
    assert!(text.contains("backbone.layers.1.mixer.A_log [64, 8]"), "{text}");
}

/// A language model's file in models/ is inspected without weights: Mamba-3's 130M shape,
/// counted by hand in mamba-nn's tests/configs.rs.
#[test]
fn inspect_reads_a_model_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/mamba3-130m.toml");
    let run = mamba(&["inspect", "--model", path.to_str().unwrap()]);
    let text = String::from_utf8(run.stdout).unwrap();
    assert!(text.contains("parameters: 130365312 ") && text.contains("rope_fraction 0.5"), "{text}");
}

#[test]
fn bad_input_is_reported() {
    let run = mamba(&["logits", "--model", "/no/such/model", "--ids", "1", "--out", "/tmp/never.safetensors"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/no/such/model"));
    let model = fixtures().join("mamba_tiny");
    let run = mamba(&["generate", "--model", model.to_str().unwrap(), "--ids", "1,2", "--temperature=-1"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("temperature"));
    let run =
        mamba(&["logits", "--model", model.to_str().unwrap(), "--ids", "1,99", "--out", "/tmp/never.safetensors"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("token id 99"));
    assert!(!std::path::Path::new("/tmp/never.safetensors").exists());
    // generate checks its prompt ids as logits does.
    let run = mamba(&["generate", "--model", model.to_str().unwrap(), "--ids", "1,99", "--max-new-tokens", "2"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("token id 99 is outside the vocabulary"), "{stderr}");
    // --device: a name it does not know, and CUDA in a build without it.
    let m = model.to_str().unwrap();
    let run = mamba(&["generate", "--model", m, "--ids", "1,2", "--device", "gpu"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("--device gpu: expected cpu, cuda or cuda:N"));
    if !cfg!(feature = "cuda") {
        let run =
            mamba(&["logits", "--model", m, "--ids", "1", "--out", "/tmp/never.safetensors", "--device", "cuda:1"]);
        let err = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(
            !run.status.success() && err.contains("built without CUDA") && err.contains("--features cuda"),
            "{err}"
        );
    }
}

/// --prompt through a tokenizer.json (a word-level vocabulary of 60 words for the model's 64 rows):
/// the prompt is echoed, the continuation streams as words, padded rows are never chosen.
#[test]
fn prompt_text_through_a_tokenizer() {
    let dir = std::env::temp_dir().join(format!("mamba-cli-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("mamba_tiny").join(f), dir.join(f)).unwrap();
    }
    let vocab: Vec<String> = (0..60).map(|i| format!("\"t{i}\": {i}")).collect();
    let tokenizer = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {{"type": "WhitespaceSplit"}}, "post_processor": null, "decoder": null,
        "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "t0"}}}}"#,
        vocab.join(", ")
    );
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    let d = dir.to_str().unwrap();
    let text = mamba(&["generate", "--model", d, "--prompt", "t1 t11 t35", "--max-new-tokens", "6"]);
    let ids = mamba(&["generate", "--model", d, "--ids", "1,11,35", "--max-new-tokens", "6"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8(text.stdout).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(&words[..3], ["t1", "t11", "t35"], "{text}");
    let new: Vec<u32> = words[3..].iter().map(|w| w.trim_start_matches('t').parse().unwrap()).collect();
    assert_eq!(new.len(), 6, "{text}");
    assert!(new.iter().all(|&i| i < 60), "{text}");
    // Where the unrestricted greedy choice is inside the vocabulary, both runs agree.
    let free: Vec<u32> =
        String::from_utf8(ids.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect();
    if free.iter().all(|&i| i < 60) {
        assert_eq!(new, free);
    }
}

/// A real byte-level BPE tokenizer (GPT-NeoX's kind, trained on Shakespeare:
/// examples/data/text/make_tokenizer.py) on a fresh 512-token model: the prompt, with a dash and
/// an accent that BPE splits inside their UTF-8 bytes, is echoed exactly, and the streamed
/// continuation is what the tokenizer decodes from the ids the same run chooses with `--ids`.
#[test]
fn prompt_text_through_a_bpe_tokenizer() {
    let dir = std::env::temp_dir().join(format!("mamba-cli-bpe-{}", std::process::id()));
    let toml = "[model]\nvocab_size = 512\n[backbone]\nkind = \"mamba1\"\nd_model = 32\nn_layer = 2\nd_state = 4\n";
    let config = mamba_nn::LmConfig::from_toml(toml, "test").unwrap();
    let params = mamba_nn::init_params(&config, &mamba_nn::InitConfig::default(), 7).unwrap();
    mamba_nn::save_hf(&dir, &config, &params).unwrap();
    let tokenizer_path = fixtures().join("../../examples/data/text/tokenizer-bpe512.json");
    std::fs::copy(&tokenizer_path, dir.join("tokenizer.json")).unwrap();
    let prompt = "To be, or not to be \u{2014} that is the qu\u{e9}stion.";
    let tok = tokenizers::Tokenizer::from_file(&tokenizer_path).unwrap();
    let prompt_ids: Vec<u32> = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    let ids_arg = prompt_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let d = dir.to_str().unwrap();
    let sampling = ["--max-new-tokens", "16", "--temperature", "1.0", "--seed", "5"];
    let text = mamba(&[&["generate", "--model", d, "--prompt", prompt][..], &sampling].concat());
    let ids = mamba(&[&["generate", "--model", d, "--ids", &ids_arg][..], &sampling].concat());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8(text.stdout).unwrap();
    let new: Vec<u32> = String::from_utf8(ids.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(new.len(), 16);
    let all: Vec<u32> = prompt_ids.iter().chain(&new).copied().collect();
    let want = tok.decode(&all, true).unwrap();
    assert!(text.starts_with(prompt), "{text:?}");
    assert_eq!(text.trim_end_matches('\n'), want);
}
