//! `mamba`: run Mamba language models from Hugging Face directories, train, evaluate and run
//! models from config files (language, image), draw 2-d scan patterns.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mamba_cli::TASKS;
use mamba_nn::{LmConfig, MambaLm};
use mamba_text::{check_ids, generate, load_tokenizer, Sampling, TextStream};
use mamba_train::PredictOptions;
use mamba_vision::{Grid, VisionConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Training allocates and frees tensors of a few hundred kB to a few MB thousands of times a
/// step; glibc's malloc returns such blocks to the kernel and faults them in again (a fifth of a
/// training profile in page faults). mimalloc keeps them, once told not to purge (see `main`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same index in mimalloc 2 and 3; libmimalloc-sys
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(
    name = "mamba",
    version,
    about = "Mamba state-space models: generate, train, eval, predict, inspect, scan patterns"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens after a prompt: the prompt through the parallel scan, then cached steps.
    Generate(GenerateArgs),
    /// Write the logits of a token sequence as the f32 tensor `logits` (1, len, vocab).
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Token ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = WeightDType::F32)]
        dtype: WeightDType,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Print a model's configuration, parameter count and tensors: a Hugging Face directory, or
    /// a vision model file (models/vision/*.toml). Runs no model (no --device).
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
    /// 2-d scan patterns.
    Scan {
        #[command(subcommand)]
        command: ScanCommand,
    },
    /// Train from a config file (see models/synthetic/, models/text/): checkpoints `last` and
    /// `best`, metrics.jsonl and curves.svg under --out.
    Train {
        config: PathBuf,
        /// Output directory (default runs/CONFIG-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Override a config value: section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Predictions of a trained checkpoint. Classifiers: INPUTS are image or WAV files, or
    /// .ts / .tsv archives (one line per case), printed with their top classes and
    /// probabilities. Forecasters: INPUTS are CSV files of the training variables; each gets
    /// NAME.forecast.csv (the next rows) and NAME.forecast.png (history and forecast). Language
    /// models: greedy continuations, text when the checkpoint has a tokenizer.json, else
    /// comma-separated ids.
    Predict(PredictArgs),
    /// Validation metrics of a checkpoint directory; for classifiers also per-class accuracy
    /// and the confusion matrix, for forecasters the test split beside the baselines, for
    /// language models the perplexity.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Evaluate on this instead of the run's validation set: an ImageFolder root for an image
        /// classifier, an AudioFolder root (every clip) for an audio classifier, a .ts or .tsv
        /// file for a series classifier, a text file (every window) for a text language model,
        /// a CSV with the model's columns for a forecaster (split as the run split its data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Classifiers: also draw the confusion matrix to this SVG file.
        #[arg(long)]
        confusion: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArg,
    },
}

#[derive(Subcommand)]
enum ScanCommand {
    /// Draw the order in which a pattern visits a grid as a PNG.
    Show {
        /// A pattern name: raster, column, snake, snake_column, hilbert, diagonal, spiral,
        /// windowK, atrousK, or reverse_ of any.
        #[arg(long)]
        pattern: String,
        /// ROWSxCOLS, e.g. 14x14.
        #[arg(long)]
        grid: String,
        #[arg(long)]
        out: PathBuf,
        /// Pixels per cell.
        #[arg(long, default_value_t = 32)]
        cell: u32,
    },
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Classes shown per input.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Image classifiers: run at this image size instead of the training size (Vim's
    /// position embedding is interpolated to the new patch grid).
    #[arg(long)]
    image_size: Option<usize>,
    /// Forecasters: write the forecast files here (default: beside each input).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
    #[arg(required = true)]
    inputs: Vec<String>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face directory (config.json, model.safetensors, tokenizer.json for --prompt).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after any of these token ids (comma separated).
    #[arg(long, value_delimiter = ',')]
    stop: Vec<u32>,
    #[arg(long, value_enum, default_value_t = WeightDType::F32)]
    dtype: WeightDType,
    #[command(flatten)]
    device: DeviceArg,
}

/// `--device`, on every command that runs a model.
#[derive(Args)]
struct DeviceArg {
    /// cpu, or cuda / cuda:N (a build with `--features cuda`).
    #[arg(long = "device", value_name = "DEVICE", default_value = "cpu")]
    name: String,
}

/// How the projection and embedding matrices are held; everything else computes in f32.
#[derive(Clone, Copy, ValueEnum)]
enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl From<WeightDType> for DType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
}

fn load(dir: &Path, dtype: WeightDType, device: &Device) -> Result<MambaLm> {
    if !dir.join("config.json").exists() && !dir.join(mamba_nn::MODEL_FILE).exists() {
        bail!("{}: not a model directory (no config.json or {})", dir.display(), mamba_nn::MODEL_FILE);
    }
    Ok(MambaLm::load_dir(dir, dtype.into(), device)?)
}

impl DeviceArg {
    /// cpu, cuda (GPU 0) or cuda:N. Commands open it before they read or write anything, so a
    /// wrong device fails them with nothing written.
    fn open(&self) -> Result<Device> {
        let name = &self.name;
        let ordinal = match name.as_str() {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => 0,
            _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => n,
                _ => bail!("--device {name}: expected cpu, cuda or cuda:N"),
            },
        };
        if !cfg!(feature = "cuda") {
            bail!("--device {name}: this mamba was built without CUDA (build it with `--features cuda`)");
        }
        // Without this, the first CUDA call would panic in the loader.
        #[cfg(feature = "cuda")]
        {
            let missing = mamba_ssm::missing_cuda_libraries();
            if !missing.is_empty() {
                bail!(
                    "--device {name}: no CUDA device here: cannot load {} (on a machine with an NVIDIA GPU, put the \
                     CUDA 13 libraries, e.g. PyTorch's nvidia/*/lib folders, on LD_LIBRARY_PATH)",
                    missing.join(", ")
                );
            }
        }
        Device::new_cuda(ordinal).with_context(|| format!("--device {name}"))
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let model = load(&a.model, a.dtype, &a.device.open()?)?;
    let mut sampling =
        Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed, vocab_limit: None };
    let mut out = std::io::stdout().lock();
    match (&a.prompt, &a.ids) {
        (Some(text), _) => {
            let tok = load_tokenizer(&a.model)?;
            sampling.vocab_limit = Some(tok.get_vocab_size(true));
            let enc =
                tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
            write!(out, "{text}")?;
            let mut stream = TextStream::new(&tok, enc.get_ids())?;
            let mut failed = None;
            generate(&model, enc.get_ids(), a.max_new_tokens, sampling, &a.stop, |id| match stream.push(id) {
                Ok(piece) => {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            })?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            write!(out, "{}", stream.finish()?)?;
            writeln!(out)?;
        }
        (None, Some(ids)) => {
            check_ids(&model, ids).map_err(anyhow::Error::msg)?;
            generate(&model, ids, a.max_new_tokens, sampling, &a.stop, |id| {
                let _ = write!(out, "{id} ");
                let _ = out.flush();
            })?;
            writeln!(out)?;
        }
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    }
    Ok(())
}

/// Token ids given on the command line must index the model's vocabulary.
fn run_logits(model: &Path, ids: &[u32], out: &Path, dtype: WeightDType, device: &DeviceArg) -> Result<()> {
    let m = load(model, dtype, &device.open()?)?;
    check_ids(&m, ids).map_err(anyhow::Error::msg)?;
    let vocab = m.config.vocab_size;
    let (logits, _) = m.forward(&Tensor::new(ids, m.device())?.unsqueeze(0)?)?;
    let logits = logits.to_device(&Device::Cpu)?;
    // Write beside the target and rename, so that a failure never leaves half a file.
    let tmp = out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&std::collections::HashMap::from([("logits".to_string(), logits)]), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote logits (1, {}, {vocab}) to {}", ids.len(), out.display());
    Ok(())
}

/// A model directory, or a model file: a language model's (`[model] vocab_size`, models/*.toml)
/// or a vision model's.
fn run_inspect(dir: &Path) -> Result<()> {
    let config = if dir.extension().is_some_and(|e| e == "toml") {
        let text = std::fs::read_to_string(dir).with_context(|| dir.display().to_string())?;
        let table: toml::Table = text.parse().with_context(|| dir.display().to_string())?;
        if table.get("model").and_then(|m| m.get("vocab_size")).is_none() {
            return inspect_vision(dir);
        }
        LmConfig::from_toml(&text, &dir.display().to_string())?
    } else {
        // Checks that the checkpoint fits the configuration; nothing runs, so the CPU is enough.
        load(dir, WeightDType::F32, &Device::Cpu)?.config
    };
    let declared = MambaLm::params(&config);
    let params = mamba_nn::num_params(&declared);
    let b = &config.backbone;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", dir.display())?;
    writeln!(
        out,
        "kind {}, d_model {}, n_layer {}, d_state {}, expand {}",
        b.mixer.kind(),
        b.d_model,
        b.n_layer,
        b.d_state,
        b.expand
    )?;
    writeln!(out, "{}", mixer_keys(&b.mixer))?;
    writeln!(out, "vocab {}, tied head {}", config.vocab_size, config.tie_embeddings)?;
    writeln!(out, "parameters: {params} ({:.2} M)", params as f64 / 1e6)?;
    for p in declared {
        writeln!(out, "  {} {:?}", p.name, p.shape)?;
    }
    Ok(())
}

/// The mixer kind's own keys as a model file writes them: "d_conv 4, dt_rank 8, ...".
fn mixer_keys(mixer: &mamba_nn::MixerConfig) -> String {
    let Ok(toml::Value::Table(keys)) = toml::Value::try_from(mixer) else { return String::new() };
    keys.iter().filter(|(k, _)| *k != "kind").map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

fn inspect_vision(path: &Path) -> Result<()> {
    let config = VisionConfig::from_toml_file(path)?;
    let declared = config.params();
    let params = config.num_params();
    let mut out = std::io::stdout().lock();
    let kind = match &config {
        VisionConfig::Vim(c) => format!(
            "Vim: {} tokens, d_model {}, {} layers, routes {:?}",
            c.tokens(),
            c.backbone.d_model,
            c.backbone.n_layer,
            c.backbone.routes
        ),
        VisionConfig::VMamba(c) => {
            format!("VMamba: dims {:?}, depths {:?}, grids {:?}, scan {:?}", c.dims, c.depths, c.grids(), c.scan)
        }
    };
    writeln!(out, "{}\n{kind}", path.display())?;
    writeln!(out, "parameters: {params} ({:.2} M)", params as f64 / 1e6)?;
    for p in declared {
        writeln!(out, "  {} {:?}", p.name, p.shape)?;
    }
    Ok(())
}

fn run_scan_show(pattern: &str, grid: &str, out: &Path, cell: u32) -> Result<()> {
    let (rows, cols) = grid
        .split_once('x')
        .and_then(|(r, c)| Some((r.parse::<usize>().ok()?, c.parse::<usize>().ok()?)))
        .filter(|&(r, c)| r > 0 && c > 0)
        .with_context(|| format!("--grid {grid}: expected ROWSxCOLS, e.g. 14x14"))?;
    // Bounds that keep the order and the picture in memory: a 1024 x 1024 grid, 16384 pixels a side.
    let (cell, side) = (cell.max(4) as u64, 16_384);
    let too_big = |n: usize| (n as u64).saturating_mul(cell) > side;
    if rows.checked_mul(cols).is_none_or(|n| n > 1 << 20) || too_big(rows) || too_big(cols) {
        bail!("--grid {grid} at --cell {cell}: at most 1024 x 1024 cells and {side} pixels a side");
    }
    let grid = Grid::new(rows, cols);
    let order = mamba_vision::pattern(pattern, grid)?;
    let img = mamba_vision::draw_order(&order, grid, cell as u32);
    // Written beside the target and renamed: never half a file.
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}: {pattern} over {rows}x{cols}", out.display());
    Ok(())
}

fn run_train(config: &Path, out: Option<PathBuf>, resume: bool, sets: &[String], device: &DeviceArg) -> Result<()> {
    let device = device.open()?;
    let out = out.unwrap_or_else(|| {
        PathBuf::from("runs").join(config.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned()))
    });
    let summary = TASKS.train(config, &out, resume, sets, &device)?;
    println!("validation: {}", mamba_train::summary_line(&summary.validation));
    println!("checkpoints: {} and {}", summary.last.display(), summary.best.display());
    Ok(())
}

fn run_predict(a: PredictArgs) -> Result<()> {
    let device = a.device.open()?;
    let options = PredictOptions { top: a.top, image_size: a.image_size, out: a.out, max_new_tokens: a.max_new_tokens };
    // What to do follows the task the checkpoint was trained for; a model directory without a
    // training config is a language model.
    let lines = match TASKS.predict(&a.checkpoint, &a.inputs, &options, &device)? {
        Some(lines) => lines,
        None => {
            let dir = &a.checkpoint;
            if !dir.join("config.json").exists() && !dir.join(mamba_nn::MODEL_FILE).exists() {
                bail!(
                    "{}: not a checkpoint or model directory (no train.toml, config.json or {})",
                    dir.display(),
                    mamba_nn::MODEL_FILE
                );
            }
            mamba_text::complete(dir, &a.inputs, a.max_new_tokens, &device)?
        }
    };
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn run_eval(
    checkpoint: &Path,
    data: Option<&Path>,
    json: bool,
    confusion_svg: Option<&Path>,
    device: &DeviceArg,
) -> Result<()> {
    let evaluation = TASKS.evaluate(checkpoint, data, &device.open()?)?;
    if let Some(svg) = confusion_svg {
        let Some((classes, matrix)) = &evaluation.confusion else {
            bail!("--confusion: {} is not a classifier", checkpoint.display());
        };
        mamba_train::plot_confusion(classes, matrix, svg)?;
    }
    if json {
        let mut value = serde_json::to_value(&evaluation.metrics)?;
        if let Some((classes, matrix)) = &evaluation.confusion {
            value["classes"] = serde_json::to_value(classes)?;
            value["confusion"] = serde_json::to_value(matrix)?;
        }
        if let Some(table) = &evaluation.table {
            let rows: serde_json::Map<String, serde_json::Value> = table
                .rows
                .iter()
                .map(|(name, values)| {
                    let cells = table.columns.iter().zip(values).map(|(c, v)| (c.to_lowercase(), (*v).into()));
                    (name.clone(), serde_json::Map::from_iter(cells).into())
                })
                .collect();
            value[table.key.as_str()] = rows.into();
        }
        println!("{value}");
        return Ok(());
    }
    for (k, v) in &evaluation.metrics {
        println!("{k} {v:.6}");
    }
    if let Some((classes, matrix)) = &evaluation.confusion {
        print_confusion(classes, matrix);
    }
    if let Some(table) = &evaluation.table {
        println!("\n{}:", table.title);
        println!("| {} | {} |", table.rows_are, table.columns.join(" | "));
        println!("|---|{}", "---|".repeat(table.columns.len()));
        for (name, values) in &table.rows {
            let cells: Vec<String> = values.iter().map(|v| format!("{v:.4}")).collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}

/// Per-class accuracy and the confusion matrix (rows: true class, columns: predicted).
fn print_confusion(classes: &[String], matrix: &[Vec<usize>]) {
    let width = classes.iter().map(|c| c.len()).max().unwrap_or(1).max(5);
    println!("\nper class (accuracy, images):");
    for (i, (c, row)) in classes.iter().zip(matrix).enumerate() {
        let (right, total) = (row[i], row.iter().sum::<usize>());
        println!("  {c:>width$} {:.4} {total}", right as f64 / total.max(1) as f64);
    }
    println!("\nconfusion (rows: true, columns: predicted):");
    let cell = matrix.iter().flatten().max().map_or(1, |m| m.to_string().len()).max(3);
    let head: Vec<String> = (0..classes.len()).map(|j| format!("{j:>cell$}")).collect();
    println!("  {:>width$} {}", "", head.join(" "));
    for (i, (c, row)) in classes.iter().zip(matrix).enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>cell$}")).collect();
        println!("  {:>width$} {} ({i})", c, cells.join(" "));
    }
}

fn main() {
    // mimalloc hands freed memory back to the kernel after 10 ms; a training step frees and
    // takes its large buffers again every few ms, and each time the kernel faults the pages
    // in and clears them (one epoch of the README's config: 10-16 % longer). Keep it.
    // SAFETY: sets a plain option before any thread but this one exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle asks the OS for the core count on every matmul unless this is set.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let result = match Cli::parse().command {
        Command::Generate(a) => run_generate(a),
        Command::Logits { model, ids, out, dtype, device } => run_logits(&model, &ids, &out, dtype, &device),
        Command::Inspect { model } => run_inspect(&model),
        Command::Train { config, out, resume, sets, device } => run_train(&config, out, resume, &sets, &device),
        Command::Eval { checkpoint, data, json, confusion, device } => {
            run_eval(&checkpoint, data.as_deref(), json, confusion.as_deref(), &device)
        }
        Command::Predict(args) => run_predict(args),
        Command::Scan { command: ScanCommand::Show { pattern, grid, out, cell } } => {
            run_scan_show(&pattern, &grid, &out, cell)
        }
    };
    if let Err(e) = result {
        // A reader that stops early (`mamba inspect ... | head`) is not an error.
        if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
