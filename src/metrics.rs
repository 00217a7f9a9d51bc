//! Prometheus metrics, one registry per application instance (no global state, so several
//! instances can live in one test process).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics callbridge exports on `/metrics`.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls placed, by result (`placed`, `refused`, `timeout`, `debounced`, `error`).
    pub calls: IntCounterVec,
    /// Callbacks received, by result (`accepted`, `duplicate`, `unknown_token`, `malformed`, `error`).
    pub callbacks: IntCounterVec,
    /// Jobs by state, refreshed at scrape time from the database.
    pub jobs: IntGaugeVec,
    /// Exotel API latency by operation.
    pub exotel_latency: HistogramVec,
    /// Delivery latency by sink kind and outcome.
    pub delivery_latency: HistogramVec,
    /// Callbacks committed per group-commit transaction.
    pub ingest_batch: HistogramVec,
    /// Seconds one group-commit transaction took, begin to commit.
    pub ingest_commit: HistogramVec,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    ///
    /// # Panics
    /// Never in practice: names are static and unique.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("callbridge".into()), None)
            .expect("static registry prefix is valid");
        let calls = IntCounterVec::new(
            Opts::new("calls_total", "Click-to-call requests"),
            &["result"],
        )
        .expect("valid metric");
        let callbacks = IntCounterVec::new(
            Opts::new("callbacks_total", "Exotel StatusCallbacks received"),
            &["result"],
        )
        .expect("valid metric");
        let jobs = IntGaugeVec::new(Opts::new("jobs", "Delivery jobs by state"), &["state"])
            .expect("valid metric");
        let exotel_latency = HistogramVec::new(
            HistogramOpts::new("exotel_request_seconds", "Exotel API latency").buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let delivery_latency = HistogramVec::new(
            HistogramOpts::new("delivery_seconds", "Write-back delivery latency").buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
            ]),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let ingest_batch = HistogramVec::new(
            HistogramOpts::new("ingest_batch_size", "Callbacks per commit").buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
            &["backend"],
        )
        .expect("valid metric");
        let ingest_commit = HistogramVec::new(
            HistogramOpts::new(
                "ingest_commit_seconds",
                "One group-commit transaction, begin to commit",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0,
            ]),
            &["backend"],
        )
        .expect("valid metric");
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(callbacks.clone()),
            Box::new(jobs.clone()),
            Box::new(exotel_latency.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(ingest_batch.clone()),
            Box::new(ingest_commit.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            calls,
            callbacks,
            jobs,
            exotel_latency,
            delivery_latency,
            ingest_batch,
            ingest_commit,
        }
    }

    /// The text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
