//! Prometheus metrics: the names every stage reports under, and the `/metrics` endpoint.
//!
//! Stages call the small functions here (so metric names and labels live in one place); the
//! `metrics` facade records them and metrics-exporter-prometheus renders the text format.
//! The endpoint is served on a listener the server binds itself (so tests can use port 0 and
//! it stops with the shutdown token), which is why the exporter's own HTTP listener is not
//! used: the endpoint answers every request with the current metrics and closes.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::queue::Queue;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once); later calls return the same handle.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::error!(error = %e, "cannot install the metrics recorder"))
                .ok()
        })
        .clone()
}

/// A connection was accepted on `port` (`submission` or `submissions`).
pub fn connection_opened(port: &'static str) {
    counter!("submitd_connections_total", "port" => port).increment(1);
    gauge!("submitd_connections_open", "port" => port).increment(1.0);
}

/// A connection on `port` ended.
pub fn connection_closed(port: &'static str) {
    gauge!("submitd_connections_open", "port" => port).decrement(1.0);
}

/// A connection was refused by a connection cap.
pub fn connection_refused(reason: &'static str) {
    counter!("submitd_connections_refused_total", "reason" => reason).increment(1);
}

/// A TLS handshake failed or timed out.
pub fn tls_handshake_failed() {
    counter!("submitd_tls_handshake_failures_total").increment(1);
}

/// An AUTH ended: `ok`, `failed`, `throttled` or `unavailable`.
pub fn auth(result: &'static str) {
    counter!("submitd_auth_total", "result" => result).increment(1);
}

/// A message was queued; `latency` runs from the final dot to the 250.
pub fn message_accepted(size: usize, latency: Duration) {
    counter!("submitd_messages_accepted_total").increment(1);
    histogram!("submitd_message_size_bytes").record(size as f64);
    histogram!("submitd_submit_duration_seconds").record(latency.as_secs_f64());
}

/// A message was refused after its content: `sender_mismatch`, `size`, `smuggling`,
/// `line_length`, `policy` or `temporary`.
pub fn message_refused(reason: &'static str) {
    counter!("submitd_messages_refused_total", "reason" => reason).increment(1);
}

/// One recipient's delivery attempt ended: `delivered`, `deferred` or `failed`.
pub fn delivery(outcome: &'static str, duration: Duration) {
    counter!("submitd_deliveries_total", "outcome" => outcome).increment(1);
    histogram!("submitd_delivery_duration_seconds").record(duration.as_secs_f64());
}

/// A DSN was queued.
pub fn bounce() {
    counter!("submitd_bounces_total").increment(1);
}

/// Serves `/metrics` on `listener` until `stop`; queue gauges are read at each scrape.
pub async fn serve(listener: TcpListener, queue: Arc<Queue>, stop: CancellationToken) {
    let Some(handle) = install() else { return };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            // Typically out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (messages, oldest) = queue.stats();
        gauge!("submitd_queue_messages").set(messages as f64);
        let now = crate::message::unix_seconds(std::time::SystemTime::now());
        gauge!("submitd_queue_oldest_age_seconds")
            .set(oldest.map_or(0.0, |received| (now - received).max(0) as f64));
        handle.run_upkeep();
        let body = handle.render();
        tokio::spawn(async move {
            // Read the request head (bounded); any GET gets the metrics.
            let mut request = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            // A scraper that stops reading does not keep the task.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}
