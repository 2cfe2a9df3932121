//! Language-model inference on the CPU, this project against candle-transformers, on a
//! mamba-130m-shaped and a mamba2-130m-shaped model with the same random weights (the reference
//! initialisation, seed 0).
//!
//! Each case runs in its own process so that its peak memory (VmHWM) is its own: the parent
//! writes the checkpoints, runs every case with RAYON_NUM_THREADS (default 2), checks that the
//! implementations' prompt logits agree and prints a Markdown table.
//!
//! Prefill: a 512-token prompt to the logits of its last token and the caches (candle-transformers'
//! `mamba` feeds it one token at a time; its `mamba2` has a chunked `forward_prefill`, measured
//! too). Decode: 128 greedy tokens after it, one at a time.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::{mamba as ct1, mamba2 as ct2};
use mamba_nn::{init_params, InitConfig, LmConfig, MambaLm};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROMPT: usize = 512;
const DECODE: usize = 128;

fn prompt_ids(vocab: usize) -> Vec<u32> {
    (0..PROMPT).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

struct Measured {
    prefill_s: f64,
    decode_s: f64,
    /// The last prompt token's logits.
    logits: Vec<f32>,
}

fn argmax(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.argmax(D::Minus1)?.to_dtype(DType::U32)?)
}

/// The median of three prefills, then the decode after the last one.
fn ours(dir: &Path, dtype: DType) -> Result<Measured> {
    let model = MambaLm::load_hf(dir, dtype, &Device::Cpu)?;
    let ids = Tensor::new(prompt_ids(model.config.vocab_size), &Device::Cpu)?.unsqueeze(0)?;
    model.prefill(&ids.narrow(1, 0, 16)?)?; // warm-up: thread pools, first allocations
    let mut times = vec![];
    let mut out = None;
    for _ in 0..3 {
        let t = Instant::now();
        out = Some(model.prefill(&ids)?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (logits, mut caches) = out.expect("three prefills ran");
    let mut next = argmax(&logits)?;
    let t = Instant::now();
    for _ in 0..DECODE {
        next = argmax(&model.step(&next, &mut caches)?)?;
    }
    Ok(Measured { prefill_s: times[1], decode_s: t.elapsed().as_secs_f64(), logits: logits.flatten_all()?.to_vec1()? })
}

fn ct_mamba1(dir: &Path, cfg: &LmConfig) -> Result<Measured> {
    let ct_cfg: ct1::Config = serde_json::from_value(serde_json::json!({
        "d_model": cfg.backbone.d_model, "n_layer": cfg.backbone.n_layer,
        "vocab_size": cfg.vocab_size, "pad_vocab_size_multiple": 8,
    }))?;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?
    };
    let model = ct1::Model::new(&ct_cfg, vb.pp("backbone"))?;
    let new_state = || ct1::State::new(1, &ct_cfg, DType::F32, &Device::Cpu);
    let ids = prompt_ids(cfg.vocab_size);
    let mut warm = new_state()?;
    for &id in &ids[..16] {
        model.forward(&Tensor::new(&[id], &Device::Cpu)?, &mut warm)?;
    }
    let mut state = new_state()?;
    let t = Instant::now();
    let mut logits = None;
    for &id in &ids {
        logits = Some(model.forward(&Tensor::new(&[id], &Device::Cpu)?, &mut state)?);
    }
    let prefill_s = t.elapsed().as_secs_f64();
    let logits = logits.expect("a prompt");
    let mut next = argmax(&logits)?;
    let t = Instant::now();
    for _ in 0..DECODE {
        next = argmax(&model.forward(&next, &mut state)?)?;
    }
    Ok(Measured { prefill_s, decode_s: t.elapsed().as_secs_f64(), logits: logits.flatten_all()?.to_vec1()? })
}

/// `chunked`: the prompt through `forward_prefill` (chunks of chunk_size), else token by token.
fn ct_mamba2(dir: &Path, cfg: &LmConfig, chunked: bool) -> Result<Measured> {
    let b = &cfg.backbone;
    let ct_cfg: ct2::Config = serde_json::from_value(serde_json::json!({
        "d_model": b.d_model, "n_layer": b.n_layer, "vocab_size": cfg.vocab_size, "d_state": b.d_state,
        "expand": b.expand, "headdim": b.headdim, "ngroups": b.ngroups, "pad_vocab_size_multiple": 16,
    }))?;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?
    };
    let model = ct2::Model::new(&ct_cfg, vb.pp("backbone"))?;
    let new_state = || ct2::State::new(1, &ct_cfg, DType::F32, &Device::Cpu);
    let ids = prompt_ids(cfg.vocab_size);
    let prefill = |state: &mut ct2::State, ids: &[u32]| -> Result<Tensor> {
        if chunked {
            let logits = model.forward_prefill(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?, state, b.chunk_size)?;
            return Ok(logits.narrow(1, ids.len() - 1, 1)?.squeeze(1)?);
        }
        let mut logits = None;
        for &id in ids {
            logits = Some(model.forward(&Tensor::new(&[id], &Device::Cpu)?, state)?);
        }
        Ok(logits.expect("a prompt"))
    };
    prefill(&mut new_state()?, &ids[..16])?;
    let mut state = new_state()?;
    let t = Instant::now();
    let logits = prefill(&mut state, &ids)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next = argmax(&logits)?;
    let t = Instant::now();
    for _ in 0..DECODE {
        next = argmax(&model.forward(&next, &mut state)?)?;
    }
    Ok(Measured { prefill_s, decode_s: t.elapsed().as_secs_f64(), logits: logits.flatten_all()?.to_vec1()? })
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_memory_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM in /proc/self/status")?;
    let kib: f64 = line.split_whitespace().nth(1).context("no VmHWM value")?.parse()?;
    Ok(kib / 1024.0)
}

/// Child: one case, its results as one JSON line on stdout and its logits in `logits_out`.
fn run_case(kind: &str, imp: &str, dir: &Path, logits_out: &Path) -> Result<()> {
    let cfg = LmConfig::from_hf_file(&dir.join("config.json"))?;
    let m = match (kind, imp) {
        (_, "ours-f32") => ours(dir, DType::F32)?,
        (_, "ours-bf16") => ours(&dir.with_extension("bf16"), DType::BF16)?,
        ("mamba1", "candle-transformers") => ct_mamba1(dir, &cfg)?,
        ("mamba2", "candle-transformers") => ct_mamba2(dir, &cfg, false)?,
        ("mamba2", "candle-transformers-prefill") => ct_mamba2(dir, &cfg, true)?,
        _ => bail!("unknown case {kind} {imp}"),
    };
    let peak = peak_memory_mib()?;
    let bytes: Vec<u8> = m.logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(logits_out, bytes)?;
    println!(
        "{}",
        serde_json::json!({
            "prefill_tok_s": PROMPT as f64 / m.prefill_s, "decode_tok_s": DECODE as f64 / m.decode_s,
            "peak_mib": peak,
        })
    );
    Ok(())
}

/// Writes the f32 checkpoint `dir` and its bf16 twin `dir.bf16` (matrices in bf16) for `config`.
fn write_checkpoints(dir: &Path, config: &LmConfig) -> Result<()> {
    let params = init_params(config, &InitConfig::default(), 0)?;
    let to_ct_names = |mut p: HashMap<String, Tensor>| {
        // candle-transformers' mamba reads the embedding under the original state-spaces name,
        // which this project reads too.
        if matches!(config.backbone.mixer, mamba_nn::MixerConfig::Mamba1(_)) {
            let e = p.remove("backbone.embeddings.weight").expect("an embedding");
            p.insert("backbone.embedding.weight".into(), e);
        }
        p
    };
    for (d, dtype) in [(dir.to_path_buf(), DType::F32), (dir.with_extension("bf16"), DType::BF16)] {
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("config.json"), config.to_hf_json()?)?;
        let converted: HashMap<String, Tensor> = params
            .iter()
            .map(|(k, v)| {
                let matrix = v.rank() == 2 && !k.ends_with("A_log");
                Ok((k.clone(), if matrix { v.to_dtype(dtype)? } else { v.clone() }))
            })
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&to_ct_names(converted), d.join("model.safetensors"))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 6 && args[1] == "--case" {
        return run_case(&args[2], &args[3], Path::new(&args[4]), Path::new(&args[5]));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let work = std::env::temp_dir().join("mamba-lm-bench");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "2".into());
    println!("threads: {threads}; prompt {PROMPT} tokens, {DECODE} decoded; weights: reference init, seed 0\n");
    println!("| model | implementation | weights | prefill tok/s | decode tok/s | peak MiB | max abs logit diff vs ours f32 |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for (name, kind) in [("mamba-130m", "mamba1"), ("mamba2-130m", "mamba2")] {
        let config = LmConfig::from_toml_file(&root.join(format!("models/{name}.toml")))?;
        let dir = work.join(name);
        write_checkpoints(&dir, &config)?;
        let mut imps = vec![("ours-f32", "f32"), ("ours-bf16", "bf16"), ("candle-transformers", "f32")];
        if kind == "mamba2" {
            imps.push(("candle-transformers-prefill", "f32"));
        }
        let mut reference: Option<Vec<f32>> = None;
        for (imp, weights) in imps {
            let logits_path = work.join(format!("{name}-{imp}.logits"));
            let out = Command::new(std::env::current_exe()?)
                .args(["--case", kind, imp, dir.to_str().context("path")?, logits_path.to_str().context("path")?])
                .env("RAYON_NUM_THREADS", &threads)
                .output()?;
            if !out.status.success() {
                println!("| {name} | {imp} | {weights} | failed: {} | | | |", String::from_utf8_lossy(&out.stderr).trim());
                continue;
            }
            let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let logits: Vec<f32> =
                std::fs::read(&logits_path)?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let diff = match &reference {
                Some(r) => r.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max),
                None => 0.0,
            };
            reference.get_or_insert(logits);
            println!(
                "| {name} | {imp} | {weights} | {:.1} | {:.1} | {:.0} | {diff:.2e} |",
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["peak_mib"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}
