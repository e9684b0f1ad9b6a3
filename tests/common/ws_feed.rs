//! A real upstream WebSocket feed for the `websocket` backend's tests: it accepts connections on
//! 127.0.0.1, counts the open ones per request path, sends a message to every connection of a
//! path, records what each path receives, and can be killed (every socket dropped without a
//! close frame, the listener closed) and restarted on the same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What a connection's task is told to do.
enum Command {
    Send(Message),
    /// Stop reading (so pings go unanswered) and writing, keeping the socket open.
    Mute,
}

#[derive(Default)]
struct Path {
    /// Open connections, each with the queue of its task.
    open: HashMap<u64, mpsc::UnboundedSender<Command>>,
    /// Connections ever accepted on the path.
    accepted: usize,
    received: Vec<Message>,
    /// Request headers of the latest connection.
    headers: Vec<(String, String)>,
    /// Close codes received, in order.
    closes: Vec<u16>,
}

#[derive(Default)]
struct State {
    paths: HashMap<String, Path>,
    next_id: u64,
}

/// The feed server.
pub struct WsFeed {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Option<Arc<Mutex<JoinSet<()>>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl WsFeed {
    /// Starts a feed on a free port.
    pub async fn start() -> WsFeed {
        Self::start_on(0).await
    }

    /// Starts a feed on `port` (0: a free one).
    pub async fn start_on(port: u16) -> WsFeed {
        let mut feed = WsFeed {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            state: Arc::default(),
            tasks: None,
            accept: None,
        };
        feed.listen().await;
        feed
    }

    async fn listen(&mut self) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(self.addr).expect("the feed binds its port");
        let listener: TcpListener = socket.listen(128).expect("listen");
        self.addr = listener.local_addr().expect("local address");
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let state = self.state.clone();
        let spawned = tasks.clone();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                spawned
                    .lock()
                    .unwrap()
                    .spawn(async move { serve(stream, state).await });
            }
        }));
        self.tasks = Some(tasks);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The backend `url` for this feed with `{topic}` after `prefix`, e.g.
    /// `ws://127.0.0.1:PORT/stream/{topic}`.
    pub fn url(&self, prefix: &str) -> String {
        format!("ws://{}{prefix}{{topic}}", self.addr)
    }

    /// Open connections on a request path (e.g. `/stream/BTC`).
    pub fn connections(&self, path: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.paths.get(path).map_or(0, |p| p.open.len())
    }

    /// Connections ever accepted on a path.
    pub fn accepted(&self, path: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.paths.get(path).map_or(0, |p| p.accepted)
    }

    /// Sends `message` to every open connection of `path`; returns how many there were.
    pub fn send(&self, path: &str, message: Message) -> usize {
        let state = self.state.lock().unwrap();
        let Some(p) = state.paths.get(path) else {
            return 0;
        };
        p.open
            .values()
            .filter(|tx| tx.send(Command::Send(message.clone())).is_ok())
            .count()
    }

    /// Makes every open connection of `path` go silent: nothing is read (pings go unanswered)
    /// or sent on it any more, and its socket stays open.
    pub fn mute(&self, path: &str) {
        let state = self.state.lock().unwrap();
        if let Some(p) = state.paths.get(path) {
            for tx in p.open.values() {
                let _ = tx.send(Command::Mute);
            }
        }
    }

    /// Close codes received on `path`, in order.
    pub fn close_codes(&self, path: &str) -> Vec<u16> {
        let state = self.state.lock().unwrap();
        state
            .paths
            .get(path)
            .map(|p| p.closes.clone())
            .unwrap_or_default()
    }

    /// Text and binary messages received on `path`, in order.
    pub fn received(&self, path: &str) -> Vec<Message> {
        let state = self.state.lock().unwrap();
        state
            .paths
            .get(path)
            .map(|p| p.received.clone())
            .unwrap_or_default()
    }

    /// A request header of the latest connection on `path`.
    pub fn header(&self, path: &str, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state.paths.get(path).and_then(|p| {
            p.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    }

    /// Drops every connection without a close frame and closes the listener.
    pub async fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        if let Some(tasks) = self.tasks.take() {
            let mut tasks = std::mem::take(&mut *tasks.lock().unwrap());
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let mut state = self.state.lock().unwrap();
        for path in state.paths.values_mut() {
            path.open.clear();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        assert!(self.accept.is_none(), "kill the feed before restarting it");
        self.listen().await;
    }
}

impl Drop for WsFeed {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        if let Some(tasks) = self.tasks.take() {
            tasks.lock().unwrap().abort_all();
        }
    }
}

// tungstenite's handshake callback returns its large error response type by value.
#[allow(clippy::result_large_err)]
async fn serve(stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut state = state.lock().unwrap();
        state.next_id += 1;
        state.next_id
    };
    let mut path = String::new();
    // Registers the connection before the handshake's answer goes out, so a client that has
    // its answer finds the connection counted; chooses the first subprotocol offered, as a feed
    // that speaks them all would.
    let callback = |request: &Request, mut response: Response| {
        if let Some(first) = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", first);
        }
        path = request.uri().path().to_owned();
        let headers = request
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let mut state = state.lock().unwrap();
        let entry = state.paths.entry(path.clone()).or_default();
        entry.open.insert(id, tx);
        entry.accepted += 1;
        entry.headers = headers;
        Ok(response)
    };
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let Ok(ws) = accepted else {
        if let Some(p) = state.lock().unwrap().paths.get_mut(&path) {
            p.open.remove(&id);
        }
        return;
    };
    let (mut sink, mut source) = ws.split();
    loop {
        tokio::select! {
            command = rx.recv() => match command {
                Some(Command::Send(message)) => if sink.send(message).await.is_err() { break },
                Some(Command::Mute) => std::future::pending::<()>().await,
                None => break,
            },
            incoming = source.next() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    let mut state = state.lock().unwrap();
                    if let Some(p) = state.paths.get_mut(&path) {
                        p.received.push(message);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    if let Some(p) = state.lock().unwrap().paths.get_mut(&path) {
                        p.closes.push(code);
                    }
                    // Answer the close (tungstenite queues the reply), then stop.
                    let _ = sink.flush().await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let mut state = state.lock().unwrap();
    if let Some(p) = state.paths.get_mut(&path) {
        p.open.remove(&id);
    }
}
