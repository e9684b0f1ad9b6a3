//! OpenTelemetry: publish and delivery spans reach an OTLP/HTTP receiver run by the test, and a
//! W3C `traceparent` travels from a client publish into MQTT 5 user properties, AMQP headers and
//! Kafka headers, and from a broker message into the `message` frame. The gateway sends its last
//! spans when it shuts down, so each test reads the receiver after `shutdown` returns.

mod amqp_support;
mod common;
mod kafka_support;
mod mqtt_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use amqp_support::{PikaConsumer, start_connected};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{Client, WAIT, start, unique};
use kafka_support::{brokers, create_topic, py_consume};
use mqtt_support::{MosquittoSub, SHARED_PORT, mosquitto_pub, ready};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::{Value, json};

/// A span as the receiver got it, ids in hex.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    service: String,
}

/// An OTLP/HTTP (protobuf) trace receiver on a free loopback port.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

async fn traces(State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf trace request");
    let mut received = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
    spans.lock().unwrap().extend(received);
    // An empty ExportTraceServiceResponse encodes to no bytes.
    Vec::new()
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, spans, task }
    }

    /// The `[telemetry]` table pointing at this receiver.
    fn config(&self, ratio: f64) -> String {
        format!(
            "\n[telemetry]\notlp_endpoint = \"http://{}\"\nsample_ratio = {ratio:?}\nservice_name = \"wsbridge-test\"\n",
            self.addr
        )
    }

    fn spans(&self, name: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client's `traceparent` with a fresh trace id and span id (sampled flag set).
fn client_traceparent() -> (String, String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = unique("");
    let seed: u64 = id.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let trace = format!("{:032x}", nanos ^ u128::from(seed));
    let span = format!("{:016x}", seed | 1);
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// The parts of a `traceparent`: trace id, parent span id, flags.
fn parts(traceparent: &str) -> (String, String, String) {
    let f: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(f.len(), 4, "a traceparent: {traceparent:?}");
    assert_eq!(f[0], "00", "{traceparent:?}");
    (f[1].to_owned(), f[2].to_owned(), f[3].to_owned())
}

/// The value of `key` in `mosquitto_sub`'s `%P` output (`k:v k:v`).
fn user_property(properties: &str, key: &str) -> Option<String> {
    properties
        .split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}:")))
        .map(str::to_owned)
}

fn mqtt_config(prefix: &str, telemetry: &str) -> String {
    format!(
        r#"
[limits]
publish_per_second = 0

[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"

[[routes]]
channel = "sensors/{{site}}/#"
backend = "plant"
topic = "{prefix}/plant/{{site}}/#"
allow = ["subscribe", "publish"]
qos = 1
{telemetry}"#
    )
}

async fn mqtt_gateway(prefix: &str, telemetry: &str) -> wsbridge::Gateway {
    let gw = start(&mqtt_config(prefix, telemetry)).await;
    ready(&gw).await;
    gw
}

async fn http_publish(addr: SocketAddr, body: Value) -> (u16, Value) {
    let response = tokio::time::timeout(
        WAIT,
        reqwest::Client::new()
            .post(format!("http://{addr}/publish"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send(),
    )
    .await
    .expect("/publish answers in time")
    .expect("/publish request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("/publish body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The publish span in `trace`: one, with the attributes the gateway sets.
fn publish_span(receiver: &Receiver, trace: &str) -> ReceivedSpan {
    let spans: Vec<_> = receiver
        .spans("publish")
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .collect();
    assert_eq!(
        spans.len(),
        1,
        "one publish span in trace {trace}: {:#?}",
        receiver.all()
    );
    spans[0].clone()
}

#[tokio::test]
async fn mqtt_publishes_are_traced_and_carry_the_traceparent_to_the_broker() {
    let prefix = unique("wsbotel");
    let receiver = Receiver::start().await;
    let gw = mqtt_gateway(&prefix, &receiver.config(1.0)).await;
    let mut sub = MosquittoSub::start(SHARED_PORT, &format!("{prefix}/#")).await;

    // Over WebSocket.
    let (traceparent, trace, client_span) = client_traceparent();
    let mut ws = Client::connect(gw.local_addr()).await;
    let reply = ws
        .request(json!({
            "type": "publish", "channel": "sensors/berlin/temp", "payload": 21.5,
            "headers": {"traceparent": traceparent, "tenant": "acme"},
        }))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = sub.next().await;
    assert_eq!(got.topic, format!("{prefix}/plant/berlin/temp"));
    assert_eq!(
        user_property(&got.user_properties, "tenant").as_deref(),
        Some("acme")
    );
    let carried = user_property(&got.user_properties, "traceparent")
        .unwrap_or_else(|| panic!("a traceparent user property: {:?}", got.user_properties));
    let (carried_trace, ws_span, flags) = parts(&carried);
    assert_eq!(carried_trace, trace, "the client's trace goes on");
    assert_ne!(
        ws_span, client_span,
        "the broker message names the gateway's span"
    );
    assert_eq!(flags, "01");

    // Over POST /publish.
    let (traceparent, http_trace, http_client_span) = client_traceparent();
    let (status, body) = http_publish(
        gw.local_addr(),
        json!({"channel": "sensors/paris/temp", "payload": 19, "headers": {"traceparent": traceparent}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = sub.next().await;
    assert_eq!(got.topic, format!("{prefix}/plant/paris/temp"));
    let carried = user_property(&got.user_properties, "traceparent").expect("a traceparent");
    let (carried_trace, http_span, _) = parts(&carried);
    assert_eq!(carried_trace, http_trace);

    // A publish without a traceparent starts a trace of its own and carries none it did not get
    // (the broker message names the gateway's span).
    let reply = ws.publish("sensors/rome/temp", json!(25)).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = sub.next().await;
    let own = user_property(&got.user_properties, "traceparent").expect("a traceparent");
    let (own_trace, own_span, _) = parts(&own);

    gw.shutdown().await;

    let span = publish_span(&receiver, &trace);
    assert_eq!(
        span.parent_span_id, client_span,
        "a child of the client's span"
    );
    assert_eq!(span.span_id, ws_span);
    assert_eq!(span.attributes["wsbridge.backend"], "plant");
    assert_eq!(span.attributes["wsbridge.route"], "sensors/{site}/#");
    assert_eq!(span.attributes["wsbridge.result"], "ok");
    assert_eq!(span.service, "wsbridge-test");

    let span = publish_span(&receiver, &http_trace);
    assert_eq!(span.parent_span_id, http_client_span);
    assert_eq!(span.span_id, http_span);
    assert_eq!(span.attributes["wsbridge.result"], "ok");

    let span = publish_span(&receiver, &own_trace);
    assert_eq!(span.parent_span_id, "", "a root span");
    assert_eq!(span.span_id, own_span);
}

#[tokio::test]
async fn broker_traceparents_reach_websocket_clients_and_deliveries_are_traced() {
    let prefix = unique("wsbotel");
    let receiver = Receiver::start().await;
    let gw = mqtt_gateway(&prefix, &receiver.config(1.0)).await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;

    let (traceparent, trace, producer_span) = client_traceparent();
    let property = ["publish", "user-property", "traceparent", &traceparent];
    let topic = format!("{prefix}/plant/berlin/temp");
    let args = [
        &["-V", "mqttv5", "-q", "1", "-t", &topic, "-m", "21.5", "-D"][..],
        &property[..],
    ]
    .concat();
    mosquitto_pub(SHARED_PORT, &args).await;
    let m = ws.next_message().await;
    assert_eq!(m["channel"], "sensors/berlin/temp");
    assert_eq!(m["headers"]["traceparent"], traceparent.as_str(), "{m}");

    gw.shutdown().await;

    let deliveries: Vec<_> = receiver
        .spans("deliver")
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .collect();
    assert_eq!(deliveries.len(), 1, "{:#?}", receiver.all());
    assert_eq!(deliveries[0].parent_span_id, producer_span);
    assert_eq!(deliveries[0].attributes["wsbridge.backend"], "plant");
    assert_eq!(
        deliveries[0].attributes["messaging.destination.name"],
        topic
    );
}

#[tokio::test]
async fn a_ratio_of_zero_exports_nothing_and_leaves_the_clients_traceparent() {
    let prefix = unique("wsbotel");
    let receiver = Receiver::start().await;
    let gw = mqtt_gateway(&prefix, &receiver.config(0.0)).await;
    let mut sub = MosquittoSub::start(SHARED_PORT, &format!("{prefix}/#")).await;
    let mut ws = Client::connect(gw.local_addr()).await;
    ws.subscribe("sensors/berlin/#").await;

    let (traceparent, _, _) = client_traceparent();
    let reply = ws
        .request(json!({
            "type": "publish", "channel": "sensors/berlin/temp", "payload": 1,
            "headers": {"traceparent": traceparent},
        }))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = sub.next().await;
    assert_eq!(
        user_property(&got.user_properties, "traceparent").as_deref(),
        Some(traceparent.as_str()),
        "not sampled: the client's traceparent, unchanged"
    );
    // The same message comes back through the gateway's subscription: a delivery, not traced.
    let m = ws.next_message().await;
    assert_eq!(m["headers"]["traceparent"], traceparent.as_str(), "{m}");

    gw.shutdown().await;
    assert!(receiver.all().is_empty(), "{:#?}", receiver.all());
}

#[tokio::test]
async fn amqp_publishes_carry_the_traceparent_in_their_headers() {
    let exchange = unique("wsb.otel.");
    let receiver = Receiver::start().await;
    let gw = start_connected(&format!(
        r#"
[backends.rabbit]
type = "amqp"
url = "{url}"

[[backends.rabbit.exchanges]]
name = "{exchange}"
type = "topic"
durable = false

[[routes]]
channel = "orders/{{region}}/#"
backend = "rabbit"
exchange = "{exchange}"
topic = "orders.{{region}}.#"
allow = ["subscribe", "publish"]
{telemetry}"#,
        url = amqp_support::URL,
        telemetry = receiver.config(1.0),
    ))
    .await;
    let mut consumer = PikaConsumer::start(&exchange, "orders.#", 1).await;
    let mut client = Client::connect(gw.local_addr()).await;

    let (traceparent, trace, client_span) = client_traceparent();
    let reply = client
        .request(json!({
            "type": "publish", "channel": "orders/eu/7", "payload": {"id": 7},
            "headers": {"traceparent": traceparent},
        }))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = consumer.next().await;
    let carried = got["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent header: {got}"));
    let (carried_trace, span_id, _) = parts(carried);
    assert_eq!(carried_trace, trace);

    gw.shutdown().await;
    let span = publish_span(&receiver, &trace);
    assert_eq!(span.parent_span_id, client_span);
    assert_eq!(span.span_id, span_id);
    assert_eq!(span.attributes["wsbridge.backend"], "rabbit");
    assert_eq!(span.attributes["wsbridge.route"], "orders/{region}/#");
}

#[tokio::test]
async fn kafka_publishes_carry_the_traceparent_in_their_headers() {
    let topic = unique("wsb-otel-");
    create_topic(&topic, 1).await;
    let receiver = Receiver::start().await;
    let gw = start(&format!(
        r#"
[backends.events]
type = "kafka"
brokers = "{brokers}"

[[routes]]
channel = "events/{{name}}"
backend = "events"
topic = "{{name}}"
allow = ["subscribe", "publish"]
{telemetry}"#,
        brokers = brokers(),
        telemetry = receiver.config(1.0),
    ))
    .await;
    let mut client = Client::connect(gw.local_addr()).await;

    let (traceparent, trace, client_span) = client_traceparent();
    let reply = client
        .request(json!({
            "type": "publish", "channel": format!("events/{topic}"), "payload": {"n": 1},
            "headers": {"traceparent": traceparent},
        }))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let offset = reply["position"]["offset"].as_i64().expect("an offset");
    let read = py_consume(&topic, 0, offset, 1).await;
    let carried = read[0]["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent header: {read:?}"));
    let (carried_trace, span_id, _) = parts(carried);
    assert_eq!(carried_trace, trace);

    gw.shutdown().await;
    let span = publish_span(&receiver, &trace);
    assert_eq!(span.parent_span_id, client_span);
    assert_eq!(span.span_id, span_id);
    assert_eq!(span.attributes["wsbridge.backend"], "events");
    assert_eq!(span.attributes["wsbridge.result"], "ok");
}
