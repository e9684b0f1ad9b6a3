//! The HTTP edges over real sockets with a plain HTTP client: Server-Sent Events (`GET /sse`),
//! HTTP publish (`POST /publish`), `GET /routes` and the console. Memory-backend tests need
//! nothing installed; the MQTT tests use Mosquitto (the shared one on 1883 and private ones) and
//! the Kafka test the broker on 127.0.0.1:9092, like tests/mqtt.rs and tests/kafka.rs.

mod common;
mod kafka_support;
mod mqtt_support;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, WAIT, start, unique};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mqtt_support::{MosquittoSub, PrivateBroker, SHARED_PORT, ready};
use serde_json::{Value, json};

/// One event as an `EventSource` sees it, or a comment.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    id: Option<String>,
    data: String,
    comment: Option<String>,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is JSON ({e}): {self:?}"))
    }
}

/// A Server-Sent Events client over reqwest's chunked body.
struct Sse {
    response: reqwest::Response,
    buffer: String,
    events: VecDeque<Event>,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

impl Sse {
    /// Opens `/sse?{query}`; a refusal gives its status and JSON body.
    async fn open(
        addr: SocketAddr,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Sse, (u16, Value)> {
        let mut request = http().get(format!("http://{addr}/sse?{query}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("/sse answers in time")
            .expect("/sse request");
        let status = response.status().as_u16();
        if status != 200 {
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "refusals are JSON"
            );
            let body = response.text().await.unwrap();
            return Err((status, serde_json::from_str(&body).expect("a JSON body")));
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert_eq!(response.headers()["cache-control"], "no-cache");
        Ok(Sse {
            response,
            buffer: String::new(),
            events: VecDeque::new(),
        })
    }

    async fn ok(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Sse {
        match Sse::open(addr, query, headers).await {
            Ok(sse) => sse,
            Err(refusal) => panic!("/sse?{query} refused: {refusal:?}"),
        }
    }

    /// Reads one more chunk; false at the end of the stream.
    async fn read(&mut self) -> bool {
        let chunk = tokio::time::timeout(WAIT, self.response.chunk())
            .await
            .expect("the stream sends within the wait")
            .expect("the stream reads");
        let Some(chunk) = chunk else {
            return false;
        };
        self.buffer
            .push_str(std::str::from_utf8(&chunk).expect("the stream is UTF-8"));
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = Event {
                kind: "message".into(),
                id: None,
                data: String::new(),
                comment: None,
            };
            let mut data = Vec::new();
            for line in block.trim_end_matches('\n').lines() {
                if let Some(comment) = line.strip_prefix(':') {
                    event.comment = Some(comment.trim().to_owned());
                    continue;
                }
                let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                match field {
                    "event" => event.kind = value.to_owned(),
                    "id" => event.id = Some(value.to_owned()),
                    "data" => data.push(value),
                    other => panic!("unexpected field {other:?} in {block:?}"),
                }
            }
            event.data = data.join("\n");
            self.events.push_back(event);
        }
        true
    }

    /// The next event or comment.
    async fn next_any(&mut self) -> Event {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            assert!(self.read().await, "the stream ended early");
        }
    }

    /// The next event of `kind` (comments and other kinds are skipped).
    async fn next_of(&mut self, kind: &str) -> Event {
        loop {
            let event = self.next_any().await;
            if event.comment.is_none() && event.kind == kind {
                return event;
            }
        }
    }

    /// Reads to the end of the stream; returns the comments seen on the way.
    async fn expect_end(&mut self) -> Vec<String> {
        while self.read().await {}
        self.events.drain(..).filter_map(|e| e.comment).collect()
    }
}

/// `POST /publish` with a JSON body; returns the status and the JSON body.
async fn post(addr: SocketAddr, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = http()
        .post(format!("http://{addr}/publish"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("/publish answers in time")
        .expect("/publish request");
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).expect("/publish answers JSON"),
    )
}

async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = http().get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("answers in time")
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn assert_refused(result: (u16, Value), status: u16, code: &str) -> Value {
    let (got, body) = result;
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

fn refusal<T>(result: Result<T, (u16, Value)>) -> (u16, Value) {
    match result {
        Ok(_) => panic!("expected a refusal, the stream opened"),
        Err(refusal) => refusal,
    }
}

/// A memory gateway: `site/{site}/#` for everything, `cmd/{device}` publish only, `feed/#`
/// subscribe only.
fn memory_config(server: &str, limits: &str) -> String {
    format!(
        r##"
[server]
{server}

[limits]
{limits}

[backends.local]
type = "memory"

[[routes]]
channel = "site/{{site}}/#"
backend = "local"
topic = "plant/{{site}}/#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "cmd/{{device}}"
backend = "local"
topic = "cmd/{{device}}"
allow = ["publish"]

[[routes]]
channel = "feed/#"
backend = "local"
topic = "feed/#"
allow = ["subscribe"]
"##
    )
}

#[tokio::test]
async fn sse_carries_websocket_message_frames_and_ends_with_shutting_down() {
    let gw = start(&memory_config("", "")).await;
    let addr = gw.local_addr();
    let site = unique("s");
    let pattern = format!("site/{site}/+");
    let mut sse = Sse::ok(
        addr,
        &format!("channel={}&channel=feed/x", urlencode(&pattern)),
        &[],
    )
    .await;
    let mut ws = Client::connect(addr).await;
    ws.subscribe(&pattern).await;

    let channel = format!("site/{site}/temp");
    let ok = post(
        addr,
        &json!({"channel": channel, "payload": {"celsius": 21.5}, "headers": {"h": "v"}})
            .to_string(),
        &[],
    )
    .await;
    assert_eq!(ok, (200, json!({"type": "ok"})));
    // A text payload with a line break stays one event.
    let ok = post(
        addr,
        &json!({"channel": channel, "payload": "two\nlines"}).to_string(),
        &[],
    )
    .await;
    assert_eq!(ok.0, 200, "{ok:?}");

    let event = sse.next_of("message").await;
    assert_eq!(event.id, None, "memory messages have no position");
    let frame = ws.next_message().await;
    assert_eq!(event.json(), frame, "the data is the WebSocket frame");
    assert_eq!(frame["payload"], json!({"celsius": 21.5}));
    assert_eq!(frame["subscription"], pattern);
    let event = sse.next_of("message").await;
    assert_eq!(event.json()["payload"], "two\nlines");

    let shutdown = tokio::spawn(gw.shutdown());
    let status = sse.next_of("status").await;
    assert_eq!(status.json()["type"], "status");
    assert_eq!(status.json()["code"], "shutting_down");
    assert_eq!(status.json()["reconnect_after_ms"], 0);
    let comments = sse.expect_end().await;
    assert!(
        comments.iter().any(|c| c.contains("server shutting down")),
        "{comments:?}"
    );
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("the gateway stops once the stream has ended")
        .unwrap();
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn sse_sends_keepalive_comments_at_the_ping_interval() {
    let gw = start(&memory_config(
        "ping_interval = \"100ms\"\nidle_timeout = \"5s\"",
        "",
    ))
    .await;
    let mut sse = Sse::ok(gw.local_addr(), "channel=feed/%23", &[]).await;
    for _ in 0..3 {
        let event = sse.next_any().await;
        assert_eq!(event.comment.as_deref(), Some("keepalive"), "{event:?}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_refusals_come_before_the_stream_as_json_errors() {
    let gw = start(&memory_config(
        "allowed_origins = [\"http://good.example\"]\nmax_subscriptions = 3",
        "subscribe_per_second = 2\nmax_replays_per_connection = 1",
    ))
    .await;
    let addr = gw.local_addr();
    let open = |query: &'static str| async move { refusal(Sse::open(addr, query, &[]).await) };

    assert_refused(open("").await, 400, "invalid_request");
    assert_refused(open("from=earliest").await, 400, "invalid_request");
    assert_refused(
        open("channel=feed/a&from=tomorrow").await,
        400,
        "invalid_request",
    );
    assert_refused(open("channel=site/%23/x").await, 400, "invalid_channel");
    assert_refused(open("channel=nowhere/a").await, 404, "no_route");
    assert_refused(open("channel=cmd/pump").await, 403, "forbidden");
    assert_refused(
        open("channel=feed/a&channel=feed/a").await,
        400,
        "already_subscribed",
    );
    assert_refused(
        open("channel=feed/a&channel=feed/b&channel=feed/c&channel=feed/d").await,
        400,
        "too_many_subscriptions",
    );
    assert_refused(
        open("channel=feed/a&channel=feed/b&channel=feed/c").await,
        429,
        "rate_limited",
    );
    assert_refused(
        open("channel=feed/a&channel=feed/b&from=earliest").await,
        429,
        "too_many_replays",
    );
    // The memory broker keeps no history.
    assert_refused(
        open("channel=feed/a&from=earliest").await,
        400,
        "unsupported",
    );
    let bad_id = Sse::open(addr, "channel=feed/a", &[("last-event-id", "zero")]).await;
    assert_refused(refusal(bad_id), 400, "invalid_request");
    let evil = Sse::open(addr, "channel=feed/a", &[("origin", "http://evil.example")]).await;
    let body = assert_refused(refusal(evil), 403, "forbidden");
    assert_eq!(body["message"], "origin not allowed");

    // Nothing a refused stream subscribed stays subscribed.
    assert!(
        gw.hub().sessions_per_upstream().is_empty(),
        "{:?}",
        gw.hub().sessions_per_upstream()
    );
    // An allowed origin, and no origin at all, get their stream.
    let sse = Sse::ok(
        addr,
        "channel=feed/%23",
        &[("origin", "http://good.example")],
    )
    .await;
    assert_eq!(gw.hub().sessions_per_upstream(), vec![1]);
    let other = Sse::ok(addr, "channel=feed/y", &[]).await;
    assert_eq!(gw.hub().sessions_per_upstream().len(), 2);
    drop((sse, other));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stream_whose_client_left_releases_its_subscriptions() {
    let gw = start(&memory_config(
        "ping_interval = \"100ms\"\nidle_timeout = \"5s\"",
        "",
    ))
    .await;
    let sse = Sse::ok(gw.local_addr(), "channel=feed/%23&channel=site/a/%23", &[]).await;
    assert_eq!(gw.hub().sessions_per_upstream().len(), 2);
    drop(sse);
    common::eventually("the stream's subscriptions are released", async || {
        gw.hub().sessions_per_upstream().is_empty()
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_gets_the_newest_messages_and_a_count_of_the_dropped_ones() {
    let gw = start(&memory_config(
        "queue_capacity = 16",
        "publish_per_second = 0\npublish_bytes_per_second = 0",
    ))
    .await;
    let addr = gw.local_addr();
    let channel = format!("site/{}/flood", unique("s"));
    let mut sse = Sse::ok(addr, &format!("channel={}", urlencode(&channel)), &[]).await;
    // 1000 messages of 64 KiB while the stream is not read: more than the socket buffers and the
    // stream's queue of 16 hold.
    let total = 1000;
    let mut publisher = Client::connect(addr).await;
    common::flood(&mut publisher, &channel, total, 64 * 1024).await;

    let (mut received, mut dropped, mut last) = (0, 0, None);
    while last != Some(total - 1) {
        let event = sse.next_any().await;
        if event.comment.is_some() {
            continue;
        }
        let data = event.json();
        match event.kind.as_str() {
            "message" => {
                let seq = data["payload"]["seq"].as_u64().unwrap();
                assert!(
                    last.is_none_or(|l| l < seq),
                    "in order: {seq} after {last:?}"
                );
                last = Some(seq);
                received += 1;
            }
            "status" => {
                assert_eq!(data["code"], "messages_dropped", "{data}");
                dropped += data["count"].as_u64().unwrap();
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(dropped > 0, "the stream's queue overflowed");
    assert_eq!(
        received + dropped,
        total,
        "every message was delivered or counted"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_is_not_read_is_cut_off_at_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start(&memory_config(
        "write_timeout = \"500ms\"\nqueue_capacity = 16",
        "publish_per_second = 0\npublish_bytes_per_second = 0",
    ))
    .await;
    let addr = gw.local_addr();
    let site = unique("s");
    let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
    reader
        .write_all(
            format!("GET /sse?channel=site/{site}/%23 HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, reader.read_exact(&mut byte))
            .await
            .expect("the response head arrives")
            .unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    assert_eq!(gw.hub().sessions_per_upstream(), vec![1]);

    // The client reads nothing more; 64 KiB messages fill the socket buffers, then the stream's
    // writer waits for the socket until the write timeout.
    let mut publisher = Client::connect(addr).await;
    let big = "x".repeat(64 * 1024);
    let channel = format!("site/{site}/flood");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gw.hub().sessions_per_upstream().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream was never cut off"
        );
        let reply = publisher.publish(&channel, json!(big)).await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    let (_, metrics) = common::http_get(addr, "/metrics").await;
    assert!(
        metrics.contains("wsbridge_write_timeouts_total 1"),
        "{metrics}"
    );
    // Its connection is dropped: what the socket buffered drains, then it ends.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was closed");
    gw.shutdown().await;
}

#[tokio::test]
async fn http_publish_refusals_have_their_status_and_code() {
    let gw = start(&memory_config(
        "allowed_origins = [\"http://good.example\"]\nmax_message_size = 256",
        "",
    ))
    .await;
    let addr = gw.local_addr();
    let channel = format!("site/{}/t", unique("s"));
    let publish = |body: String| async move { post(addr, &body, &[]).await };

    assert_refused(publish("{nope".into()).await, 400, "invalid_json");
    assert_refused(publish("[1]".into()).await, 400, "invalid_frame");
    let body = assert_refused(
        publish(json!({"channel": channel}).to_string()).await,
        400,
        "invalid_frame",
    );
    assert!(
        body["message"].as_str().unwrap().contains("\"payload\""),
        "{body}"
    );
    assert_refused(
        publish(json!({"channel": channel, "payload": "%%", "encoding": "base64"}).to_string())
            .await,
        400,
        "invalid_frame",
    );
    assert_refused(
        publish(json!({"channel": "site/+/t", "payload": 1}).to_string()).await,
        400,
        "invalid_channel",
    );
    assert_refused(
        publish(json!({"channel": channel, "payload": 1, "key": "k"}).to_string()).await,
        400,
        "unsupported",
    );
    assert_refused(
        publish(json!({"channel": "feed/a", "payload": 1}).to_string()).await,
        403,
        "forbidden",
    );
    assert_refused(
        publish(json!({"channel": "nowhere/a", "payload": 1}).to_string()).await,
        404,
        "no_route",
    );
    assert_refused(
        publish(json!({"channel": channel, "payload": "x".repeat(300)}).to_string()).await,
        413,
        "message_too_big",
    );
    let body = json!({"channel": channel, "payload": 1}).to_string();
    let evil = post(addr, &body, &[("origin", "http://evil.example")]).await;
    assert_eq!(
        assert_refused(evil, 403, "forbidden")["message"],
        "origin not allowed"
    );
    // Not JSON by its content type: what a cross-site form could send.
    let response = http()
        .post(format!("http://{addr}/publish"))
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);
    let refused: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(refused["code"], "unsupported_media_type");

    // The same body from an allowed origin is published, and reaches subscribers.
    let mut ws = Client::connect(addr).await;
    ws.subscribe(&channel).await;
    let ok = post(addr, &body, &[("origin", "http://good.example")]).await;
    assert_eq!(ok, (200, json!({"type": "ok"})));
    assert_eq!(ws.next_message().await["payload"], 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn http_publish_rates_are_per_client_address() {
    let gw = start(&memory_config("", "publish_per_second = 3")).await;
    let addr = gw.local_addr();
    let body = json!({"channel": format!("site/{}/t", unique("s")), "payload": 1}).to_string();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(addr, &body, &[]).await);
    }
    assert!(statuses[..3].iter().all(|(s, _)| *s == 200), "{statuses:?}");
    assert_refused(statuses[3].clone(), 429, "rate_limited");
    gw.shutdown().await;
}

const SECRET: &str = "http-edge-secret-that-is-long-enough-0123";

fn token(claims: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut claims = claims;
    claims["exp"] = json!(exp);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn jwt_config() -> String {
    format!(
        r##"
[auth]
mode = "jwt"
secret = "{SECRET}"

[backends.local]
type = "memory"

[[routes]]
channel = "users/{{claims.sub}}/#"
backend = "local"
topic = "users/{{claims.sub}}/#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "devices/{{device}}/#"
backend = "local"
topic = "plant/{{device}}/#"
allow = ["subscribe", "publish"]
subscribe_if = "{{device}} in claims.devices"
publish_if = "'operator' in claims.roles"

[[routes]]
channel = "admin/{{area}}"
backend = "local"
topic = "admin/{{area}}"
allow = ["publish"]
publish_if = "'admin' in claims.roles"
"##
    )
}

#[tokio::test]
async fn routes_list_what_each_token_may_use() {
    let gw = start(&jwt_config()).await;
    let addr = gw.local_addr();
    let routes = |claims: Value| async move {
        let bearer = format!("Bearer {}", token(claims));
        let (status, headers, body) = get(addr, "/routes", &[("authorization", &bearer)]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/json");
        serde_json::from_slice::<Value>(&body).unwrap()
    };
    let alice = routes(json!({"sub": "alice", "devices": ["d1"]})).await;
    assert_eq!(
        alice,
        json!({"routes": [
            {"channel": "users/{claims.sub}/#", "pattern": "users/alice/#", "backend": "local", "operations": ["subscribe", "publish"]},
            {"channel": "devices/{device}/#", "pattern": "devices/+/#", "backend": "local", "operations": ["subscribe"]},
        ]})
    );
    let bob = routes(json!({"sub": "bob", "devices": [], "roles": ["operator", "admin"]})).await;
    assert_eq!(
        bob,
        json!({"routes": [
            {"channel": "users/{claims.sub}/#", "pattern": "users/bob/#", "backend": "local", "operations": ["subscribe", "publish"]},
            {"channel": "devices/{device}/#", "pattern": "devices/+/#", "backend": "local", "operations": ["publish"]},
            {"channel": "admin/{area}", "pattern": "admin/+", "backend": "local", "operations": ["publish"]},
        ]})
    );
    // The token in the query, as a browser page passes it.
    let query = format!("/routes?access_token={}", token(json!({"sub": "carol"})));
    let (status, _, body) = get(addr, &query, &[]).await;
    assert_eq!(status, 200);
    let carol: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(carol["routes"][0]["pattern"], "users/carol/#", "{carol}");
    assert!(
        carol["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["channel"] != "admin/{area}"),
        "{carol}"
    );

    let (status, headers, body) = get(addr, "/routes", &[]).await;
    assert_eq!(status, 401);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer error=\"invalid_token\"")
    );
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "invalid_token");
    assert_eq!(body["message"], "missing token");
    let (status, _, _) = get(addr, "/routes", &[("authorization", "Bearer nonsense")]).await;
    assert_eq!(status, 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_can_read_routes_and_their_refusal() {
    let config = format!(
        "{}\n[server]\nallowed_origins = [\"http://app.example\"]\n",
        jwt_config()
    );
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let origin = ("origin", "http://app.example");

    // What a browser asks before sending `Authorization` across origins.
    let preflight = tokio::time::timeout(
        WAIT,
        http()
            .request(reqwest::Method::OPTIONS, format!("http://{addr}/routes"))
            .header(origin.0, origin.1)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send(),
    )
    .await
    .expect("answers in time")
    .expect("request");
    assert_eq!(preflight.status().as_u16(), 204);
    let allowed = preflight.headers();
    assert_eq!(allowed["access-control-allow-origin"], "http://app.example");
    assert_eq!(allowed["access-control-allow-headers"], "authorization");
    assert!(
        !allowed.contains_key("access-control-allow-credentials"),
        "cookies never cross origins"
    );

    // A refused token is readable by the page, so its client can stop instead of retrying.
    let (status, headers, body) =
        get(addr, "/routes", &[origin, ("authorization", "Bearer x")]).await;
    assert_eq!(status, 401);
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "invalid_token");
    let bearer = format!("Bearer {}", token(json!({"sub": "alice"})));
    let (status, headers, _) = get(addr, "/routes", &[origin, ("authorization", &bearer)]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");

    // Another origin gets neither the preflight nor a readable answer.
    let evil = ("origin", "http://evil.example");
    let (status, headers, _) = get(addr, "/routes", &[evil, ("authorization", &bearer)]).await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));
    let preflight = http()
        .request(reqwest::Method::OPTIONS, format!("http://{addr}/routes"))
        .header(evil.0, evil.1)
        .send()
        .await
        .expect("request");
    assert_eq!(preflight.status().as_u16(), 403);
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_and_publish_authenticate_and_authorise_like_websockets() {
    let gw = start(&jwt_config()).await;
    let addr = gw.local_addr();
    let alice = format!(
        "Bearer {}",
        token(json!({"sub": "alice", "devices": ["d1"]}))
    );
    let auth = [("authorization", alice.as_str())];

    assert_refused(
        refusal(Sse::open(addr, "channel=users/alice/%23", &[]).await),
        401,
        "invalid_token",
    );
    assert_refused(
        post(addr, r#"{"channel":"users/alice/a","payload":1}"#, &[]).await,
        401,
        "invalid_token",
    );
    assert_refused(
        refusal(Sse::open(addr, "channel=users/bob/%23", &auth).await),
        403,
        "forbidden",
    );
    assert_refused(
        refusal(Sse::open(addr, "channel=devices/%2B/%23", &auth).await),
        403,
        "forbidden",
    );
    assert_refused(
        post(addr, r#"{"channel":"devices/d1/cmd","payload":1}"#, &auth).await,
        403,
        "forbidden",
    );

    // The token from a cookie, as an EventSource on the same site sends it.
    let cookie = format!(
        "wsbridge_token={}",
        token(json!({"sub": "alice", "devices": ["d1"]}))
    );
    let mut sse = Sse::ok(
        addr,
        "channel=users/alice/%23&channel=devices/d1/%23",
        &[("cookie", &cookie)],
    )
    .await;
    let ok = post(
        addr,
        r#"{"channel":"users/alice/note","payload":"hi"}"#,
        &auth,
    )
    .await;
    assert_eq!(ok.0, 200, "{ok:?}");
    let event = sse.next_of("message").await;
    assert_eq!(event.json()["channel"], "users/alice/note");
    assert_eq!(event.json()["payload"], "hi");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_console_is_served_and_the_root_points_to_it() {
    let gw = start(&memory_config("", "")).await;
    let addr = gw.local_addr();
    for path in ["/", "/console"] {
        let (status, headers, _) = get(addr, path, &[]).await;
        assert_eq!(status, 307, "{path}");
        assert_eq!(headers["location"], "/console/", "{path}");
    }

    let root = env!("CARGO_MANIFEST_DIR");
    let (status, headers, body) = get(addr, "/console/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(
        body,
        std::fs::read(format!("{root}/console/index.html")).unwrap()
    );
    let (status, headers, body) = get(addr, "/console/client/index.js", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(
        body,
        std::fs::read(format!("{root}/clients/js/dist/index.js")).unwrap()
    );
    for entry in std::fs::read_dir(format!("{root}/console")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let name = entry.file_name().into_string().unwrap();
        let (status, _, body) = get(addr, &format!("/console/{name}"), &[]).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(
            body,
            std::fs::read(format!("{root}/console/{name}")).unwrap()
        );
    }
    assert_eq!(get(addr, "/console/missing.js", &[]).await.0, 404);
    assert_eq!(get(addr, "/console/client/missing.js", &[]).await.0, 404);
    gw.shutdown().await;

    let gw = start(&memory_config("console = false", "")).await;
    let addr = gw.local_addr();
    for path in ["/", "/console", "/console/", "/console/client/index.js"] {
        assert_eq!(get(addr, path, &[]).await.0, 404, "{path}");
    }
    assert_eq!(get(addr, "/healthz", &[]).await.0, 200);
    gw.shutdown().await;
}

/// A gateway on one MQTT backend: `sensors/{site}/#` is `{prefix}/plant/{site}/#`.
fn mqtt_config(url: &str, prefix: &str, server: &str) -> String {
    format!(
        r##"
[server]
{server}

[backends.plant]
type = "mqtt"
url = "{url}"
reconnect_min_delay = "50ms"
reconnect_max_delay = "200ms"

[[routes]]
channel = "sensors/{{site}}/#"
backend = "plant"
topic = "{prefix}/plant/{{site}}/#"
allow = ["subscribe", "publish"]
qos = 1
"##
    )
}

#[tokio::test]
async fn http_publish_reaches_mosquitto_and_sse_gets_what_mosquitto_publishes() {
    let prefix = unique("wsbh");
    let gw = start(&mqtt_config(
        &format!("mqtt://127.0.0.1:{SHARED_PORT}"),
        &prefix,
        "",
    ))
    .await;
    ready(&gw).await;
    let addr = gw.local_addr();
    let mut sub = MosquittoSub::start(SHARED_PORT, &format!("{prefix}/#")).await;
    let ok = post(
        addr,
        r#"{"channel":"sensors/berlin/pump","payload":{"on":true},"headers":{"origin":"http"}}"#,
        &[],
    )
    .await;
    assert_eq!(ok, (200, json!({"type": "ok"})));
    let got = sub.next().await;
    assert_eq!(got.topic, format!("{prefix}/plant/berlin/pump"));
    assert_eq!(got.payload, br#"{"on":true}"#);
    assert_eq!(got.user_properties, "origin:http");

    let mut sse = Sse::ok(addr, "channel=sensors/%2B/%23", &[]).await;
    mqtt_support::mosquitto_pub(
        SHARED_PORT,
        &[
            "-q",
            "1",
            "-t",
            &format!("{prefix}/plant/hamburg/temp"),
            "-m",
            "{\"celsius\": 21.5}",
        ],
    )
    .await;
    let event = sse.next_of("message").await.json();
    assert_eq!(event["channel"], "sensors/hamburg/temp");
    assert_eq!(event["subscription"], "sensors/+/#");
    assert_eq!(event["payload"], json!({"celsius": 21.5}));
    gw.shutdown().await;
}

#[tokio::test]
async fn http_publish_answers_only_after_the_broker_acknowledged() {
    let broker = PrivateBroker::start("").await;
    let prefix = unique("wsbh");
    let gw = start(&mqtt_config(
        &broker.url(),
        &prefix,
        "request_timeout = \"10s\"",
    ))
    .await;
    ready(&gw).await;
    let addr = gw.local_addr();
    let mut sub = MosquittoSub::start(broker.port, &format!("{prefix}/#")).await;

    broker.freeze(true).await;
    let mut publish = tokio::spawn(async move {
        post(addr, r#"{"channel":"sensors/berlin/a","payload":1}"#, &[]).await
    });
    // While the broker cannot acknowledge, there is no answer.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut publish)
            .await
            .is_err(),
        "the publish was answered before the broker acknowledged it"
    );
    broker.freeze(false).await;
    let answer = tokio::time::timeout(WAIT, publish).await.unwrap().unwrap();
    assert_eq!(answer, (200, json!({"type": "ok"})));
    assert_eq!(sub.next().await.payload, b"1");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_broker_that_does_not_answer_gives_504_and_one_that_is_down_503() {
    let mut broker = PrivateBroker::start("").await;
    let prefix = unique("wsbh");
    let gw = start(&mqtt_config(
        &broker.url(),
        &prefix,
        "request_timeout = \"1s\"",
    ))
    .await;
    ready(&gw).await;
    let addr = gw.local_addr();
    broker.freeze(true).await;
    assert_refused(
        post(addr, r#"{"channel":"sensors/berlin/a","payload":1}"#, &[]).await,
        504,
        "backend_timeout",
    );
    broker.kill().await;
    common::eventually("the backend notices the broker is gone", async || {
        !gw.hub().is_ready()
    })
    .await;
    assert_refused(
        post(addr, r#"{"channel":"sensors/berlin/a","payload":1}"#, &[]).await,
        503,
        "backend_unavailable",
    );
    assert_refused(
        refusal(Sse::open(addr, "channel=sensors/berlin/%23", &[]).await),
        503,
        "backend_unavailable",
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_streams_hear_when_their_broker_goes_and_comes_back() {
    let mut broker = PrivateBroker::start("").await;
    let prefix = unique("wsbh");
    let gw = start(&mqtt_config(&broker.url(), &prefix, "")).await;
    ready(&gw).await;
    let addr = gw.local_addr();
    let mut sse = Sse::ok(addr, "channel=sensors/berlin/%23", &[]).await;

    broker.kill().await;
    let down = sse.next_of("status").await.json();
    assert_eq!(down["code"], "backend_down", "{down}");
    assert_eq!(down["backend"], "plant");
    assert_eq!(down["subscriptions"], json!(["sensors/berlin/#"]));
    broker.run().await;
    let up = sse.next_of("status").await.json();
    assert_eq!(up["code"], "backend_up", "{up}");

    // The stream's subscription is back: a device's message arrives.
    mqtt_support::mosquitto_pub(
        broker.port,
        &[
            "-q",
            "1",
            "-t",
            &format!("{prefix}/plant/berlin/temp"),
            "-m",
            "7",
        ],
    )
    .await;
    let message = sse.next_of("message").await.json();
    assert_eq!(message["channel"], "sensors/berlin/temp");
    assert_eq!(message["payload"], 7);
    gw.shutdown().await;
}

/// The partition and offset of an SSE message event's data.
fn position(event: &Event) -> (i64, i64) {
    let m = event.json();
    (
        m["position"]["partition"].as_i64().expect("a partition"),
        m["position"]["offset"].as_i64().expect("an offset"),
    )
}

#[tokio::test]
async fn sse_on_kafka_resumes_after_last_event_id_without_loss_or_duplicates() {
    let topic = unique("wsb-sse-");
    kafka_support::create_topic(&topic, 3).await;
    let gw = start(&format!(
        r#"
[backends.events]
type = "kafka"
brokers = "{}"

[[routes]]
channel = "events/{{name}}"
backend = "events"
topic = "{{name}}"
allow = ["subscribe", "publish"]
"#,
        kafka_support::brokers()
    ))
    .await;
    let addr = gw.local_addr();
    let channel = format!("events/{topic}");
    let query = format!("channel={}", urlencode(&channel));
    let publish = |seq: u64| {
        let channel = channel.clone();
        async move {
            let body = json!({"channel": channel, "payload": {"seq": seq}, "partition": seq % 3});
            let (status, ok) = post(addr, &body.to_string(), &[]).await;
            assert_eq!(status, 200, "{ok}");
            assert_eq!(ok["position"]["partition"], seq % 3, "{ok}");
            ok["position"]["offset"].as_i64().expect("an offset")
        }
    };

    let mut sse = Sse::ok(addr, &query, &[]).await;
    let mut offsets = BTreeMap::new();
    for seq in 0..6 {
        offsets.insert(seq, publish(seq).await);
    }
    let mut seen = Vec::new();
    let mut last_id = String::new();
    for _ in 0..4 {
        let event = sse.next_of("message").await;
        let seq = event.json()["payload"]["seq"].as_u64().unwrap();
        let (partition, offset) = position(&event);
        assert_eq!((partition as u64, offset), (seq % 3, offsets[&seq]));
        last_id = event.id.clone().expect("Kafka messages carry an id");
        assert!(
            last_id
                .split(',')
                .any(|p| p == format!("{partition}:{offset}")),
            "the id {last_id} names the message's own position"
        );
        seen.push(seq);
    }
    let partitions_seen: std::collections::BTreeSet<u64> = seen.iter().map(|s| s % 3).collect();
    assert_eq!(
        last_id.split(',').count(),
        partitions_seen.len(),
        "the id covers every partition seen: {last_id}"
    );
    // The client goes away after four events (the rest may have been sent, but were not seen)
    // and messages go on meanwhile.
    drop(sse);
    for seq in 6..9 {
        offsets.insert(seq, publish(seq).await);
    }

    // `Last-Event-ID` wins over `from`.
    let mut sse = Sse::ok(
        addr,
        &format!("{query}&from=earliest"),
        &[("last-event-id", &last_id)],
    )
    .await;
    let mut per_partition: BTreeMap<i64, i64> = BTreeMap::new();
    for _ in 4..9 {
        let event = sse.next_of("message").await;
        let seq = event.json()["payload"]["seq"].as_u64().unwrap();
        let (partition, offset) = position(&event);
        assert_eq!(offset, offsets[&seq], "{event:?}");
        if let Some(previous) = per_partition.insert(partition, offset) {
            assert!(previous < offset, "in order within partition {partition}");
        }
        assert!(event.id.is_some());
        seen.push(seq);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..9).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    // Nothing else is pending: the next message is the next publish.
    publish(9).await;
    let event = sse.next_of("message").await;
    assert_eq!(event.json()["payload"]["seq"], 9);
    gw.shutdown().await;
}
