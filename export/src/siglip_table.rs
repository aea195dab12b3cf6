//! Where the SigLIP vision config comes from, and the built-in table of known checkpoints.
//!
//! Order: `--vision-tower DIR` → `vision_config` inside the model's `config.json` →
//! `mm_vision_tower` when it names a local directory (absolute, or relative to the model
//! directory) → the table below → an error naming `mm_vision_tower`.

use std::path::{Path, PathBuf};

use carrot_graphs::config::Activation;

use crate::hf_config::{ConfigError, HfModelConfig, read_json};
use crate::siglip_config::{SiglipParams, siglip_from_value};

/// SigLIP vision towers whose configs are known without a local copy, with the values of their
/// published `config.json` (`vision_config`, transformers defaults filled in).
pub const KNOWN_SIGLIP: &[(&str, SiglipParams)] = &[
    ("google/siglip-so400m-patch14-384", so400m(384, 14)),
    ("google/siglip-so400m-patch14-224", so400m(224, 14)),
    ("google/siglip-base-patch16-224", base(224)),
    ("google/siglip-base-patch16-256", base(256)),
    ("google/siglip-base-patch16-384", base(384)),
    ("google/siglip-base-patch16-512", base(512)),
    ("google/siglip-large-patch16-256", large(256)),
    ("google/siglip-large-patch16-384", large(384)),
];

const fn siglip(
    hidden_size: usize,
    intermediate_size: usize,
    num_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
) -> SiglipParams {
    SiglipParams {
        hidden_size,
        intermediate_size,
        num_layers,
        num_attention_heads,
        num_channels: 3,
        image_size,
        patch_size,
        layer_norm_eps: 1e-6,
        activation: Activation::GeluTanh,
    }
}

const fn so400m(image_size: usize, patch_size: usize) -> SiglipParams {
    siglip(1152, 4304, 27, 16, image_size, patch_size)
}

const fn base(image_size: usize) -> SiglipParams {
    siglip(768, 3072, 12, 12, image_size, 16)
}

const fn large(image_size: usize) -> SiglipParams {
    siglip(1024, 4096, 24, 16, image_size, 16)
}

/// Looks a hub id up in [`KNOWN_SIGLIP`] (exact match, ignoring a trailing `/`).
pub fn known_siglip(name: &str) -> Option<SiglipParams> {
    let name = name.trim_end_matches('/');
    KNOWN_SIGLIP
        .iter()
        .find(|(id, _)| *id == name)
        .map(|(_, params)| *params)
}

/// Where the vision config was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisionOrigin {
    /// `--vision-tower DIR`.
    Flag(PathBuf),
    /// `vision_config` inside the model's `config.json`.
    Embedded,
    /// `mm_vision_tower` naming a local SigLIP directory.
    LocalTower(PathBuf),
    /// The built-in table, by hub id.
    Table(String),
}

impl VisionOrigin {
    /// The local SigLIP directory, when there is one (its `vision_model.*` weights can be read).
    pub fn directory(&self) -> Option<&Path> {
        match self {
            VisionOrigin::Flag(dir) | VisionOrigin::LocalTower(dir) => Some(dir),
            VisionOrigin::Embedded | VisionOrigin::Table(_) => None,
        }
    }
}

/// Reads `DIR/config.json` as a SigLIP config.
pub fn read_siglip_dir(dir: &Path) -> Result<SiglipParams, ConfigError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ConfigError::Invalid {
            file: dir.display().to_string(),
            message: "not a SigLIP directory: it has no config.json".to_string(),
        });
    }
    let value: serde_json::Value = read_json(&path)?;
    siglip_from_value(&value, &path.display().to_string())
}

/// The local directory `mm_vision_tower` names, if it is one.
pub fn local_tower_dir(model_dir: &Path, mm_vision_tower: &str) -> Option<PathBuf> {
    let named = Path::new(mm_vision_tower);
    let candidate = if named.is_absolute() {
        named.to_path_buf()
    } else {
        model_dir.join(named)
    };
    candidate.is_dir().then_some(candidate)
}

/// Finds the SigLIP config in the documented order.
pub fn resolve_siglip(
    model_dir: &Path,
    cfg: &HfModelConfig,
    config_file: &str,
    vision_tower: Option<&Path>,
) -> Result<(SiglipParams, VisionOrigin), ConfigError> {
    if let Some(dir) = vision_tower {
        return Ok((read_siglip_dir(dir)?, VisionOrigin::Flag(dir.to_path_buf())));
    }
    if let Some(value) = cfg.vision_config.as_ref().filter(|v| !v.is_null()) {
        return Ok((
            siglip_from_value(value, config_file)?,
            VisionOrigin::Embedded,
        ));
    }
    let Some(tower) = cfg.mm_vision_tower.as_deref() else {
        return Err(ConfigError::Invalid {
            file: config_file.to_string(),
            message: "no vision config: neither `vision_config` nor `mm_vision_tower` is set; \
                      pass --vision-tower DIR with a local SigLIP checkpoint"
                .to_string(),
        });
    };
    if let Some(dir) = local_tower_dir(model_dir, tower) {
        return Ok((read_siglip_dir(&dir)?, VisionOrigin::LocalTower(dir)));
    }
    if let Some(params) = known_siglip(tower) {
        return Ok((params, VisionOrigin::Table(tower.to_string())));
    }
    Err(ConfigError::Invalid {
        file: config_file.to_string(),
        message: format!(
            "mm_vision_tower `{tower}` is neither a local directory nor a known SigLIP checkpoint; \
             pass --vision-tower DIR with a local copy of it"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, json: &str) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), json).expect("write config");
    }

    fn model_cfg(json: &str) -> HfModelConfig {
        crate::hf_config::parse_json(json, "config.json").expect("parse")
    }

    const VISION_MODEL: &str = r#"{"model_type": "siglip_vision_model", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": 28, "patch_size": 14}"#;

    #[test]
    fn table_has_so400m() {
        let p = known_siglip("google/siglip-so400m-patch14-384").expect("known");
        assert_eq!(
            (p.hidden_size, p.intermediate_size, p.num_layers),
            (1152, 4304, 27)
        );
        assert_eq!(
            (p.num_attention_heads, p.patch_size, p.image_size),
            (16, 14, 384)
        );
        assert_eq!(p.layer_norm_eps, 1e-6);
        assert_eq!(p.activation, Activation::GeluTanh);
        assert_eq!(
            known_siglip("google/siglip-so400m-patch14-224").map(|p| p.image_size),
            Some(224)
        );
        for id in [
            "google/siglip-base-patch16-224",
            "google/siglip-base-patch16-384",
            "google/siglip-large-patch16-384",
        ] {
            assert!(known_siglip(id).is_some(), "{id}");
        }
        assert!(known_siglip("google/siglip2-base-patch16-224").is_none());
    }

    #[test]
    fn order_flag_then_embedded_then_local_then_table() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = tmp.path().join("model");
        let tower = tmp.path().join("siglip");
        let flag = tmp.path().join("flag");
        write_config(&tower, VISION_MODEL);
        write_config(
            &flag,
            &VISION_MODEL.replace("\"hidden_size\": 32", "\"hidden_size\": 48"),
        );
        std::fs::create_dir_all(&model).expect("mkdir");

        let embedded = r#"{"mm_vision_tower": "../siglip", "vision_config": {"hidden_size": 16,
            "num_attention_heads": 2, "image_size": 28, "patch_size": 14}}"#;
        let cfg = model_cfg(embedded);

        let (p, origin) = resolve_siglip(&model, &cfg, "config.json", Some(&flag)).expect("flag");
        assert_eq!(
            (p.hidden_size, origin),
            (48, VisionOrigin::Flag(flag.clone()))
        );

        let (p, origin) = resolve_siglip(&model, &cfg, "config.json", None).expect("embedded");
        assert_eq!((p.hidden_size, origin), (16, VisionOrigin::Embedded));
        assert_eq!(
            p.intermediate_size, 3072,
            "missing keys take SiglipVisionConfig defaults"
        );

        let cfg = model_cfg(r#"{"mm_vision_tower": "../siglip"}"#);
        let (p, origin) = resolve_siglip(&model, &cfg, "config.json", None).expect("local");
        assert_eq!(
            (p.hidden_size, origin),
            (32, VisionOrigin::LocalTower(model.join("../siglip")))
        );

        let abs = format!(r#"{{"mm_vision_tower": "{}"}}"#, tower.display());
        let (p, origin) =
            resolve_siglip(&model, &model_cfg(&abs), "config.json", None).expect("absolute");
        assert_eq!(
            (p.hidden_size, origin),
            (32, VisionOrigin::LocalTower(tower.clone()))
        );

        let cfg = model_cfg(r#"{"mm_vision_tower": "google/siglip-so400m-patch14-384"}"#);
        let (p, origin) = resolve_siglip(&model, &cfg, "config.json", None).expect("table");
        assert_eq!(p.hidden_size, 1152);
        assert_eq!(
            origin,
            VisionOrigin::Table("google/siglip-so400m-patch14-384".into())
        );
        assert_eq!(origin.directory(), None);

        let cfg = model_cfg(r#"{"mm_vision_tower": "someone/unknown-siglip"}"#);
        let err = resolve_siglip(&model, &cfg, "config.json", None)
            .expect_err("unknown")
            .to_string();
        assert!(
            err.contains("mm_vision_tower `someone/unknown-siglip`"),
            "{err}"
        );
        assert!(err.contains("--vision-tower"), "{err}");
    }

    #[test]
    fn siglip_model_config_uses_its_vision_config() {
        let tmp = tempfile::tempdir().expect("tmp");
        write_config(
            tmp.path(),
            r#"{"model_type": "siglip", "text_config": {"hidden_size": 8},
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "image_size": 384, "patch_size": 14}}"#,
        );
        let p = read_siglip_dir(tmp.path()).expect("siglip model");
        assert_eq!(Some(p), known_siglip("google/siglip-so400m-patch14-384"));
    }

    #[test]
    fn flag_without_config_is_an_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = model_cfg("{}");
        let err = resolve_siglip(tmp.path(), &cfg, "config.json", Some(tmp.path()))
            .expect_err("no config");
        assert!(err.to_string().contains("no config.json"), "{err}");
    }
}
