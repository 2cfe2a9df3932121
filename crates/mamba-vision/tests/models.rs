//! The vision models against direct computations: Vim with a middle class token, the SS2D
//! cross-scan as the sum of its routes, the patch embedding and depthwise conv against candle's
//! convs, the published parameter counts, and gradients reaching every parameter.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use mamba_nn::{gather, inverse, BackboneConfig, RmsNorm, Route};
use mamba_vision::{
    depthwise_conv2d, drop_path, resize_grid, resize_pos_embed, route, ClassToken, Grid, ImageShape, PatchEmbed,
    Size2d, Ss2d, VisionConfig, VisionModel,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;

fn config(text: &str, shape: ImageShape) -> VisionConfig {
    let mut table: toml::Table = text.parse().unwrap();
    let model = table.remove("model").unwrap().as_table().unwrap().clone();
    let backbone = table.remove("backbone").map(|b| b.as_table().unwrap().clone());
    VisionConfig::from_tables(model, backbone, "test.toml", Some(shape)).unwrap()
}

fn images(batch: usize, channels: usize, size: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = batch * channels * size * size;
    let v: Vec<f32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0)).collect();
    Tensor::from_vec(v, (batch, channels, size, size), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

const SMALL_VIM: &str = r#"
[model]
kind = "vim"
patch_size = 4
class_token = "middle"
[backbone]
kind = "mamba1"
d_model = 16
n_layer = 2
d_state = 4
"#;

#[test]
fn published_sizes_have_the_papers_parameter_counts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vision");
    // Vim-Ti: 7M (Zhu et al. 2024, Table 1); VMamba-T: 30M (Liu et al. 2024, Table 1).
    for (file, lo, hi) in [("vim-tiny.toml", 6.5e6, 7.5e6), ("vmamba-tiny.toml", 28e6, 31e6)] {
        let c = VisionConfig::from_toml_file(&root.join(file)).unwrap();
        let n = c.num_params() as f64;
        assert!(n > lo && n < hi, "{file}: {n} parameters");
    }
}

#[test]
fn vim_with_a_middle_class_token_matches_a_direct_computation() {
    // 9 x 9 images, 4 x 4 patches: a 2 x 2 grid (the remainder cropped), 5 tokens, the class
    // token at position 2. Batch 2.
    let shape = ImageShape { image_size: Size2d::square(9), channels: 3, num_classes: 5 };
    let cfg = config(SMALL_VIM, shape);
    let VisionConfig::Vim(vim_cfg) = &cfg else { panic!("a Vim config") };
    let params = cfg.init_params(7).unwrap();
    let model = VisionModel::load(VarBuilder::from_tensors(params.clone(), DType::F32, &Device::Cpu), &cfg).unwrap();
    let x = images(2, 3, 9, 1);
    let logits = model.forward(&x, None).unwrap();

    // Direct: conv patch embedding, class token inserted by hand, each layer's forward mixer on
    // the sequence and backward mixer on the reversed sequence (single-route mixers loaded from
    // the `_b` tensors), averaged.
    let p = |n: &str| params[n].clone();
    let emb = x.narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap();
    let emb = emb.conv2d(&p("patch_embed.proj.weight"), 0, 4, 1, 1).unwrap();
    let emb = emb.broadcast_add(&p("patch_embed.proj.bias").reshape((1, 16, 1, 1)).unwrap()).unwrap();
    let emb = emb.flatten_from(2).unwrap().transpose(1, 2).unwrap(); // (2, 4, 16)
    let cls = p("cls_token").broadcast_as((2, 1, 16)).unwrap();
    let seq = Tensor::cat(&[&emb.narrow(1, 0, 2).unwrap(), &cls, &emb.narrow(1, 2, 2).unwrap()], 1).unwrap();
    let mut h = seq.broadcast_add(&p("pos_embed")).unwrap();
    let single = BackboneConfig { routes: vec!["forward".into()], ..vim_cfg.backbone.clone() };
    let flip = |t: &Tensor| gather(t, &[4, 3, 2, 1, 0]).unwrap();
    for i in 0..2 {
        let prefix = format!("layers.{i}.mixer.");
        let mixer = |suffix: &str| {
            let mut t = HashMap::new();
            for (name, v) in &params {
                let Some(leaf) = name.strip_prefix(&prefix) else { continue };
                let own = leaf.replace("_b", "");
                // Shared tensors (in_proj, out_proj) serve both; route tensors by suffix.
                let is_route = ["conv1d", "x_proj", "dt_proj", "A", "D"].iter().any(|r| leaf.starts_with(r));
                if !is_route || (suffix.is_empty() != leaf.contains("_b")) {
                    t.insert(own, v.clone());
                }
            }
            let vb = VarBuilder::from_tensors(t, DType::F32, &Device::Cpu);
            single.mixer.spec().load(vb, &single, vec![Route::forward()]).unwrap()
        };
        let (fwd, bwd) = (mixer(""), mixer("_b"));
        let hn = RmsNorm::new(p(&format!("layers.{i}.norm.weight")), 1e-5).forward(&h).unwrap();
        let f = fwd.forward(&hn).unwrap().0;
        let b = flip(&bwd.forward(&flip(&hn)).unwrap().0);
        h = (h + ((f + b).unwrap() * 0.5).unwrap()).unwrap();
    }
    let h = RmsNorm::new(p("norm_f.weight"), 1e-5).forward(&h).unwrap();
    let direct = h.narrow(1, 2, 1).unwrap().squeeze(1).unwrap().matmul(&p("head.weight").t().unwrap()).unwrap();
    let direct = direct.broadcast_add(&p("head.bias")).unwrap();
    assert_eq!(logits.dims(), &[2, 5]);
    assert!(max_diff(&logits, &direct) < 1e-5, "{}", max_diff(&logits, &direct));
}

#[test]
fn cross_scan_merge_is_the_sum_of_the_routes_scanned_separately() {
    let text = r#"
[model]
kind = "vmamba"
patch_size = 2
dims = [8, 16]
depths = [1, 1]
d_state = 3
ssm_ratio = 2.0
gate = true
"#;
    // 10 x 14 images would not be square; 10 x 10 with patch 2: a 5 x 5 grid, then 3 x 3.
    let cfg = config(text, ImageShape { image_size: Size2d::square(10), channels: 1, num_classes: 3 });
    let params = cfg.init_params(3).unwrap();
    let vb = VarBuilder::from_tensors(params, DType::F32, &Device::Cpu);
    let VisionConfig::VMamba(c) = &cfg else { panic!() };
    let ss2d = Ss2d::load(vb.pp("layers.0.blocks.0.op"), c, 8, Grid::new(5, 5)).unwrap();
    let u = images(2, 16, 5, 4).reshape((2, 16, 25)).unwrap();
    let merged = ss2d.cross_scan(&u).unwrap();
    let mut sum = merged.zeros_like().unwrap();
    for k in 0..4 {
        sum = (sum + ss2d.route(k).unwrap().cross_scan(&u).unwrap()).unwrap();
    }
    assert!(max_diff(&merged, &sum) < 1e-5);
    // And the whole model runs: (2, 1, 10, 10) -> (2, 3), through both stages and a 5 -> 3 grid.
    let model = VisionModel::load(vb, &cfg).unwrap();
    assert_eq!(model.forward(&images(2, 1, 10, 5), None).unwrap().dims(), &[2, 3]);
}

#[test]
fn gather_then_scatter_is_the_identity_with_class_tokens() {
    let x = images(2, 1, 13, 6).reshape((2, 13, 13)).unwrap(); // 12 patches + class token
    for name in ["raster", "snake", "hilbert", "spiral", "window2", "reverse_column"] {
        for cls in [ClassToken::Head, ClassToken::Middle] {
            let order = route(name, Grid::new(3, 4), cls).unwrap().order(13).unwrap();
            let back = gather(&gather(&x, &order).unwrap(), &inverse(&order)).unwrap();
            assert_eq!(max_diff(&back, &x), 0.0, "{name} {cls:?}");
        }
    }
}

#[test]
fn patch_embedding_and_depthwise_conv_match_candles_convs() {
    let x = images(2, 3, 11, 8);
    let w = images(5, 3, 3, 9); // (dim 5, channels 3, 3, 3)
    let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 0.5], &Device::Cpu).unwrap();
    let (tokens, grid) = PatchEmbed::new(&w, bias.clone(), Size2d::square(3)).unwrap().forward(&x).unwrap();
    assert_eq!(grid, Grid::new(3, 3));
    let conv = x.conv2d(&w, 0, 3, 1, 1).unwrap().broadcast_add(&bias.reshape((1, 5, 1, 1)).unwrap()).unwrap();
    assert!(max_diff(&tokens, &conv.flatten_from(2).unwrap().transpose(1, 2).unwrap()) < 1e-5);

    // Rectangular and overlapping patches (kernel 3 x 2, stride 2; kernel 2 x 2, stride 1).
    let images_hw = |h: usize, w: usize| images(2, 3, h.max(w), 11).narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
    for (x, kernel, stride, grid) in
        [(images_hw(9, 12), (3, 2), 2, Grid::new(4, 6)), (images_hw(5, 4), (2, 2), 1, Grid::new(4, 3))]
    {
        let w =
            images(5, 3, 3, 12).narrow(2, 0, kernel.0).unwrap().narrow(3, 0, kernel.1).unwrap().contiguous().unwrap();
        let embed = PatchEmbed::new(&w, bias.clone(), Size2d::square(stride)).unwrap();
        let (tokens, g) = embed.forward(&x.contiguous().unwrap()).unwrap();
        assert_eq!(g, grid);
        let conv = x.contiguous().unwrap().conv2d(&w, 0, stride, 1, 1).unwrap();
        let conv = conv.broadcast_add(&bias.reshape((1, 5, 1, 1)).unwrap()).unwrap();
        assert!(max_diff(&tokens, &conv.flatten_from(2).unwrap().transpose(1, 2).unwrap()) < 1e-5, "{kernel:?}");
    }

    let dw = images(3, 1, 3, 10);
    let reference = x
        .conv2d(&dw, 1, 1, 1, 3)
        .unwrap()
        .broadcast_add(&bias.narrow(0, 0, 3).unwrap().reshape((1, 3, 1, 1)).unwrap())
        .unwrap();
    let ours = depthwise_conv2d(&x, &dw, Some(&bias.narrow(0, 0, 3).unwrap())).unwrap();
    assert!(max_diff(&ours, &reference) < 1e-5);
}

#[test]
fn every_parameter_gets_a_gradient() {
    let vmamba = r#"
[model]
kind = "vmamba"
patch_size = 2
dims = [4, 8]
depths = [1, 1]
downsample = "merge"
drop_path = 0.5
"#;
    // Frame tokens as an audio model uses them: full-height patches two frames wide, overlapping.
    let frames = SMALL_VIM.replace("patch_size = 4", "patch_size = [8, 2]\npatch_stride = [8, 1]");
    let square = ImageShape { image_size: Size2d::square(8), channels: 3, num_classes: 4 };
    let wide = ImageShape { image_size: Size2d::new(8, 12), ..square };
    let cases = [(SMALL_VIM, square), (vmamba, square), (SMALL_VIM, wide), (frames.as_str(), wide), (vmamba, wide)];
    for (text, shape) in cases {
        let cfg = config(text, shape);
        let vars: HashMap<String, Var> =
            cfg.init_params(1).unwrap().into_iter().map(|(n, t)| (n, Var::from_tensor(&t).unwrap())).collect();
        let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model = VisionModel::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let (h, w) = (shape.image_size.height, shape.image_size.width);
        let x = images(3, 3, w, 2).narrow(2, 0, h).unwrap().contiguous().unwrap();
        let loss = model.forward(&x, Some(&mut rng)).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient ({})", shape.image_size));
            let finite = g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
            assert!(finite, "{name} in {text} at {}", shape.image_size);
        }
    }
}

#[test]
fn drop_path_drops_whole_examples_and_keeps_the_mean() {
    let x = Tensor::ones((1000, 3), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_diff(&drop_path(&x, 0.3, None).unwrap(), &x), 0.0);
    let y = drop_path(&x, 0.3, Some(&mut StdRng::seed_from_u64(1))).unwrap().to_vec2::<f32>().unwrap();
    for row in &y {
        assert!(row.iter().all(|&v| v == 0.0) || row.iter().all(|&v| (v - 1.0 / 0.7).abs() < 1e-6));
    }
    let mean = y.iter().map(|r| r[0]).sum::<f32>() / 1000.0;
    assert!((mean - 1.0).abs() < 0.1, "{mean}");
}

#[test]
fn position_embeddings_follow_the_image_size() {
    // A linear field over the grid stays linear (bilinear interpolation is exact on it), and the
    // same grid is the identity.
    let from = Grid::new(4, 4);
    let field: Vec<f32> = (0..16).flat_map(|i| [(i / 4) as f32, (i % 4) as f32]).collect();
    let t = Tensor::from_vec(field, (16, 2), &Device::Cpu).unwrap();
    assert_eq!(max_diff(&resize_grid(&t, from, from).unwrap(), &t), 0.0);
    let up = resize_grid(&t, from, Grid::new(8, 8)).unwrap().to_vec2::<f32>().unwrap();
    // Interior cells of the 8 x 8 grid: row coordinate (r + 0.5) / 2 - 0.5.
    for r in 1..7 {
        let expect = ((r as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, 3.0);
        assert!((up[r * 8 + 3][0] - expect).abs() < 1e-6);
    }
    // A Vim model for 8 x 8 images loads a pos_embed made for 16 x 16: the class token's entry
    // moves with the middle of the sequence.
    let shape = |s| ImageShape { image_size: Size2d::square(s), channels: 1, num_classes: 2 };
    let (VisionConfig::Vim(small), VisionConfig::Vim(big)) =
        (config(SMALL_VIM, shape(8)), config(SMALL_VIM, shape(16)))
    else {
        panic!()
    };
    let pos = Tensor::arange(0f32, 17.0 * 16.0, &Device::Cpu).unwrap().reshape((1, 17, 16)).unwrap();
    let resized = resize_pos_embed(&pos, &big, &small).unwrap();
    assert_eq!(resized.dims(), &[1, 5, 16]);
    assert_eq!(
        resized.get(0).unwrap().get(2).unwrap().to_vec1::<f32>().unwrap(),
        pos.get(0).unwrap().get(8).unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn weight_decay_groups_are_the_recipes() {
    // Vim: mamba_ssm's exemptions (A_log, D, dt and conv biases, norms) and the Vim code's
    // no_weight_decay list (class token, position embedding).
    let shape = ImageShape { image_size: Size2d::square(16), channels: 3, num_classes: 5 };
    let params = config(SMALL_VIM, shape).params();
    let mut exempt: Vec<String> =
        params.iter().filter(|p| !p.decay && !p.name.starts_with("layers.1.")).map(|p| p.name.clone()).collect();
    let mut want: Vec<String> =
        ["patch_embed.proj.bias", "norm_f.weight", "head.bias", "cls_token", "pos_embed", "layers.0.norm.weight"]
            .map(String::from)
            .into();
    for s in ["", "_b"] {
        let leaves = [format!("A{s}_log"), format!("D{s}"), format!("dt_proj{s}.bias"), format!("conv1d{s}.bias")];
        want.extend(leaves.map(|n| format!("layers.0.mixer.{n}")));
    }
    exempt.sort();
    want.sort();
    assert_eq!(exempt, want);

    // VMamba, as the Swin optimizer it trains with: biases and one-dimensional tensors only.
    let vmamba = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vision/vmamba-tiny.toml");
    for p in VisionConfig::from_toml_file(&vmamba).unwrap().params() {
        assert_eq!(!p.decay, p.shape.len() == 1 || p.name.ends_with(".bias"), "{}", p.name);
    }
}
