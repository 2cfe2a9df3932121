//! Every scan pattern is a permutation of any grid; the continuous ones step to neighbours.

use mamba_vision::{pattern, route, ClassToken, Grid};

const GRIDS: [(usize, usize); 10] = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 5), (5, 3), (4, 4), (8, 8), (6, 10), (14, 14)];
const NAMES: [&str; 11] = [
    "raster",
    "column",
    "snake",
    "snake_column",
    "hilbert",
    "diagonal",
    "spiral",
    "window2",
    "window3",
    "atrous2",
    "atrous3",
];

fn cell(i: u32, cols: usize) -> (i64, i64) {
    ((i as usize / cols) as i64, (i as usize % cols) as i64)
}

#[test]
fn every_pattern_is_a_permutation_and_reverse_reverses_it() {
    for (rows, cols) in GRIDS {
        let grid = Grid::new(rows, cols);
        for name in NAMES {
            let order = pattern(name, grid).unwrap();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..(rows * cols) as u32).collect::<Vec<_>>(), "{name} on {rows}x{cols}");
            let mut reversed = pattern(&format!("reverse_{name}"), grid).unwrap();
            reversed.reverse();
            assert_eq!(reversed, order, "reverse_{name}");
            assert_eq!(route(name, grid, ClassToken::None).unwrap().order(rows * cols).unwrap(), order);
            // With a class token: a permutation of one more position, the patches in the
            // pattern's order, the class token where it sits in the sequence.
            for cls in [ClassToken::Head, ClassToken::Middle] {
                let at = cls.position(rows * cols).unwrap() as u32;
                let with = route(name, grid, cls).unwrap().order(rows * cols + 1).unwrap();
                assert_eq!(with[at as usize], at, "{name} {cls:?}");
                let patches: Vec<u32> =
                    with.iter().filter(|&&p| p != at).map(|&p| if p > at { p - 1 } else { p }).collect();
                assert_eq!(patches, order, "{name} {cls:?}");
            }
        }
    }
}

#[test]
fn vim_routes_are_the_sequence_and_its_reverse() {
    // 7 x 7 patches with the class token in the middle (position 24): Vim's forward scan reads the
    // sequence as it is, its backward scan reads it reversed, whatever the grid's parity.
    for (rows, cols) in [(7, 7), (2, 3), (1, 1)] {
        let n = rows * cols + 1;
        let grid = Grid::new(rows, cols);
        let forward = route("raster", grid, ClassToken::Middle).unwrap().order(n).unwrap();
        assert_eq!(forward, (0..n as u32).collect::<Vec<_>>());
        let backward = route("reverse_raster", grid, ClassToken::Middle).unwrap().order(n).unwrap();
        assert_eq!(backward, (0..n as u32).rev().collect::<Vec<_>>());
    }
}

#[test]
fn continuous_patterns_step_to_neighbours() {
    for (rows, cols) in GRIDS {
        for name in ["snake", "snake_column", "spiral", "hilbert"] {
            let order = pattern(name, Grid::new(rows, cols)).unwrap();
            let mut diagonal = 0;
            for w in order.windows(2) {
                let ((r0, c0), (r1, c1)) = (cell(w[0], cols), cell(w[1], cols));
                let (dr, dc) = ((r1 - r0).abs(), (c1 - c0).abs());
                match dr + dc {
                    1 => {}
                    2 if dr == 1 && name == "hilbert" => diagonal += 1,
                    _ => panic!("{name} on {rows}x{cols}: a jump from {:?} to {:?}", (r0, c0), (r1, c1)),
                }
            }
            // The generalised Hilbert curve needs a diagonal step only when both sides are odd.
            assert!(diagonal <= usize::from(rows % 2 == 1 && cols % 2 == 1), "{name} on {rows}x{cols}: {diagonal}");
            assert_eq!(order[0], 0, "{name} starts in the top-left corner");
        }
    }
}

#[test]
fn the_small_cases_read_as_their_definitions() {
    let g = Grid::new(4, 4);
    assert_eq!(&pattern("window2", g).unwrap()[..8], &[0, 1, 4, 5, 2, 3, 6, 7]);
    assert_eq!(&pattern("atrous2", g).unwrap()[..8], &[0, 2, 8, 10, 1, 3, 9, 11]);
    assert_eq!(pattern("diagonal", Grid::new(2, 3)).unwrap(), vec![0, 1, 3, 2, 4, 5]);
    assert_eq!(pattern("spiral", Grid::new(3, 3)).unwrap(), vec![0, 1, 2, 5, 8, 7, 6, 3, 4]);
    assert_eq!(pattern("snake", Grid::new(2, 3)).unwrap(), vec![0, 1, 2, 5, 4, 3]);
    assert_eq!(pattern("column", Grid::new(2, 3)).unwrap(), vec![0, 3, 1, 4, 2, 5]);
    // On a 4 x 4 grid the generalised curve is the Hilbert curve (from the top-left to the top-right corner).
    assert_eq!(pattern("hilbert", g).unwrap(), vec![0, 1, 5, 4, 8, 12, 13, 9, 10, 14, 15, 11, 7, 6, 2, 3]);
}

#[test]
fn unknown_patterns_are_named() {
    for bad in ["zigzag", "window0", "windowx", "reverse_nope"] {
        let msg = pattern(bad, Grid::new(2, 2)).unwrap_err().to_string();
        assert!(msg.contains("unknown pattern") && msg.contains("raster"), "{bad}: {msg}");
    }
    // A route over a grid refuses another length.
    assert!(route("raster", Grid::new(2, 2), ClassToken::None).unwrap().order(5).is_err());
}
