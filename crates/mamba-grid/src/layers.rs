//! The image layers around the Mamba blocks: patch embedding, LayerNorm, depthwise 2-d conv,
//! drop-path and position-embedding interpolation, all from candle ops that candle
//! differentiates.

use crate::scan::Grid;
use candle_core::{Tensor, D};
use mamba_nn::{Error, Linear, Result};
use rand::rngs::StdRng;
use rand::Rng;

/// A height x width pair: `28` (square) or `[64, 101]` (height, width) in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size2d {
    pub height: usize,
    pub width: usize,
}

impl Size2d {
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width }
    }

    pub fn square(side: usize) -> Self {
        Self::new(side, side)
    }

    pub fn is_zero(&self) -> bool {
        self.height == 0 || self.width == 0
    }
}

impl std::fmt::Display for Size2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

impl<'de> serde::Deserialize<'de> for Size2d {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged, expecting = "a size: one integer, or [height, width]")]
        enum Given {
            Side(usize),
            Pair([usize; 2]),
        }
        Ok(match Given::deserialize(d)? {
            Given::Side(s) => Self::square(s),
            Given::Pair([h, w]) => Self::new(h, w),
        })
    }
}

impl serde::Serialize for Size2d {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.height == self.width {
            s.serialize_u64(self.height as u64)
        } else {
            [self.height, self.width].serialize(s)
        }
    }
}

/// The patch grid a conv with kernel `patch` and stride `stride` leaves of an image of `size`
/// (no padding; a remainder is cropped). Empty when the image is smaller than one patch.
pub fn patch_grid(size: Size2d, patch: Size2d, stride: Size2d) -> Grid {
    let n = |len: usize, p: usize, s: usize| if len < p || s == 0 { 0 } else { (len - p) / s + 1 };
    Grid::new(n(size.height, patch.height, stride.height), n(size.width, patch.width, stride.width))
}

/// Patches: (batch, channels, height, width) -> (batch, rows * cols, channels * ph * pw), the
/// patch at (r, c) covering rows r * sh .. r * sh + ph and columns c * sw .. c * sw + pw, each
/// flattened as a conv kernel (channels, ph, pw) is. A conv with that kernel and stride is then
/// a matmul with its weight viewed as (out, channels * ph * pw). Overlapping patches (stride <
/// patch, as AST's spectrogram patches) are gathered by index, which candle differentiates.
pub fn patchify(x: &Tensor, patch: Size2d, stride: Size2d) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let grid = patch_grid(Size2d::new(h, w), patch, stride);
    let (ph, pw) = (patch.height, patch.width);
    if grid.rows == 0 || grid.cols == 0 {
        return Err(Error::Config {
            path: "image".into(),
            message: format!("{h}x{w} is smaller than one {patch} patch (or the stride is 0)"),
        });
    }
    // Each patch's rows (then columns) laid out one after another: r * ph + i -> r * sh + i.
    let take = |x: &Tensor, dim: usize, n: usize, p: usize, s: usize| -> Result<Tensor> {
        if s == p {
            return Ok(x.narrow(dim, 0, n * p)?);
        }
        let idx: Vec<u32> = (0..n).flat_map(|r| (0..p).map(move |i| (r * s + i) as u32)).collect();
        Ok(x.contiguous()?.index_select(&Tensor::new(idx, x.device())?, dim)?)
    };
    let x = take(x, 2, grid.rows, ph, stride.height)?;
    let x = take(&x, 3, grid.cols, pw, stride.width)?;
    let x = x.reshape((b, c, grid.rows, ph, grid.cols, pw))?.permute((0, 2, 4, 1, 3, 5))?;
    Ok(x.contiguous()?.reshape((b, grid.rows * grid.cols, c * ph * pw))?)
}

/// A patch embedding: a conv with weight (dim, channels, ph, pw), bias, and a stride.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch: Size2d,
    stride: Size2d,
}

impl PatchEmbed {
    pub fn new(weight: &Tensor, bias: Tensor, stride: Size2d) -> Result<Self> {
        let (dim, c, ph, pw) = weight.dims4()?;
        let proj = Linear::new(weight.reshape((dim, c * ph * pw))?, Some(bias));
        Ok(Self { proj, patch: Size2d::new(ph, pw), stride })
    }

    /// images (batch, channels, height, width) -> tokens (batch, rows * cols, dim) and the grid.
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Grid)> {
        let (_, _, h, w) = images.dims4()?;
        let grid = patch_grid(Size2d::new(h, w), self.patch, self.stride);
        Ok((self.proj.forward(&patchify(images, self.patch, self.stride)?)?, grid))
    }
}

/// LayerNorm over the last dimension (candle_nn's fused op has no backward pass).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// A depthwise conv with an odd k x k kernel and zero padding that keeps the size:
/// x (batch, channels, h, w), weight (channels, 1, k, k). Written as k^2 shifted multiply-adds,
/// which for depthwise kernels beats candle's grouped conv (one conv per channel).
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let k = weight.dim(3)?;
    let pad = k / 2;
    let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let weight = weight.reshape((c, k * k))?;
    let mut out: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            let tap = weight.narrow(1, i * k + j, 1)?.reshape((1, c, 1, 1))?;
            let term = padded.narrow(2, i, h)?.narrow(3, j, w)?.broadcast_mul(&tap)?;
            out = Some(match out {
                Some(o) => (o + term)?,
                None => term,
            });
        }
    }
    let out = out.ok_or_else(|| Error::Config { path: "conv2d".into(), message: "empty kernel".into() })?;
    Ok(match bias {
        Some(b) => out.broadcast_add(&b.reshape((1, c, 1, 1))?)?,
        None => out,
    })
}

/// Stochastic depth: each example's branch is dropped with probability `rate` and the kept ones
/// scaled by 1 / (1 - rate), so the expectation is unchanged. `rng` None (inference): identity.
/// x: (batch, ...).
pub fn drop_path(x: &Tensor, rate: f64, rng: Option<&mut StdRng>) -> Result<Tensor> {
    let Some(rng) = rng.filter(|_| rate > 0.0) else { return Ok(x.clone()) };
    let keep = 1.0 - rate;
    let batch = x.dim(0)?;
    let mask: Vec<f32> = (0..batch).map(|_| if rng.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 }).collect();
    let mut shape = vec![1; x.rank()];
    shape[0] = batch;
    Ok(x.broadcast_mul(&Tensor::from_vec(mask, shape, x.device())?)?)
}

/// Resizes a grid of embeddings (from.rows * from.cols, dim), raster order, to another grid by
/// bilinear interpolation (pixel centres aligned, as torch's `interpolate(align_corners=False)`
/// for upsampling): the position embedding of a model trained at one image size, used at another.
pub fn resize_grid(t: &Tensor, from: Grid, to: Grid) -> Result<Tensor> {
    let dim = t.dim(1)?;
    let src = t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let coord = |i: usize, n_to: usize, n_from: usize| -> (usize, usize, f32) {
        let x = ((i as f32 + 0.5) * n_from as f32 / n_to as f32 - 0.5).clamp(0.0, (n_from - 1) as f32);
        let lo = x.floor() as usize;
        (lo, (lo + 1).min(n_from - 1), x - lo as f32)
    };
    let mut out = Vec::with_capacity(to.rows * to.cols * dim);
    for r in 0..to.rows {
        let (r0, r1, fr) = coord(r, to.rows, from.rows);
        for c in 0..to.cols {
            let (c0, c1, fc) = coord(c, to.cols, from.cols);
            let at = |rr: usize, cc: usize| &src[rr * from.cols + cc];
            for k in 0..dim {
                let top = at(r0, c0)[k] * (1.0 - fc) + at(r0, c1)[k] * fc;
                let bottom = at(r1, c0)[k] * (1.0 - fc) + at(r1, c1)[k] * fc;
                out.push(top * (1.0 - fr) + bottom * fr);
            }
        }
    }
    Ok(Tensor::from_vec(out, (to.rows * to.cols, dim), t.device())?.to_dtype(t.dtype())?)
}
