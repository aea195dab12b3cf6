//! Graph file names and input/output names. `{i}` is the decoder layer index.

pub const MANIFEST_FILE: &str = "carrot.json";

pub const VISION_GRAPH: &str = "vision.onnx";
pub const EMBED_GRAPH: &str = "embed.onnx";
pub const DECODER_GRAPH: &str = "decoder.onnx";

/// vision.onnx: float32 `[batch, 3, image_size, image_size]`, already normalised.
pub const PIXEL_VALUES: &str = "pixel_values";
/// vision.onnx: `[batch, num_image_tokens, hidden_size]`, activation dtype.
pub const IMAGE_FEATURES: &str = "image_features";

/// embed.onnx: int64 `[batch, sequence]`.
pub const INPUT_IDS: &str = "input_ids";
/// embed.onnx output and decoder.onnx input: `[batch, sequence, hidden_size]`.
pub const INPUTS_EMBEDS: &str = "inputs_embeds";

/// decoder.onnx: int64 `[batch, past_sequence + sequence]`.
pub const ATTENTION_MASK: &str = "attention_mask";
/// decoder.onnx: int64 `[batch, sequence]`.
pub const POSITION_IDS: &str = "position_ids";
/// decoder.onnx: float32 `[batch, sequence | 1, vocab]`.
pub const LOGITS: &str = "logits";

/// Symbolic dimension names used in the graphs.
pub const DIM_BATCH: &str = "batch";
pub const DIM_SEQUENCE: &str = "sequence";
pub const DIM_PAST: &str = "past_sequence";
pub const DIM_TOTAL: &str = "total_sequence";

pub fn past_key(layer: usize) -> String {
    format!("past_key_values.{layer}.key")
}

pub fn past_value(layer: usize) -> String {
    format!("past_key_values.{layer}.value")
}

pub fn present_key(layer: usize) -> String {
    format!("present.{layer}.key")
}

pub fn present_value(layer: usize) -> String {
    format!("present.{layer}.value")
}

/// Every input name of decoder.onnx, in graph order.
pub fn decoder_inputs(num_layers: usize) -> Vec<String> {
    let mut names = vec![
        INPUTS_EMBEDS.to_string(),
        ATTENTION_MASK.to_string(),
        POSITION_IDS.to_string(),
    ];
    for i in 0..num_layers {
        names.push(past_key(i));
        names.push(past_value(i));
    }
    names
}

/// Every output name of decoder.onnx, in graph order.
pub fn decoder_outputs(num_layers: usize) -> Vec<String> {
    let mut names = vec![LOGITS.to_string()];
    for i in 0..num_layers {
        names.push(present_key(i));
        names.push(present_value(i));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_names_follow_the_contract() {
        assert_eq!(
            decoder_inputs(2),
            [
                "inputs_embeds",
                "attention_mask",
                "position_ids",
                "past_key_values.0.key",
                "past_key_values.0.value",
                "past_key_values.1.key",
                "past_key_values.1.value"
            ]
        );
        assert_eq!(
            decoder_outputs(1),
            ["logits", "present.0.key", "present.0.value"]
        );
    }
}
