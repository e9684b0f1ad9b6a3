//! OpenTelemetry traces, exported over OTLP/HTTP when `[telemetry] otlp_endpoint` is set.
//!
//! Two kinds of span: a client publish (from the moment the gateway has it until the broker
//! acknowledges it or the publish fails) and the delivery of one broker message to its
//! subscribers. A W3C `traceparent` (and `tracestate`) in a client publish's headers makes the
//! publish span its child; the broker message then carries a `traceparent` naming the publish
//! span, or the client's own unchanged when the span was not sampled. A delivery span is the
//! child of the broker message's `traceparent` when it has one. Headers travel unchanged
//! otherwise, so a `traceparent` a broker message carries reaches clients in its `message` frame.
//!
//! Every span is sampled by `sample_ratio` on its trace id, whatever the parent's sampled flag
//! says, so the ratio alone decides how much is exported. Spans are batched and sent from the
//! exporter's own thread; [`Telemetry::shutdown`] sends what is left.

use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span};
use serde::Deserialize;

use crate::config::ConfigProblem;

/// The `[telemetry]` table. Without `otlp_endpoint` nothing is traced.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver; traces go to `<otlp_endpoint>/v1/traces` (protobuf).
    pub otlp_endpoint: Option<String>,
    /// Share of traces recorded, from 0.0 (none) to 1.0 (all).
    pub sample_ratio: f64,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "wsbridge".to_owned(),
        }
    }
}

impl TelemetryConfig {
    pub(crate) fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        if let Some(endpoint) = &self.otlp_endpoint {
            let scheme = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            if scheme.is_none_or(|rest| rest.is_empty() || rest.starts_with('/')) {
                problems.push(ConfigProblem::new(
                    "telemetry.otlp_endpoint",
                    format!(
                        "{endpoint:?} is not an http(s) URL; write e.g. \"http://127.0.0.1:4318\""
                    ),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push(ConfigProblem::new(
                "telemetry.sample_ratio",
                format!("{} is not between 0.0 and 1.0", self.sample_ratio),
            ));
        }
        if self.service_name.trim().is_empty() {
            problems.push(ConfigProblem::new(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> Option<String> {
        self.otlp_endpoint
            .as_ref()
            .map(|e| format!("{}/v1/traces", e.trim_end_matches('/')))
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// A running trace exporter. Absent (`None` where it is held) when telemetry is off.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Telemetry {
    /// Starts the exporter, or returns `None` when `otlp_endpoint` is not set.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Arc<Telemetry>>, TelemetryError> {
        let Some(url) = config.traces_url() else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::TraceIdRatioBased(config.sample_ratio))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .build();
        let tracer = provider.tracer("wsbridge");
        Ok(Some(Arc::new(Telemetry {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })))
    }

    /// Starts the span of a client publish that the gateway received at `started`, to `backend`
    /// through the route whose channel template is `channel`.
    pub fn publish(
        &self,
        started: SystemTime,
        headers: &[(String, String)],
        backend: &str,
        channel: &str,
    ) -> PublishSpan {
        let parent = self.parent(headers);
        let span = self
            .tracer
            .span_builder("publish")
            .with_kind(SpanKind::Producer)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("wsbridge.backend", backend.to_owned()),
                KeyValue::new("wsbridge.route", channel.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        PublishSpan {
            span,
            propagator: self.propagator.clone(),
        }
    }

    /// Starts the span of one broker message's delivery; it ends when dropped.
    pub fn delivery(&self, headers: &[(String, String)], backend: &str, topic: &str) -> Span {
        let parent = self.parent(headers);
        self.tracer
            .span_builder("deliver")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("wsbridge.backend", backend.to_owned()),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent)
    }

    fn parent(&self, headers: &[(String, String)]) -> Context {
        self.propagator
            .extract_with_context(&Context::new(), &HeaderReader(headers))
    }

    /// Sends the spans not sent yet and stops the exporter. Blocks until done.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not send the last trace spans");
        }
    }
}

/// The span of one client publish.
pub struct PublishSpan {
    span: Span,
    propagator: TraceContextPropagator,
}

impl PublishSpan {
    /// Names this span in the publish's `traceparent` header, when the span is sampled (an
    /// unsampled span is exported nowhere, so the client's own `traceparent` stays).
    pub fn carry(&self, headers: &mut Vec<(String, String)>) {
        let context = self.span.span_context();
        if !context.is_sampled() {
            return;
        }
        let cx = Context::new().with_remote_span_context(context.clone());
        self.propagator
            .inject_context(&cx, &mut HeaderWriter(headers));
    }

    /// Ends the span with the publish's result: `ok` or the error code the client got.
    pub fn finish(mut self, result: Result<(), (&'static str, &str)>) {
        match result {
            Ok(()) => self
                .span
                .set_attribute(KeyValue::new("wsbridge.result", "ok")),
            Err((code, message)) => {
                self.span
                    .set_attribute(KeyValue::new("wsbridge.result", code));
                self.span.set_status(Status::error(message.to_owned()));
            }
        }
        self.span.end();
    }
}

struct HeaderReader<'a>(&'a [(String, String)]);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

struct HeaderWriter<'a>(&'a mut Vec<(String, String)>);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(name, _)| !name.eq_ignore_ascii_case(key));
        // An empty `tracestate` says nothing; leave it out.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: TelemetryConfig) -> Vec<String> {
        let mut problems = Vec::new();
        config.validate(&mut problems);
        problems.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn default_is_off_and_valid() {
        let config = TelemetryConfig::default();
        assert_eq!(config.traces_url(), None);
        assert!(problems(config).is_empty());
    }

    #[test]
    fn traces_go_to_v1_traces_under_the_endpoint() {
        let config = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318/".into()),
            ..TelemetryConfig::default()
        };
        assert_eq!(
            config.traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let found = problems(TelemetryConfig {
            otlp_endpoint: Some("127.0.0.1:4318".into()),
            sample_ratio: 1.5,
            service_name: " ".into(),
        });
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("telemetry.otlp_endpoint"), "{found:?}");
        assert!(found[1].starts_with("telemetry.sample_ratio"), "{found:?}");
        assert!(found[2].starts_with("telemetry.service_name"), "{found:?}");
    }

    #[test]
    fn a_config_file_reports_every_problem_of_the_table() {
        let config = r##"
            [backends.local]
            type = "memory"

            [[routes]]
            channel = "#"
            backend = "local"
            topic = "#"
            allow = ["subscribe", "publish"]

            [telemetry]
            otlp_endpoint = "localhost:4318"
            sample_ratio = -0.5
            colour = "red"
        "##;
        let error = crate::Config::from_toml_with_env(config, &|_| None).unwrap_err();
        let mut paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "telemetry.colour",
                "telemetry.otlp_endpoint",
                "telemetry.sample_ratio"
            ]
        );
        let valid = config
            .replace("localhost:4318", "https://otel.example:4318")
            .replace("-0.5", "0.25")
            .replace("colour = \"red\"", "");
        let parsed = crate::Config::from_toml_with_env(&valid, &|_| None).unwrap();
        assert_eq!(parsed.telemetry.sample_ratio, 0.25);
        assert_eq!(parsed.telemetry.service_name, "wsbridge");
    }

    #[test]
    fn a_sampled_publish_span_replaces_the_clients_traceparent_in_the_same_trace() {
        let provider = SdkTracerProvider::builder().build();
        let telemetry = Telemetry {
            tracer: provider.tracer("test"),
            provider,
            propagator: TraceContextPropagator::new(),
        };
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = vec![("TraceParent".to_owned(), client.to_owned())];
        let span = telemetry.publish(SystemTime::now(), &headers, "mqtt", "a/#");
        span.carry(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        let (name, value) = &headers[0];
        assert_eq!(name, "traceparent");
        assert!(
            value.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{value}"
        );
        assert_ne!(value, client);
        assert!(value.ends_with("-01"), "{value}");
        span.finish(Ok(()));
    }

    #[test]
    fn an_unsampled_publish_span_leaves_the_clients_traceparent() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::TraceIdRatioBased(0.0))
            .build();
        let telemetry = Telemetry {
            tracer: provider.tracer("test"),
            provider,
            propagator: TraceContextPropagator::new(),
        };
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = vec![("traceparent".to_owned(), client.to_owned())];
        let span = telemetry.publish(SystemTime::now(), &headers, "mqtt", "a/#");
        span.carry(&mut headers);
        assert_eq!(headers, [("traceparent".to_owned(), client.to_owned())]);
        span.finish(Err(("timeout", "no answer")));
    }
}
