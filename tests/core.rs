//! The gateway core over real sockets, on the memory backend.

mod common;

use common::{Client, binary, http_get, start, start_default, unique};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const TEMPLATED: &str = r##"
[backends.local]
type = "memory"

[[routes]]
channel = "site/{site}/#"
backend = "local"
topic = "plant/{site}/data/#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "readonly/#"
backend = "local"
topic = "ro/#"
allow = ["subscribe"]

[[routes]]
channel = "raw/#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
"##;

#[tokio::test]
async fn subscribe_publish_unsubscribe() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let mut sub = Client::connect(addr).await;
    let mut publisher = Client::connect(addr).await;
    let ch = unique("room/");

    sub.subscribe(&format!("{ch}/+")).await;
    let ok = publisher
        .publish(&format!("{ch}/a"), json!({"temp": 21.5}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");

    let m = sub.next_message().await;
    assert_eq!(m["channel"], format!("{ch}/a"));
    assert_eq!(m["subscription"], format!("{ch}/+"));
    assert_eq!(m["payload"], json!({"temp": 21.5}));
    assert!(m["timestamp"].is_i64());

    let reply = sub
        .request(json!({"type": "unsubscribe", "channel": format!("{ch}/+")}))
        .await;
    assert_eq!(reply["type"], "ok");
    publisher.publish(&format!("{ch}/a"), json!(1)).await;
    sub.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn single_and_multi_level_wildcards() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let mut plus = Client::connect(addr).await;
    let mut hash = Client::connect(addr).await;
    let mut publisher = Client::connect(addr).await;
    let ch = unique("w");

    plus.subscribe(&format!("{ch}/+/temp")).await;
    hash.subscribe(&format!("{ch}/#")).await;

    for channel in [
        ch.to_string(),
        format!("{ch}/a/temp"),
        format!("{ch}/a/b/temp"),
        format!("{ch}/b/humidity"),
    ] {
        publisher.publish(&channel, json!(channel)).await;
    }
    // `#` matches the parent level and every depth; `+` exactly one level.
    for expected in [
        ch.to_string(),
        format!("{ch}/a/temp"),
        format!("{ch}/a/b/temp"),
        format!("{ch}/b/humidity"),
    ] {
        assert_eq!(hash.next_message().await["channel"], expected);
    }
    assert_eq!(plus.next_message().await["channel"], format!("{ch}/a/temp"));
    plus.assert_no_message().await;
    hash.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn templated_routes_map_both_ways() {
    let gw = start(TEMPLATED).await;
    let addr = gw.local_addr();
    let mut sub = Client::connect(addr).await;
    let mut raw = Client::connect(addr).await;
    let mut publisher = Client::connect(addr).await;
    let site = unique("s");

    sub.subscribe(&format!("site/{site}/#")).await;
    raw.subscribe(&format!("raw/plant/{site}/#")).await;

    // Client channel -> backend topic.
    publisher
        .publish(&format!("site/{site}/line1/temp"), json!(7))
        .await;
    let seen_raw = raw.next_message().await;
    assert_eq!(
        seen_raw["channel"],
        format!("raw/plant/{site}/data/line1/temp")
    );

    // Backend topic -> client channel.
    publisher
        .publish(&format!("raw/plant/{site}/data/line2"), json!("x"))
        .await;
    let m1 = sub.next_message().await;
    assert_eq!(m1["channel"], format!("site/{site}/line1/temp"));
    assert_eq!(m1["subscription"], format!("site/{site}/#"));
    let m2 = sub.next_message().await;
    assert_eq!(m2["channel"], format!("site/{site}/line2"));
    assert_eq!(m2["payload"], "x");

    // A topic outside the template is not delivered to the templated subscription.
    publisher
        .publish(&format!("raw/plant/{site}/other"), json!(0))
        .await;
    sub.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn payload_rules_keep_every_kind_of_bytes() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let mut sub = Client::connect(addr).await;
    let mut publisher = Client::connect(addr).await;
    let ch = unique("p");
    sub.subscribe(&format!("{ch}/#")).await;

    publisher
        .publish(&format!("{ch}/json"), json!({"a": [1, 2]}))
        .await;
    publisher
        .publish(&format!("{ch}/text"), json!("not json"))
        .await;
    publisher
        .request(json!({"type": "publish", "channel": format!("{ch}/bin"), "payload": "AP8B", "encoding": "base64"}))
        .await;
    publisher.publish(&format!("{ch}/number"), json!(42)).await;

    let m = sub.next_message().await;
    assert_eq!(m["payload"], json!({"a": [1, 2]}));
    let m = sub.next_message().await;
    assert_eq!(m["payload"], "not json");
    assert!(m.get("encoding").is_none());
    let m = sub.next_message().await;
    assert_eq!(m["payload"], "AP8B");
    assert_eq!(m["encoding"], "base64");
    let m = sub.next_message().await;
    assert_eq!(m["payload"], 42);
    gw.shutdown().await;
}

#[tokio::test]
async fn fan_out_to_100_sockets_in_order_through_one_upstream() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let ch = unique("fan");
    let mut subs = Vec::new();
    for _ in 0..100 {
        let mut c = Client::connect(addr).await;
        c.subscribe(&ch).await;
        subs.push(c);
    }
    assert_eq!(gw.hub().upstream_counts(), vec![("local".to_string(), 1)]);
    assert_eq!(gw.hub().sessions_per_upstream(), vec![100]);

    let mut publisher = Client::connect(addr).await;
    for seq in 0..200 {
        publisher
            .send(json!({"type": "publish", "id": seq, "channel": ch, "payload": {"seq": seq}}))
            .await;
    }
    for seq in 0..200 {
        assert_eq!(publisher.reply_to(json!(seq)).await["type"], "ok");
    }
    for sub in &mut subs {
        for seq in 0..200 {
            assert_eq!(sub.next_message().await["payload"]["seq"], seq);
        }
    }
    drop(subs);
    common::eventually(
        "the upstream is released with its last socket",
        async || gw.hub().upstream_counts() == vec![("local".to_string(), 0)],
    )
    .await;
    gw.shutdown().await;
}

fn slow_config(policy: &str) -> String {
    format!(
        r##"
        [server]
        queue_capacity = 64
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
        slow_consumer = "{policy}"
        "##
    )
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stop_a_healthy_one() {
    let gw = start(&slow_config("drop_oldest")).await;
    let addr = gw.local_addr();
    let ch = unique("slow");
    let mut stalled = Client::connect(addr).await;
    stalled.subscribe(&ch).await;
    let mut healthy = Client::connect(addr).await;
    healthy.subscribe(&ch).await;

    // 4000 messages of 16 KiB (64 MB) are far more than socket buffers and the queue hold.
    let total = 4000;
    let mut publisher = Client::connect(addr).await;
    let reader = common::read_in_order(healthy, total);
    common::flood(&mut publisher, &ch, total, 16 * 1024).await;
    reader.await.expect("healthy reader finished");

    // Memory stays bounded: the stalled client holds at most its queue capacity.
    let metrics = http_get(addr, "/metrics").await.1;
    let dropped: u64 = metric(&metrics, "wsbridge_dropped_total{backend=\"local\"}");
    assert!(dropped > 0, "messages were dropped for the stalled client");
    assert!(
        dropped < total,
        "dropped only the stalled client's messages"
    );

    // Once it reads, it learns how many it lost, then gets the newest messages.
    let status = stalled.next_of("status").await;
    assert_eq!(status["code"], "messages_dropped");
    assert!(status["count"].as_u64().unwrap() > 0);
    gw.shutdown().await;
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {series} missing in:\n{text}"))
}

#[tokio::test]
async fn disconnect_policy_closes_a_slow_consumer_with_1008() {
    let gw = start(&slow_config("disconnect")).await;
    let addr = gw.local_addr();
    let ch = unique("slowd");
    let mut stalled = Client::connect(addr).await;
    stalled.subscribe(&ch).await;
    let mut publisher = Client::connect(addr).await;
    let big = "y".repeat(16 * 1024);
    for seq in 0..2000 {
        publisher
            .send(json!({"type": "publish", "id": seq, "channel": ch, "payload": big}))
            .await;
        if seq % 64 == 63 {
            publisher.reply_to(json!(seq)).await;
        }
    }
    let (code, reason) = stalled.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("slow consumer"), "{reason}");
    // The publisher is unaffected.
    assert_eq!(publisher.publish(&ch, json!(1)).await["type"], "ok");
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_documented_errors_and_the_connection_stays_usable() {
    let mut config = TEMPLATED.to_string();
    config.push_str("[server]\nmax_subscriptions = 3\n");
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let mut bystander = Client::connect(addr).await;
    let site = unique("b");
    bystander.subscribe(&format!("site/{site}/#")).await;
    let mut c = Client::connect(addr).await;

    // Frames that cannot be parsed: no id in the error.
    for (raw, code) in [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ("\"just a string\"", "invalid_frame"),
        (r#"{"type": "ping", "id": {"nested": 1}}"#, "invalid_frame"),
    ] {
        c.send_raw(Message::Text(raw.into())).await;
        let e = c.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{raw}: {e}"
        );
        assert!(e.get("id").is_none(), "{raw}: {e}");
    }

    let cases = [
        (json!({"type": "dance"}), "unknown_type"),
        (json!({"type": "subscribe"}), "invalid_frame"),
        (json!({"type": "subscribe", "channel": 7}), "invalid_frame"),
        (
            json!({"type": "publish", "channel": "raw/x"}),
            "invalid_frame",
        ),
        (
            json!({"type": "publish", "channel": "raw/x", "payload": 1, "headers": ["h"]}),
            "invalid_frame",
        ),
        (
            json!({"type": "subscribe", "channel": "raw//x"}),
            "invalid_channel",
        ),
        (
            json!({"type": "subscribe", "channel": ""}),
            "invalid_channel",
        ),
        (
            json!({"type": "subscribe", "channel": "raw/#/x"}),
            "invalid_channel",
        ),
        (
            json!({"type": "subscribe", "channel": "raw/a+"}),
            "invalid_channel",
        ),
        (
            json!({"type": "publish", "channel": "raw/+", "payload": 1}),
            "invalid_channel",
        ),
        (
            json!({"type": "publish", "channel": "raw/#", "payload": 1}),
            "invalid_channel",
        ),
        (
            json!({"type": "publish", "channel": "readonly/x", "payload": 1}),
            "forbidden",
        ),
        (
            json!({"type": "subscribe", "channel": "elsewhere/x"}),
            "no_route",
        ),
        (
            json!({"type": "publish", "channel": "elsewhere", "payload": 1}),
            "no_route",
        ),
        (
            json!({"type": "unsubscribe", "channel": "raw/never"}),
            "not_subscribed",
        ),
        (
            json!({"type": "subscribe", "channel": "raw/x", "from": "earliest"}),
            "unsupported",
        ),
    ];
    for (frame, code) in cases {
        let e = c.request(frame.clone()).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{frame}: {e}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    c.subscribe("raw/one").await;
    let dup = c
        .request(json!({"type": "subscribe", "channel": "raw/one"}))
        .await;
    assert_eq!(dup["code"], "already_subscribed");
    c.subscribe("raw/two").await;
    c.subscribe("raw/three").await;
    let over = c
        .request(json!({"type": "subscribe", "channel": "raw/four"}))
        .await;
    assert_eq!(over["code"], "too_many_subscriptions");

    // A binary frame on the JSON protocol gets an error frame, and the socket stays open.
    c.send_raw(binary(b"\x01\x02")).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "unsupported_frame");

    // Still usable, and the other client never noticed.
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    let ok = c
        .publish(&format!("site/{site}/after"), json!("fine"))
        .await;
    assert_eq!(ok["type"], "ok");
    assert_eq!(bystander.next_message().await["payload"], "fine");
    gw.shutdown().await;
}

#[tokio::test]
async fn oversize_message_closes_with_1009() {
    let gw = start("[server]\nmax_message_size = 1024\n[backends.local]\ntype = \"memory\"\n[[routes]]\nchannel = \"#\"\nbackend = \"local\"\ntopic = \"#\"\nallow = [\"publish\"]\n").await;
    let mut c = Client::connect(gw.local_addr()).await;
    let mut other = Client::connect(gw.local_addr()).await;
    let big = json!({"type": "publish", "id": 1, "channel": "a", "payload": "z".repeat(4096)});
    c.send(big).await;
    let (code, reason) = c.expect_close().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("1024"), "{reason}");
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
    gw.shutdown().await;
}

#[tokio::test]
async fn subprotocol_negotiation() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    // No subprotocol offered: JSON.
    let mut plain = Client::connect_with(addr, &[]).await;
    assert_eq!(plain.request(json!({"type": "ping"})).await["type"], "pong");
    // Only unknown subprotocols: refused before the upgrade.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            common::ws_url(addr),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    gw.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness_endpoints() {
    let gw = start_default().await;
    let (status, body) = http_get(gw.local_addr(), "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(gw.local_addr(), "/readyz").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["backends"]["local"], "up");
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_clients_are_closed_and_slow_handshakes_are_cut() {
    let gw = start(
        "[server]\nping_interval = \"100ms\"\nidle_timeout = \"400ms\"\nhandshake_timeout = \"300ms\"\n[backends.local]\ntype = \"memory\"\n[[routes]]\nchannel = \"#\"\nbackend = \"local\"\ntopic = \"#\"\nallow = [\"subscribe\"]\n",
    )
    .await;
    let addr = gw.local_addr();

    // A client that answers nothing (no pongs, because it does not read) is closed as idle.
    let mut idle = Client::connect(addr).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (code, reason) = idle.expect_close().await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));

    // A client that reads (and so answers pings) stays.
    let mut alive = Client::connect(addr).await;
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(alive.request(json!({"type": "ping"})).await["type"], "pong");
    }

    // Request headers that never finish are cut by the handshake timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(common::WAIT, slow.read(&mut buf))
        .await
        .expect("the server gives up on the handshake");
    assert!(
        matches!(read, Ok(n) if n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408")),
        "{read:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_1001_to_every_client() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.subscribe("x").await;
    let shutdown = tokio::spawn(gw.shutdown());
    let status = a.next_of("status").await;
    assert_eq!(status["code"], "shutting_down");
    assert_eq!(a.expect_close().await.0, 1001);
    assert_eq!(b.expect_close().await.0, 1001);
    a.ws.close(None).await.ok();
    b.ws.close(None).await.ok();
    tokio::time::timeout(common::WAIT, shutdown)
        .await
        .expect("shutdown completes once clients are gone")
        .unwrap();
}

/// With `drain_window`, each client is told when it will be closed and is closed at that point
/// of the window, not before: the closes are spread, not all at once.
#[tokio::test]
async fn shutdown_spreads_the_closes_over_the_drain_window() {
    let config = wsbridge::DEFAULT_CONFIG.replace("drain_window = \"0s\"", "drain_window = \"2s\"");
    assert!(config.contains("drain_window = \"2s\""));
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = Client::connect(addr).await;
        ws.subscribe("x").await;
        clients.push(ws);
    }
    let asked = std::time::Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    let mut hints = Vec::new();
    for ws in &mut clients {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "shutting_down", "{status}");
        let hint = status["reconnect_after_ms"]
            .as_u64()
            .expect("a reconnect hint");
        assert!(hint < 2000, "within the window: {status}");
        hints.push(hint);
    }
    let mut distinct = hints.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 1, "the closes are spread: {hints:?}");
    for (ws, hint) in clients.iter_mut().zip(&hints) {
        assert_eq!(ws.expect_close().await.0, 1001);
        // Never before the announced time (counted from before the shutdown began).
        assert!(
            asked.elapsed() >= std::time::Duration::from_millis(*hint),
            "closed before its announced {hint} ms"
        );
        ws.ws.close(None).await.ok();
    }
    tokio::time::timeout(common::WAIT, shutdown)
        .await
        .expect("shutdown completes once clients are gone")
        .unwrap();
}

/// The first reproduction: bytes that look like a JSON string but are not UTF-8, published by a
/// client on the embedded default, reach the subscriber base64-encoded and stop nothing.
#[tokio::test]
async fn a_json_shaped_payload_that_is_not_utf8_is_delivered_base64() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let mut sub = Client::connect(addr).await;
    let mut publisher = Client::connect(addr).await;
    let ch = unique("x/");
    sub.subscribe(&ch).await;

    let reply = publisher
        .request(json!({"type": "publish", "channel": ch, "payload": "Iv8i", "encoding": "base64"}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let m = sub.next_message().await;
    assert_eq!(m["payload"], "Iv8i", "{m}");
    assert_eq!(m["encoding"], "base64", "{m}");

    // Both connections still work, both ways.
    let reply = publisher.publish(&ch, json!({"after": 1})).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(sub.next_message().await["payload"], json!({"after": 1}));
    sub.subscribe(&format!("{ch}/back")).await;
    let reply = sub.publish(&format!("{ch}/back"), json!(2)).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(sub.next_message().await["payload"], json!(2));
    let (_, metrics) = http_get(addr, "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// The broker-side input matrix on the memory backend: one publish reaches a `json`, a `text`
/// and a `binary` route on the same topic.
#[tokio::test]
async fn every_bad_payload_has_its_documented_outcome_on_the_memory_backend() {
    use common::input::{Format, cases, expect_case, good};
    let mut config = String::from("[backends.local]\ntype = \"memory\"\n");
    for format in Format::ALL {
        let name = format.name();
        config.push_str(&format!(
            "[[routes]]\nchannel = \"{name}/#\"\nbackend = \"local\"\ntopic = \"in/#\"\nformat = \"{name}\"\nallow = [\"subscribe\", \"publish\"]\n"
        ));
    }
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let topic = unique("m");
    let mut subscribers = Vec::new();
    for format in Format::ALL {
        let mut client = Client::connect(addr).await;
        client
            .subscribe(&format!("{}/{topic}", format.name()))
            .await;
        subscribers.push((format, client));
    }
    let mut publisher = Client::connect(addr).await;
    let send = async |publisher: &mut Client, bytes: &[u8]| {
        use base64::Engine;
        let payload = base64::engine::general_purpose::STANDARD.encode(bytes);
        let reply = publisher
            .request(json!({"type": "publish", "channel": format!("binary/{topic}"), "payload": payload, "encoding": "base64"}))
            .await;
        assert_eq!(reply["type"], "ok", "{reply}");
    };
    for (n, case) in cases().iter().enumerate() {
        send(&mut publisher, &case.bytes).await;
        send(&mut publisher, &good(n)).await;
        for (format, client) in &mut subscribers {
            expect_case(client, *format, case, n).await;
        }
    }
    let (_, metrics) = http_get(addr, "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// A subscriber whose socket stops taking data is dropped within `server.write_timeout`, even
/// under `drop_oldest` with room in its queue, and the others keep receiving.
#[tokio::test]
async fn a_socket_that_takes_no_data_is_dropped_after_the_write_timeout() {
    let config = r##"
[server]
write_timeout = "1s"
queue_capacity = 100000
queue_bytes = 1073741824
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
slow_consumer = "drop_oldest"
"##;
    let gw = start(config).await;
    let addr = gw.local_addr();
    let ch = unique("stall/");
    let mut stalled = Client::connect(addr).await;
    stalled.subscribe(&ch).await;
    let mut healthy = Client::connect(addr).await;
    healthy.subscribe(&ch).await;
    let reader = common::read_in_order(healthy, 600);
    let mut publisher = Client::connect(addr).await;
    // 600 messages of 64 KiB: far more than the socket buffers of the client that never reads.
    common::flood(&mut publisher, &ch, 600, 64 * 1024).await;
    let healthy = reader.await.expect("the healthy subscriber got everything");
    common::eventually("the stalled connection is dropped", async || {
        let (_, metrics) = http_get(addr, "/metrics").await;
        metrics.contains("wsbridge_write_timeouts_total 1\n")
    })
    .await;
    let (_, metrics) = http_get(addr, "/metrics").await;
    // The healthy subscriber and the publisher remain.
    assert!(metrics.contains("wsbridge_connections 2\n"), "{metrics}");
    drop((stalled, healthy));
    gw.shutdown().await;
}

/// Subscribes and unsubscribes beyond `limits.subscribe_per_second` are answered `rate_limited`
/// and not carried out.
#[tokio::test]
async fn subscribes_beyond_the_rate_limit_are_refused() {
    let config = r##"
[limits]
subscribe_per_second = 3
[backends.local]
type = "memory"
[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
"##;
    let gw = start(config).await;
    let mut client = Client::connect(gw.local_addr()).await;
    let ch = unique("rl/");
    // Ten at once, without waiting: three fit the burst, a few more may refill meanwhile.
    for n in 0..10 {
        client
            .send(json!({"type": "subscribe", "id": n, "channel": format!("{ch}/{n}")}))
            .await;
    }
    let mut refused = Vec::new();
    for n in 0..10 {
        let reply = client.reply_to(json!(n)).await;
        match reply["type"].as_str() {
            Some("ok") => {}
            _ => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                assert!(
                    reply["message"]
                        .as_str()
                        .unwrap()
                        .contains("subscribe_per_second")
                );
                refused.push(n);
            }
        }
    }
    assert!(refused.len() >= 4, "refused {refused:?}");
    assert!(!refused.contains(&0), "the burst is honoured: {refused:?}");
    // A refused subscription does not exist.
    let last = refused[refused.len() - 1];
    let mut publisher = Client::connect(gw.local_addr()).await;
    publisher.publish(&format!("{ch}/{last}"), json!(1)).await;
    publisher.publish(&format!("{ch}/0"), json!(2)).await;
    assert_eq!(client.next_message().await["payload"], json!(2));
    gw.shutdown().await;
}

/// No message reaches a client before the `ok` of its subscription, even while the channel is
/// busy when it subscribes.
#[tokio::test]
async fn the_ok_of_a_subscribe_comes_before_its_messages_on_the_memory_backend() {
    let gw = start_default().await;
    let addr = gw.local_addr();
    let ch = unique("busy/");
    let mut publisher = Client::connect(addr).await;
    let stream = tokio::spawn({
        let ch = ch.clone();
        async move {
            for n in 0..2000 {
                publisher.publish(&ch, json!(n)).await;
            }
        }
    });
    for _ in 0..20 {
        let mut client = Client::connect(addr).await;
        client
            .send(json!({"type": "subscribe", "id": 1, "channel": ch}))
            .await;
        let first = client.recv().await;
        assert_eq!(first["type"], "ok", "first frame after subscribe: {first}");
    }
    stream.abort();
    gw.shutdown().await;
}
