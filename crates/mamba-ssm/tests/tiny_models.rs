//! The kernels inside whole models: the tiny MambaForCausalLM and Mamba2ForCausalLM of the
//! fixtures, assembled here from candle ops and this crate's scans, must give transformers'
//! logits, its prompt cache, and its cached greedy decoding (step functions) step by step.

mod common;
use candle_core::{DType, IndexOp, Tensor, D};
use common::*;
use mamba_ssm::{
    causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update, ssd_chunk_scan, ssd_state_update,
    ScanParams, SsdParams,
};
use std::collections::HashMap;

type Weights = HashMap<String, Tensor>;
const EPS: f64 = 1e-5;

fn rms_norm(x: &Tensor, w: &Tensor) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + EPS).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
}

/// x (.., in) @ w^T, w (out, in).
fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    x.broadcast_matmul(&w.t().unwrap()).unwrap()
}

fn weights(name: &str) -> Weights {
    fixture(&format!("{name}/model.safetensors"))
}

fn logits(w: &Weights, h: &Tensor) -> Tensor {
    let head = w.get("lm_head.weight").unwrap_or(&w["backbone.embeddings.weight"]);
    linear(&rms_norm(h, &w["backbone.norm_f.weight"]), head)
}

/// Per layer: (conv state (batch, channels, width), ssm state).
type Cache = Vec<(Tensor, Tensor)>;

struct Mamba1 {
    w: Weights,
    layers: usize,
    rank: usize,
    state: usize,
}

impl Mamba1 {
    fn p(&self, i: usize, k: &str) -> &Tensor {
        &self.w[&format!("backbone.layers.{i}.{k}")]
    }

    fn a(&self, i: usize) -> Tensor {
        self.p(i, "mixer.A_log").exp().unwrap().neg().unwrap()
    }

    /// ids (batch, len) -> logits, and the cache after the last token.
    fn forward(&self, ids: &Tensor) -> (Tensor, Cache) {
        let mut h =
            self.w["backbone.embeddings.weight"].embedding(&ids.flatten_all().unwrap()).unwrap().unsqueeze(0).unwrap();
        let mut cache = vec![];
        for i in 0..self.layers {
            let xz = linear(&rms_norm(&h, self.p(i, "norm.weight")), self.p(i, "mixer.in_proj.weight"));
            let di = xz.dim(2).unwrap() / 2;
            // (batch, len, d_inner) activations, viewed as (batch, d_inner, len): read in place.
            let (x, z) = (
                xz.narrow(2, 0, di).unwrap().transpose(1, 2).unwrap(),
                xz.narrow(2, di, di).unwrap().transpose(1, 2).unwrap(),
            );
            let conv_w = self.p(i, "mixer.conv1d.weight");
            let u = causal_conv1d(&x, conv_w, Some(self.p(i, "mixer.conv1d.bias")), true).unwrap();
            let x_dbl = linear(&u.transpose(1, 2).unwrap(), self.p(i, "mixer.x_proj.weight"));
            let (r, n) = (self.rank, self.state);
            let dt = linear(&x_dbl.narrow(2, 0, r).unwrap(), self.p(i, "mixer.dt_proj.weight"));
            let (b, c) = (
                x_dbl.narrow(2, r, n).unwrap().transpose(1, 2).unwrap(),
                x_dbl.narrow(2, r + n, n).unwrap().transpose(1, 2).unwrap(),
            );
            let p = ScanParams {
                d: Some(self.p(i, "mixer.D")),
                z: Some(&z),
                delta_bias: Some(self.p(i, "mixer.dt_proj.bias")),
                delta_softplus: true,
            };
            let out = selective_scan(&u, &dt.transpose(1, 2).unwrap(), &self.a(i), &b, &c, &p, None).unwrap();
            h = (h + linear(&out.y.transpose(1, 2).unwrap(), self.p(i, "mixer.out_proj.weight"))).unwrap();
            let width = conv_w.dim(2).unwrap();
            let len = x.dim(2).unwrap();
            cache.push((x.narrow(2, len - width, width).unwrap().contiguous().unwrap(), out.last_state));
        }
        (logits(&self.w, &h), cache)
    }

    /// One token (batch,) through the step functions: logits (batch, vocab).
    fn step(&self, id: &Tensor, cache: &mut Cache) -> Tensor {
        let mut h = self.w["backbone.embeddings.weight"].embedding(id).unwrap();
        for (i, (conv, ssm)) in cache.iter_mut().enumerate() {
            let xz = linear(&rms_norm(&h, self.p(i, "norm.weight")), self.p(i, "mixer.in_proj.weight"));
            let di = xz.dim(1).unwrap() / 2;
            let (x, z) = (xz.narrow(1, 0, di).unwrap(), xz.narrow(1, di, di).unwrap());
            let (u, new_conv) = causal_conv1d_update(
                conv,
                &x,
                self.p(i, "mixer.conv1d.weight"),
                Some(self.p(i, "mixer.conv1d.bias")),
                true,
            )
            .unwrap();
            let x_dbl = linear(&u, self.p(i, "mixer.x_proj.weight"));
            let (r, n) = (self.rank, self.state);
            let dt = linear(&x_dbl.narrow(1, 0, r).unwrap(), self.p(i, "mixer.dt_proj.weight"));
            let p = ScanParams {
                d: Some(self.p(i, "mixer.D")),
                z: Some(&z),
                delta_bias: Some(self.p(i, "mixer.dt_proj.bias")),
                delta_softplus: true,
            };
            let (y, new_ssm) = selective_state_update(
                ssm,
                &u,
                &dt,
                &self.a(i),
                &x_dbl.narrow(1, r, n).unwrap(),
                &x_dbl.narrow(1, r + n, n).unwrap(),
                &p,
            )
            .unwrap();
            h = (h + linear(&y, self.p(i, "mixer.out_proj.weight"))).unwrap();
            (*conv, *ssm) = (new_conv, new_ssm);
        }
        logits(&self.w, &h)
    }
}

struct Mamba2 {
    w: Weights,
    layers: usize,
    heads: usize,
    headdim: usize,
    groups: usize,
    state: usize,
    chunk: usize,
}

impl Mamba2 {
    fn p(&self, i: usize, k: &str) -> &Tensor {
        &self.w[&format!("backbone.layers.{i}.{k}")]
    }

    fn params(&self, i: usize) -> SsdParams<'_> {
        SsdParams {
            d: Some(self.p(i, "mixer.D")),
            dt_bias: Some(self.p(i, "mixer.dt_bias")),
            dt_softplus: true,
            ..Default::default()
        }
    }

    /// Gate, grouped RMSNorm (group size d_inner / groups) and out_proj: y, z (.., d_inner).
    fn finish(&self, i: usize, y: &Tensor, z: &Tensor) -> Tensor {
        let y = (y * z.silu().unwrap()).unwrap();
        let mut grouped = y.dims().to_vec();
        let di = grouped.pop().unwrap();
        grouped.extend([self.groups, di / self.groups]);
        let ones = Tensor::ones(di / self.groups, DType::F32, &CPU).unwrap();
        let normed = rms_norm(&y.reshape(grouped).unwrap(), &ones).reshape(y.shape()).unwrap();
        linear(&normed.broadcast_mul(self.p(i, "mixer.norm.weight")).unwrap(), self.p(i, "mixer.out_proj.weight"))
    }

    fn forward(&self, ids: &Tensor) -> (Tensor, Cache) {
        let (hd, p, g, n) = (self.heads, self.headdim, self.groups, self.state);
        let di = hd * p;
        let mut h =
            self.w["backbone.embeddings.weight"].embedding(&ids.flatten_all().unwrap()).unwrap().unsqueeze(0).unwrap();
        let (batch, len) = (1, h.dim(1).unwrap());
        let mut cache = vec![];
        for i in 0..self.layers {
            let zxbcdt = linear(&rms_norm(&h, self.p(i, "norm.weight")), self.p(i, "mixer.in_proj.weight"));
            let conv_dim = di + 2 * g * n;
            let (z, xbc, dt) = (
                zxbcdt.narrow(2, 0, di).unwrap(),
                zxbcdt.narrow(2, di, conv_dim).unwrap(),
                zxbcdt.narrow(2, di + conv_dim, hd).unwrap(),
            );
            let conv_w = self.p(i, "mixer.conv1d.weight");
            let xbc_t = xbc.transpose(1, 2).unwrap();
            let conv = causal_conv1d(&xbc_t, conv_w, Some(self.p(i, "mixer.conv1d.bias")), true)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let part = |start: usize, size: usize, shape: (usize, usize, usize, usize)| {
                conv.narrow(2, start, size).unwrap().reshape(shape).unwrap()
            };
            let x = part(0, di, (batch, len, hd, p));
            let (b, c) = (part(di, g * n, (batch, len, g, n)), part(di + g * n, g * n, (batch, len, g, n)));
            let a = self.p(i, "mixer.A_log").exp().unwrap().neg().unwrap();
            let out =
                ssd_chunk_scan(&x, &dt.contiguous().unwrap(), &a, &b, &c, self.chunk, &self.params(i), None).unwrap();
            h = (h + self.finish(i, &out.y.reshape((batch, len, di)).unwrap(), &z)).unwrap();
            let width = conv_w.dim(2).unwrap();
            cache.push((xbc_t.narrow(2, len - width, width).unwrap().contiguous().unwrap(), out.last_state));
        }
        (logits(&self.w, &h), cache)
    }

    fn step(&self, id: &Tensor, cache: &mut Cache) -> Tensor {
        let (hd, p, g, n) = (self.heads, self.headdim, self.groups, self.state);
        let di = hd * p;
        let mut h = self.w["backbone.embeddings.weight"].embedding(id).unwrap();
        let batch = h.dim(0).unwrap();
        for (i, (conv, ssm)) in cache.iter_mut().enumerate() {
            let zxbcdt = linear(&rms_norm(&h, self.p(i, "norm.weight")), self.p(i, "mixer.in_proj.weight"));
            let conv_dim = di + 2 * g * n;
            let (z, xbc, dt) = (
                zxbcdt.narrow(1, 0, di).unwrap(),
                zxbcdt.narrow(1, di, conv_dim).unwrap(),
                zxbcdt.narrow(1, di + conv_dim, hd).unwrap(),
            );
            let (xbc, new_conv) = causal_conv1d_update(
                conv,
                &xbc,
                self.p(i, "mixer.conv1d.weight"),
                Some(self.p(i, "mixer.conv1d.bias")),
                true,
            )
            .unwrap();
            let x = xbc.narrow(1, 0, di).unwrap().reshape((batch, hd, p)).unwrap();
            let (b, c) = (
                xbc.narrow(1, di, g * n).unwrap().reshape((batch, g, n)).unwrap(),
                xbc.narrow(1, di + g * n, g * n).unwrap().reshape((batch, g, n)).unwrap(),
            );
            let a = self.p(i, "mixer.A_log").exp().unwrap().neg().unwrap();
            let (y, new_ssm) = ssd_state_update(ssm, &x, &dt, &a, &b, &c, &self.params(i)).unwrap();
            h = (h + self.finish(i, &y.reshape((batch, di)).unwrap(), &z)).unwrap();
            (*conv, *ssm) = (new_conv, new_ssm);
        }
        logits(&self.w, &h)
    }
}

/// Parallel logits and prompt cache against transformers, then greedy decoding through the steps.
fn check(io: &Weights, forward: &dyn Fn(&Tensor) -> (Tensor, Cache), step: &dyn Fn(&Tensor, &mut Cache) -> Tensor) {
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let (logits, mut cache) = forward(&ids);
    let max_abs =
        |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let e = max_abs(&logits, &io["logits"]);
    assert!(e <= 1e-4, "logits: max abs error {e}");
    for (i, (conv, ssm)) in cache.iter().enumerate() {
        assert!(max_abs(conv, &io[&format!("prompt_cache.conv_state.{i}")]) <= 1e-5, "conv state {i}");
        assert!(max_abs(ssm, &io[&format!("prompt_cache.ssm_state.{i}")]) <= 1e-4, "ssm state {i}");
    }
    let want_ids: Vec<i64> = io["decode.new_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let mut next = logits.i((.., logits.dim(1).unwrap() - 1)).unwrap().argmax(D::Minus1).unwrap();
    for (k, &want) in want_ids.iter().enumerate() {
        assert_eq!(next.to_vec1::<u32>().unwrap(), vec![want as u32], "greedy token {k}");
        let step_logits = step(&next, &mut cache);
        let e = max_abs(&step_logits, &io["decode.step_logits"].i((.., k)).unwrap());
        assert!(e <= 1e-4, "step {k}: max abs error {e}");
        next = step_logits.argmax(D::Minus1).unwrap();
    }
}

#[test]
fn mamba_tiny_matches_transformers() {
    let m = Mamba1 { w: weights("mamba_tiny"), layers: 2, rank: 2, state: 8 };
    check(&fixture("mamba_tiny_io.safetensors"), &|ids| m.forward(ids), &|id, c| m.step(id, c));
}

#[test]
fn mamba2_tiny_matches_transformers() {
    let m = Mamba2 { w: weights("mamba2_tiny"), layers: 2, heads: 8, headdim: 16, groups: 1, state: 16, chunk: 8 };
    check(&fixture("mamba2_tiny_io.safetensors"), &|ids| m.forward(ids), &|id, c| m.step(id, c));
}
