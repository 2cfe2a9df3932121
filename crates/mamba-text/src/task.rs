//! The language-model tasks: causal language modelling over a token source, with the loss on
//! chosen positions. `[task] kind = "selective_copying"` and `"induction_heads"` are the Mamba
//! paper's synthetic tasks, generated afresh from (seed, split, epoch, index); `"text"` is a text
//! file through a tokenizer.

use crate::{generate, load_tokenizer, tokenizer_from_bytes, Sampling};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use mamba_nn::{LmConfig, MambaLm, Param};
use mamba_train::{
    example_seed, io, smoothed, DynTask, Error, Evaluation, Metrics, PredictOptions, Result, Split, Task, TaskInput,
    TaskKind,
};
use rand::{rngs::StdRng, seq::index::sample, Rng, SeedableRng};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Token ids, targets and a loss mask for a batch of sequences of one length.
pub struct LmBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
}

/// Where sequences come from.
pub enum Source {
    /// `tokens` data tokens (ids 2..vocab) at random places among `seq_len` noise tokens (id 0),
    /// then `tokens` markers (id 1): at the markers, the data tokens in order.
    SelectiveCopying { seq_len: usize, tokens: usize, vocab: usize, examples: [usize; 2] },
    /// Random tokens (ids 1..vocab) with a trigger (id 0) once, followed by the answer; the
    /// sequence ends with the trigger: the answer is the last target.
    InductionHeads { seq_len: usize, vocab: usize, examples: [usize; 2] },
    /// Windows of `context` + 1 tokens of a tokenised text; the last `validation_fraction` of the
    /// tokens is held out.
    Text(TextData),
}

pub struct TextData {
    tokens: [Vec<u32>; 2],
    context: usize,
    /// Validation tokens per character, to report nats per character.
    tokens_per_char: f64,
    tokenizer_json: Vec<u8>,
}

impl TextData {
    /// Tokenises `text_path` with `tokenizer_path` and splits it.
    pub fn load(text_path: &Path, tokenizer_path: &Path, context: usize, validation_fraction: f64) -> Result<Self> {
        let text = std::fs::read_to_string(text_path).map_err(io(text_path))?;
        let tokenizer_json = std::fs::read(tokenizer_path).map_err(io(tokenizer_path))?;
        let bad = |message: String| Error::Config { path: tokenizer_path.display().to_string(), message };
        let tok = tokenizer_from_bytes(&tokenizer_json, tokenizer_path)?;
        if !(0.0..=1.0).contains(&validation_fraction) || context == 0 {
            return Err(Error::Config {
                path: "[task]".into(),
                message: "validation_fraction must be in [0, 1] and context at least 1".into(),
            });
        }
        let split_char = text.char_indices().nth((text.chars().count() as f64 * (1.0 - validation_fraction)) as usize);
        let (train, val) = text.split_at(split_char.map_or(text.len(), |(i, _)| i));
        let encode = |t: &str| -> Result<Vec<u32>> {
            Ok(tok.encode(t, false).map_err(|e| bad(e.to_string()))?.get_ids().to_vec())
        };
        let tokens = [encode(train)?, encode(val)?];
        let tokens_per_char = tokens[1].len() as f64 / val.chars().count().max(1) as f64;
        Ok(Self { tokens, context, tokens_per_char, tokenizer_json })
    }

    fn windows(&self, split: Split) -> usize {
        self.tokens[split as usize].len().saturating_sub(1) / self.context
    }
}

pub struct LmTask {
    pub config: LmConfig,
    pub source: Source,
    pub label_smoothing: f64,
    pub seed: u64,
}

impl LmTask {
    /// One sequence: (inputs, targets, mask), all of one length.
    fn example(&self, split: Split, epoch: usize, index: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(example_seed(self.seed, split, epoch, index));
        match &self.source {
            Source::SelectiveCopying { seq_len, tokens, vocab, .. } => {
                let data: Vec<u32> = (0..*tokens).map(|_| rng.random_range(2..*vocab as u32)).collect();
                let mut places = sample(&mut rng, *seq_len, *tokens).into_vec();
                places.sort_unstable();
                let mut inputs = vec![0u32; seq_len + tokens];
                for (&p, &t) in places.iter().zip(&data) {
                    inputs[p] = t;
                }
                inputs[*seq_len..].fill(1);
                let mut targets = vec![0u32; inputs.len()];
                targets[*seq_len..].copy_from_slice(&data);
                let mut mask = vec![0f32; inputs.len()];
                mask[*seq_len..].fill(1.0);
                (inputs, targets, mask)
            }
            Source::InductionHeads { seq_len, vocab, .. } => {
                let mut inputs: Vec<u32> = (0..*seq_len).map(|_| rng.random_range(1..*vocab as u32)).collect();
                let at = rng.random_range(0..seq_len - 2);
                inputs[at] = 0;
                inputs[seq_len - 1] = 0;
                let mut targets = vec![0u32; *seq_len];
                targets[seq_len - 1] = inputs[at + 1];
                let mut mask = vec![0f32; *seq_len];
                mask[seq_len - 1] = 1.0;
                (inputs, targets, mask)
            }
            Source::Text(t) => {
                let start = index * t.context;
                let w = &t.tokens[split as usize][start..start + t.context + 1];
                (w[..t.context].to_vec(), w[1..].to_vec(), vec![1.0; t.context])
            }
        }
    }
}

impl Task for LmTask {
    type Model = MambaLm;
    type Batch = LmBatch;

    fn params(&self) -> Vec<Param> {
        MambaLm::params(&self.config)
    }

    fn build_model(&self, vb: VarBuilder) -> Result<MambaLm> {
        Ok(MambaLm::load(vb, self.config.clone())?)
    }

    fn len(&self, split: Split) -> usize {
        match &self.source {
            Source::SelectiveCopying { examples, .. } | Source::InductionHeads { examples, .. } => {
                examples[split as usize]
            }
            Source::Text(t) => t.windows(split),
        }
    }

    fn batch(&self, split: Split, epoch: usize, indices: &[usize], device: &Device) -> Result<LmBatch> {
        let (mut inputs, mut targets, mut mask) = (vec![], vec![], vec![]);
        let mut len = 0;
        for &i in indices {
            let (x, y, m) = self.example(split, epoch, i);
            len = x.len();
            inputs.extend(x);
            targets.extend(y);
            mask.extend(m);
        }
        let shape = (indices.len(), len);
        Ok(LmBatch {
            inputs: Tensor::from_vec(inputs, shape, device)?,
            targets: Tensor::from_vec(targets, shape, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
        })
    }

    fn forward(&self, model: &MambaLm, batch: &LmBatch, _train: bool) -> Result<(Tensor, Metrics)> {
        let (logits, _) = model.forward(&batch.inputs)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&batch.targets.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?;
        let per_token = smoothed(&nll, &logp, self.label_smoothing)?;
        let count = batch.mask.sum_all()?.to_scalar::<f32>()? as f64;
        let loss = ((per_token * &batch.mask)?.sum_all()? / count.max(1.0))?;
        let mut m = Metrics::default();
        m.add("loss", loss.to_scalar::<f32>()? as f64 * count, count);
        let right = logits.argmax(D::Minus1)?.eq(&batch.targets)?.to_dtype(DType::F32)?;
        m.add("accuracy", (right * &batch.mask)?.sum_all()?.to_scalar::<f32>()? as f64, count);
        if let Source::Text(t) = &self.source {
            let nats = (nll * &batch.mask)?.sum_all()?.to_scalar::<f32>()? as f64;
            m.add("nats_per_char", nats * t.tokens_per_char, count);
        }
        Ok((loss, m))
    }

    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        // The model's config.json where it has a Hugging Face layout, else its model file: either
        // way the checkpoint is a model directory for `mamba generate`.
        let mut files = vec![];
        match self.config.to_hf_json() {
            Ok(json) => files.push(("config.json".to_string(), json.into_bytes())),
            Err(_) => files.push((mamba_nn::MODEL_FILE.to_string(), self.config.to_toml()?.into_bytes())),
        }
        if let Source::Text(t) = &self.source {
            files.push(("tokenizer.json".into(), t.tokenizer_json.clone()));
        }
        Ok(files)
    }

    fn best_metric(&self) -> (&'static str, bool) {
        match self.source {
            Source::Text(_) => ("loss", false),
            _ => ("accuracy", true),
        }
    }
    /// The validation metrics and the perplexity, exp(loss).
    fn evaluation(&self, model: &MambaLm, device: &Device) -> Result<Evaluation> {
        let mut evaluation = Evaluation::of(&mamba_train::evaluate(self, model, device)?);
        if let Some(loss) = evaluation.metrics.get("loss").copied() {
            evaluation.metrics.insert("perplexity".into(), loss.exp());
        }
        Ok(evaluation)
    }
}

impl From<crate::Error> for Error {
    fn from(e: crate::Error) -> Self {
        Error::Data(Box::new(e))
    }
}

/// The language model of a run: `[model]` and `[backbone]` as in `models/*.toml`.
fn lm_config(input: &TaskInput) -> Result<LmConfig> {
    let backbone = input.backbone.clone().ok_or_else(|| input.error("missing [backbone] section".into()))?;
    let model_text = toml::to_string(&toml::Table::from_iter([
        ("model".to_string(), toml::Value::Table(input.model.clone())),
        ("backbone".to_string(), toml::Value::Table(backbone)),
    ]))
    .map_err(|e| input.error(e.to_string()))?;
    Ok(LmConfig::from_toml(&model_text, input.source)?)
}

fn sixteen() -> usize {
    16
}
fn tenth() -> f64 {
    0.1
}

/// `[task] kind = "selective_copying"`: `tokens` data tokens scattered among `seq_len` noise
/// tokens, to be repeated in order after as many markers.
pub struct SelectiveCopying;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectiveCopyingSection {
    seq_len: usize,
    #[serde(default = "sixteen")]
    tokens: usize,
    train_examples: usize,
    validation_examples: usize,
    #[serde(default)]
    label_smoothing: f64,
}

impl TaskKind for SelectiveCopying {
    fn name(&self) -> &'static str {
        "selective_copying"
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let s: SelectiveCopyingSection = input.section()?;
        let config = lm_config(&input)?;
        let vocab = config.vocab_size;
        if vocab < 3 || s.tokens == 0 || s.tokens > s.seq_len {
            return Err(input.error(format!(
                "[task] selective copying needs vocab_size >= 3 and 1 <= tokens <= seq_len (vocab {vocab}, tokens {}, seq_len {})",
                s.tokens, s.seq_len
            )));
        }
        let examples = [s.train_examples, s.validation_examples];
        let source = Source::SelectiveCopying { seq_len: s.seq_len, tokens: s.tokens, vocab, examples };
        Ok(Box::new(LmTask { config, source, label_smoothing: s.label_smoothing, seed: input.seed }))
    }

    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        complete(dir, inputs, options.max_new_tokens, device)
    }
}

/// `[task] kind = "induction_heads"`: random tokens with a trigger once, followed by the answer;
/// the sequence ends with the trigger, and the answer is to be recalled.
pub struct InductionHeads;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InductionHeadsSection {
    seq_len: usize,
    train_examples: usize,
    validation_examples: usize,
    #[serde(default)]
    label_smoothing: f64,
}

impl TaskKind for InductionHeads {
    fn name(&self) -> &'static str {
        "induction_heads"
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let s: InductionHeadsSection = input.section()?;
        let config = lm_config(&input)?;
        let vocab = config.vocab_size;
        if vocab < 3 || s.seq_len < 3 {
            return Err(input.error("[task] induction heads needs vocab_size >= 3 and seq_len >= 3".into()));
        }
        let examples = [s.train_examples, s.validation_examples];
        let source = Source::InductionHeads { seq_len: s.seq_len, vocab, examples };
        Ok(Box::new(LmTask { config, source, label_smoothing: s.label_smoothing, seed: input.seed }))
    }

    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        complete(dir, inputs, options.max_new_tokens, device)
    }
}

/// `[task] kind = "text"`: windows of a tokenised text file (paths relative to the config file).
pub struct Text;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextSection {
    data: PathBuf,
    tokenizer: PathBuf,
    context: usize,
    #[serde(default = "tenth")]
    validation_fraction: f64,
    #[serde(default)]
    label_smoothing: f64,
}

impl TaskKind for Text {
    fn name(&self) -> &'static str {
        "text"
    }

    fn path_keys(&self) -> &'static [&'static str] {
        &["data", "tokenizer"]
    }

    fn build(&self, input: TaskInput) -> Result<Box<dyn DynTask>> {
        let s: TextSection = input.section()?;
        let config = lm_config(&input)?;
        // A checkpoint carries the tokenizer it was trained with.
        let tokenizer = match input.checkpoint {
            Some(dir) if dir.join("tokenizer.json").exists() => dir.join("tokenizer.json"),
            _ => s.tokenizer,
        };
        let text = TextData::load(&s.data, &tokenizer, s.context, s.validation_fraction)?;
        Ok(Box::new(LmTask {
            config,
            source: Source::Text(text),
            label_smoothing: s.label_smoothing,
            seed: input.seed,
        }))
    }

    /// Every window of another text file is evaluated.
    fn evaluate_on(&self, task: &mut toml::Table, data: &Path) -> std::result::Result<(), String> {
        task.insert("data".into(), toml::Value::String(data.display().to_string()));
        task.insert("validation_fraction".into(), toml::Value::Float(1.0));
        Ok(())
    }

    fn predict(&self, dir: &Path, inputs: &[String], options: &PredictOptions, device: &Device) -> Result<Vec<String>> {
        complete(dir, inputs, options.max_new_tokens, device)
    }
}

/// Each prompt of `inputs` continued by up to `max_new_tokens` greedy tokens, by the language model
/// of the model directory `dir` (Hugging Face config.json or model.toml, and model.safetensors)
/// on `device`. With a tokenizer.json, prompts and lines are text; without, comma-separated ids.
pub fn complete(dir: &Path, inputs: &[String], max_new_tokens: usize, device: &Device) -> Result<Vec<String>> {
    let model = MambaLm::load_dir(dir, DType::F32, device)?;
    let tok = dir.join("tokenizer.json").exists().then(|| load_tokenizer(dir)).transpose()?;
    let bad = |input: &str, message: String| Error::Config { path: format!("prompt {input:?}"), message };
    let mut lines = vec![];
    for input in inputs {
        let prompt: Vec<u32> = match &tok {
            Some(t) => t.encode(input.as_str(), false).map_err(|e| bad(input, e.to_string()))?.get_ids().to_vec(),
            None => input
                .split(',')
                .map(|v| v.trim().parse::<u32>().map_err(|_| bad(input, "not comma-separated token ids".into())))
                .collect::<Result<_>>()?,
        };
        check_ids(&model, &prompt).map_err(|m| bad(input, m))?;
        let new = generate(&model, &prompt, max_new_tokens, Sampling::default(), &[], |_| {})?;
        lines.push(match &tok {
            Some(t) => {
                let all: Vec<u32> = prompt.iter().chain(&new).copied().collect();
                t.decode(&all, true).map_err(|e| bad(input, format!("cannot decode: {e}")))?
            }
            None => new.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","),
        });
    }
    Ok(lines)
}

/// Every id of `ids` is in `model`'s vocabulary.
pub fn check_ids(model: &MambaLm, ids: &[u32]) -> std::result::Result<(), String> {
    let vocab = model.config.vocab_size;
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(format!("token id {bad} is outside the vocabulary (size {vocab})")),
        None => Ok(()),
    }
}
