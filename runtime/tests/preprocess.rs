//! Image preprocessing against the reference pipeline (Pillow + transformers) and against small
//! hand-checked cases. Everything lives in `mod preprocess` so that
//! `cargo test -p carrot-runtime preprocess` selects it.

mod preprocess {
    use std::path::{Path, PathBuf};

    use carrot_runtime::preprocess::{
        DEFAULT_MAX_PIXELS, PassOrder, PreprocessConfig, PreprocessError, decode_image,
        expand_to_square, load_image, preprocess, resize_bicubic, resize_bicubic_ordered,
    };
    use image::{ImageBuffer, ImageEncoder, Luma, LumaA, Rgb, RgbImage, Rgba};

    fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("runtime/ has a parent")
            .to_path_buf()
    }

    fn grey_row(values: &[u8]) -> RgbImage {
        RgbImage::from_fn(values.len() as u32, 1, |x, _| Rgb([values[x as usize]; 3]))
    }

    fn grey_rows(rows: &[&[u8]]) -> RgbImage {
        RgbImage::from_fn(rows[0].len() as u32, rows.len() as u32, |x, y| {
            Rgb([rows[y as usize][x as usize]; 3])
        })
    }

    /// Channel 0 of every pixel, row by row, after checking that the image is grey.
    fn grey_values(img: &RgbImage) -> Vec<Vec<u8>> {
        (0..img.height())
            .map(|y| {
                (0..img.width())
                    .map(|x| {
                        let p = img.get_pixel(x, y);
                        assert!(p[0] == p[1] && p[1] == p[2], "not grey at ({x},{y}): {p:?}");
                        p[0]
                    })
                    .collect()
            })
            .collect()
    }

    // ---------------------------------------------------------------- resize, hand-checked

    #[test]
    fn resize_identity_returns_the_input() {
        let img = RgbImage::from_fn(7, 5, |x, y| Rgb([(x * 31) as u8, (y * 47) as u8, 200]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let img = RgbImage::from_pixel(13, 9, Rgb([255, 0, 77]));
        for (w, h) in [(1, 1), (4, 3), (29, 40), (13, 2), (2, 9), (60, 60)] {
            let out = resize_bicubic(&img, w, h);
            assert!(out.pixels().all(|p| *p == Rgb([255, 0, 77])), "{w}x{h}");
        }
        let dot = RgbImage::from_pixel(1, 1, Rgb([77, 78, 79]));
        let out = resize_bicubic(&dot, 3, 2);
        assert!(out.pixels().all(|p| *p == Rgb([77, 78, 79])));
    }

    // The expected grey levels of the resize cases below are Pillow 13.0's, printed by
    // runtime/tests/data/resize_reference.py (one line per case, same names).

    #[test]
    fn resize_upscale_two_to_four() {
        // Scale 0.5, kernel not stretched. Output 1 is centred at 0.75: taps at distance 0.25
        // (weight 0.8671875) and 0.75 (weight 0.2265625), normalised by their sum 1.09375, so it
        // is 255 × 0.2071… = 52.8 → 53. Output 0 gets a negative weight on 255 and clips to 0.
        let out = resize_bicubic(&grey_row(&[0, 255]), 4, 1);
        assert_eq!(grey_values(&out), vec![vec![0, 53, 202, 255]]);
    }

    #[test]
    fn resize_downscale_odd_factors() {
        // Factor 3: support 6, output centres 1.5, 4.5, 7.5; every kernel is renormalised at the
        // borders, so a linear ramp is not reproduced exactly at the ends.
        let out = resize_bicubic(&grey_row(&[0, 10, 20, 30, 40, 50, 60, 70, 80]), 3, 1);
        assert_eq!(grey_values(&out), vec![vec![11, 40, 69]]);
        // Factor 7/3.
        let out = resize_bicubic(&grey_row(&[10, 40, 70, 100, 130, 160, 190]), 3, 1);
        assert_eq!(grey_values(&out), vec![vec![32, 100, 168]]);
        let out = resize_bicubic(&grey_row(&[0, 255, 0, 255, 0, 255, 0]), 3, 1);
        assert_eq!(grey_values(&out), vec![vec![111, 130, 111]]);
    }

    #[test]
    fn resize_one_pixel_wide_and_tall() {
        let column = grey_rows(&[&[0], &[50], &[100], &[150], &[200]]);
        let out = resize_bicubic(&column, 1, 2);
        assert_eq!(grey_values(&out), vec![vec![43], vec![157]]);
        let out = resize_bicubic(&grey_row(&[0, 50, 100, 150, 200]), 1, 1);
        assert_eq!(grey_values(&out), vec![vec![100]]);
    }

    #[test]
    fn resize_two_dimensional_upscale() {
        let dot = grey_rows(&[&[0, 0, 0], &[0, 255, 0], &[0, 0, 0]]);
        let out = resize_bicubic(&dot, 5, 5);
        assert_eq!(
            grey_values(&out),
            vec![
                vec![0, 0, 0, 0, 0],
                vec![0, 40, 101, 40, 0],
                vec![0, 101, 255, 101, 0],
                vec![0, 40, 101, 40, 0],
                vec![0, 0, 0, 0, 0],
            ]
        );
        let out = resize_bicubic(&grey_rows(&[&[0, 200, 40], &[255, 10, 90]]), 2, 5);
        assert_eq!(
            grey_values(&out),
            vec![
                vec![67, 109],
                vec![82, 101],
                vec![121, 78],
                vec![160, 55],
                vec![175, 47]
            ]
        );
    }

    #[test]
    fn resize_pass_order_follows_pillow() {
        // Width grows while height shrinks: Pillow ≥ 13 runs the vertical pass first. The
        // 8-bit intermediate makes the two orders differ in the first pixel.
        let img = grey_rows(&[&[0, 37], &[11, 48], &[22, 59]]);
        let pillow = resize_bicubic(&img, 5, 1);
        assert_eq!(grey_values(&pillow), vec![vec![7, 13, 30, 46, 52]]);
        let vertical = resize_bicubic_ordered(&img, 5, 1, PassOrder::VerticalFirst);
        assert_eq!(pillow, vertical);
        let horizontal = resize_bicubic_ordered(&img, 5, 1, PassOrder::HorizontalFirst);
        assert_eq!(grey_values(&horizontal), vec![vec![8, 13, 30, 46, 52]]);
    }

    // ---------------------------------------------------------------- expand_to_square

    #[test]
    fn expand_wide_image_pastes_vertically_centred() {
        // 5×2: margin 3, pasted at y = 3 / 2 = 1, so one padding row above and two below.
        let img = RgbImage::from_pixel(5, 2, Rgb([1, 2, 3]));
        let sq = expand_to_square(&img, [127, 127, 127]);
        assert_eq!(sq.dimensions(), (5, 5));
        for y in 0..5 {
            for x in 0..5 {
                let want = if (1..3).contains(&y) {
                    [1, 2, 3]
                } else {
                    [127; 3]
                };
                assert_eq!(sq.get_pixel(x, y).0, want, "({x},{y})");
            }
        }
    }

    #[test]
    fn expand_tall_image_pastes_horizontally_centred() {
        // 2×6: margin 4, pasted at x = 2.
        let img = RgbImage::from_fn(2, 6, |x, y| Rgb([x as u8, y as u8, 9]));
        let sq = expand_to_square(&img, [10, 20, 30]);
        assert_eq!(sq.dimensions(), (6, 6));
        for y in 0..6 {
            for x in 0..6 {
                let want = if (2..4).contains(&x) {
                    [(x - 2) as u8, y as u8, 9]
                } else {
                    [10, 20, 30]
                };
                assert_eq!(sq.get_pixel(x, y).0, want, "({x},{y})");
            }
        }
    }

    #[test]
    fn expand_square_image_is_unchanged() {
        let img = RgbImage::from_fn(4, 4, |x, y| Rgb([x as u8, y as u8, 0]));
        assert_eq!(expand_to_square(&img, [127; 3]), img);
    }

    // ---------------------------------------------------------------- normalisation

    #[test]
    fn normalisation_matches_numpy_float_order() {
        // numpy: f32(f64(v) * (1/255)), then (x - 0.5) / 0.5 in f32.
        let cfg = PreprocessConfig::siglip(1);
        let lut = cfg.lookup_table();
        for v in 0..=255u8 {
            let x = (f64::from(v) * (1.0 / 255.0)) as f32;
            let want = (x - 0.5f32) / 0.5f32;
            assert_eq!(lut[0][v as usize].to_bits(), want.to_bits(), "v = {v}");
        }
        assert_eq!(lut[1][0], -1.0);
        assert_eq!(lut[2][255], 1.0);
    }

    #[test]
    fn a_strip_whose_padded_square_exceeds_the_pixel_limit_is_refused() {
        // 4000 x 1 is 4000 pixels, but padding makes it 4000 x 4000: 16 M pixels.
        let strip = RgbImage::from_pixel(4000, 1, Rgb([9, 9, 9]));
        let cfg = PreprocessConfig {
            max_pixels: 1 << 20,
            ..PreprocessConfig::siglip(8)
        };
        let err = preprocess(&strip, &cfg).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("4000x1") && msg.contains("4000x4000"), "{msg}");
        let unpadded = PreprocessConfig { pad: false, ..cfg };
        assert_eq!(
            preprocess(&strip, &unpadded).expect("no padding").len(),
            3 * 64
        );
    }

    #[test]
    fn preprocess_layout_is_channels_first() {
        let img = RgbImage::from_fn(2, 2, |x, y| {
            if (x, y) == (1, 0) {
                Rgb([255, 0, 127])
            } else {
                Rgb([0, 255, 255])
            }
        });
        let cfg = PreprocessConfig {
            pad: false,
            ..PreprocessConfig::siglip(2)
        };
        let v = preprocess(&img, &cfg).expect("preprocess");
        assert_eq!(v.len(), 12);
        assert_eq!(&v[0..4], &[-1.0, 1.0, -1.0, -1.0]);
        assert_eq!(&v[4..8], &[1.0, -1.0, 1.0, 1.0]);
        assert_eq!(v[9], (127.0f32 / 255.0 - 0.5) / 0.5);
    }

    // ---------------------------------------------------------------- decoding

    fn encode_png<P: image::PixelWithColorType>(img: &ImageBuffer<P, Vec<P::Subpixel>>) -> Vec<u8>
    where
        [P::Subpixel]: image::EncodableLayout,
    {
        use image::EncodableLayout;
        let mut buf = Vec::new();
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(
                img.as_raw().as_bytes(),
                img.width(),
                img.height(),
                P::COLOR_TYPE,
            )
            .expect("encode png");
        buf
    }

    fn decode(bytes: &[u8]) -> RgbImage {
        decode_image(bytes, "test image", DEFAULT_MAX_PIXELS).expect("decodes")
    }

    #[test]
    fn decode_drops_alpha_without_compositing() {
        let rgba: ImageBuffer<Rgba<u8>, _> =
            ImageBuffer::from_vec(2, 1, vec![200u8, 100, 50, 0, 1, 2, 3, 128])
                .expect("buffer size");
        assert_eq!(
            decode(&encode_png(&rgba)).into_raw(),
            vec![200, 100, 50, 1, 2, 3]
        );
        let la: ImageBuffer<LumaA<u8>, _> =
            ImageBuffer::from_vec(1, 1, vec![77u8, 3]).expect("buffer size");
        assert_eq!(decode(&encode_png(&la)).into_raw(), vec![77, 77, 77]);
    }

    #[test]
    fn decode_sixteen_bit_like_pillow() {
        // Colour and grey+alpha keep the high byte.
        let rgb16: ImageBuffer<Rgb<u16>, _> = ImageBuffer::from_vec(
            2,
            1,
            vec![0x1234u16, 0xff80, 0x00ff, 0x8000, 0x7fff, 0xffff],
        )
        .expect("buffer size");
        assert_eq!(
            decode(&encode_png(&rgb16)).into_raw(),
            vec![0x12, 0xff, 0, 0x80, 0x7f, 0xff]
        );
        let rgba16: ImageBuffer<Rgba<u16>, _> =
            ImageBuffer::from_vec(1, 1, vec![0x1234u16, 0xff80, 0x00ff, 0]).expect("buffer size");
        assert_eq!(decode(&encode_png(&rgba16)).into_raw(), vec![0x12, 0xff, 0]);
        let la16: ImageBuffer<LumaA<u16>, _> =
            ImageBuffer::from_vec(2, 1, vec![0x12ffu16, 0, 0x80ff, 0xffff]).expect("buffer size");
        assert_eq!(
            decode(&encode_png(&la16)).into_raw(),
            vec![0x12, 0x12, 0x12, 0x80, 0x80, 0x80]
        );
        // Plain 16-bit grey is Pillow mode I;16, which clamps to 255 instead of scaling.
        let l16: ImageBuffer<Luma<u16>, _> =
            ImageBuffer::from_vec(6, 1, vec![0u16, 100, 255, 256, 1000, 65535])
                .expect("buffer size");
        let grey: Vec<u8> = decode(&encode_png(&l16))
            .into_raw()
            .into_iter()
            .step_by(3)
            .collect();
        assert_eq!(grey, vec![0, 100, 255, 255, 255, 255]);
    }

    fn encode_raw_png(
        width: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        palette: Option<(&[u8], &[u8])>,
        data: &[u8],
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, width, 1);
            enc.set_color(color);
            enc.set_depth(depth);
            if let Some((plte, trns)) = palette {
                enc.set_palette(plte.to_vec());
                enc.set_trns(trns.to_vec());
            }
            let mut w = enc.write_header().expect("header");
            w.write_image_data(data).expect("data");
        }
        buf
    }

    #[test]
    fn decode_palette_and_low_bit_depth_like_pillow() {
        let plte = [10u8, 20, 30, 40, 50, 60, 70, 80, 90];
        let p = encode_raw_png(
            3,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            Some((&plte, &[0, 128])),
            &[0, 1, 2],
        );
        assert_eq!(decode(&p).into_raw(), plte.to_vec());
        let g2 = encode_raw_png(
            4,
            png::ColorType::Grayscale,
            png::BitDepth::Two,
            None,
            &[0b0001_1011],
        );
        let grey: Vec<u8> = decode(&g2).into_raw().into_iter().step_by(3).collect();
        assert_eq!(grey, vec![0, 85, 170, 255]);
        let g1 = encode_raw_png(
            8,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            None,
            &[0b1011_0000],
        );
        let grey: Vec<u8> = decode(&g1).into_raw().into_iter().step_by(3).collect();
        assert_eq!(grey, vec![255, 0, 255, 255, 0, 0, 0, 0]);
    }

    #[test]
    fn decode_lossless_webp_round_trips() {
        let img = RgbImage::from_fn(9, 4, |x, y| Rgb([(x * 28) as u8, (y * 60) as u8, 7]));
        let mut buf = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut buf)
            .write_image(img.as_raw(), 9, 4, image::ExtendedColorType::Rgb8)
            .expect("encode webp");
        assert_eq!(decode(&buf), img);
    }

    #[test]
    fn oversized_image_is_rejected_by_its_header() {
        // A header claiming 100000 × 100000 pixels, with no pixel data behind it.
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, 100_000, 100_000);
            enc.set_color(png::ColorType::Rgb);
            let mut w = enc.write_header().expect("header");
            w.write_chunk(
                png::chunk::IDAT,
                &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
            )
            .expect("idat");
        }
        match decode_image(&buf, "huge.png", DEFAULT_MAX_PIXELS) {
            Err(e @ PreprocessError::TooLarge { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("huge.png"), "{msg}");
                assert!(msg.contains("100000x100000"), "{msg}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The limit is configurable.
        let small = encode_png(&RgbImage::new(20, 20));
        assert!(decode_image(&small, "small", 400).is_ok());
        assert!(matches!(
            decode_image(&small, "small", 399),
            Err(PreprocessError::TooLarge {
                width: 20,
                height: 20,
                max_pixels: 399,
                ..
            })
        ));
    }

    #[test]
    fn corrupt_bytes_name_the_source() {
        let err = decode_image(b"definitely not an image", "data URL", DEFAULT_MAX_PIXELS)
            .expect_err("garbage must not decode");
        assert!(matches!(err, PreprocessError::Decode { .. }), "{err:?}");
        assert!(err.to_string().contains("data URL"), "{err}");

        let mut truncated = encode_png(&RgbImage::from_pixel(64, 64, Rgb([1, 2, 3])));
        truncated.truncate(truncated.len() / 2);
        let err = decode_image(&truncated, "cut.png", DEFAULT_MAX_PIXELS)
            .expect_err("truncated png must not decode");
        assert!(err.to_string().contains("cut.png"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.png");
        let err = load_image(&path, DEFAULT_MAX_PIXELS).expect_err("missing file");
        assert!(matches!(err, PreprocessError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.png"), "{err}");

        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, [0xff, 0xd8, 0xff, 0xe0, 0, 0]).expect("write");
        let err = load_image(&bad, DEFAULT_MAX_PIXELS).expect_err("corrupt file");
        assert!(err.to_string().contains("bad.jpg"), "{err}");
    }

    // ---------------------------------------------------------------- goldens

    struct Agreement {
        max_levels: f32,
        bit_equal: usize,
        level_equal: usize,
        total: usize,
    }

    /// Compare normalised values, measuring differences in uint8 levels.
    fn agreement(ours: &[f32], golden: &[f32], cfg: &PreprocessConfig) -> Agreement {
        assert_eq!(ours.len(), golden.len());
        let plane = ours.len() / 3;
        let mut a = Agreement {
            max_levels: 0.0,
            bit_equal: 0,
            level_equal: 0,
            total: ours.len(),
        };
        for (i, (&o, &g)) in ours.iter().zip(golden).enumerate() {
            let level = cfg.std[i / plane] / cfg.rescale;
            let d = (o - g).abs() * level;
            a.max_levels = a.max_levels.max(d);
            a.bit_equal += usize::from(o.to_bits() == g.to_bits());
            a.level_equal += usize::from(d < 0.5);
        }
        a
    }

    fn read_f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str, size: usize) -> Vec<f32> {
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), &[3, size, size], "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn golden_pixel_values_match_reference() {
        let root = workspace_root();
        let goldens = root.join("fixtures/goldens/pixel_values.safetensors");
        assert!(
            goldens.exists(),
            "{} is missing: regenerate it with fixtures/make_fixtures.py",
            goldens.display()
        );
        let bytes = std::fs::read(&goldens).expect("read goldens");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse goldens");
        let cases = [
            ("chelsea.384", "chelsea", 384, true),
            ("coffee.384", "coffee", 384, true),
            ("chelsea.384.nopad", "chelsea", 384, false),
            ("chelsea.60", "chelsea", 60, true),
            ("coffee.60", "coffee", 60, true),
            ("astronaut.60", "astronaut", 60, true),
        ];
        let mut failures = Vec::new();
        for (name, photo, size, pad) in cases {
            let path = root.join(format!("fixtures/images/{photo}.png"));
            let img =
                load_image(&path, DEFAULT_MAX_PIXELS).unwrap_or_else(|e| panic!("{name}: {e}"));
            let cfg = PreprocessConfig {
                pad,
                ..PreprocessConfig::siglip(size)
            };
            let ours = preprocess(&img, &cfg).expect("preprocess");
            let golden = read_f32_tensor(&st, name, size);
            let a = agreement(&ours, &golden, &cfg);
            eprintln!(
                "{name:18} max diff {:.3} levels, {:.4}% bit-equal, {:.4}% same uint8 level",
                a.max_levels,
                100.0 * a.bit_equal as f64 / a.total as f64,
                100.0 * a.level_equal as f64 / a.total as f64,
            );
            // Pillow's resize and the float arithmetic are reproduced exactly: every value must
            // have the golden's bits.
            if a.bit_equal != a.total {
                failures.push(format!(
                    "{name}: {} of {} values differ (max {} uint8 levels)",
                    a.total - a.bit_equal,
                    a.total,
                    a.max_levels
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "not bit-equal to the golden: {failures:?}"
        );
    }

    // ---------------------------------------------------------------- JPEG input

    /// SHA-256 of `chelsea.png` encoded by the `image` crate's JPEG encoder at quality 90; the
    /// Pillow reference below was made from exactly these bytes.
    const CHELSEA_Q90_SHA256: &str =
        "97acd109aaeb4e8b46f2f057ea49a287707aa2ebeecc4aa1a66f3f2446f86a96";

    #[test]
    fn jpeg_input_matches_pillow_decode_closely() {
        use sha2::Digest;
        let root = workspace_root();
        let photo = root.join("fixtures/images/chelsea.png");
        let reference =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chelsea_q90.pillow60.png");
        assert!(photo.exists(), "{} is missing", photo.display());
        let img = load_image(&photo, DEFAULT_MAX_PIXELS).expect("load chelsea");
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .expect("encode jpeg");
        if let Ok(dir) = std::env::var("CARROT_DUMP_JPEG") {
            std::fs::write(Path::new(&dir).join("chelsea_q90.jpg"), &jpeg).expect("dump jpeg");
        }
        let digest = format!("{:x}", sha2::Sha256::digest(&jpeg));
        assert_eq!(
            digest, CHELSEA_Q90_SHA256,
            "the encoded JPEG is not the one the reference was made from (the `image` crate's \
             encoder changed?); regenerate the reference with runtime/tests/data/jpeg_reference.py"
        );
        let pillow = load_image(&reference, DEFAULT_MAX_PIXELS).expect("load reference");
        let decoded = decode_image(&jpeg, "chelsea_q90.jpg", DEFAULT_MAX_PIXELS).expect("decode");
        let ours = resize_bicubic(&expand_to_square(&decoded, [127; 3]), 60, 60);
        assert_eq!(ours.dimensions(), pillow.dimensions());
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(pillow.as_raw())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let equal = diffs.iter().filter(|&&d| d == 0).count();
        eprintln!(
            "chelsea q90 JPEG, pad + 60: max diff {max} levels, {:.2}% equal (decoder differs from libjpeg-turbo)",
            100.0 * equal as f64 / diffs.len() as f64
        );
        assert!(max <= 2, "JPEG path differs from Pillow by {max} levels");
    }
}
