//! The process's tracing subscriber: `serve` logs to stderr (errors' details under their
//! request id, never a token); every command exports the store's spans over OTLP (HTTP,
//! protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, as the OpenTelemetry SDK reads it (`OTEL_EXPORTER_OTLP_HEADERS` too). The store's
//! spans carry the operation, the user and task ids, rows and the elapsed time; no secret,
//! token or connection string ever reaches one.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Flushes the exported spans when the command ends (dropped last in `main`).
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("taskhistory: OTLP spans not all sent: {error}");
            }
        }
    }
}

/// Whether an OTLP endpoint is configured.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Installs the subscriber: the stderr log when `log` (the server), the OTLP export when
/// configured. A broken OTLP configuration is said on stderr and the command goes on
/// without it.
pub(crate) fn init(log: bool) -> Telemetry {
    let provider = otlp_configured()
        .then(|| {
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
        })
        .and_then(|built| match built {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name("taskhistory")
                            .build(),
                    )
                    .build(),
            ),
            Err(error) => {
                eprintln!("taskhistory: OTLP export not started: {error}");
                None
            }
        });
    let otlp = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("taskhistory"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let stderr = log.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(otlp)
        .try_init();
    Telemetry { provider }
}
