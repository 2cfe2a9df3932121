//! Vision Mamba (Vim, Zhu et al. 2024): patch embedding, a class token (head, middle or none),
//! a learned position embedding, a stack of Mamba blocks whose routes are 2-d scan patterns
//! (Vim: `raster` and `reverse_raster` with their own SSM parameters, outputs averaged), the
//! final RMSNorm and a linear head on the class token (or the mean of the patch tokens).
//!
//! Tensor names follow the Vim code: `patch_embed.proj`, `cls_token`, `pos_embed`,
//! `layers.{i}.norm`, `layers.{i}.mixer.*` (with `_b` for the backward route), `norm_f`, `head`.

use crate::layers::{drop_path, patch_grid, resize_grid, PatchEmbed, Size2d};
use crate::scan::{route, ClassToken, Grid};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_nn::{BackboneConfig, Block, Error, Init, Linear, Param, Result, RmsNorm};
use rand::rngs::StdRng;

#[derive(Debug, Clone, PartialEq)]
pub struct VimConfig {
    pub image_size: Size2d,
    pub channels: usize,
    pub num_classes: usize,
    pub patch_size: Size2d,
    /// Patch stride: the patch size for non-overlapping patches, less for overlapping ones.
    pub patch_stride: Size2d,
    pub class_token: ClassToken,
    pub pos_embed: bool,
    /// Stochastic depth: the rate rises linearly from 0 at the first block to this at the last.
    pub drop_path: f64,
    /// The blocks: `routes` holds the scan pattern names (see `crate::pattern`).
    pub backbone: BackboneConfig,
}

impl VimConfig {
    pub fn grid(&self) -> Grid {
        patch_grid(self.image_size, self.patch_size, self.patch_stride)
    }

    /// Tokens per image: the patches and the class token.
    pub fn tokens(&self) -> usize {
        let g = self.grid();
        self.class_token.tokens(g.rows * g.cols)
    }

    /// Every tensor, drawn as the Vim code draws it: the patch embedding as PyTorch's conv; class
    /// token, position embedding and head weight N(0, 0.02) (timm's trunc_normal_, whose bounds
    /// of ±2 lie a hundred deviations out); the head's bias zero; the blocks as mamba_ssm's.
    pub fn params(&self) -> Vec<Param> {
        let (d, p, c) = (self.backbone.d_model, self.patch_size, self.channels);
        let mut out = Vec::from(Param::torch_layer("patch_embed.proj", vec![d, c, p.height, p.width]));
        out.extend([
            Param::new("norm_f.weight", vec![d], Init::Ones).no_decay(),
            Param::new("head.weight", vec![self.num_classes, d], Init::Normal(0.02)).matrix(),
            Param::new("head.bias", vec![self.num_classes], Init::Zeros).no_decay(),
        ]);
        if self.class_token != ClassToken::None {
            out.push(Param::new("cls_token", vec![1, 1, d], Init::Normal(0.02)).no_decay());
        }
        if self.pos_embed {
            out.push(Param::new("pos_embed", vec![1, self.tokens(), d], Init::Normal(0.02)).no_decay());
        }
        for i in 0..self.backbone.n_layer {
            out.extend(Block::params(&self.backbone).into_iter().map(|p| p.under(&format!("layers.{i}"))));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Vim {
    cfg: VimConfig,
    patch_embed: PatchEmbed,
    cls_token: Option<Tensor>,
    pos_embed: Option<Tensor>,
    layers: Vec<Block>,
    norm_f: RmsNorm,
    head: Linear,
}

impl Vim {
    pub fn load(vb: VarBuilder, cfg: &VimConfig) -> Result<Self> {
        let (d, p, c) = (cfg.backbone.d_model, cfg.patch_size, cfg.channels);
        // One set of routes over the grid, shared by every layer.
        let routes = cfg
            .backbone
            .routes
            .iter()
            .map(|name| route(name, cfg.grid(), cfg.class_token))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..cfg.backbone.n_layer)
            .map(|i| Block::load_routed(vb.pp(format!("layers.{i}")), &cfg.backbone, routes.clone()))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(
                &vb.get((d, c, p.height, p.width), "patch_embed.proj.weight")?,
                vb.get(d, "patch_embed.proj.bias")?,
                cfg.patch_stride,
            )?,
            cls_token: match cfg.class_token {
                ClassToken::None => None,
                _ => Some(vb.get((1, 1, d), "cls_token")?),
            },
            pos_embed: if cfg.pos_embed { Some(vb.get((1, cfg.tokens(), d), "pos_embed")?) } else { None },
            layers,
            norm_f: RmsNorm::new(vb.get(d, "norm_f.weight")?, cfg.backbone.norm_eps),
            head: Linear::new(
                vb.get((cfg.num_classes, d), "head.weight")?,
                Some(vb.get(cfg.num_classes, "head.bias")?),
            ),
            cfg: cfg.clone(),
        })
    }

    /// The token sequence of a batch of images: patch tokens with the class token inserted and
    /// the position embedding added, (batch, tokens, d_model).
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let (x, grid) = self.patch_embed.forward(images)?;
        if grid != self.cfg.grid() {
            let (_, _, h, w) = images.dims4()?;
            return Err(Error::Config {
                path: "images".into(),
                message: format!(
                    "{h}x{w} images give a {}x{} patch grid; the model is built for {} images",
                    grid.rows, grid.cols, self.cfg.image_size
                ),
            });
        }
        let (batch, n, d) = x.dims3()?;
        let x = match (&self.cls_token, self.cfg.class_token.position(n)) {
            (Some(cls), Some(at)) => {
                let cls = cls.broadcast_as((batch, 1, d))?;
                Tensor::cat(&[&x.narrow(1, 0, at)?, &cls, &x.narrow(1, at, n - at)?], 1)?
            }
            _ => x,
        };
        Ok(match &self.pos_embed {
            Some(pos) => x.broadcast_add(pos)?,
            None => x,
        })
    }

    /// The normed hidden states after the last block, (batch, tokens, d_model). With `rng`
    /// (training), drop-path is on.
    pub fn features(&self, images: &Tensor, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        let mut h = self.embed(images)?;
        let depth = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            let rate = if depth > 1 { self.cfg.drop_path * i as f64 / (depth - 1) as f64 } else { 0.0 };
            h = (&h + drop_path(&layer.branch(&h)?, rate, rng.as_deref_mut())?)?;
        }
        self.norm_f.forward(&h)
    }

    /// images (batch, channels, height, width) -> logits (batch, classes).
    pub fn forward(&self, images: &Tensor, rng: Option<&mut StdRng>) -> Result<Tensor> {
        let h = self.features(images, rng)?;
        let g = self.cfg.grid();
        let pooled = match self.cfg.class_token.position(g.rows * g.cols) {
            Some(at) => h.narrow(1, at, 1)?.squeeze(1)?,
            None => h.mean(1)?,
        };
        self.head.forward(&pooled)
    }
}

/// Adapts a Vim checkpoint's position embedding `pos` (1, tokens, d) from a model for `from` to
/// one for `to` (another image or patch size): the patch part is resized bilinearly over the
/// grid, the class token's entry moves to its place in the new sequence.
pub fn resize_pos_embed(pos: &Tensor, from: &VimConfig, to: &VimConfig) -> Result<Tensor> {
    if from.class_token != to.class_token {
        return Err(Error::Config {
            path: "pos_embed".into(),
            message: format!("cannot move a {:?} class token to {:?}", from.class_token, to.class_token),
        });
    }
    let (gf, gt) = (from.grid(), to.grid());
    let d = pos.dim(2)?;
    let pos = pos.squeeze(0)?;
    let (nf, nt) = (gf.rows * gf.cols, gt.rows * gt.cols);
    let (patches, cls) = match from.class_token.position(nf) {
        Some(at) => {
            (Tensor::cat(&[&pos.narrow(0, 0, at)?, &pos.narrow(0, at + 1, nf - at)?], 0)?, Some(pos.narrow(0, at, 1)?))
        }
        None => (pos, None),
    };
    let patches = resize_grid(&patches, gf, gt)?;
    let out = match (cls, to.class_token.position(nt)) {
        (Some(cls), Some(at)) => Tensor::cat(&[&patches.narrow(0, 0, at)?, &cls, &patches.narrow(0, at, nt - at)?], 0)?,
        _ => patches,
    };
    Ok(out.reshape((1, to.tokens(), d))?)
}
