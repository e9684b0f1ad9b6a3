//! The MQTT backend against a real Mosquitto, with `mosquitto_pub` / `mosquitto_sub` as the
//! independent MQTT clients on the other side. Tests on the machine's broker (port 1883) use
//! topics under a prefix unique to the test run; tests that stop, freeze or inspect a broker
//! start their own.

mod common;
mod mqtt_support;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Client, eventually, http_get, start, unique};
use mqtt_support::{
    MosquittoSub, PrivateBroker, SHARED_PORT, TcpRelay, TestPki, mosquitto_pub,
    mosquitto_pub_lines, ready, sys_values_until,
};
use serde_json::{Value, json};

/// A gateway config with one MQTT backend; `{prefix}` keeps the test's topics apart.
fn config(url: &str, prefix: &str, backend_extra: &str, server_extra: &str) -> String {
    // MQTT 3.1.1 has no content type, and the config says so.
    let content_type = if backend_extra.contains("\"3.1.1\"") {
        ""
    } else {
        "content_type = \"application/json\""
    };
    format!(
        r##"
[server]
{server_extra}

# The tests publish fast from single connections; publish limits are tested elsewhere.
[limits]
publish_per_second = 0
publish_bytes_per_second = 0

[backends.plant]
type = "mqtt"
url = "{url}"
reconnect_min_delay = "50ms"
reconnect_max_delay = "200ms"
{backend_extra}

# Telemetry: MQTT topics under plant/SITE, browser channels under sensors/SITE.
[[routes]]
channel = "sensors/{{site}}/#"
backend = "plant"
topic = "{prefix}/plant/{{site}}/#"
allow = ["subscribe", "publish"]
qos = 1

# Commands with QoS 2 and an MQTT 5 content type.
[[routes]]
channel = "commands/{{site}}/{{device}}"
backend = "plant"
topic = "{prefix}/cmd/{{site}}/{{device}}"
allow = ["subscribe", "publish"]
qos = 2
{content_type}

# Retained set points: the broker keeps the last one for new subscribers.
[[routes]]
channel = "setpoints/{{site}}"
backend = "plant"
topic = "{prefix}/setpoint/{{site}}"
allow = ["subscribe", "publish"]
retain = true
"##
    )
}

async fn gateway(url: &str, prefix: &str, backend_extra: &str) -> wsbridge::Gateway {
    let gw = start(&config(url, prefix, backend_extra, "")).await;
    ready(&gw).await;
    gw
}

fn shared_url() -> String {
    format!("mqtt://127.0.0.1:{SHARED_PORT}")
}

#[tokio::test]
async fn mosquitto_pub_reaches_websocket_subscribers_on_mapped_channels() {
    let prefix = unique("wsbt");
    let gw = gateway(&shared_url(), &prefix, "").await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;

    let topic = |rest: &str| format!("{prefix}/plant/berlin/{rest}");
    mosquitto_pub(
        SHARED_PORT,
        &[
            "-q",
            "1",
            "-t",
            &topic("line1/temp"),
            "-m",
            r#"{"celsius": 21.5}"#,
        ],
    )
    .await;
    mosquitto_pub(
        SHARED_PORT,
        &[
            "-q",
            "1",
            "-t",
            &topic("line1/state"),
            "-m",
            "running, no faults",
        ],
    )
    .await;
    let binary = std::env::temp_dir().join(unique("wsbt-bin"));
    std::fs::write(&binary, [0x00, 0xff, 0x10, 0x80]).unwrap();
    mosquitto_pub(
        SHARED_PORT,
        &[
            "-q",
            "1",
            "-t",
            &topic("raw"),
            "-f",
            binary.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::remove_file(&binary).ok();
    mosquitto_pub(
        SHARED_PORT,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            &topic("line2/temp"),
            "-m",
            "19",
            "-D",
            "publish",
            "user-property",
            "source",
            "sensor-7",
            "-D",
            "publish",
            "content-type",
            "text/plain",
        ],
    )
    .await;

    let m = ws.next_message().await;
    assert_eq!(m["channel"], "sensors/berlin/line1/temp");
    assert_eq!(m["subscription"], "sensors/berlin/#");
    assert_eq!(m["payload"], json!({"celsius": 21.5}));
    assert!(m["timestamp"].is_i64(), "{m}");

    let m = ws.next_message().await;
    assert_eq!(m["channel"], "sensors/berlin/line1/state");
    assert_eq!(m["payload"], "running, no faults");
    assert!(m.get("encoding").is_none(), "{m}");

    let m = ws.next_message().await;
    assert_eq!(m["channel"], "sensors/berlin/raw");
    assert_eq!(m["encoding"], "base64");
    assert_eq!(
        BASE64.decode(m["payload"].as_str().unwrap()).unwrap(),
        [0x00, 0xff, 0x10, 0x80]
    );

    // MQTT 5 user properties arrive as headers; the content type is kept.
    let m = ws.next_message().await;
    assert_eq!(m["channel"], "sensors/berlin/line2/temp");
    assert_eq!(m["payload"], 19);
    assert_eq!(m["headers"], json!({"source": "sensor-7"}));
    assert_eq!(m["content_type"], "text/plain");
    ws.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_publishes_reach_mosquitto_sub_byte_for_byte() {
    let prefix = unique("wsbt");
    let gw = gateway(&shared_url(), &prefix, "").await;
    let mut sub = MosquittoSub::start(SHARED_PORT, &format!("{prefix}/#")).await;
    let mut ws = Client::connect(gw.local_addr()).await;

    let ok = ws
        .publish("sensors/berlin/line1/temp", json!({"celsius": 21.5}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let got = sub.next().await;
    assert_eq!(got.topic, format!("{prefix}/plant/berlin/line1/temp"));
    assert_eq!(
        got.payload, br#"{"celsius":21.5}"#,
        "the JSON text exactly as the client sent it"
    );
    assert_eq!(got.qos, 1, "the route's QoS");
    assert!(!got.retained);

    ws.publish("sensors/berlin/display", json!("Hello, wörld"))
        .await;
    assert_eq!(sub.next().await.payload, "Hello, wörld".as_bytes());

    let reply = ws
        .request(json!({"type": "publish", "channel": "sensors/berlin/raw", "payload": "AP8QgA==", "encoding": "base64"}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(sub.next().await.payload, [0x00, 0xff, 0x10, 0x80]);

    // Headers become MQTT 5 user properties; the route sets the content type and QoS 2.
    let reply = ws
        .request(json!({"type": "publish", "channel": "commands/berlin/pump-3", "payload": {"on": true}, "headers": {"trace": "abc-123"}}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = sub.next().await;
    assert_eq!(got.topic, format!("{prefix}/cmd/berlin/pump-3"));
    assert_eq!(got.payload, br#"{"on":true}"#);
    assert_eq!(got.qos, 2);
    assert_eq!(got.content_type, "application/json");
    assert_eq!(got.user_properties, "trace:abc-123");
    gw.shutdown().await;
}

/// `+` and `#` at the client map to MQTT wildcards, and overlapping subscriptions each get a
/// message exactly once.
async fn wildcards_and_overlapping_subscriptions(protocol: &str) {
    let prefix = unique("wsbt");
    let backend = format!("protocol = \"{protocol}\"");
    let gw = gateway(&shared_url(), &prefix, &backend).await;
    let addr = gw.local_addr();
    let mut plus = Client::connect(addr).await;
    let mut hash = Client::connect(addr).await;
    let mut sites = Client::connect(addr).await;
    plus.subscribe("sensors/berlin/+/temp").await;
    hash.subscribe("sensors/berlin/#").await;
    sites.subscribe("sensors/+/humidity").await;
    assert_eq!(gw.hub().upstream_counts(), vec![("plant".to_string(), 3)]);

    // berlin/a/temp matches both `+/temp` and `#`, and is published twice with the same payload:
    // each subscription gets it twice, no more, no less.
    let published = [
        "berlin",
        "berlin/a/temp",
        "berlin/a/temp",
        "berlin/a/b/temp",
        "berlin/b/humidity",
        "paris/humidity",
    ];
    for rest in published {
        let topic = format!("{prefix}/plant/{rest}");
        let payload = json!(rest).to_string();
        mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", &payload]).await;
    }
    for expected in [
        "sensors/berlin",
        "sensors/berlin/a/temp",
        "sensors/berlin/a/temp",
        "sensors/berlin/a/b/temp",
        "sensors/berlin/b/humidity",
    ] {
        assert_eq!(hash.next_message().await["channel"], expected);
    }
    for _ in 0..2 {
        let m = plus.next_message().await;
        assert_eq!(m["channel"], "sensors/berlin/a/temp");
    }
    // berlin/b/humidity is one level too deep for `sensors/+/humidity`.
    let m = sites.next_message().await;
    assert_eq!(m["channel"], "sensors/paris/humidity");
    for client in [&mut plus, &mut hash, &mut sites] {
        client.assert_no_message().await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn single_and_multi_level_wildcards_with_mqtt_5() {
    wildcards_and_overlapping_subscriptions("5").await;
}

#[tokio::test]
async fn single_and_multi_level_wildcards_with_mqtt_3_1_1() {
    wildcards_and_overlapping_subscriptions("3.1.1").await;
}

#[tokio::test]
async fn retained_messages_reach_a_new_subscriber_at_once() {
    let prefix = unique("wsbt");
    let gw = gateway(&shared_url(), &prefix, "").await;
    let addr = gw.local_addr();
    let setpoint = format!("{prefix}/setpoint/berlin");
    mosquitto_pub(
        SHARED_PORT,
        &["-q", "1", "-r", "-t", &setpoint, "-m", r#"{"celsius": 20}"#],
    )
    .await;

    let mut dashboard = Client::connect(addr).await;
    dashboard.subscribe("setpoints/berlin").await;
    let m = dashboard.next_message().await;
    assert_eq!(m["payload"], json!({"celsius": 20}));

    // A retain route makes a browser's publish the value the next dashboard starts with.
    let mut operator = Client::connect(addr).await;
    let ok = operator
        .publish("setpoints/berlin", json!({"celsius": 22}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(
        dashboard.next_message().await["payload"],
        json!({"celsius": 22})
    );
    // A dashboard opened later shares the first one's MQTT subscription, and still gets the
    // current value at once.
    let mut late = Client::connect(addr).await;
    late.subscribe("setpoints/berlin").await;
    assert_eq!(late.next_message().await["payload"], json!({"celsius": 22}));
    assert_eq!(gw.hub().upstream_counts(), vec![("plant".to_string(), 1)]);
    late.assert_no_message().await;
    dashboard.assert_no_message().await;

    // Leave nothing retained on the shared broker.
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-n", "-t", &setpoint]).await;
    gw.shutdown().await;
}

/// A retained message sent for a new subscription reaches that subscription's clients only,
/// not the clients of an overlapping one that already had it.
async fn retained_messages_go_to_the_new_subscription_only(protocol: &str) {
    let prefix = unique("wsbt");
    let backend = format!("protocol = \"{protocol}\"");
    let gw = gateway(&shared_url(), &prefix, &backend).await;
    let addr = gw.local_addr();
    let state = format!("{prefix}/plant/berlin/state");
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-t", &state, "-m", "idle"]).await;

    let mut all = Client::connect(addr).await;
    all.subscribe("sensors/berlin/#").await;
    assert_eq!(all.next_message().await["payload"], "idle");
    let mut level = Client::connect(addr).await;
    level.subscribe("sensors/berlin/+").await;
    assert_eq!(level.next_message().await["payload"], "idle");
    all.assert_no_message().await;

    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &state, "-m", "busy"]).await;
    for client in [&mut all, &mut level] {
        assert_eq!(client.next_message().await["payload"], "busy");
        client.assert_no_message().await;
    }
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-n", "-t", &state]).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn retained_messages_go_to_the_new_subscription_only_with_mqtt_5() {
    retained_messages_go_to_the_new_subscription_only("5").await;
}

#[tokio::test]
async fn retained_messages_go_to_the_new_subscription_only_with_mqtt_3_1_1() {
    retained_messages_go_to_the_new_subscription_only("3.1.1").await;
}

#[tokio::test]
async fn publish_is_acknowledged_only_after_the_broker_acknowledges_it() {
    let broker = PrivateBroker::start("").await;
    let prefix = unique("wsbt");
    let gw = gateway(&broker.url(), &prefix, "").await;
    let mut sub = MosquittoSub::start(broker.port, &format!("{prefix}/#")).await;
    let mut ws = Client::connect(gw.local_addr()).await;

    // A frozen broker keeps the connection open but acknowledges nothing.
    broker.freeze(true).await;
    ws.send(json!({"type": "publish", "id": "qos1", "channel": "sensors/berlin/a", "payload": 1}))
        .await;
    ws.send(
        json!({"type": "publish", "id": "qos2", "channel": "commands/berlin/pump", "payload": 2}),
    )
    .await;
    // Pings are answered by the gateway itself, after the publishes were read: while the
    // broker is frozen only pongs come back, never an `ok`.
    for n in 0..3 {
        ws.send(json!({"type": "ping", "id": n})).await;
        let frame = ws.recv().await;
        assert_eq!(
            frame["type"], "pong",
            "nothing but pongs while the broker is frozen: {frame}"
        );
    }

    broker.freeze(false).await;
    let mut acked = [ws.recv().await, ws.recv().await];
    acked.sort_by_key(|r| r["id"].as_str().map(str::to_owned));
    assert_eq!(acked[0], json!({"type": "ok", "id": "qos1"}));
    assert_eq!(acked[1], json!({"type": "ok", "id": "qos2"}));
    let mut topics = [sub.next().await.topic, sub.next().await.topic];
    topics.sort();
    assert_eq!(
        topics,
        [
            format!("{prefix}/cmd/berlin/pump"),
            format!("{prefix}/plant/berlin/a")
        ]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_publish_the_broker_never_acknowledges_gets_an_error_not_ok() {
    let mut broker = PrivateBroker::start("").await;
    let gw = gateway(&broker.url(), &unique("wsbt"), "").await;
    let mut ws = Client::connect(gw.local_addr()).await;

    broker.freeze(true).await;
    ws.send(json!({"type": "publish", "id": 1, "channel": "sensors/berlin/a", "payload": 1}))
        .await;
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
    broker.kill().await;
    let reply = ws.reply_to(json!(1)).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");
    gw.shutdown().await;
}

#[tokio::test]
async fn broker_refusals_reach_the_client_as_errors() {
    let prefix = unique("wsbt");
    let acl = std::env::temp_dir().join(unique("wsbt-acl"));
    std::fs::write(
        &acl,
        format!("topic readwrite {prefix}/plant/#\ntopic read {prefix}/cmd/#\n"),
    )
    .unwrap();
    let broker = PrivateBroker::start(&format!("acl_file {}", acl.display())).await;
    let gw = gateway(&broker.url(), &prefix, "max_packet_size = 4096").await;
    let mut ws = Client::connect(gw.local_addr()).await;

    // The broker's ACL refuses it: PUBACK/PUBREC with "not authorized".
    let reply = ws
        .publish("commands/berlin/pump", json!({"on": true}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );

    // Larger than the configured packet size: refused before it is sent.
    let reply = ws
        .publish("sensors/berlin/big", json!("x".repeat(8000)))
        .await;
    assert_eq!(reply["code"], "message_too_large", "{reply}");

    // Neither failure harmed the connection.
    assert_eq!(
        ws.publish("sensors/berlin/small", json!(1)).await["type"],
        "ok"
    );
    std::fs::remove_file(&acl).ok();
    gw.shutdown().await;
}

#[tokio::test]
async fn twenty_sockets_on_one_channel_share_one_mqtt_subscription() {
    let broker = PrivateBroker::start("").await;
    let gw = gateway(&broker.url(), "fleet", "").await;
    let addr = gw.local_addr();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let mut ws = Client::connect(addr).await;
        ws.subscribe("sensors/berlin/#").await;
        sockets.push(ws);
    }
    assert_eq!(gw.hub().upstream_counts(), vec![("plant".to_string(), 1)]);
    assert_eq!(gw.hub().sessions_per_upstream(), vec![20]);
    // The broker's own count: the gateway's one subscription plus the one reading the count.
    let counts = sys_values_until(broker.port, "$SYS/broker/subscriptions/count", "2").await;
    assert!(
        counts
            .iter()
            .all(|c| c.parse::<u32>().is_ok_and(|n| n <= 2)),
        "the broker never held more than the gateway's one subscription: {counts:?}"
    );

    let lines: String = (0..200)
        .map(|seq| format!("{{\"seq\": {seq}}}\n"))
        .collect();
    mosquitto_pub_lines(
        broker.port,
        &["-q", "1", "-t", "fleet/plant/berlin/line1"],
        &lines,
    )
    .await;
    for ws in &mut sockets {
        for seq in 0..200 {
            let m = ws.next_message().await;
            assert_eq!(
                m["payload"]["seq"], seq,
                "every socket gets every message in order"
            );
            assert_eq!(m["channel"], "sensors/berlin/line1");
        }
    }
    drop(sockets);
    eventually(
        "the MQTT subscription is released with the last socket",
        async || gw.hub().upstream_counts() == vec![("plant".to_string(), 0)],
    )
    .await;
    gw.shutdown().await;
}

async fn readyz(gw: &wsbridge::Gateway) -> (u16, Value) {
    let (status, body) = http_get(gw.local_addr(), "/readyz").await;
    (status, serde_json::from_str(&body).expect("readyz is JSON"))
}

#[tokio::test]
async fn subscriptions_survive_a_broker_restart_without_reconnecting() {
    let mut broker = PrivateBroker::start("").await;
    let gw = gateway(&broker.url(), "plantx", "").await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;
    assert_eq!(readyz(&gw).await.0, 200);

    mosquitto_pub(
        broker.port,
        &["-q", "1", "-t", "plantx/plant/berlin/temp", "-m", "1"],
    )
    .await;
    assert_eq!(ws.next_message().await["payload"], 1);

    broker.stop().await;
    let status = ws.next_of("status").await;
    assert_eq!(status["code"], "backend_down", "{status}");
    assert_eq!(status["backend"], "plant");
    assert_eq!(status["subscriptions"], json!(["sensors/berlin/#"]));
    let (code, body) = readyz(&gw).await;
    assert_eq!(
        (code, &body["backends"]["plant"]),
        (503, &json!("down")),
        "{body}"
    );
    // Publishing while the broker is down fails at once, and says why.
    let reply = ws.publish("sensors/berlin/temp", json!(2)).await;
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");

    broker.run().await;
    let status = ws.next_of("status").await;
    assert_eq!(status["code"], "backend_up", "{status}");
    assert_eq!(readyz(&gw).await.0, 200);
    // `backend_up` comes once the subscription is made again: messages flow from then on.
    assert_eq!(gw.hub().upstream_counts(), vec![("plant".to_string(), 1)]);

    // The same socket, never reconnected, gets messages again: from MQTT and from the gateway.
    mosquitto_pub(
        broker.port,
        &["-q", "1", "-t", "plantx/plant/berlin/temp", "-m", "3"],
    )
    .await;
    assert_eq!(ws.next_message().await["payload"], 3);
    assert_eq!(
        ws.publish("sensors/berlin/temp", json!(4)).await["type"],
        "ok"
    );
    assert_eq!(ws.next_message().await["payload"], 4);
    // The metrics count the reconnect, and the publish refused while down by its error code.
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    for series in [
        "wsbridge_backend_reconnects_total{backend=\"plant\"} 1",
        "wsbridge_publishes_total{backend=\"plant\",result=\"backend_unavailable\"} 1",
        "wsbridge_publishes_total{backend=\"plant\",result=\"ok\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} in {metrics}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn requests_wait_for_the_broker_up_to_unavailable_wait() {
    // The broker is not running when the gateway starts: the gateway starts anyway.
    let mut broker = PrivateBroker::configure("");
    let gw = start(&config(
        &broker.url(),
        "waity",
        "unavailable_wait = \"20s\"",
        "request_timeout = \"30s\"",
    ))
    .await;
    let (code, body) = readyz(&gw).await;
    assert_eq!((code, &body["ready"]), (503, &json!(false)), "{body}");

    let mut ws = Client::connect(gw.local_addr()).await;
    ws.send(
        json!({"type": "publish", "id": "pub", "channel": "sensors/berlin/x", "payload": "held"}),
    )
    .await;
    ws.send(json!({"type": "subscribe", "id": "sub", "channel": "sensors/berlin/#"}))
        .await;
    eventually("the subscribe is waiting for the broker", async || {
        gw.hub().sessions_per_upstream() == vec![1]
    })
    .await;

    broker.run().await;
    assert_eq!(ws.reply_to(json!("sub")).await["type"], "ok");
    assert_eq!(ws.reply_to(json!("pub")).await["type"], "ok");
    assert_eq!(readyz(&gw).await.0, 200);
    gw.shutdown().await;
}

/// What a subscriber gets of five QoS 1 messages published while the gateway's connection to
/// the broker is cut, up to and including one published after the connection is back.
async fn messages_published_while_the_connection_was_down(backend_extra: &str) -> Vec<Value> {
    let prefix = unique("session");
    let relay = TcpRelay::start(SHARED_PORT).await;
    let url = format!("mqtt://127.0.0.1:{}", relay.port);
    let gw = gateway(&url, &prefix, backend_extra).await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;
    let topic = format!("{prefix}/plant/berlin/line1");
    let publish = async |payload: &str| {
        mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", payload]).await;
    };
    publish("\"before\"").await;
    assert_eq!(ws.next_message().await["payload"], "before");

    relay.cut();
    assert_eq!(ws.next_of("status").await["code"], "backend_down");
    for i in 1..=5 {
        publish(&format!("\"queued {i}\"")).await;
    }
    relay.restore();
    assert_eq!(ws.next_of("status").await["code"], "backend_up");
    publish("\"after\"").await;

    let mut received = Vec::new();
    loop {
        let payload = ws.next_message().await["payload"].clone();
        received.push(payload.clone());
        if payload == "after" {
            break;
        }
    }
    gw.shutdown().await;
    received
}

#[tokio::test]
async fn a_persistent_session_delivers_what_the_broker_queued_while_the_connection_was_down() {
    let mut received = messages_published_while_the_connection_was_down(
        "persistent_session = true\nsession_expiry = \"60s\"",
    )
    .await;
    // QoS 1 is at least once: when the cut came before the gateway's PUBACK reached the
    // broker, the broker sends the last message before the cut again on resumption.
    if received.first().is_some_and(|p| p == "before") {
        received.remove(0);
    }
    assert_eq!(
        received,
        [
            "queued 1", "queued 2", "queued 3", "queued 4", "queued 5", "after"
        ]
    );
}

#[tokio::test]
async fn a_clean_session_misses_what_was_published_while_the_connection_was_down() {
    let received = messages_published_while_the_connection_was_down("").await;
    assert_eq!(received, ["after"]);
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_the_mqtt_connection() {
    let prefix = unique("wsbt");
    let gw = start(&config(&shared_url(), &prefix, "", "queue_capacity = 64")).await;
    ready(&gw).await;
    let addr = gw.local_addr();
    let mut stalled = Client::connect(addr).await;
    stalled.subscribe("sensors/berlin/#").await;
    let mut healthy = Client::connect(addr).await;
    healthy.subscribe("sensors/berlin/#").await;

    // 2000 messages of 16 KiB (32 MB) through the broker: far more than the stalled client's
    // queue and socket buffers hold.
    let reader = common::read_in_order(healthy, 2000);
    let mut publisher = Client::connect(addr).await;
    common::flood(&mut publisher, "sensors/berlin/bulk", 2000, 16 * 1024).await;
    let mut healthy = reader.await.expect("the healthy client read everything");
    healthy.assert_no_message().await;
    assert!(gw.hub().is_ready(), "the MQTT connection never dropped");

    let status = stalled.next_of("status").await;
    assert_eq!(status["code"], "messages_dropped", "{status}");
    gw.shutdown().await;
}

#[tokio::test]
async fn unsupported_requests_get_documented_errors() {
    let prefix = unique("wsbt");
    let gw = gateway(&shared_url(), &prefix, "protocol = \"3.1.1\"").await;
    let mut ws = Client::connect(gw.local_addr()).await;
    let e = ws
        .request(json!({"type": "subscribe", "channel": "sensors/berlin/#", "from": "earliest"}))
        .await;
    assert_eq!(e["code"], "unsupported", "{e}");
    let e = ws
        .request(json!({"type": "publish", "channel": "sensors/berlin/a", "payload": 1, "headers": {"a": "b"}}))
        .await;
    assert_eq!(e["code"], "unsupported", "{e}");
    assert!(e["message"].as_str().unwrap().contains("MQTT 3.1.1"), "{e}");
    let e = ws
        .request(
            json!({"type": "publish", "channel": "sensors/berlin/a", "payload": 1, "partition": 0}),
        )
        .await;
    assert_eq!(e["code"], "unsupported", "{e}");
    let e = ws
        .request(
            json!({"type": "publish", "channel": "sensors/berlin/a", "payload": 1, "key": "k"}),
        )
        .await;
    assert_eq!(e["code"], "unsupported", "{e}");
    assert_eq!(ws.publish("sensors/berlin/a", json!(1)).await["type"], "ok");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_iot_telemetry_example_runs_against_the_local_broker() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/iot-telemetry.toml"
    ))
    .expect("config/iot-telemetry.toml");
    let gw = start(&example).await;
    ready(&gw).await;
    let addr = gw.local_addr();
    // A site name of its own keeps this test's topics apart on the shared broker.
    let site = unique("site");

    // A device's retained status reaches a dashboard at once.
    let status = format!("plant/{site}/status/pump-3");
    mosquitto_pub(
        SHARED_PORT,
        &["-q", "1", "-r", "-t", &status, "-m", r#"{"state": "on"}"#],
    )
    .await;
    let mut dashboard = Client::connect(addr).await;
    dashboard.subscribe(&format!("status/{site}/+")).await;
    let m = dashboard.next_message().await;
    assert_eq!(m["channel"], format!("status/{site}/pump-3"));
    assert_eq!(m["payload"], json!({"state": "on"}));
    let reply = dashboard
        .request(json!({"type": "unsubscribe", "channel": format!("status/{site}/+")}))
        .await;
    assert_eq!(reply["type"], "ok");
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-n", "-t", &status]).await;

    // Telemetry flows to the browser.
    dashboard.subscribe(&format!("telemetry/{site}/#")).await;
    let reading = format!("plant/{site}/telemetry/line1/temp");
    mosquitto_pub(SHARED_PORT, &["-t", &reading, "-m", "21.5"]).await;
    let m = dashboard.next_of("message").await;
    assert_eq!(m["channel"], format!("telemetry/{site}/line1/temp"));
    assert_eq!(m["payload"], 21.5);

    // A command from the browser reaches the device's topic.
    let mut device = MosquittoSub::start(SHARED_PORT, &format!("plant/{site}/commands/#")).await;
    let ok = dashboard
        .publish(&format!("commands/{site}/pump-3"), json!({"on": false}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let got = device.next().await;
    assert_eq!(got.topic, format!("plant/{site}/commands/pump-3"));
    assert_eq!(got.payload, br#"{"on":false}"#);
    assert_eq!(got.content_type, "application/json");

    // Telemetry is read-only for browsers.
    let e = dashboard
        .publish(&format!("telemetry/{site}/line1/temp"), json!(99))
        .await;
    assert_eq!(e["code"], "forbidden", "{e}");
    gw.shutdown().await;
}

/// Messages above `max_packet_size` are not delivered, and do not cost the connection.
async fn large_messages_are_skipped(protocol: &str) {
    let prefix = unique("wsbt");
    let backend = format!("max_packet_size = 4096\nprotocol = \"{protocol}\"");
    let gw = gateway(&shared_url(), &prefix, &backend).await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;

    // MQTT 5 tells the broker the limit; with 3.1.1 the gateway skips what arrives.
    let topic = format!("{prefix}/plant/berlin/blob");
    let big = "y".repeat(8000);
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", &big]).await;
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", "small"]).await;
    // The very next frame: had the connection dropped, a backend_down status would come first.
    let frame = ws.recv().await;
    assert_eq!(
        (frame["type"].as_str(), &frame["payload"]),
        (Some("message"), &json!("small")),
        "{frame}"
    );
    ws.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn messages_above_max_packet_size_are_skipped_with_mqtt_5() {
    large_messages_are_skipped("5").await;
}

#[tokio::test]
async fn messages_above_max_packet_size_are_skipped_with_mqtt_3_1_1() {
    large_messages_are_skipped("3.1.1").await;
}

#[tokio::test]
async fn mqtts_with_a_private_ca_and_a_client_certificate() {
    let pki = TestPki::generate().await;
    let mut broker = PrivateBroker::configure(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
        pki.path("ca.pem"),
        pki.path("server.pem"),
        pki.path("server.key")
    ));
    let tls_args = [
        "--cafile".to_string(),
        pki.path("ca.pem"),
        "--cert".to_string(),
        pki.path("client.pem"),
        "--key".to_string(),
        pki.path("client.key"),
    ];
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    broker.client_args(&tls_args);
    broker.run().await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let tls = |ca: &str| {
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.path(ca),
            pki.path("client.pem"),
            pki.path("client.key")
        )
    };

    let gw = gateway(&url, "tls", &tls("ca.pem")).await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;
    let mut args = vec!["-q", "1", "-t", "tls/plant/berlin/temp", "-m", "21"];
    args.extend(&tls_args);
    mosquitto_pub(broker.port, &args).await;
    assert_eq!(ws.next_message().await["payload"], 21);
    assert_eq!(
        ws.publish("sensors/berlin/temp", json!(22)).await["type"],
        "ok"
    );
    assert_eq!(ws.next_message().await["payload"], 22);
    gw.shutdown().await;

    // A broker certificate from another CA is refused, and the backend says why.
    let gw = start(&config(&url, "tls", &tls("other-ca.pem"), "")).await;
    eventually("the backend reports the certificate problem", async || {
        let health = gw.hub().backend_health();
        matches!(&health[0].1, wsbridge::backends::Health::Down { reason } if reason.contains("certificate"))
    })
    .await;
    assert_eq!(readyz(&gw).await.0, 503);
    gw.shutdown().await;
}

/// The second reproduction, on the shipped `config/iot-telemetry.toml`: a device publishes the
/// bytes `"`, 0xFF, `"`. Subscribers get them base64-encoded, every later message on every
/// topic still arrives, and the gateway stays ready.
#[tokio::test]
async fn a_device_publishing_json_shaped_invalid_utf8_stops_nothing() {
    let text = std::fs::read_to_string("config/iot-telemetry.toml").expect("the shipped config");
    let gw = start(&text.replace("${MQTT_URL:-mqtt://127.0.0.1:1883}", &shared_url())).await;
    ready(&gw).await;
    let site = unique("berlin");
    let mut telemetry = Client::connect(gw.local_addr()).await;
    telemetry.subscribe(&format!("telemetry/{site}/#")).await;
    let mut status = Client::connect(gw.local_addr()).await;
    status.subscribe(&format!("status/{site}/d1")).await;

    let topic = format!("plant/{site}/telemetry/a");
    mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, b"\"\xff\"", &[]).await;
    let m = telemetry.next_message().await;
    assert_eq!(m["encoding"], "base64", "{m}");
    assert_eq!(m["payload"], BASE64.encode(b"\"\xff\""), "{m}");

    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", "{\"t\":21}"]).await;
    assert_eq!(telemetry.next_message().await["payload"], json!({"t": 21}));
    let status_topic = format!("plant/{site}/status/d1");
    mosquitto_pub(
        SHARED_PORT,
        &["-q", "1", "-t", &status_topic, "-m", "online"],
    )
    .await;
    assert_eq!(status.next_message().await["payload"], "online");

    let (code, body) = http_get(gw.local_addr(), "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// A gateway with a `json`, a `text` and a `binary` route on the same MQTT topics.
async fn matrix_gateway(prefix: &str, backend_extra: &str) -> wsbridge::Gateway {
    use common::input::Format;
    let mut config = format!(
        "[limits]\npublish_per_second = 0\npublish_bytes_per_second = 0\n[backends.plant]\ntype = \"mqtt\"\nurl = \"{}\"\n{backend_extra}\n",
        shared_url()
    );
    for format in Format::ALL {
        let name = format.name();
        config.push_str(&format!(
            "[[routes]]\nchannel = \"{name}/#\"\nbackend = \"plant\"\ntopic = \"{prefix}/in/#\"\nformat = \"{name}\"\nallow = [\"subscribe\"]\nqos = 1\n"
        ));
    }
    let gw = start(&config).await;
    ready(&gw).await;
    gw
}

/// The broker-side input matrix on MQTT, published with `mosquitto_pub`.
#[tokio::test]
async fn every_bad_payload_has_its_documented_outcome_on_mqtt() {
    use common::input::{Format, cases, expect_case, good};
    let prefix = unique("wsbridge/test/matrix");
    let gw = matrix_gateway(&prefix, "").await;
    let mut subscribers = Vec::new();
    for format in Format::ALL {
        let mut client = Client::connect(gw.local_addr()).await;
        client.subscribe(&format!("{}/x/#", format.name())).await;
        subscribers.push((format, client));
    }
    let topic = format!("{prefix}/in/x");
    for (n, case) in cases().iter().enumerate() {
        mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, &case.bytes, &[]).await;
        mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, &good(n), &[]).await;
        for (format, client) in &mut subscribers {
            expect_case(client, *format, case, n).await;
        }
    }
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// Sizes around `max_packet_size`, many and large MQTT 5 user properties, and a topic that maps
/// to no channel: each has its documented outcome and the next message still arrives.
#[tokio::test]
async fn oversized_packets_properties_and_unmapped_topics_stop_nothing_on_mqtt() {
    let prefix = unique("wsbridge/test/limits");
    let limit = 64 * 1024;
    let gw = matrix_gateway(&prefix, &format!("max_packet_size = {limit}")).await;
    let mut client = Client::connect(gw.local_addr()).await;
    client.subscribe("text/x/#").await;
    let topic = format!("{prefix}/in/x");
    let next_good = async |client: &mut Client, n: usize| {
        let payload = format!("good {n}");
        mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", &payload]).await;
        let m = client.next_message().await;
        assert_eq!(m["payload"], payload, "{m}");
    };

    // Just below the limit (the packet also holds the topic and a header): delivered whole.
    let below = "b".repeat(limit - 1024);
    mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, below.as_bytes(), &[]).await;
    assert_eq!(client.next_message().await["payload"], below);
    next_good(&mut client, 1).await;

    // Just above: the gateway told the broker its maximum packet size (MQTT 5), so the broker
    // does not send it; the connection stays up and the next message arrives.
    let above = "a".repeat(limit + 1);
    mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, above.as_bytes(), &[]).await;
    next_good(&mut client, 2).await;
    assert!(gw.hub().is_ready());

    // 200 user properties, one of them 16 KiB: delivered as headers.
    let big = "v".repeat(16 * 1024);
    let mut args: Vec<String> = Vec::new();
    for i in 0..200 {
        args.extend(["-D", "publish", "user-property", &format!("k{i}"), "v"].map(String::from));
    }
    args.extend(["-D", "publish", "user-property", "big", &big].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mqtt_support::mosquitto_pub_bytes(SHARED_PORT, &topic, b"props", &args).await;
    let m = client.next_message().await;
    assert_eq!(m["payload"], "props", "{m}");
    assert_eq!(m["headers"]["k199"], "v", "{m}");
    assert_eq!(m["headers"]["big"], big.as_str());
    next_good(&mut client, 3).await;

    // An empty topic level has no client channel: skipped and counted.
    mosquitto_pub(
        SHARED_PORT,
        &["-q", "1", "-t", &format!("{topic}//y"), "-m", "lost"],
    )
    .await;
    next_good(&mut client, 4).await;
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    assert!(
        metrics.contains("wsbridge_unmapped_messages_total{backend=\"plant\"} 1"),
        "{metrics}"
    );
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// A retained message comes after the `ok` of the subscribe it answers, never before.
#[tokio::test]
async fn the_ok_of_a_subscribe_comes_before_the_retained_message() {
    let prefix = unique("wsbridge/test/order");
    let gw = gateway(&shared_url(), &prefix, "").await;
    for n in 0..10 {
        let site = format!("s{n}");
        let topic = format!("{prefix}/setpoint/{site}");
        mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-t", &topic, "-m", "21.5"]).await;
        let mut client = Client::connect(gw.local_addr()).await;
        client
            .send(json!({"type": "subscribe", "id": 1, "channel": format!("setpoints/{site}")}))
            .await;
        let first = client.recv().await;
        assert_eq!(first["type"], "ok", "first frame after subscribe: {first}");
        let retained = client.recv().await;
        assert_eq!(retained["type"], "message", "{retained}");
        assert_eq!(retained["payload"], json!(21.5));
        // Clear the retained message.
        mosquitto_pub(SHARED_PORT, &["-q", "1", "-r", "-t", &topic, "-n"]).await;
    }
    gw.shutdown().await;
}

/// The broker is killed (SIGKILL) under a 500 msg/s stream to 100 subscribers and started
/// again: every socket stays open, hears `backend_down` and `backend_up`, and gets the stream
/// again without reconnecting; publishes meanwhile fail at once; every acknowledged publish is
/// seen by an independent MQTT client on the broker.
#[tokio::test]
async fn a_killed_broker_under_load_costs_no_socket_and_no_acknowledged_message() {
    let mut broker = PrivateBroker::start("").await;
    let gw = gateway(&broker.url(), "kill9", "").await;
    let addr = gw.local_addr();
    let mut subscribers = common::hundred_subscribers(addr, "sensors/berlin/#").await;
    let mut publisher = Client::connect(addr).await;
    let channel = "sensors/berlin/stream";
    let expect_seq = async |subscribers: &mut Vec<Client>, range: std::ops::Range<u64>| {
        for ws in subscribers.iter_mut() {
            for seq in range.clone() {
                let m = ws.next_message().await;
                assert_eq!(m["payload"]["seq"], seq, "{m}");
            }
        }
    };
    let expect_broker = async |sub: &mut MosquittoSub, range: std::ops::Range<u64>| {
        for seq in range {
            let got = sub.next().await;
            assert_eq!(got.payload, format!("{{\"seq\":{seq}}}").into_bytes());
        }
    };

    let mut independent = MosquittoSub::start(broker.port, "kill9/#").await;
    common::stream_500_per_second(&mut publisher, channel, 0, 500).await;
    expect_seq(&mut subscribers, 0..500).await;
    expect_broker(&mut independent, 0..500).await;

    broker.kill().await;
    for ws in &mut subscribers {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "backend_down", "{status}");
    }
    let reply = publisher.publish(channel, json!({"seq": -1})).await;
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");

    broker.run().await;
    for ws in &mut subscribers {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "backend_up", "{status}");
    }
    let mut independent = MosquittoSub::start(broker.port, "kill9/#").await;
    common::stream_500_per_second(&mut publisher, channel, 500, 1000).await;
    expect_seq(&mut subscribers, 500..1000).await;
    expect_broker(&mut independent, 500..1000).await;
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(
        metrics.contains("wsbridge_connections 101\n"),
        "no socket was lost"
    );
    gw.shutdown().await;
}

/// The broker hangs (SIGSTOP) for longer than the keep-alive under the same load, then goes on
/// (SIGCONT): sockets stay open, hear `backend_down` and `backend_up`, and the stream resumes;
/// a publish meanwhile gets an error, not a hang.
#[tokio::test]
async fn a_hung_broker_is_detected_and_the_stream_resumes() {
    let broker = PrivateBroker::start("").await;
    let text = config(
        &broker.url(),
        "hung",
        "keep_alive = \"5s\"",
        "request_timeout = \"3s\"",
    );
    let gw = start(&text).await;
    ready(&gw).await;
    let addr = gw.local_addr();
    let mut subscribers = common::hundred_subscribers(addr, "sensors/berlin/#").await;
    let mut publisher = Client::connect(addr).await;
    let channel = "sensors/berlin/stream";
    common::stream_500_per_second(&mut publisher, channel, 0, 250).await;
    for ws in &mut subscribers {
        for seq in 0..250 {
            assert_eq!(ws.next_message().await["payload"]["seq"], seq);
        }
    }

    broker.freeze(true).await;
    // A publish to the hung broker is answered within request_timeout (3 s here).
    let reply = publisher.publish(channel, json!({"seq": -1})).await;
    assert_eq!(reply["type"], "error", "{reply}");
    // The hang is detected within about two keep-alive intervals.
    for ws in &mut subscribers {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "backend_down", "{status}");
    }
    broker.freeze(false).await;
    for ws in &mut subscribers {
        let status = ws.next_of("status").await;
        assert_eq!(status["code"], "backend_up", "{status}");
    }
    common::stream_500_per_second(&mut publisher, channel, 250, 500).await;
    for ws in &mut subscribers {
        for seq in 250..500 {
            let mut m = ws.next_message().await;
            // The timed-out publish's outcome is unknown: the thawed broker may still read it.
            if m["payload"]["seq"] == -1 {
                m = ws.next_message().await;
            }
            assert_eq!(m["payload"]["seq"], seq);
        }
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_panic_in_the_delivery_loop_restarts_it_and_reports_down_until_it_delivers_again() {
    use common::faulty::{self, BOOM, HealthLog, Panicky};
    let prefix = unique("wsb/loop/");
    let text = format!(
        r##"
[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
reconnect_min_delay = "500ms"

[[routes]]
channel = "p/#"
backend = "plant"
topic = "{prefix}/#"
allow = ["subscribe"]
"##
    );
    let (backend, panics) = faulty::build(&text, "plant");
    let health = HealthLog::start(backend.as_ref());
    health.wait_up("the backend connects").await;
    let sink = std::sync::Arc::new(Panicky::default());
    faulty::subscribe(backend.as_ref(), 1, &format!("{prefix}/#"), sink.clone()).await;
    let topic = format!("{prefix}/a");
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", "one"]).await;
    sink.wait_for(b"one").await;

    // The subscriber panics inside the backend's delivery loop: the loop is restarted on a new
    // connection, the backend is down until it has subscribed again, and messages flow again.
    let before = health.entries().len();
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", "boom"]).await;
    health
        .wait("down, then up again", |log| {
            let after = &log[before.min(log.len())..];
            after.iter().any(|h| !h.is_up()) && after.last().is_some_and(|h| h.is_up())
        })
        .await;
    assert_eq!(panics.get(), 1);
    mosquitto_pub(SHARED_PORT, &["-q", "1", "-t", &topic, "-m", "two"]).await;
    sink.wait_for(b"two").await;
    let received = sink.received();
    let boom = received
        .iter()
        .position(|p| p == BOOM)
        .expect("boom was delivered");
    assert_eq!(received[..boom], [b"one".to_vec()]);
    assert_eq!(received.last().map(Vec::as_slice), Some(&b"two"[..]));
    backend.close().await;
}
