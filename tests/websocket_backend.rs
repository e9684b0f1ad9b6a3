//! The `websocket` backend against real upstream WebSocket feeds (`common::ws_feed`): one
//! upstream connection per topic shared by every client, publishes written on it, the
//! connection closed with its last subscriber and reopened after the upstream restarts.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::ws_feed::WsFeed;
use common::{Client, eventually, expect_status, hundred_subscribers, start, unique};
use serde_json::json;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// A gateway config with one websocket backend on `feed`; `backend_extra` adds backend keys.
fn config(feed: &WsFeed, backend_extra: &str) -> String {
    format!(
        r#"
[limits]
publish_per_second = 0
publish_bytes_per_second = 0

[backends.ticker]
type = "websocket"
url = "{url}"
connect_timeout = "2s"
reconnect_min_delay = "50ms"
reconnect_max_delay = "200ms"
{backend_extra}

# JSON payloads: prices/BTC <-> the connection of topic BTC.
[[routes]]
channel = "prices/{{symbol}}"
backend = "ticker"
topic = "{{symbol}}"
allow = ["subscribe", "publish"]

# Another view of the same topics: quotes/BTC shares the connection of topic BTC.
[[routes]]
channel = "quotes/{{symbol}}"
backend = "ticker"
topic = "{{symbol}}"
allow = ["subscribe"]

# Raw bytes: raw/BTC <-> the connection of topic raw-BTC.
[[routes]]
channel = "raw/{{symbol}}"
backend = "ticker"
topic = "raw-{{symbol}}"
format = "binary"
allow = ["subscribe", "publish"]
"#,
        url = feed.url("/stream/")
    )
}

fn text(s: &str) -> Message {
    Message::Text(s.into())
}

#[tokio::test]
async fn a_hundred_subscribers_share_one_upstream_connection() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut subscribers =
        hundred_subscribers(gateway.local_addr(), &format!("prices/{symbol}")).await;
    assert_eq!(feed.connections(&path), 1, "one upstream connection");
    assert_eq!(feed.accepted(&path), 1, "opened once");

    assert_eq!(feed.send(&path, text(r#"{"price":1}"#)), 1);
    assert_eq!(
        feed.send(
            &path,
            Message::Binary(Bytes::from_static(br#"{"price":2}"#))
        ),
        1
    );
    for ws in &mut subscribers {
        let first = ws.next_message().await;
        assert_eq!(first["channel"], format!("prices/{symbol}"));
        assert_eq!(first["payload"], json!({"price": 1}));
        let second = ws.next_message().await;
        assert_eq!(second["payload"], json!({"price": 2}));
    }
    assert_eq!(feed.accepted(&path), 1, "still the one connection");
    gateway.shutdown().await;
}

#[tokio::test]
async fn two_topics_are_two_connections_on_their_own_paths() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let (a, b) = (unique("a"), unique("b"));
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{a}")).await;
    ws.subscribe(&format!("prices/{b}")).await;
    let mut other = Client::connect(gateway.local_addr()).await;
    other.subscribe(&format!("prices/{b}")).await;
    assert_eq!(feed.connections(&format!("/stream/{a}")), 1);
    assert_eq!(feed.connections(&format!("/stream/{b}")), 1);

    feed.send(&format!("/stream/{b}"), text(r#""for b""#));
    let m = ws.next_message().await;
    assert_eq!(m["channel"], format!("prices/{b}"));
    assert_eq!(m["payload"], "for b");
    assert_eq!(other.next_message().await["payload"], "for b");
    feed.send(&format!("/stream/{a}"), text(r#""for a""#));
    let m = ws.next_message().await;
    assert_eq!(m["channel"], format!("prices/{a}"));
    other.assert_no_message().await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn two_routes_to_one_topic_share_its_connection() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut prices = Client::connect(gateway.local_addr()).await;
    prices.subscribe(&format!("prices/{symbol}")).await;
    let mut quotes = Client::connect(gateway.local_addr()).await;
    quotes.subscribe(&format!("quotes/{symbol}")).await;
    assert_eq!(feed.accepted(&path), 1, "one connection for both routes");

    feed.send(&path, text("5"));
    let m = prices.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["payload"].as_i64()),
        (Some(&*format!("prices/{symbol}")), Some(5))
    );
    let m = quotes.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["payload"].as_i64()),
        (Some(&*format!("quotes/{symbol}")), Some(5))
    );

    drop(prices);
    feed.send(&path, text("6"));
    assert_eq!(
        quotes.next_message().await["payload"],
        6,
        "still open for the other route"
    );
    drop(quotes);
    eventually(
        "the connection closes with its last subscriber",
        async || feed.connections(&path) == 0,
    )
    .await;
    assert_eq!(feed.accepted(&path), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_topic_with_unusual_characters_is_percent_encoded_in_the_path() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = format!("{} x?y&z", unique("s"));
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;
    let path = format!(
        "/stream/{}",
        symbol
            .replace(' ', "%20")
            .replace('?', "%3F")
            .replace('&', "%26")
    );
    assert_eq!(feed.connections(&path), 1);
    feed.send(&path, text("7"));
    assert_eq!(
        ws.next_message().await["channel"],
        format!("prices/{symbol}")
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_client_publish_arrives_on_the_topics_upstream_socket() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;
    ws.subscribe(&format!("raw/{symbol}")).await;

    let reply = ws
        .publish(&format!("prices/{symbol}"), json!({"subscribe": "depth"}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let reply = ws
        .request(json!({"type": "publish", "channel": format!("raw/{symbol}"), "payload": BASE64.encode([0xff, 0, 1]), "encoding": "base64"}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");

    // `ok` means the frame was flushed to the upstream socket.
    let json_path = format!("/stream/{symbol}");
    eventually("the JSON publish reaches the upstream", async || {
        !feed.received(&json_path).is_empty()
    })
    .await;
    let received = feed.received(&json_path);
    match &received[..] {
        [Message::Text(t)] => assert_eq!(
            serde_json::from_str::<serde_json::Value>(t).unwrap(),
            json!({"subscribe": "depth"})
        ),
        other => panic!("one text message expected, got {other:?}"),
    }
    let raw_path = format!("/stream/raw-{symbol}");
    eventually("the binary publish reaches the upstream", async || {
        !feed.received(&raw_path).is_empty()
    })
    .await;
    assert_eq!(
        feed.received(&raw_path),
        vec![Message::Binary(Bytes::from_static(&[0xff, 0, 1]))],
        "a binary route publishes binary frames"
    );

    // WebSocket messages have no headers.
    let reply = ws
        .request(json!({"type": "publish", "channel": format!("prices/{symbol}"), "payload": 1, "headers": {"x-trace": "1"}}))
        .await;
    assert_eq!(reply["code"], "unsupported", "{reply}");
    assert_eq!(feed.received(&json_path).len(), 1, "nothing more was sent");

    // The upstream's messages are not echoes of the publish: nothing came back.
    ws.assert_no_message().await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_publish_to_a_topic_nobody_subscribes_is_unavailable() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let mut ws = Client::connect(gateway.local_addr()).await;
    let reply = ws.publish(&format!("prices/{symbol}"), json!(1)).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");
    assert_eq!(feed.accepted(&format!("/stream/{symbol}")), 0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_upstream_connection_closes_after_the_last_subscriber_leaves() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let channel = format!("prices/{symbol}");
    let path = format!("/stream/{symbol}");

    // Unsubscribing.
    let mut a = Client::connect(gateway.local_addr()).await;
    let mut b = Client::connect(gateway.local_addr()).await;
    a.subscribe(&channel).await;
    b.subscribe(&channel).await;
    let reply = a
        .request(json!({"type": "unsubscribe", "channel": channel}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    feed.send(&path, text("1"));
    assert_eq!(b.next_message().await["payload"], 1, "b still subscribed");
    assert_eq!(feed.connections(&path), 1);
    let reply = b
        .request(json!({"type": "unsubscribe", "channel": channel}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    eventually("the upstream connection closes", async || {
        feed.connections(&path) == 0
    })
    .await;

    // Disconnecting.
    let mut c = Client::connect(gateway.local_addr()).await;
    c.subscribe(&channel).await;
    assert_eq!(feed.connections(&path), 1);
    assert_eq!(
        feed.accepted(&path),
        2,
        "opened again for the new subscriber"
    );
    drop(c);
    eventually("the upstream connection closes", async || {
        feed.connections(&path) == 0
    })
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn subscribers_get_backend_down_and_up_when_the_upstream_restarts() {
    let mut feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut ws = Client::connect(gateway.local_addr()).await;
        ws.subscribe(&format!("prices/{symbol}")).await;
        subscribers.push(ws);
    }
    feed.send(&path, text("1"));
    for ws in &mut subscribers {
        assert_eq!(ws.next_message().await["payload"], 1);
    }

    feed.kill().await;
    for ws in &mut subscribers {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "backend_down", "{status}");
        assert!(
            status["message"].as_str().unwrap().contains(&symbol),
            "the reason names the topic: {status}"
        );
    }
    let (status, body) = common::http_get(gateway.local_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");

    feed.restart().await;
    expect_status(&mut subscribers, "backend_up").await;
    eventually("the upstream sees the connection again", async || {
        feed.connections(&path) == 1
    })
    .await;
    feed.send(&path, text("2"));
    for ws in &mut subscribers {
        assert_eq!(
            ws.next_message().await["payload"],
            2,
            "messages flow again without the client reconnecting"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_subscription_to_an_unreachable_upstream_fails_and_holds_nothing() {
    let mut feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    feed.kill().await;
    let symbol = unique("s");
    let mut ws = Client::connect(gateway.local_addr()).await;
    let reply = ws
        .request(json!({"type": "subscribe", "channel": format!("prices/{symbol}")}))
        .await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains(&symbol),
        "{reply}"
    );
    // A failed first connection is not an outage of the backend.
    let (status, body) = common::http_get(gateway.local_addr(), "/readyz").await;
    assert_eq!(status, 200, "{body}");

    feed.restart().await;
    ws.subscribe(&format!("prices/{symbol}")).await;
    assert_eq!(feed.connections(&format!("/stream/{symbol}")), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_wildcard_subscription_is_refused() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let mut ws = Client::connect(gateway.local_addr()).await;
    let reply = ws
        .request(json!({"type": "subscribe", "channel": "prices/+"}))
        .await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "unsupported_pattern", "{reply}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_flood_from_the_upstream_reaches_a_healthy_client_while_another_never_reads() {
    let feed = WsFeed::start().await;
    let gateway = start(&format!(
        "[server]\nqueue_capacity = 64\n{}",
        config(&feed, "")
    ))
    .await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut stalled = Client::connect(gateway.local_addr()).await;
    stalled.subscribe(&format!("prices/{symbol}")).await;
    let mut healthy = Client::connect(gateway.local_addr()).await;
    healthy.subscribe(&format!("prices/{symbol}")).await;

    // 4000 messages of 4 KiB (16 MB) are far more than socket buffers and the queue hold.
    let total: u64 = 4000;
    let received = Arc::new(AtomicU64::new(0));
    let progress = received.clone();
    let reader = tokio::spawn(async move {
        for seq in 0..total {
            let m = healthy.next_message().await;
            assert_eq!(
                m["payload"]["seq"], seq,
                "the healthy client gets every message in order"
            );
            progress.store(seq + 1, Ordering::Relaxed);
        }
    });
    let pad = "x".repeat(4096);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    for seq in 0..total {
        // Never more than 64 ahead of the healthy client, so only the stalled one falls behind.
        while received.load(Ordering::Relaxed) + 64 < seq {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the healthy client stopped reading"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        feed.send(&path, text(&json!({"seq": seq, "pad": pad}).to_string()));
    }
    reader.await.expect("healthy reader finished");

    let status = stalled.next_of("status").await;
    assert_eq!(status["code"], "messages_dropped", "{status}");
    assert_eq!(
        feed.accepted(&path),
        1,
        "the upstream connection was never dropped"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_huge_upstream_message_is_skipped_without_hurting_the_others() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "max_message_size = 4096")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;

    feed.send(&path, text(&format!("\"{}\"", "x".repeat(10_000))));
    feed.send(&path, text("\"small\""));
    let m = ws.next_message().await;
    assert_eq!(m["payload"], "small", "the huge message is skipped");

    // Beyond 16 × max_message_size the connection is reopened; messages flow again after.
    feed.send(&path, Message::Binary(vec![b'1'; 100_000].into()));
    eventually("the upstream connection is reopened", async || {
        feed.accepted(&path) == 2 && feed.connections(&path) == 1
    })
    .await;
    feed.send(&path, text("\"after\""));
    assert_eq!(ws.next_message().await["payload"], "after");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_is_reopened_after_two_ping_intervals() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "ping_interval = \"1s\"")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;

    feed.mute(&path);
    let down = ws.next_of("status").await;
    assert_eq!(down["code"], "backend_down", "{down}");
    assert!(
        down["message"]
            .as_str()
            .unwrap()
            .contains("not even a pong"),
        "{down}"
    );
    let up = ws.next_of("status").await;
    assert_eq!(up["code"], "backend_up", "{up}");
    assert_eq!(feed.accepted(&path), 2, "a new connection");
    // The silent connection hears nothing; the new one delivers.
    feed.send(&path, text("\"again\""));
    assert_eq!(ws.next_message().await["payload"], "again");
    ws.assert_no_message().await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn shutting_down_closes_the_upstream_connections_with_1001() {
    let feed = WsFeed::start().await;
    let gateway = start(&config(&feed, "")).await;
    let symbol = unique("s");
    let path = format!("/stream/{symbol}");
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;
    gateway.shutdown().await;
    eventually("the upstream gets a close frame", async || {
        feed.close_codes(&path) == [1001]
    })
    .await;
    assert_eq!(feed.connections(&path), 0);
}

#[tokio::test]
async fn static_headers_and_subprotocols_are_sent_upstream() {
    let feed = WsFeed::start().await;
    let extra =
        "headers = { \"x-api-key\" = \"k-123\" }\nsubprotocols = [\"feed.v2\", \"feed.v1\"]";
    let gateway = start(&config(&feed, extra)).await;
    let symbol = unique("s");
    let mut ws = Client::connect(gateway.local_addr()).await;
    ws.subscribe(&format!("prices/{symbol}")).await;
    let path = format!("/stream/{symbol}");
    assert_eq!(feed.header(&path, "x-api-key").as_deref(), Some("k-123"));
    assert_eq!(
        feed.header(&path, "sec-websocket-protocol").as_deref(),
        Some("feed.v2, feed.v1")
    );
    gateway.shutdown().await;
}

#[test]
fn bad_urls_and_wildcard_routes_are_refused_naming_the_key() {
    let problems = |backend: &str, channel: &str, topic: &str| -> Vec<String> {
        let text = format!(
            "[backends.ticker]\ntype = \"websocket\"\n{backend}\n[[routes]]\nchannel = \"{channel}\"\nbackend = \"ticker\"\ntopic = \"{topic}\"\nallow = [\"subscribe\"]\n"
        );
        match wsbridge::Config::from_toml(&text) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    };
    let good = "url = \"ws://127.0.0.1:9/s/{topic}\"";
    assert_eq!(problems(good, "prices/{s}", "{s}"), Vec::<String>::new());
    for bad in [
        "url = \"ws://127.0.0.1:9/stream\"",
        "url = \"http://127.0.0.1:9/{topic}\"",
    ] {
        let p = problems(bad, "prices/{s}", "{s}");
        assert_eq!(p.len(), 1, "{bad}: {p:#?}");
        assert!(p[0].starts_with("backends.ticker.url: "), "{p:#?}");
    }
    let p = problems(good, "prices/#", "#");
    assert!(!p.is_empty());
    assert!(
        p.iter().all(|l| l.starts_with("routes[0].topic: ")),
        "{p:#?}"
    );
    let p = problems(good, "prices/{s}/#", "{s}");
    assert!(
        p.iter()
            .any(|l| l.starts_with("routes[0].topic: ") && l.contains("WebSocket topic")),
        "{p:#?}"
    );
}
