//! Proxy routes (`[[proxies]]`) over real sockets: clients relayed to real upstream WebSocket
//! services (tests/common/ws_upstream.rs), frames of every kind, subprotocols, balancing, an
//! upstream dying and coming back, the checks at the edge, shutdown and the admin API.

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::ws_upstream::WsUpstream;
use common::{WAIT, eventually, start};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbridge::Gateway;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "proxy-test-secret-that-is-long-enough-01";
const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// A gateway config with one memory backend and the given extra tables (`[[proxies]]` ...).
fn config(extra: &str) -> String {
    format!(
        r##"
[backends.local]
type = "memory"

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]

{extra}
"##
    )
}

/// A `[[proxies]]` table at `path` over `upstreams`, with more keys in `keys`.
fn proxy(path: &str, upstreams: &[String], keys: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[proxies]]\npath = \"{path}\"\nupstreams = [{}]\n{keys}\n",
        list.join(", ")
    )
}

fn token(sub: &str, tenant: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "tenant": tenant, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn request(gw: &Gateway, path_and_query: &str) -> Request {
    format!("ws://{}{path_and_query}", gw.local_addr())
        .into_client_request()
        .unwrap()
}

/// Connects through the gateway; a refusal gives the HTTP status and body.
async fn try_connect(request: Request) -> Result<(Socket, Option<String>), (u16, String)> {
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
        Ok((ws, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            Ok((ws, protocol))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => Err((0, e.to_string())),
    }
}

async fn connect(gw: &Gateway, path_and_query: &str) -> Socket {
    try_connect(request(gw, path_and_query))
        .await
        .expect("the proxied connection opens")
        .0
}

/// The next data message (pings and pongs skipped).
async fn next_data(ws: &mut Socket) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the connection is open")
            .expect("a valid message");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Reads until the close frame; its code and reason.
async fn close_of(ws: &mut Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closes in time")
        {
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

/// The close frame the upstream received, once it has.
async fn upstream_close(upstream: &WsUpstream) -> (u16, String) {
    let mut found = None;
    eventually("the upstream receives a close frame", async || {
        found = upstream.received().into_iter().find_map(|m| match m {
            Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
            _ => None,
        });
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// A WebSocket client with no close-code checks of its own (tungstenite reports a 1014 it
/// receives as 1002): the handshake by hand, then the first close frame's code and reason.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\n") {
            let byte = tokio::time::timeout(WAIT, stream.read_u8())
                .await
                .expect("handshake answer in time")
                .unwrap();
            response.push(byte);
        }
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        RawClient { stream }
    }

    /// Skips frames up to the first close; its code and reason.
    async fn close(&mut self) -> (u16, String) {
        loop {
            let (opcode, payload) = tokio::time::timeout(WAIT, self.frame())
                .await
                .expect("a frame in time");
            if opcode == 8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    }

    async fn frame(&mut self) -> (u8, Vec<u8>) {
        let s = &mut self.stream;
        let first = s.read_u8().await.unwrap();
        let second = s.read_u8().await.unwrap();
        let len = match second & 0x7f {
            126 => u64::from(s.read_u16().await.unwrap()),
            127 => s.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        (first & 0x0f, payload)
    }
}

async fn metrics_text(gw: &Gateway) -> String {
    common::http_get(gw.local_addr(), "/metrics").await.1
}

#[tokio::test]
async fn frames_of_every_kind_pass_through_unchanged() {
    let upstream = WsUpstream::start(&[]).await;
    let gw = start(&config(&proxy("/chat", &[upstream.url("/chat")], ""))).await;
    let mut ws = connect(&gw, "/chat").await;

    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = vec![
        Message::Text("hello, upstream ✓".into()),
        Message::Binary(Bytes::from(all_bytes)),
        Message::Text("".into()),
        Message::Binary(Bytes::new()),
        Message::Binary(Bytes::from(large)),
    ];
    for message in &sent {
        ws.send(message.clone()).await.unwrap();
        assert_eq!(&next_data(&mut ws).await, message, "echoed unchanged");
    }

    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    eventually("the ping reaches the upstream", async || {
        upstream
            .received()
            .contains(&Message::Ping(Bytes::from_static(b"are you there")))
    })
    .await;

    // One text message in three frames: the upstream gets it whole.
    let part = |data: &'static str, opcode: OpCode, fin: bool| {
        let mut frame = Frame::message(Bytes::from_static(data.as_bytes()), opcode, fin);
        frame.header_mut().is_final = fin;
        Message::Frame(frame)
    };
    ws.send(part("frag", OpCode::Data(Data::Text), false))
        .await
        .unwrap();
    ws.send(part("men", OpCode::Data(Data::Continue), false))
        .await
        .unwrap();
    ws.send(part("ted", OpCode::Data(Data::Continue), true))
        .await
        .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("fragmented".into()));
    assert!(
        upstream
            .received()
            .contains(&Message::Text("fragmented".into()))
    );

    let received: Vec<Message> = upstream
        .received()
        .into_iter()
        .filter(|m| m.is_text() || m.is_binary())
        .collect();
    assert_eq!(
        received[..sent.len()],
        sent[..],
        "the upstream got every message as sent"
    );

    // The client's close code and reason reach the upstream.
    ws.close(Some(CloseFrame {
        code: 4000.into(),
        reason: "done for today".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        upstream_close(&upstream).await,
        (4000, "done for today".into())
    );
    eventually("the upstream connection ends", async || {
        upstream.open_connections() == 0
    })
    .await;

    // The upstream's close code and reason reach the client.
    let mut ws = connect(&gw, "/chat").await;
    ws.send(Message::Text("close:4321:see you later".into()))
        .await
        .unwrap();
    assert_eq!(close_of(&mut ws).await, (4321, "see you later".into()));

    let metrics = metrics_text(&gw).await;
    let label = format!("proxy=\"/chat\",upstream=\"{}\"", upstream.url("/chat"));
    assert!(
        metrics.contains(&format!(
            "wsbridge_proxy_frames_total{{direction=\"to_upstream\",{label}}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("wsbridge_proxy_upstream_up{{{label}}} 1")),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_upstream_chooses_the_subprotocol_and_never_sees_a_token_entry() {
    let upstream = WsUpstream::start(&["chat.v2", "chat.v1"]).await;
    let gw = start(&config(&proxy("/chat", &[upstream.url("/chat")], ""))).await;
    let mut req = request(&gw, "/chat?room=5");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chat.v1, access_token.not-a-real-token, chat.v2"),
    );
    let (mut ws, protocol) = try_connect(req).await.unwrap();
    assert_eq!(protocol.as_deref(), Some("chat.v2"));
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("hi".into()));

    let handshake = &upstream.handshakes()[0];
    assert_eq!(handshake.target, "/chat?room=5");
    let offered = handshake.headers["sec-websocket-protocol"]
        .to_str()
        .unwrap();
    assert_eq!(offered, "chat.v1, chat.v2");
    assert_eq!(handshake.headers["x-forwarded-for"], "127.0.0.1");
    gw.shutdown().await;
}

#[tokio::test]
async fn round_robin_spreads_connections_evenly() {
    let upstreams = [
        WsUpstream::start(&[]).await,
        WsUpstream::start(&[]).await,
        WsUpstream::start(&[]).await,
    ];
    let urls: Vec<String> = upstreams.iter().map(|u| u.url("/feed")).collect();
    let gw = start(&config(&proxy("/feed", &urls, "balance = \"round_robin\""))).await;
    // Sequential connections, each closed before the next: only turns decide.
    for _ in 0..99 {
        let mut ws = connect(&gw, "/feed").await;
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    let counts: Vec<usize> = upstreams.iter().map(|u| u.handshakes().len()).collect();
    assert_eq!(counts, [33, 33, 33]);
    gw.shutdown().await;
}

#[tokio::test]
async fn least_connections_fills_the_emptiest_upstream() {
    let a = WsUpstream::start(&[]).await;
    let b = WsUpstream::start(&[]).await;
    let urls = [a.url("/feed"), b.url("/feed")];
    let gw = start(&config(&proxy(
        "/feed",
        &urls,
        "balance = \"least_connections\"",
    )))
    .await;
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(connect(&gw, &format!("/feed?n={i}")).await);
    }
    eventually("50 connections on each upstream", async || {
        (a.open_connections(), b.open_connections()) == (50, 50)
    })
    .await;

    // Close 20 of a's clients; the next 20 all go to a.
    let on_a: Vec<usize> = a
        .handshakes()
        .iter()
        .map(|h| h.target.trim_start_matches("/feed?n=").parse().unwrap())
        .collect();
    let mut closed = 0;
    for &i in on_a.iter().take(20) {
        clients[i].close(None).await.unwrap();
        while clients[i].next().await.is_some() {}
        closed += 1;
    }
    assert_eq!(closed, 20);
    eventually("a's connections close", async || a.open_connections() == 30).await;
    // The gateway's count drops when its relay ends, just after the upstream's.
    eventually("the gateway counts them closed", async || {
        metrics_text(&gw).await.contains(&format!(
            "wsbridge_proxy_connections{{proxy=\"/feed\",upstream=\"{}\"}} 30",
            a.url("/feed")
        ))
    })
    .await;
    for i in 100..120 {
        clients.push(connect(&gw, &format!("/feed?n={i}")).await);
    }
    eventually("50 connections on each upstream", async || {
        (a.open_connections(), b.open_connections()) == (50, 50)
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_upstream_closes_its_clients_with_1014_and_is_probed_back_in() {
    let a = WsUpstream::start(&[]).await;
    let b = WsUpstream::start(&[]).await;
    let (url_a, url_b) = (a.url("/live"), b.url("/live"));
    let gw = start(&config(&proxy(
        "/live",
        &[url_a.clone(), url_b.clone()],
        "health_check = { interval = \"100ms\", timeout = \"500ms\" }\nconnect_timeout = \"1s\"",
    )))
    .await;
    let mut raw = Vec::new();
    for _ in 0..4 {
        raw.push(RawClient::connect(gw.local_addr(), "/live").await);
    }
    eventually("two connections on each upstream", async || {
        (a.open_connections(), b.open_connections()) == (2, 2)
    })
    .await;

    let mut a = a;
    a.kill().await;
    // The two clients of the dead upstream are closed with 1014; b's stay open.
    let mut closes: futures_util::stream::FuturesUnordered<_> =
        raw.iter_mut().map(|client| client.close()).collect();
    let mut codes = Vec::new();
    for _ in 0..2 {
        codes.push(closes.next().await.unwrap());
    }
    drop(closes);
    assert_eq!(
        codes,
        vec![(1014, "upstream connection lost".to_string()); 2]
    );
    assert_eq!(b.open_connections(), 2, "b's clients are still connected");
    let up_a = format!("wsbridge_proxy_upstream_up{{proxy=\"/live\",upstream=\"{url_a}\"}}");
    eventually("the health check takes a out", async || {
        metrics_text(&gw).await.contains(&format!("{up_a} 0"))
    })
    .await;

    // New clients all go to b while a is down.
    let before = b.handshakes().len();
    let mut on_b = Vec::new();
    for _ in 0..5 {
        on_b.push(connect(&gw, "/live").await);
    }
    assert_eq!(b.handshakes().len(), before + 5);

    // a comes back on the same port: the health check lets it in, and it gets the next client
    // (it has the fewest connections).
    a.restart().await;
    assert_eq!(a.url("/live"), url_a);
    eventually("the health check brings a back", async || {
        metrics_text(&gw).await.contains(&format!("{up_a} 1"))
    })
    .await;
    let mut ws = connect(&gw, "/live").await;
    ws.send(Message::Text("back".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("back".into()));
    assert_eq!(a.open_connections(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn no_reachable_upstream_gives_502_and_a_circuit_opens() {
    // Ports nobody listens on.
    let dead: Vec<String> = {
        let mut urls = Vec::new();
        for _ in 0..2 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("ws://{}/x", listener.local_addr().unwrap()));
        }
        urls
    };
    let gw = start(&config(&proxy(
        "/x",
        &dead,
        "max_failures = 2\ncooldown = \"60s\"",
    )))
    .await;
    for _ in 0..2 {
        let (status, body) = try_connect(request(&gw, "/x")).await.unwrap_err();
        assert_eq!(status, 502);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], "bad_gateway", "{body}");
        assert!(body["message"].as_str().unwrap().contains("/x"), "{body}");
    }
    let metrics = metrics_text(&gw).await;
    for url in &dead {
        let label = format!("proxy=\"/x\",upstream=\"{url}\"");
        assert!(
            metrics.contains(&format!(
                "wsbridge_proxy_connect_failures_total{{{label}}} 2"
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("wsbridge_proxy_upstream_up{{{label}}} 0")),
            "{metrics}"
        );
    }
    // Both circuits are open: refused at once, without another connect.
    let (status, _) = try_connect(request(&gw, "/x")).await.unwrap_err();
    assert_eq!(status, 502);
    assert!(metrics_text(&gw).await.contains(&format!(
        "wsbridge_proxy_connect_failures_total{{proxy=\"/x\",upstream=\"{}\"}} 2",
        dead[0]
    )));
    gw.shutdown().await;
}

#[tokio::test]
async fn tokens_and_origins_are_checked_at_the_edge_and_only_the_subject_goes_upstream() {
    let upstream = WsUpstream::start(&[]).await;
    let gw = start(&config(&format!(
        "[server]\nallowed_origins = [\"https://app.example.com\"]\n[auth]\nmode = \"jwt\"\nsecret = \"{SECRET}\"\n{}",
        proxy(
            "/chat",
            &[upstream.url("/chat")],
            "forward_subject = \"x-user\"\nforward_claims = { \"x-tenant\" = \"tenant\" }"
        )
    )))
    .await;

    let (status, body) = try_connect(request(&gw, "/chat")).await.unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_token"), "{body}");

    let jwt = token("alice", "acme");
    let mut req = request(&gw, &format!("/chat?room=1&access_token={jwt}"));
    req.headers_mut().insert(
        "origin",
        HeaderValue::from_static("https://evil.example.com"),
    );
    let (status, body) = try_connect(req).await.unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(
        upstream.handshakes().is_empty(),
        "refused before any upstream connect"
    );

    let mut req = request(&gw, &format!("/chat?room=1&access_token={jwt}"));
    req.headers_mut().insert(
        "origin",
        HeaderValue::from_static("https://app.example.com"),
    );
    req.headers_mut()
        .insert("cookie", HeaderValue::from_static("theme=dark"));
    let (mut ws, _) = try_connect(req).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("hello".into()));

    let mut bearer = request(&gw, "/chat");
    bearer.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token("bob", "initech"))).unwrap(),
    );
    let (_ws_bob, _) = try_connect(bearer).await.unwrap();

    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 2);
    let alice = &handshakes[0];
    assert_eq!(
        alice.target, "/chat?room=1",
        "the token query parameter is dropped"
    );
    assert_eq!(alice.headers["x-user"], "alice");
    assert_eq!(alice.headers["x-tenant"], "acme");
    assert!(!alice.headers.contains_key("cookie"));
    let bob = &handshakes[1];
    assert_eq!(bob.headers["x-user"], "bob");
    assert!(!bob.headers.contains_key("authorization"));
    gw.shutdown().await;
}

#[tokio::test]
async fn oversized_messages_and_message_floods_are_closed_at_the_edge() {
    let big = WsUpstream::start(&[]).await;
    let fast = WsUpstream::start(&[]).await;
    let gw = start(&config(&format!(
        "{}{}",
        proxy("/big", &[big.url("/big")], "max_message_size = 1024"),
        proxy("/fast", &[fast.url("/fast")], "max_messages_per_second = 5"),
    )))
    .await;

    let mut ws = connect(&gw, "/big").await;
    ws.send(Message::Binary(Bytes::from(vec![1u8; 1024])))
        .await
        .unwrap();
    assert_eq!(next_data(&mut ws).await.len(), 1024);
    ws.send(Message::Binary(Bytes::from(vec![1u8; 1025])))
        .await
        .unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");
    let (code, _) = upstream_close(&big).await;
    assert_eq!(code, 1001);
    assert!(
        !big.received().iter().any(|m| m.len() == 1025),
        "never relayed"
    );

    let mut ws = connect(&gw, "/fast").await;
    for i in 0..50 {
        if ws.send(Message::Text(format!("{i}").into())).await.is_err() {
            break;
        }
    }
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "message rate limit exceeded")
    );
    assert_eq!(upstream_close(&fast).await.0, 1001);
    let relayed = fast.received().iter().filter(|m| m.is_text()).count();
    assert!(relayed < 50, "the flood was cut short ({relayed} relayed)");
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_both_sides_with_1001() {
    let upstream = WsUpstream::start(&[]).await;
    let gw = start(&config(&proxy("/chat", &[upstream.url("/chat")], ""))).await;
    let mut ws = connect(&gw, "/chat").await;
    ws.send(Message::Text("hi".into())).await.unwrap();
    next_data(&mut ws).await;
    let shutdown = tokio::spawn(gw.shutdown());
    assert_eq!(
        close_of(&mut ws).await,
        (1001, "server shutting down".into())
    );
    assert_eq!(
        upstream_close(&upstream).await,
        (1001, "server shutting down".into())
    );
    while ws.next().await.is_some() {}
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("the gateway stops")
        .unwrap();
    eventually("the upstream connection ends", async || {
        upstream.open_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn the_admin_api_lists_a_pair_and_closes_both_sides() {
    let upstream = WsUpstream::start(&["chat.v1"]).await;
    let gw = start(&config(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n{}",
        proxy("/chat", &[upstream.url("/chat")], "")
    )))
    .await;
    let mut req = request(&gw, "/chat");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chat.v1"),
    );
    let (mut ws, _) = try_connect(req).await.unwrap();
    ws.send(Message::Text("hi".into())).await.unwrap();
    next_data(&mut ws).await;

    let admin = format!("http://{}/admin/connections", gw.admin_addr().unwrap());
    let client = reqwest::Client::new();
    let text = client
        .get(&admin)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let pairs: Vec<&Value> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["edge"] == "proxy")
        .collect();
    assert_eq!(pairs.len(), 1, "{list}");
    let pair = pairs[0];
    assert_eq!(pair["proxy"], "/chat");
    assert_eq!(pair["upstream"], upstream.url("/chat"));
    assert_eq!(pair["protocol"], "chat.v1");
    assert_eq!(pair["subject"], Value::Null);

    let closed = client
        .delete(format!("{admin}/{}", pair["id"]))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 200);
    assert_eq!(
        close_of(&mut ws).await,
        (4002, "closed by administrator".into())
    );
    assert_eq!(upstream_close(&upstream).await.0, 1001);
    gw.shutdown().await;
}

#[tokio::test]
async fn without_a_health_check_a_trial_connect_after_the_cooldown_brings_an_upstream_back() {
    let mut upstream = WsUpstream::start(&[]).await;
    let url = upstream.url("/solo");
    let gw = start(&config(&proxy(
        "/solo",
        std::slice::from_ref(&url),
        "max_failures = 1\ncooldown = \"300ms\"",
    )))
    .await;
    upstream.kill().await;
    let failures =
        format!("wsbridge_proxy_connect_failures_total{{proxy=\"/solo\",upstream=\"{url}\"}}");
    let (status, _) = try_connect(request(&gw, "/solo")).await.unwrap_err();
    assert_eq!(status, 502);
    assert!(metrics_text(&gw).await.contains(&format!("{failures} 1")));
    // Out: refused without a connect until the cooldown has passed.
    let (status, _) = try_connect(request(&gw, "/solo")).await.unwrap_err();
    assert_eq!(status, 502);

    upstream.restart().await;
    let mut connected = None;
    eventually("a trial connect gets through", async || {
        connected = try_connect(request(&gw, "/solo")).await.ok();
        connected.is_some()
    })
    .await;
    let (mut ws, _) = connected.unwrap();
    ws.send(Message::Text("again".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("again".into()));
    assert!(metrics_text(&gw).await.contains(&format!(
        "wsbridge_proxy_upstream_up{{proxy=\"/solo\",upstream=\"{url}\"}} 1"
    )));
    gw.shutdown().await;
}
