//! Forecasting models from config. `[model] kind = "mamba"`: RevIN, then tokens, then Mamba
//! blocks (bidirectional by default), then a linear head. The tokens are either patches of each
//! variable's lookback, every variable forecast on its own (`tokens = "patch"`, as PatchTST and
//! TimeMachine), or one token per variable made from its whole lookback, the blocks running over
//! the variables (`tokens = "variate"`, as S-Mamba). `kind = "dlinear"`: the DLinear baseline,
//! a moving-average trend and the remainder, each mapped to the horizon by one linear layer.
//!
//! Every model maps a batch of lookbacks (batch, variables, lookback) of standardised values to
//! forecasts (batch, variables, horizon).

use candle_core::{Device, Tensor, D};
use candle_nn::VarBuilder;
use mamba_nn::{init_tensor, BackboneConfig, Block, Error, InitConfig, Linear, Result, RmsNorm, Route};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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

    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let ForecastShape { lookback, horizon, variables } = self.shape;
        let mut out: Vec<(String, Vec<usize>)> = vec![];
        if self.revin == Revin::Affine {
            out.push(("revin.weight".into(), vec![variables]));
            out.push(("revin.bias".into(), vec![variables]));
        }
        let mut linear = |name: &str, o: usize, i: usize| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        match &self.arch {
            ForecastArch::Mamba { tokens, backbone, .. } => {
                let d = backbone.d_model;
                let (token_in, head_in) = self.token_sizes();
                linear("embed", d, token_in);
                linear("head", horizon, head_in);
                if *tokens == Tokens::Patch {
                    out.push(("pos_embed".into(), vec![self.patches(), d]));
                }
                out.push(("norm_f.weight".into(), vec![d]));
                for i in 0..backbone.n_layer {
                    out.extend(Block::tensor_shapes(backbone).into_iter().map(|(n, s)| (format!("layers.{i}.{n}"), s)));
                }
            }
            ForecastArch::DLinear { .. } => {
                linear("linear_seasonal", horizon, lookback);
                linear("linear_trend", horizon, lookback);
            }
        }
        out
    }

    pub fn num_params(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Fresh parameters, seeded: Mamba blocks as mamba_ssm initialises them, linear layers as
    /// PyTorch's (U(+-1/sqrt(fan_in)) for weight and bias), the position embedding U(+-0.02) as
    /// PatchTST's, norms and RevIN's scale one, its shift zero.
    pub fn init_params(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let init = InitConfig::default();
        let shapes = self.tensor_shapes();
        let fan_in: HashMap<String, usize> =
            shapes.iter().filter(|(_, s)| s.len() == 2).map(|(n, s)| (n.replace(".weight", ""), s[1])).collect();
        let mut out = HashMap::new();
        for (name, shape) in shapes {
            let numel: usize = shape.iter().product();
            let mut uniform = |bound: f64| (0..numel).map(|_| rng.random_range(-bound..=bound) as f32).collect();
            let values: Vec<f32> = match (&self.arch, name.as_str()) {
                (ForecastArch::Mamba { backbone, .. }, n) if n.starts_with("layers.") => {
                    let t = init_tensor(n, &shape, backbone, &init, &mut rng)?;
                    out.insert(name, t);
                    continue;
                }
                (_, "revin.bias") => vec![0.0; numel],
                (_, "revin.weight" | "norm_f.weight") => vec![1.0; numel],
                (_, "pos_embed") => uniform(0.02),
                (_, n) => {
                    let layer = n.trim_end_matches(".weight").trim_end_matches(".bias");
                    let fan = fan_in.get(layer).copied().ok_or_else(|| Error::Config {
                        path: name.clone(),
                        message: "no initialisation rule".into(),
                    })?;
                    uniform(1.0 / (fan as f64).sqrt())
                }
            };
            out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Ok(out)
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
