//! Model configuration: the types, and model files in TOML. `hf_config` reads and writes
//! `config.json`.

use crate::routes::{Merge, Route, RouteParams};
use crate::{Error, Mamba1Config, Mamba2Config, Mamba3Config, MixerSpec, Result, MODEL_FILE};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The mixer of every block: `kind` and that kind's own keys (those of its file's config). A
/// key of another kind is an unknown field, refused by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MixerConfig {
    Mamba1(Mamba1Config),
    Mamba2(Mamba2Config),
    Mamba3(Mamba3Config),
}

impl MixerConfig {
    /// The one list of mixer kinds: each one's name (as `kind` is written in files) and spec.
    fn arm(&self) -> (&'static str, &dyn MixerSpec) {
        match self {
            MixerConfig::Mamba1(c) => ("mamba1", c),
            MixerConfig::Mamba2(c) => ("mamba2", c),
            MixerConfig::Mamba3(c) => ("mamba3", c),
        }
    }

    /// `kind` as files write it.
    pub fn kind(&self) -> &'static str {
        self.arm().0
    }

    /// The kind's checks, tensors and constructor.
    pub fn spec(&self) -> &dyn MixerSpec {
        self.arm().1
    }
}

/// The sizes of a stack of Mamba blocks, named as in the papers: those every mixer kind reads,
/// and the mixer's own (`mixer`, flattened into the same `[backbone]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneConfig {
    pub d_model: usize,
    pub n_layer: usize,
    pub d_state: usize,
    #[serde(default = "two")]
    pub expand: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Route names (see `Route::by_name`): ["forward"] is causal, ["forward", "reverse"]
    /// bidirectional.
    #[serde(default = "causal")]
    pub routes: Vec<String>,
    #[serde(default)]
    pub route_params: RouteParams,
    #[serde(default)]
    pub merge: Merge,
    #[serde(flatten)]
    pub mixer: MixerConfig,
}

impl BackboneConfig {
    /// A causal stack of `mixer`s, with the defaults of a model file for everything else.
    pub fn causal(d_model: usize, n_layer: usize, d_state: usize, mixer: MixerConfig) -> Self {
        Self {
            d_model,
            n_layer,
            d_state,
            expand: two(),
            norm_eps: eps(),
            routes: causal(),
            route_params: RouteParams::default(),
            merge: Merge::default(),
            mixer,
        }
    }

    /// Sizes that cannot build a model, named.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [("d_model", self.d_model), ("d_state", self.d_state), ("expand", self.expand)];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` must be at least 1"));
        }
        // The names are checked where routes are made: `Route::by_name` for sequences, a patch
        // grid's patterns for images.
        if self.routes.is_empty() {
            return Err("`routes` must name at least one route".into());
        }
        if self.route_params == RouteParams::PerRoute && !self.mixer.spec().routes_own_params() {
            let kind = self.mixer.kind();
            return Err(format!("`route_params = \"per_route\"`: {kind} shares every tensor between routes"));
        }
        self.mixer.spec().validate(self)
    }

    /// A `[backbone]` table as model files write it (defaults filled in, unknown keys refused);
    /// `source` names the file in errors. Route names are not checked here (see `validate`).
    pub fn from_toml_table(table: toml::Table, source: &str) -> Result<Self> {
        let backbone = Self::deserialize(table).map_err(|e| Error::Config {
            path: source.to_string(),
            message: with_shared_keys(format!("[backbone] {e}")),
        })?;
        backbone.validate().map_err(|message| Error::Config { path: source.to_string(), message })?;
        Ok(backbone)
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// Whether the mixer reads only the past: one forward route. Only causal mixers can step.
    pub fn is_causal(&self) -> bool {
        self.routes == causal()
    }
}

/// A model file (TOML) as people write it: `[model]` vocabulary and head, `[backbone]` sizes, with
/// the usual defaults (expand 2, norm_eps 1e-5, and each mixer kind's own). Unknown keys are
/// errors.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    model: ModelSection,
    backbone: BackboneConfig,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    vocab_size: usize,
    #[serde(default = "yes")]
    tie_embeddings: bool,
}

/// A parse error of `[backbone]`: serde lists the mixer kind's own keys after an unknown one, so
/// the keys every kind takes are added, read off the config itself.
fn with_shared_keys(message: String) -> String {
    if !message.contains("unknown field") {
        return message;
    }
    let keys = |t: toml::Table| t.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let mixer = MixerConfig::Mamba1(Mamba1Config::default());
    let own = toml::Table::try_from(&mixer).map(keys).unwrap_or_default();
    let all = toml::Table::try_from(BackboneConfig::causal(1, 1, 1, mixer)).map(keys).unwrap_or_default();
    let shared: Vec<String> = all.into_iter().filter(|k| !own.contains(k)).map(|k| format!("`{k}`")).collect();
    format!("{}; every kind also takes {}", message.trim_end(), shared.join(", "))
}

/// Heads, B/C groups and chunks of Mamba-2 and Mamba-3: headdim divides d_inner, ngroups the
/// heads, and chunks are at least 1.
pub(crate) fn check_heads(
    d_inner: usize,
    headdim: usize,
    ngroups: usize,
    chunk_size: usize,
) -> std::result::Result<(), String> {
    if headdim == 0 || !d_inner.is_multiple_of(headdim) {
        return Err(format!("`headdim` ({headdim}) must divide expand x d_model ({d_inner})"));
    }
    let nheads = d_inner / headdim;
    if ngroups == 0 || !nheads.is_multiple_of(ngroups) {
        return Err(format!("`ngroups` ({ngroups}) must divide the number of heads ({nheads})"));
    }
    if chunk_size == 0 {
        return Err("`chunk_size` must be at least 1".into());
    }
    Ok(())
}

pub(crate) fn causal() -> Vec<String> {
    vec!["forward".into()]
}

fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-5
}

/// A causal language model: backbone, vocabulary and whether the head is tied to the embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct LmConfig {
    pub backbone: BackboneConfig,
    pub vocab_size: usize,
    pub tie_embeddings: bool,
}

impl LmConfig {
    /// Reads a model file in this project's TOML format (see `models/`).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The model file of this model, as [`Self::from_toml`] reads it back: the mixer kind's own
    /// keys written out, and none of another kind's (which reading refuses).
    pub fn to_toml(&self) -> Result<String> {
        let file = ModelFile {
            model: ModelSection { vocab_size: self.vocab_size, tie_embeddings: self.tie_embeddings },
            backbone: self.backbone.clone(),
        };
        toml::to_string(&file).map_err(|e| Error::Config { path: MODEL_FILE.into(), message: e.to_string() })
    }

    /// `source` names the file in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        let file: ModelFile = toml::from_str(text).map_err(|e| err(with_shared_keys(e.to_string())))?;
        file.backbone.validate().map_err(err)?;
        Route::by_names(&file.backbone.routes).map_err(|e| err(format!("`routes`: {e}")))?;
        Ok(Self {
            backbone: file.backbone,
            vocab_size: file.model.vocab_size,
            tie_embeddings: file.model.tie_embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = "[model]\nvocab_size = 100\n\n[backbone]\nkind = \"mamba2\"\nd_model = 64\nn_layer = 2\nd_state = 16\nheaddim = 32\n";

    #[test]
    fn toml_defaults_and_unknown_keys() {
        let cfg = LmConfig::from_toml(TOML, "m.toml").unwrap();
        let MixerConfig::Mamba2(m) = &cfg.backbone.mixer else { panic!("{cfg:?}") };
        assert_eq!((m.nheads(&cfg.backbone), m.d_conv, m.chunk_size, cfg.tie_embeddings), (4, 4, 256, true));
        assert_eq!(m.dt_limit, (0.0, f64::INFINITY));
        let msg = LmConfig::from_toml(&TOML.replace("d_state", "dstate"), "dir/m.toml").unwrap_err().to_string();
        assert!(msg.contains("dir/m.toml") && msg.contains("`d_state`"), "{msg}");
        let msg =
            LmConfig::from_toml(&(TOML.to_string() + "norm_epsilon = 1e-6\n"), "dir/m.toml").unwrap_err().to_string();
        assert!(msg.contains("dir/m.toml") && msg.contains("`norm_epsilon`") && msg.contains("`norm_eps`"), "{msg}");
        let msg =
            LmConfig::from_toml(&TOML.replace("n_layer = 2", "n_layer = \"two\""), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("n_layer"), "{msg}");
        let msg = LmConfig::from_toml(&TOML.replace("headdim = 32", "headdim = 48"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("`headdim` (48)"), "{msg}");
    }

    /// Written and read back, every kind's config is itself, and its kind's name is the one
    /// files use.
    #[test]
    fn a_model_file_written_reads_back_as_the_same_config() {
        for kind in ["mamba1", "mamba2", "mamba3"] {
            let text = TOML
                .replace("mamba2", kind)
                .replace("headdim = 32\n", if kind == "mamba1" { "" } else { "headdim = 32\n" });
            let cfg = LmConfig::from_toml(&text, "m.toml").unwrap();
            assert_eq!(cfg.backbone.mixer.kind(), kind);
            let written = cfg.to_toml().unwrap();
            assert_eq!(LmConfig::from_toml(&written, "written.toml").unwrap(), cfg, "{kind}:\n{written}");
        }
    }

    #[test]
    fn a_mamba3_backbone_takes_its_own_keys_and_defaults() {
        let text = TOML.replace("mamba2", "mamba3") + "rope_fraction = 1.0\na_floor = 0.001\n";
        let b = LmConfig::from_toml(&text, "m.toml").unwrap().backbone;
        let MixerConfig::Mamba3(m) = &b.mixer else { panic!("{b:?}") };
        assert_eq!((m.chunk_size, m.rope_fraction, m.a_floor), (64, 1.0, 1e-3));
        assert_eq!((m.num_rope_angles(&b), m.nheads(&b)), (8, 4));
        let msg = LmConfig::from_toml(&text.replace("1.0", "0.7"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("m.toml") && msg.contains("`rope_fraction`"), "{msg}");
        assert_eq!(m.mimo_rank, None);
        let mimo = LmConfig::from_toml(&(text.clone() + "mimo_rank = 4\n"), "m.toml").unwrap();
        assert!(matches!(mimo.backbone.mixer, MixerConfig::Mamba3(Mamba3Config { mimo_rank: Some(4), .. })));
        assert_eq!(LmConfig::from_toml(&mimo.to_toml().unwrap(), "written.toml").unwrap(), mimo);
        let normed = LmConfig::from_toml(&(text.clone() + "outproj_norm = true\n"), "m.toml").unwrap();
        assert!(matches!(normed.backbone.mixer, MixerConfig::Mamba3(Mamba3Config { outproj_norm: true, .. })));
        assert_eq!(LmConfig::from_toml(&normed.to_toml().unwrap(), "written.toml").unwrap(), normed);
        let per_route = text.clone() + "routes = [\"forward\", \"reverse\"]\nroute_params = \"per_route\"\n";
        let msg = LmConfig::from_toml(&per_route, "m.toml").unwrap_err().to_string();
        assert!(msg.contains("m.toml") && msg.contains("mamba3 shares every tensor between routes"), "{msg}");
        let msg = LmConfig::from_toml(&(text + "mimo_rank = 0\n"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("m.toml") && msg.contains("`mimo_rank`"), "{msg}");
    }

    /// A key that only another mixer kind reads would be ignored: it is an error naming the
    /// file and the key. So is a kind that does not exist.
    #[test]
    fn keys_of_the_other_mixer_kind_are_refused() {
        let mamba1 = TOML.replace("mamba2", "mamba1").replace("headdim = 32\n", "");
        LmConfig::from_toml(&mamba1, "m.toml").unwrap();
        for (text, key) in [
            (mamba1.clone() + "headdim = 32\n", "headdim"),
            (mamba1.clone() + "chunk_size = 64\n", "chunk_size"),
            (mamba1.clone() + "dt_limit = [0.0, 1.0]\n", "dt_limit"),
            (TOML.to_string() + "dt_rank = 4\n", "dt_rank"),
            (TOML.to_string() + "selective = true\n", "selective"),
            (TOML.to_string() + "rope_fraction = 1.0\n", "rope_fraction"),
            (mamba1.clone() + "a_floor = 0.001\n", "a_floor"),
            (TOML.to_string() + "mimo_rank = 4\n", "mimo_rank"),
            (TOML.to_string() + "outproj_norm = true\n", "outproj_norm"),
            (TOML.replace("mamba2", "mamba3") + "d_conv = 4\n", "d_conv"),
            (TOML.replace("mamba2", "mamba3") + "conv_bias = true\n", "conv_bias"),
            (TOML.replace("mamba2", "mamba3") + "dt_limit = [0.0, 1.0]\n", "dt_limit"),
            (TOML.replace("mamba2", "mamba3") + "proj_bias = true\n", "proj_bias"),
            (TOML.replace("mamba2", "mamba4"), "mamba4"),
        ] {
            let msg = LmConfig::from_toml(&text, "dir/m.toml").unwrap_err().to_string();
            assert!(msg.contains("dir/m.toml") && msg.contains(&format!("`{key}`")), "{msg}");
        }
    }
}
