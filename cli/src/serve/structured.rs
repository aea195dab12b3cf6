//! Structured output: `response_format` `json_object` and `json_schema` by constrained decoding
//! with `llguidance`. Before each token the grammar's parser masks every token that cannot
//! continue a valid answer; once the answer is complete only end-of-sequence remains, so the
//! text always parses and satisfies the schema (unless `max_tokens` cuts it short, reported as
//! `finish_reason: "length"`). Whitespace between JSON tokens is limited to runs of 64
//! characters.
//!
//! The token set comes from the model's `tokenizer.json` (byte-level BPE decoded to raw bytes);
//! the parser factory is built once, on the first structured request.

use std::path::Path;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::error::ApiError;
use carrot_runtime::generate::{BoxError, TokenConstraint};

/// What a request asked its answer to be.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under this schema.
    JsonSchema(Value),
}

/// Whitespace between JSON tokens: at most this many characters in a row, so a model cannot
/// spend its whole budget on it.
const WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,64}";

impl ResponseFormat {
    fn grammar(&self) -> TopLevelGrammar {
        let mut schema = match self {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(schema) => schema.clone(),
        };
        // llguidance's options ride in the schema; a schema that sets its own keeps them.
        if let Some(object) = schema.as_object_mut() {
            object
                .entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_pattern": WHITESPACE}));
        }
        TopLevelGrammar::from_json_schema(schema)
    }
}

/// Builds a parser per request from one factory per model, made on first use.
pub struct Grammars {
    factory: Option<ParserFactory>,
}

impl Grammars {
    pub fn new() -> Self {
        Self { factory: None }
    }

    /// A constraint for `format` over the vocabulary of the model in `dir` (`vocab` logits per
    /// step, `eos` ending the answer).
    pub fn constraint(
        &mut self,
        format: &ResponseFormat,
        dir: &Path,
        vocab: usize,
        eos: &[u32],
    ) -> Result<Box<dyn TokenConstraint>, ApiError> {
        let factory = match &mut self.factory {
            Some(factory) => factory,
            none => none.insert(factory(dir, vocab, eos).map_err(|e| {
                ApiError::internal(format!("structured output is unavailable: {e}"))
            })?),
        };
        let parser = factory.create_parser(format.grammar()).map_err(|e| {
            ApiError::invalid(
                "response_format",
                format!("response_format: the schema cannot be used: {e}"),
            )
        })?;
        Ok(Box::new(Constraint {
            matcher: Matcher::new(Ok(parser)),
        }))
    }
}

/// The parser factory for the tokenizer in `dir/tokenizer.json`.
fn factory(dir: &Path, vocab: usize, eos: &[u32]) -> Result<ParserFactory, String> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tokens = llguidance::token_bytes_from_tokenizer_json(&json)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Ids past the logits (tokens only the tokenizer knows, such as `<image>`) are never
    // generated; logits past the tokenizer's ids (padding rows) are never allowed.
    tokens.resize(vocab, Vec::new());
    let (&first, _) = eos
        .split_first()
        .ok_or_else(|| "the model has no end-of-sequence token".to_owned())?;
    let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first), &tokens).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// One answer's parser.
struct Constraint {
    matcher: Matcher,
}

impl TokenConstraint for Constraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), BoxError> {
        // A complete answer (the parser has stopped) allows only end-of-sequence.
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn commit(&mut self, id: u32) -> Result<(), BoxError> {
        if self.matcher.is_stopped() {
            // The end-of-sequence token after a complete answer; the generation ends with it.
            return Ok(());
        }
        Ok(self.matcher.consume_token(id).map_err(|e| e.to_string())?)
    }
}

/// `response_format` as the request sent it.
pub fn parse(value: &Value) -> Result<Option<ResponseFormat>, ApiError> {
    let bad = |message: String| ApiError::invalid("response_format", message);
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format.type must be \"text\", \"json_object\" or \"json_schema\"".into())
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(ResponseFormat::JsonObject)),
        "json_schema" => {
            let schema = value
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required".into()))?;
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(
                    "response_format.json_schema.schema must be a JSON Schema object".into(),
                ));
            }
            Ok(Some(ResponseFormat::JsonSchema(schema.clone())))
        }
        other => Err(bad(format!(
            "response_format.type `{other}` is not supported (expected \"text\", \"json_object\" or \"json_schema\")"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn response_formats_parse_or_name_what_is_wrong() {
        assert_eq!(parse(&json!({"type": "text"})).expect("text"), None);
        assert_eq!(
            parse(&json!({"type": "json_object"})).expect("object"),
            Some(ResponseFormat::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse(&json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
                .expect("schema"),
            Some(ResponseFormat::JsonSchema(schema))
        );
        for (bad, needle) in [
            (json!({}), "response_format.type"),
            (json!({"type": "xml"}), "`xml` is not supported"),
            (
                json!({"type": "json_schema"}),
                "json_schema.schema is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 3}}),
                "must be a JSON Schema object",
            ),
        ] {
            let e = parse(&bad).expect_err("invalid");
            assert_eq!(e.status.as_u16(), 400);
            assert!(e.message.contains(needle), "{}", e.message);
        }
    }

    #[test]
    fn whitespace_is_bounded_unless_the_schema_says_otherwise() {
        let grammar =
            |format: ResponseFormat| serde_json::to_value(format.grammar()).expect("json");
        let text = grammar(ResponseFormat::JsonObject).to_string();
        assert!(
            text.contains("x-guidance") && text.contains("{1,64}"),
            "{text}"
        );
        let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": false}});
        let text = grammar(ResponseFormat::JsonSchema(own)).to_string();
        assert!(!text.contains("{1,64}"), "{text}");
    }
}
