#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// `line` and `column` count from 1; column 0 when the whole line is at fault.
    #[error("{path}, line {line}{}: {message}", if *column > 0 { format!(", column {column}") } else { String::new() })]
    Parse { path: String, line: usize, column: usize, message: String },
}

pub type Result<T> = std::result::Result<T, SeriesError>;
