//! Writing tables back in the layout `read_csv` reads, and the time stamps of rows to come.

use crate::error::{Result, SeriesError};
use crate::read::Table;
use chrono::{Months, NaiveDate, NaiveDateTime};
use std::path::Path;

/// Writes `table` as CSV (time column first). Written beside `path` and renamed, so a failure
/// leaves no half file.
pub fn write_csv(path: &Path, table: &Table) -> Result<()> {
    let io = |source: std::io::Error| SeriesError::Io { path: path.display().to_string(), source };
    let csv_err = |e: csv::Error| io(std::io::Error::other(e.to_string()));
    let mut out = csv::Writer::from_writer(vec![]);
    out.write_record(std::iter::once(&table.time_name).chain(&table.names)).map_err(csv_err)?;
    for (t, time) in table.time.iter().enumerate() {
        let values = table.columns.iter().map(|c| if c[t].is_nan() { String::new() } else { c[t].to_string() });
        out.write_record(std::iter::once(time.clone()).chain(values)).map_err(csv_err)?;
    }
    let bytes = out.into_inner().map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let file = path.file_name().map_or("table.csv".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Date-time layouts the time column may use, tried in order.
const DATETIMES: [&str; 4] = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"];

/// A time stamp as understood, so the next ones can be written the same way.
#[derive(Clone, Copy)]
enum Stamp {
    Number(f64),
    /// "YYYY-MM".
    Month(NaiveDate),
    Date(NaiveDate),
    DateTime(NaiveDateTime, &'static str),
}

fn parse(s: &str) -> Option<Stamp> {
    let s = s.trim();
    if let Ok(x) = s.parse() {
        return Some(Stamp::Number(x));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(Stamp::Date(d));
    }
    if let Ok(d) = NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d") {
        return Some(Stamp::Month(d));
    }
    DATETIMES.iter().find_map(|f| NaiveDateTime::parse_from_str(s, f).ok().map(|t| Stamp::DateTime(t, f)))
}

/// Whole months from `a` to `b` when both fall on the same day of the month and time of day.
fn months_between(a: NaiveDateTime, b: NaiveDateTime) -> Option<u32> {
    use chrono::Datelike;
    let months = (b.year() - a.year()) * 12 + b.month() as i32 - a.month() as i32;
    let same_place = a.day() == b.day() && a.time() == b.time();
    (months > 0 && same_place && a.checked_add_months(Months::new(months as u32)) == Some(b)).then_some(months as u32)
}

/// The time stamps of the `n` rows after `times`, continuing the step between its last two rows
/// in the same layout: integers, numbers, "YYYY-MM", "YYYY-MM-DD" and date-times, calendar
/// months when the step is whole months. Anything else (or fewer than two rows): "+1", "+2", ...
pub fn next_times(times: &[String], n: usize) -> Vec<String> {
    let fallback = || (1..=n).map(|i| format!("+{i}")).collect();
    let [.., a, b] = times else { return fallback() };
    let at = |a: NaiveDateTime, b: NaiveDateTime, show: &dyn Fn(NaiveDateTime) -> String| -> Option<Vec<String>> {
        let next = |k: usize| match months_between(a, b) {
            Some(m) => b.checked_add_months(Months::new(m.checked_mul(k as u32)?)),
            None => b.checked_add_signed((b - a).checked_mul(k as i32)?),
        };
        (b > a).then(|| (1..=n).map(|k| next(k).map(show)).collect::<Option<Vec<_>>>()).flatten()
    };
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default();
    let out = match (parse(a), parse(b)) {
        (Some(Stamp::Number(x)), Some(Stamp::Number(y))) => {
            // Whole numbers (years, indices) stay whole.
            let whole = [a, b].iter().all(|s| !s.contains(['.', 'e', 'E']));
            let value = |k: usize| y + k as f64 * (y - x);
            Some(
                (1..=n)
                    .map(|k| if whole { format!("{}", value(k).round() as i64) } else { value(k).to_string() })
                    .collect(),
            )
        }
        (Some(Stamp::Month(a)), Some(Stamp::Month(b))) => {
            at(midnight(a), midnight(b), &|t| t.format("%Y-%m").to_string())
        }
        (Some(Stamp::Date(a)), Some(Stamp::Date(b))) => {
            at(midnight(a), midnight(b), &|t| t.format("%Y-%m-%d").to_string())
        }
        (Some(Stamp::DateTime(a, f)), Some(Stamp::DateTime(b, g))) if f == g => at(a, b, &|t| t.format(f).to_string()),
        _ => None,
    };
    out.unwrap_or_else(fallback)
}
