//! The AMQP backend against the real RabbitMQ on 127.0.0.1:5672, cross-checked with independent
//! clients (pika, amqp-publish, rabbitmqctl). Every test declares its own exchanges and queues.

mod amqp_support;
mod common;

use amqp_support::{
    PikaConsumer, PrivateRabbit, URL, amqp_publish, binding_keys, close_connections,
    delete_exchange, delete_queue, pika_get, pika_publish, pika_publish_bytes, start_connected,
};
use common::{Client, eventually, http_get, unique};
use serde_json::json;

/// A backend named `backend` with a transient topic exchange `exchange` and the issue's route.
fn config(backend: &str, exchange: &str, extra: &str) -> String {
    format!(
        r##"
[backends.{backend}]
type = "amqp"
url = "{URL}"
reconnect_initial = "1s"

[[backends.{backend}.exchanges]]
name = "{exchange}"
type = "topic"
durable = false

[[routes]]
channel = "orders/{{region}}/#"
backend = "{backend}"
exchange = "{exchange}"
topic = "orders.{{region}}.#"
allow = ["subscribe", "publish"]
{extra}
"##
    )
}

#[tokio::test]
async fn broker_messages_reach_websocket_subscribers_with_their_properties() {
    let exchange = unique("wsb.props.");
    let gw = start_connected(&config("rabbit", &exchange, "")).await;
    let mut sub = Client::connect(gw.local_addr()).await;
    sub.subscribe("orders/eu/#").await;

    pika_publish(
        &exchange,
        "orders.eu.17.created",
        r#"{"id":17}"#,
        json!({
            "headers": {"trace": "abc", "attempt": 2, "urgent": true},
            "content_type": "application/json",
            "message_id": "m-17",
            "correlation_id": "c-17",
            "timestamp": 1_700_000_000,
        }),
    )
    .await;
    let m = sub.next_message().await;
    assert_eq!(m["channel"], "orders/eu/17/created");
    assert_eq!(m["subscription"], "orders/eu/#");
    assert_eq!(m["payload"], json!({"id": 17}));
    assert_eq!(
        m["headers"],
        json!({"trace": "abc", "attempt": "2", "urgent": "true"})
    );
    assert_eq!(m["content_type"], "application/json");
    assert_eq!(m["message_id"], "m-17");
    assert_eq!(m["correlation_id"], "c-17");
    assert_eq!(m["timestamp"], 1_700_000_000_000i64);

    // Another client, another region: not for this subscription.
    amqp_publish(&exchange, "orders.us.1", "\"x\"", &[("k", "v")]).await;
    amqp_publish(
        &exchange,
        "orders.eu.2",
        "plain text",
        &[("source", "amqp-tools")],
    )
    .await;
    let m = sub.next_message().await;
    assert_eq!(m["channel"], "orders/eu/2");
    assert_eq!(m["payload"], "plain text");
    assert_eq!(m["headers"]["source"], "amqp-tools");
    sub.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_publishes_reach_an_independent_consumer() {
    let exchange = unique("wsb.pub.");
    let gw = start_connected(&config("rabbit", &exchange, "")).await;
    let mut consumer = PikaConsumer::start(&exchange, "orders.#", 2).await;
    let mut client = Client::connect(gw.local_addr()).await;

    let reply = client
        .request(json!({
            "type": "publish",
            "channel": "orders/eu/7",
            "payload": {"id": 7},
            "headers": {"trace": "xyz", "tenant": "acme"},
        }))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let got = consumer.next().await;
    assert_eq!(got["exchange"], exchange);
    assert_eq!(got["routing_key"], "orders.eu.7");
    assert_eq!(got["body"], r#"{"id":7}"#);
    assert_eq!(got["headers"], json!({"trace": "xyz", "tenant": "acme"}));
    assert_eq!(got["delivery_mode"], 2, "published persistent");
    assert!(got["timestamp"].is_u64());

    // A channel level cannot inject a wildcard or separator into the routing key.
    let reply = client.publish("orders/e.u/7", json!(1)).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "invalid_channel", "{reply}");
    let reply = client.publish("orders/eu/8", json!(8)).await;
    assert_eq!(reply["type"], "ok");
    assert_eq!(consumer.next().await["routing_key"], "orders.eu.8");
    gw.shutdown().await;
}

#[tokio::test]
async fn wildcards_bind_once_per_pattern_and_the_last_socket_unbinds() {
    let exchange = unique("wsb.wild.");
    let gw = start_connected(&config("rabbit", &exchange, "")).await;
    let addr = gw.local_addr();
    let mut new_anywhere = Client::connect(addr).await;
    let mut all_eu = Client::connect(addr).await;
    new_anywhere.subscribe("orders/+/new").await;
    all_eu.subscribe("orders/eu/#").await;
    let mut us = Vec::new();
    for _ in 0..5 {
        let mut c = Client::connect(addr).await;
        c.subscribe("orders/us/#").await;
        us.push(c);
    }
    assert_eq!(gw.hub().upstream_counts(), vec![("rabbit".to_string(), 3)]);
    assert_eq!(
        binding_keys(&exchange).await,
        vec!["orders.*.new", "orders.eu.#", "orders.us.#"]
    );

    let mut publisher = Client::connect(addr).await;
    for channel in [
        "orders/eu/new",
        "orders/us/new",
        "orders/eu/x/y",
        "orders/asia",
    ] {
        let reply = publisher.publish(channel, json!(channel)).await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    // One queue, several matching bindings: each subscription still gets a message once.
    assert_eq!(
        new_anywhere.next_message().await["channel"],
        "orders/eu/new"
    );
    assert_eq!(
        new_anywhere.next_message().await["channel"],
        "orders/us/new"
    );
    assert_eq!(all_eu.next_message().await["channel"], "orders/eu/new");
    assert_eq!(all_eu.next_message().await["channel"], "orders/eu/x/y");
    for c in &mut us {
        assert_eq!(c.next_message().await["channel"], "orders/us/new");
    }
    new_anywhere.assert_no_message().await;
    all_eu.assert_no_message().await;
    for c in &mut us {
        c.assert_no_message().await;
    }

    // Four of five leave: the binding stays for the last one.
    us.truncate(1);
    eventually("four sockets have left", async || {
        gw.hub().sessions_per_upstream().contains(&1)
            && !gw.hub().sessions_per_upstream().contains(&5)
    })
    .await;
    assert!(
        binding_keys(&exchange)
            .await
            .contains(&"orders.us.#".into())
    );
    let reply = us[0]
        .request(json!({"type": "unsubscribe", "channel": "orders/us/#"}))
        .await;
    assert_eq!(reply["type"], "ok");
    assert_eq!(gw.hub().upstream_counts(), vec![("rabbit".to_string(), 2)]);
    assert_eq!(
        binding_keys(&exchange).await,
        vec!["orders.*.new", "orders.eu.#"]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn publish_failures_are_reported_and_the_next_publish_works() {
    let exchange = unique("wsb.fail.");
    let doomed = unique("wsb.doomed.");
    let extra = format!(
        r##"
[[routes]]
channel = "doomed/#"
backend = "rabbit"
exchange = "{doomed}"
topic = "doomed.#"
allow = ["publish"]

[[routes]]
channel = "missing/#"
backend = "rabbit"
exchange = "{exchange}.missing"
topic = "missing.#"
allow = ["subscribe"]

[[routes]]
channel = "strict/#"
backend = "rabbit"
exchange = "{exchange}"
topic = "strict.#"
mandatory = true
allow = ["publish"]
"##
    );
    let text = config("rabbit", &exchange, &extra).replace(
        "durable = false\n",
        &format!("durable = false\n\n[[backends.rabbit.exchanges]]\nname = \"{doomed}\"\ndurable = false\n"),
    );
    let gw = start_connected(&text).await;
    let mut client = Client::connect(gw.local_addr()).await;
    assert_eq!(client.publish("doomed/a", json!(1)).await["type"], "ok");

    delete_exchange(&doomed).await;
    let reply = client.publish("doomed/a", json!(2)).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "not_found", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains(&doomed),
        "{reply}"
    );
    let reply = client.publish("orders/eu/1", json!(3)).await;
    assert_eq!(reply["type"], "ok", "the publish channel recovers: {reply}");

    // Mandatory: nobody is bound for strict.*, so the broker returns the message.
    let reply = client.publish("strict/x", json!(4)).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unroutable", "{reply}");
    let mut consumer = PikaConsumer::start(&exchange, "strict.#", 1).await;
    let reply = client.publish("strict/x", json!(5)).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(consumer.next().await["body"], "5");

    // A binding to an exchange that does not exist fails alone; the next subscription works.
    let reply = client
        .request(json!({"type": "subscribe", "channel": "missing/a"}))
        .await;
    assert_eq!(reply["code"], "not_found", "{reply}");
    client.subscribe("orders/eu/#").await;
    pika_publish(&exchange, "orders.eu.9", "9", json!({})).await;
    assert_eq!(client.next_message().await["payload"], 9);

    // What AMQP cannot do is refused with a clear error.
    let reply = client
        .request(json!({"type": "publish", "channel": "orders/eu/1", "payload": 1, "partition": 1}))
        .await;
    assert_eq!(reply["code"], "unsupported", "{reply}");
    gw.shutdown().await;
}

#[tokio::test]
async fn subscriptions_survive_a_closed_connection() {
    let backend = unique("rabbit");
    let exchange = unique("wsb.fault.");
    let gw = start_connected(&config(&backend, &exchange, "")).await;
    let addr = gw.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.subscribe("orders/eu/#").await;
    let mut publisher = Client::connect(addr).await;
    assert_eq!(
        publisher.publish("orders/eu/1", json!(1)).await["type"],
        "ok"
    );
    assert_eq!(sub.next_message().await["payload"], 1);

    assert_eq!(
        close_connections(&backend).await,
        1,
        "one connection carries this gateway's name"
    );
    let down = sub.next_of("status").await;
    assert_eq!(down["code"], "backend_down", "{down}");
    assert_eq!(down["backend"], backend.as_str());
    assert_eq!(down["subscriptions"], json!(["orders/eu/#"]));
    let up = sub.next_of("status").await;
    assert_eq!(up["code"], "backend_up", "{up}");
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // The same socket receives again without resubscribing, from the broker and the gateway.
    pika_publish(&exchange, "orders.eu.2", "2", json!({})).await;
    assert_eq!(sub.next_message().await["channel"], "orders/eu/2");
    assert_eq!(
        publisher.publish("orders/eu/3", json!(3)).await["type"],
        "ok"
    );
    assert_eq!(sub.next_message().await["payload"], 3);
    assert_eq!(binding_keys(&exchange).await, vec!["orders.eu.#"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_the_connection() {
    let backend = unique("rabbit");
    let exchange = unique("wsb.ready.");
    let text = config(&backend, &exchange, "")
        .replace("reconnect_initial = \"1s\"", "reconnect_initial = \"3s\"");
    let gw = start_connected(&text).await;
    let addr = gw.local_addr();
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(close_connections(&backend).await, 1);
    eventually("/readyz reports the backend down", async || {
        http_get(addr, "/readyz").await.0 == 503
    })
    .await;
    let mut client = Client::connect(addr).await;
    let reply = client
        .request(json!({"type": "subscribe", "channel": "orders/eu/#"}))
        .await;
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");
    eventually("/readyz reports the backend up again", async || {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    client.subscribe("orders/eu/#").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn direct_exchanges_refuse_wildcards_and_fanout_exchanges_filter_locally() {
    let exchange = unique("wsb.topic.");
    let direct = unique("wsb.direct.");
    let fanout = unique("wsb.fanout.");
    let extra = format!(
        r##"
[[routes]]
channel = "direct/{{id}}"
backend = "rabbit"
exchange = "{direct}"
topic = "cmd.{{id}}"
allow = ["subscribe", "publish"]

[[routes]]
channel = "news/#"
backend = "rabbit"
exchange = "{fanout}"
topic = "news.#"
allow = ["subscribe", "publish"]
"##
    );
    let text = config("rabbit", &exchange, &extra).replace(
        "durable = false\n",
        &format!(
            "durable = false\n\n[[backends.rabbit.exchanges]]\nname = \"{direct}\"\ntype = \"direct\"\ndurable = false\n\n[[backends.rabbit.exchanges]]\nname = \"{fanout}\"\ntype = \"fanout\"\ndurable = false\n"
        ),
    );
    let gw = start_connected(&text).await;
    let addr = gw.local_addr();
    let mut client = Client::connect(addr).await;

    let reply = client
        .request(json!({"type": "subscribe", "channel": "direct/+"}))
        .await;
    assert_eq!(reply["code"], "unsupported_pattern", "{reply}");
    client.subscribe("direct/a").await;
    assert_eq!(binding_keys(&direct).await, vec!["cmd.a"]);
    pika_publish(&direct, "cmd.b", "\"b\"", json!({})).await;
    pika_publish(&direct, "cmd.a", "\"a\"", json!({})).await;
    let m = client.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["payload"].as_str()),
        (Some("direct/a"), Some("a"))
    );

    // Fanout: one binding whatever the patterns; the gateway filters by routing key.
    let mut sports = Client::connect(addr).await;
    let mut all = Client::connect(addr).await;
    sports.subscribe("news/sports/#").await;
    all.subscribe("news/#").await;
    assert_eq!(binding_keys(&fanout).await, vec![""]);
    pika_publish(&fanout, "news.weather", "1", json!({})).await;
    pika_publish(&fanout, "news.sports.tennis", "2", json!({})).await;
    assert_eq!(all.next_message().await["channel"], "news/weather");
    assert_eq!(all.next_message().await["channel"], "news/sports/tennis");
    assert_eq!(sports.next_message().await["channel"], "news/sports/tennis");
    sports.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn work_queue_routes_share_a_durable_queue() {
    let exchange = unique("wsb.work.");
    let queue = unique("wsb.jobs.");
    let extra = format!(
        r##"
[[routes]]
channel = "jobs/{{kind}}"
backend = "rabbit"
exchange = "{exchange}"
queue = "{queue}"
topic = "jobs.{{kind}}"
allow = ["subscribe", "publish"]
"##
    );
    let gw = start_connected(&config("rabbit", &exchange, &extra)).await;
    let addr = gw.local_addr();
    // The gateway declared the queue and bound it with the route's widest key.
    assert_eq!(binding_keys(&exchange).await, vec!["jobs.*"]);

    // Nobody consumes yet: a published command waits in the queue for any consumer.
    let mut client = Client::connect(addr).await;
    assert_eq!(
        client.publish("jobs/resize", json!({"w": 1})).await["type"],
        "ok"
    );
    let waiting = pika_get(&queue).await;
    assert_eq!(waiting["routing_key"], "jobs.resize");
    assert_eq!(waiting["body"], r#"{"w":1}"#);

    // Subscribing makes the gateway one of the queue's competing consumers, for the whole route.
    let mut worker = Client::connect(addr).await;
    let reply = worker
        .request(json!({"type": "subscribe", "channel": "jobs/resize"}))
        .await;
    assert_eq!(reply["code"], "unsupported_pattern", "{reply}");
    worker.subscribe("jobs/+").await;
    pika_publish(&exchange, "jobs.encode", "\"e\"", json!({})).await;
    let m = worker.next_message().await;
    assert_eq!(m["channel"], "jobs/encode");
    assert_eq!(m["payload"], "e");
    let reply = worker
        .request(json!({"type": "unsubscribe", "channel": "jobs/+"}))
        .await;
    assert_eq!(reply["type"], "ok");
    assert_eq!(client.publish("jobs/later", json!(2)).await["type"], "ok");
    eventually("the message stays in the queue", async || {
        pika_get(&queue).await["routing_key"] == "jobs.later"
    })
    .await;
    gw.shutdown().await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_work_queue_consumer_the_broker_cancels_is_made_again() {
    let backend = unique("rabbit");
    let exchange = unique("wsb.cancel.");
    let queue = unique("wsb.cancelled.");
    let extra = format!(
        r##"
[[routes]]
channel = "jobs/{{kind}}"
backend = "{backend}"
exchange = "{exchange}"
queue = "{queue}"
topic = "jobs.{{kind}}"
allow = ["subscribe"]
"##
    );
    let gw = start_connected(&config(&backend, &exchange, &extra)).await;
    let addr = gw.local_addr();
    let mut worker = Client::connect(addr).await;
    worker.subscribe("jobs/+").await;
    pika_publish(&exchange, "jobs.one", "1", json!({})).await;
    assert_eq!(worker.next_message().await["payload"], 1);

    // Deleting the queue makes RabbitMQ cancel the gateway's consumer. The subscription is not
    // left without a consumer: the backend reconnects, declares the queue again and consumes it.
    delete_queue(&queue).await;
    let down = worker.next_of("status").await;
    assert_eq!(down["code"], "backend_down", "{down}");
    assert_eq!(down["subscriptions"], json!(["jobs/+"]));
    let up = worker.next_of("status").await;
    assert_eq!(up["code"], "backend_up", "{up}");
    pika_publish(&exchange, "jobs.two", "2", json!({})).await;
    let m = worker.next_message().await;
    assert_eq!(m["channel"], "jobs/two");
    assert_eq!(m["payload"], 2);
    gw.shutdown().await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_stalled_socket_does_not_hold_up_the_consumer() {
    let exchange = unique("wsb.slow.");
    let text = format!(
        "[server]\nqueue_capacity = 64\n[limits]\npublish_per_second = 0\npublish_bytes_per_second = 0\n{}",
        config("rabbit", &exchange, "")
    );
    let gw = start_connected(&text).await;
    let addr = gw.local_addr();
    let mut stalled = Client::connect(addr).await;
    stalled.subscribe("orders/eu/#").await;
    let mut healthy = Client::connect(addr).await;
    healthy.subscribe("orders/eu/#").await;

    // 2000 messages of 16 KiB (32 MB): far more than socket buffers and the queue hold, so the
    // stalled socket must lose messages while the broker's deliveries keep flowing.
    let reader = common::read_in_order(healthy, 2000);
    let mut publisher = Client::connect(addr).await;
    common::flood(&mut publisher, "orders/eu/1", 2000, 16 * 1024).await;
    reader.await.expect("the healthy client got every message");
    let status = stalled.next_of("status").await;
    assert_eq!(status["code"], "messages_dropped", "{status}");
    gw.shutdown().await;
}

/// A gateway with a `json`, a `text` and a `binary` route on the same routing keys.
async fn matrix_gateway(exchange: &str) -> wsbridge::Gateway {
    use common::input::Format;
    let mut config = format!(
        "[backends.rabbit]\ntype = \"amqp\"\nurl = \"{URL}\"\nreconnect_initial = \"1s\"\n[[backends.rabbit.exchanges]]\nname = \"{exchange}\"\ntype = \"topic\"\ndurable = false\n"
    );
    for format in Format::ALL {
        let name = format.name();
        config.push_str(&format!(
            "[[routes]]\nchannel = \"{name}/#\"\nbackend = \"rabbit\"\nexchange = \"{exchange}\"\ntopic = \"in.#\"\nformat = \"{name}\"\nallow = [\"subscribe\"]\n"
        ));
    }
    start_connected(&config).await
}

/// The broker-side input matrix on AMQP, published with pika.
#[tokio::test]
async fn every_bad_payload_has_its_documented_outcome_on_amqp() {
    use common::input::{Format, cases, expect_case, good};
    let exchange = unique("wsb.matrix.");
    let gw = matrix_gateway(&exchange).await;
    let mut subscribers = Vec::new();
    for format in Format::ALL {
        let mut client = Client::connect(gw.local_addr()).await;
        client.subscribe(&format!("{}/x", format.name())).await;
        subscribers.push((format, client));
    }
    for (n, case) in cases().iter().enumerate() {
        pika_publish_bytes(&exchange, "in.x", &case.bytes, json!({})).await;
        pika_publish_bytes(&exchange, "in.x", &good(n), json!({})).await;
        for (format, client) in &mut subscribers {
            expect_case(client, *format, case, n).await;
        }
    }
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
    delete_exchange(&exchange).await;
}

/// Many and large headers, header values that are not UTF-8, and a routing key that maps to no
/// channel: each has its documented outcome and the next message still arrives.
#[tokio::test]
async fn odd_headers_and_unmapped_routing_keys_stop_nothing_on_amqp() {
    let exchange = unique("wsb.headers.");
    let gw = matrix_gateway(&exchange).await;
    let mut client = Client::connect(gw.local_addr()).await;
    client.subscribe("text/#").await;
    let next_good = async |client: &mut Client, n: usize| {
        let payload = format!("good {n}");
        pika_publish_bytes(&exchange, "in.x", payload.as_bytes(), json!({})).await;
        let m = client.next_message().await;
        assert_eq!(m["payload"], payload, "{m}");
    };

    let big = "v".repeat(64 * 1024);
    let mut headers = serde_json::Map::new();
    for i in 0..500 {
        headers.insert(format!("k{i}"), json!("v"));
    }
    headers.insert("big".into(), json!(big));
    headers.insert("raw".into(), json!({"b64": "//79"}));
    headers.insert("fine".into(), json!("ok"));
    pika_publish_bytes(&exchange, "in.x", b"headers", json!({"headers": headers})).await;
    let m = client.next_message().await;
    assert_eq!(m["payload"], "headers", "{m}");
    assert_eq!(m["headers"]["k499"], "v");
    assert_eq!(m["headers"]["big"], big.as_str());
    assert_eq!(m["headers"]["fine"], "ok");
    // A header value that is not text has no JSON form: that header is left out.
    assert!(m["headers"].get("raw").is_none(), "{m}");
    next_good(&mut client, 1).await;

    // An empty routing-key word has no client channel: skipped and counted.
    pika_publish_bytes(&exchange, "in..x", b"lost", json!({})).await;
    next_good(&mut client, 2).await;
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    assert!(
        metrics.contains("wsbridge_unmapped_messages_total{backend=\"rabbit\"} 1"),
        "{metrics}"
    );
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
    delete_exchange(&exchange).await;
}

/// No message reaches a client before the `ok` of its subscription, even while the routing key
/// is busy when it subscribes.
#[tokio::test]
async fn the_ok_of_a_subscribe_comes_before_its_messages_on_amqp() {
    let exchange = unique("wsb.order.");
    let gw = start_connected(&config("rabbit", &exchange, "")).await;
    let mut publisher = Client::connect(gw.local_addr()).await;
    // One subscriber keeps the binding in place, so later subscribers join a busy upstream.
    let mut first = Client::connect(gw.local_addr()).await;
    first.subscribe("orders/eu/#").await;
    let stream = tokio::spawn(async move {
        for n in 0..2000 {
            publisher.publish("orders/eu/1", json!(n)).await;
        }
    });
    for _ in 0..20 {
        let mut client = Client::connect(gw.local_addr()).await;
        client
            .send(json!({"type": "subscribe", "id": 1, "channel": "orders/eu/#"}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["type"], "ok", "first frame after subscribe: {reply}");
    }
    stream.abort();
    gw.shutdown().await;
    delete_exchange(&exchange).await;
}

#[tokio::test]
async fn a_panic_while_dispatching_skips_that_message_and_the_consumer_goes_on() {
    use common::faulty::{self, BOOM, HealthLog, Panicky};
    let backend_name = unique("rabbit");
    let exchange = unique("wsb.panic.");
    let (backend, panics) = faulty::build(&config(&backend_name, &exchange, ""), &backend_name);
    let health = HealthLog::start(backend.as_ref());
    health.wait_up("the backend connects").await;
    let sink = std::sync::Arc::new(Panicky::default());
    faulty::subscribe(backend.as_ref(), 1, "orders.eu.#", sink.clone()).await;
    pika_publish(&exchange, "orders.eu.1", "one", json!({})).await;
    sink.wait_for(b"one").await;

    // The panic is caught around the one dispatch: the message is acknowledged and skipped (given
    // back, it would come again forever), the connection stays up and the next message arrives.
    pika_publish(
        &exchange,
        "orders.eu.2",
        std::str::from_utf8(BOOM).unwrap(),
        json!({}),
    )
    .await;
    pika_publish(&exchange, "orders.eu.3", "two", json!({})).await;
    sink.wait_for(b"two").await;
    faulty::assert_contained(&sink, &panics, &health);
    backend.close().await;
}

/// A private RabbitMQ node under a 500 msg/s stream to 100 subscribers is killed (SIGKILL) and
/// started again, then hung (SIGSTOP) past the heartbeat and thawed, then has the gateway's
/// connection closed by `rabbitmqctl`. Each time every socket stays open, hears `backend_down`
/// and `backend_up`, and gets the stream again without reconnecting; a publish meanwhile gets an
/// error (within `confirm_timeout`), never a hang; every publish acknowledged `ok` reaches an
/// independent pika consumer on the node.
#[tokio::test]
async fn a_killed_hung_or_disconnected_node_costs_no_socket_and_no_acknowledged_message() {
    let mut rabbit = PrivateRabbit::start().await;
    let backend = unique("rabbit");
    let exchange = unique("wsb.faults.");
    let text = config(&backend, &exchange, "")
        .replace(URL, &rabbit.url())
        .replace(
            "reconnect_initial = \"1s\"",
            "reconnect_initial = \"200ms\"\nreconnect_max = \"1s\"",
        );
    let gw = start_connected(&text).await;
    let addr = gw.local_addr();
    let mut subscribers = common::hundred_subscribers(addr, "orders/eu/#").await;
    let mut publisher = Client::connect(addr).await;
    let channel = "orders/eu/stream";
    let expect_broker = async |consumer: &mut PikaConsumer, range: std::ops::Range<u64>| {
        for seq in range {
            let got = consumer.next().await;
            assert_eq!(got["body"], format!("{{\"seq\":{seq}}}"), "{got}");
        }
    };

    let mut independent =
        PikaConsumer::start_at(&rabbit.client_url(), &exchange, "orders.eu.#", 500).await;
    common::stream_500_per_second(&mut publisher, channel, 0, 500).await;
    common::expect_stream(&mut subscribers, 0..500, &[]).await;
    expect_broker(&mut independent, 0..500).await;

    // Killed: the node loses its connections (and the transient exchange) at once.
    rabbit.kill().await;
    common::expect_status(&mut subscribers, "backend_down").await;
    let reply = publisher.publish(channel, json!({"seq": -1})).await;
    assert_eq!(reply["code"], "backend_unavailable", "{reply}");
    rabbit.run().await;
    common::expect_status(&mut subscribers, "backend_up").await;
    let mut independent =
        PikaConsumer::start_at(&rabbit.client_url(), &exchange, "orders.eu.#", 500).await;
    common::stream_500_per_second(&mut publisher, channel, 500, 1000).await;
    common::expect_stream(&mut subscribers, 500..1000, &[]).await;
    expect_broker(&mut independent, 500..1000).await;

    // Hung: nothing answers; missed heartbeats (2 s here) tell. The publish is answered with an
    // error within confirm_timeout (5 s); its outcome is unknown, so it may still arrive.
    let mut independent =
        PikaConsumer::start_at(&rabbit.client_url(), &exchange, "orders.eu.#", 501).await;
    rabbit.freeze(true).await;
    let reply = publisher.publish(channel, json!({"seq": -2})).await;
    assert_eq!(reply["type"], "error", "{reply}");
    common::expect_status(&mut subscribers, "backend_down").await;
    rabbit.freeze(false).await;
    common::expect_status(&mut subscribers, "backend_up").await;
    common::stream_500_per_second(&mut publisher, channel, 1000, 1500).await;
    common::expect_stream(&mut subscribers, 1000..1500, &[-2]).await;
    let mut next = independent.next().await;
    if next["body"] == r#"{"seq":-2}"# {
        next = independent.next().await;
    }
    assert_eq!(next["body"], r#"{"seq":1000}"#, "{next}");
    expect_broker(&mut independent, 1001..1500).await;

    // Closed by the operator: the gateway reconnects on its own.
    let mut independent =
        PikaConsumer::start_at(&rabbit.client_url(), &exchange, "orders.eu.#", 500).await;
    assert_eq!(rabbit.close_connections(&backend).await, 1);
    common::expect_status(&mut subscribers, "backend_down").await;
    common::expect_status(&mut subscribers, "backend_up").await;
    common::stream_500_per_second(&mut publisher, channel, 1500, 2000).await;
    common::expect_stream(&mut subscribers, 1500..2000, &[]).await;
    expect_broker(&mut independent, 1500..2000).await;

    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(
        metrics.contains("wsbridge_connections 101\n"),
        "no socket was lost"
    );
    gw.shutdown().await;
}
