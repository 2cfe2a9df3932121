//! The readers on the bundled archives and on small files written here, good and broken.

use mamba_series::{read_csv, read_ts, read_ucr_tsv, SeriesError};
use std::path::{Path, PathBuf};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data").join(rel)
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mamba-series-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// (line, column) of a parse error, and its message with the file name.
fn parse_error(e: SeriesError) -> (usize, usize, String) {
    let message = e.to_string();
    match e {
        SeriesError::Parse { line, column, .. } => (line, column, message),
        other => panic!("expected a parse error, got {other}"),
    }
}

#[test]
fn the_bundled_ucr_sets_read_with_their_published_sizes() {
    // Sizes from the UCR archive's table: GunPoint 50 / 150 of length 150, ItalyPowerDemand
    // 67 / 1,029 of length 24, two classes each.
    for (file, cases, len) in [
        ("ucr/GunPoint/GunPoint_TRAIN.ts", 50, 150),
        ("ucr/GunPoint/GunPoint_TEST.ts", 150, 150),
        ("ucr/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts", 67, 24),
        ("ucr/ItalyPowerDemand/ItalyPowerDemand_TEST.ts", 1029, 24),
    ] {
        let set = read_ts(&data(file)).unwrap();
        assert_eq!((set.series.len(), set.dims(), set.max_len()), (cases, 1, len), "{file}");
        assert_eq!(set.classes, ["1", "2"], "{file}");
        assert_eq!(set.labels.len(), cases);
        assert_eq!(set.missing, 0);
    }
    // The first GunPoint training case, as the file writes it.
    let set = read_ts(&data("ucr/GunPoint/GunPoint_TRAIN.ts")).unwrap();
    assert_eq!(&set.series[0][0][..3], &[-0.6478854, -0.64199155, -0.63818632]);
}

#[test]
fn the_bundled_csvs_read_with_their_variables() {
    let sun = read_csv(&data("forecasting/sunspots-monthly.csv")).unwrap();
    assert_eq!((sun.len(), sun.names.as_slice()), (3177, ["sunspots".to_string()].as_slice()));
    assert_eq!((sun.time[0].as_str(), sun.columns[0][0]), ("1749-01", 58.0));
    assert_eq!(sun.time.last().unwrap(), "2013-09");
    let belts = read_csv(&data("forecasting/seatbelts-monthly.csv")).unwrap();
    assert_eq!((belts.len(), belts.names.len()), (192, 8));
    assert_eq!(belts.names[0], "DriversKilled");
    assert_eq!(belts.missing, vec![0; 8]);
}

#[test]
fn csv_errors_name_the_file_line_and_column() {
    let (line, column, msg) =
        parse_error(read_csv(&scratch("ragged.csv", "date,a,b\n1,1.0,2.0\n2,3.0\n")).unwrap_err());
    assert_eq!((line, column), (3, 0));
    assert!(msg.contains("ragged.csv") && msg.contains("2 fields, but the header has 3"), "{msg}");

    let (line, column, msg) =
        parse_error(read_csv(&scratch("text.csv", "date,a,b\n1,1.0,2.0\n2,3.0,high\n")).unwrap_err());
    assert_eq!((line, column), (3, 3));
    assert!(msg.contains("text.csv, line 3, column 3") && msg.contains("\"high\""), "{msg}");

    let (line, _, _) = parse_error(read_csv(&scratch("header.csv", "date\n1\n")).unwrap_err());
    assert_eq!(line, 1);
    parse_error(read_csv(&scratch("empty.csv", "date,a\n")).unwrap_err());

    // Missing cells are NaN and counted per variable.
    let t = read_csv(&scratch("gaps.csv", "date,a,b\n1,,2\n2,NA,3\n3,1,NaN\n")).unwrap();
    assert_eq!(t.missing, vec![2, 1]);
    assert!(t.columns[0][0].is_nan() && t.columns[1][1] == 3.0);

    // Infinities, "-nan" and numbers past f32's range parse in Rust, but are not measurements.
    for cell in ["inf", "-Infinity", "-nan", "1e39"] {
        let text = format!("date,a\n1,1.0\n2,{cell}\n");
        let (line, column, msg) = parse_error(read_csv(&scratch("inf.csv", &text)).unwrap_err());
        assert_eq!((line, column), (3, 2), "{msg}");
        assert!(msg.contains("not a finite number"), "{msg}");
    }
}

#[test]
fn ts_files_multivariate_unequal_and_broken() {
    let header = "#c\n@problemName x\n@univariate false\n@dimensions 2\n@classLabel true a b\n";
    let good = format!("{header}@equalLength false\n@data\n1,2,3:4,5,6:a\n1,?,3,4:5,6,7,8:b\n");
    let set = read_ts(&scratch("multi.ts", &good)).unwrap();
    assert_eq!((set.dims(), set.max_len(), set.missing), (2, 4, 1));
    assert_eq!(set.labels, [0, 1]);
    assert!(set.series[1][0][1].is_nan());
    assert_eq!(set.first_missing(), Some((2, 1, 2)));

    let cases = [
        (format!("{header}@data\n1,2:3,4:c\n"), 7, 0, "class \"c\""),
        (format!("{header}@data\n1,2:a\n"), 7, 0, "1 dimensions, expected 2"),
        (format!("{header}@data\n1,x:3,4:a\n"), 7, 2, "\"x\" is not a number"),
        (format!("{header}@data\n1,2:3,inf:a\n"), 7, 4, "\"inf\" is not a finite number"),
        (format!("{header}@equalLength true\n@data\n1,2:3,4,5:a\n"), 8, 0, "equal length"),
        (format!("{header}@timeStamps true\n@data\n"), 6, 0, "time-stamped"),
        (format!("{header}\n"), 6, 0, "no cases"),
        // Labels but no @dimensions, and a line without `:`: the label is all there is.
        ("@classLabel true\n@data\n5\n".to_string(), 3, 0, "no values"),
    ];
    for (text, line, column, expect) in cases {
        let (l, c, msg) = parse_error(read_ts(&scratch("bad.ts", &text)).unwrap_err());
        assert!(msg.contains("bad.ts") && msg.contains(expect), "{msg}");
        assert_eq!((l, c), (line, column), "{msg}");
    }
}

#[test]
fn ucr_tsv_files_drop_trailing_padding() {
    let set = read_ucr_tsv(&scratch("set.tsv", "1\t0.5\t1.5\tNaN\tNaN\n2\t1\tNaN\t3\t4\n")).unwrap();
    assert_eq!(set.series[0][0], vec![0.5, 1.5]);
    assert_eq!((set.series[1][0].len(), set.missing), (4, 1));
    assert_eq!(set.first_missing(), Some((2, 1, 2)));
    assert_eq!(set.classes, ["1", "2"]);
    let (line, column, _) = parse_error(read_ucr_tsv(&scratch("bad.tsv", "1\t0.5\n2\t0.1\toops\n")).unwrap_err());
    assert_eq!((line, column), (2, 3));
}
