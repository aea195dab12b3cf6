//! The generation loop against a fake model: step inputs, stop conditions, sampling, streaming.

use std::num::NonZeroUsize;

use carrot_runtime::generate::fake::{ByteDecoder, FakeModel, RecordedSegment, StepRecord, peaked};
use carrot_runtime::generate::sampling::{
    apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, argmax,
};
use carrot_runtime::generate::{
    Decode, Event, FinishReason, GenerateError, GenerateOptions, Generation, Output, PromptPart,
    Request, Sampler, SamplingOptions, TextStream, generate, prompt_len,
};

const LLAMA_EOS: [u32; 3] = [128001, 128008, 128009];
const EOS: u32 = 99;
const VOCAB: usize = 100;

fn defaults() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 16,
        max_length: 4096,
        eos_token_ids: vec![EOS],
        ignore_eos: false,
        prefill_chunk: None,
        sampling: SamplingOptions::greedy(),
    }
}

fn text(ids: &[u32]) -> PromptPart {
    PromptPart::Tokens(ids.to_vec())
}

fn request(prompt: Vec<PromptPart>, images: usize, options: GenerateOptions) -> Request<()> {
    Request {
        prompt,
        images: vec![(); images],
        options,
    }
}

/// Each id decodes to its decimal value and a space; the EOS id to nothing.
struct NumberDecoder;

impl Decode for NumberDecoder {
    fn decode(&self, ids: &[u32]) -> Result<String, carrot_runtime::generate::BoxError> {
        Ok(ids
            .iter()
            .filter(|&&id| id != EOS && !LLAMA_EOS.contains(&id))
            .map(|id| format!("{id} "))
            .collect())
    }
}

fn run(model: &mut FakeModel, request: &Request<()>) -> (Output, Vec<Event>) {
    let mut events = Vec::new();
    let output = generate(model, &NumberDecoder, request, |event| events.push(event))
        .unwrap_or_else(|e| panic!("generation failed: {e} ({e:?})"));
    (output, events)
}

fn positions(range: std::ops::Range<i64>) -> Vec<i64> {
    range.collect()
}

/// Asserts the position bookkeeping of one step: positions `past..end`, mask of `end` ones.
fn assert_step(step: &StepRecord, past: usize, end: usize, segments: &[RecordedSegment]) {
    assert_eq!(step.past_len, past, "past_len of {step:?}");
    assert_eq!(step.position_ids, positions(past as i64..end as i64));
    assert_eq!(step.attention_mask, vec![1; end]);
    assert_eq!(step.segments, segments);
}

fn tokens(ids: &[u32]) -> RecordedSegment {
    RecordedSegment::Tokens(ids.to_vec())
}

fn image(index: usize, rows: std::ops::Range<usize>) -> RecordedSegment {
    RecordedSegment::Image { index, rows }
}

#[test]
fn text_prompt_prefill_then_one_step_per_token() {
    let prompt = vec![text(&[1, 2, 3, 4])];
    let mut model = FakeModel::scripted(VOCAB, 729, 4, vec![5, 6, 7, EOS]);
    let (output, events) = run(&mut model, &request(prompt, 0, defaults()));

    assert_eq!(output.token_ids, [5, 6, 7, EOS]);
    assert_eq!(output.finish_reason, FinishReason::Stop);
    assert_eq!(output.prompt_tokens, 4);
    assert_eq!(output.text, "5 6 7 ");
    // The EOS token ends the generation and is never fed back.
    assert_eq!(model.steps.len(), 4);
    assert_step(&model.steps[0], 0, 4, &[tokens(&[1, 2, 3, 4])]);
    assert_step(&model.steps[1], 4, 5, &[tokens(&[5])]);
    assert_step(&model.steps[2], 5, 6, &[tokens(&[6])]);
    assert_step(&model.steps[3], 6, 7, &[tokens(&[7])]);
    assert_eq!(model.caches_created, 1);

    let ids: Vec<(u32, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, is_eos, .. } => Some((*id, *is_eos)),
            Event::Done { .. } => None,
        })
        .collect();
    assert_eq!(ids, [(5, false), (6, false), (7, false), (EOS, true)]);
    match events.last() {
        Some(Event::Done {
            finish_reason,
            timings,
        }) => {
            assert_eq!(*finish_reason, FinishReason::Stop);
            assert_eq!(timings.tokens, 4);
            assert_eq!(*timings, output.timings);
        }
        other => panic!("last event {other:?}"),
    }
    assert_eq!(events.len(), 5);
}

#[test]
fn image_prompt_counts_729_positions_per_image() {
    // BOS + "USER: " | image | "\nQuestion ASSISTANT:"
    let prompt = vec![text(&[1, 2]), PromptPart::Image(0), text(&[3, 4, 5])];
    assert_eq!(prompt_len(&prompt, 729), 734);
    let mut model = FakeModel::scripted(VOCAB, 729, 734, vec![10, 11, EOS]);
    let (output, _) = run(&mut model, &request(prompt, 1, defaults()));

    assert_eq!(output.token_ids, [10, 11, EOS]);
    assert_eq!(output.prompt_tokens, 734);
    assert_eq!(model.steps.len(), 3);
    assert_step(
        &model.steps[0],
        0,
        734,
        &[tokens(&[1, 2]), image(0, 0..729), tokens(&[3, 4, 5])],
    );
    assert_step(&model.steps[1], 734, 735, &[tokens(&[10])]);
    assert_step(&model.steps[2], 735, 736, &[tokens(&[11])]);
}

#[test]
fn image_positions_follow_the_models_count() {
    let prompt = vec![
        PromptPart::Image(1),
        text(&[7]),
        PromptPart::Image(0),
        text(&[8]),
    ];
    let mut model = FakeModel::scripted(VOCAB, 5, 12, vec![20, EOS]);
    let (output, _) = run(&mut model, &request(prompt, 2, defaults()));

    assert_eq!(output.prompt_tokens, 12);
    assert_step(
        &model.steps[0],
        0,
        12,
        &[image(1, 0..5), tokens(&[7]), image(0, 0..5), tokens(&[8])],
    );
    assert_step(&model.steps[1], 12, 13, &[tokens(&[20])]);
}

#[test]
fn chunked_prefill_runs_each_chunk_on_the_previous_past() {
    let prompt = vec![text(&[1, 2, 3]), PromptPart::Image(0), text(&[4, 5])];
    let options = GenerateOptions {
        prefill_chunk: NonZeroUsize::new(4),
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 5, 10, vec![30, 31, EOS]);
    let (output, _) = run(&mut model, &request(prompt, 1, options));

    assert_eq!(output.token_ids, [30, 31, EOS]);
    assert_eq!(model.steps.len(), 5);
    assert_step(&model.steps[0], 0, 4, &[tokens(&[1, 2, 3]), image(0, 0..1)]);
    assert_step(&model.steps[1], 4, 8, &[image(0, 1..5)]);
    assert_step(&model.steps[2], 8, 10, &[tokens(&[4, 5])]);
    assert_step(&model.steps[3], 10, 11, &[tokens(&[30])]);
    assert_step(&model.steps[4], 11, 12, &[tokens(&[31])]);
}

#[test]
fn chunk_of_one_and_chunk_longer_than_the_prompt() {
    let prompt = vec![text(&[1, 2, 3])];
    let one = GenerateOptions {
        prefill_chunk: NonZeroUsize::new(1),
        max_new_tokens: 1,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 5, 3, vec![40]);
    run(&mut model, &request(prompt.clone(), 0, one));
    assert_eq!(model.steps.len(), 3);
    for (i, step) in model.steps.iter().enumerate() {
        assert_step(step, i, i + 1, &[tokens(&[i as u32 + 1])]);
    }

    let long = GenerateOptions {
        prefill_chunk: NonZeroUsize::new(512),
        max_new_tokens: 1,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 5, 3, vec![40]);
    run(&mut model, &request(prompt, 0, long));
    assert_eq!(model.steps.len(), 1);
    assert_step(&model.steps[0], 0, 3, &[tokens(&[1, 2, 3])]);
}

#[test]
fn stops_on_each_llama_eos_id() {
    for eos in LLAMA_EOS {
        let options = GenerateOptions {
            eos_token_ids: LLAMA_EOS.to_vec(),
            ..defaults()
        };
        let mut model = FakeModel::scripted(128256, 729, 2, vec![15, eos, 16]);
        let (output, events) = run(&mut model, &request(vec![text(&[128000, 9])], 0, options));
        assert_eq!(output.token_ids, [15, eos], "eos {eos}");
        assert_eq!(output.finish_reason, FinishReason::Stop);
        assert_eq!(output.text, "15 ");
        assert!(matches!(
            events[1],
            Event::Token { id, is_eos: true, .. } if id == eos
        ));
        assert_eq!(model.steps.len(), 2);
    }
}

#[test]
fn ignore_eos_runs_to_max_new_tokens() {
    let options = GenerateOptions {
        ignore_eos: true,
        max_new_tokens: 4,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 729, 1, vec![EOS, 3, EOS, 4, 5]);
    let (output, events) = run(&mut model, &request(vec![text(&[1])], 0, options));
    assert_eq!(output.token_ids, [EOS, 3, EOS, 4]);
    assert_eq!(output.finish_reason, FinishReason::Length);
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Token { is_eos: true, .. }))
    );
    assert_step(&model.steps[1], 1, 2, &[tokens(&[EOS])]);
}

#[test]
fn max_new_tokens_ends_with_length() {
    let options = GenerateOptions {
        max_new_tokens: 3,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 729, 2, vec![1, 2, 3, 4, 5]);
    let (output, events) = run(&mut model, &request(vec![text(&[7, 8])], 0, options));
    assert_eq!(output.token_ids, [1, 2, 3]);
    assert_eq!(output.finish_reason, FinishReason::Length);
    assert_eq!(output.timings.tokens, 3);
    // Prefill, then two decode steps: the third token is not fed back.
    assert_eq!(model.steps.len(), 3);
    assert_step(&model.steps[2], 3, 4, &[tokens(&[2])]);
    assert!(matches!(
        events.last(),
        Some(Event::Done {
            finish_reason: FinishReason::Length,
            ..
        })
    ));
}

#[test]
fn max_new_tokens_zero_runs_nothing() {
    let options = GenerateOptions {
        max_new_tokens: 0,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 729, 2, vec![1]);
    let (output, events) = run(&mut model, &request(vec![text(&[7, 8])], 0, options));
    assert!(output.token_ids.is_empty());
    assert_eq!(output.finish_reason, FinishReason::Length);
    assert!(model.steps.is_empty());
    assert_eq!(events.len(), 1);
}

#[test]
fn context_length_caps_generation() {
    // A prompt of 10 in a context of 12 leaves room for two tokens.
    let options = GenerateOptions {
        max_length: 12,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 729, 10, vec![1, 2, 3, 4]);
    let (output, _) = run(&mut model, &request(vec![text(&[5; 10])], 0, options));
    assert_eq!(output.token_ids, [1, 2]);
    assert_eq!(output.finish_reason, FinishReason::Length);
    assert_eq!(model.steps.last().map(StepRecord::end), Some(11));
}

#[test]
fn context_overflow_is_an_error_naming_both_lengths() {
    let prompt = vec![text(&[1, 2]), PromptPart::Image(0)];
    let options = GenerateOptions {
        max_length: 731,
        ..defaults()
    };
    let mut model = FakeModel::scripted(VOCAB, 729, 731, vec![1]);
    let error = generate(
        &mut model,
        &NumberDecoder,
        &request(prompt.clone(), 1, options),
        |_| {},
    )
    .expect_err("prompt fills the context");
    assert!(
        matches!(
            error,
            GenerateError::ContextOverflow {
                prompt_len: 731,
                max_length: 731
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("731") && message.contains("max_length"),
        "{message}"
    );
    assert!(model.steps.is_empty());
    assert_eq!(model.caches_created, 0);

    // One position more is enough for one token.
    let options = GenerateOptions {
        max_length: 732,
        ..defaults()
    };
    let (output, _) = run(&mut model, &request(prompt, 1, options));
    assert_eq!(output.token_ids, [1]);
    assert_eq!(output.finish_reason, FinishReason::Length);
}

#[test]
fn request_errors() {
    let mut model = FakeModel::scripted(VOCAB, 729, 1, vec![1]);
    let missing = request(vec![text(&[1]), PromptPart::Image(1)], 1, defaults());
    let error = generate(&mut model, &NumberDecoder, &missing, |_| {}).expect_err("image 1");
    assert!(
        matches!(error, GenerateError::MissingImage { index: 1, count: 1 }),
        "{error:?}"
    );

    let empty = request(vec![text(&[])], 0, defaults());
    let error = generate(&mut model, &NumberDecoder, &empty, |_| {}).expect_err("empty");
    assert!(matches!(error, GenerateError::EmptyPrompt), "{error:?}");

    let sampling = SamplingOptions {
        temperature: 1.0,
        top_p: 1.5,
        ..SamplingOptions::greedy()
    };
    let bad = request(
        vec![text(&[1])],
        0,
        GenerateOptions {
            sampling,
            ..defaults()
        },
    );
    let error = generate(&mut model, &NumberDecoder, &bad, |_| {}).expect_err("top_p");
    assert!(error.to_string().contains("top_p = 1.5"), "{error}");
}

#[test]
fn model_errors_carry_the_step() {
    // The fake rejects ids outside its vocabulary.
    let mut model = FakeModel::scripted(VOCAB, 729, 2, vec![1, 2]);
    let error = generate(
        &mut model,
        &NumberDecoder,
        &request(vec![text(&[3, 400])], 0, defaults()),
        |_| {},
    )
    .expect_err("id 400");
    assert!(
        matches!(
            error,
            GenerateError::Step {
                past_len: 0,
                seq_len: 2,
                ..
            }
        ),
        "{error:?}"
    );
    let source = std::error::Error::source(&error).map(ToString::to_string);
    assert!(source.is_some_and(|s| s.contains("400")));
}

#[test]
fn iterator_can_stop_early() {
    let mut model = FakeModel::scripted(VOCAB, 729, 1, (1..=10).collect());
    let request = request(vec![text(&[1])], 0, defaults());
    let mut generation =
        Generation::new(&mut model, &NumberDecoder, &request).expect("valid request");
    let first: Vec<u32> = generation
        .by_ref()
        .take(3)
        .map(|event| match event.expect("step") {
            Event::Token { id, .. } => id,
            Event::Done { .. } => panic!("done too early"),
        })
        .collect();
    assert_eq!(first, [1, 2, 3]);
    assert_eq!(generation.token_ids(), [1, 2, 3]);
    assert_eq!(generation.text(), "1 2 3 ");
    assert_eq!(generation.finish_reason(), None);
    drop(generation);
    // Token 3 was never fed back.
    assert_eq!(model.steps.len(), 3);
}

// Sampling, against hand-computed examples.

#[test]
fn greedy_picks_the_first_maximum() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 0.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 2.0, 2.0]), 1);
    let mut model = FakeModel::fixed(729, vec![0.5, 2.0, -1.0, 2.0, 2.0]);
    let options = GenerateOptions {
        max_new_tokens: 3,
        ..defaults()
    };
    let (output, _) = run(&mut model, &request(vec![text(&[0])], 0, options));
    assert_eq!(output.token_ids, [1, 1, 1]);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let mut logits = [2.0, -2.0, 1.0, -1.0, 0.0];
    // Duplicates are penalized once.
    apply_repetition_penalty(&mut logits, &[0, 1, 1, 4, 0], 2.0);
    assert_eq!(logits, [1.0, -4.0, 1.0, -1.0, 0.0]);

    // Greedy with the penalty: prompt id 0 falls below id 1.
    let sampling = SamplingOptions {
        repetition_penalty: 1.5,
        ..SamplingOptions::greedy()
    };
    let mut model = FakeModel::fixed(729, vec![3.0, 2.5, -1.0]);
    let options = GenerateOptions {
        max_new_tokens: 3,
        sampling,
        ..defaults()
    };
    let (output, _) = run(&mut model, &request(vec![text(&[0])], 0, options));
    // 3/1.5 = 2 < 2.5, then both seen: 2 vs 2.5/1.5.
    assert_eq!(output.token_ids, [1, 0, 0]);
}

#[test]
fn temperature_divides_logits() {
    let mut logits = [1.0, -2.0, 0.5];
    apply_temperature(&mut logits, 0.5);
    assert_eq!(logits, [2.0, -4.0, 1.0]);
}

#[test]
fn top_k_keeps_the_k_highest_and_their_ties() {
    let inf = f32::NEG_INFINITY;
    let mut logits = [1.0, 3.0, 2.0, 0.0];
    apply_top_k(&mut logits, 2);
    assert_eq!(logits, [inf, 3.0, 2.0, inf]);

    let mut tied = [1.0, 2.0, 2.0, 0.0];
    apply_top_k(&mut tied, 1);
    assert_eq!(tied, [inf, 2.0, 2.0, inf]);

    let mut all = [1.0, 2.0];
    apply_top_k(&mut all, 5);
    assert_eq!(all, [1.0, 2.0]);
}

fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn kept(logits: &[f32]) -> Vec<usize> {
    (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect()
}

#[test]
fn top_p_keeps_the_smallest_set_above_the_threshold() {
    // Ascending cumulative: 0.03, 0.08, 0.20, 0.50, 1.0; top_p 0.9 removes those <= 0.1.
    let probs = [0.12, 0.5, 0.03, 0.3, 0.05];
    let mut logits = logits_of(&probs);
    apply_top_p(&mut logits, 0.9);
    assert_eq!(kept(&logits), [0, 1, 3]);

    // 0.6 / 0.25 / 0.15: top_p 0.65 keeps two, 0.55 keeps one.
    let probs = [0.15, 0.6, 0.25];
    let mut logits = logits_of(&probs);
    apply_top_p(&mut logits, 0.65);
    assert_eq!(kept(&logits), [1, 2]);
    let mut logits = logits_of(&probs);
    apply_top_p(&mut logits, 0.55);
    assert_eq!(kept(&logits), [1]);

    // top_p 0 still keeps the most likely token; 1 keeps everything.
    let mut logits = logits_of(&probs);
    apply_top_p(&mut logits, 0.0);
    assert_eq!(kept(&logits), [1]);
    let mut logits = logits_of(&probs);
    apply_top_p(&mut logits, 1.0);
    assert_eq!(kept(&logits), [0, 1, 2]);
}

fn sample_many(options: SamplingOptions, logits: &[f32], draws: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(options).expect("valid options");
    (0..draws)
        .map(|_| sampler.sample(&mut logits.to_vec()).expect("a token"))
        .collect()
}

#[test]
fn sampler_draws_only_from_the_nucleus() {
    let logits = logits_of(&[0.12, 0.5, 0.03, 0.3, 0.05]);
    let options = SamplingOptions {
        temperature: 1.0,
        top_p: 0.9,
        seed: 3,
        ..SamplingOptions::greedy()
    };
    let draws = sample_many(options, &logits, 400);
    for id in [0, 1, 3] {
        assert!(draws.contains(&id), "{id} never drawn");
    }
    assert!(draws.iter().all(|id| [0, 1, 3].contains(id)));
}

#[test]
fn top_k_applies_before_top_p() {
    // top_k 2 leaves 0.4 and 0.3, renormalized 0.571 / 0.429; top_p 0.5 then keeps only 0.4.
    // (top_p first would keep both.)
    let logits = logits_of(&[0.3, 0.4, 0.2, 0.1]);
    let options = SamplingOptions {
        temperature: 1.0,
        top_k: 2,
        top_p: 0.5,
        seed: 1,
        ..SamplingOptions::greedy()
    };
    assert!(sample_many(options, &logits, 100).iter().all(|&id| id == 1));
}

#[test]
fn low_temperature_sharpens_and_high_flattens() {
    let logits = [1.0, 0.0];
    let count = |temperature| {
        let options = SamplingOptions {
            temperature,
            seed: 5,
            ..SamplingOptions::greedy()
        };
        sample_many(options, &logits, 2000)
            .iter()
            .filter(|&&id| id == 1)
            .count()
    };
    // P(1) = 1/(1+e^(1/T)): T=0.1 ~ 4.5e-5, T=1 ~ 0.27, T=100 ~ 0.4975.
    assert!(count(0.1) <= 2);
    let one = count(1.0);
    assert!((440..640).contains(&one), "{one}");
    let hundred = count(100.0);
    assert!((900..1100).contains(&hundred), "{hundred}");
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let logits = vec![0.0; 50];
    let with_seed = |seed| SamplingOptions {
        temperature: 1.0,
        seed,
        ..SamplingOptions::greedy()
    };
    let a = sample_many(with_seed(42), &logits, 64);
    assert_eq!(a, sample_many(with_seed(42), &logits, 64));
    assert_ne!(a, sample_many(with_seed(43), &logits, 64));

    // Through the whole loop as well.
    let generate_with = |seed| {
        let mut model = FakeModel::fixed(729, vec![0.0; 50]);
        let options = GenerateOptions {
            max_new_tokens: 32,
            eos_token_ids: vec![],
            sampling: with_seed(seed),
            ..defaults()
        };
        run(&mut model, &request(vec![text(&[1])], 0, options))
            .0
            .token_ids
    };
    assert_eq!(generate_with(7), generate_with(7));
    assert_ne!(generate_with(7), generate_with(8));
}

// Streaming text.

/// Byte pieces that split multi-byte characters across tokens.
fn byte_decoder() -> ByteDecoder {
    let pieces: Vec<&[u8]> = vec![
        b"Hi ",                      // 0
        &[0xF0, 0x9F],               // 1: first half of U+1F955 (carrot)
        &[0xA5, 0x95],               // 2: second half
        &[0xE4],                     // 3: first byte of U+4E2D
        &[0xB8, 0xAD],               // 4: rest of it
        "\u{6587}".as_bytes(),       // 5: a whole CJK character
        &[0xF0],                     // 6: U+1F600 in three tokens
        &[0x9F, 0x98],               // 7
        &[0x80, b'!'],               // 8: its last byte and an ASCII one
        b"",                         // 9: EOS, special
        "\u{E9}t\u{E9} ".as_bytes(), // 10
        &[0xE4, 0xB8],               // 11: CJK split 2 + 1
        &[0xAD, 0xF0, 0x9F, 0xA5],   // 12: ends it, starts a carrot
        &[0x95],                     // 13: ends the carrot
    ];
    ByteDecoder {
        pieces: pieces.into_iter().map(<[u8]>::to_vec).collect(),
        special: vec![9],
    }
}

#[test]
fn text_stream_never_splits_a_character() {
    let decoder = byte_decoder();
    let ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 9];
    let mut stream = TextStream::new();
    let mut deltas = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let delta = if i + 1 == ids.len() {
            stream.finish(&decoder, id)
        } else {
            stream.push(&decoder, id)
        }
        .expect("decodes");
        deltas.push(delta);
    }
    let full = decoder.decode(&ids).expect("decodes");
    assert_eq!(
        full,
        "Hi \u{1F955}\u{4E2D}\u{6587}\u{1F600}!\u{E9}t\u{E9} \u{4E2D}\u{1F955}"
    );
    assert_eq!(deltas.concat(), full);
    assert_eq!(stream.text(), full);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(
        deltas,
        [
            "Hi ",
            "",
            "\u{1F955}",
            "",
            "\u{4E2D}",
            "\u{6587}",
            "",
            "",
            "\u{1F600}!",
            // Token 12 completes one character and starts another: held until 13 ends it.
            "\u{E9}t\u{E9} ",
            "",
            "",
            "\u{4E2D}\u{1F955}",
            ""
        ]
    );
}

#[test]
fn streamed_generation_adds_up_to_the_full_decode() {
    let decoder = byte_decoder();
    let script = vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 9];
    let mut model = FakeModel::scripted(14, 729, 1, script.clone());
    let options = GenerateOptions {
        eos_token_ids: vec![9],
        ..defaults()
    };
    let request = request(vec![text(&[0])], 0, options);
    let (output, deltas) = generate_with_deltas(&mut model, &decoder, &request);
    assert_eq!(output.token_ids, script);
    let full = decoder.decode(&output.token_ids).expect("decodes");
    assert_eq!(deltas.concat(), full);
    assert_eq!(output.text, full);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
}

#[test]
fn a_character_cut_by_the_length_limit_is_flushed_as_decoded() {
    let decoder = byte_decoder();
    let mut model = FakeModel::scripted(14, 729, 1, vec![0, 6, 7, 8]);
    let options = GenerateOptions {
        max_new_tokens: 3,
        eos_token_ids: vec![9],
        ..defaults()
    };
    let request = request(vec![text(&[0])], 0, options);
    let (output, deltas) = generate_with_deltas(&mut model, &decoder, &request);
    assert_eq!(output.finish_reason, FinishReason::Length);
    assert_eq!(
        deltas.concat(),
        decoder.decode(&[0, 6, 7]).expect("decodes")
    );
    assert_eq!(deltas, ["Hi ", "", "\u{FFFD}"]);
}

#[test]
fn peaked_logits_win_sampling_too() {
    let logits = peaked(VOCAB, 17);
    let options = SamplingOptions {
        temperature: 1.0,
        seed: 9,
        ..SamplingOptions::greedy()
    };
    assert!(sample_many(options, &logits, 50).iter().all(|&id| id == 17));
}

/// Run `request` and collect every token's text delta.
fn generate_with_deltas<D: Decode>(
    model: &mut FakeModel,
    decoder: &D,
    request: &Request<()>,
) -> (Output, Vec<String>) {
    let mut deltas = Vec::new();
    let output = generate(model, decoder, request, |event| {
        if let Event::Token { text_delta, .. } = event {
            deltas.push(text_delta);
        }
    })
    .expect("generates");
    (output, deltas)
}

/// A constraint masks the logits before sampling and sees every generated token: here two
/// multiples of three below 90, then only end-of-sequence.
#[test]
fn a_token_constraint_decides_what_may_be_sampled() {
    use std::sync::{Arc, Mutex};

    struct MultiplesOfThree {
        seen: Arc<Mutex<Vec<u32>>>,
    }
    impl carrot_runtime::generate::TokenConstraint for MultiplesOfThree {
        fn mask(&mut self, logits: &mut [f32]) -> Result<(), carrot_runtime::generate::BoxError> {
            let done = self.seen.lock().map_err(|e| e.to_string())?.len() >= 2;
            for (id, logit) in logits.iter_mut().enumerate() {
                let allowed = if done {
                    id as u32 == EOS
                } else {
                    id % 3 == 0 && id < 90
                };
                if !allowed {
                    *logit = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn commit(&mut self, id: u32) -> Result<(), carrot_runtime::generate::BoxError> {
            self.seen.lock().map_err(|e| e.to_string())?.push(id);
            Ok(())
        }
    }

    // The unconstrained model would always answer EOS (the largest logit).
    let mut model = FakeModel::fixed(0, (0..VOCAB).map(|i| i as f32).collect());
    let request = request(vec![text(&[1, 2])], 0, defaults());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let generation = Generation::new(&mut model, &NumberDecoder, &request)
        .expect("valid request")
        .with_constraint(Box::new(MultiplesOfThree { seen: seen.clone() }));
    let events: Vec<Event> = generation.map(|e| e.expect("event")).collect();
    let ids: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            Event::Done { .. } => None,
        })
        .collect();
    assert_eq!(ids, vec![87, 87, EOS]);
    assert_eq!(*seen.lock().expect("lock"), ids);

    // A constraint that allows nothing is an error, not a token.
    struct Nothing;
    impl carrot_runtime::generate::TokenConstraint for Nothing {
        fn mask(&mut self, logits: &mut [f32]) -> Result<(), carrot_runtime::generate::BoxError> {
            logits.fill(f32::NEG_INFINITY);
            Ok(())
        }
        fn commit(&mut self, _: u32) -> Result<(), carrot_runtime::generate::BoxError> {
            Ok(())
        }
    }
    let mut generation = Generation::new(&mut model, &NumberDecoder, &request)
        .expect("valid request")
        .with_constraint(Box::new(Nothing));
    assert!(matches!(
        generation.next_event(),
        Err(GenerateError::NoCandidates)
    ));
}
