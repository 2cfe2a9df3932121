//! The three readers. Missing values (empty CSV cells, `NA`, `NaN`; `?` in `.ts`; `NaN` in UCR
//! `.tsv`) become NaN and are counted, so a caller can report or refuse them; anything else that
//! is not a number is an error at its line and column.

use crate::error::{Result, SeriesError};
use std::path::Path;

/// A table of variables over time: `columns[v][t]` is variable `v` at row `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The time column's name and its values as written (dates are not parsed: rows are taken
    /// as equally spaced).
    pub time_name: String,
    pub time: Vec<String>,
    pub names: Vec<String>,
    pub columns: Vec<Vec<f32>>,
    /// Missing cells per variable.
    pub missing: Vec<usize>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time.is_empty()
    }
}

/// Labelled series for classification: `series[i][d]` is dimension `d` of case `i` (lengths
/// may differ between cases when the archive says so), `labels[i]` an index into `classes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    pub series: Vec<Vec<Vec<f32>>>,
    pub labels: Vec<usize>,
    pub classes: Vec<String>,
    /// Missing values over all cases.
    pub missing: usize,
}

impl Labelled {
    pub fn dims(&self) -> usize {
        self.series.first().map_or(0, |s| s.len())
    }

    /// The first missing value as (case, dimension, step), counting from 1.
    pub fn first_missing(&self) -> Option<(usize, usize, usize)> {
        self.series.iter().enumerate().find_map(|(i, case)| {
            case.iter()
                .enumerate()
                .find_map(|(d, values)| values.iter().position(|v| v.is_nan()).map(|t| (i + 1, d + 1, t + 1)))
        })
    }

    /// The longest case's length.
    pub fn max_len(&self) -> usize {
        self.series.iter().flat_map(|s| s.iter().map(|d| d.len())).max().unwrap_or(0)
    }

    fn class_of(&mut self, label: &str) -> usize {
        match self.classes.iter().position(|c| c == label) {
            Some(i) => i,
            None => {
                self.classes.push(label.to_string());
                self.classes.len() - 1
            }
        }
    }
}

/// Errors at (line, column) of `path`.
fn parse_error(path: &Path) -> impl Fn(usize, usize, String) -> SeriesError {
    let path = path.display().to_string();
    move |line, column, message| SeriesError::Parse { path: path.clone(), line, column, message }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| SeriesError::Io { path: path.display().to_string(), source: e })
}

/// A number, or None for a missing value (`missing` lists the spellings).
fn number(cell: &str, missing: &[&str]) -> std::result::Result<Option<f32>, String> {
    let cell = cell.trim();
    if missing.iter().any(|m| cell.eq_ignore_ascii_case(m)) {
        return Ok(None);
    }
    match cell.parse::<f32>() {
        // Rust also parses "inf", "-nan" and numbers past f32's range: none is a measurement.
        Ok(v) if v.is_finite() => Ok(Some(v)),
        Ok(_) => Err(format!("{cell:?} is not a finite number")),
        Err(_) => Err(format!("{cell:?} is not a number")),
    }
}

/// A CSV file with a header row, the time in the first column and one variable per other
/// column. Rows with another number of fields than the header, and cells that are neither
/// numbers nor missing (empty, `NA`, `NaN`), are errors naming the line and column.
pub fn read_csv(path: &Path) -> Result<Table> {
    let err = parse_error(path);
    let text = read_text(path)?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let header = reader.headers().map_err(|e| err(1, 0, e.to_string()))?.clone();
    if header.len() < 2 {
        return Err(err(1, 0, "the header needs a time column and at least one variable".into()));
    }
    let names: Vec<String> = header.iter().skip(1).map(|h| h.trim().to_string()).collect();
    let time_name = header[0].trim().to_string();
    let mut table =
        Table { time_name, time: vec![], columns: vec![vec![]; names.len()], missing: vec![0; names.len()], names };
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            err(line, 0, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.len() != header.len() {
            let message = format!("{} fields, but the header has {}", record.len(), header.len());
            return Err(err(line, 0, message));
        }
        table.time.push(record[0].trim().to_string());
        for (v, cell) in record.iter().skip(1).enumerate() {
            let value = number(cell, &["", "NA", "NaN", "null"]).map_err(|m| err(line, v + 2, m))?;
            if value.is_none() {
                table.missing[v] += 1;
            }
            table.columns[v].push(value.unwrap_or(f32::NAN));
        }
    }
    if table.is_empty() {
        return Err(err(2, 0, "no rows after the header".into()));
    }
    Ok(table)
}

/// An sktime / UEA `.ts` file: `#` comments, `@` header lines (`@problemName`, `@univariate`,
/// `@dimensions`, `@equalLength`, `@seriesLength`, `@missing`, `@classLabel true L1 L2 ...`),
/// then `@data` and one case per line: dimensions separated by `:`, values by `,`, the class
/// label last. `?` is a missing value. Time stamps (`@timeStamps true`) are not supported.
pub fn read_ts(path: &Path) -> Result<Labelled> {
    let err = parse_error(path);
    let text = read_text(path)?;
    let mut out = Labelled { series: vec![], labels: vec![], classes: vec![], missing: 0 };
    let (mut in_data, mut equal_length, mut declared_len, mut has_labels) = (false, true, None, false);
    let mut dims: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !in_data {
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default().to_ascii_lowercase();
            let flag = |w: Option<&str>| match w.map(str::to_ascii_lowercase).as_deref() {
                Some("true") => Ok(true),
                Some("false") => Ok(false),
                other => Err(err(line_no, 0, format!("{key} needs true or false, not {other:?}"))),
            };
            match key.as_str() {
                "@data" => in_data = true,
                "@timestamps" if flag(words.next())? => {
                    return Err(err(line_no, 0, "time-stamped .ts files are not supported".into()))
                }
                "@equallength" => equal_length = flag(words.next())?,
                "@serieslength" => {
                    let w = words.next().unwrap_or_default();
                    declared_len = Some(w.parse::<usize>().map_err(|_| err(line_no, 0, format!("bad length {w:?}")))?);
                }
                "@dimensions" => {
                    let w = words.next().unwrap_or_default();
                    dims = Some(w.parse::<usize>().map_err(|_| err(line_no, 0, format!("bad dimensions {w:?}")))?);
                }
                "@classlabel" => {
                    has_labels = flag(words.next())?;
                    for label in words {
                        out.class_of(label);
                    }
                }
                // Descriptive or implied by the data: @problemName, @univariate, @missing, ...
                k if k.starts_with('@') => {}
                _ => return Err(err(line_no, 0, format!("expected a header line or @data, found {line:?}"))),
            }
            continue;
        }
        let mut fields: Vec<&str> = line.split(':').collect();
        let label = if has_labels {
            let l = fields.pop().unwrap_or_default().trim();
            if !out.classes.is_empty() && !out.classes.iter().any(|c| c == l) {
                let message = format!("class {l:?} is not among the declared {:?}", out.classes);
                return Err(err(line_no, 0, message));
            }
            Some(l)
        } else {
            None
        };
        if fields.is_empty() {
            return Err(err(line_no, 0, format!("a case with no values, only the label {:?}", label.unwrap_or(""))));
        }
        match dims {
            Some(d) if d != fields.len() => {
                let message = format!("{} dimensions, expected {d}", fields.len());
                return Err(err(line_no, 0, message));
            }
            _ => dims = Some(fields.len()),
        }
        let mut case = Vec::with_capacity(fields.len());
        let mut column = 0;
        for field in fields {
            let mut values = Vec::new();
            for cell in field.split(',') {
                column += 1;
                let v = number(cell, &["?", "NaN"]).map_err(|m| err(line_no, column, m))?;
                out.missing += v.is_none() as usize;
                values.push(v.unwrap_or(f32::NAN));
            }
            case.push(values);
        }
        let len = case[0].len();
        if equal_length && (case.iter().any(|d| d.len() != len) || declared_len.is_some_and(|n| n != len)) {
            let lengths: Vec<usize> = case.iter().map(|d| d.len()).collect();
            let message = format!("lengths {lengths:?}, but the header says equal length {declared_len:?}");
            return Err(err(line_no, 0, message));
        }
        if let Some(l) = label {
            let class = out.class_of(l);
            out.labels.push(class);
        }
        out.series.push(case);
    }
    if out.series.is_empty() {
        return Err(err(text.lines().count(), 0, "no cases (is @data missing?)".into()));
    }
    Ok(out)
}

/// A UCR archive `.tsv` file: one case per line, the class label first, then the values,
/// tab-separated; `NaN` pads the shorter cases of the variable-length sets and is dropped from
/// the end of each case (NaN inside a case is a missing value).
pub fn read_ucr_tsv(path: &Path) -> Result<Labelled> {
    let err = parse_error(path);
    let text = read_text(path)?;
    let mut out = Labelled { series: vec![], labels: vec![], classes: vec![], missing: 0 };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut cells = line.split('\t');
        let label = cells.next().unwrap_or_default().trim().to_string();
        let mut values = Vec::new();
        for (c, cell) in cells.enumerate() {
            values.push(number(cell, &["NaN"]).map_err(|m| err(i + 1, c + 2, m))?.unwrap_or(f32::NAN));
        }
        while values.last().is_some_and(|v| v.is_nan()) {
            values.pop();
        }
        if values.is_empty() {
            return Err(err(i + 1, 0, "a case with no values".into()));
        }
        out.missing += values.iter().filter(|v| v.is_nan()).count();
        let class = out.class_of(&label);
        out.labels.push(class);
        out.series.push(vec![values]);
    }
    if out.series.is_empty() {
        return Err(err(1, 0, "no cases".into()));
    }
    Ok(out)
}
