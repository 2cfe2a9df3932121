//! Images from disk: an ImageFolder data set (`root/CLASS/*.png|jpg|jpeg`, classes in name
//! order) and the transforms a classifier trains with, producing (channels, height, width) f32.

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::DynamicImage;
use rand::Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    Image { path: String, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// What to do with an image that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadImages {
    /// Stop with an error naming the file.
    #[default]
    Fail,
    /// Leave it out, and report it in `ImageFolder::skipped`.
    Skip,
}

/// `root/CLASS/IMAGE` files: the classes are the sub-directories, in name order.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub classes: Vec<String>,
    /// (file, class index), in class then file-name order.
    pub items: Vec<(PathBuf, usize)>,
    /// Files left out under `BadImages::Skip`, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// The images of `items`, in their order, when [`ImageFolder::open_keeping`] kept them.
    pub decoded: Option<Vec<DynamicImage>>,
}

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn io(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.display().to_string(), source }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io(dir))?;
    v.sort();
    Ok(v)
}

impl ImageFolder {
    /// Lists `root/CLASS/*.{png,jpg,jpeg}` without reading the files (a checkpoint's evaluation
    /// needs the names, not a check of data it was trained on).
    pub fn scan(root: &Path) -> Result<Self> {
        let mut classes = vec![];
        let mut items = vec![];
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let class = classes.len();
            classes.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            for file in sorted_entries(&dir)? {
                let ext = file.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                    items.push((file, class));
                }
            }
        }
        if items.is_empty() {
            return Err(DataError::Image {
                path: root.display().to_string(),
                message: format!("no images (root/CLASS/*.{{{}}}) found", EXTENSIONS.join(",")),
            });
        }
        Ok(Self { classes, items, skipped: vec![], decoded: None })
    }

    /// Scans `root` and checks that every image decodes (its header and pixels): a corrupt file
    /// is found here, not in the middle of training.
    pub fn open(root: &Path, bad: BadImages) -> Result<Self> {
        Self::open_keeping(root, bad, 0)
    }

    /// As [`ImageFolder::open`], decoding in parallel, and keeping the decoded images in
    /// `decoded` while they take at most `budget` bytes (so that training does not decode them
    /// a second time).
    pub fn open_keeping(root: &Path, bad: BadImages, budget: usize) -> Result<Self> {
        let listed = Self::scan(root)?;
        let (mut items, mut skipped, mut kept) = (vec![], vec![], Some(vec![]));
        let mut bytes = 0;
        // In blocks, so that past the budget the images already kept are let go early.
        for block in listed.items.chunks(256) {
            let images: Vec<_> = block.par_iter().map(|(file, _)| image::open(file)).collect();
            for ((file, class), image) in block.iter().zip(images) {
                match image {
                    Ok(img) => {
                        items.push((file.clone(), *class));
                        bytes += img.as_bytes().len();
                        kept = kept.filter(|_| bytes <= budget);
                        if let Some(k) = &mut kept {
                            k.push(img);
                        }
                    }
                    Err(e) if bad == BadImages::Skip => skipped.push((file.clone(), e.to_string())),
                    Err(e) => {
                        return Err(DataError::Image { path: file.display().to_string(), message: e.to_string() })
                    }
                }
            }
        }
        if items.is_empty() {
            return Err(DataError::Image {
                path: root.display().to_string(),
                message: format!("no image in it decodes ({} skipped)", skipped.len()),
            });
        }
        Ok(Self { classes: listed.classes, items, skipped, decoded: kept })
    }
}

/// The image file at `path`, decoded.
pub fn decode(path: &Path) -> Result<DynamicImage> {
    image::open(path).map_err(|e| DataError::Image { path: path.display().to_string(), message: e.to_string() })
}

/// How an image becomes a tensor: to `channels` (1 grayscale, 3 RGB), resized so that its
/// shorter side is `resize`, cropped to `crop` x `crop` (centre, or random when training),
/// flipped left-right with probability `hflip` when training, then (x / 255 - mean) / std per
/// channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transform {
    pub channels: usize,
    pub resize: u32,
    pub crop: u32,
    pub hflip: f64,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Transform {
    /// The (channels, crop, crop) tensor of the image at `path`. `rng` is used when training
    /// (random crop and flip), `None` gives the centre crop, unflipped.
    pub fn load(&self, path: &Path, rng: Option<&mut impl Rng>) -> Result<Tensor> {
        self.apply(decode(path)?, rng)
    }

    pub fn apply(&self, img: DynamicImage, mut rng: Option<&mut impl Rng>) -> Result<Tensor> {
        let (w, h) = (img.width().max(1), img.height().max(1));
        let scale = self.resize as f64 / w.min(h) as f64;
        let (nw, nh) =
            (((w as f64 * scale).round() as u32).max(self.crop), ((h as f64 * scale).round() as u32).max(self.crop));
        let img = if (nw, nh) == (w, h) { img } else { img.resize_exact(nw, nh, FilterType::Triangle) };
        let (x0, y0) = match rng.as_deref_mut() {
            Some(r) => (r.random_range(0..=nw - self.crop), r.random_range(0..=nh - self.crop)),
            None => ((nw - self.crop) / 2, (nh - self.crop) / 2),
        };
        let mut img = img.crop_imm(x0, y0, self.crop, self.crop);
        if let Some(r) = rng {
            if r.random_bool(self.hflip.clamp(0.0, 1.0)) {
                img = img.fliph();
            }
        }
        let (c, s) = (self.channels, self.crop as usize);
        let pixels: Vec<u8> = match c {
            1 => img.into_luma8().into_raw(),
            _ => img.into_rgb8().into_raw(),
        };
        let c = if c == 1 { 1 } else { 3 };
        // Interleaved (h, w, c) bytes to planar (c, h, w), normalised.
        let mut out = vec![0f32; c * s * s];
        for (i, px) in pixels.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                let (m, sd) = (self.mean.get(ch).copied().unwrap_or(0.0), self.std.get(ch).copied().unwrap_or(1.0));
                out[ch * s * s + i] = (v as f32 / 255.0 - m) / sd;
            }
        }
        Ok(Tensor::from_vec(out, (c, s, s), &Device::Cpu)?)
    }
}
