//! Logs and traces: `tracing` to standard error (pretty or JSON, each line carrying the request
//! id of the span it is in) and, when an OTLP endpoint is configured, every span exported to an
//! OpenTelemetry collector over HTTP (protobuf or JSON).

use anyhow::{bail, Context};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// The collector's base URL (`http://127.0.0.1:4318`) or its traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// `http/protobuf` (the default) or `http/json`.
    pub protocol: String,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] sends the spans still waiting.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter. Call it outside the async runtime (the exporter's HTTP
    /// client blocks).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "could not flush the last spans");
            }
        }
    }
}

/// The traces URL for an endpoint given as a base URL or as the traces URL itself.
fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_owned()
    } else {
        format!("{e}/v1/traces")
    }
}

/// Installs the global subscriber. Call it before the async runtime starts.
pub fn init(format: &str, otlp: Option<&Otlp>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,llama-cpp-2=warn,llama_cpp_2=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        "json" => fmt.json().boxed(),
        "pretty" => fmt.compact().boxed(),
        other => bail!("log format must be `pretty` or `json`, not {other:?}"),
    };
    let provider = match otlp {
        None => None,
        Some(o) => {
            let protocol = match o.protocol.as_str() {
                "http/protobuf" | "protobuf" => Protocol::HttpBinary,
                "http/json" | "json" => Protocol::HttpJson,
                other => {
                    bail!("OTLP protocol must be `http/protobuf` or `http/json`, not {other:?}")
                }
            };
            if !o.endpoint.starts_with("http://") {
                bail!(
                    "OTLP endpoint must be an http:// URL (a local collector or agent), not {:?}",
                    o.endpoint
                );
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol)
                .with_endpoint(traces_url(&o.endpoint))
                .build()
                .context("cannot build the OTLP exporter")?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("parlance")
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("parlance"))
            // Only the spans of the request path go out, whatever RUST_LOG says.
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.is_span() && m.target().starts_with("parlance")
            }))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .context("cannot install the log subscriber")?;
    if let Some(o) = otlp {
        tracing::info!(endpoint = %traces_url(&o.endpoint), protocol = %o.protocol, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    #[test]
    fn endpoints_name_the_traces_path_once() {
        assert_eq!(
            super::traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/v1/traces/"),
            "http://c:4318/v1/traces"
        );
    }
}
