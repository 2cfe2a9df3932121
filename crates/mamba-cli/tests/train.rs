//! `mamba train` and `mamba eval` end to end: a killed run resumes to the weights of an
//! uninterrupted one, and bad configs (or a device this build lacks) stop before training with
//! the file and key named.

mod common;

use candle_core::{safetensors, Device};
use common::{assert_cuda_refused, mamba, scratch};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A selective-copying run small enough for a test: 2 epochs of 48 micro-batches, two per
/// optimizer step, a checkpoint every 4 steps, a moving average of the weights.
const TINY: &str = r#"
[task]
kind = "selective_copying"
seq_len = 24
tokens = 4
train_examples = 192
validation_examples = 32

[model]
vocab_size = 8

[backbone]
kind = "mamba1"
d_model = 16
n_layer = 2
d_state = 4

[train]
epochs = 2
batch_size = 4
accumulate = 2
seed = 3
log_every = 4
checkpoint_every = 4

[optim]
lr = 1e-2
warmup_steps = 5
ema = 0.9
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// `mamba train CONFIG --out OUT` in the background, to be killed.
fn start_training(config: &str, out: &Path) -> std::process::Child {
    Command::new(common::mamba_bin())
        .args(["train", config, "--out", out.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn trainer_state(run: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(run.join("last/trainer.json")).ok()?).ok()
}

/// Runs killed at random points while they write checkpoints (one every step, so writing them
/// is most of a run) always resume, from `last` or the one it replaces, to the weights of an
/// uninterrupted run. `MAMBA_KILL_RUNS` runs (5 by default; docs/bad-input.md reports 50).
#[test]
fn runs_killed_while_checkpointing_resume_to_the_uninterrupted_weights() {
    let runs: u64 = std::env::var("MAMBA_KILL_RUNS").map_or(5, |v| v.parse().expect("MAMBA_KILL_RUNS: a count"));
    let dir = scratch("kill-checkpoint");
    let config = write_config(&dir, &TINY.replace("checkpoint_every = 4", "checkpoint_every = 1"));
    let cfg = config.to_str().unwrap();
    let whole = dir.join("whole");
    assert!(mamba(&["train", cfg, "--out", whole.to_str().unwrap()]).status.success());
    let (mut rng, mut mid_write) = (0x9E37_79B9_7F4A_7C15u64, 0);
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for run in 0..runs {
        let out = dir.join(format!("killed-{run}"));
        // Wait for the checkpoint of a random step (of 48), then kill after a random delay of
        // up to 30 ms, about the time one checkpoint takes to write.
        let (step, delay) = (1 + next(40), Duration::from_micros(next(30_000)));
        let mut child = start_training(cfg, &out);
        let start = Instant::now();
        while trainer_state(&out).and_then(|s| s["step"].as_u64()).is_none_or(|s| s < step) {
            assert!(start.elapsed() < Duration::from_secs(120), "run {run}: no checkpoint of step {step}");
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        // A kill between the two renames leaves only the previous checkpoint, as `.last.old`.
        let complete = ["last", ".last.old"].iter().any(|d| out.join(d).join("trainer.json").exists());
        assert!(complete, "run {run}: killed after step {step}, no complete checkpoint remains");
        mid_write += [".last.tmp", ".last.old", ".best.tmp", ".best.old"].iter().any(|d| out.join(d).exists()) as u32;
        let resumed = mamba(&["train", cfg, "--out", out.to_str().unwrap(), "--resume"]);
        assert!(resumed.status.success(), "run {run}: {}", String::from_utf8_lossy(&resumed.stderr));
        for which in ["last", "best"] {
            assert_eq!(weights(&whole.join(which)), weights(&out.join(which)), "run {run}: {which}");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    eprintln!("{runs} runs killed, {mid_write} of them while a checkpoint was being written");
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_weights() {
    let dir = scratch("resume");
    let config = write_config(&dir, TINY);
    let (whole, killed) = (dir.join("whole"), dir.join("killed"));
    let cfg = config.to_str().unwrap();
    // `--device cpu` is the default: the weights below are the same bit for bit.
    let run = mamba(&["train", cfg, "--out", whole.to_str().unwrap(), "--device", "cpu"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    // Kill the second run as soon as it has a checkpoint in the middle of the first epoch.
    let mut child = start_training(cfg, &killed);
    let start = Instant::now();
    let at_kill = loop {
        if let Some(s) = trainer_state(&killed) {
            if s["step"].as_u64() >= Some(8) {
                child.kill().unwrap();
                break s;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    };
    child.wait().unwrap();
    let state = trainer_state(&killed).expect("the checkpoint survives the kill");
    assert!(state["step"].as_u64() < Some(48), "the run finished before it was killed: {state}");
    assert_eq!(at_kill["epoch"], 0, "killed mid-epoch: {at_kill}");

    let resumed = mamba(&["train", cfg, "--out", killed.to_str().unwrap(), "--resume"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    for which in ["last", "best"] {
        assert_eq!(weights(&whole.join(which)), weights(&killed.join(which)), "{which}");
    }
    let log = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("\"train\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).map(|i| i * 4).collect::<Vec<_>>(), "each logging step once");
    assert!(killed.join("curves.svg").exists());

    // A fresh run into a used directory is refused; eval reads the checkpoint.
    let again = mamba(&["train", cfg, "--out", killed.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let eval = mamba(&["eval", "--checkpoint", killed.join("best").to_str().unwrap(), "--json", "--device", "cpu"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert!(metrics["accuracy"].as_f64().is_some() && metrics["loss"].as_f64().is_some(), "{metrics}");
    // predict: greedy continuations of token ids (no tokenizer in a synthetic task's checkpoint).
    let best = killed.join("best");
    let predict = mamba(&[
        "predict",
        "--checkpoint",
        best.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "2,0,0,3,1",
        "5,1",
    ]);
    assert!(predict.status.success(), "{}", String::from_utf8_lossy(&predict.stderr));
    let lines: Vec<Vec<u32>> = String::from_utf8(predict.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert!(lines.len() == 2 && lines.iter().all(|l| l.len() == 4 && l.iter().all(|&i| i < 8)), "{lines:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Validation loss and accuracy of `mamba eval --json` on `device`.
#[cfg(feature = "cuda")]
fn eval_on(checkpoint: &Path, device: &str) -> (f64, f64) {
    let eval = mamba(&["eval", "--checkpoint", checkpoint.to_str().unwrap(), "--json", "--device", device]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let m: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    (m["loss"].as_f64().unwrap(), m["accuracy"].as_f64().unwrap())
}

/// On a GPU: the same run, Mamba-1 and Mamba-2, trained there ends near the CPU run (the two
/// round differently, so not bit for bit), and its checkpoint evaluates alike on either device.
#[cfg(feature = "cuda")]
#[test]
fn a_run_on_the_gpu_ends_near_the_same_run_on_the_cpu() {
    let dir = scratch("gpu");
    let mamba2 = TINY.replace("kind = \"mamba1\"", "kind = \"mamba2\"\nheaddim = 8\nchunk_size = 8");
    for (name, text) in [("mamba1", TINY.to_string()), ("mamba2", mamba2)] {
        let config = write_config(&dir, &text);
        let run = |device: &str| {
            let out = dir.join(format!("{name}-{device}"));
            let train = mamba(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", device]);
            assert!(train.status.success(), "{name} on {device}: {}", String::from_utf8_lossy(&train.stderr));
            out.join("best")
        };
        let (cpu, gpu) = (run("cpu"), run("cuda"));
        let (cpu_loss, _) = eval_on(&cpu, "cpu");
        let (gpu_loss, gpu_accuracy) = eval_on(&gpu, "cuda");
        let (loss_here, accuracy_here) = eval_on(&gpu, "cpu");
        assert!((gpu_loss - loss_here).abs() <= 1e-4 * loss_here.abs().max(1.0), "{name}: {gpu_loss} vs {loss_here}");
        assert!((gpu_accuracy - accuracy_here).abs() <= 1e-2, "{name}: {gpu_accuracy} vs {accuracy_here}");
        assert!((gpu_loss - cpu_loss).abs() <= 0.1 * cpu_loss, "{name}: GPU run {gpu_loss}, CPU run {cpu_loss}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_in_a_build_without_it_stops_training_before_anything_is_written() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = scratch("no-cuda");
    let config = write_config(&dir, TINY);
    let out = dir.join("run");
    assert_cuda_refused(&mamba(&[
        "train",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]));
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_stop_before_training_naming_file_and_key() {
    let dir = scratch("bad");
    let cases: [(&str, String, &[&str]); 8] = [
        ("unknown key", TINY.replace("epochs = 2", "epochs = 2\nepochz = 3"), &["epochz", "config.toml"]),
        ("wrong type", TINY.replace("batch_size = 4", "batch_size = \"four\""), &["batch_size", "config.toml"]),
        // The kinds this `mamba` knows are listed.
        ("unknown task", TINY.replace("selective_copying", "telepathy"), &["telepathy", "config.toml", "image_classification"]),
        (
            "no task",
            TINY.replace(
                "[task]\nkind = \"selective_copying\"\nseq_len = 24\ntokens = 4\ntrain_examples = 192\nvalidation_examples = 32\n",
                "",
            ),
            &["config.toml: a training config needs a [task] section"],
        ),
        // A key of the text task is not one of selective copying's.
        ("another task's key", TINY.replace("seq_len = 24", "seq_len = 24\ncontext = 8"), &["config.toml: [task]", "context"]),
        (
            "missing file",
            TINY.replace(
                "kind = \"selective_copying\"\nseq_len = 24\ntokens = 4\ntrain_examples = 192\nvalidation_examples = 32",
                "kind = \"text\"\ndata = \"nowhere.txt\"\ntokenizer = \"tokenizer.json\"\ncontext = 8",
            ),
            &["nowhere.txt", "config.toml"],
        ),
        ("bad model", TINY.replace("d_state = 4", "d_state = 0"), &["d_state", "config.toml"]),
        // A task's own check, which named only "[task]" until the fuzzer asked for the file.
        (
            "bad task",
            TINY.replace(
                "kind = \"selective_copying\"\nseq_len = 24\ntokens = 4\ntrain_examples = 192\nvalidation_examples = 32",
                &format!(
                    "kind = \"text\"\ndata = \"{}\"\ntokenizer = \"{}\"\ncontext = 8\nvalidation_fraction = 5.1",
                    common::repo().join("examples/data/text/make_tokenizer.py").display(),
                    common::repo().join("examples/data/text/tokenizer-bpe512.json").display()
                ),
            ),
            &["config.toml: [task]: validation_fraction must be in [0, 1]"],
        ),
    ];
    for (what, text, needles) in cases {
        let config = write_config(&dir, &text);
        let out = dir.join(what.replace(' ', "-"));
        let run = mamba(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{what}: succeeded");
        for n in needles {
            assert!(err.contains(n), "{what}: {n:?} not in {err}");
        }
        assert!(!out.join("last").exists(), "{what}: trained anyway");
    }
    let config = write_config(&dir, TINY);
    let run = mamba(&["train", config.to_str().unwrap(), "--set", "train.epochz=1"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("epochz"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// predict and eval follow the `[task] kind` that a checkpoint's train.toml records; one this
/// `mamba` does not know stops both, naming the file and the kind.
#[test]
fn a_checkpoint_of_an_unknown_task_kind_is_named() {
    let dir = scratch("unknown-kind");
    std::fs::write(dir.join("train.toml"), "[task]\nkind = \"telepathy\"\n").unwrap();
    let checkpoint = dir.to_str().unwrap();
    for args in [&["predict", "--checkpoint", checkpoint, "1,2"][..], &["eval", "--checkpoint", checkpoint]] {
        let run = mamba(args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains("train.toml") && err.contains("telepathy"), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diverging_loss_stops_with_the_last_good_checkpoint_intact() {
    let dir = scratch("nan");
    let config = write_config(&dir, &TINY.replace("checkpoint_every = 4", "checkpoint_every = 1"));
    let out = dir.join("run");
    let run = mamba(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap(), "--set", "optim.lr=1e30"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("the loss is") && err.contains("last good checkpoint"), "{err}");
    let state = trainer_state(&out).expect("a checkpoint from before the divergence");
    assert!(state["step"].as_u64() >= Some(1));
    assert!(weights(&out.join("last")).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Mamba-3 model, SISO and MIMO, trains, and its checkpoint, which has no Hugging Face layout,
/// carries its model file: `inspect` and `generate` read it as a model directory.
#[test]
fn a_mamba3_checkpoint_is_a_model_directory() {
    for (mimo, shapes) in [("", "mixer.B_bias [4, 1, 4]"), ("mimo_rank = 2\n", "mixer.mimo_x [4, 2, 8]")] {
        let dir = scratch(if mimo.is_empty() { "mamba3" } else { "mamba3-mimo" });
        let backbone = format!("kind = \"mamba3\"\nheaddim = 8\n{mimo}");
        let text = TINY.replace("kind = \"mamba1\"\n", &backbone).replace("epochs = 2", "epochs = 1");
        let config = write_config(&dir, &text);
        let out = dir.join("run");
        let run = mamba(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let best = out.join("best");
        assert!(best.join("model.toml").exists() && !best.join("config.json").exists());
        let model = best.to_str().unwrap();
        let info = mamba(&["inspect", "--model", model]);
        let info = String::from_utf8(info.stdout).unwrap();
        assert!(info.contains("kind mamba3") && info.contains(shapes), "{info}");
        let run = mamba(&["generate", "--model", model, "--ids", "1,2,3", "--max-new-tokens", "4"]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let ids: Vec<u32> =
            String::from_utf8(run.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect();
        assert!(ids.len() == 4 && ids.iter().all(|&i| i < 8), "{ids:?}");
    }
}

/// A text language model's checkpoint is evaluated on another text file with `--data`, through
/// the tokenizer the checkpoint carries: the last tenth of the training text, written to a file of
/// its own, gives exactly the run's validation metrics, and perplexity is exp(loss).
#[test]
fn a_text_checkpoint_is_evaluated_on_another_file_with_its_own_tokenizer() {
    let dir = scratch("text-eval");
    let shakespeare = std::fs::read_to_string(common::repo().join("examples/data/text/shakespeare-1mb.txt")).unwrap();
    let text: String = shakespeare.chars().take(6000).collect();
    std::fs::write(dir.join("train.txt"), &text).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    std::fs::copy(common::repo().join("examples/data/text/tokenizer-bpe512.json"), &tokenizer).unwrap();
    let task = "kind = \"text\"\ndata = \"train.txt\"\ntokenizer = \"tokenizer.json\"\ncontext = 32";
    let config = TINY
        .replace(
            "kind = \"selective_copying\"\nseq_len = 24\ntokens = 4\ntrain_examples = 192\nvalidation_examples = 32",
            task,
        )
        .replace("vocab_size = 8", "vocab_size = 512")
        .replace("epochs = 2", "epochs = 1");
    let config = write_config(&dir, &config);
    let out = dir.join("run");
    assert!(mamba(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap()]).status.success());
    // The checkpoint's own tokenizer.json is used, not the file the config named.
    std::fs::remove_file(&tokenizer).unwrap();
    let best = out.join("best");
    let eval = |extra: &[&str]| -> serde_json::Value {
        let run = mamba(&[&["eval", "--checkpoint", best.to_str().unwrap(), "--json"][..], extra].concat());
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        serde_json::from_slice(&run.stdout).unwrap()
    };
    let validation = eval(&[]);
    let loss = validation["loss"].as_f64().unwrap();
    assert!((validation["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
    let split = text.char_indices().nth((text.chars().count() as f64 * 0.9) as usize).unwrap().0;
    std::fs::write(dir.join("held-out.txt"), &text[split..]).unwrap();
    assert_eq!(eval(&["--data", dir.join("held-out.txt").to_str().unwrap()]), validation);
    // Another text gives other numbers.
    std::fs::write(dir.join("other.txt"), &text[..split]).unwrap();
    assert_ne!(eval(&["--data", dir.join("other.txt").to_str().unwrap()])["loss"], validation["loss"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
