//! OpenAI's `stop` sequences over a stream of text deltas.
//!
//! The answer ends at the first occurrence of any stop string, which is not part of it. While
//! streaming, text that could still turn out to be the start of a stop string is held back
//! until the next delta decides it.

/// What a delta gives after stop-string filtering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filtered {
    /// Text that is certainly part of the answer (may be empty).
    Text(String),
    /// A stop string occurred: this is the last text of the answer (may be empty).
    Stopped(String),
}

/// The text generated so far and how much of it has been handed out.
#[derive(Debug, Clone, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` handed out. No stop string starts before this offset.
    emitted: usize,
}

impl StopText {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds the next delta and returns what can be shown now.
    pub fn push(&mut self, delta: &str) -> Filtered {
        self.text.push_str(delta);
        let pending = &self.text[self.emitted..];
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let last = pending[..at].to_owned();
            self.emitted = self.text.len();
            return Filtered::Stopped(last);
        }
        let hold = pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&pending[i..])))
            .unwrap_or(pending.len());
        let shown = pending[..hold].to_owned();
        self.emitted += hold;
        Filtered::Text(shown)
    }

    /// The generation ended without a stop string: everything still held back.
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut stop = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match stop.push(d) {
                Filtered::Text(t) => out.push_str(&t),
                Filtered::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&stop.finish());
        (out, false)
    }

    #[test]
    fn without_stop_strings_everything_passes_at_once() {
        let mut stop = StopText::new(vec![String::new()]);
        assert_eq!(stop.push("ab"), Filtered::Text("ab".into()));
        assert_eq!(stop.finish(), "");
    }

    #[test]
    fn a_stop_string_split_over_deltas_is_found_and_trimmed() {
        assert_eq!(
            run(&["END"], &["Hello E", "N", "D and more"]),
            ("Hello ".into(), true)
        );
    }

    #[test]
    fn a_false_start_is_released_by_the_next_delta() {
        let mut stop = StopText::new(vec!["END".into()]);
        assert_eq!(stop.push("Hi E"), Filtered::Text("Hi ".into()));
        assert_eq!(stop.push("Nx"), Filtered::Text("ENx".into()));
        assert_eq!(stop.finish(), "");
    }

    #[test]
    fn held_back_text_is_returned_when_generation_ends() {
        assert_eq!(run(&["END"], &["abc E", "N"]), ("abc EN".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(
            run(&["éé"], &["caf", "é!", " é", "é"]),
            ("café! ".into(), true)
        );
    }
}
