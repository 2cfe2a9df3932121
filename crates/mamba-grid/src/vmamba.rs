//! A VMamba-style hierarchical classifier (Liu et al. 2024): a patch stem, stages of VSS
//! blocks at falling resolution with a downsampling layer between stages, then LayerNorm, mean
//! pooling and a linear head.
//!
//! A VSS block is h + SS2D(LN(h)) followed, when `mlp_ratio` > 0, by h + MLP(LN(h)). SS2D:
//! in_proj -> depthwise 3x3 conv + SiLU over the 2-d grid -> the cross-scan (each scan pattern a
//! route with its own dt, B, C, A, D; by default raster, column and their reverses) -> the
//! routes' outputs put back in grid order and summed -> LayerNorm -> (x SiLU(z) when `gate`) ->
//! out_proj. All routes run as one selective scan over route-stacked channels, B and C grouped
//! per route, as the reference CUDA code does.

use crate::layers::{depthwise_conv2d, drop_path, patch_grid, LayerNorm, PatchEmbed, Size2d};
use crate::scan::{pattern, Grid};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use mamba_nn::{inverse, Init, Linear, Param, Result};
use mamba_ssm::{selective_scan, ScanParams};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// The layer between two stages, which halves the grid and doubles the channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    /// 3x3 conv with stride 2, then LayerNorm (VMamba v2).
    #[default]
    Conv,
    /// Swin's patch merging: each 2x2 cell's four vectors concatenated, LayerNorm, linear 4C -> 2C
    /// (VMamba v0).
    Merge,
}

/// The `[model]` of `kind = "vmamba"`, with VMamba-T v2's choices as defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VMambaConfig {
    #[serde(default)]
    pub image_size: Size2d,
    #[serde(default)]
    pub channels: usize,
    #[serde(default)]
    pub num_classes: usize,
    #[serde(default = "four")]
    pub patch_size: usize,
    /// Channels and blocks of each stage.
    pub dims: Vec<usize>,
    pub depths: Vec<usize>,
    #[serde(default = "one")]
    pub d_state: usize,
    /// SS2D inner channels = round(ssm_ratio x channels).
    #[serde(default = "one_f")]
    pub ssm_ratio: f64,
    /// 0: ceil(channels / 16) per stage.
    #[serde(default)]
    pub dt_rank: usize,
    /// The depthwise conv's kernel size (odd).
    #[serde(default = "three")]
    pub d_conv: usize,
    #[serde(default)]
    pub conv_bias: bool,
    /// Gate the SS2D output with SiLU(z) (VMamba v0); VMamba-T v2 has no gate.
    #[serde(default)]
    pub gate: bool,
    /// MLP hidden = mlp_ratio x channels; 0 for no MLP.
    #[serde(default = "four_f")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub downsample: Downsample,
    #[serde(default)]
    pub drop_path: f64,
    /// The cross-scan's patterns, one route each.
    #[serde(default = "cross_scan")]
    pub scan: Vec<String>,
    #[serde(default = "eps")]
    pub norm_eps: f64,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one_f() -> f64 {
    1.0
}
fn four_f() -> f64 {
    4.0
}
fn eps() -> f64 {
    1e-5
}
fn cross_scan() -> Vec<String> {
    ["raster", "column", "reverse_raster", "reverse_column"].map(String::from).to_vec()
}

impl VMambaConfig {
    /// The patch grid of each stage.
    pub fn grids(&self) -> Vec<Grid> {
        let p = Size2d::square(self.patch_size);
        let mut g = patch_grid(self.image_size, p, p);
        (0..self.dims.len())
            .map(|_| {
                let grid = g;
                g = Grid::new(g.rows.div_ceil(2), g.cols.div_ceil(2));
                grid
            })
            .collect()
    }

    fn d_inner(&self, dim: usize) -> usize {
        (self.ssm_ratio * dim as f64).round() as usize
    }

    fn dt_rank(&self, dim: usize) -> usize {
        if self.dt_rank == 0 {
            dim.div_ceil(16)
        } else {
            self.dt_rank
        }
    }

    /// Every tensor, drawn as the VMamba code draws it: linear layers N(0, 0.02) with zero
    /// biases, LayerNorms one and zero, convs as PyTorch's, SS2D's x_proj and dt_proj
    /// U(±1/sqrt(fan_in)) and its dt, A and D as Mamba's. Weight decay as in the Swin optimizer
    /// VMamba trains with: biases and one-dimensional tensors are exempt, every other tensor
    /// decays (A_logs and dt_projs_bias too).
    pub fn params(&self) -> Vec<Param> {
        let (c0, p) = (self.dims[0], self.patch_size);
        let norm = |name: &str, c: usize| {
            [
                Param::new(format!("{name}.weight"), vec![c], Init::Ones).no_decay(),
                Param::new(format!("{name}.bias"), vec![c], Init::Zeros).no_decay(),
            ]
        };
        let linear = |name: &str, shape: Vec<usize>| Param::new(name, shape, Init::Normal(0.02)).matrix();
        let linear_bias = |name: &str, c: usize| Param::new(name, vec![c], Init::Zeros).no_decay();
        let mut out = Vec::from(Param::torch_layer("patch_embed.proj", vec![c0, self.channels, p, p]));
        out.extend(norm("patch_embed.norm", c0));
        let k = self.scan.len();
        for (s, (&c, &depth)) in self.dims.iter().zip(&self.depths).enumerate() {
            let (di, r, n) = (self.d_inner(c), self.dt_rank(c), self.d_state);
            for b in 0..depth {
                let p = format!("layers.{s}.blocks.{b}");
                out.extend(norm(&format!("{p}.norm"), c));
                out.push(linear(&format!("{p}.op.in_proj.weight"), vec![di * (1 + usize::from(self.gate)), c]));
                let [conv_weight, conv_bias] =
                    Param::torch_layer(&format!("{p}.op.conv2d"), vec![di, 1, self.d_conv, self.d_conv]);
                out.push(conv_weight);
                if self.conv_bias {
                    out.push(conv_bias);
                }
                let per_route = |name: &str, shape: Vec<usize>| {
                    let bound = 1.0 / (shape[2] as f64).sqrt();
                    Param::new(format!("{p}.op.{name}"), shape, Init::Uniform(bound))
                };
                out.push(per_route("x_proj_weight", vec![k, r + 2 * n, di]));
                out.push(per_route("dt_projs_weight", vec![k, di, r]));
                out.push(Param::new(format!("{p}.op.dt_projs_bias"), vec![k, di], Init::DtBias));
                out.push(Param::new(format!("{p}.op.A_logs"), vec![k * di, n], Init::S4dReal));
                out.push(Param::new(format!("{p}.op.Ds"), vec![k * di], Init::Ones).no_decay());
                out.extend(norm(&format!("{p}.op.out_norm"), di));
                out.push(linear(&format!("{p}.op.out_proj.weight"), vec![c, di]));
                if self.mlp_ratio > 0.0 {
                    let hidden = (self.mlp_ratio * c as f64).round() as usize;
                    out.extend(norm(&format!("{p}.norm2"), c));
                    out.push(linear(&format!("{p}.mlp.fc1.weight"), vec![hidden, c]));
                    out.push(linear_bias(&format!("{p}.mlp.fc1.bias"), hidden));
                    out.push(linear(&format!("{p}.mlp.fc2.weight"), vec![c, hidden]));
                    out.push(linear_bias(&format!("{p}.mlp.fc2.bias"), c));
                }
            }
            if s + 1 < self.dims.len() {
                let (p, next) = (format!("layers.{s}.downsample"), self.dims[s + 1]);
                match self.downsample {
                    Downsample::Conv => {
                        out.extend(Param::torch_layer(&format!("{p}.conv"), vec![next, c, 3, 3]));
                        out.extend(norm(&format!("{p}.norm"), next));
                    }
                    Downsample::Merge => {
                        out.extend(norm(&format!("{p}.norm"), 4 * c));
                        out.push(linear(&format!("{p}.reduction.weight"), vec![next, 4 * c]));
                    }
                }
            }
        }
        let last = *self.dims.last().unwrap_or(&c0);
        out.extend(norm("classifier.norm", last));
        out.push(linear("classifier.head.weight", vec![self.num_classes, last]));
        out.push(linear_bias("classifier.head.bias", self.num_classes));
        out
    }
}

fn layer_norm(vb: &VarBuilder, name: &str, c: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(c, &format!("{name}.weight"))?, vb.get(c, &format!("{name}.bias"))?, eps))
}

/// SS2D: the 2-d selective scan of a VSS block, over one grid.
#[derive(Debug, Clone)]
pub struct Ss2d {
    in_proj: Linear,
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    /// Per route k: x_proj (k, dt_rank + 2 d_state, d_inner), dt_proj (k, d_inner, dt_rank) and
    /// its bias (k, d_inner); A_log (k d_inner, d_state) and D (k d_inner), route-major.
    x_proj: Tensor,
    dt_proj: Tensor,
    dt_bias: Tensor,
    a_log: Tensor,
    d: Tensor,
    out_norm: LayerNorm,
    out_proj: Linear,
    gate: bool,
    grid: Grid,
    /// Each route's order over the grid and its inverse, as index tensors (made once, at load).
    orders: Vec<(Tensor, Tensor)>,
}

impl Ss2d {
    /// The SS2D of a block of width `dim` over `grid`.
    pub fn load(vb: VarBuilder, cfg: &VMambaConfig, dim: usize, grid: Grid) -> Result<Self> {
        let (di, r, n, k) = (cfg.d_inner(dim), cfg.dt_rank(dim), cfg.d_state, cfg.scan.len());
        let kc = cfg.d_conv;
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (di * (1 + usize::from(cfg.gate)), dim), false)?,
            conv_weight: vb.get((di, 1, kc, kc), "conv2d.weight")?,
            conv_bias: if cfg.conv_bias { Some(vb.get(di, "conv2d.bias")?) } else { None },
            x_proj: vb.get((k, r + 2 * n, di), "x_proj_weight")?,
            dt_proj: vb.get((k, di, r), "dt_projs_weight")?,
            dt_bias: vb.get((k, di), "dt_projs_bias")?,
            a_log: vb.get((k * di, n), "A_logs")?,
            d: vb.get(k * di, "Ds")?,
            out_norm: layer_norm(&vb, "out_norm", di, cfg.norm_eps)?,
            out_proj: Linear::load(&vb, "out_proj", (dim, di), false)?,
            gate: cfg.gate,
            grid,
            orders: cfg
                .scan
                .iter()
                .map(|name| {
                    let order = pattern(name, grid)?;
                    let index = |o: &[u32]| Tensor::new(o, &Device::Cpu)?.to_device(vb.device());
                    Ok((index(&order)?, index(&inverse(&order))?))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The same SS2D reduced to its route `k` alone (its own parameters, the shared ones kept):
    /// the cross-scan's output is the sum of these routes' outputs.
    pub fn route(&self, k: usize) -> Result<Self> {
        let di = self.d.dim(0)? / self.orders.len();
        Ok(Self {
            x_proj: self.x_proj.narrow(0, k, 1)?,
            dt_proj: self.dt_proj.narrow(0, k, 1)?,
            dt_bias: self.dt_bias.narrow(0, k, 1)?,
            a_log: self.a_log.narrow(0, k * di, di)?,
            d: self.d.narrow(0, k * di, di)?,
            orders: vec![self.orders[k].clone()],
            ..self.clone()
        })
    }

    /// The cross-scan: u (batch, d_inner, rows * cols), raster order -> the routes' outputs,
    /// each put back in raster order, summed: (batch, d_inner, rows * cols).
    pub fn cross_scan(&self, u: &Tensor) -> Result<Tensor> {
        let (batch, di, len) = u.dims3()?;
        let (k, r) = (self.orders.len(), self.dt_proj.dim(2)?);
        let n = self.a_log.dim(1)?;
        let u = u.contiguous()?;
        let xs = self.orders.iter().map(|(o, _)| u.index_select(o, 2)).collect::<candle_core::Result<Vec<_>>>()?;
        let xs = Tensor::stack(&xs, 1)?; // (batch, k, d_inner, len)
        let x_dbl = self.x_proj.unsqueeze(0)?.broadcast_matmul(&xs)?; // (batch, k, r + 2n, len)
        let dt = self.dt_proj.unsqueeze(0)?.broadcast_matmul(&x_dbl.narrow(2, 0, r)?)?;
        let (b, c) = (x_dbl.narrow(2, r, n)?.contiguous()?, x_dbl.narrow(2, r + n, n)?.contiguous()?);
        let a = self.a_log.exp()?.neg()?;
        let bias = self.dt_bias.flatten_all()?;
        let params = ScanParams { d: Some(&self.d), z: None, delta_bias: Some(&bias), delta_softplus: true };
        let y = selective_scan(
            &xs.reshape((batch, k * di, len))?,
            &dt.reshape((batch, k * di, len))?,
            &a,
            &b,
            &c,
            &params,
            None,
        )?
        .y
        .reshape((batch, k, di, len))?;
        let mut merged: Option<Tensor> = None;
        for (i, (_, back_order)) in self.orders.iter().enumerate() {
            let back = y.narrow(1, i, 1)?.squeeze(1)?.contiguous()?.index_select(back_order, 2)?;
            merged = Some(match merged {
                Some(m) => (m + back)?,
                None => back,
            });
        }
        merged.ok_or_else(|| mamba_nn::Error::Config {
            path: "scan".into(),
            message: "SS2D needs at least one route".into(),
        })
    }

    /// x: (batch, rows * cols, channels) -> (batch, rows * cols, channels).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let di = self.d.dim(0)? / self.orders.len();
        let xz = self.in_proj.forward(x)?;
        let grid = (batch, di, self.grid.rows, self.grid.cols);
        let u = xz.narrow(2, 0, di)?.transpose(1, 2)?.reshape(grid)?;
        let u = depthwise_conv2d(&u, &self.conv_weight, self.conv_bias.as_ref())?.silu()?;
        let y = self.cross_scan(&u.reshape((batch, di, len))?)?.transpose(1, 2)?;
        let mut y = self.out_norm.forward(&y)?;
        if self.gate {
            y = (y * xz.narrow(2, di, di)?.silu()?)?;
        }
        self.out_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
struct VssBlock {
    norm: LayerNorm,
    op: Ss2d,
    mlp: Option<Mlp>,
    drop_path: f64,
}

impl VssBlock {
    fn forward(&self, h: &Tensor, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        let y = self.op.forward(&self.norm.forward(h)?)?;
        let mut h = (h + drop_path(&y, self.drop_path, rng.as_deref_mut())?)?;
        if let Some(m) = &self.mlp {
            let y = m.fc2.forward(&m.fc1.forward(&m.norm.forward(&h)?)?.gelu_erf()?)?;
            h = (&h + drop_path(&y, self.drop_path, rng)?)?;
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
enum DownsampleLayer {
    Conv { weight: Tensor, bias: Tensor, norm: LayerNorm },
    Merge { norm: LayerNorm, reduction: Linear },
}

impl DownsampleLayer {
    /// (batch, rows * cols, c) over `grid` -> (batch, ceil(rows/2) * ceil(cols/2), 2c).
    fn forward(&self, x: &Tensor, grid: Grid) -> Result<Tensor> {
        let (batch, _, c) = x.dims3()?;
        match self {
            DownsampleLayer::Conv { weight, bias, norm } => {
                let x = x.transpose(1, 2)?.reshape((batch, c, grid.rows, grid.cols))?;
                let y = x.conv2d(weight, 1, 2, 1, 1)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
                norm.forward(&y.flatten_from(2)?.transpose(1, 2)?)
            }
            DownsampleLayer::Merge { norm, reduction } => {
                let (rows, cols) = (grid.rows.div_ceil(2), grid.cols.div_ceil(2));
                let x = x.reshape((batch, grid.rows, grid.cols, c))?;
                let x = x.pad_with_zeros(1, 0, 2 * rows - grid.rows)?.pad_with_zeros(2, 0, 2 * cols - grid.cols)?;
                // Swin's order of the four: (0,0), (1,0), (0,1), (1,1) as (row, col) offsets.
                let x = x.reshape((batch, rows, 2, cols, 2, c))?.permute((0, 1, 3, 4, 2, 5))?;
                let x = x.contiguous()?.reshape((batch, rows * cols, 4 * c))?;
                reduction.forward(&norm.forward(&x)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct VMamba {
    cfg: VMambaConfig,
    patch_embed: PatchEmbed,
    stem_norm: LayerNorm,
    stages: Vec<(Vec<VssBlock>, Option<DownsampleLayer>)>,
    norm: LayerNorm,
    head: Linear,
}

impl VMamba {
    pub fn load(vb: VarBuilder, cfg: &VMambaConfig) -> Result<Self> {
        let (c0, p, eps) = (cfg.dims[0], cfg.patch_size, cfg.norm_eps);
        let total: usize = cfg.depths.iter().sum();
        let rate = |i: usize| if total > 1 { cfg.drop_path * i as f64 / (total - 1) as f64 } else { 0.0 };
        let mut seen = 0;
        let mut stages = vec![];
        for (s, ((&c, &depth), grid)) in cfg.dims.iter().zip(&cfg.depths).zip(cfg.grids()).enumerate() {
            let vs = vb.pp(format!("layers.{s}"));
            let mut blocks = vec![];
            for b in 0..depth {
                let vb = vs.pp(format!("blocks.{b}"));
                let mlp = if cfg.mlp_ratio > 0.0 {
                    let hidden = (cfg.mlp_ratio * c as f64).round() as usize;
                    Some(Mlp {
                        norm: layer_norm(&vb, "norm2", c, eps)?,
                        fc1: Linear::load(&vb, "mlp.fc1", (hidden, c), true)?,
                        fc2: Linear::load(&vb, "mlp.fc2", (c, hidden), true)?,
                    })
                } else {
                    None
                };
                blocks.push(VssBlock {
                    norm: layer_norm(&vb, "norm", c, eps)?,
                    op: Ss2d::load(vb.pp("op"), cfg, c, grid)?,
                    mlp,
                    drop_path: rate(seen),
                });
                seen += 1;
            }
            let down = match cfg.dims.get(s + 1) {
                None => None,
                Some(&next) => {
                    let vd = vs.pp("downsample");
                    Some(match cfg.downsample {
                        Downsample::Conv => DownsampleLayer::Conv {
                            weight: vd.get((next, c, 3, 3), "conv.weight")?,
                            bias: vd.get(next, "conv.bias")?,
                            norm: layer_norm(&vd, "norm", next, eps)?,
                        },
                        Downsample::Merge => DownsampleLayer::Merge {
                            norm: layer_norm(&vd, "norm", 4 * c, eps)?,
                            reduction: Linear::load(&vd, "reduction", (next, 4 * c), false)?,
                        },
                    })
                }
            };
            stages.push((blocks, down));
        }
        let last = *cfg.dims.last().unwrap_or(&c0);
        Ok(Self {
            patch_embed: PatchEmbed::new(
                &vb.get((c0, cfg.channels, p, p), "patch_embed.proj.weight")?,
                vb.get(c0, "patch_embed.proj.bias")?,
                Size2d::square(p),
            )?,
            stem_norm: layer_norm(&vb, "patch_embed.norm", c0, eps)?,
            stages,
            norm: layer_norm(&vb, "classifier.norm", last, eps)?,
            head: Linear::load(&vb, "classifier.head", (cfg.num_classes, last), true)?,
            cfg: cfg.clone(),
        })
    }

    /// images (batch, channels, height, width) -> logits (batch, classes). With `rng` (training),
    /// drop-path is on.
    pub fn forward(&self, images: &Tensor, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        let (x, grid) = self.patch_embed.forward(images)?;
        let grids = self.cfg.grids();
        if grid != grids[0] {
            let (_, _, h, w) = images.dims4()?;
            return Err(mamba_nn::Error::Config {
                path: "images".into(),
                message: format!("{h}x{w} images; the model is built for {}", self.cfg.image_size),
            });
        }
        let mut h = self.stem_norm.forward(&x)?;
        for ((blocks, down), grid) in self.stages.iter().zip(grids) {
            for block in blocks {
                h = block.forward(&h, rng.as_deref_mut())?;
            }
            if let Some(down) = down {
                h = down.forward(&h, grid)?;
            }
        }
        self.head.forward(&self.norm.forward(&h)?.mean(1)?)
    }
}
