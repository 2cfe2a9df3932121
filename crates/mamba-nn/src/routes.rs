//! Routes: the orders in which a mixer visits the token positions. A mixer gathers the sequence
//! along each route, scans it, scatters the result back and merges the routes. Causal models
//! use [`Route::forward`]; bidirectional ones add [`Route::reverse`]; 2-d scan patterns are
//! routes built from a patch grid.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

type OrderFn = dyn Fn(usize) -> Vec<u32> + Send + Sync;

/// A named permutation of the positions 0..len of a sequence of any length.
#[derive(Clone)]
pub struct Route {
    name: String,
    order: Arc<OrderFn>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Route({})", self.name)
    }
}

impl Route {
    /// `order(len)[i]` is the position visited i-th.
    pub fn new(name: impl Into<String>, order: impl Fn(usize) -> Vec<u32> + Send + Sync + 'static) -> Self {
        Self { name: name.into(), order: Arc::new(order) }
    }

    pub fn forward() -> Self {
        Self::new("forward", |len| (0..len as u32).collect())
    }

    pub fn reverse() -> Self {
        Self::new("reverse", |len| (0..len as u32).rev().collect())
    }

    /// The route of a config name.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "forward" => Ok(Self::forward()),
            "reverse" => Ok(Self::reverse()),
            other => Err(Error::Config {
                path: "routes".into(),
                message: format!("unknown route `{other}` (known: forward, reverse)"),
            }),
        }
    }

    /// The routes of config names, in order.
    pub fn by_names(names: &[String]) -> Result<Vec<Self>> {
        names.iter().map(|n| Self::by_name(n)).collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_forward(&self) -> bool {
        self.name == "forward"
    }

    /// The order for `len` positions, checked to be a permutation.
    pub fn order(&self, len: usize) -> Result<Vec<u32>> {
        let order = (self.order)(len);
        let mut seen = vec![false; len];
        for &p in &order {
            match seen.get_mut(p as usize) {
                Some(s) if !*s => *s = true,
                _ => return Err(self.not_a_permutation(len)),
            }
        }
        if order.len() != len {
            return Err(self.not_a_permutation(len));
        }
        Ok(order)
    }

    fn not_a_permutation(&self, len: usize) -> Error {
        Error::Config { path: format!("route `{}`", self.name), message: format!("is not a permutation of 0..{len}") }
    }
}

/// How the routes' outputs combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    #[default]
    Sum,
    Mean,
}

/// Whether the routes share the SSM parameters (conv, x_proj, dt_proj, A, D) or each has its
/// own, as in Vim's bidirectional blocks and VMamba's cross-scan. in_proj and out_proj are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteParams {
    #[default]
    Shared,
    PerRoute,
}

/// The inverse permutation: gathering by it undoes gathering by `order`.
pub fn inverse(order: &[u32]) -> Vec<u32> {
    let mut inv = vec![0; order.len()];
    for (i, &p) in order.iter().enumerate() {
        inv[p as usize] = i as u32;
    }
    inv
}

fn is_identity(order: &[u32]) -> bool {
    order.iter().enumerate().all(|(i, &p)| p as usize == i)
}

/// x[:, order] for x (batch, len, ...): differentiable (candle's index_select, which needs a
/// contiguous input).
pub fn gather(x: &Tensor, order: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(order, &Device::Cpu)?.to_device(x.device())?;
    Ok(x.contiguous()?.index_select(&idx, 1)?)
}

/// The suffix of route `i`'s own parameters: none for the first, Vim's `_b` for the second.
pub(crate) fn route_suffix(i: usize) -> String {
    match i {
        0 => String::new(),
        1 => "_b".into(),
        i => format!("_r{i}"),
    }
}

/// Step decoding reads only the past: one forward route.
pub(crate) fn check_causal(routes: &[Route]) -> Result<()> {
    if routes.len() == 1 && routes[0].is_forward() {
        return Ok(());
    }
    let names: Vec<_> = routes.iter().map(|r| r.name()).collect();
    Err(Error::Config {
        path: "routes".into(),
        message: format!("step decoding needs one forward route, the mixer has {names:?}"),
    })
}

/// Runs `route_fn(i, order)` for every route, where `order` is route i's order over the
/// sequence, `None` for one in sequence order (forward, or Vim's raster with its class token),
/// and `route_fn` returns its output (batch, len, ...) in sequence order; merges the outputs.
/// Returns the merged output and the cache of the first route.
pub(crate) fn run_routes<C>(
    routes: &[Route],
    merge: Merge,
    len: usize,
    route_fn: impl Fn(usize, Option<&[u32]>) -> Result<(Tensor, C)>,
) -> Result<(Tensor, C)> {
    let mut merged: Option<Tensor> = None;
    let mut first_cache = None;
    for (i, route) in routes.iter().enumerate() {
        let order = Some(route.order(len)?).filter(|o| !is_identity(o));
        let (y, cache) = route_fn(i, order.as_deref())?;
        merged = Some(match merged {
            Some(m) => (m + y)?,
            None => y,
        });
        first_cache.get_or_insert(cache);
    }
    let (Some(mut y), Some(cache)) = (merged, first_cache) else {
        return Err(Error::Config { path: "routes".into(), message: "a mixer needs at least one route".into() });
    };
    if merge == Merge::Mean && routes.len() > 1 {
        y = (y / routes.len() as f64)?;
    }
    Ok((y, cache))
}

/// For a route without an op of its own that reads through the order: runs `f` on the input
/// (batch, len, ...) gathered in route order and puts its output back in sequence order.
pub(crate) fn gathered<C>(
    input: &Tensor,
    order: Option<&[u32]>,
    f: impl FnOnce(&Tensor) -> Result<(Tensor, C)>,
) -> Result<(Tensor, C)> {
    match order {
        Some(o) => {
            let (y, cache) = f(&gather(input, o)?)?;
            Ok((gather(&y, &inverse(o))?, cache))
        }
        None => f(input),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_then_scatter_is_the_identity() {
        let x = Tensor::arange(0f32, 2.0 * 7.0 * 3.0, &Device::Cpu).unwrap().reshape((2, 7, 3)).unwrap();
        for route in [
            Route::forward(),
            Route::reverse(),
            Route::new("odd-even", |n| (0..n as u32).step_by(2).chain((1..n as u32).step_by(2)).collect()),
        ] {
            let order = route.order(7).unwrap();
            let back = gather(&gather(&x, &order).unwrap(), &inverse(&order)).unwrap();
            assert_eq!(back.to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap(), "{}", route.name());
        }
        let bad = Route::new("twice", |n| vec![0; n]);
        assert!(bad.order(3).unwrap_err().to_string().contains("route `twice`"));
        assert!(Route::by_name("sideways").is_err());
    }
}
