//! Scalar maths shared by the CPU kernels, written branch-free so that loops over a block of
//! lanes vectorise (libm's `expf` / `log1pf` are opaque calls that stop the vectoriser).

use candle_core::WithDType;
use std::ops::Neg;

/// Channels processed side by side by the CPU kernels: two AVX-512 or four AVX2 registers of
/// f32, enough independent work per instruction to hide the latency of the exp polynomial
/// (measured: 16 lanes 4% slower, 8 lanes 36% slower on AVX2).
pub(crate) const LANES: usize = 32;

/// A block of lanes; kernels keep every per-channel quantity in this form.
pub(crate) type Lanes<T> = [T; LANES];

/// What the instruction set offers a kernel: a kernel generic over `S: Isa` is compiled once
/// per instruction set and picked at run time (see [`simd_fn`]).
pub(crate) trait Isa {
    /// Fused multiply-add is one instruction (elsewhere `mul_add` is a slow libm call).
    const FMA: bool;
}

pub(crate) struct Fma;
pub(crate) struct Plain;
impl Isa for Fma {
    const FMA: bool = true;
}
impl Isa for Plain {
    const FMA: bool = false;
}

/// The instruction sets the CPU kernels are compiled for, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuIsa {
    /// No FMA: plain multiplies and adds (any x86-64).
    Plain,
    /// AVX2 + FMA (256-bit vectors); what aarch64's NEON + FMA kernels count as.
    Avx2,
    /// AVX-512 F/BW/DQ/VL + FMA (512-bit vectors).
    Avx512,
}

impl CpuIsa {
    /// The best this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
            Self::Plain
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self::Avx2
    }

    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "plain" => Some(Self::Plain),
            "avx2" => Some(Self::Avx2),
            "avx512" => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// The instruction set the kernels run: `CpuIsa as u8`, or u8::MAX until first asked. Kept
/// resolved, so that a kernel call costs one load, not a feature detection.
static ISA: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The instruction set the CPU kernels run now: the best the CPU has, at most the cap that
/// [`set_cpu_isa`] or the environment variable `MAMBA_CPU_ISA` (`plain`, `avx2`, `avx512`) sets,
/// so that every path can be tested and timed on one machine.
pub fn cpu_isa() -> CpuIsa {
    match ISA.load(std::sync::atomic::Ordering::Relaxed) {
        u8::MAX => set_cpu_isa(match std::env::var("MAMBA_CPU_ISA") {
            Ok(s) => CpuIsa::parse(&s).unwrap_or_else(|| {
                eprintln!("MAMBA_CPU_ISA={s:?} is not plain, avx2 or avx512: ignored");
                CpuIsa::Avx512
            }),
            Err(_) => CpuIsa::Avx512,
        }),
        i => [CpuIsa::Plain, CpuIsa::Avx2, CpuIsa::Avx512][i as usize],
    }
}

/// Caps the instruction set of the CPU kernels for the whole process (the kernels already
/// running finish on theirs); returns the one they use from now on.
pub fn set_cpu_isa(cap: CpuIsa) -> CpuIsa {
    let isa = CpuIsa::detect().min(cap);
    ISA.store(isa as u8, std::sync::atomic::Ordering::Relaxed);
    isa
}

/// Defines a kernel `fn name<T: Real>(args)` from a body generic over `S: Isa`, compiled for
/// AVX-512 and for AVX2 + FMA, and run in the best of them that [`cpu_isa`] allows; aarch64
/// always has FMA.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident, $s:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$t: $crate::math::Real>($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$t: $crate::math::Real, $s: $crate::math::Isa>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$t: $crate::math::Real>($($arg: $ty),*) {
                    body::<$t, $crate::math::Fma>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$t: $crate::math::Real>($($arg: $ty),*) {
                    body::<$t, $crate::math::Fma>($($arg),*)
                }
                // SAFETY (both): `cpu_isa` never names more than the CPU has.
                match $crate::math::cpu_isa() {
                    $crate::math::CpuIsa::Avx512 => unsafe { avx512::<$t>($($arg),*) },
                    $crate::math::CpuIsa::Avx2 => unsafe { avx2::<$t>($($arg),*) },
                    $crate::math::CpuIsa::Plain => body::<$t, $crate::math::Plain>($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            body::<$t, $crate::math::Fma>($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// a * b + c, fused where that is one instruction.
#[inline(always)]
pub(crate) fn madd<T: Real, S: Isa>(a: T, b: T, c: T) -> T {
    if S::FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Floating-point types the CPU kernels compute in (f32, and f64 for gradient checks).
pub(crate) trait Real: WithDType + Default + Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const LOG2_E: Self;
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// 2^x.
    fn pow2<S: Isa>(self) -> Self;
    fn exp<S: Isa>(self) -> Self {
        (self * Self::LOG2_E).pow2::<S>()
    }
    /// torch's `F.softplus` (beta 1, threshold 20: the identity above 20).
    fn softplus<S: Isa>(self) -> Self;
    /// Derivative of `softplus` as torch defines it: sigmoid(x), and 1 above the threshold.
    fn softplus_grad<S: Isa>(self) -> Self {
        let s = self.sigmoid::<S>();
        if self > Self::from_f64(20.0) {
            Self::ONE
        } else {
            s
        }
    }
    fn sigmoid<S: Isa>(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp::<S>())
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const LOG2_E: Self = std::f64::consts::LOG2_E;
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    fn pow2<S: Isa>(self) -> Self {
        self.exp2()
    }
    fn exp<S: Isa>(self) -> Self {
        f64::exp(self)
    }
    fn softplus<S: Isa>(self) -> Self {
        if self > 20.0 {
            self
        } else {
            self.exp().ln_1p()
        }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const LOG2_E: Self = std::f32::consts::LOG2_E;
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn pow2<S: Isa>(self) -> Self {
        pow2_f32::<S>(self)
    }
    #[inline(always)]
    fn exp<S: Isa>(self) -> Self {
        exp_f32::<S>(self)
    }
    /// max(x, 0) + log1p(e^-|x|), with log1p(t) = 2 atanh(t / (2 + t)) as a series in
    /// s = t / (2 + t) <= 1/3: one division, and no cancellation for tiny t. Above the threshold
    /// the result rounds to x, as torch's identity branch gives.
    #[inline(always)]
    fn softplus<S: Isa>(self) -> Self {
        let t = exp_f32::<S>(-self.abs());
        let s = t / (2.0 + t);
        let s2 = s * s;
        let mut p = 1.0 / 17.0;
        for c in [1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
            p = madd::<f32, S>(p, s2, c);
        }
        let pos = if self > 0.0 { self } else { 0.0 };
        madd::<f32, S>(2.0 * s, p, pos)
    }
}

/// 2^x for f32 to about 2 ulp: x = n + f with |f| <= 1/2, a degree-6 polynomial for 2^f, and n
/// added to the exponent bits. Branch-free, so loops of it vectorise.
#[inline(always)]
pub(crate) fn pow2_f32<S: Isa>(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    const C: [f32; 7] =
        [1.0, std::f32::consts::LN_2, 0.240_226_5, 0.055_504_11, 0.009_618_129, 0.001_333_355_8, 0.000_154_035_3];
    let x = if x < -126.0 { -126.0 } else { x };
    let x = if x > 127.0 { 127.0 } else { x };
    let r = x + ROUND;
    let n = r - ROUND;
    let f = x - n;
    let mut p = C[6];
    for &c in C[..6].iter().rev() {
        p = madd::<f32, S>(p, f, c);
    }
    let ni = r.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(p.to_bits().wrapping_add(ni << 23))
}

/// e^x for f32 to about 1 ulp: Cody-Waite reduction by ln 2 (exact for |x| < 88, unlike
/// 2^(x log2 e), whose rounded argument costs |x| ulps) and a degree-7 polynomial.
#[inline(always)]
pub(crate) fn exp_f32<S: Isa>(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let r = madd::<f32, S>(x, std::f32::consts::LOG2_E, ROUND);
    let n = r - ROUND;
    let f = madd::<f32, S>(n, -1.428_606_8e-6, madd::<f32, S>(n, -0.693_145_75, x));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd::<f32, S>(p, f, c);
    }
    let ni = r.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(p.to_bits().wrapping_add(ni << 23))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-30)
    }

    #[test]
    fn exp_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            worst = worst.max(rel(Real::exp::<Fma>(x) as f64, (x as f64).exp()));
            worst = worst.max(rel(Real::exp::<Plain>(x) as f64, (x as f64).exp()));
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(Real::exp::<Fma>(-1000.0f32) < 1e-37);
        assert!(Real::exp::<Fma>(88.0f32).is_finite());
    }

    #[test]
    fn pow2_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -125.0 + 251.0 * i as f32 / 200_000.0;
            worst = worst.max(rel(x.pow2::<Fma>() as f64, (x as f64).exp2()));
            worst = worst.max(rel(x.pow2::<Plain>() as f64, (x as f64).exp2()));
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!((-1000.0f32).pow2::<Fma>() < 1e-37);
    }

    #[test]
    fn softplus_follows_torch() {
        for &x in &[-100.0f32, -30.0, -17.0, -5.0, -1e-3, 0.0, 0.3, 7.0, 19.9, 20.0, 20.1, 50.0] {
            let want = if x > 20.0 { x as f64 } else { (x as f64).exp().ln_1p() };
            assert!(rel(x.softplus::<Fma>() as f64, want) < 4e-7, "softplus({x})");
            assert!(rel((x as f64).softplus::<Plain>(), want) < 1e-15, "softplus({x}) f64");
            let g = if x > 20.0 { 1.0 } else { 1.0 / (1.0 + (-(x as f64)).exp()) };
            assert!(rel(x.softplus_grad::<Fma>() as f64, g) < 4e-7, "softplus'({x})");
        }
    }
}
