//! Runs the scan kernels on the bundled PyTorch reference data (tests/fixtures) and prints how
//! far they are from it, forward and gradients.
//!
//! cargo run --release -p mamba-ssm --example parity

use candle_core::{safetensors, DType, Device, Tensor, Var};
use mamba_ssm::{selective_scan, ssd_chunk_scan, ScanParams, SsdParams};
use std::collections::HashMap;

type Fixture = HashMap<String, Tensor>;

fn load(name: &str) -> anyhow::Result<Fixture> {
    let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    safetensors::load(&path, &Device::Cpu).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))
}

fn max_rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
}

/// Prints one line per compared tensor: name, max |ours - torch| / max |torch|.
fn report(what: &str, pairs: &[(String, Tensor, Tensor)]) -> anyhow::Result<f64> {
    let mut worst: f64 = 0.0;
    for (name, ours, theirs) in pairs {
        let e = max_rel(ours, theirs)?;
        worst = worst.max(e);
        println!("  {what:<22} {name:<16} {e:.2e}");
    }
    Ok(worst)
}

fn selective(fx: &Fixture, variant: &str, suffix: &str, dtype: DType) -> anyhow::Result<f64> {
    let full = variant == "full";
    let mut names = vec!["u", if full { "delta" } else { "delta_pos" }, "A", "B", "C"];
    if full {
        names.extend(["D", "z", "delta_bias"]);
    }
    let vars = names
        .iter()
        .map(|k| Var::from_tensor(&fx[&format!("in.{k}")].to_dtype(dtype)?))
        .collect::<Result<Vec<_>, _>>()?;
    let t = |i: usize| vars[i].as_tensor();
    let p = if full {
        ScanParams { d: Some(t(5)), z: Some(t(6)), delta_bias: Some(t(7)), delta_softplus: true }
    } else {
        ScanParams::default()
    };
    let out = selective_scan(t(0), t(1), t(2), t(3), t(4), &p, None)?;
    let grads = (&out.y * fx["dout"].to_dtype(dtype)?)?.sum_all()?.backward()?;
    let want = |k: &str| fx[&format!("{variant}.{k}{suffix}")].clone();
    let mut pairs =
        vec![("y".into(), out.y.clone(), want("y")), ("last_state".into(), out.last_state.clone(), want("last_state"))];
    for (k, v) in names.iter().zip(&vars) {
        pairs.push((format!("d{k}"), grads.get(v.as_tensor()).unwrap().clone(), want(&format!("grad_{k}"))));
    }
    report(&format!("selective {variant} {dtype:?}"), &pairs)
}

fn ssd(fx: &Fixture, suffix: &str, dtype: DType, chunk: usize) -> anyhow::Result<f64> {
    let names = ["x", "dt", "A", "B", "C", "D", "dt_bias"];
    let vars = names
        .iter()
        .map(|k| Var::from_tensor(&fx[&format!("in.{k}")].to_dtype(dtype)?))
        .collect::<Result<Vec<_>, _>>()?;
    let t = |i: usize| vars[i].as_tensor();
    let p = SsdParams { d: Some(t(5)), dt_bias: Some(t(6)), dt_softplus: true, ..Default::default() };
    let out = ssd_chunk_scan(t(0), t(1), t(2), t(3), t(4), chunk, &p, None)?;
    let grads = (&out.y * fx["dout"].to_dtype(dtype)?)?.sum_all()?.backward()?;
    let want = |k: &str| fx[&format!("{k}{suffix}")].clone();
    let mut pairs = vec![
        ("y".into(), out.y.clone(), want("y")),
        ("final_state".into(), out.last_state.clone(), want("last_state")),
    ];
    for (k, v) in names.iter().zip(&vars) {
        pairs.push((format!("d{k}"), grads.get(v.as_tensor()).unwrap().clone(), want(&format!("grad_{k}"))));
    }
    report(&format!("ssd chunk {chunk} {dtype:?}"), &pairs)
}

fn main() -> anyhow::Result<()> {
    println!("max |ours - PyTorch| / max |PyTorch| on tests/fixtures (made by tests/fixtures/make_reference.py)");
    let scan = load("selective_scan.safetensors")?;
    let ssd_fx = load("ssd_scan.safetensors")?;
    let mut worst = [0f64; 2];
    for (suffix, dtype, slot) in [("", DType::F32, 0), ("_f64", DType::F64, 1)] {
        for variant in ["full", "plain"] {
            worst[slot] = worst[slot].max(selective(&scan, variant, suffix, dtype)?);
        }
        for chunk in [8, 5, 64] {
            worst[slot] = worst[slot].max(ssd(&ssd_fx, suffix, dtype, chunk)?);
        }
    }
    println!("worst: f32 {:.2e} (tolerance 1e-4), f64 {:.2e}", worst[0], worst[1]);
    anyhow::ensure!(worst[0] <= 1e-4 && worst[1] <= 1e-10, "parity outside tolerance");
    Ok(())
}
