//! The Prometheus endpoint (`metrics_listen`): `GET /metrics` in the text
//! exposition format (0.0.4), encoded by prometheus-client.
//!
//! Values are read fresh at each scrape. The daemon's main loop builds them
//! (it owns the tables and knows health, announcements, syncs and errors):
//! the HTTP side sends it a request and waits for the families. Route
//! counts are the exception: counting a million routes takes about a
//! second of map reads, so a thread of its own counts them from the pinned
//! maps, at most every `ROUTE_COUNT_MAX_AGE`, and a scrape reports the last
//! count with its age.
//!
//! The endpoint is a boundary like the control socket: it serves only
//! `GET /metrics`, reads nothing but the request line and headers (which
//! must arrive within 5 s), and serves at most `MAX_CONNECTIONS` at once.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::sync::{mpsc, oneshot};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the daemon's main loop.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);
/// Route counts older than this are counted again (in the background).
pub const ROUTE_COUNT_MAX_AGE: Duration = Duration::from_secs(30);

/// A sample's value: a counter (monotonic) or a gauge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
}

/// One metric family: name without the `pop_forwarder_` prefix and without
/// the unit and `_total` suffixes, which the encoder adds.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: Option<Unit>,
    pub samples: Vec<(Vec<(&'static str, String)>, Value)>,
}

impl Family {
    pub fn new(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            unit: None,
            samples: Vec::new(),
        }
    }

    pub fn unit(mut self, unit: Unit) -> Family {
        self.unit = Some(unit);
        self
    }

    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value) {
        self.samples.push((labels, value));
    }

    /// A family of one unlabelled sample.
    pub fn one(name: &'static str, help: &'static str, value: Value) -> Family {
        let mut f = Family::new(name, help);
        f.push(Vec::new(), value);
        f
    }
}

/// What a scrape encodes.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let Some((_, first)) = family.samples.first() else {
                continue;
            };
            let kind = match first {
                Value::Counter(_) => MetricType::Counter,
                Value::Gauge(_) => MetricType::Gauge,
            };
            let mut metric =
                encoder.encode_descriptor(family.name, family.help, family.unit.as_ref(), kind)?;
            for (labels, value) in &family.samples {
                let sample = metric.encode_family(labels)?;
                match *value {
                    Value::Counter(v) => ConstCounter::new(v).encode(sample)?,
                    Value::Gauge(v) => ConstGauge::new(v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// The families in the text exposition format, every name prefixed
/// `pop_forwarder_`.
pub fn encode(families: Vec<Family>) -> Result<String> {
    let mut registry = Registry::with_prefix("pop_forwarder");
    registry.register_collector(Box::new(Snapshot(families)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .context("encoding the metrics")?;
    Ok(text)
}

/// Where `metrics_listen` binds: `PORT` alone is loopback's.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not PORT, IPv4:PORT or [IPv6]:PORT (e.g. \"127.0.0.1:9464\")")
    })
}

/// Binds the endpoint (at start-up, so that a port in use is a start-up
/// error, before the data plane is touched).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("metrics_listen: binding {addr} (is another exporter or instance on that port?)")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A scrape's request to the daemon's main loop: answer with the families.
pub type ScrapeRequest = oneshot::Sender<Vec<Family>>;

/// The last route count: (IPv4, IPv6, when).
type RouteCount = Option<(usize, usize, Instant)>;

/// Counts the routes in the pinned maps on a thread of its own, when asked
/// and the last count is older than `ROUTE_COUNT_MAX_AGE`.
#[derive(Clone)]
struct RouteCounter {
    last: Arc<Mutex<RouteCount>>,
    ask: std::sync::mpsc::SyncSender<()>,
}

impl RouteCounter {
    fn spawn(pin_dir: PathBuf) -> RouteCounter {
        let last: Arc<Mutex<RouteCount>> = Arc::default();
        let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
        let counted = last.clone();
        std::thread::Builder::new()
            .name("route-count".into())
            .spawn(move || {
                let tables = match crate::maps::Tables::from_pins(&pin_dir) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!("metrics: route counts unavailable: {e:#}");
                        return;
                    }
                };
                while asked.recv().is_ok() {
                    let (v4, v6) = tables.route_counts();
                    *counted.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((v4, v6, Instant::now()));
                }
            })
            .expect("spawning the route-count thread");
        RouteCounter { last, ask }
    }

    /// The last count, asking for a new one if it is old; the first scrape
    /// waits up to 2 s for one.
    async fn families(&self) -> Vec<Family> {
        let get = || *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let stale = get().is_none_or(|(_, _, at)| at.elapsed() > ROUTE_COUNT_MAX_AGE);
        if stale {
            let _ = self.ask.try_send(());
        }
        if get().is_none() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while get().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let Some((v4, v6, at)) = get() else {
            return Vec::new();
        };
        let mut routes = Family::new(
            "routes",
            "Routes in the program's tables (local addresses not counted), as last counted",
        );
        routes.push(vec![("family", "ipv4".into())], Value::Gauge(v4 as f64));
        routes.push(vec![("family", "ipv6".into())], Value::Gauge(v6 as f64));
        vec![
            routes,
            Family::one(
                "routes_count_age",
                "How old the route count is",
                Value::Gauge(at.elapsed().as_secs_f64()),
            )
            .unit(Unit::Seconds),
        ]
    }
}

/// Serves `GET /metrics` until the task is aborted.
pub async fn serve(
    listener: std::net::TcpListener,
    daemon: mpsc::Sender<ScrapeRequest>,
    pin_dir: PathBuf,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics endpoint: {e}");
            return;
        }
    };
    let routes = RouteCounter::spawn(pin_dir);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let daemon = daemon.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                respond(request, daemon.clone(), routes.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

async fn respond(
    request: Request<hyper::body::Incoming>,
    daemon: mpsc::Sender<ScrapeRequest>,
    routes: RouteCounter,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(response)
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, TEXT, "only /metrics here\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    let (tx, rx) = oneshot::channel();
    let families = match daemon.try_send(tx) {
        Ok(()) => tokio::time::timeout(DAEMON_TIMEOUT, rx).await,
        Err(_) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "the daemon is busy with other scrapes\n".into(),
            );
        }
    };
    let Ok(Ok(mut families)) = families else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "the daemon did not answer in time\n".into(),
        );
    };
    families.extend(routes.families().await);
    match encode(families) {
        Ok(text) => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            text,
        ),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e:#}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_encoded_with_prefix_units_and_total() {
        let mut packets = Family::new("packets", "Packets by outcome");
        packets.push(vec![("outcome", "redirected".into())], Value::Counter(7));
        let mut bytes = Family::new("node_traffic", "Bytes to each node").unit(Unit::Bytes);
        bytes.push(vec![("node", "cache-\"1\"".into())], Value::Counter(1500));
        let text = encode(vec![
            packets,
            bytes,
            Family::one("draining", "Drained", Value::Gauge(1.0)),
            Family::new("empty", "No samples: left out"),
        ])
        .unwrap();
        assert!(
            text.contains("# TYPE pop_forwarder_packets_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("pop_forwarder_packets_total{outcome=\"redirected\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "pop_forwarder_node_traffic_bytes_total{node=\"cache-\\\"1\\\"\"} 1500\n"
            ),
            "{text}"
        );
        assert!(text.contains("pop_forwarder_draining 1.0\n"), "{text}");
        assert!(!text.contains("empty"), "{text}");
    }

    #[test]
    fn listen_addresses_default_to_loopback() {
        assert_eq!(
            parse_listen("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::]:9464").unwrap(),
            "[::]:9464".parse().unwrap()
        );
        assert!(parse_listen("localhost:9464").is_err());
    }
}
