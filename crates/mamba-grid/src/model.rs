//! Vision models from config: `[model] kind = "vim"` (with a `[backbone]` of Mamba blocks) or
//! `kind = "vmamba"`; their tensors, their initialisation, and one `forward` for both.

use crate::layers::{patch_grid, Size2d};
use crate::scan::{pattern, ClassToken};
use crate::vim::{Vim, VimConfig};
use crate::vmamba::{VMamba, VMambaConfig};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_nn::{init_tensors, num_params, BackboneConfig, Error, InitConfig, Param, Result, RouteParams};
use rand::rngs::StdRng;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// What the data fixes: image size, channels and classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub image_size: Size2d,
    pub channels: usize,
    pub num_classes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfig {
    Vim(VimConfig),
    VMamba(VMambaConfig),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum ModelSection {
    Vim(VimSection),
    /// Image size, channels and classes left at 0 are taken from the data.
    Vmamba(VMambaConfig),
}

/// The `[model]` of `kind = "vim"`; the blocks are in `[backbone]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VimSection {
    image_size: Option<Size2d>,
    channels: Option<usize>,
    num_classes: Option<usize>,
    patch_size: Size2d,
    /// Default: the patch size (non-overlapping patches).
    patch_stride: Option<Size2d>,
    #[serde(default)]
    class_token: ClassToken,
    #[serde(default = "yes")]
    pos_embed: bool,
    #[serde(default)]
    drop_path: f64,
    #[serde(default = "vim_scan")]
    scan: Vec<String>,
}

fn yes() -> bool {
    true
}
fn vim_scan() -> Vec<String> {
    vec!["raster".into(), "reverse_raster".into()]
}

impl VisionConfig {
    /// A model file (`models/vision/*.toml`): `[model]` and, for Vim, `[backbone]`.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: source.clone(), source: e })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Config { path: source.clone(), message: e.to_string() })?;
        Self::from_file_table(table, &source, None)
    }

    /// A whole config file's table (a model file, or a training config whose other sections
    /// are ignored): its `[model]` and `[backbone]` through `from_tables`.
    pub fn from_file_table(mut table: toml::Table, source: &str, data: Option<ImageShape>) -> Result<Self> {
        let mut section = |name: &str| match table.remove(name) {
            Some(toml::Value::Table(t)) => Some(t),
            _ => None,
        };
        let model = section("model")
            .ok_or_else(|| Error::Config { path: source.to_string(), message: "missing [model] section".into() })?;
        Self::from_tables(model, section("backbone"), source, data)
    }

    /// `[model]` and `[backbone]` tables; `data`, when training, fills in (and must agree with)
    /// the image size, channels and classes. `source` names the file in errors.
    pub fn from_tables(
        model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        data: Option<ImageShape>,
    ) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        let section = ModelSection::deserialize(model).map_err(|e| err(format!("[model] {e}")))?;
        let shape = |image_size: Option<Size2d>, channels: Option<usize>, num_classes: Option<usize>| {
            fn pick<T: PartialEq + std::fmt::Display + Copy>(
                name: &str,
                given: Option<T>,
                from_data: Option<T>,
                positive: impl Fn(&T) -> bool,
            ) -> std::result::Result<T, String> {
                match (given, from_data) {
                    (Some(g), Some(d)) if g != d => Err(format!("[model] {name} = {g}, but the data set has {d}")),
                    (Some(v), _) | (None, Some(v)) if positive(&v) => Ok(v),
                    _ => Err(format!("[model] `{name}` must be set (at least 1)")),
                }
            }
            let count = |name: &str, given: Option<usize>, from_data: Option<usize>| {
                pick(name, given, from_data, |&v| v > 0).map_err(err)
            };
            Ok::<_, Error>(ImageShape {
                image_size: pick("image_size", image_size, data.map(|d| d.image_size), |s| !s.is_zero())
                    .map_err(err)?,
                channels: count("channels", channels, data.map(|d| d.channels))?,
                num_classes: count("num_classes", num_classes, data.map(|d| d.num_classes))?,
            })
        };
        let config = match section {
            ModelSection::Vim(v) => {
                let ImageShape { image_size, channels, num_classes } = shape(v.image_size, v.channels, v.num_classes)?;
                let mut b = backbone.ok_or_else(|| err("a Vim model needs a [backbone] section".into()))?;
                if b.contains_key("routes") {
                    return Err(err("[backbone] routes: a vision model's routes are its [model] scan patterns".into()));
                }
                b.insert("routes".into(), toml::Value::Array(v.scan.into_iter().map(toml::Value::String).collect()));
                // Vim's bidirectional blocks: each route its own SSM (where the mixer kind has
                // per-route tensors), the outputs averaged.
                let per_route = !b.contains_key("route_params");
                b.entry("merge").or_insert_with(|| "mean".into());
                let mut backbone = BackboneConfig::from_toml_table(b, source)?;
                if per_route && backbone.mixer.spec().routes_own_params() {
                    backbone.route_params = RouteParams::PerRoute;
                }
                VisionConfig::Vim(VimConfig {
                    image_size,
                    channels,
                    num_classes,
                    patch_size: v.patch_size,
                    patch_stride: v.patch_stride.unwrap_or(v.patch_size),
                    class_token: v.class_token,
                    pos_embed: v.pos_embed,
                    drop_path: v.drop_path,
                    backbone,
                })
            }
            ModelSection::Vmamba(mut c) => {
                if backbone.is_some() {
                    return Err(err("a VMamba model takes its sizes from [model]; remove [backbone]".into()));
                }
                let given = |v: usize| (v > 0).then_some(v);
                let size = (!c.image_size.is_zero()).then_some(c.image_size);
                let ImageShape { image_size, channels, num_classes } =
                    shape(size, given(c.channels), given(c.num_classes))?;
                (c.image_size, c.channels, c.num_classes) = (image_size, channels, num_classes);
                if c.dims.is_empty() || c.dims.len() != c.depths.len() || c.dims.contains(&0) {
                    let (dims, depths) = (&c.dims, &c.depths);
                    return Err(err(format!(
                        "[model] dims {dims:?} and depths {depths:?}: one positive size per stage"
                    )));
                }
                if c.d_conv % 2 == 0 || c.d_state == 0 || c.ssm_ratio <= 0.0 {
                    return Err(err("[model] d_conv must be odd, d_state and ssm_ratio positive".into()));
                }
                VisionConfig::VMamba(c)
            }
        };
        // Every pattern must be known and the first grid non-empty.
        let (size, patch, stride, scan) = config.grid_inputs();
        if patch.is_zero() || stride.is_zero() || patch.height > size.height || patch.width > size.width {
            return Err(err(format!(
                "[model] patch_size {patch} (stride {stride}) must be at least 1 and fit in image_size {size}"
            )));
        }
        if scan.is_empty() {
            return Err(err("[model] scan must name at least one pattern".into()));
        }
        for name in scan {
            pattern(name, patch_grid(size, patch, stride)).map_err(|e| err(format!("[model] scan: {e}")))?;
        }
        Ok(config)
    }

    /// Image size, patch size, patch stride and scan patterns.
    fn grid_inputs(&self) -> (Size2d, Size2d, Size2d, &[String]) {
        match self {
            VisionConfig::Vim(c) => (c.image_size, c.patch_size, c.patch_stride, &c.backbone.routes),
            VisionConfig::VMamba(c) => {
                let p = Size2d::square(c.patch_size);
                (c.image_size, p, p, &c.scan)
            }
        }
    }

    pub fn shape(&self) -> ImageShape {
        match self {
            VisionConfig::Vim(c) => {
                ImageShape { image_size: c.image_size, channels: c.channels, num_classes: c.num_classes }
            }
            VisionConfig::VMamba(c) => {
                ImageShape { image_size: c.image_size, channels: c.channels, num_classes: c.num_classes }
            }
        }
    }

    /// Every tensor of the model, with its initialisation and weight-decay group.
    pub fn params(&self) -> Vec<Param> {
        match self {
            VisionConfig::Vim(c) => c.params(),
            VisionConfig::VMamba(c) => c.params(),
        }
    }

    pub fn num_params(&self) -> usize {
        num_params(&self.params())
    }

    /// Fresh parameters, seeded, drawn as [`Self::params`] says.
    pub fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        init_tensors(&self.params(), &InitConfig::default(), seed)
    }
}

/// A Vim or VMamba classifier.
#[derive(Debug, Clone)]
pub enum VisionModel {
    Vim(Vim),
    VMamba(VMamba),
}

impl VisionModel {
    pub fn load(vb: VarBuilder, config: &VisionConfig) -> Result<Self> {
        Ok(match config {
            VisionConfig::Vim(c) => VisionModel::Vim(Vim::load(vb, c)?),
            VisionConfig::VMamba(c) => VisionModel::VMamba(VMamba::load(vb, c)?),
        })
    }

    /// images (batch, channels, height, width) -> logits (batch, classes). `rng`: training
    /// (drop-path on).
    pub fn forward(&self, images: &Tensor, rng: Option<&mut StdRng>) -> Result<Tensor> {
        match self {
            VisionModel::Vim(m) => m.forward(images, rng),
            VisionModel::VMamba(m) => m.forward(images, rng),
        }
    }
}
