//! Residual blocks, the backbone and the causal language model, with loading from Hugging Face
//! `save_pretrained` directories (one safetensors file or a sharded index).

use crate::{
    compute_dtype, BackboneConfig, Error, Init, Linear, LmConfig, Mixer, MixerCache, Param, Result, RmsNorm, Route,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Pre-norm residual block: h + mixer(norm(h)), the residual stream kept in f32.
#[derive(Debug, Clone)]
pub struct Block {
    norm: RmsNorm,
    mixer: Arc<dyn Mixer>,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &BackboneConfig) -> Result<Self> {
        Self::load_routed(vb, cfg, Route::by_names(&cfg.routes)?)
    }

    /// With routes made elsewhere (e.g. 2-d scan patterns over a patch grid).
    pub fn load_routed(vb: VarBuilder, cfg: &BackboneConfig, routes: Vec<Route>) -> Result<Self> {
        cfg.validate().map_err(|message| Error::Config { path: "[backbone]".into(), message })?;
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let norm = RmsNorm::new(small.get(cfg.d_model, "norm.weight")?, cfg.norm_eps);
        Ok(Self { norm, mixer: cfg.mixer.spec().load(vb.pp("mixer"), cfg, routes)? })
    }

    /// h: (batch, len, d_model) f32.
    pub fn forward(&self, h: &Tensor) -> Result<(Tensor, MixerCache)> {
        let (y, cache) = self.mixer.forward(&self.norm.forward(h)?)?;
        Ok(((h + y.to_dtype(DType::F32)?)?, cache))
    }

    /// The residual branch alone, mixer(norm(h)) in f32, for models that scale or drop it
    /// (drop-path) before adding it to h.
    pub fn branch(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.mixer.forward(&self.norm.forward(h)?)?.0.to_dtype(DType::F32)?)
    }

    /// A block's tensors, named under the block's path.
    pub fn params(c: &BackboneConfig) -> Vec<Param> {
        let mut out = vec![Param::new("norm.weight", vec![c.d_model], Init::Ones).no_decay()];
        out.extend(c.mixer.spec().params(c).into_iter().map(|p| p.under("mixer")));
        out
    }

    /// h: (batch, d_model) f32.
    pub fn step(&self, h: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        let y = self.mixer.step(&self.norm.forward(h)?, cache)?;
        Ok((h + y.to_dtype(DType::F32)?)?)
    }
}

/// Embedding, blocks and the final norm.
#[derive(Debug, Clone)]
pub struct Backbone {
    embeddings: Tensor,
    layers: Vec<Block>,
    norm_f: RmsNorm,
}

impl Backbone {
    pub fn load(vb: VarBuilder, cfg: &BackboneConfig, vocab_size: usize) -> Result<Self> {
        let layers = (0..cfg.n_layer).map(|i| Block::load(vb.pp(format!("layers.{i}")), cfg)).collect::<Result<_>>()?;
        Ok(Self {
            embeddings: vb.get((vocab_size, cfg.d_model), "embeddings.weight")?,
            layers,
            norm_f: RmsNorm::new(
                vb.clone().set_dtype(compute_dtype(vb.dtype())).get(cfg.d_model, "norm_f.weight")?,
                cfg.norm_eps,
            ),
        })
    }

    /// ids: (batch, len) -> hidden states after norm_f (batch, len, d_model), and each layer's cache.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Vec<MixerCache>)> {
        let (batch, len) = ids.dims2()?;
        let mut h = self.embeddings.embedding(&ids.flatten_all()?)?.reshape((batch, len, ()))?.to_dtype(DType::F32)?;
        let mut caches = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (next, cache) = layer.forward(&h)?;
            h = next;
            caches.push(cache);
        }
        Ok((self.norm_f.forward(&h)?, caches))
    }

    /// Caches for `batch` sequences not yet started.
    pub fn empty_caches(&self, batch: usize) -> Result<Vec<MixerCache>> {
        self.layers.iter().map(|l| l.mixer.empty_cache(batch)).collect()
    }

    /// ids: (batch) -> hidden states after norm_f (batch, d_model); advances the caches.
    pub fn step(&self, ids: &Tensor, caches: &mut [MixerCache]) -> Result<Tensor> {
        let mut h = self.embeddings.embedding(ids)?.to_dtype(DType::F32)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            h = layer.step(&h, cache)?;
        }
        self.norm_f.forward(&h)
    }
}

/// The model file of a checkpoint without a Hugging Face layout.
pub const MODEL_FILE: &str = "model.toml";

/// Backbone plus a language-model head, tied to the embedding or not.
#[derive(Debug, Clone)]
pub struct MambaLm {
    pub config: LmConfig,
    backbone: Backbone,
    lm_head: Linear,
}

impl MambaLm {
    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.lm_head.weight().device()
    }

    pub fn load(vb: VarBuilder, config: LmConfig) -> Result<Self> {
        let backbone = Backbone::load(vb.pp("backbone"), &config.backbone, config.vocab_size)?;
        let lm_head = Linear::new(
            if config.tie_embeddings {
                backbone.embeddings.clone()
            } else {
                vb.get((config.vocab_size, config.backbone.d_model), "lm_head.weight")?
            },
            None,
        );
        Ok(Self { config, backbone, lm_head })
    }

    /// A Hugging Face directory: config.json and model.safetensors (or a sharded
    /// model.safetensors.index.json). Missing, unexpected or mis-shaped tensors are reported
    /// together in one error. The projection and embedding matrices are held in `dtype`, the
    /// other parameters and the activations in `compute_dtype(dtype)`: with bf16, f32 everywhere
    /// but the matrices, whose bytes dominate both memory and decoding time.
    pub fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_weights(dir, LmConfig::from_hf_file(&dir.join("config.json"))?, dtype, device)
    }

    /// A model directory of either layout: a Hugging Face one (config.json, see [`Self::load_hf`])
    /// or this project's model file `model.toml` beside model.safetensors, which models without
    /// a Hugging Face layout (Mamba-3, bidirectional ones) are saved with.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let toml = dir.join(MODEL_FILE);
        if dir.join("config.json").exists() || !toml.exists() {
            return Self::load_hf(dir, dtype, device);
        }
        Self::load_weights(dir, LmConfig::from_toml_file(&toml)?, dtype, device)
    }

    /// model.safetensors (or its shards) of `dir` as a `config` model.
    fn load_weights(dir: &Path, config: LmConfig, dtype: DType, device: &Device) -> Result<Self> {
        let expected = Self::params(&config);
        // A tied head may still be stored, and state-spaces names the embedding in the singular.
        let matrices: std::collections::HashSet<&str> = expected
            .iter()
            .filter(|p| p.matrix)
            .map(|p| p.name.as_str())
            .chain(["lm_head.weight", "backbone.embedding.weight"])
            .collect();
        let held_as = |name: &str| if matrices.contains(name) { dtype } else { compute_dtype(dtype) };
        let mut tensors = read_safetensors(dir, device, held_as)?;
        if let Some(t) = tensors.remove("backbone.embedding.weight") {
            tensors.entry("backbone.embeddings.weight".into()).or_insert(t);
        }
        check_tensors(&tensors, &expected, &dir.display().to_string())?;
        Self::load(VarBuilder::from_tensors(tensors, dtype, device), config)
    }

    /// ids: (batch, len) -> logits (batch, len, vocab) f32, and the caches after the last token.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Vec<MixerCache>)> {
        let (h, caches) = self.backbone.forward(ids)?;
        Ok((self.lm_head.matmul(&h)?, caches))
    }

    /// The prompt of a generation: ids (batch, len) -> the logits of its last token only
    /// (batch, vocab) f32, and the caches to continue from. Skips the head for all other
    /// positions (for a 50k vocabulary, a third of the work of a 130M model).
    pub fn prefill(&self, ids: &Tensor) -> Result<(Tensor, Vec<MixerCache>)> {
        let (h, caches) = self.backbone.forward(ids)?;
        let len = h.dim(1)?;
        if len == 0 {
            return Err(Error::Config { path: "ids".into(), message: "an empty prompt has no last token".into() });
        }
        Ok((self.lm_head.matmul(&h.narrow(1, len - 1, 1)?.squeeze(1)?)?, caches))
    }

    /// Caches for `batch` sequences not yet started (decoding from the first token).
    pub fn empty_caches(&self, batch: usize) -> Result<Vec<MixerCache>> {
        self.backbone.empty_caches(batch)
    }

    /// Every tensor a checkpoint of `config` holds.
    pub fn params(config: &LmConfig) -> Vec<Param> {
        let c = &config.backbone;
        let embedding = |name: &str| Param::new(name, vec![config.vocab_size, c.d_model], Init::Embedding).matrix();
        let mut out = vec![embedding("backbone.embeddings.weight")];
        out.push(Param::new("backbone.norm_f.weight", vec![c.d_model], Init::Ones).no_decay());
        if !config.tie_embeddings {
            out.push(embedding("lm_head.weight"));
        }
        for i in 0..c.n_layer {
            out.extend(Block::params(c).into_iter().map(|p| p.under(&format!("backbone.layers.{i}"))));
        }
        out
    }

    /// ids: (batch) -> logits (batch, vocab) f32; advances the caches.
    pub fn step(&self, ids: &Tensor, caches: &mut [MixerCache]) -> Result<Tensor> {
        self.lm_head.matmul(&self.backbone.step(ids, caches)?)
    }
}

/// Writes a Hugging Face directory: config.json and model.safetensors, each through a temporary
/// file and a rename, so a failure never leaves half a file. `tensors` carry the checkpoint names
/// (those of a VarMap built through this crate's VarBuilder paths) and are checked against the
/// configuration first.
pub fn save_hf(dir: &Path, config: &LmConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    check_tensors(tensors, &MambaLm::params(config), &dir.display().to_string())?;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (config_path, weights_path) = (dir.join("config.json"), dir.join("model.safetensors"));
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, config.to_hf_json()?).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &config_path).map_err(io(&config_path))?;
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| Error::Config { path: tmp.display().to_string(), message: format!("cannot write: {e}") })?;
    std::fs::rename(&tmp, &weights_path).map_err(io(&weights_path))?;
    Ok(())
}

/// One error listing every missing, unexpected and mis-shaped tensor.
fn check_tensors(tensors: &HashMap<String, Tensor>, expected: &[Param], path: &str) -> Result<()> {
    let mut problems = vec![];
    for Param { name, shape, .. } in expected {
        match tensors.get(name) {
            None => problems.push(format!("missing {name} {shape:?}")),
            Some(t) if t.dims() != shape.as_slice() => {
                problems.push(format!("{name}: shape {:?}, expected {shape:?}", t.dims()))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).collect();
    extra.sort();
    // A tied head may still be stored.
    problems.extend(extra.into_iter().filter(|k| *k != "lm_head.weight").map(|k| format!("unexpected {k}")));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Checkpoint { path: path.into(), problems: problems.join("\n") })
    }
}

/// All tensors of model.safetensors, or of every shard named in model.safetensors.index.json,
/// each in the dtype `held_as` gives its name. Files are mapped, not read, and each tensor is
/// converted as it is copied out, so loading needs no second copy of the weights.
fn read_safetensors(dir: &Path, device: &Device, held_as: impl Fn(&str) -> DType) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let files = if single.exists() {
        vec![single]
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index)
            .map_err(|source| Error::Io { path: index.display().to_string(), source })?;
        let bad = |message: String| Error::Config { path: index.display().to_string(), message };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map =
            json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("missing key `weight_map`".into()))?;
        let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut tensors = HashMap::new();
    for file in files {
        let bad = |e: candle_core::Error| Error::Config {
            path: file.display().to_string(),
            message: format!("cannot read safetensors: {e}"),
        };
        // SAFETY: the mapping lives only in this loop, and the tensors are copied out of it; a
        // file changed on disk while it is read is the caller's race, as with any reader.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }.map_err(bad)?;
        for (name, view) in mapped.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device).map_err(bad)?;
            let t = t.to_dtype(held_as(&name))?;
            tensors.insert(name, t);
        }
    }
    Ok(tensors)
}
