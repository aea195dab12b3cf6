//! Checkpoint reading and ONNX export.
pub mod checkpoint;
pub mod hf_config;
pub mod lora;
pub mod lora_config;
pub mod lora_merge;
pub mod mm_config;
pub mod pipeline;
pub mod preprocessor;
pub mod rope_freq;
pub mod siglip_config;
pub mod siglip_table;
pub mod sink;
pub mod source;
pub mod tensor_dtype;
pub mod torch_bin;
pub mod weight_names;

/// An error and its causes on one line, for the command-line tools. Many errors here already
/// print their cause (`"{path}: {source}"`); a cause whose text is already on the line is not
/// repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(thiserror::Error, Debug)]
    #[error("writing tensor x: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn causes_already_printed_are_not_repeated() {
        let io = std::io::Error::other("No space left on device");
        let e = anyhow::Error::new(Outer { source: io }).context("building decoder.onnx");
        assert_eq!(
            super::error_line(&e),
            "building decoder.onnx: writing tensor x: No space left on device"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_line(&plain), "outer: inner");
    }
}
