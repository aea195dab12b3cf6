//! Perplexity of an exported model on a text: how users check a quantized export against its
//! float export.
//!
//! The text is tokenized as it is (no BOS, no template). With a context of `C` positions the ids
//! are cut into windows `ids[k·(C−1) .. k·(C−1) + C]`, each run from an empty cache at positions
//! `0..`; inside a window every position after the first is scored, so every token after the
//! first of the text is scored exactly once:
//! `nll = logsumexp(logits[j−1]) − logits[j−1][id_j]` (in f64 from the float32 logits),
//! `perplexity = exp(mean nll)`. The definition of `fixtures/perplexity/make_goldens.py`.
//!
//! A decoder exported with `--logits all` scores a window in one step; one exported with
//! `--logits last` (the default) is fed one token per step.

use std::ops::Range;

use serde::Serialize;

use crate::engine::{Engine, EngineError};
use crate::generate::{Segment, StepInput};

/// The result of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Report {
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// Tokens scored: the text's ids minus one.
    pub tokens: usize,
    pub windows: usize,
}

#[derive(thiserror::Error, Debug)]
pub enum PerplexityError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The windows over `n` ids for a context of `context` positions (≥ 2).
pub fn windows(n: usize, context: usize) -> Vec<Range<usize>> {
    let stride = context.saturating_sub(1).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < n {
        out.push(start..(start + context).min(n));
        start += stride;
    }
    out
}

/// `logsumexp(row) − row[target]` in f64.
pub fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row
        .iter()
        .map(|&v| (f64::from(v) - f64::from(max)).exp())
        .sum();
    f64::from(max) + sum.ln() - f64::from(row[target])
}

/// Score `ids` with a context of `context` positions; `progress` is called with the number of
/// tokens scored so far.
pub fn perplexity(
    engine: &mut Engine,
    ids: &[u32],
    context: usize,
    mut progress: impl FnMut(usize),
) -> Result<Report, PerplexityError> {
    if ids.len() < 2 {
        return Err(PerplexityError::Input(format!(
            "the text has {} token(s); perplexity needs at least 2",
            ids.len()
        )));
    }
    if context < 2 {
        return Err(PerplexityError::Input(format!(
            "--context {context}: must be at least 2"
        )));
    }
    let vocab = engine.manifest.text.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(PerplexityError::Input(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let all = engine.manifest.logits == "all";
    let spans = windows(ids.len(), context);
    let (mut sum, mut scored) = (0f64, 0usize);
    // One cache and one all-ones mask serve every window: each window starts from an emptied cache
    // (a shared buffer keeps its capacity) and reads a prefix of the mask.
    let mut cache = engine.empty_cache()?;
    let mask = vec![1i64; context.min(ids.len())];
    for span in &spans {
        let window = &ids[span.clone()];
        engine.truncate(&mut cache, 0)?;
        if all {
            let positions: Vec<i64> = (0..window.len() as i64).collect();
            let mask = &mask[..window.len()];
            let segments = [Segment::Tokens(window)];
            let input = StepInput {
                segments: &segments,
                images: &[],
                position_ids: &positions,
                attention_mask: mask,
                past_len: 0,
            };
            sum += engine.run_decoder(&mut cache, &input, |logits, vocab| {
                window[1..]
                    .iter()
                    .enumerate()
                    .map(|(j, &id)| nll(&logits[j * vocab..(j + 1) * vocab], id as usize))
                    .sum::<f64>()
            })?;
            scored += window.len() - 1;
            progress(scored);
        } else {
            for (j, &id) in window[..window.len() - 1].iter().enumerate() {
                let token = [id];
                let segments = [Segment::Tokens(&token)];
                let input = StepInput {
                    segments: &segments,
                    images: &[],
                    position_ids: &[j as i64],
                    attention_mask: &mask[..j + 1],
                    past_len: j,
                };
                let target = window[j + 1] as usize;
                sum += engine.run_decoder(&mut cache, &input, |logits, vocab| {
                    nll(&logits[logits.len() - vocab..], target)
                })?;
                scored += 1;
                progress(scored);
            }
        }
    }
    let mean_nll = sum / scored as f64;
    Ok(Report {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens: scored,
        windows: spans.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_after_the_first_once() {
        for n in 2..40 {
            for c in 2..12 {
                let w = windows(n, c);
                let scored: usize = w.iter().map(|r| r.len() - 1).sum();
                assert_eq!(scored, n - 1, "n {n} c {c}");
                // Consecutive windows overlap by exactly one id (the context of the next).
                for pair in w.windows(2) {
                    assert_eq!(pair[1].start, pair[0].end - 1, "n {n} c {c}");
                }
                assert!(w.iter().all(|r| r.len() <= c && r.len() >= 2));
                assert_eq!(w.last().map(|r| r.end), Some(n));
            }
        }
        assert_eq!(windows(10, 64), vec![0..10]);
        assert_eq!(windows(10, 4), vec![0..4, 3..7, 6..10]);
        assert!(windows(1, 4).is_empty());
    }

    #[test]
    fn nll_of_uniform_and_peaked_rows() {
        let uniform = vec![0.5f32; 8];
        assert!((nll(&uniform, 3) - 8f64.ln()).abs() < 1e-12);
        // Large logits must not overflow.
        let row = [1000.0f32, 0.0];
        assert!(nll(&row, 0).abs() < 1e-12);
        assert!((nll(&row, 1) - 1000.0).abs() < 1e-9);
    }
}
