//! Image preprocessing parameters for the manifest, from the vision tower's
//! `preprocessor_config.json` (as `SiglipImageProcessor` reads it) when the tower is a local
//! directory, else SigLIP's defaults.
//!
//! Bunny pads non-square images with the processor's mean as a colour:
//! `tuple(int(x * 255) for x in image_processor.image_mean)`.

use std::path::Path;

use serde::Deserialize;

/// What the runtime needs to turn a photo into `pixel_values`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub rescale: f64,
    pub pad_color: [u8; 3],
}

impl Default for Preprocessing {
    /// SigLIP's processor: rescale by 1/255, mean and std 0.5.
    fn default() -> Self {
        Self::new([0.5; 3], [0.5; 3], 1.0 / 255.0)
    }
}

impl Preprocessing {
    fn new(mean: [f64; 3], std: [f64; 3], rescale: f64) -> Self {
        Self {
            mean,
            std,
            rescale,
            pad_color: mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8),
        }
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    image_mean: Option<Vec<f64>>,
    #[serde(default)]
    image_std: Option<Vec<f64>>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    resample: Option<i64>,
    #[serde(default)]
    size: Option<Size>,
}

#[derive(Deserialize)]
struct Size {
    height: Option<usize>,
    width: Option<usize>,
}

/// PIL's `Image.BICUBIC`, the only resampling the runtime implements.
const PIL_BICUBIC: i64 = 3;

/// The preprocessing of the SigLIP directory `dir` (`dir/preprocessor_config.json` when it exists)
/// for a tower that sees `image_size` pixels; the error names the file and the key.
pub fn read(dir: Option<&Path>, image_size: usize) -> Result<Preprocessing, String> {
    let Some(path) = dir
        .map(|d| d.join("preprocessor_config.json"))
        .filter(|p| p.is_file())
    else {
        return Ok(Preprocessing::default());
    };
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{shown}: {e}"))?;
    let raw: Raw = serde_json::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    let triple = |key: &str, v: Option<Vec<f64>>, default: f64| -> Result<[f64; 3], String> {
        match v {
            None => Ok([default; 3]),
            Some(v) => <[f64; 3]>::try_from(v.as_slice())
                .map_err(|_| format!("{shown}: {key} must have 3 values, found {}", v.len())),
        }
    };
    let processor_mean = triple("image_mean", raw.image_mean, 0.5)?;
    let (mut mean, mut std) = (processor_mean, triple("image_std", raw.image_std, 0.5)?);
    if raw.do_normalize == Some(false) {
        (mean, std) = ([0.0; 3], [1.0; 3]);
    }
    if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(format!("{shown}: image_std {s} is not a positive number"));
    }
    let rescale = match (raw.do_rescale, raw.rescale_factor) {
        (Some(false), _) => 1.0,
        (_, Some(f)) if f.is_finite() && f > 0.0 => f,
        (_, Some(f)) => {
            return Err(format!(
                "{shown}: rescale_factor {f} is not a positive number"
            ));
        }
        (_, None) => 1.0 / 255.0,
    };
    if let Some(r) = raw.resample.filter(|&r| r != PIL_BICUBIC) {
        return Err(format!(
            "{shown}: resample {r} is not supported (carrot resizes with PIL's bicubic, resample 3)"
        ));
    }
    if let Some(size) = raw.size {
        for (key, v) in [("height", size.height), ("width", size.width)] {
            if let Some(v) = v.filter(|&v| v != image_size) {
                return Err(format!(
                    "{shown}: size.{key} {v} differs from the vision tower's image_size {image_size}"
                ));
            }
        }
    }
    Ok(Preprocessing {
        // Bunny's pad colour comes from the processor's mean, normalising or not.
        pad_color: Preprocessing::new(processor_mean, std, rescale).pad_color,
        ..Preprocessing::new(mean, std, rescale)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("preprocessor_config.json"), json).expect("write");
        dir
    }

    #[test]
    fn defaults_without_a_file() {
        let p = read(None, 384).expect("defaults");
        assert_eq!(p, Preprocessing::default());
        assert_eq!(p.pad_color, [127; 3]);
    }

    #[test]
    fn clip_style_values_and_the_pad_colour_bunny_derives() {
        let dir = write(
            r#"{"image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "rescale_factor": 0.00392156862745098, "resample": 3,
                "size": {"height": 384, "width": 384}}"#,
        );
        let p = read(Some(dir.path()), 384).expect("valid");
        assert_eq!(p.mean, [0.48145466, 0.4578275, 0.40821073]);
        assert_eq!(p.std, [0.26862954, 0.26130258, 0.27577711]);
        // int(0.48145466 * 255) = 122, int(0.4578275 * 255) = 116, int(0.40821073 * 255) = 104.
        assert_eq!(p.pad_color, [122, 116, 104]);
    }

    #[test]
    fn unusable_values_name_the_file_and_key() {
        for (json, needle) in [
            (r#"{"resample": 2}"#, "resample 2"),
            (
                r#"{"size": {"height": 224, "width": 224}}"#,
                "size.height 224",
            ),
            (
                r#"{"image_mean": [0.5, 0.5]}"#,
                "image_mean must have 3 values",
            ),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std 0"),
            (r#"{"rescale_factor": -1}"#, "rescale_factor -1"),
        ] {
            let dir = write(json);
            let err = read(Some(dir.path()), 384).expect_err(json);
            assert!(
                err.contains(needle) && err.contains("preprocessor_config.json"),
                "{err}"
            );
        }
    }
}
