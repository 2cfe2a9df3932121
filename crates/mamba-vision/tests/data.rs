//! ImageFolder and transforms on the bundled MNIST images, and corrupt files.

use mamba_vision::{BadImages, ImageFolder, Transform};
use rand::{rngs::StdRng, SeedableRng};
use std::path::PathBuf;

fn mnist(split: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/mnist-5k").join(split)
}

fn gray(resize: u32, crop: u32) -> Transform {
    Transform { channels: 1, resize, crop, hflip: 0.5, mean: vec![0.5], std: vec![0.5] }
}

#[test]
fn the_bundled_mnist_is_an_image_folder() {
    let test = ImageFolder::open(&mnist("test"), BadImages::Fail).unwrap();
    assert_eq!(test.classes, (0..10).map(|d| d.to_string()).collect::<Vec<_>>());
    assert_eq!(test.items.len(), 1000);
    assert!(test.items.iter().all(|(p, c)| p.parent().unwrap().ends_with(c.to_string())));
    let (path, _) = &test.items[0];
    let x = gray(28, 28).load(path, None::<&mut StdRng>).unwrap();
    assert_eq!(x.dims(), &[1, 28, 28]);
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    // A digit: mostly background (-1 after normalisation), some ink near +1.
    assert!(v.iter().all(|&p| (-1.0..=1.0).contains(&p)));
    assert!(v.iter().filter(|&&p| p > 0.5).count() > 20 && v.iter().filter(|&&p| p < -0.9).count() > 300);
    // RGB, resized up and cropped; random crops and flips repeat with the seed.
    let rgb = Transform { channels: 3, resize: 40, crop: 32, hflip: 0.5, mean: vec![0.5; 3], std: vec![0.25; 3] };
    assert_eq!(rgb.load(path, None::<&mut StdRng>).unwrap().dims(), &[3, 32, 32]);
    let draw = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..4)
            .map(|_| rgb.load(path, Some(&mut rng)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn corrupt_images_fail_or_are_skipped_by_choice() {
    let root = std::env::temp_dir().join(format!("mamba-vision-corrupt-{}", std::process::id()));
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        std::fs::copy(mnist("train").join("3/1500.png"), root.join(class).join("good.png")).unwrap();
    }
    std::fs::write(root.join("b/broken.png"), b"not a png").unwrap();
    std::fs::write(root.join("b/notes.txt"), b"ignored").unwrap();
    let err = ImageFolder::open(&root, BadImages::Fail).unwrap_err().to_string();
    assert!(err.contains("broken.png"), "{err}");
    let skip = ImageFolder::open(&root, BadImages::Skip).unwrap();
    assert_eq!(skip.items.len(), 2);
    assert!(skip.skipped.len() == 1 && skip.skipped[0].0.ends_with("b/broken.png"));
    assert!(skip.decoded.is_none(), "open keeps no pixels");
    // Kept within the budget, in the order of the items; past it, none.
    let kept = ImageFolder::open_keeping(&root, BadImages::Skip, 1 << 20).unwrap();
    assert_eq!(kept.items, skip.items);
    let decoded = kept.decoded.expect("two 28 x 28 images fit in 1 MiB");
    for ((path, _), img) in kept.items.iter().zip(&decoded) {
        assert_eq!(img.as_bytes(), mamba_vision::decode(path).unwrap().as_bytes());
    }
    assert!(ImageFolder::open_keeping(&root, BadImages::Skip, 28 * 28).unwrap().decoded.is_none());
    // A scan lists the files without reading them: the broken one too.
    assert_eq!(ImageFolder::scan(&root).unwrap().items.len(), 3);
    let empty = ImageFolder::open(&root.join("a/nothing"), BadImages::Fail).unwrap_err().to_string();
    assert!(empty.contains("nothing"), "{empty}");
    std::fs::remove_dir_all(&root).unwrap();
}
