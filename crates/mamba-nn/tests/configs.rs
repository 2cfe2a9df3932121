//! The model files in models/ parse, and their parameter counts are those of the released
//! checkpoints: worked out by hand from the architectures (tied heads counted once), and within
//! 1 % of the sizes in the checkpoints' names.

use mamba_nn::{LmConfig, MambaLm};
use std::path::PathBuf;

fn count(name: &str) -> f64 {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../models/{name}.toml"));
    let cfg = LmConfig::from_toml_file(&path).unwrap();
    MambaLm::tensor_shapes(&cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>() as f64
}

#[test]
fn published_sizes() {
    // By hand, Mamba-1 per layer: in_proj 2 di d, conv di (k + 1), x_proj (R + 2N) di, dt_proj
    // di R + di, A di N, D di, out_proj d di, norm d; Mamba-2: in_proj (2 di + 2 G N + H) d, conv
    // (di + 2 G N)(k + 1), A/D/dt_bias 3H, gated norm di, out_proj d di, norm d; plus V d + d.
    for (name, by_hand, nominal) in [
        ("mamba-130m", 129_135_360.0, 130e6),
        ("mamba-370m", 371_516_416.0, 370e6),
        ("mamba2-130m", 128_989_632.0, 130e6),
        ("mamba2-370m", 368_346_624.0, 370e6),
    ] {
        let n = count(name);
        assert_eq!(n, by_hand, "{name}");
        assert!((n / nominal - 1.0).abs() < 0.01, "{name}: {n} parameters");
    }
}
