//! Model configuration: the types, and model files in TOML. `hf_config` reads and writes
//! `config.json`.

use crate::routes::{Merge, Route, RouteParams};
use crate::{Error, Result};
use crate::{Mamba3Config, MODEL_FILE};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixerKind {
    Mamba1,
    Mamba2,
    Mamba3,
}

impl MixerKind {
    pub fn name(self) -> &'static str {
        match self {
            MixerKind::Mamba1 => "mamba1",
            MixerKind::Mamba2 => "mamba2",
            MixerKind::Mamba3 => "mamba3",
        }
    }
}

/// The sizes of a stack of Mamba blocks, named as in the papers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    pub kind: MixerKind,
    pub d_model: usize,
    pub n_layer: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    /// Mamba-1: rank of the dt projection.
    pub dt_rank: usize,
    /// Mamba-2 and Mamba-3: channels per head, B/C groups, scan chunk length; Mamba-2: the dt
    /// clamp after the softplus.
    pub headdim: usize,
    pub ngroups: usize,
    pub chunk_size: usize,
    pub dt_limit: (f64, f64),
    pub norm_eps: f64,
    pub conv_bias: bool,
    /// Bias on in_proj and out_proj.
    pub proj_bias: bool,
    /// Route names (see `Route::by_name`): ["forward"] is causal, ["forward", "reverse"]
    /// bidirectional.
    pub routes: Vec<String>,
    pub route_params: RouteParams,
    pub merge: Merge,
    /// false: the ablation of the paper's Table 1, a time-invariant SSM (Mamba-1 only): dt, B
    /// and C do not depend on the input (dt = softplus(dt_bias) per channel, B and C learned
    /// vectors), so the mixer cannot select what to remember.
    pub selective: bool,
    /// Mamba-3: the share of the state dims that rotate (0.5 or 1.0), and A's bound below 0
    /// (A <= -a_floor).
    pub rope_fraction: f64,
    pub a_floor: f64,
    /// Mamba-3: MIMO of this rank (None: SISO).
    pub mimo_rank: Option<usize>,
}

impl BackboneConfig {
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
        if self.kind != MixerKind::Mamba1 && !self.selective {
            return Err("`selective = false` (the time-invariant ablation) is built for Mamba-1 only".into());
        }
        if self.kind != MixerKind::Mamba3 && self.d_conv == 0 {
            return Err("`d_conv` must be at least 1".into());
        }
        match self.kind {
            MixerKind::Mamba1 if self.dt_rank == 0 => Err("`dt_rank` must be at least 1".into()),
            MixerKind::Mamba1 => Ok(()),
            MixerKind::Mamba2 => check_heads(self.d_inner(), self.headdim, self.ngroups, self.chunk_size),
            MixerKind::Mamba3 if self.proj_bias => Err("`proj_bias`: Mamba-3's projections have no bias".into()),
            MixerKind::Mamba3 if self.route_params == RouteParams::PerRoute => {
                Err("`route_params = \"per_route\"` is built for Mamba-1 and Mamba-2 only".into())
            }
            MixerKind::Mamba3 => self.mamba3().validate(),
        }
    }

    /// The sizes of a Mamba-3 mixer of this backbone.
    pub fn mamba3(&self) -> Mamba3Config {
        Mamba3Config {
            d_model: self.d_model,
            d_state: self.d_state,
            expand: self.expand,
            headdim: self.headdim,
            ngroups: self.ngroups,
            rope_fraction: self.rope_fraction,
            a_floor: self.a_floor,
            chunk_size: self.chunk_size,
            mimo_rank: self.mimo_rank,
        }
    }

    /// A `[backbone]` table as model files write it (defaults filled in, unknown keys refused);
    /// `source` names the file in errors. Route names are not checked here (see `validate`).
    pub fn from_toml_table(table: toml::Table, source: &str) -> Result<Self> {
        let section = BackboneSection::deserialize(table)
            .map_err(|e| Error::Config { path: source.to_string(), message: format!("[backbone] {e}") })?;
        Self::from_section(section, source)
    }

    fn from_section(b: BackboneSection, source: &str) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        if let Some((key, _, kinds)) =
            b.kind_keys().into_iter().find(|(_, given, kinds)| *given && !kinds.contains(&b.kind))
        {
            let names: Vec<_> = kinds.iter().map(|k| format!("\"{}\"", k.name())).collect();
            return Err(err(format!(
                "[backbone] `{key}` is a key of kind = {}; this backbone is kind = \"{}\"",
                names.join(" or "),
                b.kind.name()
            )));
        }
        let conv = b.kind != MixerKind::Mamba3;
        let backbone = BackboneConfig {
            kind: b.kind,
            d_model: b.d_model,
            n_layer: b.n_layer,
            d_state: b.d_state,
            d_conv: b.d_conv.unwrap_or(if conv { 4 } else { 0 }),
            expand: b.expand,
            dt_rank: b.dt_rank.unwrap_or(b.d_model.div_ceil(16)),
            headdim: b.headdim.unwrap_or(64),
            ngroups: b.ngroups.unwrap_or(1),
            // Each reference's default: 256 for Mamba-2's SSD, 64 for Mamba-3's scan.
            chunk_size: b.chunk_size.unwrap_or(if conv { 256 } else { 64 }),
            dt_limit: b.dt_limit.unwrap_or((0.0, f64::INFINITY)),
            norm_eps: b.norm_eps,
            conv_bias: b.conv_bias.unwrap_or(conv),
            proj_bias: b.proj_bias,
            routes: b.routes,
            route_params: b.route_params,
            merge: b.merge,
            selective: b.selective.unwrap_or(true),
            rope_fraction: b.rope_fraction.unwrap_or(0.5),
            a_floor: b.a_floor.unwrap_or(1e-4),
            mimo_rank: b.mimo_rank,
        };
        backbone.validate().map_err(err)?;
        Ok(backbone)
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// Whether the mixer reads only the past: one forward route. Only causal mixers can step.
    pub fn is_causal(&self) -> bool {
        self.routes == causal()
    }

    /// Mamba-2 heads.
    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim.max(1)
    }
}

/// A model file (TOML) as people write it: `[model]` vocabulary and head, `[backbone]` sizes, with
/// the usual defaults (d_conv 4, expand 2, dt_rank ceil(d_model / 16), headdim 64, ngroups 1,
/// chunk_size 256, norm_eps 1e-5). Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    model: ModelSection,
    backbone: BackboneSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    vocab_size: usize,
    #[serde(default = "yes")]
    tie_embeddings: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackboneSection {
    kind: MixerKind,
    d_model: usize,
    n_layer: usize,
    d_state: usize,
    #[serde(default = "two")]
    expand: usize,
    // The keys of some mixer kinds (`KIND_KEYS`) are optional here so that from_section can tell
    // a key the model would ignore from a default.
    d_conv: Option<usize>,
    conv_bias: Option<bool>,
    dt_rank: Option<usize>,
    selective: Option<bool>,
    headdim: Option<usize>,
    ngroups: Option<usize>,
    chunk_size: Option<usize>,
    dt_limit: Option<(f64, f64)>,
    rope_fraction: Option<f64>,
    a_floor: Option<f64>,
    mimo_rank: Option<usize>,
    #[serde(default = "eps")]
    norm_eps: f64,
    #[serde(default)]
    proj_bias: bool,
    #[serde(default = "causal")]
    routes: Vec<String>,
    #[serde(default)]
    route_params: RouteParams,
    #[serde(default)]
    merge: Merge,
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

impl BackboneSection {
    /// The keys that only some mixer kinds read, whether each is given, and the kinds that read
    /// it: any other kind refuses it, since its model would ignore it.
    fn kind_keys(&self) -> [(&'static str, bool, &'static [MixerKind]); 11] {
        use MixerKind::*;
        [
            ("d_conv", self.d_conv.is_some(), &[Mamba1, Mamba2]),
            ("conv_bias", self.conv_bias.is_some(), &[Mamba1, Mamba2]),
            ("dt_rank", self.dt_rank.is_some(), &[Mamba1]),
            ("selective", self.selective.is_some(), &[Mamba1]),
            ("headdim", self.headdim.is_some(), &[Mamba2, Mamba3]),
            ("ngroups", self.ngroups.is_some(), &[Mamba2, Mamba3]),
            ("chunk_size", self.chunk_size.is_some(), &[Mamba2, Mamba3]),
            ("dt_limit", self.dt_limit.is_some(), &[Mamba2]),
            ("rope_fraction", self.rope_fraction.is_some(), &[Mamba3]),
            ("a_floor", self.a_floor.is_some(), &[Mamba3]),
            ("mimo_rank", self.mimo_rank.is_some(), &[Mamba3]),
        ]
    }
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

    /// The model file of this model, as [`Self::from_toml`] reads it back: every key of its
    /// mixer kind written out, and none of the others (which reading refuses).
    pub fn to_toml(&self) -> Result<String> {
        let err = |message: String| Error::Config { path: MODEL_FILE.into(), message };
        let mut backbone = toml::Table::try_from(&self.backbone).map_err(|e| err(e.to_string()))?;
        let section = BackboneSection::deserialize(backbone.clone()).map_err(|e| err(e.to_string()))?;
        for (key, _, kinds) in section.kind_keys() {
            if !kinds.contains(&self.backbone.kind) {
                backbone.remove(key);
            }
        }
        let mut model = toml::Table::new();
        model.insert("vocab_size".into(), (self.vocab_size as i64).into());
        model.insert("tie_embeddings".into(), self.tie_embeddings.into());
        let file =
            toml::Table::from_iter([("model".to_string(), model.into()), ("backbone".to_string(), backbone.into())]);
        toml::to_string(&file).map_err(|e| err(e.to_string()))
    }

    /// `source` names the file in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        let file: ModelFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let backbone = BackboneConfig::from_section(file.backbone, source)?;
        Route::by_names(&backbone.routes).map_err(|e| err(format!("`routes`: {e}")))?;
        Ok(Self { backbone, vocab_size: file.model.vocab_size, tie_embeddings: file.model.tie_embeddings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = "[model]\nvocab_size = 100\n\n[backbone]\nkind = \"mamba2\"\nd_model = 64\nn_layer = 2\nd_state = 16\nheaddim = 32\n";

    #[test]
    fn toml_defaults_and_unknown_keys() {
        let cfg = LmConfig::from_toml(TOML, "m.toml").unwrap();
        assert_eq!(
            (cfg.backbone.nheads(), cfg.backbone.d_conv, cfg.backbone.chunk_size, cfg.tie_embeddings),
            (4, 4, 256, true)
        );
        assert_eq!(cfg.backbone.dt_limit, (0.0, f64::INFINITY));
        let msg = LmConfig::from_toml(&TOML.replace("d_state", "dstate"), "dir/m.toml").unwrap_err().to_string();
        assert!(msg.contains("dir/m.toml") && msg.contains("dstate"), "{msg}");
        let msg =
            LmConfig::from_toml(&TOML.replace("n_layer = 2", "n_layer = \"two\""), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("n_layer"), "{msg}");
        let msg = LmConfig::from_toml(&TOML.replace("headdim = 32", "headdim = 48"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("`headdim` (48)"), "{msg}");
    }

    /// Written and read back, every kind's config is itself.
    #[test]
    fn a_model_file_written_reads_back_as_the_same_config() {
        for kind in ["mamba1", "mamba2", "mamba3"] {
            let text = TOML
                .replace("mamba2", kind)
                .replace("headdim = 32\n", if kind == "mamba1" { "" } else { "headdim = 32\n" });
            let cfg = LmConfig::from_toml(&text, "m.toml").unwrap();
            let written = cfg.to_toml().unwrap();
            assert_eq!(LmConfig::from_toml(&written, "written.toml").unwrap(), cfg, "{kind}:\n{written}");
        }
    }

    #[test]
    fn a_mamba3_backbone_takes_its_own_keys_and_defaults() {
        let text = TOML.replace("mamba2", "mamba3") + "rope_fraction = 1.0\na_floor = 0.001\n";
        let b = LmConfig::from_toml(&text, "m.toml").unwrap().backbone;
        assert_eq!((b.kind, b.chunk_size, b.d_conv, b.conv_bias), (MixerKind::Mamba3, 64, 0, false));
        let m = b.mamba3();
        assert_eq!((m.rope_fraction, m.a_floor, m.num_rope_angles(), m.nheads()), (1.0, 1e-3, 8, 4));
        let msg = LmConfig::from_toml(&text.replace("1.0", "0.7"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("m.toml") && msg.contains("`rope_fraction`"), "{msg}");
        assert_eq!(m.mimo_rank, None);
        let mimo = LmConfig::from_toml(&(text.clone() + "mimo_rank = 4\n"), "m.toml").unwrap();
        assert_eq!(mimo.backbone.mamba3().mimo_rank, Some(4));
        assert_eq!(LmConfig::from_toml(&mimo.to_toml().unwrap(), "written.toml").unwrap(), mimo);
        let msg = LmConfig::from_toml(&(text + "mimo_rank = 0\n"), "m.toml").unwrap_err().to_string();
        assert!(msg.contains("m.toml") && msg.contains("`mimo_rank`"), "{msg}");
    }

    /// A key that only another mixer kind reads would be ignored: it is an error naming the
    /// file and the key.
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
            (TOML.replace("mamba2", "mamba3") + "d_conv = 4\n", "d_conv"),
            (TOML.replace("mamba2", "mamba3") + "conv_bias = true\n", "conv_bias"),
            (TOML.replace("mamba2", "mamba3") + "dt_limit = [0.0, 1.0]\n", "dt_limit"),
            (TOML.replace("mamba2", "mamba3") + "proj_bias = true\n", "proj_bias"),
        ] {
            let msg = LmConfig::from_toml(&text, "dir/m.toml").unwrap_err().to_string();
            assert!(msg.contains("dir/m.toml") && msg.contains(&format!("`{key}`")), "{msg}");
        }
    }
}
