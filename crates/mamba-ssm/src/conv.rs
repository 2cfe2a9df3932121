//! Causal depthwise conv1d with bias and optional SiLU (the conv of both mixers) as one op with
//! its backward, its single-token update, and a reference built from candle ops.
//!
//! y[b, c, t] = act(bias[c] + sum_j w[c, j] x[b, c, t + j - (width - 1)]), x = 0 before t = 0.

use crate::cpu::{cpu_storages, flat, View3};
use crate::error::{argument, check, dims, Result};
use crate::math::{simd_fn, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The weight as (channels, width), from (channels, width) or PyTorch's (channels, 1, width).
fn weight_2d(weight: &Tensor, channels: usize) -> Result<Tensor> {
    let width = *weight.dims().last().unwrap_or(&0);
    let w = match weight.rank() {
        3 => {
            check("conv weight", weight, &[("channels", channels), ("1", 1), ("width", width)])?;
            weight.squeeze(1)?
        }
        _ => {
            check("conv weight", weight, &[("channels", channels), ("width", width)])?;
            weight.clone()
        }
    };
    if width == 0 {
        return Err(argument("conv weight", "the kernel width must be at least 1"));
    }
    Ok(w)
}

fn check_conv(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize, Tensor)> {
    let [batch, channels, len] = dims("x", x, ["batch", "channels", "len"])?;
    let w = weight_2d(weight, channels)?;
    if let Some(bias) = bias {
        check("conv bias", bias, &[("channels", channels)])?;
    }
    Ok((batch, channels, len, w))
}

/// x: (batch, channels, len), weight: (channels, width) or (channels, 1, width), bias: (channels)
/// -> (batch, channels, len). Any strides (a transposed (batch, len, channels) tensor is read in
/// place); f64 stays f64, other float types compute in f32.
pub fn causal_conv1d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let (_, channels, _, w) = check_conv(x, weight, bias)?;
    let dt = crate::selective_scan::compute_dtype(x);
    let bias = match bias {
        Some(b) => b.to_dtype(dt)?,
        None => Tensor::zeros(channels, dt, x.device())?,
    };
    let y = x.to_dtype(dt)?.apply_op3(
        &w.to_dtype(dt)?.contiguous()?,
        &bias.contiguous()?,
        CausalConv { silu, width: w.dim(1)? },
    )?;
    Ok(y.to_dtype(x.dtype())?)
}

/// The reference: one shifted slice per tap, from candle ops (differentiated by candle).
pub fn causal_conv1d_ref(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let (_, _, len, w) = check_conv(x, weight, bias)?;
    let width = w.dim(1)?;
    let xp = x.pad_with_zeros(2, width - 1, 0)?;
    let mut y = x.zeros_like()?;
    for j in 0..width {
        y = (y + xp.narrow(2, j, len)?.broadcast_mul(&w.narrow(1, j, 1)?.unsqueeze(0)?)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.unsqueeze(0)?.unsqueeze(2)?)?;
    }
    Ok(if silu { y.silu()? } else { y })
}

/// One decoding step: conv_state (batch, channels, width) holds the last `width` inputs.
/// x: (batch, channels) -> (y (batch, channels), new conv_state).
pub fn causal_conv1d_update(
    conv_state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    let [batch, channels, width] = dims("conv_state", conv_state, ["batch", "channels", "width"])?;
    check("x", x, &[("batch", batch), ("channels", channels)])?;
    let w = weight_2d(weight, channels)?;
    check("conv weight", &w, &[("channels", channels), ("width", width)])?;
    #[cfg(feature = "cuda")]
    if conv_state.device().is_cuda() && matches!(conv_state.dtype(), DType::F32 | DType::BF16) {
        // One kernel (causal_conv1d.cu): (state, x, [weight | bias]) -> [y | new state].
        let dt = conv_state.dtype();
        let bias = match bias {
            Some(b) => b.to_dtype(dt)?,
            None => Tensor::zeros(channels, dt, x.device())?,
        };
        let wb = Tensor::cat(&[w.to_dtype(dt)?.flatten_all()?, bias.flatten_all()?], 0)?;
        let out = conv_state.contiguous()?.apply_op3(&x.to_dtype(dt)?.contiguous()?, &wb, ConvUpdateOp { silu })?;
        let y = out.narrow(0, 0, batch * channels)?.reshape((batch, channels))?;
        let state = out.narrow(0, batch * channels, batch * channels * width)?.reshape((batch, channels, width))?;
        return Ok((y, state));
    }
    let state = Tensor::cat(&[&conv_state.narrow(2, 1, width - 1)?, &x.unsqueeze(2)?], 2)?;
    let mut y = state.broadcast_mul(&w.unsqueeze(0)?)?.sum(2)?;
    if let Some(b) = bias {
        check("conv bias", b, &[("channels", channels)])?;
        y = y.broadcast_add(&b.unsqueeze(0)?)?;
    }
    Ok((if silu { y.silu()? } else { y }, state))
}

simd_fn! {
    pub(crate) fn silu_in_place<T, S>(v: &mut [T]) {
        for x in v.iter_mut() {
            *x *= x.sigmoid::<S>();
        }
    }
}

simd_fn! {
    /// d(pre-activation) = g silu'(pre), silu'(p) = s (1 + p (1 - s)) with s = sigmoid(p).
    pub(crate) fn silu_grad<T, S>(pre: &[T], g: &[T], out: &mut [T]) {
        for i in 0..pre.len() {
            let s = pre[i].sigmoid::<S>();
            out[i] = g[i] * s * (T::ONE + pre[i] * (T::ONE - s));
        }
    }
}

struct CausalConv {
    silu: bool,
    width: usize,
}

/// Row buffers: the input with width - 1 zeros in front, and the pre-activation.
fn conv_row<T: Real>(x: &View3<T>, b: usize, c: usize, w: &[T], bias: T, xp: &mut Vec<T>, pre: &mut [T]) {
    let (width, len) = (w.len(), pre.len());
    xp.clear();
    xp.resize(width - 1, T::ZERO);
    xp.extend((0..len).map(|t| x.at(b, c, t)));
    pre.fill(bias);
    for (j, &wj) in w.iter().enumerate() {
        for (p, &v) in pre.iter_mut().zip(&xp[j..j + len]) {
            *p += wj * v;
        }
    }
}

impl CausalConv {
    fn fwd<T: Real>(&self, x: View3<T>, w: &[T], bias: &[T], (batch, channels, len): (usize, usize, usize)) -> Vec<T> {
        let width = self.width;
        let mut y = vec![T::ZERO; batch * channels * len];
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(len).enumerate().for_each_init(Vec::new, |xp, (row, out)| {
            let (b, c) = (row / channels, row % channels);
            conv_row(&x, b, c, &w[c * width..(c + 1) * width], bias[c], xp, out);
            if self.silu {
                silu_in_place(out);
            }
        });
        y
    }

    /// (dx, dw, dbias) for the output gradient g (contiguous, like the result).
    fn bwd<T: Real>(
        &self,
        x: View3<T>,
        w: &[T],
        bias: &[T],
        g: &[T],
        (batch, channels, len): (usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let width = self.width;
        let mut dx = vec![T::ZERO; batch * channels * len];
        // Per-row weight and bias gradients, summed over the batch below.
        let mut dwb = vec![T::ZERO; batch * channels * (width + 1)];
        // Rows of length 0 (len 0) have nothing to give; chunking by 0 is not allowed.
        dx.par_chunks_mut(len.max(1)).zip(dwb.par_chunks_mut(width + 1)).enumerate().for_each_init(
            || (Vec::new(), vec![T::ZERO; len], Vec::new()),
            |(xp, pre, dp), (row, (dx, dwb))| {
                let (b, c) = (row / channels, row % channels);
                let wc = &w[c * width..(c + 1) * width];
                let g = &g[row * len..(row + 1) * len];
                // dp: d(pre-activation) with width - 1 zeros after it.
                dp.clear();
                if self.silu {
                    conv_row(&x, b, c, wc, bias[c], xp, pre);
                    dp.resize(len, T::ZERO);
                    silu_grad(pre, g, dp);
                } else {
                    xp.clear();
                    xp.resize(width - 1, T::ZERO);
                    xp.extend((0..len).map(|t| x.at(b, c, t)));
                    dp.extend_from_slice(g);
                }
                dp.resize(len + width - 1, T::ZERO);
                dx.fill(T::ZERO);
                for (j, &wj) in wc.iter().enumerate() {
                    // x[t] feeds pre[t + width - 1 - j] through tap j.
                    for (d, &v) in dx.iter_mut().zip(&dp[width - 1 - j..width - 1 - j + len]) {
                        *d += wj * v;
                    }
                    let mut s = T::ZERO;
                    for (&a, &b) in dp[..len].iter().zip(&xp[j..j + len]) {
                        s += a * b;
                    }
                    dwb[j] = s;
                }
                let mut s = T::ZERO;
                for &v in &dp[..len] {
                    s += v;
                }
                dwb[width] = s;
            },
        );
        let (mut dw, mut db) = (vec![T::ZERO; channels * width], vec![T::ZERO; channels]);
        for (row, r) in dwb.chunks(width + 1).enumerate() {
            let c = row % channels;
            dw[c * width..(c + 1) * width].iter_mut().zip(r).for_each(|(a, &b)| *a += b);
            db[c] += r[width];
        }
        (dx, dw, db)
    }
}

impl CustomOp3 for CausalConv {
    fn name(&self) -> &'static str {
        "causal-conv1d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims3()?;
        let out = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.fwd::<f32>(View3::new(s1, l1)?, flat(s2, l2)?, flat(s3, l3)?, dims))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.fwd::<f64>(View3::new(s1, l1)?, flat(s2, l2)?, flat(s3, l3)?, dims))
            }
            s => candle_core::bail!("causal-conv1d computes in f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = crate::cuda::ConvArgs::new(l1, self.width, self.silu)?;
        Ok((crate::cuda::conv_fwd(args, (s1, l1), (s2, l2), (s3, l3))?, Shape::from(l1.shape().dims3()?)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            // One op: (x, weight and bias joined, g) -> f32 [dx | per channel: taps, bias].
            let wb = Tensor::cat(&[w.flatten_all()?, bias.flatten_all()?], 0)?;
            let out = x.apply_op3(&wb, &g, ConvBwdOp { silu: self.silu, width: self.width })?;
            let (n, channels) = (x.elem_count(), bias.elem_count());
            let dwb = out.narrow(0, n, channels * (self.width + 1))?.reshape((channels, self.width + 1))?;
            let dx = out.narrow(0, 0, n)?.reshape(x.shape())?.to_dtype(x.dtype())?;
            let dw = dwb.narrow(1, 0, self.width)?.contiguous()?.reshape(w.shape())?.to_dtype(w.dtype())?;
            let db = dwb.narrow(1, self.width, 1)?.contiguous()?.reshape(bias.shape())?.to_dtype(bias.dtype())?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let dims = x.dims3()?;
        cpu_storages!("causal-conv1d"; (sx, lx) = x, (sw, lw) = w, (sb, lb) = bias, (sg, lg) = g);
        let dev = x.device();
        macro_rules! grads {
            ($t:ty) => {{
                let (dx, dw, db) =
                    self.bwd::<$t>(View3::new(sx, lx)?, flat(sw, lw)?, flat(sb, lb)?, flat(sg, lg)?, dims);
                (
                    Tensor::from_vec(dx, dims, dev)?,
                    Tensor::from_vec(dw, w.shape(), dev)?,
                    Tensor::from_vec(db, bias.shape(), dev)?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => grads!(f32),
            DType::F64 => grads!(f64),
            dt => candle_core::bail!("causal-conv1d computes in f32 or f64, got {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The GPU backward pass of the conv as an op of its own.
#[cfg(feature = "cuda")]
struct ConvBwdOp {
    silu: bool,
    width: usize,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for ConvBwdOp {
    crate::cuda::gpu_only!("causal-conv1d-backward");

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = crate::cuda::ConvArgs::new(l1, self.width, self.silu)?;
        let channels = l1.shape().dims3()?.1;
        let out = crate::cuda::conv_bwd(args, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(l1.shape().elem_count() + channels * (self.width + 1))))
    }
}

/// The conv's decode update on the GPU: (state (batch, channels, width), x (batch, channels),
/// [weight | bias]) -> [y | new state].
#[cfg(feature = "cuda")]
struct ConvUpdateOp {
    silu: bool,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for ConvUpdateOp {
    crate::cuda::gpu_only!("causal-conv1d-update");

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (batch, channels, width) = l1.shape().dims3()?;
        let out = crate::cuda::conv_update(batch, channels, width, self.silu, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(batch * channels * (1 + width))))
    }
}
