//! vision.onnx: SigLIP up to the selected layer, then the projector.

use carrot_contract::names;

use crate::builder::{Dim, ElemType};
use crate::config::{ProjectorConfig, VisionConfig};
use crate::nn::{Ctx, GraphError, Result};
use crate::{projector, siglip};

/// Build the whole vision graph: `pixel_values` → `image_features`.
pub fn build_vision(
    ctx: &mut Ctx<'_>,
    vision: &VisionConfig,
    proj: &ProjectorConfig,
) -> Result<()> {
    if proj.in_features != vision.tower.hidden_size {
        return Err(GraphError::Config(format!(
            "projector input width {} (mm_hidden_size) does not match the vision tower's hidden_size {}",
            proj.in_features, vision.tower.hidden_size
        )));
    }
    let pixels = siglip::pixel_values_input(ctx, &vision.tower)?;
    let features = siglip::vision_tower(ctx, vision, &pixels)?;
    let projected = projector::projector(ctx, proj, &features)?;
    ctx.b.push_scope("/mm_projector");
    let out = ctx
        .b
        .op("Identity", "output", &[&projected])
        .output_names(&[names::IMAGE_FEATURES])
        .build();
    ctx.b.pop_scope();
    let elem: ElemType = ctx.elem();
    ctx.b.output(
        &out?,
        elem,
        &[
            Dim::from(names::DIM_BATCH),
            Dim::Fixed(vision.num_image_tokens() as i64),
            Dim::Fixed(proj.out_features as i64),
        ],
    )?;
    Ok(())
}
