//! Picking the next token from a row of logits, as Hugging Face transformers does.
//!
//! The processors and their order mirror `transformers.generation.logits_process` as
//! `GenerationMixin._get_logits_processor` assembles them:
//! `RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`; then `argmax` (greedy) or a draw from the softmax. Removed tokens get
//! `-inf`, as there. Options are `f64` like the Python floats they come from, and are rounded to
//! `f32` where PyTorch would round them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::GenerateError;

/// How to pick tokens. The default is greedy decoding with no penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// `0` is greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep only the `top_k` highest logits (ties with the k-th kept); `0` turns it off.
    pub top_k: usize,
    /// Nucleus sampling threshold in `[0, 1]`; `1` turns it off.
    pub top_p: f64,
    /// Penalty on every id seen so far, prompt included; `1` turns it off.
    pub repetition_penalty: f64,
    /// Seed of the random generator; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |name, value: f64, expected| GenerateError::InvalidOption {
            name,
            value: value.to_string(),
            expected,
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(invalid(
                "temperature",
                self.temperature,
                "a finite number >= 0 (0 is greedy)",
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(invalid("top_p", self.top_p, "a number in [0, 1]"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0 (1 is off)",
            ));
        }
        Ok(())
    }
}

/// Candidates sorted for top-p before falling back to sorting the whole vocabulary.
const TOP_P_HEAD: usize = 1024;

/// A token that top-p may keep, with its unnormalized probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    logit: f32,
    id: u32,
    weight: f32,
}

/// Applies [`SamplingOptions`] to successive logits rows; remembers the ids seen for the
/// repetition penalty and holds the seeded random generator.
#[derive(Debug)]
pub struct Sampler {
    options: SamplingOptions,
    rng: StdRng,
    seen: SeenIds,
    values: Vec<f32>,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Result<Self, GenerateError> {
        options.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(options.seed),
            options,
            seen: SeenIds::default(),
            values: Vec::new(),
            candidates: Vec::new(),
        })
    }

    pub fn options(&self) -> &SamplingOptions {
        &self.options
    }

    /// Records ids (prompt or generated) for the repetition penalty.
    pub fn observe(&mut self, ids: &[u32]) {
        if self.options.repetition_penalty != 1.0 {
            ids.iter().for_each(|&id| self.seen.insert(id));
        }
    }

    /// Picks the next token; `logits` is used as scratch space and left processed.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32, GenerateError> {
        if logits.is_empty() {
            return Err(GenerateError::EmptyLogits);
        }
        let options = &self.options;
        if options.repetition_penalty != 1.0 {
            penalize(logits, &self.seen.ids, options.repetition_penalty);
        }
        let index = if options.is_greedy() {
            let best = argmax(logits);
            // Every logit masked (structured output) or not a number: nothing to pick.
            if logits[best].is_nan() || logits[best] == f32::NEG_INFINITY {
                return Err(GenerateError::NoCandidates);
            }
            best
        } else {
            if options.temperature != 1.0 {
                apply_temperature(logits, options.temperature);
            }
            if options.top_k > 0 {
                top_k_with(logits, options.top_k, &mut self.values);
            }
            if options.top_p < 1.0 {
                top_p_with(logits, options.top_p, &mut self.candidates);
            }
            draw(logits, &mut self.rng).ok_or(GenerateError::NoCandidates)?
        };
        u32::try_from(index).map_err(|_| GenerateError::NoCandidates)
    }
}

/// Ids seen so far, each once, in first-seen order.
#[derive(Debug, Default)]
struct SeenIds {
    ids: Vec<u32>,
    member: Vec<bool>,
}

impl SeenIds {
    fn insert(&mut self, id: u32) {
        let slot = id as usize;
        if slot >= self.member.len() {
            self.member.resize(slot + 1, false);
        }
        if !self.member[slot] {
            self.member[slot] = true;
            self.ids.push(id);
        }
    }
}

/// Index of the first maximum (`torch.argmax`'s tie-break); NaNs are never picked over a number.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_logit = f32::NAN;
    for (i, &logit) in logits.iter().enumerate() {
        if logit > best_logit || (best_logit.is_nan() && !logit.is_nan()) {
            best = i;
            best_logit = logit;
        }
    }
    best
}

/// `RepetitionPenaltyLogitsProcessor`: for each distinct id in `seen`, a negative logit is
/// multiplied by `penalty`, any other divided by it. Ids outside the row are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    let mut distinct = seen.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    penalize(logits, &distinct, penalty);
}

/// [`apply_repetition_penalty`] for ids known to be distinct.
fn penalize(logits: &mut [f32], distinct: &[u32], penalty: f64) {
    let penalty = penalty as f32;
    for &id in distinct {
        if let Some(logit) = logits.get_mut(id as usize) {
            *logit = if *logit < 0.0 {
                *logit * penalty
            } else {
                *logit / penalty
            };
        }
    }
}

/// `TemperatureLogitsWarper`: divides every logit by `temperature`.
pub fn apply_temperature(logits: &mut [f32], temperature: f64) {
    let temperature = temperature as f32;
    logits.iter_mut().for_each(|logit| *logit /= temperature);
}

/// `TopKLogitsWarper`: sets every logit below the k-th highest to `-inf`.
pub fn apply_top_k(logits: &mut [f32], top_k: usize) {
    top_k_with(logits, top_k, &mut Vec::new());
}

fn top_k_with(logits: &mut [f32], top_k: usize, values: &mut Vec<f32>) {
    let k = top_k.max(1);
    if k >= logits.len() {
        return;
    }
    values.clear();
    values.extend_from_slice(logits);
    let (_, &mut kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    for logit in logits.iter_mut() {
        if *logit < kth {
            *logit = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper`: with the tokens sorted by ascending logit, removes (sets to `-inf`) those
/// whose cumulative probability is `<= 1 - top_p`; the most likely token always stays.
pub fn apply_top_p(logits: &mut [f32], top_p: f64) {
    top_p_with(logits, top_p, &mut Vec::new());
}

fn top_p_with(logits: &mut [f32], top_p: f64, candidates: &mut Vec<Candidate>) {
    if top_p >= 1.0 {
        return;
    }
    // PyTorch compares the float32 cumulative sums with `1 - top_p` rounded to float32.
    let threshold = (1.0 - top_p) as f32;
    let Some(max) = max_logit(logits) else {
        return;
    };
    // A token of probability 0 has a cumulative probability of 0 (everything below it is 0 too):
    // it goes, whatever the threshold. Only the others are candidates.
    let mut total = 0.0f64;
    candidates.clear();
    for (i, logit) in logits.iter_mut().enumerate() {
        let weight = weight(*logit, max);
        if weight > 0.0 {
            total += f64::from(weight);
            candidates.push(Candidate {
                logit: *logit,
                id: i as u32,
                weight,
            });
        } else {
            *logit = f32::NEG_INFINITY;
        }
    }
    if candidates.len() <= 1 {
        return;
    }
    let total = total as f32;
    // Ascending by logit; among equal logits the higher id is removed first.
    let ascending =
        |a: &Candidate, b: &Candidate| a.logit.total_cmp(&b.logit).then(b.id.cmp(&a.id));

    // The cumulative sum only grows, so once the lowest of the `TOP_P_HEAD` largest candidates is
    // removed, every smaller one is too: sort just those, on top of the mass below them.
    let split = candidates.len().saturating_sub(TOP_P_HEAD);
    if split > 0 {
        candidates.select_nth_unstable_by(split, ascending);
        let (tail, head) = candidates.split_at_mut(split);
        head.sort_unstable_by(ascending);
        let below: f64 = tail.iter().map(|c| f64::from(c.weight / total)).sum();
        if let Some(kept) = first_kept(head, below, threshold, total)
            && kept > 0
        {
            remove(logits, tail);
            remove(logits, &head[..kept]);
            return;
        }
    }
    candidates.sort_unstable_by(ascending);
    if let Some(kept) = first_kept(candidates, 0.0, threshold, total) {
        remove(logits, &candidates[..kept]);
    }
}

/// In ascending order from a cumulative mass `below`, the index of the first candidate whose
/// cumulative probability exceeds `threshold` (the last candidate at the latest).
fn first_kept(ascending: &[Candidate], below: f64, threshold: f32, total: f32) -> Option<usize> {
    let last = ascending.len().checked_sub(1)?;
    // PyTorch's CPU cumsum accumulates float32 in double and stores float32.
    let mut cumulative = below;
    for (i, candidate) in ascending[..last].iter().enumerate() {
        cumulative += f64::from(candidate.weight / total);
        if cumulative as f32 > threshold {
            return Some(i);
        }
    }
    Some(last)
}

fn remove(logits: &mut [f32], candidates: &[Candidate]) {
    for candidate in candidates {
        if let Some(logit) = logits.get_mut(candidate.id as usize) {
            *logit = f32::NEG_INFINITY;
        }
    }
}

/// Largest logit that is a number, unless there is none above `-inf`.
fn max_logit(logits: &[f32]) -> Option<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max > f32::NEG_INFINITY).then_some(max)
}

/// Below this, `exp` leaves float32's normal range; such weights count as 0.
const MIN_EXPONENT: f32 = -87.0;

/// Unnormalized probability `exp(logit - max)`; 0 for `-inf`, NaN and underflowing logits.
fn weight(logit: f32, max: f32) -> f32 {
    let exponent = logit - max;
    if exponent > MIN_EXPONENT {
        exponent.exp()
    } else {
        0.0
    }
}

/// Draws an index from `softmax(logits)`; `None` when no logit is a number above `-inf`.
fn draw(logits: &[f32], rng: &mut StdRng) -> Option<usize> {
    let max = max_logit(logits)?;
    let total: f64 = logits.iter().map(|&l| f64::from(weight(l, max))).sum();
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0.0;
    let mut last = None;
    for (i, &logit) in logits.iter().enumerate() {
        let w = weight(logit, max);
        if w > 0.0 {
            cumulative += f64::from(w);
            last = Some(i);
            if target < cumulative {
                return last;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TopPLogitsWarper` without shortcuts: sort everything, softmax, cumsum, mask.
    fn top_p_reference(logits: &mut [f32], top_p: f64) {
        let threshold = (1.0 - top_p) as f32;
        let mut sorted: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        let max = sorted.last().map_or(0.0, |c| c.0);
        let total = sorted
            .iter()
            .map(|c| f64::from((c.0 - max).exp()))
            .sum::<f64>() as f32;
        let mut cumulative = 0.0f64;
        let last = sorted.len() - 1;
        for (i, &(l, id)) in sorted.iter().enumerate() {
            cumulative += f64::from((l - max).exp() / total);
            if i < last && cumulative as f32 <= threshold {
                logits[id as usize] = f32::NEG_INFINITY;
            }
        }
    }

    fn pseudo_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| scale * rng.random::<f32>().powi(3) * 10.0)
            .collect()
    }

    #[test]
    fn top_p_shortcut_matches_full_sort() {
        // Peaked rows stay inside the sorted head; flat rows fall back to sorting everything.
        for (seed, scale) in [(1, 4.0), (2, 2.0), (3, 0.5), (4, 0.01), (5, 0.0)] {
            for top_p in [0.0, 0.3, 0.9, 0.999] {
                let mut fast = pseudo_logits(5000, seed, scale);
                let mut reference = fast.clone();
                apply_top_p(&mut fast, top_p);
                top_p_reference(&mut reference, top_p);
                assert_eq!(fast, reference, "seed {seed} scale {scale} top_p {top_p}");
            }
        }
    }

    #[test]
    fn top_p_after_top_k_only_sees_the_kept_tokens() {
        let mut logits = pseudo_logits(5000, 7, 1.0);
        apply_top_k(&mut logits, 40);
        let mut reference = logits.clone();
        apply_top_p(&mut logits, 0.8);
        top_p_reference(&mut reference, 0.8);
        assert_eq!(logits, reference);
    }

    #[test]
    fn draw_never_picks_removed_tokens() {
        let logits = [
            f32::NEG_INFINITY,
            0.0,
            f32::NEG_INFINITY,
            1.0,
            f32::NEG_INFINITY,
        ];
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..200 {
            let i = draw(&logits, &mut rng);
            assert!(matches!(i, Some(1 | 3)), "{i:?}");
        }
        assert_eq!(draw(&[f32::NEG_INFINITY; 3], &mut rng), None);
    }
}
