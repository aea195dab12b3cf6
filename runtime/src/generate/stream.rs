//! Turning a growing list of generated ids into text deltas that never split a character.
//!
//! Byte-level tokenizers (Llama 3's among them) can spread one UTF-8 character over several
//! tokens; decoding a partial character yields U+FFFD. [`TextStream`] keeps two offsets into the
//! ids, as text-generation-inference's `decode_token` does: it decodes a short window that starts
//! a little before the ids not yet shown (so the decoder sees some left context), and emits the
//! part past the already-shown prefix only once the window no longer ends in U+FFFD.

use super::BoxError;

/// Ids to text, as `tokenizers`' `decode(ids, skip_special_tokens = true)`.
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String, BoxError>;
}

const REPLACEMENT: char = '\u{FFFD}';

/// Incremental detokenizer for one generation.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding window: the context before the ids not yet shown.
    prefix_offset: usize,
    /// Ids before this one have been shown.
    read_offset: usize,
    /// Everything emitted so far.
    text: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The concatenation of every delta returned so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds `id` and returns the text it completes; empty while a character is still partial.
    pub fn push<D: Decode + ?Sized>(&mut self, decoder: &D, id: u32) -> Result<String, BoxError> {
        self.ids.push(id);
        let shown = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = decoder.decode(&self.ids[self.prefix_offset..])?;
        let delta = match window.strip_prefix(shown.as_str()) {
            Some(delta) if !delta.is_empty() && !window.ends_with(REPLACEMENT) => delta.to_owned(),
            _ => return Ok(String::new()),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Adds the last id and returns all text not yet shown, so that the deltas add up to
    /// decoding every id at once (a character left partial at the end shows as U+FFFD there too).
    pub fn finish<D: Decode + ?Sized>(&mut self, decoder: &D, id: u32) -> Result<String, BoxError> {
        let mut delta = self.push(decoder, id)?;
        let full = decoder.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.text.as_str()) {
            Some(rest) => rest.to_owned(),
            // A decoder whose output is not stable under appending: show the window's remainder.
            None => {
                let shown = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
                let window = decoder.decode(&self.ids[self.prefix_offset..])?;
                window
                    .strip_prefix(shown.as_str())
                    .unwrap_or(window.as_str())
                    .to_owned()
            }
        };
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.text.push_str(&rest);
        delta.push_str(&rest);
        Ok(delta)
    }
}
