//! Forecasting models from config. `[model] kind = "mamba"`: RevIN, then tokens, then Mamba
//! blocks (bidirectional by default), then a linear head. The tokens are either patches of each
//! variable's lookback, every variable forecast on its own (`tokens = "patch"`, as PatchTST and
//! TimeMachine), or one token per variable made from its whole lookback, the blocks running over
//! the variables (`tokens = "variate"`, as S-Mamba). `kind = "dlinear"`: the DLinear baseline,
//! a moving-average trend and the remainder, each mapped to the horizon by one linear layer.
//!
//! Every model maps a batch of lookbacks (batch, variables, lookback) of standardised values to
//! forecasts (batch, variables, horizon).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use mamba_nn::{
    init_tensors, num_params, BackboneConfig, Block, Error, Init, InitConfig, Linear, Param, Result, RmsNorm, Route,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What the data fixes: window lengths and the number of variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForecastShape {
    pub lookback: usize,
    pub horizon: usize,
    pub variables: usize,
}

/// Reversible instance normalisation (Kim et al. 2022): each lookback is standardised by its own
/// mean and std, and the forecast mapped back with them; `Affine` adds a learned scale and shift
/// per variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revin {
    None,
    Plain,
    Affine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokens {
    Patch,
    Variate,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ForecastArch {
    Mamba {
        tokens: Tokens,
        /// Patch tokens: length and step; the last patch ends at the last lookback value.
        patch_len: usize,
        patch_stride: usize,
        backbone: BackboneConfig,
    },
    DLinear {
        /// Odd moving-average width.
        moving_average: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForecastConfig {
    pub shape: ForecastShape,
    pub revin: Revin,
    pub arch: ForecastArch,
}

/// `[model] kind = "mamba"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MambaSection {
    tokens: Tokens,
    #[serde(default = "sixteen")]
    patch_len: usize,
    #[serde(default = "eight")]
    patch_stride: usize,
    #[serde(default = "plain")]
    revin: Revin,
}

/// `[model] kind = "dlinear"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DLinearSection {
    #[serde(default = "twenty_five")]
    moving_average: usize,
    #[serde(default = "none")]
    revin: Revin,
}

/// A `[model]` table's other keys as `T`, through text so that a wrong value's error shows its
/// line.
fn section<T: serde::de::DeserializeOwned>(table: toml::Table) -> std::result::Result<T, String> {
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    toml::from_str(&text).map_err(|e| e.to_string())
}

fn sixteen() -> usize {
    16
}
fn eight() -> usize {
    8
}
fn twenty_five() -> usize {
    25
}
fn plain() -> Revin {
    Revin::Plain
}
fn none() -> Revin {
    Revin::None
}

impl ForecastConfig {
    /// `[model]` and `[backbone]` tables (a training config's) for data of `shape`; `source`
    /// names the file in errors.
    pub fn from_tables(
        mut model: toml::Table,
        backbone: Option<toml::Table>,
        source: &str,
        shape: ForecastShape,
    ) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        if shape.lookback == 0 || shape.horizon == 0 || shape.variables == 0 {
            return Err(err(format!("lookback, horizon and variables must be at least 1 (got {shape:?})")));
        }
        let kind = match model.remove("kind") {
            Some(toml::Value::String(k)) => k,
            _ => return Err(err("[model] kind = \"mamba\" or \"dlinear\" is missing".into())),
        };
        let (revin, arch) = match kind.as_str() {
            "mamba" => {
                let MambaSection { tokens, patch_len, patch_stride, revin } =
                    section(model).map_err(|e| err(format!("[model] {e}")))?;
                if tokens == Tokens::Patch && (patch_len == 0 || patch_stride == 0 || patch_len > shape.lookback) {
                    return Err(err(format!(
                        "[model] patch_len {patch_len} (stride {patch_stride}) must be at least 1 and fit in the lookback ({})",
                        shape.lookback
                    )));
                }
                let mut b = backbone.ok_or_else(|| err("a Mamba forecaster needs a [backbone] section".into()))?;
                // Bidirectional by default (over patches or over variables), each route its own
                // SSM, the outputs averaged.
                b.entry("routes").or_insert_with(|| toml::Value::Array(vec!["forward".into(), "reverse".into()]));
                b.entry("route_params").or_insert_with(|| "per_route".into());
                b.entry("merge").or_insert_with(|| "mean".into());
                let backbone = BackboneConfig::from_toml_table(b, source)?;
                Route::by_names(&backbone.routes).map_err(|e| err(format!("[backbone] {e}")))?;
                (revin, ForecastArch::Mamba { tokens, patch_len, patch_stride, backbone })
            }
            "dlinear" => {
                let DLinearSection { moving_average, revin } =
                    section(model).map_err(|e| err(format!("[model] {e}")))?;
                if backbone.is_some() {
                    return Err(err("a DLinear model has no Mamba blocks; remove [backbone]".into()));
                }
                if moving_average % 2 == 0 {
                    return Err(err(format!("[model] moving_average must be odd (got {moving_average})")));
                }
                (revin, ForecastArch::DLinear { moving_average })
            }
            other => return Err(err(format!("[model] kind = {other:?}: a forecaster is \"mamba\" or \"dlinear\""))),
        };
        Ok(Self { shape, revin, arch })
    }

    /// Patch tokens per variable (patch models).
    pub fn patches(&self) -> usize {
        match self.arch {
            ForecastArch::Mamba { tokens: Tokens::Patch, patch_len, patch_stride, .. } => {
                (self.shape.lookback - patch_len) / patch_stride + 1
            }
            _ => 0,
        }
    }

    /// Mamba models: the embedding's input size (a patch or a whole lookback) and the head's
    /// (every patch token, or one variate token).
    fn token_sizes(&self) -> (usize, usize) {
        match &self.arch {
            ForecastArch::Mamba { tokens: Tokens::Patch, patch_len, backbone, .. } => {
                (*patch_len, self.patches() * backbone.d_model)
            }
            ForecastArch::Mamba { backbone, .. } => (self.shape.lookback, backbone.d_model),
            ForecastArch::DLinear { .. } => (0, 0),
        }
    }

    /// Every tensor, drawn as the reference models draw them: Mamba blocks as mamba_ssm's,
    /// linear layers as PyTorch's (U(±1/sqrt(fan_in)) for weight and bias), the position
    /// embedding U(±0.02) as PatchTST's, norms and RevIN's scale one, its shift zero.
    pub fn params(&self) -> Vec<Param> {
        let ForecastShape { lookback, horizon, variables } = self.shape;
        let mut out = vec![];
        if self.revin == Revin::Affine {
            out.push(Param::new("revin.weight", vec![variables], Init::Ones));
            out.push(Param::new("revin.bias", vec![variables], Init::Zeros).no_decay());
        }
        let linear = |name: &str, o: usize, i: usize| {
            let [weight, bias] = Param::torch_layer(name, vec![o, i]);
            [weight.matrix(), bias]
        };
        match &self.arch {
            ForecastArch::Mamba { tokens, backbone, .. } => {
                let d = backbone.d_model;
                let (token_in, head_in) = self.token_sizes();
                out.extend(linear("embed", d, token_in));
                out.extend(linear("head", horizon, head_in));
                if *tokens == Tokens::Patch {
                    out.push(Param::new("pos_embed", vec![self.patches(), d], Init::Uniform(0.02)).no_decay());
                }
                out.push(Param::new("norm_f.weight", vec![d], Init::Ones).no_decay());
                for i in 0..backbone.n_layer {
                    out.extend(Block::params(backbone).into_iter().map(|p| p.under(&format!("layers.{i}"))));
                }
            }
            ForecastArch::DLinear { .. } => {
                out.extend(linear("linear_seasonal", horizon, lookback));
                out.extend(linear("linear_trend", horizon, lookback));
            }
        }
        out
    }

    pub fn num_params(&self) -> usize {
        num_params(&self.params())
    }

    /// Fresh parameters, seeded, drawn as [`Self::params`] says.
    pub fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        init_tensors(&self.params(), &InitConfig::default(), seed)
    }
}

#[derive(Debug, Clone)]
enum Body {
    Mamba {
        /// Patch tokens: the lookback positions of each patch, (patches * patch_len); none for
        /// variate tokens.
        patch_index: Option<Tensor>,
        embed: Linear,
        pos_embed: Option<Tensor>,
        layers: Vec<Block>,
        norm_f: RmsNorm,
        head: Linear,
    },
    DLinear {
        /// (lookback, lookback): trend = x A^T, the moving average with the ends repeated.
        average: Tensor,
        seasonal: Linear,
        trend: Linear,
    },
}

#[derive(Debug, Clone)]
pub struct ForecastModel {
    config: ForecastConfig,
    /// RevIN's affine scale and shift, (variables).
    affine: Option<(Tensor, Tensor)>,
    body: Body,
}

const REVIN_EPS: f64 = 1e-5;

impl ForecastModel {
    pub fn load(vb: VarBuilder, config: &ForecastConfig) -> Result<Self> {
        let ForecastShape { lookback, horizon, variables } = config.shape;
        let affine = match config.revin {
            Revin::Affine => Some((vb.get(variables, "revin.weight")?, vb.get(variables, "revin.bias")?)),
            _ => None,
        };
        let body = match &config.arch {
            ForecastArch::Mamba { tokens, patch_len, patch_stride, backbone } => {
                let (d, n) = (backbone.d_model, config.patches());
                let (token_in, head_in) = config.token_sizes();
                let routes = Route::by_names(&backbone.routes)?;
                let patch_index = (*tokens == Tokens::Patch).then(|| {
                    // Patches end-aligned: the newest values are always in a token.
                    let first = lookback - (n - 1) * patch_stride - patch_len;
                    let idx: Vec<u32> = (0..n)
                        .flat_map(|p| (0..*patch_len).map(move |j| (first + p * patch_stride + j) as u32))
                        .collect();
                    Tensor::from_vec(idx, n * patch_len, vb.device())
                });
                Body::Mamba {
                    patch_index: patch_index.transpose()?,
                    embed: Linear::load(&vb, "embed", (d, token_in), true)?,
                    pos_embed: (*tokens == Tokens::Patch).then(|| vb.get((n, d), "pos_embed")).transpose()?,
                    layers: (0..backbone.n_layer)
                        .map(|i| Block::load_routed(vb.pp(format!("layers.{i}")), backbone, routes.clone()))
                        .collect::<Result<_>>()?,
                    norm_f: RmsNorm::new(vb.get(d, "norm_f.weight")?, backbone.norm_eps),
                    head: Linear::load(&vb, "head", (horizon, head_in), true)?,
                }
            }
            ForecastArch::DLinear { moving_average } => Body::DLinear {
                average: Tensor::from_vec(
                    moving_average_matrix(lookback, *moving_average),
                    (lookback, lookback),
                    vb.device(),
                )?,
                seasonal: Linear::load(&vb, "linear_seasonal", (horizon, lookback), true)?,
                trend: Linear::load(&vb, "linear_trend", (horizon, lookback), true)?,
            },
        };
        Ok(Self { config: config.clone(), affine, body })
    }

    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// x (batch, variables, lookback) -> (batch, variables, horizon).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ForecastShape { lookback, horizon, variables } = self.config.shape;
        let (batch, v, l) = x.dims3()?;
        if (v, l) != (variables, lookback) {
            return Err(Error::Config {
                path: "input".into(),
                message: format!(
                    "lookbacks of {v} variables x {l} steps; the model is built for {variables} x {lookback}"
                ),
            });
        }
        let (x, stats) = match self.config.revin {
            Revin::None => (x.clone(), None),
            _ => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let std = (centred.sqr()?.mean_keepdim(D::Minus1)? + REVIN_EPS)?.sqrt()?;
                let mut z = centred.broadcast_div(&std)?;
                if let Some((w, b)) = &self.affine {
                    z = z
                        .broadcast_mul(&w.reshape((1, variables, 1))?)?
                        .broadcast_add(&b.reshape((1, variables, 1))?)?;
                }
                (z, Some((mean, std)))
            }
        };
        let y = match &self.body {
            Body::Mamba { patch_index, embed, pos_embed, layers, norm_f, head } => {
                let h = match patch_index {
                    // Every variable on its own: (batch * variables, patches, patch_len).
                    Some(index) => {
                        let patches = x.reshape((batch * variables, lookback))?.index_select(index, 1)?;
                        embed.forward(&patches.reshape((batch * variables, self.config.patches(), ()))?)?
                    }
                    None => embed.forward(&x)?,
                };
                let mut h = match pos_embed {
                    Some(p) => h.broadcast_add(p)?,
                    None => h,
                };
                for layer in layers {
                    h = layer.forward(&h)?.0;
                }
                let h = norm_f.forward(&h)?;
                // Patch tokens: the head reads all of a variable's tokens at once.
                let h = if patch_index.is_some() { h.flatten_from(1)? } else { h };
                head.forward(&h)?.reshape((batch, variables, horizon))?
            }
            Body::DLinear { average, seasonal, trend } => {
                let rows = x.reshape((batch * variables, lookback))?;
                let t = rows.matmul(&average.t()?)?;
                let s = (&rows - &t)?;
                (seasonal.forward(&s)? + trend.forward(&t)?)?.reshape((batch, variables, horizon))?
            }
        };
        Ok(match stats {
            None => y,
            Some((mean, std)) => {
                let y = match &self.affine {
                    Some((w, b)) => y
                        .broadcast_sub(&b.reshape((1, variables, 1))?)?
                        .broadcast_div(&(w.reshape((1, variables, 1))? + REVIN_EPS * REVIN_EPS)?)?,
                    None => y,
                };
                y.broadcast_mul(&std)?.broadcast_add(&mean)?
            }
        })
    }
}

/// The (len, len) matrix of a centred moving average of odd `width` whose window is filled with
/// the first and last values where it passes the ends (DLinear's series decomposition).
pub fn moving_average_matrix(len: usize, width: usize) -> Vec<f32> {
    let half = (width / 2) as isize;
    let mut a = vec![0f32; len * len];
    for t in 0..len {
        for o in -half..=half {
            let j = (t as isize + o).clamp(0, len as isize - 1) as usize;
            a[t * len + j] += 1.0 / width as f32;
        }
    }
    a
}
