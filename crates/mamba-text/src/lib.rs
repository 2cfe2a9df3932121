//! Text generation with a [`MambaLm`]: the prompt goes through the parallel scan once, then each
//! new token is one cached step. Greedy decoding, or sampling with temperature, top-k, top-p and
//! a seed; stop tokens; tokens are handed to a callback as they come (streaming). The language
//! model tasks (`task`): selective copying, induction heads and text.

mod task;

pub use task::{check_ids, complete, InductionHeads, LmBatch, LmTask, SelectiveCopying, Source, Text, TextData};

use candle_core::{DType, Tensor};
use mamba_nn::MambaLm;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] mamba_nn::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: String, message: String },
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 means greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Only ids below this are chosen: a tokenizer's vocabulary when the model's is padded
    /// (mamba-130m has 50280 rows for 50277 tokens).
    pub vocab_limit: Option<usize>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0, vocab_limit: None }
    }
}

impl Sampling {
    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Sampling(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::Sampling("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Sampling(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }
}

/// Chooses a token from one row of logits.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        Ok(Self { sampling, rng: StdRng::seed_from_u64(sampling.seed) })
    }

    /// logits: (vocab).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let mut logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if let Some(limit) = self.sampling.vocab_limit {
            logits.truncate(limit.max(1));
        }
        let argmax =
            || logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best }) as u32;
        if self.sampling.temperature == 0.0 {
            return Ok(argmax());
        }
        let t = self.sampling.temperature as f32;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits.iter().map(|&l| ((l - max) / t).exp()).enumerate().collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.sampling.top_k {
            probs.truncate(k);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if let Some(p) = self.sampling.top_p {
            let (mut cum, mut keep) = (0.0, probs.len());
            for (i, &(_, w)) in probs.iter().enumerate() {
                cum += w / total;
                if cum >= p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(i, w) in &probs {
            if r < w {
                return Ok(i as u32);
            }
            r -= w;
        }
        Ok(probs.last().map_or_else(argmax, |p| p.0 as u32))
    }
}

/// Generates up to `max_new` tokens after `prompt`, stopping after any token in `stop`.
/// `on_token` sees each new token as it is chosen. Returns the new tokens.
pub fn generate(
    model: &MambaLm,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(sampling)?;
    if prompt.is_empty() || max_new == 0 {
        return Ok(vec![]);
    }
    let device = model.device().clone();
    let ids = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let (logits, mut caches) = model.prefill(&ids)?;
    let mut last = logits.squeeze(0)?;
    let mut out = Vec::with_capacity(max_new);
    loop {
        let next = sampler.sample(&last)?;
        out.push(next);
        on_token(next);
        if out.len() == max_new || stop.contains(&next) {
            return Ok(out);
        }
        last = model.step(&Tensor::new(&[next], &device)?, &mut caches)?.squeeze(0)?;
    }
}

/// The tokenizer of a model directory (`tokenizer.json`).
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| Error::Tokenizer { path: path.display().to_string(), message: e.to_string() })?;
    tokenizer_from_bytes(&bytes, &path)
}

/// A tokenizer from the bytes of the `tokenizer.json` at `path` (named in errors). JSON syntax is
/// checked first, so that its errors carry a line and column: tokenizers 0.23 panics on a syntax
/// error inside a `decoder` section instead of returning one. Any panic it still raises becomes an
/// error naming the file.
pub fn tokenizer_from_bytes(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    let err = |message: String| Error::Tokenizer { path: path.display().to_string(), message };
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(tokenizer) => tokenizer.map_err(|e| err(e.to_string())),
        Err(_) => Err(err("the tokenizers library failed on it (the panic above)".into())),
    }
}

/// Turns tokens into text as they come. Byte-level BPE splits characters across tokens, and spaces
/// belong to pairs of tokens, so the text of a token alone is not its share of the output: each
/// push decodes everything so far and hands out what is new, holding back a trailing incomplete
/// character (decoded as U+FFFD) until the tokens that complete it arrive.
pub struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    shown: usize,
}

impl<'a> TextStream<'a> {
    /// A stream continuing `prompt`, whose text counts as already shown.
    pub fn new(tokenizer: &'a tokenizers::Tokenizer, prompt: &[u32]) -> Result<Self> {
        let mut s = Self { tokenizer, ids: prompt.to_vec(), shown: 0 };
        s.shown = s.decode()?.len();
        Ok(s)
    }

    fn decode(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.ids, true)
            .map_err(|e| Error::Tokenizer { path: "tokenizer".into(), message: format!("cannot decode: {e}") })
    }

    /// The text `id` completes, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.decode()?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take(&text))
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.decode()?;
        Ok(self.take(&text))
    }

    fn take(&mut self, text: &str) -> String {
        let new = text.get(self.shown..).unwrap_or_default().to_string();
        self.shown = self.shown.max(text.len());
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0, 2.9])).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let l = logits(&[0.5, 0.2, 2.0, 1.9, -3.0]);
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_k: Some(1), ..Default::default() }).unwrap();
        assert!((0..20).all(|_| s.sample(&l).unwrap() == 2));
        let draw = |seed| {
            let mut s = Sampler::new(Sampling { temperature: 1.0, seed, ..Default::default() }).unwrap();
            (0..50).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn sampling_follows_the_softmax_and_top_p_cuts_the_tail() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1.
        let l = logits(&[0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()]);
        let mut s = Sampler::new(Sampling { temperature: 1.0, seed: 1, ..Default::default() }).unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[s.sample(&l).unwrap() as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*c as f64 / 20000.0 - p).abs() < 0.02, "{counts:?}");
        }
        let mut s =
            Sampler::new(Sampling { temperature: 1.0, top_p: Some(0.75), seed: 1, ..Default::default() }).unwrap();
        assert!((0..2000).all(|_| s.sample(&l).unwrap() != 2));
    }

    #[test]
    fn padded_vocabulary_rows_are_never_chosen() {
        let l = logits(&[0.1, 0.2, 0.3, 9.0]);
        let mut s = Sampler::new(Sampling { vocab_limit: Some(3), ..Default::default() }).unwrap();
        assert_eq!(s.sample(&l).unwrap(), 2);
        let mut s = Sampler::new(Sampling { temperature: 1.0, vocab_limit: Some(3), ..Default::default() }).unwrap();
        assert!((0..200).all(|_| s.sample(&l).unwrap() < 3));
    }

    /// The BPE fixture splits "—" and "é" inside their UTF-8 bytes: pushing the tokens one by one
    /// hands out exactly the decoded text, never a replacement character for a split one.
    #[test]
    fn streamed_text_is_the_decoded_text() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/text/tokenizer-bpe512.json");
        let tok = tokenizers::Tokenizer::from_file(path).unwrap();
        let text = "Good morrow \u{2014} caf\u{e9}, fair Ophelia!";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        for split in [0, 1, 5] {
            let mut stream = TextStream::new(&tok, &ids[..split]).unwrap();
            let mut out = tok.decode(&ids[..split], true).unwrap();
            for &id in &ids[split..] {
                let piece = stream.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                out += &piece;
            }
            out += &stream.finish().unwrap();
            assert_eq!(out, text);
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        for bad in [
            Sampling { temperature: -1.0, ..Default::default() },
            Sampling { top_k: Some(0), ..Default::default() },
            Sampling { top_p: Some(1.5), ..Default::default() },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
    }

    /// Found by the tokenizer fuzz target: a syntax error inside the decoder section made
    /// tokenizers 0.23 panic ("Helper"). It is now an error at its line and column.
    #[test]
    fn a_broken_tokenizer_json_is_an_error_naming_the_file() {
        let good = include_str!("../../../examples/data/text/tokenizer-bpe512.json");
        let dir = std::env::temp_dir().join(format!("mamba-text-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (head, decoder) = good.split_at(good.find("\"decoder\": {").unwrap());
        let broken = format!("{head}{}", decoder.replacen("\"add_prefix_space\": true", "\"add_prefix_space\": ,", 1));
        for (text, expect) in [(broken.as_str(), "line 26"), ("{\"model\": 5}", "tokenizer.json")] {
            std::fs::write(dir.join("tokenizer.json"), text).unwrap();
            let msg = load_tokenizer(&dir).unwrap_err().to_string();
            assert!(msg.contains("tokenizer.json") && msg.contains(expect), "{msg}");
        }
        std::fs::write(dir.join("tokenizer.json"), good).unwrap();
        load_tokenizer(&dir).unwrap();
    }
}
