//! The Mamba-3 mixer, SISO and MIMO, as mamba_ssm's `modules/mamba3.py` has it: in_proj to
//! [z, x, B, C, dd_dt, dd_A, trap, angles] -> RMSNorm on B and C -> the Mamba-3 scan (queries C
//! and keys B with per-head biases, rotated by data-dependent angles; trapezoidal mixing of each
//! token with the previous; D skip; y * silu(z)) -> out_proj. No convolution. Tensor names are
//! the reference's: `in_proj.weight`, `dt_bias`, `B_bias`, `C_bias`, `B_norm.weight`,
//! `C_norm.weight`, `D`, `out_proj.weight`, and for MIMO `mimo_x`, `mimo_z`, `mimo_o` (B and C
//! then carry `mimo_rank` vectors per token), and `norm.weight` with the out-proj norm. Over
//! several routes every tensor is shared: in_proj runs once, each route scans the sequence in its
//! own order, and the routes merge before out_proj.

use crate::mixer::{foreign_cache, Mixer, MixerCache, MixerSpec};
use crate::norm::normalize;
use crate::routes::{check_causal, gathered, run_routes, Merge, Route};
use crate::{compute_dtype, fan_in_bound, BackboneConfig, Init, Linear, Param, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ssm::{
    mamba3_chunk_scan, mamba3_state_update_ref, rms_norm, silu_gate, softplus, Mamba3Inputs, Mamba3State, Mimo,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A Mamba-3 mixer's keys of `[backbone]` (`kind = "mamba3"`), named as `Mamba3.__init__`, with
/// its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mamba3Config {
    /// Channels per head.
    pub headdim: usize,
    /// B/C heads (`num_bc_heads`): head h reads group h / (nheads / ngroups).
    pub ngroups: usize,
    /// The share of the state dims that rotate: 0.5 or 1.0.
    pub rope_fraction: f64,
    /// A is at most -a_floor.
    pub a_floor: f64,
    /// The chunk length of the scan.
    pub chunk_size: usize,
    /// MIMO of this rank; None is SISO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mimo_rank: Option<usize>,
    /// The reference's `is_outproj_norm`: the gate leaves the scan for a gated RMSNorm of each
    /// head's output (norm first, then y * silu(z); per rank for MIMO) before out_proj.
    pub outproj_norm: bool,
}

impl Default for Mamba3Config {
    fn default() -> Self {
        Self {
            headdim: 64,
            ngroups: 1,
            rope_fraction: 0.5,
            a_floor: 1e-4,
            chunk_size: 64,
            mimo_rank: None,
            outproj_norm: false,
        }
    }
}

/// The eps of the B, C and out-proj norms, fixed in the reference.
const NORM_EPS: f64 = 1e-5;

impl Mamba3Config {
    pub fn nheads(&self, b: &BackboneConfig) -> usize {
        b.d_inner() / self.headdim.max(1)
    }

    /// B and C vectors per token: MIMO's rank, 1 for SISO.
    pub fn rank(&self) -> usize {
        self.mimo_rank.unwrap_or(1)
    }

    /// Rotated pairs: half of d_state x rope_fraction, rounded down to even first.
    pub fn num_rope_angles(&self, b: &BackboneConfig) -> usize {
        let rotated = (b.d_state as f64 * self.rope_fraction) as usize;
        (rotated - rotated % 2) / 2
    }

    /// in_proj's output sizes: [z, x, B, C, dd_dt, dd_A, trap, angles].
    fn split(&self, b: &BackboneConfig) -> [usize; 8] {
        let (di, bc, h) = (b.d_inner(), self.rank() * self.ngroups * b.d_state, self.nheads(b));
        [di, di, bc, bc, h, h, h, self.num_rope_angles(b)]
    }
}

impl MixerSpec for Mamba3Config {
    fn routes_own_params(&self) -> bool {
        false
    }

    fn validate(&self, b: &BackboneConfig) -> std::result::Result<(), String> {
        crate::config::check_heads(b.d_inner(), self.headdim, self.ngroups, self.chunk_size)?;
        if self.rope_fraction != 0.5 && self.rope_fraction != 1.0 {
            return Err(format!("`rope_fraction` is 0.5 or 1.0, not {}", self.rope_fraction));
        }
        if self.num_rope_angles(b) == 0 {
            return Err(format!("`d_state` {} leaves no pair to rotate", b.d_state));
        }
        if self.mimo_rank == Some(0) {
            return Err("`mimo_rank` must be at least 1".into());
        }
        if self.mimo_rank.is_some() && !b.d_state.is_multiple_of(2) {
            return Err(format!("MIMO rotates the halves of the state: `d_state` must be even, not {}", b.d_state));
        }
        if !(self.a_floor >= 0.0 && self.a_floor.is_finite()) {
            return Err(format!("`a_floor` must be finite and at least 0, not {}", self.a_floor));
        }
        Ok(())
    }

    /// The mixer's tensors and how the reference draws them: projections as PyTorch's Linear,
    /// out_proj then divided by sqrt(n_layer) as the language model's init does (GPT-2's prenorm
    /// residual rescaling); dt_bias as the other mixers'; biases, norms and D ones; MIMO's x and
    /// output weights 1 / rank and its z weights one (these three decay, as the reference leaves
    /// them unmarked).
    fn params(&self, b: &BackboneConfig) -> Vec<Param> {
        let (d, di, h, n, r) = (b.d_model, b.d_inner(), self.nheads(b), b.d_state, self.rank());
        let in_dim = self.split(b).iter().sum();
        let out_bound = fan_in_bound(&[d, di]) / (b.n_layer.max(1) as f64).sqrt();
        let mut params = vec![
            Param::fan_in("in_proj.weight", vec![in_dim, d]).matrix(),
            Param::new("dt_bias", vec![h], Init::DtBias).no_decay(),
            Param::new("B_bias", vec![h, r, n], Init::Ones).no_decay(),
            Param::new("C_bias", vec![h, r, n], Init::Ones).no_decay(),
            Param::new("B_norm.weight", vec![n], Init::Ones).no_decay(),
            Param::new("C_norm.weight", vec![n], Init::Ones).no_decay(),
            Param::new("D", vec![h], Init::Ones).no_decay(),
        ];
        if self.mimo_rank.is_some() {
            let shape = vec![h, r, self.headdim];
            params.extend([
                Param::new("mimo_x", shape.clone(), Init::Constant(1.0 / r as f64)),
                Param::new("mimo_z", shape.clone(), Init::Ones),
                Param::new("mimo_o", shape, Init::Constant(1.0 / r as f64)),
            ]);
        }
        if self.outproj_norm {
            params.push(Param::new("norm.weight", vec![di], Init::Ones).no_decay());
        }
        params.push(Param::new("out_proj.weight", vec![d, di], Init::Uniform(out_bound)).matrix());
        params
    }

    fn load(&self, vb: VarBuilder, b: &BackboneConfig, routes: Vec<Route>) -> Result<Arc<dyn Mixer>> {
        Ok(Arc::new(Mamba3Mixer::new(vb, b, self, routes)?))
    }
}

#[derive(Debug, Clone)]
pub struct Mamba3Mixer {
    in_proj: Linear,
    dt_bias: Tensor,
    /// (nheads, rank, d_state): added to the keys (B) and queries (C).
    b_bias: Tensor,
    c_bias: Tensor,
    b_norm: Tensor,
    c_norm: Tensor,
    d: Tensor,
    /// MIMO's weights of x, z and the outputs per rank: (nheads, rank, headdim) each.
    mimo: Option<[Tensor; 3]>,
    /// The out-proj norm's weight, (nheads, headdim).
    norm: Option<Tensor>,
    out_proj: Linear,
    routes: Vec<Route>,
    merge: Merge,
    backbone: BackboneConfig,
    cfg: Mamba3Config,
}

/// The scan's inputs as the mixer computes them from in_proj's output.
struct ScanTensors {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    angles: Tensor,
    z: Tensor,
}

impl Mamba3Mixer {
    /// Over `routes`, one per name in `b.routes`.
    fn new(vb: VarBuilder, b: &BackboneConfig, cfg: &Mamba3Config, routes: Vec<Route>) -> Result<Self> {
        let (d, di, h, n, r) = (b.d_model, b.d_inner(), cfg.nheads(b), b.d_state, cfg.rank());
        let in_dim = cfg.split(b).iter().sum();
        let small = vb.clone().set_dtype(compute_dtype(vb.dtype()));
        let per_rank = |name: &str| small.get((h, r, cfg.headdim), name);
        Ok(Self {
            in_proj: Linear::load(&vb, "in_proj", (in_dim, d), false)?,
            dt_bias: small.get(h, "dt_bias")?,
            b_bias: small.get((h, r, n), "B_bias")?,
            c_bias: small.get((h, r, n), "C_bias")?,
            b_norm: small.get(n, "B_norm.weight")?,
            c_norm: small.get(n, "C_norm.weight")?,
            d: small.get(h, "D")?,
            mimo: match cfg.mimo_rank {
                Some(_) => Some([per_rank("mimo_x")?, per_rank("mimo_z")?, per_rank("mimo_o")?]),
                None => None,
            },
            norm: match cfg.outproj_norm {
                true => Some(small.get(di, "norm.weight")?.reshape((h, cfg.headdim))?),
                false => None,
            },
            out_proj: Linear::load(&vb, "out_proj", (d, di), false)?,
            routes,
            merge: b.merge,
            backbone: b.clone(),
            cfg: cfg.clone(),
        })
    }

    /// From in_proj's output (batch, len, ·) to the scan's inputs.
    fn scan_tensors(&self, zx: &Tensor) -> Result<ScanTensors> {
        let (c, b) = (&self.cfg, &self.backbone);
        let (batch, len, _) = zx.dims3()?;
        let (h, p, g, n, s) = (c.nheads(b), c.headdim, c.ngroups, b.d_state, c.num_rope_angles(b));
        // SISO's B and C have no rank dim, as the scan takes them.
        let bc_shape = match c.mimo_rank {
            Some(r) => vec![batch, len, r, g, n],
            None => vec![batch, len, g, n],
        };
        let mut offset = 0;
        let mut take = |size: usize| {
            offset += size;
            zx.narrow(2, offset - size, size)
        };
        let [z, x, bb, cc, dd_dt, dd_a, trap, angles] = c.split(b).map(&mut take);
        let (z, x, bb, cc, dd_dt, dd_a, trap, angles) = (z?, x?, bb?, cc?, dd_dt?, dd_a?, trap?, angles?);
        // A = -max(heavy_tail(dd_A), A_floor), heavy_tail(a) = 1 + a for a >= 0, 1 / (1 - a) below.
        let heavy_tail = (dd_a.relu()? + dd_a.neg()?.relu()?.affine(1.0, 1.0)?.recip()?)?;
        let a = heavy_tail.maximum(c.a_floor)?.neg()?;
        let dt = softplus(&dd_dt.broadcast_add(&self.dt_bias)?)?;
        let adt = (&a * &dt)?;
        let heads_first = |t: &Tensor| t.transpose(1, 2).and_then(|t| t.contiguous());
        let bc = |t: &Tensor, w: &Tensor| rms_norm(&t.reshape(bc_shape.as_slice())?, w, NORM_EPS);
        Ok(ScanTensors {
            q: bc(&cc, &self.c_norm)?,
            k: bc(&bb, &self.b_norm)?,
            v: x.reshape((batch, len, h, p))?,
            adt: heads_first(&adt)?,
            dt: heads_first(&dt)?,
            trap: heads_first(&trap)?,
            angles: angles.unsqueeze(2)?.broadcast_as((batch, len, h, s))?.contiguous()?,
            z: z.reshape((batch, len, h, p))?,
        })
    }

    fn inputs<'a>(&'a self, t: &'a ScanTensors, biases: &'a (Tensor, Tensor)) -> Mamba3Inputs<'a> {
        Mamba3Inputs {
            q: &t.q,
            k: &t.k,
            v: &t.v,
            adt: &t.adt,
            dt: &t.dt,
            trap: &t.trap,
            q_bias: &biases.0,
            k_bias: &biases.1,
            angles: &t.angles,
            d: Some(&self.d),
            // With the out-proj norm, the gate and MIMO's output weights come after the scan.
            z: if self.norm.is_some() { None } else { Some(&t.z) },
            mimo: self.mimo.as_ref().map(|[x, z, o]| Mimo { x, z, o: self.norm.is_none().then_some(o) }),
        }
    }

    /// The out-proj norm, when the mixer has one, of the scan's y (batch, len, [rank,] heads,
    /// headdim) with the gate z (batch, len, heads, headdim): each head's output RMS-normalised,
    /// times the weight and silu(z) (MIMO: z times mimo_z per rank, then the ranks weighted by
    /// mimo_o and summed). Without the norm, y as it is.
    fn out_norm(&self, y: Tensor, z: &Tensor) -> Result<Tensor> {
        let Some(weight) = &self.norm else { return Ok(y) };
        let per_rank = |t: &Tensor, w: &Tensor| t.broadcast_mul(&w.transpose(0, 1)?);
        let z = match &self.mimo {
            Some([_, mimo_z, _]) => per_rank(&z.unsqueeze(2)?, mimo_z)?,
            None => z.clone(),
        };
        let y = silu_gate(&normalize(&y, NORM_EPS)?.broadcast_mul(weight)?, &z)?;
        Ok(match &self.mimo {
            Some([_, _, mimo_o]) => per_rank(&y, mimo_o)?.sum(2)?,
            None => y,
        })
    }

    /// The query and key biases as the scan takes them: (nheads, d_state) for SISO.
    fn biases(&self) -> Result<(Tensor, Tensor)> {
        if self.mimo.is_some() {
            return Ok((self.c_bias.clone(), self.b_bias.clone()));
        }
        Ok((self.c_bias.squeeze(1)?, self.b_bias.squeeze(1)?))
    }
}

impl Mixer for Mamba3Mixer {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, MixerCache)> {
        let (batch, len, _) = x.dims3()?;
        let zx = self.in_proj.forward(x)?;
        let biases = self.biases()?;
        let d_inner = self.backbone.d_inner();
        let (y, state) = run_routes(&self.routes, self.merge, len, |_, order| {
            gathered(&zx, order, |zx| {
                let t = self.scan_tensors(zx)?;
                let out = mamba3_chunk_scan(&self.inputs(&t, &biases), self.cfg.chunk_size, None)?;
                Ok((self.out_norm(out.y, &t.z)?.reshape((batch, len, d_inner))?, out.state))
            })
        })?;
        Ok((self.out_proj.forward(&y)?, MixerCache::Mamba3(state)))
    }

    fn step(&self, x: &Tensor, cache: &mut MixerCache) -> Result<Tensor> {
        check_causal(&self.routes)?;
        let MixerCache::Mamba3(state) = cache else { return Err(foreign_cache()) };
        let batch = x.dim(0)?;
        let t = self.scan_tensors(&self.in_proj.forward(&x.unsqueeze(1)?)?)?;
        let biases = self.biases()?;
        let (y, next) = mamba3_state_update_ref(state, &self.inputs(&t, &biases))?;
        let y = self.out_norm(y, &t.z)?;
        *state = next;
        self.out_proj.forward(&y.reshape((batch, self.backbone.d_inner()))?)
    }

    /// Zeros: the angle, ssm, k and v parts of [`Mamba3State`].
    fn empty_cache(&self, batch: usize) -> Result<MixerCache> {
        let (c, b) = (&self.cfg, &self.backbone);
        let sizes = [batch, c.nheads(b), c.headdim, b.d_state, c.num_rope_angles(b)];
        Ok(MixerCache::Mamba3(Mamba3State::zeros(sizes, c.mimo_rank, self.d.dtype(), self.d.device())?))
    }
}
