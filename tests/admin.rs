//! The admin API over real sockets: its token, the connection list (WebSocket and SSE clients,
//! their subjects, subscriptions and queues), closing a connection, the upstream channels and
//! `/metrics` on the admin listener. Memory backend only: nothing needs to be installed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, WAIT, eventually, start, unique};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsbridge::Gateway;

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const SECRET: &str = "admin-test-secret-that-is-long-enough-01";

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A memory gateway with the admin listener on; `server` and `auth` lines go into their tables.
fn config(server: &str, auth: &str) -> String {
    format!(
        r##"
[server]
{server}

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[auth]
{auth}

[limits]
publish_per_second = 0
publish_bytes_per_second = 0

[backends.local]
type = "memory"

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
"##
    )
}

fn jwt() -> String {
    format!("mode = \"jwt\"\nsecret = \"{SECRET}\"")
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn admin_addr(gw: &Gateway) -> SocketAddr {
    gw.admin_addr().expect("the admin listener is on")
}

/// An admin request with `token` (none: no Authorization header); the status and JSON body.
async fn admin_with(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = http().request(method, format!("http://{}{path}", admin_addr(gw)));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("the admin API answers in time")
        .expect("admin request");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("JSON from {path} ({e}): {body}"))
    };
    (status, json)
}

async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let (status, body) = admin_with(gw, reqwest::Method::GET, path, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn connections(gw: &Gateway) -> Vec<Value> {
    admin_get(gw, "/admin/connections").await["connections"]
        .as_array()
        .expect("a connections array")
        .clone()
}

/// The listed connection whose subscriptions include `channel`.
async fn connection_on(gw: &Gateway, channel: &str) -> Value {
    let mut found = Value::Null;
    eventually("the connection is listed", async || {
        found = connections(gw)
            .await
            .into_iter()
            .find(|c| {
                c["subscriptions"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|p| p == channel))
            })
            .unwrap_or(Value::Null);
        !found.is_null()
    })
    .await;
    found
}

async fn connect_as(addr: SocketAddr, sub: &str) -> Client {
    let bearer = format!("Bearer {}", token(sub));
    Client::try_connect(addr, |request| {
        request
            .headers_mut()
            .insert("Authorization", HeaderValue::from_str(&bearer).unwrap());
    })
    .await
    .unwrap_or_else(|e| panic!("connects as {sub}: {e:?}"))
}

/// Opens an SSE stream and waits for its first bytes (the response head); returns the response.
async fn open_sse(addr: SocketAddr, query: &str) -> reqwest::Response {
    let response = tokio::time::timeout(
        WAIT,
        http().get(format!("http://{addr}/sse?{query}")).send(),
    )
    .await
    .expect("/sse answers in time")
    .expect("/sse request");
    assert_eq!(response.status().as_u16(), 200);
    response
}

/// Reads an SSE response to its end; returns everything it sent.
async fn read_to_end(mut response: reqwest::Response) -> String {
    let mut text = String::new();
    loop {
        let chunk = tokio::time::timeout(WAIT, response.chunk())
            .await
            .expect("the stream sends or ends in time")
            .expect("the stream reads");
        match chunk {
            Some(chunk) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            None => return text,
        }
    }
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let gw = start(&config("", "")).await;
    for path in ["/admin/connections", "/admin/channels", "/metrics"] {
        for token in [None, Some("wrong-token-0123456789"), Some("")] {
            let (status, body) = admin_with(&gw, reqwest::Method::GET, path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert_eq!(body["code"], "unauthorized", "{body}");
        }
    }
    let (status, _) = admin_with(
        &gw,
        reqwest::Method::DELETE,
        "/admin/connections/1",
        Some("wrong"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        admin_get(&gw, "/admin/connections").await,
        json!({"connections": []})
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_show_websocket_and_sse_clients_with_subject_and_subscriptions() {
    let gw = start(&config("", &jwt())).await;
    let addr = gw.local_addr();
    let ws_channel = format!("room/{}/chat", unique("a"));
    let mut alice = connect_as(addr, "alice").await;
    alice.subscribe(&ws_channel).await;
    alice.subscribe("room/+/presence").await;

    let sse_channel = format!("room/{}/news", unique("b"));
    let _sse = open_sse(
        addr,
        &format!(
            "channel={}&access_token={}",
            urlencode(&sse_channel),
            token("bob")
        ),
    )
    .await;

    let ws = connection_on(&gw, &ws_channel).await;
    assert_eq!(ws["subject"], "alice");
    assert_eq!(ws["edge"], "ws");
    assert_eq!(ws["protocol"], "wsbridge.v1.json");
    let mut expected = vec![ws_channel.clone(), "room/+/presence".to_owned()];
    expected.sort();
    assert_eq!(ws["subscriptions"], json!(expected));
    assert_eq!(ws["queued_messages"], 0);
    assert_eq!(ws["dropped_messages"], 0);
    let remote: SocketAddr = ws["remote_address"].as_str().unwrap().parse().unwrap();
    let tokio_tungstenite::MaybeTlsStream::Plain(socket) = alice.ws.get_ref() else {
        panic!("a plain connection");
    };
    assert_eq!(
        remote,
        socket.local_addr().unwrap(),
        "the client's own address"
    );
    let since = humantime::parse_rfc3339(ws["connected_since"].as_str().unwrap())
        .expect("connected_since is RFC 3339");
    let age = SystemTime::now().duration_since(since).unwrap_or_default();
    assert!(age < Duration::from_secs(60), "connected just now: {ws}");

    let sse = connection_on(&gw, &sse_channel).await;
    assert_eq!(sse["subject"], "bob");
    assert_eq!(sse["edge"], "sse");
    assert_eq!(sse["protocol"], "sse");
    assert_eq!(sse["subscriptions"], json!([sse_channel]));

    let one = admin_get(&gw, &format!("/admin/connections/{}", ws["id"])).await;
    assert_eq!(one, ws);
    for unknown in ["/admin/connections/999999", "/admin/connections/nope"] {
        let (status, body) =
            admin_with(&gw, reqwest::Method::GET, unknown, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 404, "{unknown}: {body}");
        assert_eq!(body["code"], "not_found");
    }

    // An anonymous client has a null subject; a client that leaves is no longer listed.
    let anonymous_gw = start(&config("", "")).await;
    let mut anonymous = Client::connect(anonymous_gw.local_addr()).await;
    let channel = format!("room/{}/x", unique("c"));
    anonymous.subscribe(&channel).await;
    let listed = connection_on(&anonymous_gw, &channel).await;
    assert_eq!(listed["subject"], Value::Null);
    drop(anonymous);
    eventually("a closed connection leaves the list", async || {
        connections(&anonymous_gw).await.is_empty()
    })
    .await;
    anonymous_gw.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_shows_queued_and_dropped_messages() {
    let gw = start(&config("queue_capacity = 16", "")).await;
    let addr = gw.local_addr();
    let channel = format!("flood/{}", unique("s"));
    let mut slow = Client::connect(addr).await;
    slow.subscribe(&channel).await;
    // 1000 messages of 64 KiB while the subscriber does not read: more than the socket buffers
    // and its queue of 16 hold.
    let mut publisher = Client::connect(addr).await;
    common::flood(&mut publisher, &channel, 1000, 64 * 1024).await;
    let listed = connection_on(&gw, &channel).await;
    assert!(
        listed["dropped_messages"].as_u64().unwrap() > 0,
        "messages were dropped for the slow reader: {listed}"
    );
    let queued = listed["queued_messages"].as_u64().unwrap();
    assert!(
        (1..=16).contains(&queued),
        "its queue is full, up to queue_capacity: {listed}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn delete_closes_a_websocket_with_4002_and_ends_an_sse_stream_with_a_status() {
    let gw = start(&config("", "")).await;
    let addr = gw.local_addr();
    let ws_channel = format!("room/{}/a", unique("d"));
    let mut client = Client::connect(addr).await;
    client.subscribe(&ws_channel).await;
    let id = connection_on(&gw, &ws_channel).await["id"].clone();
    let (status, body) = admin_with(
        &gw,
        reqwest::Method::DELETE,
        &format!("/admin/connections/{id}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"], id);
    assert_eq!(
        client.expect_close().await,
        (4002, "closed by administrator".to_owned())
    );

    let sse_channel = format!("room/{}/b", unique("d"));
    let stream = open_sse(addr, &format!("channel={}", urlencode(&sse_channel))).await;
    let id = connection_on(&gw, &sse_channel).await["id"].clone();
    let (status, _) = admin_with(
        &gw,
        reqwest::Method::DELETE,
        &format!("/admin/connections/{id}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let text = read_to_end(stream).await;
    assert!(
        text.contains(
            "event: status\ndata: {\"type\":\"status\",\"code\":\"closed_by_administrator\""
        ),
        "the stream ends with a status event: {text:?}"
    );
    assert!(
        text.ends_with(": stream closed: closed by administrator\n\n"),
        "{text:?}"
    );

    eventually("closed connections leave the list", async || {
        connections(&gw).await.is_empty()
    })
    .await;
    let (status, body) = admin_with(
        &gw,
        reqwest::Method::DELETE,
        &format!("/admin/connections/{id}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_found");
    gw.shutdown().await;
}

#[tokio::test]
async fn channels_show_each_upstream_with_subscribers_and_message_counts() {
    let gw = start(&config("", "")).await;
    let addr = gw.local_addr();
    let channel = format!("plant/{}/temp", unique("c"));
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.subscribe(&channel).await;
    b.subscribe(&channel).await;
    let mut publisher = Client::connect(addr).await;
    for n in 0..3 {
        let reply = publisher.publish(&channel, json!({"n": n})).await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    for client in [&mut a, &mut b] {
        for _ in 0..3 {
            client.next_message().await;
        }
    }
    let channels = admin_get(&gw, "/admin/channels").await;
    let upstream = channels["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["topic"] == channel.as_str())
        .unwrap_or_else(|| panic!("the upstream of {channel} is listed: {channels}"))
        .clone();
    assert_eq!(upstream["backend"], "local");
    assert_eq!(upstream["channel"], "#");
    assert_eq!(upstream["subscribers"], 2);
    assert_eq!(upstream["messages_in"], 3, "{upstream}");
    assert_eq!(
        upstream["messages_out"], 6,
        "3 messages to 2 subscribers: {upstream}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_are_on_the_admin_listener_and_can_be_turned_off_on_the_public_port() {
    let gw = start(&config("public_metrics = false", "")).await;
    let (status, _) = common::http_get(gw.local_addr(), "/metrics").await;
    assert_eq!(status, 404, "public_metrics = false");
    let response = http()
        .get(format!("http://{}/metrics", admin_addr(&gw)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("wsbridge_connections "), "{text}");
    gw.shutdown().await;

    let gw = start(&config("", "")).await;
    let (status, body) = common::http_get(gw.local_addr(), "/metrics").await;
    assert_eq!(status, 200, "public by default");
    assert!(body.contains("wsbridge_connections "), "{body}");
    gw.shutdown().await;
}

/// A scrape of the admin listener's `/metrics`: each series (`name{labels}`) and its value.
async fn scrape(gw: &Gateway) -> std::collections::BTreeMap<String, f64> {
    let response = http()
        .get(format!("http://{}/metrics", admin_addr(gw)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

fn value(scrape: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *scrape
        .get(series)
        .unwrap_or_else(|| panic!("{series} in the scrape: {scrape:#?}"))
}

#[tokio::test]
async fn a_scrape_shows_every_metric_with_plausible_values_after_traffic() {
    let gw = start(&config(
        "allowed_origins = [\"https://app.example\"]",
        &jwt(),
    ))
    .await;
    let addr = gw.local_addr();
    let before = scrape(&gw).await;
    let refused = |s: &std::collections::BTreeMap<String, f64>, reason: &str| {
        s.get(&format!(
            "wsbridge_upgrades_refused_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let auth_failed = |s: &std::collections::BTreeMap<String, f64>, reason: &str| {
        s.get(&format!(
            "wsbridge_auth_failures_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };

    // Refusals: another origin, a malformed token, an unknown subprotocol.
    let good = format!("Bearer {}", token("carol"));
    let refusal = Client::try_connect(addr, |r| {
        r.headers_mut()
            .insert("Origin", HeaderValue::from_static("https://evil.example"));
        r.headers_mut()
            .insert("Authorization", HeaderValue::from_str(&good).unwrap());
    })
    .await
    .err();
    assert_eq!(refusal.map(|r| r.0), Some(403));
    let refusal = Client::try_connect(addr, |r| {
        r.headers_mut().insert(
            "Authorization",
            HeaderValue::from_static("Bearer not-a-jwt"),
        );
    })
    .await
    .err();
    assert_eq!(refusal.map(|r| r.0), Some(401));
    let refusal = Client::try_connect(addr, |r| {
        r.headers_mut()
            .insert("Authorization", HeaderValue::from_str(&good).unwrap());
        r.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    })
    .await
    .err();
    assert_eq!(refusal.map(|r| r.0), Some(400));

    // Traffic: 20 messages to 2 subscribers.
    let channel = format!("metrics/{}", unique("m"));
    let mut a = connect_as(addr, "a").await;
    let mut b = connect_as(addr, "b").await;
    a.subscribe(&channel).await;
    b.subscribe(&channel).await;
    let mut publisher = connect_as(addr, "p").await;
    let total = 20;
    for n in 0..total {
        let reply = publisher.publish(&channel, json!({"n": n})).await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    for client in [&mut a, &mut b] {
        for _ in 0..total {
            client.next_message().await;
        }
    }

    let after = scrape(&gw).await;
    println!("scrape after traffic:");
    for (series, v) in &after {
        if series.starts_with("wsbridge_") || series.starts_with("process_") {
            println!("  {series} {v}");
        }
    }
    assert_eq!(refused(&after, "origin") - refused(&before, "origin"), 1.0);
    assert_eq!(refused(&after, "auth") - refused(&before, "auth"), 1.0);
    assert_eq!(
        refused(&after, "subprotocol") - refused(&before, "subprotocol"),
        1.0
    );
    assert_eq!(
        auth_failed(&after, "malformed") - auth_failed(&before, "malformed"),
        1.0
    );
    let delivered = 2.0 * total as f64;
    let frames = value(&after, "wsbridge_frames_out_total");
    assert!(
        frames >= delivered,
        "frames out ({frames}) count at least the {delivered} messages delivered"
    );
    assert!(value(&after, "wsbridge_bytes_out_total") > frames);
    let batches = value(&after, "wsbridge_delivery_latency_seconds_count");
    assert!(
        batches > 0.0 && batches <= delivered,
        "one latency observation per batch: {batches}"
    );
    let seconds = value(&after, "wsbridge_delivery_latency_seconds_sum");
    assert!(
        seconds > 0.0 && seconds / batches < 1.0,
        "latency is short on loopback: {seconds} s over {batches} batches"
    );
    assert_eq!(
        value(
            &after,
            "wsbridge_publishes_total{backend=\"local\",result=\"ok\"}"
        ),
        total as f64
    );
    assert_eq!(value(&after, "wsbridge_queued_messages"), 0.0);
    assert_eq!(
        value(
            &after,
            "wsbridge_backend_reconnects_total{backend=\"local\"}"
        ),
        0.0
    );
    assert!(value(&after, "process_resident_memory_bytes") > 1e6);
    assert!(value(&after, "process_open_fds") > 3.0);
    assert!(value(&after, "process_cpu_seconds_total") >= 0.0);
    gw.shutdown().await;
}

#[test]
fn the_admin_token_comes_from_the_environment_and_is_never_shown() {
    let text = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"${ADMIN_TOKEN}\"\n\
        [backends.local]\ntype = \"memory\"\n\
        [[routes]]\nchannel = \"#\"\nbackend = \"local\"\ntopic = \"#\"\nallow = [\"subscribe\"]\n";
    let secret = "from-the-environment-0123456789";
    let config = wsbridge::Config::from_toml_with_env(text, &|name| {
        (name == "ADMIN_TOKEN").then(|| secret.to_owned())
    })
    .expect("valid");
    assert_eq!(
        config.admin.token.as_ref().map(|t| t.expose()),
        Some(secret)
    );
    assert!(!format!("{config:?}").contains(secret), "redacted in Debug");

    let missing = wsbridge::Config::from_toml_with_env(
        &text.replace("token = \"${ADMIN_TOKEN}\"\n", ""),
        &|_| None,
    )
    .unwrap_err();
    let problems: Vec<String> = missing.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("admin.token: missing")),
        "{problems:?}"
    );
    let unknown = wsbridge::Config::from_toml_with_env(
        &text.replace("[admin]\n", "[admin]\nport = 1\n"),
        &|_| Some(secret.to_owned()),
    )
    .unwrap_err();
    let problems: Vec<String> = unknown.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems.iter().any(|p| p == "admin.port: unknown key"),
        "{problems:?}"
    );
}

#[tokio::test]
async fn a_connection_over_the_limits_counts_as_a_refused_upgrade() {
    let gw = start(&config("", "").replace("[limits]\n", "[limits]\nmax_connections_per_ip = 1\n"))
        .await;
    let addr = gw.local_addr();
    let refused = async |gw: &Gateway| {
        scrape(gw)
            .await
            .get("wsbridge_upgrades_refused_total{reason=\"limits\"}")
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(refused(&gw).await, 0.0);
    let _first = Client::connect(addr).await;
    let second = Client::try_connect(addr, |_| {}).await;
    assert!(
        second.is_err(),
        "the second connection from 127.0.0.1 is refused"
    );
    assert_eq!(refused(&gw).await, 1.0);
    gw.shutdown().await;
}
