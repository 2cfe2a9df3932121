//! Vision end to end: any ImageFolder trains with no code change (RGB, non-square images of
//! another size, more classes, both model kinds), `mamba eval` reports the confusion matrix,
//! `mamba predict` labels image files, corrupt images fail or are skipped by choice, and
//! `mamba scan show` draws patterns.

mod common;

use common::{assert_cuda_refused, eval_accuracy, eval_on_data, mamba, scratch, text};
use std::path::Path;

/// Six classes of 20 x 16 RGB images, each class a colour with noise on top, JPEG and PNG mixed:
/// `per_class` images per class under root/CLASS/.
fn colour_folder(root: &Path, per_class: usize, seed: u32) {
    let colours: [[i32; 3]; 6] =
        [[220, 30, 30], [30, 200, 40], [40, 40, 220], [230, 220, 30], [200, 40, 210], [30, 210, 220]];
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 61) as i32 - 30
    };
    for (k, c) in colours.iter().enumerate() {
        let dir = root.join(format!("colour{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(20, 16, |_, _| image::Rgb(c.map(|v| (v + noise()).clamp(0, 255) as u8)));
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("{i}.{ext}"))).unwrap();
        }
    }
}

fn config(data: &Path, model: &str, extra_task: &str) -> String {
    format!(
        r#"
[task]
kind = "image_classification"
train = "{train}"
validation = "{val}"
image_size = 12
resize = 14
channels = 3
hflip = 0.5
{extra_task}

{model}

[train]
epochs = 8
batch_size = 8
seed = 1
log_every = 5
checkpoint_every = 50

[optim]
lr = 1e-2
warmup_steps = 5
"#,
        train = data.join("train").display(),
        val = data.join("val").display(),
    )
}

const VIM: &str = r#"
[model]
kind = "vim"
patch_size = 4
class_token = "head"
scan = ["snake", "reverse_hilbert"]
[backbone]
kind = "mamba2"
d_model = 16
n_layer = 1
d_state = 8
headdim = 8
chunk_size = 4
"#;

const VMAMBA: &str = r#"
[model]
kind = "vmamba"
patch_size = 2
dims = [8, 16]
depths = [1, 1]
d_state = 2
"#;

#[test]
fn any_image_folder_trains_evaluates_and_predicts() {
    let dir = scratch("colours");
    colour_folder(&dir.join("train"), 16, 1);
    colour_folder(&dir.join("val"), 3, 2);
    for (name, model) in [("vim", VIM), ("vmamba", VMAMBA)] {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config(&dir, model, "")).unwrap();
        let out = dir.join(format!("run-{name}"));
        let o = mamba(&["train", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o));

        // `mamba eval` reads the validation images only: the training folder may be gone (its
        // mean and std, measured when training, are the checkpoint's).
        std::fs::rename(dir.join("train"), dir.join("train-away")).unwrap();
        let (svg, best) = (dir.join(format!("confusion-{name}.svg")), out.join("best"));
        let eval = ["eval", "--checkpoint", best.to_str().unwrap(), "--confusion", svg.to_str().unwrap()];
        if !cfg!(feature = "cuda") {
            assert_cuda_refused(&mamba(&[&eval[..], &["--device", "cuda:0"]].concat()));
            assert!(!svg.exists(), "nothing written");
        }
        let o = mamba(&[&eval[..], &["--device", "cpu"]].concat());
        let report = text(&o);
        let drawn = std::fs::read_to_string(&svg).unwrap();
        assert!(drawn.contains("<svg") && drawn.contains("colour5") && drawn.contains("predicted"));
        assert!(o.status.success(), "{report}");
        let accuracy = eval_accuracy(&report);
        // Six well-separated colours: chance is 1/6.
        assert!(accuracy >= 0.9, "{name}: accuracy {accuracy}\n{report}");
        assert!(report.contains("confusion (rows: true, columns: predicted)") && report.contains("colour5"));
        assert!(report.contains("top5"), "six classes get a top-5 accuracy: {report}");
        // --data: another folder (2 images per class, not the validation set's 3).
        colour_folder(&dir.join("other"), 2, 3);
        let (images, accuracy) = eval_on_data(&best, &dir.join("other"));
        assert_eq!(images, 12, "{name}");
        assert!(accuracy >= 0.9, "{name}: accuracy {accuracy}");
        let o =
            mamba(&["eval", "--checkpoint", best.to_str().unwrap(), "--data", dir.join("nowhere").to_str().unwrap()]);
        assert!(!o.status.success() && text(&o).contains("nowhere"), "{}", text(&o));
        std::fs::rename(dir.join("train-away"), dir.join("train")).unwrap();

        let img = dir.join("val/colour2/0.png");
        let o = mamba(&["predict", "--checkpoint", out.join("best").to_str().unwrap(), img.to_str().unwrap()]);
        let line = text(&o);
        assert!(o.status.success() && line.contains(": colour2 "), "{name}: {line}");
        // At another image size (16 instead of 12: a 4 x 4 patch grid instead of 3 x 3, Vim's
        // position embedding interpolated), the colour is still told.
        let o =
            mamba(&["predict", "--checkpoint", best.to_str().unwrap(), "--image-size", "16", img.to_str().unwrap()]);
        let line = text(&o);
        assert!(o.status.success() && line.contains(": colour2 "), "{name} at 16 x 16: {line}");
    }
}

#[test]
fn corrupt_images_fail_the_run_or_are_skipped_by_choice() {
    let dir = scratch("corrupt");
    colour_folder(&dir.join("train"), 4, 3);
    colour_folder(&dir.join("val"), 2, 4);
    let bad = dir.join("train/colour1/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let cfg = dir.join("fail.toml");
    std::fs::write(&cfg, config(&dir, VMAMBA, "").replace("epochs = 8", "epochs = 1")).unwrap();
    let o = mamba(&["train", cfg.to_str().unwrap(), "--out", dir.join("run-fail").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("broken.png"), "{}", text(&o));
    assert!(!dir.join("run-fail/last").exists(), "nothing trained");

    let cfg = dir.join("skip.toml");
    std::fs::write(&cfg, config(&dir, VMAMBA, "bad_images = \"skip\"").replace("epochs = 8", "epochs = 1")).unwrap();
    let o = mamba(&["train", cfg.to_str().unwrap(), "--out", dir.join("run-skip").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("skipped") && text(&o).contains("broken.png"), "{}", text(&o));
}

/// Validation split off the training folder (with a file that does not decode, skipped): `mamba
/// eval` splits it again as training did (checking which files decode, since the split depends on
/// it) and scores what training scored.
#[test]
fn eval_redoes_a_fraction_split() {
    let dir = scratch("fraction");
    colour_folder(&dir.join("train"), 6, 7);
    std::fs::write(dir.join("train/colour3/broken.png"), b"not a png").unwrap();
    let val_line = format!("validation = \"{}\"\n", dir.join("val").display());
    let text_cfg = config(&dir, VMAMBA, "bad_images = \"skip\"\nvalidation_fraction = 0.25")
        .replace(&val_line, "")
        .replace("epochs = 8", "epochs = 1");
    let cfg = dir.join("fraction.toml");
    std::fs::write(&cfg, text_cfg).unwrap();
    let out = dir.join("run");
    let o = mamba(&["train", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let trained = text(&o)
        .lines()
        .find_map(|l| l.strip_prefix("validation: accuracy "))
        .and_then(|v| v.split(',').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no validation line in {}", text(&o)));
    let o = mamba(&["eval", "--checkpoint", out.join("best").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let evaluated = eval_accuracy(&text(&o));
    assert!((trained - evaluated).abs() < 1e-4, "training scored {trained}, eval {evaluated}");
    // Which files decode decides the split, so eval checks them again and says so.
    assert!(text(&o).contains("skipped") && text(&o).contains("broken.png"), "{}", text(&o));
}

#[test]
fn bad_vision_configs_name_the_key() {
    let dir = scratch("config");
    colour_folder(&dir.join("train"), 1, 5);
    colour_folder(&dir.join("val"), 1, 6);
    for (model, key) in [
        (VIM.replace("\"snake\"", "\"zigzag\""), "zigzag"),
        (VIM.replace("patch_size = 4", "patch_size = 40"), "patch_size"),
        (VIM.replace("[model]", "[model]\nnum_classes = 10"), "num_classes"),
        (VMAMBA.replace("depths = [1, 1]", "depths = [1]"), "depths"),
        (VIM.replace("patch_size = 4", "patch_size = 4\npatch_szie = 4"), "patch_szie"),
        (VMAMBA.replace("d_state = 2", "d_state = 2\nmlp = 2"), "mlp"),
        (VIM.replace("d_state = 8", "d_state = 8\nroutes = [\"forward\"]"), "routes"),
    ] {
        let cfg = dir.join("bad.toml");
        std::fs::write(&cfg, config(&dir, &model, "")).unwrap();
        let o = mamba(&["train", cfg.to_str().unwrap(), "--out", dir.join("run").to_str().unwrap()]);
        assert!(!o.status.success());
        assert!(text(&o).contains("bad.toml") && text(&o).contains(key), "{key}: {}", text(&o));
    }
}

#[test]
fn scan_show_draws_the_pattern() {
    let dir = scratch("scan");
    let png = dir.join("hilbert.png");
    let o = mamba(&["scan", "show", "--pattern", "hilbert", "--grid", "6x10", "--out", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(&png).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), (10 * 32, 6 * 32));
    // The first cell (top-left) carries the white start mark at its centre.
    assert_eq!(img.get_pixel(16, 16).0, [255, 255, 255]);
    for (args, needle) in [
        (["--pattern", "zigzag", "--grid", "4x4"], "zigzag"),
        (["--pattern", "raster", "--grid", "4by4"], "4by4"),
        (["--pattern", "raster", "--grid", "100000x100000"], "at most 1024 x 1024 cells"),
        (["--pattern", "raster", "--grid", "18446744073709551615x3"], "at most 1024 x 1024 cells"),
        (["--pattern", "raster", "--grid", "600x2"], "16384 pixels a side"),
    ] {
        let o = mamba(&["scan", "show", args[0], args[1], args[2], args[3], "--out", png.to_str().unwrap()]);
        assert!(!o.status.success() && text(&o).contains(needle), "{}", text(&o));
    }
}
