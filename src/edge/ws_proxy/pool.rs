//! The upstreams of one proxy route: which one a new connection goes to, which ones are taken
//! out, and the health checks that bring them back.
//!
//! Each upstream has a circuit. It is closed (taking connections) until `max_failures`
//! consecutive connects fail, or a health probe fails; it is then open. With a health check the
//! next successful probe closes it again; without one, after `cooldown` one trial connect is let
//! through (half-open): its success closes the circuit, its failure opens it for another
//! `cooldown`. Each upstream also counts its open connections, for `least_connections` and the
//! metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_util::sync::CancellationToken;

use super::config::{Balance, HealthCheck, ProxyConfig};
use super::connect::{self, ConnectError, UpstreamSocket, UpstreamUrl};
use crate::metrics::{Metrics, ProxyMetrics};

/// The `User-Agent` of health probes, so upstream logs can tell them from clients.
pub const PROBE_USER_AGENT: &str = "wsbridge-health-check";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitState {
    Closed,
    /// Taken out; with `Some`, a trial connect is allowed from then on.
    Open(Option<Instant>),
    /// One trial connect is under way.
    HalfOpen,
}

#[derive(Debug)]
struct Circuit {
    state: CircuitState,
    consecutive_failures: u32,
}

/// One upstream service.
pub struct Upstream {
    pub url: UpstreamUrl,
    open: AtomicUsize,
    circuit: Mutex<Circuit>,
    pub metrics: ProxyMetrics,
}

impl Upstream {
    fn circuit(&self) -> std::sync::MutexGuard<'_, Circuit> {
        // The circuit is two plain fields: a panic elsewhere cannot leave it inconsistent.
        self.circuit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Proxied connections open (or being opened) to it.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether it takes new connections now.
    pub fn is_up(&self) -> bool {
        self.circuit().state == CircuitState::Closed
    }

    fn set_state(&self, circuit: &mut Circuit, state: CircuitState) {
        if (circuit.state == CircuitState::Closed) != (state == CircuitState::Closed) {
            let up = state == CircuitState::Closed;
            self.metrics.up.set(i64::from(up));
            if up {
                tracing::info!(upstream = %self.url.url, "upstream back in");
            } else {
                tracing::warn!(upstream = %self.url.url, "upstream taken out");
            }
        }
        circuit.state = state;
    }
}

/// A connection's claim on an upstream; the upstream's open count drops with it.
pub struct UpstreamLease {
    upstream: Arc<Upstream>,
}

impl UpstreamLease {
    fn new(upstream: Arc<Upstream>) -> Self {
        upstream.open.fetch_add(1, Ordering::Relaxed);
        upstream.metrics.connections.inc();
        UpstreamLease { upstream }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for UpstreamLease {
    fn drop(&mut self) {
        self.upstream.open.fetch_sub(1, Ordering::Relaxed);
        self.upstream.metrics.connections.dec();
    }
}

/// An upstream connection ready to be paired with a client.
pub struct Connected {
    pub socket: UpstreamSocket,
    /// The subprotocol the upstream chose.
    pub subprotocol: Option<String>,
    pub lease: UpstreamLease,
}

/// No upstream could be reached.
#[derive(Debug, thiserror::Error)]
pub enum NoUpstream {
    #[error("every upstream is taken out")]
    AllDown,
    #[error("no upstream could be reached; last: {upstream}: {error}")]
    Unreachable {
        upstream: String,
        error: ConnectError,
    },
}

/// The upstreams of one proxy route.
pub struct UpstreamPool {
    upstreams: Vec<Arc<Upstream>>,
    balance: Balance,
    /// Whose turn it is (round robin), or where ties start (least connections).
    turn: AtomicUsize,
    max_failures: u32,
    cooldown: Duration,
    connect_timeout: Duration,
    health_check: Option<HealthCheck>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl UpstreamPool {
    /// The pool of a validated `[[proxies]]` entry.
    pub fn new(config: &ProxyConfig, metrics: &Metrics) -> Self {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .filter_map(|url| UpstreamUrl::parse(url).ok())
            .map(|url| {
                let metrics = metrics.proxy_upstream(&config.path, &url.url);
                metrics.up.set(1);
                Arc::new(Upstream {
                    url,
                    open: AtomicUsize::new(0),
                    circuit: Mutex::new(Circuit {
                        state: CircuitState::Closed,
                        consecutive_failures: 0,
                    }),
                    metrics,
                })
            })
            .collect();
        let tls = if upstreams.iter().any(|u| u.url.secure) {
            connect::tls_connector()
                .inspect_err(|e| tracing::error!(proxy = %config.path, error = %e, "no TLS client for wss:// upstreams; they will fail"))
                .ok()
        } else {
            None
        };
        UpstreamPool {
            upstreams,
            balance: config.balance,
            turn: AtomicUsize::new(0),
            max_failures: config.max_failures,
            cooldown: config.cooldown,
            connect_timeout: config.connect_timeout,
            health_check: config.health_check.clone(),
            tls,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Every upstream, in the order a new connection should try them.
    fn candidates(&self) -> Vec<Arc<Upstream>> {
        let n = self.upstreams.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<Arc<Upstream>> = (0..n)
            .map(|i| self.upstreams[(start + i) % n].clone())
            .collect();
        if self.balance == Balance::LeastConnections {
            // Stable: equally loaded upstreams keep their turn order.
            order.sort_by_key(|u| u.open_connections());
        }
        order
    }

    /// Whether `upstream` may be tried now; an open circuit past its cooldown lets this one
    /// trial through.
    fn admit(&self, upstream: &Upstream, now: Instant) -> bool {
        let mut circuit = upstream.circuit();
        match circuit.state {
            CircuitState::Closed => true,
            CircuitState::Open(Some(at)) if now >= at => {
                upstream.set_state(&mut circuit, CircuitState::HalfOpen);
                true
            }
            CircuitState::Open(_) | CircuitState::HalfOpen => false,
        }
    }

    fn succeeded(&self, upstream: &Upstream) {
        let mut circuit = upstream.circuit();
        circuit.consecutive_failures = 0;
        upstream.set_state(&mut circuit, CircuitState::Closed);
    }

    /// Counts a failed connect or probe; `take_out` opens the circuit at once.
    fn failed(&self, upstream: &Upstream, take_out: bool, now: Instant) {
        let mut circuit = upstream.circuit();
        circuit.consecutive_failures = circuit.consecutive_failures.saturating_add(1);
        let trip = take_out
            || circuit.state == CircuitState::HalfOpen
            || circuit.consecutive_failures >= self.max_failures;
        if trip {
            // With a health check only a good probe brings it back.
            let retry = match self.health_check {
                Some(_) => None,
                None => Some(now + self.cooldown),
            };
            upstream.set_state(&mut circuit, CircuitState::Open(retry));
        }
    }

    /// Connects to the first upstream that answers, in balancing order, skipping those taken
    /// out. `request_for` builds the handshake request for an upstream.
    pub async fn connect(
        &self,
        request_for: impl Fn(&UpstreamUrl) -> Option<Request>,
    ) -> Result<Connected, NoUpstream> {
        let mut last = None;
        for upstream in self.candidates() {
            let Some(request) = request_for(&upstream.url) else {
                continue;
            };
            if !self.admit(&upstream, Instant::now()) {
                continue;
            }
            let lease = UpstreamLease::new(upstream.clone());
            match connect::open(
                &upstream.url,
                request,
                self.connect_timeout,
                self.tls.as_ref(),
            )
            .await
            {
                Ok((socket, subprotocol)) => {
                    self.succeeded(&upstream);
                    return Ok(Connected {
                        socket,
                        subprotocol,
                        lease,
                    });
                }
                Err(error) => {
                    upstream.metrics.connect_failures.inc();
                    tracing::info!(upstream = %upstream.url.url, %error, "upstream connect failed");
                    // A trial that fails puts the circuit back to open.
                    self.failed(&upstream, false, Instant::now());
                    last = Some((upstream.url.url.clone(), error));
                }
            }
        }
        Err(match last {
            Some((upstream, error)) => NoUpstream::Unreachable { upstream, error },
            None => NoUpstream::AllDown,
        })
    }

    /// Starts one probe task per upstream when the route has a health check; they stop when
    /// `shutdown` is cancelled.
    pub fn spawn_health_checks(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(check) = self.health_check.clone() else {
            return;
        };
        for upstream in self.upstreams.clone() {
            let pool = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(check.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let ok = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        ok = pool.probe(&upstream, check.timeout) => ok,
                    };
                    if ok {
                        pool.succeeded(&upstream);
                    } else {
                        pool.failed(&upstream, true, Instant::now());
                    }
                }
            });
        }
    }

    /// A WebSocket handshake to `upstream` and a close.
    async fn probe(&self, upstream: &Upstream, timeout: Duration) -> bool {
        let Ok(mut request) = upstream.url.url.as_str().into_client_request() else {
            return false;
        };
        request.headers_mut().insert(
            axum::http::header::USER_AGENT,
            axum::http::HeaderValue::from_static(PROBE_USER_AGENT),
        );
        match connect::open(&upstream.url, request, timeout, self.tls.as_ref()).await {
            Ok((mut socket, _)) => {
                let _ = tokio::time::timeout(timeout, socket.close(None)).await;
                true
            }
            Err(error) => {
                tracing::debug!(upstream = %upstream.url.url, %error, "health probe failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(text: &str) -> UpstreamPool {
        let config: ProxyConfig = toml::from_str(text).unwrap();
        UpstreamPool::new(&config, &Metrics::new())
    }

    const THREE: &str = r#"
        path = "/p"
        upstreams = ["ws://127.0.0.1:1/a", "ws://127.0.0.1:1/b", "ws://127.0.0.1:1/c"]
    "#;

    #[test]
    fn round_robin_takes_turns() {
        let pool = pool(&format!("{THREE}\nbalance = \"round_robin\""));
        let firsts: Vec<String> = (0..6)
            .map(|_| pool.candidates()[0].url.url.clone())
            .collect();
        assert_eq!(firsts[0..3], firsts[3..6]);
        assert_ne!(firsts[0], firsts[1]);
        assert_ne!(firsts[1], firsts[2]);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded() {
        let pool = pool(THREE);
        let a = UpstreamLease::new(pool.upstreams[0].clone());
        let _a2 = UpstreamLease::new(pool.upstreams[0].clone());
        let _b = UpstreamLease::new(pool.upstreams[1].clone());
        assert_eq!(pool.candidates()[0].url.url, "ws://127.0.0.1:1/c");
        drop(a);
        assert_eq!(pool.upstreams[0].open_connections(), 1);
    }

    #[test]
    fn consecutive_failures_open_the_circuit_until_a_trial_succeeds() {
        let pool = pool(&format!("{THREE}\nmax_failures = 2\ncooldown = \"10s\""));
        let a = &pool.upstreams[0];
        let now = Instant::now();
        let later = now + Duration::from_secs(11);
        pool.failed(a, false, now);
        assert!(a.is_up());
        pool.failed(a, false, now);
        assert!(!a.is_up() && !pool.admit(a, now));
        assert!(pool.admit(a, later), "one trial after the cooldown");
        assert!(!pool.admit(a, later), "only one");
        pool.failed(a, false, later);
        assert!(!pool.admit(a, later), "a failed trial opens it again");
        let much_later = later + Duration::from_secs(11);
        assert!(pool.admit(a, much_later));
        pool.succeeded(a);
        assert!(a.is_up() && pool.admit(a, much_later));
    }

    #[test]
    fn with_a_health_check_only_a_probe_brings_it_back() {
        let pool = pool(&format!("{THREE}\nhealth_check = {{ interval = \"1s\" }}"));
        let a = &pool.upstreams[0];
        let now = Instant::now();
        pool.failed(a, true, now);
        assert!(!pool.admit(a, now + Duration::from_secs(3600)));
        pool.succeeded(a);
        assert!(pool.admit(a, now));
    }
}
