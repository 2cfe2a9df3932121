//! Writing tables and continuing their time column.

use mamba_series::{next_times, read_csv, write_csv, Table};

fn times(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_time_column_continues_in_its_own_layout() {
    let cases: [(&[&str], &[&str]); 9] = [
        (&["1749-11", "1749-12"], &["1750-01", "1750-02"]),
        (&["2020-01", "2020-04"], &["2020-07", "2020-10"]),
        (&["2016-07-01", "2016-08-01"], &["2016-09-01", "2016-10-01"]),
        (&["2016-01-30", "2016-01-31"], &["2016-02-01", "2016-02-02"]),
        (&["2016-07-01 23:00:00", "2016-07-01 23:15:00"], &["2016-07-01 23:30:00", "2016-07-01 23:45:00"]),
        (&["2016-07-01T22:00", "2016-07-01T23:00"], &["2016-07-02T00:00", "2016-07-02T01:00"]),
        (&["1999", "2000"], &["2001", "2002"]),
        (&["0.5", "0.75"], &["1", "1.25"]),
        (&["monday", "tuesday"], &["+1", "+2"]),
    ];
    for (given, next) in cases {
        assert_eq!(next_times(&times(given), 2), times(next), "after {given:?}");
    }
    // Fewer than two rows, or time running backwards: steps only.
    assert_eq!(next_times(&times(&["2020-01"]), 2), times(&["+1", "+2"]));
    assert_eq!(next_times(&times(&["2020-02-01", "2020-01-01"]), 1), times(&["+1"]));
}

#[test]
fn a_written_table_reads_back() {
    let dir = std::env::temp_dir().join(format!("mamba-series-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = Table {
        time_name: "date".into(),
        time: times(&["2020-01", "2020-02"]),
        names: vec!["a".into(), "b, with a comma".into()],
        columns: vec![vec![1.5, -2.0], vec![f32::NAN, 1e-7]],
        missing: vec![0, 1],
    };
    let path = dir.join("t.csv");
    write_csv(&path, &table).unwrap();
    let back = read_csv(&path).unwrap();
    assert_eq!((back.time_name.as_str(), &back.time, &back.names), ("date", &table.time, &table.names));
    assert_eq!(back.columns[0], table.columns[0]);
    assert!(back.columns[1][0].is_nan() && back.columns[1][1] == 1e-7);
    assert_eq!(back.missing, vec![0, 1]);
    // Nothing else is left in the folder (the temporary file was renamed).
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let e = write_csv(&dir.join("no/such/folder/t.csv"), &table).unwrap_err().to_string();
    assert!(e.contains("no/such/folder"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
