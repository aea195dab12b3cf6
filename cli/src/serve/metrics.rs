//! `GET /metrics`: the server's counters in Prometheus' text format (prometheus-client).
//!
//! - `carrot_requests_waiting`, `carrot_requests_running` (gauges; autoscalers read these)
//! - `carrot_requests_total{outcome="ok"|"error"}`
//! - `carrot_prompt_tokens_total`, `carrot_prompt_tokens_reused_total` (taken from the cache of
//!   the request before), `carrot_generated_tokens_total`
//! - `carrot_images_encoded_total`, `carrot_image_cache_hits_total`
//! - `carrot_time_to_first_token_seconds`, `carrot_inter_token_latency_seconds`,
//!   `carrot_request_duration_seconds` (histograms; time to first token counts from arrival, so
//!   queueing is included)

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Every metric the server exports; cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub waiting: Gauge<i64, AtomicI64>,
    pub running: Gauge<i64, AtomicI64>,
    pub requests: Family<Outcome, Counter>,
    pub prompt_tokens: Counter,
    pub prompt_tokens_reused: Counter,
    pub generated_tokens: Counter,
    pub images_encoded: Counter,
    pub image_cache_hits: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub decode_batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("carrot");
        let m = Metrics {
            registry: Registry::default(),
            waiting: Gauge::default(),
            running: Gauge::default(),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            prompt_tokens_reused: Counter::default(),
            generated_tokens: Counter::default(),
            images_encoded: Counter::default(),
            image_cache_hits: Counter::default(),
            // 1 ms … 65 s
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 1 ms … 4 s
            inter_token_latency: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            // 10 ms … 655 s
            request_duration: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
            // 1 … 256
            decode_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
        };
        registry.register(
            "requests_waiting",
            "Requests queued for the model",
            m.waiting.clone(),
        );
        registry.register(
            "requests_running",
            "Requests being generated",
            m.running.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by outcome",
            m.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt positions prefilled",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "prompt_tokens_reused",
            "Prompt positions taken from an earlier request's KV cache instead of prefilled",
            m.prompt_tokens_reused.clone(),
        );
        registry.register(
            "image_cache_hits",
            "Images whose features came from the cache",
            m.image_cache_hits.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "images_encoded",
            "Images run through the vision graph",
            m.images_encoded.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a request's arrival to its last token",
            m.request_duration.clone(),
        );
        registry.register(
            "decode_batch_size",
            "Requests decoding together in one decode step",
            m.decode_batch_size.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn finished(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.requests.get_or_create(&Outcome { outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_the_prefix() {
        let m = Metrics::default();
        m.waiting.set(3);
        m.generated_tokens.inc_by(5);
        m.finished(true);
        m.time_to_first_token.observe(0.2);
        let text = m.render();
        for line in [
            "carrot_requests_waiting 3",
            "carrot_requests_running 0",
            "carrot_generated_tokens_total 5",
            "carrot_requests_total{outcome=\"ok\"} 1",
            "carrot_time_to_first_token_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "`{line}` not in:\n{text}");
        }
    }
}
