//! Bunny's `mlpNx_gelu` projector (`bunny/model/multimodal_projector/builder.py`):
//! `Linear(vision→text)`, then `depth - 1` times `GELU (exact) → Linear(text→text)`.
//! Checkpoint keys `mm_projector.{0,2,4,…}.{weight,bias}`.

use crate::builder::Value;
use crate::config::ProjectorConfig;
use crate::nn::{self, Ctx, GraphError, Result};

pub fn projector(ctx: &mut Ctx<'_>, cfg: &ProjectorConfig, x: &Value) -> Result<Value> {
    if cfg.depth == 0 {
        return Err(GraphError::Config(
            "projector depth must be at least 1".into(),
        ));
    }
    ctx.b.push_scope("/mm_projector");
    let result = (|| {
        let mut y = nn::linear(
            ctx,
            "0",
            "mm_projector.0",
            x,
            cfg.in_features,
            cfg.out_features,
            true,
        )?;
        for i in 1..cfg.depth {
            y = nn::gelu_erf(ctx, &format!("{}", 2 * i - 1), &y)?;
            let idx = 2 * i;
            y = nn::linear(
                ctx,
                &format!("{idx}"),
                &format!("mm_projector.{idx}"),
                &y,
                cfg.out_features,
                cfg.out_features,
                true,
            )?;
        }
        Ok(y)
    })();
    ctx.b.pop_scope();
    result
}
