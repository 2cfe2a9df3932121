//! A series classification archive, as training and `mamba predict` read it: a UCR `.tsv` file
//! (input starting with a digit or `-`, as its labels do) or an sktime / UEA `.ts` file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{check, scratch, write};

fuzz_target!(|bytes: &[u8]| {
    let tsv = bytes.first().is_some_and(|b| b.is_ascii_digit() || *b == b'-');
    let path = write(scratch(), if tsv { "cases.tsv" } else { "cases.ts" }, bytes);
    if let Some(set) = check(mamba_series::read_archive(&path), &path) {
        assert!(set.labels.iter().all(|&l| l < set.classes.len()), "a label outside the classes");
    }
});
