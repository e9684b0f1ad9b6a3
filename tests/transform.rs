//! Payload transformation on the memory backend: Protobuf⇄JSON per route, JSON Schema checks and
//! the binary client protocol, cross-checked with `protoc --encode/--decode`.

#[path = "amqp_support/mod.rs"]
mod amqp_support;
mod common;
#[path = "mqtt_support/mod.rs"]
mod mqtt_support;

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Client, http_get, start, unique};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::edge::protobuf::envelope::{
    self, ClientFrame, ServerFrame, client_frame, server_frame,
};

fn schemas_dir() -> String {
    format!("{}/schemas", env!("CARGO_MANIFEST_DIR"))
}

fn config() -> String {
    let dir = schemas_dir();
    format!(
        r##"
schemas = ["{dir}"]

[limits]
publish_per_second = 0
publish_bytes_per_second = 0

[backends.local]
type = "memory"

[[routes]]
channel = "readings/{{dev}}"
backend = "local"
topic = "pb/{{dev}}"
format = "protobuf:iot.v1.Reading"
json_schema = "{dir}/reading.schema.json"
allow = ["subscribe", "publish"]

[[routes]]
channel = "loose/{{dev}}"
backend = "local"
topic = "pb/{{dev}}"
format = "protobuf:iot.v1.Reading"
allow = ["subscribe", "publish"]

[[routes]]
channel = "raw/#"
backend = "local"
topic = "#"
format = "binary"
allow = ["subscribe", "publish"]
"##
    )
}

/// Runs `protoc` on the repository's schemas with `args`, feeding `input`.
fn protoc(args: &[&str], input: &[u8]) -> Vec<u8> {
    let dir = schemas_dir();
    let mut child = Command::new("protoc")
        .args(args)
        .arg(format!("-I{dir}"))
        .arg(format!("{dir}/iot/v1/reading.proto"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("protoc is installed (scripts/setup installs protobuf-compiler)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const FULL_READING: &str = r#"{
    "deviceId": "d1",
    "takenAt": "2026-11-28T12:00:00.250Z",
    "samples": [
        {"sensor": "temp", "value": 21.5, "unit": "UNIT_CELSIUS"},
        {"sensor": "humidity", "value": 40, "unit": "UNIT_PERCENT"}
    ],
    "sequence": "9007199254740993",
    "labels": {"room": "lab", "floor": "2"},
    "location": {"latitude": 52.52, "longitude": 13.405},
    "batteryVolts": 3.7
}"#;

#[tokio::test]
async fn json_publishes_reach_the_broker_as_protobuf() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let dev = unique("d");
    let mut raw = Client::connect(addr).await;
    raw.subscribe(&format!("raw/pb/{dev}")).await;
    let mut web = Client::connect(addr).await;
    let payload: Value = serde_json::from_str(FULL_READING).unwrap();
    let ok = web.publish(&format!("readings/{dev}"), payload).await;
    assert_eq!(ok["type"], "ok", "{ok}");

    let m = raw.next_message().await;
    assert_eq!(m["encoding"], "base64");
    let bytes = BASE64.decode(m["payload"].as_str().unwrap()).unwrap();
    let text = String::from_utf8(protoc(&["--decode=iot.v1.Reading"], &bytes)).unwrap();
    for expected in [
        "device_id: \"d1\"",
        "seconds: 1795867200",
        "nanos: 250000000",
        "sensor: \"temp\"",
        "value: 21.5",
        "unit: UNIT_CELSIUS",
        "unit: UNIT_PERCENT",
        "sequence: 9007199254740993",
        "key: \"room\"",
        "value: \"lab\"",
        "latitude: 52.52",
        "battery_volts: 3.7",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn protobuf_from_the_broker_reaches_browsers_as_canonical_json() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let dev = unique("d");
    let mut web = Client::connect(addr).await;
    web.subscribe("readings/+").await;
    let text = format!(
        r#"device_id: "{dev}" taken_at {{ seconds: 1795867200 }} samples {{ sensor: "co2" value: 415 unit: UNIT_PASCAL }} sequence: -42 labels {{ key: "zone" value: "a" }} mains: true"#
    );
    let bytes = protoc(&["--encode=iot.v1.Reading"], text.as_bytes());
    let mut device = Client::connect(addr).await;
    let ok = device
        .request(json!({"type": "publish", "channel": format!("raw/pb/{dev}"), "payload": BASE64.encode(&bytes), "encoding": "base64"}))
        .await;
    assert_eq!(ok["type"], "ok");

    let m = web.next_message().await;
    assert_eq!(m["channel"], format!("readings/{dev}"));
    let p = &m["payload"];
    assert_eq!(p["deviceId"], dev.as_str());
    assert_eq!(p["takenAt"], "2026-11-28T12:00:00Z");
    assert_eq!(
        p["samples"][0],
        json!({"sensor": "co2", "value": 415.0, "unit": "UNIT_PASCAL"})
    );
    assert_eq!(p["sequence"], "-42", "64-bit integers are strings");
    assert_eq!(p["labels"], json!({"zone": "a"}));
    assert_eq!(p["mains"], true);
    assert!(p.get("batteryVolts").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_payloads_name_the_field() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let mut c = Client::connect(addr).await;
    let cases = [
        (json!({"deviceId": 12}), "deviceId"),
        (
            json!({"samples": [{"sensor": "t", "value": "hot"}]}),
            "value",
        ),
        (json!({"samples": [{"unit": "UNIT_KELVIN"}]}), "unit"),
        (json!({"sequence": "not a number"}), "sequence"),
        (json!({"takenAt": "yesterday"}), "takenAt"),
        (json!({"colour": "red"}), "colour"),
        (json!({"location": {"latitude": "north"}}), "latitude"),
        (json!("a string"), "not a string"),
    ];
    for (payload, field) in cases {
        let e = c.publish("loose/d1", payload.clone()).await;
        assert_eq!(e["code"], "invalid_payload", "{payload}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "{payload}: {e}"
        );
    }
    // Original proto field names are accepted too.
    let ok = c
        .publish("loose/d1", json!({"device_id": "d1", "battery_volts": 3.3}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    gw.shutdown().await;
}

#[tokio::test]
async fn json_schema_checks_publishes() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let mut c = Client::connect(addr).await;
    let good = json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 20}]});
    assert_eq!(c.publish("readings/d1", good).await["type"], "ok");
    let cases = [
        (
            json!({"deviceId": "", "samples": [{"sensor": "t", "value": 1}]}),
            "/deviceId",
        ),
        (
            json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1e6}]}),
            "/samples/0/value",
        ),
        (json!({"deviceId": "d1", "samples": []}), "/samples"),
        (
            json!({"samples": [{"sensor": "t", "value": 1}]}),
            "deviceId",
        ),
        (
            json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1}], "mains": "yes"}),
            "/mains",
        ),
        (
            json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1}], "sequence": 1.5}),
            "/sequence",
        ),
        (
            json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1}], "extra": true}),
            "extra",
        ),
    ];
    for (payload, path) in cases {
        let e = c.publish("readings/d1", payload.clone()).await;
        assert_eq!(e["code"], "invalid_payload", "{payload}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(path) && message.contains("JSON schema"),
            "{payload}: {message}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn undecodable_broker_messages_are_reported_once_and_the_stream_goes_on() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let dev = unique("g");
    let mut watchers = Vec::new();
    for _ in 0..5 {
        let mut w = Client::connect(addr).await;
        w.subscribe(&format!("loose/{dev}")).await;
        watchers.push(w);
    }
    let mut device = Client::connect(addr).await;
    let garbage = BASE64.encode([0x0a, 0xff, 0xff, 0x01]);
    device
        .request(json!({"type": "publish", "channel": format!("raw/pb/{dev}"), "payload": garbage, "encoding": "base64"}))
        .await;
    device
        .publish(&format!("loose/{dev}"), json!({"deviceId": "after"}))
        .await;
    for w in &mut watchers {
        let status = w.next_of("status").await;
        assert_eq!(status["code"], "decode_error");
        assert_eq!(status["subscriptions"], json!([format!("loose/{dev}")]));
        assert_eq!(w.next_message().await["payload"]["deviceId"], "after");
    }
    // Decoded once per broker message, not once per subscriber.
    let metrics = http_get(addr, "/metrics").await.1;
    assert!(
        metrics.contains("wsbridge_decode_errors_total{backend=\"local\"} 1\n"),
        "{metrics}"
    );
    gw.shutdown().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn binary_client(addr: std::net::SocketAddr) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = common::ws_url(addr).into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "wsbridge.v1.protobuf".parse().unwrap(),
    );
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "wsbridge.v1.protobuf"
    );
    ws
}

async fn send_frame(ws: &mut Ws, frame: ClientFrame) {
    ws.send(Message::Binary(frame.encode_to_vec().into()))
        .await
        .unwrap();
}

async fn next_frame(ws: &mut Ws) -> server_frame::Frame {
    loop {
        let message = tokio::time::timeout(common::WAIT, ws.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .unwrap();
        if let Message::Binary(bytes) = message {
            return ServerFrame::decode(bytes).unwrap().frame.unwrap();
        }
    }
}

#[tokio::test]
async fn json_and_protobuf_clients_share_a_channel() {
    let gw = start(&config()).await;
    let addr = gw.local_addr();
    let dev = unique("s");
    let channel = format!("loose/{dev}");
    let mut web = Client::connect(addr).await;
    web.subscribe(&channel).await;
    let mut bin = binary_client(addr).await;
    send_frame(
        &mut bin,
        ClientFrame {
            id: "1".into(),
            request: Some(client_frame::Request::Subscribe(envelope::Subscribe {
                channel: channel.clone(),
                from: None,
            })),
        },
    )
    .await;
    assert!(matches!(next_frame(&mut bin).await, server_frame::Frame::Ok(ok) if ok.id == "1"));

    // Published as JSON: the browser sees JSON, the binary client the broker's protobuf bytes.
    web.publish(&channel, json!({"deviceId": "from-json", "sequence": "7"}))
        .await;
    assert_eq!(web.next_message().await["payload"]["deviceId"], "from-json");
    let server_frame::Frame::Message(m) = next_frame(&mut bin).await else {
        panic!("expected a message")
    };
    assert_eq!(m.channel, channel);
    let text = String::from_utf8(protoc(&["--decode=iot.v1.Reading"], &m.payload)).unwrap();
    assert!(
        text.contains("device_id: \"from-json\"") && text.contains("sequence: 7"),
        "{text}"
    );

    // Published as raw protobuf bytes from the binary client: both receive it.
    let bytes = protoc(&["--encode=iot.v1.Reading"], b"device_id: \"from-binary\"");
    send_frame(
        &mut bin,
        ClientFrame {
            id: "2".into(),
            request: Some(client_frame::Request::Publish(envelope::Publish {
                channel: channel.clone(),
                payload: bytes.clone().into(),
                ..Default::default()
            })),
        },
    )
    .await;
    let mut got_ok = false;
    let mut got_message = false;
    while !(got_ok && got_message) {
        match next_frame(&mut bin).await {
            server_frame::Frame::Ok(ok) if ok.id == "2" => got_ok = true,
            server_frame::Frame::Message(m) => {
                assert_eq!(&m.payload[..], &bytes[..], "untouched broker bytes");
                got_message = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        web.next_message().await["payload"]["deviceId"],
        "from-binary"
    );

    // Bad input on the binary protocol gets a binary error frame; the connection stays usable.
    bin.send(Message::Binary(vec![0xff, 0xff].into()))
        .await
        .unwrap();
    assert!(
        matches!(next_frame(&mut bin).await, server_frame::Frame::Error(e) if e.code == "invalid_frame" && e.id.is_none())
    );
    bin.send(Message::Text("{}".into())).await.unwrap();
    assert!(
        matches!(next_frame(&mut bin).await, server_frame::Frame::Error(e) if e.code == "unsupported_frame")
    );
    send_frame(
        &mut bin,
        ClientFrame {
            id: "3".into(),
            request: Some(client_frame::Request::Publish(envelope::Publish {
                channel: channel.clone(),
                payload: vec![0x0a, 0xff].into(),
                ..Default::default()
            })),
        },
    )
    .await;
    assert!(
        matches!(next_frame(&mut bin).await, server_frame::Frame::Error(e) if e.code == "invalid_payload" && e.id.as_deref() == Some("3"))
    );
    send_frame(
        &mut bin,
        ClientFrame {
            id: "4".into(),
            request: Some(client_frame::Request::Ping(envelope::Ping {})),
        },
    )
    .await;
    assert!(matches!(next_frame(&mut bin).await, server_frame::Frame::Pong(p) if p.id == "4"));
    gw.shutdown().await;
}

#[test]
fn bad_schema_configuration_is_reported_with_file_line_and_route() {
    let dir = std::env::temp_dir().join(unique("protos"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("broken.proto"),
        "syntax = \"proto3\";\npackage x;\nmessage A {\n  int32 a = 1\n}\n",
    )
    .unwrap();
    let text = format!(
        r##"
schemas = ["{}"]
[backends.local]
type = "memory"
[[routes]]
channel = "a/{{x}}"
backend = "local"
topic = "a/{{x}}"
format = "protobuf:iot.v1.Missing"
allow = ["subscribe"]
[[routes]]
channel = "b/{{x}}"
backend = "local"
topic = "b/{{x}}"
format = "yaml"
allow = ["subscribe"]
"##,
        dir.display()
    );
    let problems: Vec<String> = wsbridge::Config::from_toml(&text)
        .unwrap_err()
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("schemas: ") && p.contains("broken.proto:5:1: expected")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("routes[0].format: unknown message type \"iot.v1.Missing\"")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("routes[1].format: unknown format \"yaml\"")),
        "{problems:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Protobuf on a real broker: an MQTT route and an AMQP route, with raw (`binary`) routes onto the
/// same broker topics so the bytes the broker carries can be checked.
fn broker_config(prefix: &str) -> String {
    let dir = schemas_dir();
    format!(
        r##"
schemas = ["{dir}"]

[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:{mqtt}"

[backends.rabbit]
type = "amqp"
url = "{amqp}"

[[routes]]
channel = "mqtt/readings/{{dev}}"
backend = "plant"
topic = "{prefix}/pb/{{dev}}"
format = "protobuf:iot.v1.Reading"
allow = ["subscribe", "publish"]

[[routes]]
channel = "mqtt/raw/#"
backend = "plant"
topic = "{prefix}/#"
format = "binary"
allow = ["subscribe", "publish"]

[[routes]]
channel = "amqp/readings/{{dev}}"
backend = "rabbit"
exchange = "amq.topic"
topic = "{prefix}.pb.{{dev}}"
format = "protobuf:iot.v1.Reading"
allow = ["subscribe", "publish"]

[[routes]]
channel = "amqp/raw/#"
backend = "rabbit"
exchange = "amq.topic"
topic = "{prefix}.#"
format = "binary"
allow = ["subscribe", "publish"]
"##,
        mqtt = mqtt_support::SHARED_PORT,
        amqp = amqp_support::URL,
    )
}

async fn round_trip_through(
    broker: &str,
    device_publish: impl AsyncFnOnce(Client, String, Vec<u8>),
) {
    let prefix = unique("pbrt");
    let gw = start(&broker_config(&prefix)).await;
    common::eventually("both brokers are connected", async || gw.hub().is_ready()).await;
    let addr = gw.local_addr();

    // Browser -> broker: JSON in, protobuf bytes on the broker, decoded by protoc.
    let mut raw = Client::connect(addr).await;
    raw.subscribe(&format!("{broker}/raw/pb/d1")).await;
    let mut web = Client::connect(addr).await;
    let payload: Value = serde_json::from_str(FULL_READING).unwrap();
    let ok = web.publish(&format!("{broker}/readings/d1"), payload).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let m = raw.next_message().await;
    let bytes = BASE64.decode(m["payload"].as_str().unwrap()).unwrap();
    let text = String::from_utf8(protoc(&["--decode=iot.v1.Reading"], &bytes)).unwrap();
    for expected in [
        "device_id: \"d1\"",
        "unit: UNIT_CELSIUS",
        "sequence: 9007199254740993",
        "key: \"room\"",
        "battery_volts: 3.7",
        "nanos: 250000000",
    ] {
        assert!(
            text.contains(expected),
            "{broker}: missing {expected:?} in:\n{text}"
        );
    }

    // Device -> browser: protoc-encoded bytes published on the broker arrive as proto3 JSON.
    web.subscribe(&format!("{broker}/readings/d2")).await;
    let device_text = r#"device_id: "d2" taken_at { seconds: 1795867200 } samples { sensor: "t" value: -3.5 unit: UNIT_CELSIUS } sequence: 12 labels { key: "k" value: "v" } battery_volts: 3.1"#;
    let bytes = protoc(&["--encode=iot.v1.Reading"], device_text.as_bytes());
    device_publish(raw, prefix, bytes).await;
    let m = web.next_message().await;
    assert_eq!(m["channel"], format!("{broker}/readings/d2"));
    assert_eq!(
        m["payload"],
        json!({
            "deviceId": "d2",
            "takenAt": "2026-11-28T12:00:00Z",
            "samples": [{"sensor": "t", "value": -3.5, "unit": "UNIT_CELSIUS"}],
            "sequence": "12",
            "labels": {"k": "v"},
            "batteryVolts": 3.1
        }),
        "{broker}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn protobuf_round_trips_through_mosquitto() {
    round_trip_through("mqtt", async |_raw, prefix, bytes| {
        // An independent MQTT client publishes the device's bytes.
        let file = std::env::temp_dir().join(unique("reading-"));
        std::fs::write(&file, &bytes).unwrap();
        let topic = format!("{prefix}/pb/d2");
        let path = file.to_str().unwrap().to_owned();
        mqtt_support::mosquitto_pub(
            mqtt_support::SHARED_PORT,
            &["-q", "1", "-t", &topic, "-f", &path],
        )
        .await;
        let _ = std::fs::remove_file(&file);
    })
    .await;
}

#[tokio::test]
async fn protobuf_round_trips_through_rabbitmq() {
    round_trip_through("amqp", async |mut raw, _prefix, bytes| {
        // The device's bytes enter RabbitMQ untouched through a `binary` route.
        let ok = raw
            .request(json!({"type": "publish", "channel": "amqp/raw/pb/d2", "payload": BASE64.encode(&bytes), "encoding": "base64"}))
            .await;
        assert_eq!(ok["type"], "ok", "{ok}");
    })
    .await;
}

/// The broker-side input matrix for `protobuf:` routes, published by each broker's own client:
/// each case has its documented outcome and a good message right after still arrives.
async fn protobuf_matrix(broker: &str, publish: impl AsyncFn(&str, &[u8])) {
    let prefix = unique("pbm");
    let gw = start(&broker_config(&prefix)).await;
    common::eventually("both brokers are connected", async || gw.hub().is_ready()).await;
    let mut web = Client::connect(gw.local_addr()).await;
    web.subscribe(&format!("{broker}/readings/m")).await;
    // device_id = "good<n>"
    let good = |n: usize| {
        let id = format!("good{n}");
        let mut bytes = vec![0x0a, id.len() as u8];
        bytes.extend_from_slice(id.as_bytes());
        bytes
    };
    let cases: [(&str, Vec<u8>, Option<Value>); 5] = [
        ("malformed bytes", vec![0x0a, 0xff, 0xff, 0x01], None),
        (
            "invalid UTF-8 in a string field",
            vec![0x0a, 0x01, 0xff],
            None,
        ),
        (
            "an unknown field (number 99) beside a known one",
            vec![0x98, 0x06, 0x01, 0x0a, 0x01, b'u'],
            Some(json!({"deviceId": "u"})),
        ),
        (
            "an empty payload (every field at its default)",
            Vec::new(),
            Some(json!({})),
        ),
        (
            "a truncated length-delimited field",
            vec![0x0a, 0x05, b'a'],
            None,
        ),
    ];
    for (n, (name, bytes, expected)) in cases.iter().enumerate() {
        publish(&prefix, bytes).await;
        publish(&prefix, &good(n)).await;
        match expected {
            Some(payload) => {
                let m = web.next_message().await;
                assert_eq!(&m["payload"], payload, "{broker}, {name}: {m}");
            }
            None => {
                let status = web.next_of("status").await;
                assert_eq!(status["code"], "decode_error", "{broker}, {name}: {status}");
            }
        }
        let m = web.next_message().await;
        assert_eq!(
            m["payload"],
            json!({"deviceId": format!("good{n}")}),
            "{broker}, after {name}"
        );
    }
    let metrics = http_get(gw.local_addr(), "/metrics").await.1;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_protobuf_from_mosquitto_has_its_documented_outcome() {
    protobuf_matrix("mqtt", async |prefix: &str, bytes: &[u8]| {
        let topic = format!("{prefix}/pb/m");
        mqtt_support::mosquitto_pub_bytes(mqtt_support::SHARED_PORT, &topic, bytes, &[]).await;
    })
    .await;
}

#[tokio::test]
async fn bad_protobuf_from_rabbitmq_has_its_documented_outcome() {
    protobuf_matrix("amqp", async |prefix: &str, bytes: &[u8]| {
        let key = format!("{prefix}.pb.m");
        amqp_support::pika_publish_bytes("amq.topic", &key, bytes, json!({})).await;
    })
    .await;
}
