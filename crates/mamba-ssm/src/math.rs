//! Scalar maths shared by the CPU kernels, written branch-free so that loops over a block of
//! lanes vectorise (libm's `expf` / `log1pf` are opaque calls that stop the vectoriser).

use candle_core::WithDType;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Channels processed side by side by the CPU kernels: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// A block of lanes; kernels keep every per-channel quantity in this form.
pub(crate) type Lanes<T> = [T; LANES];

/// Floating-point types the CPU kernels compute in (f32, and f64 for gradient checks).
pub(crate) trait Real:
    WithDType
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    /// torch's `F.softplus` (beta 1, threshold 20: the identity above 20).
    fn softplus(self) -> Self;
    /// Derivative of `softplus` as torch defines it: sigmoid(x), and 1 above the threshold.
    fn softplus_grad(self) -> Self;
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn softplus(self) -> Self {
        if self > 20.0 {
            self
        } else {
            self.exp().ln_1p()
        }
    }
    fn softplus_grad(self) -> Self {
        if self > 20.0 {
            1.0
        } else {
            self.sigmoid()
        }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        let e = exp_f32(self);
        // log1p(e) = ln(u) * e / (u - 1) with u = 1 + e corrects the rounding of 1 + e (Goldberg).
        let u = 1.0 + e;
        let d = u - 1.0;
        let l = if d == 0.0 { e } else { ln_f32(u) * (e / d) };
        if self > 20.0 {
            self
        } else {
            l
        }
    }
    #[inline(always)]
    fn softplus_grad(self) -> Self {
        let s = self.sigmoid();
        if self > 20.0 {
            1.0
        } else {
            s
        }
    }
}

/// e^x for f32 to about 1 ulp: Cody-Waite reduction by ln 2 and a degree-7 polynomial.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.3, 88.0);
    let r = x * std::f32::consts::LOG2_E + ROUND;
    let n = r - ROUND;
    let ni = r.to_bits() as i32 - ROUND.to_bits() as i32;
    let f = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// ln(x) for finite x > 0 (f32, about 1 ulp): x = m 2^k with m in [sqrt(1/2), sqrt(2)), atanh series.
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits() as i32;
    // Subtracting the bits of sqrt(1/2) puts the exponent change at m = sqrt(1/2).
    let k = (bits - 0x3f35_04f3) >> 23;
    let m = f32::from_bits((bits - (k << 23)) as u32);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))));
    k as f32 * std::f32::consts::LN_2 + series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-30)
    }

    #[test]
    fn exp_f32_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            worst = worst.max(rel(exp_f32(x) as f64, (x as f64).exp()));
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1000.0) < 1e-37, true);
    }

    #[test]
    fn ln_f32_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 1..200_000 {
            let x = (i as f32 * 1e-3).powi(3);
            worst = worst.max((ln_f32(x) as f64 - (x as f64).ln()).abs() / (x as f64).ln().abs().max(1.0));
        }
        assert!(worst < 3e-7, "worst error {worst}");
    }

    #[test]
    fn softplus_follows_torch() {
        for &x in &[-100.0f32, -30.0, -17.0, -5.0, -1e-3, 0.0, 0.3, 7.0, 19.9, 20.0, 20.1, 50.0] {
            let want = if x > 20.0 { x as f64 } else { (x as f64).exp().ln_1p() };
            assert!(rel(x.softplus() as f64, want) < 4e-7, "softplus({x})");
            assert!(rel((x as f64).softplus(), want) < 1e-15, "softplus({x}) f64");
            let g = if x > 20.0 { 1.0 } else { 1.0 / (1.0 + (-(x as f64)).exp()) };
            assert!(rel(x.softplus_grad() as f64, g) < 4e-7, "softplus'({x})");
        }
    }
}
