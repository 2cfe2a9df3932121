//! A forecasting CSV table (time, then one column per variable), read as training and
//! `mamba predict` read it, then written back as a forecast file is.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{check, scratch, write};

fuzz_target!(|bytes: &[u8]| {
    let path = write(scratch(), "table.csv", bytes);
    if let Some(table) = check(mamba_series::read_csv(&path), &path) {
        let out = scratch().join("written.csv");
        check(mamba_series::write_csv(&out, &table), &out);
    }
});
