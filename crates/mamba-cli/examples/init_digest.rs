//! A digest of what a training run starts from, for every config named: each initial tensor's
//! shape and a hash of its bits, whether AdamW decays it and whether it is a matrix (held in the
//! weight dtype). The trainer's trajectory is a function of these and of the code, so a refactor
//! of how models declare their tensors keeps every run bit for bit exactly when the digests
//! before and after it are equal:
//!
//!     cargo run -p mamba-cli --example init_digest -- models/*/*.toml > before.txt
//!
//! Files that are not training configs (model shapes such as models/mamba-130m.toml) are listed
//! with the reason they were skipped.

use mamba_cli::TASKS;
use mamba_train::DynTask;
use std::fmt::Write;
use std::path::Path;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn digest(task: &dyn DynTask, seed: u64, out: &mut String) -> Result<()> {
    let tensors = task.init_params(seed)?;
    let mut declared = task.params();
    declared.sort_by(|a, b| a.name.cmp(&b.name));
    for p in declared {
        let bits: Vec<f32> = tensors[&p.name].flatten_all()?.to_vec1()?;
        // FNV-1a over the f32 bit patterns.
        let hash =
            bits.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3));
        writeln!(out, "{} {:?} {hash:016x} decay={} matrix={}", p.name, p.shape, p.decay, p.matrix)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut out = String::new();
    for path in std::env::args().skip(1) {
        let run = match TASKS.load(Path::new(&path), &[]) {
            Ok(run) => run,
            Err(e) => {
                writeln!(out, "# skipped {path}: {e}")?;
                continue;
            }
        };
        writeln!(out, "## {path}")?;
        let seed = run.train.seed;
        digest(run.task.as_ref(), seed, &mut out)?;
    }
    print!("{out}");
    Ok(())
}
