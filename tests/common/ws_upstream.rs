//! A real upstream WebSocket service for proxy tests, on 127.0.0.1.
//!
//! It echoes every text and binary message, records what it receives (pings and close frames
//! included) and each handshake's request line and headers, and picks the first subprotocol of
//! its own list that the client offers. A text message `close:<code>:<reason>` makes it close
//! with that code and reason. It can be killed (every socket and the listener dropped, no close
//! frames) and restarted on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The `User-Agent` of the gateway's health probes.
const PROBE_USER_AGENT: &str = "wsbridge-health-check";

/// One handshake the upstream accepted.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Path and query of the request.
    pub target: String,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Shared {
    protocols: Vec<String>,
    received: Mutex<Vec<Message>>,
    handshakes: Mutex<Vec<Handshake>>,
    /// Open connections, health probes included.
    open: AtomicUsize,
}

pub struct WsUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    kill: CancellationToken,
    /// The listener and every connection task.
    tasks: TaskTracker,
}

impl WsUpstream {
    /// Starts on a free port; `protocols` are the subprotocols it speaks, in preference order.
    pub async fn start(protocols: &[&str]) -> WsUpstream {
        Self::start_on(0, protocols).await
    }

    /// Starts on `port` (0 for a free one).
    pub async fn start_on(port: u16, protocols: &[&str]) -> WsUpstream {
        let shared = Arc::new(Shared {
            protocols: protocols.iter().map(|p| p.to_string()).collect(),
            ..Shared::default()
        });
        let mut upstream = WsUpstream {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            shared,
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        upstream.listen().await;
        upstream
    }

    async fn listen(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        let listener: TcpListener = socket.listen(128).unwrap();
        self.addr = listener.local_addr().unwrap();
        self.kill = CancellationToken::new();
        self.tasks = TaskTracker::new();
        let kill = self.kill.clone();
        let shared = self.shared.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            loop {
                let stream = tokio::select! {
                    biased;
                    _ = kill.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let shared = shared.clone();
                let kill = kill.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = kill.cancelled() => {}
                        _ = serve(stream, shared.clone()) => {}
                    }
                });
            }
        });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Connections open now, health probes included.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Every message received so far, in order.
    pub fn received(&self) -> Vec<Message> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Handshakes of relayed clients (health probes left out).
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.shared
            .handshakes
            .lock()
            .unwrap()
            .iter()
            .filter(|h| {
                h.headers.get("user-agent").and_then(|v| v.to_str().ok()) != Some(PROBE_USER_AGENT)
            })
            .cloned()
            .collect()
    }

    /// Drops every socket and the listener at once, without close frames; returns when they
    /// are gone.
    pub async fn kill(&self) {
        self.kill.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.listen().await;
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

/// Decrements the open count however a connection ends.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn serve(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let target = request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        shared.handshakes.lock().unwrap().push(Handshake {
            target,
            headers: request.headers().clone(),
        });
        let offered: Vec<String> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .collect();
        if let Some(chosen) = shared.protocols.iter().find(|p| offered.contains(p)) {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(chosen).unwrap(),
            );
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    shared.open.fetch_add(1, Ordering::SeqCst);
    let _open = Open(shared.clone());
    let (mut tx, mut rx) = ws.split();
    while let Some(Ok(message)) = rx.next().await {
        shared.received.lock().unwrap().push(message.clone());
        match message {
            Message::Text(text) if text.starts_with("close:") => {
                let mut parts = text.splitn(3, ':').skip(1);
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or_default().to_owned();
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    })))
                    .await;
            }
            Message::Text(_) | Message::Binary(_) => {
                let Ok(()) = tx.send(message).await else {
                    break;
                };
            }
            // tungstenite answers pings and closes by itself.
            _ => {}
        }
    }
}
