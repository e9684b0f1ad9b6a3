//! Shared helpers for integration tests: start a gateway on 127.0.0.1:0 and talk to it with a
//! real WebSocket client.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbridge::{Config, Gateway};

pub mod faulty;
pub mod input;
pub mod ws_feed;
pub mod ws_upstream;

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// A name unique to this test run, for topics, queues and channels.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}x{nanos:x}x{n}", std::process::id())
}

/// Starts a gateway from config text (its `listen` is replaced by 127.0.0.1:0).
pub async fn start(config: &str) -> Gateway {
    let mut config = Config::from_toml(config).unwrap_or_else(|e| panic!("config: {e}"));
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    // Test clients often do not answer the shutdown close; do not wait long for them.
    config.server.shutdown_grace = Duration::from_secs(1);
    Gateway::start(config).await.expect("gateway starts")
}

/// A gateway on the embedded default configuration.
pub async fn start_default() -> Gateway {
    start(wsbridge::DEFAULT_CONFIG).await
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// A WebSocket test client that keeps frames it was not waiting for.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_with(addr, &["wsbridge.v1.json"]).await
    }

    pub async fn connect_with(addr: SocketAddr, protocols: &[&str]) -> Client {
        let mut request = ws_url(addr).into_client_request().unwrap();
        if !protocols.is_empty() {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&protocols.join(", ")).unwrap(),
            );
        }
        let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), false)
            .await
            .expect("WebSocket connects");
        Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Connects with a customised upgrade request; a refused upgrade gives its HTTP status and
    /// body.
    pub async fn try_connect(
        addr: SocketAddr,
        customise: impl FnOnce(&mut tokio_tungstenite::tungstenite::handshake::client::Request),
    ) -> Result<Client, (u16, String)> {
        let mut request = ws_url(addr).into_client_request().unwrap();
        customise(&mut request);
        match tokio_tungstenite::connect_async_with_config(request, None, true).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                pending: VecDeque::new(),
                next_id: 1,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
                response.status().as_u16(),
                String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            )),
            Err(e) => Err((0, e.to_string())),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next JSON frame from the socket (not from the pending buffer).
    async fn read_frame(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame arrives in time")
                .expect("the connection is open")
                .expect("a valid frame");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("frames are JSON");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(frame) => panic!("unexpected close: {frame:?}"),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame, buffered or not.
    pub async fn recv(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(v) => v,
            None => self.read_frame().await,
        }
    }

    /// The next frame of a type (`message`, `status`), keeping others for later.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        if let Some(pos) = self.pending.iter().position(|v| v["type"] == kind) {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let v = self.read_frame().await;
            if v["type"] == kind {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    pub async fn next_message(&mut self) -> Value {
        self.next_of("message").await
    }

    /// Sends a request with a fresh id and returns the reply to it (other frames are kept).
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.send(frame).await;
        self.reply_to(json!(id)).await
    }

    pub async fn reply_to(&mut self, id: Value) -> Value {
        if let Some(pos) = self
            .pending
            .iter()
            .position(|v| v["id"] == id && v["type"] != "message")
        {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let v = self.read_frame().await;
            if v["id"] == id && v["type"] != "message" {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_eq!(reply["type"], "ok", "subscribe {channel}: {reply}");
    }

    pub async fn publish(&mut self, channel: &str, payload: Value) -> Value {
        self.request(json!({"type": "publish", "channel": channel, "payload": payload}))
            .await
    }

    /// Asserts that no `message` frame is pending: a ping's pong arrives before any message.
    pub async fn assert_no_message(&mut self) {
        assert!(
            !self.pending.iter().any(|v| v["type"] == "message"),
            "unexpected message: {:?}",
            self.pending
        );
        let pong = self.request(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong");
        assert!(
            !self.pending.iter().any(|v| v["type"] == "message"),
            "unexpected message: {:?}",
            self.pending
        );
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the connection closes in time");
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Sends a binary frame.
pub fn binary(bytes: &'static [u8]) -> Message {
    Message::Binary(Bytes::from_static(bytes))
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` until it returns true or `WAIT` passes.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Reads `total` messages on `client` in a task, asserting their `payload.seq` runs 0, 1, ... in
/// order (the companion of [`flood`]); the task returns the client.
pub fn read_in_order(mut client: Client, total: u64) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        for seq in 0..total {
            let m = client.next_message().await;
            assert_eq!(
                m["payload"]["seq"], seq,
                "the healthy client gets every message in order"
            );
        }
        client
    })
}

/// Publishes `total` messages `{"seq": n, "pad": <pad_bytes of x>}` on `channel` without waiting
/// for each `ok`, but checking every 32nd so the publisher never runs far ahead of the broker.
pub async fn flood(publisher: &mut Client, channel: &str, total: u64, pad_bytes: usize) {
    let pad = "x".repeat(pad_bytes);
    for seq in 0..total {
        publisher
            .send(json!({"type": "publish", "id": seq, "channel": channel, "payload": {"seq": seq, "pad": pad}}))
            .await;
        if seq % 32 == 31 || seq + 1 == total {
            let reply = publisher.reply_to(json!(seq)).await;
            assert_eq!(reply["type"], "ok", "publish {seq}: {reply}");
        }
    }
}

/// Sends signal `name` (`KILL`, `STOP`, `CONT`, `TERM`) to process `pid`, as a fault test does to
/// a broker.
pub async fn signal(pid: u32, name: &str) {
    let status = tokio::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// 100 sockets subscribed to `pattern`.
pub async fn hundred_subscribers(addr: SocketAddr, pattern: &str) -> Vec<Client> {
    let mut subscribers = Vec::new();
    for _ in 0..100 {
        let mut ws = Client::connect(addr).await;
        ws.subscribe(pattern).await;
        subscribers.push(ws);
    }
    subscribers
}

/// Publishes `{"seq": n}` for n from `from` to `to` on `channel` at 500 msg/s and returns once
/// every one is acknowledged `ok`.
pub async fn stream_500_per_second(publisher: &mut Client, channel: &str, from: u64, to: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for seq in from..to {
        tick.tick().await;
        publisher
            .send(
                json!({"type": "publish", "id": seq, "channel": channel, "payload": {"seq": seq}}),
            )
            .await;
    }
    for seq in from..to {
        let reply = publisher.reply_to(json!(seq)).await;
        assert_eq!(reply["type"], "ok", "publish {seq}: {reply}");
    }
}

/// Checks that every subscriber gets `{"seq": n}` for each n in `range`, in order. A message
/// whose `seq` is in `unknown` (a publish whose outcome was unknown) may come in between.
pub async fn expect_stream(
    subscribers: &mut [Client],
    range: std::ops::Range<u64>,
    unknown: &[i64],
) {
    for ws in subscribers.iter_mut() {
        for seq in range.clone() {
            let mut m = ws.next_message().await;
            while m["payload"]["seq"]
                .as_i64()
                .is_some_and(|s| unknown.contains(&s))
            {
                m = ws.next_message().await;
            }
            assert_eq!(m["payload"]["seq"], seq, "{m}");
        }
    }
}

/// Checks that the next status every subscriber gets has `code`.
pub async fn expect_status(subscribers: &mut [Client], code: &str) {
    for ws in subscribers.iter_mut() {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], code, "{status}");
    }
}
