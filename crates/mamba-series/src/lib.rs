//! Time series for Mamba models (started): readers for the formats people bring. `read_csv`: a
//! table with a time column and any number of variables (the ETT / Electricity / Weather
//! layout); `read_ts`: sktime / UEA `.ts` classification archives (univariate or multivariate,
//! equal or unequal length, `?` for missing values); `read_ucr_tsv`: the UCR archive's `.tsv`.
//! Malformed input is an error naming the file, line and column.

mod error;
mod read;

pub use error::{Result, SeriesError};
pub use read::{read_csv, read_ts, read_ucr_tsv, Labelled, Table};
