//! 2-D scan patterns: the order in which a mixer visits the patches of an (rows x cols) grid,
//! as a permutation of the raster indices `row * cols + col`. Every pattern works for any grid
//! size (odd, non-square, 1 x N) and has a config name; `reverse_NAME` reverses any of them.
//!
//! | name | order |
//! |---|---|
//! | `raster` | row by row, left to right |
//! | `column` | column by column, top to bottom |
//! | `snake` | rows, alternating direction: each step goes to a neighbour (PlainMamba, ZigMa) |
//! | `snake_column` | columns, alternating direction |
//! | `hilbert` | a generalised Hilbert curve, defined for any rectangle (not only 2^k squares) |
//! | `diagonal` | anti-diagonals (row + col constant), top-right to bottom-left within each |
//! | `spiral` | clockwise from the top-left corner inwards |
//! | `windowK` | K x K windows in raster order, raster inside each (LocalMamba), e.g. `window2` |
//! | `atrousK` | the K x K sub-grids of cells K apart, one after the other (EfficientVMamba) |

use mamba_nn::{Error, Result, Route};

/// A patch grid: rows x cols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
}

impl Grid {
    pub fn new(rows: usize, cols: usize) -> Self {
        Self { rows, cols }
    }

    fn at(&self, row: usize, col: usize) -> u32 {
        (row * self.cols + col) as u32
    }
}

/// The names `pattern` knows (K stands for a window or skip size).
pub fn pattern_names() -> &'static [&'static str] {
    &["raster", "column", "snake", "snake_column", "hilbert", "diagonal", "spiral", "windowK", "atrousK"]
}

fn unknown(name: &str) -> Error {
    Error::Config {
        path: "scan pattern".into(),
        message: format!("unknown pattern `{name}` (known: {}, and reverse_ of any)", pattern_names().join(", ")),
    }
}

/// The order of the named pattern over `grid`.
pub fn pattern(name: &str, grid: Grid) -> Result<Vec<u32>> {
    if let Some(inner) = name.strip_prefix("reverse_") {
        let mut order = pattern(inner, grid)?;
        order.reverse();
        return Ok(order);
    }
    let size = |prefix: &str| -> Result<Option<usize>> {
        match name.strip_prefix(prefix) {
            None => Ok(None),
            Some(k) => match k.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Some(k)),
                _ => Err(unknown(name)),
            },
        }
    };
    let Grid { rows, cols } = grid;
    Ok(match name {
        "raster" => (0..rows * cols).map(|i| i as u32).collect(),
        "column" => (0..cols).flat_map(|c| (0..rows).map(move |r| grid.at(r, c))).collect(),
        "snake" => (0..rows)
            .flat_map(|r| (0..cols).map(move |c| grid.at(r, if r % 2 == 0 { c } else { cols - 1 - c })))
            .collect(),
        "snake_column" => (0..cols)
            .flat_map(|c| (0..rows).map(move |r| grid.at(if c % 2 == 0 { r } else { rows - 1 - r }, c)))
            .collect(),
        "hilbert" => hilbert(grid),
        "diagonal" => (0..rows + cols.saturating_sub(1))
            .flat_map(|d| (0..rows).filter(move |&r| d >= r && d - r < cols).map(move |r| grid.at(r, d - r)))
            .collect(),
        "spiral" => spiral(grid),
        _ => {
            if let Some(k) = size("window")? {
                windows(grid, k)
            } else if let Some(k) = size("atrous")? {
                (0..k * k)
                    .flat_map(|o| {
                        let (dr, dc) = (o / k, o % k);
                        (dr..rows).step_by(k).flat_map(move |r| (dc..cols).step_by(k).map(move |c| grid.at(r, c)))
                    })
                    .collect()
            } else {
                return Err(unknown(name));
            }
        }
    })
}

/// Where a model puts its class token in the token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassToken {
    /// First (ViT, DeiT).
    Head,
    /// Between the first and second half of the patches (Vim): position `patches / 2`.
    #[default]
    Middle,
    /// No class token: the classifier mean-pools the patch tokens.
    None,
}

impl ClassToken {
    /// Where the class token sits in a sequence of `patches` patch tokens plus it, if present.
    pub fn position(self, patches: usize) -> Option<usize> {
        match self {
            ClassToken::Head => Some(0),
            ClassToken::Middle => Some(patches / 2),
            ClassToken::None => None,
        }
    }

    /// Tokens in the sequence of `patches` patches.
    pub fn tokens(self, patches: usize) -> usize {
        patches + usize::from(self != ClassToken::None)
    }
}

/// The named pattern as a mixer route over the token sequence of `grid`: the patches in raster
/// order with the class token (if any) at `cls.position`. The route visits the patches in the
/// pattern's order and the class token at the same point of the visit as its place in the
/// sequence (first for `Head`, half-way for `Middle`), so that `raster` is the identity.
/// `reverse_NAME` is the exact reverse of NAME's route: Vim's backward scan.
pub fn route(name: &str, grid: Grid, cls: ClassToken) -> Result<Route> {
    let order = token_order(name, grid, cls)?;
    // The grid fixes the length: over any other, `Route::order` reports a non-permutation.
    Ok(Route::new(name, move |_| order.clone()))
}

fn token_order(name: &str, grid: Grid, cls: ClassToken) -> Result<Vec<u32>> {
    if let Some(inner) = name.strip_prefix("reverse_") {
        let mut order = token_order(inner, grid, cls)?;
        order.reverse();
        return Ok(order);
    }
    let patches = pattern(name, grid)?;
    let Some(at) = cls.position(patches.len()) else { return Ok(patches) };
    // Patch p sits at sequence position p, or p + 1 from the class token on.
    let mut order: Vec<u32> = patches.iter().map(|&p| if p as usize >= at { p + 1 } else { p }).collect();
    order.insert(at, at as u32);
    Ok(order)
}

/// Windows of k x k (smaller at the right and bottom edges), in raster order, raster inside each.
fn windows(grid: Grid, k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(grid.rows * grid.cols);
    for r0 in (0..grid.rows).step_by(k) {
        for c0 in (0..grid.cols).step_by(k) {
            for r in r0..(r0 + k).min(grid.rows) {
                out.extend((c0..(c0 + k).min(grid.cols)).map(|c| grid.at(r, c)));
            }
        }
    }
    out
}

/// Clockwise from the top-left, ring by ring inwards.
fn spiral(grid: Grid) -> Vec<u32> {
    let mut out = Vec::with_capacity(grid.rows * grid.cols);
    let (mut top, mut left) = (0i64, 0i64);
    let (mut bottom, mut right) = (grid.rows as i64 - 1, grid.cols as i64 - 1);
    let at = |r: i64, c: i64| grid.at(r as usize, c as usize);
    while top <= bottom && left <= right {
        out.extend((left..=right).map(|c| at(top, c)));
        out.extend((top + 1..=bottom).map(|r| at(r, right)));
        if top < bottom {
            out.extend((left..right).rev().map(|c| at(bottom, c)));
        }
        if left < right {
            out.extend((top + 1..bottom).rev().map(|r| at(r, left)));
        }
        (top, left, bottom, right) = (top + 1, left + 1, bottom - 1, right - 1);
    }
    out
}

/// A generalised Hilbert curve over any rectangle: the rectangle is cut recursively into two or
/// three parts along its longer side, each filled by a curve whose end meets the next one's
/// start. On 2^k x 2^k grids it is the Hilbert curve; elsewhere every step goes to a neighbour,
/// but for at most one diagonal step when both sides are odd.
fn hilbert(grid: Grid) -> Vec<u32> {
    let mut out = Vec::with_capacity(grid.rows * grid.cols);
    let (w, h) = (grid.cols as i64, grid.rows as i64);
    let mut visit = |x: i64, y: i64| out.push(grid.at(y as usize, x as usize));
    if w >= h {
        fill(&mut visit, (0, 0), (w, 0), (0, h));
    } else {
        fill(&mut visit, (0, 0), (0, h), (w, 0));
    }
    out
}

/// Fills the rectangle at `p` spanned by the major axis `a` and the minor axis `b` (vectors along
/// x or y, signs giving the directions), visiting (x, y) cells.
fn fill(visit: &mut impl FnMut(i64, i64), p: (i64, i64), a: (i64, i64), b: (i64, i64)) {
    let (w, h) = ((a.0 + a.1).abs(), (b.0 + b.1).abs());
    let (da, db) = ((a.0.signum(), a.1.signum()), (b.0.signum(), b.1.signum()));
    let (mut x, mut y) = p;
    if h == 1 || w == 1 {
        let (d, n) = if h == 1 { (da, w) } else { (db, h) };
        for _ in 0..n {
            visit(x, y);
            (x, y) = (x + d.0, y + d.1);
        }
        return;
    }
    let half = |v: (i64, i64)| (v.0.div_euclid(2), v.1.div_euclid(2));
    let (mut a2, mut b2) = (half(a), half(b));
    let (w2, h2) = ((a2.0 + a2.1).abs(), (b2.0 + b2.1).abs());
    if 2 * w > 3 * h {
        // Long and thin: two halves along the major axis, an even first half when possible.
        if w2 % 2 == 1 && w > 2 {
            a2 = (a2.0 + da.0, a2.1 + da.1);
        }
        fill(visit, (x, y), a2, b);
        fill(visit, (x + a2.0, y + a2.1), (a.0 - a2.0, a.1 - a2.1), b);
    } else {
        // Up the minor axis, along the whole major axis, back down.
        if h2 % 2 == 1 && h > 2 {
            b2 = (b2.0 + db.0, b2.1 + db.1);
        }
        fill(visit, (x, y), b2, a2);
        fill(visit, (x + b2.0, y + b2.1), a, (b.0 - b2.0, b.1 - b2.1));
        let end = (x + (a.0 - da.0) + (b2.0 - db.0), y + (a.1 - da.1) + (b2.1 - db.1));
        fill(visit, end, (-b2.0, -b2.1), (-(a.0 - a2.0), -(a.1 - a2.1)));
    }
}

/// A picture of the order in which `order` visits `grid`: each cell coloured by its step (dark
/// blue first, through green, to yellow last), the path drawn through the cell centres, the
/// first cell marked with a white square and the last with a black one. `cell` pixels a side.
pub fn draw_order(order: &[u32], grid: Grid, cell: u32) -> image::RgbImage {
    let (w, h) = (grid.cols as u32 * cell, grid.rows as u32 * cell);
    let mut img = image::RgbImage::new(w.max(1), h.max(1));
    let n = order.len().max(2) as f32 - 1.0;
    let centre = |p: u32| {
        let (r, c) = (p as usize / grid.cols.max(1), p as usize % grid.cols.max(1));
        ((c as f32 + 0.5) * cell as f32, (r as f32 + 0.5) * cell as f32)
    };
    for (step, &p) in order.iter().enumerate() {
        let colour = ramp(step as f32 / n);
        let (cx, cy) = centre(p);
        let (x0, y0) = ((cx - cell as f32 / 2.0) as u32, (cy - cell as f32 / 2.0) as u32);
        for y in y0..(y0 + cell).min(h) {
            for x in x0..(x0 + cell).min(w) {
                // A one-pixel grey border between cells.
                let edge = x == x0 || y == y0;
                img.put_pixel(x, y, if edge { image::Rgb([200, 200, 200]) } else { colour });
            }
        }
    }
    for pair in order.windows(2) {
        let ((x0, y0), (x1, y1)) = (centre(pair[0]), centre(pair[1]));
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for s in 0..=steps {
            let t = s as f32 / steps as f32;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for (dx, dy) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
                let (px, py) = ((x + dx - 0.5) as u32, (y + dy - 0.5) as u32);
                if px < w && py < h {
                    img.put_pixel(px, py, image::Rgb([20, 20, 20]));
                }
            }
        }
    }
    let ends = [(order.first(), [255, 255, 255]), (order.last(), [0, 0, 0])];
    for (p, fill) in ends.into_iter().filter_map(|(p, fill)| Some((*p?, fill))) {
        let (cx, cy) = centre(p);
        let r = (cell / 5).max(1) as f32;
        for y in (cy - r) as u32..(cy + r) as u32 {
            for x in (cx - r) as u32..(cx + r) as u32 {
                if x < w && y < h {
                    img.put_pixel(x, y, image::Rgb(fill));
                }
            }
        }
    }
    img
}

/// A blue-green-yellow colour ramp (close to viridis) for t in [0, 1].
fn ramp(t: f32) -> image::Rgb<u8> {
    let stops =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let x = t.clamp(0.0, 1.0) * (stops.len() - 1) as f32;
    let (i, f) = ((x.floor() as usize).min(stops.len() - 2), x - x.floor().min((stops.len() - 2) as f32));
    let mix = |k: usize| (stops[i][k] + f * (stops[i + 1][k] - stops[i][k])) as u8;
    image::Rgb([mix(0), mix(1), mix(2)])
}
