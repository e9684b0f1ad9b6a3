//! Behind a load balancer: the client address a trusted proxy reports (`X-Forwarded-For`,
//! `Forwarded`, PROXY protocol v1/v2) is the one the per-IP limits count and the admin API
//! shows; the same reports from an untrusted peer change nothing, and a trusted peer that owes a
//! PROXY header and does not send a valid one is cut off. Memory backend only.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{WAIT, eventually, start};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsbridge::Gateway;

const ADMIN_TOKEN: &str = "proxy-test-admin-token-0123";

/// A memory gateway with the admin listener on, at most `per_ip` connections per client address.
fn config(server: &str, per_ip: usize) -> String {
    format!(
        r##"
[server]
{server}

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[limits]
max_connections_per_ip = {per_ip}
new_connections_per_second_per_ip = 1000

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

type Socket = WebSocketStream<TcpStream>;

/// A WebSocket over a TCP connection that first sends `prefix` (a PROXY header, or nothing),
/// with extra request headers. A refusal gives its HTTP status and body, or status 0 when the
/// gateway closed the connection without an answer.
async fn connect(
    addr: SocketAddr,
    prefix: &[u8],
    headers: &[(&'static str, &str)],
) -> Result<Socket, (u16, String)> {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connects");
    if !prefix.is_empty() {
        stream.write_all(prefix).await.expect("prefix written");
    }
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .append(*name, HeaderValue::from_str(value).unwrap());
    }
    let handshake = tokio_tungstenite::client_async(request, stream);
    match tokio::time::timeout(WAIT, handshake)
        .await
        .expect("the handshake ends in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => Err((0, e.to_string())),
    }
}

fn xff(value: &str) -> [(&'static str, &str); 1] {
    [("x-forwarded-for", value)]
}

fn v1(source: &str) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    let destination = if source.is_ipv4() { "127.0.0.1" } else { "::1" };
    format!(
        "PROXY {family} {} {destination} {} 8080\r\n",
        source.ip(),
        source.port()
    )
    .into_bytes()
}

fn v2(source: &str) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    let destination: SocketAddr = if source.is_ipv4() {
        "127.0.0.1:8080".parse().unwrap()
    } else {
        "[::1]:8080".parse().unwrap()
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

/// The `remote_address` of every open connection, from the admin API, sorted.
async fn remote_addresses(gw: &Gateway) -> Vec<String> {
    let admin = gw.admin_addr().expect("the admin listener is on");
    let response = reqwest::Client::new()
        .get(format!("http://{admin}/admin/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_str(&response.text().await.expect("a body")).expect("JSON");
    let mut addresses: Vec<String> = body["connections"]
        .as_array()
        .expect("a connections array")
        .iter()
        .map(|c| c["remote_address"].as_str().unwrap_or_default().to_owned())
        .collect();
    addresses.sort();
    addresses
}

/// Waits until the admin API lists exactly `expected` (in any order); `127.0.0.1:*` stands for
/// the test's own TCP connections, whose ports vary.
async fn expect_addresses(gw: &Gateway, expected: &[&str]) {
    let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    expected.sort();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            seen = remote_addresses(gw)
                .await
                .into_iter()
                .map(|a| match a.strip_prefix("127.0.0.1:") {
                    Some(_) => "127.0.0.1:*".to_owned(),
                    None => a,
                })
                .collect();
            seen.sort();
            if seen == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "the admin API lists {seen:?}, expected {expected:?}"
    );
}

fn assert_per_ip_refusal(result: Result<Socket, (u16, String)>) {
    match result {
        Err((429, body)) => assert!(
            body.contains("too many connections from your address"),
            "{body}"
        ),
        Err(other) => panic!("expected 429, got {other:?}"),
        Ok(_) => panic!("expected 429, the upgrade succeeded"),
    }
}

fn assert_cut_off(result: Result<Socket, (u16, String)>) {
    match result {
        Err((0, _)) => {}
        Err(other) => panic!("expected the connection to be closed unanswered, got {other:?}"),
        Ok(_) => panic!("expected the connection to be closed, the upgrade succeeded"),
    }
}

#[tokio::test]
async fn forwarded_addresses_from_a_trusted_proxy_count_as_the_clients() {
    let gw = start(&config("trusted_proxies = [\"127.0.0.1/32\"]", 2)).await;
    let addr = gw.local_addr();

    let first = connect(addr, b"", &xff("203.0.113.1"))
        .await
        .expect("first");
    let second = connect(addr, b"", &xff("203.0.113.1"))
        .await
        .expect("second");
    // The same forwarded address over a third TCP connection hits its cap, counted like a refusal
    // at accept...
    assert_per_ip_refusal(connect(addr, b"", &xff("203.0.113.1")).await);
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "wsbridge_upgrades_refused_total{reason=\"limits\"} 1"),
        "{metrics}"
    );
    // ...while other forwarded addresses are counted on their own: the right-most entry that is
    // not a trusted proxy, and an IPv6 address with a port.
    let other = connect(addr, b"", &xff("192.0.2.99, 198.51.100.2, 127.0.0.1"))
        .await
        .expect("another client");
    let forwarded = connect(addr, b"", &xff("[2001:db8::5]:4711"))
        .await
        .expect("an IPv6 client");
    // A `Forwarded` header is not what this proxy writes (server.forwarded_header): it is the
    // client's own and names nobody; the proxy's address counts.
    let forged = connect(addr, b"", &[("forwarded", "for=203.0.113.99")])
        .await
        .expect("a client without X-Forwarded-For");
    expect_addresses(
        &gw,
        &[
            "203.0.113.1:0",
            "203.0.113.1:0",
            "198.51.100.2:0",
            "[2001:db8::5]:4711",
            "127.0.0.1:*",
        ],
    )
    .await;

    // A closed connection gives its slot back to the forwarded address.
    drop(first);
    eventually("the forwarded address has a free slot again", async || {
        connect(addr, b"", &xff("203.0.113.1")).await.is_ok()
    })
    .await;
    drop((second, other, forwarded, forged));
    gw.shutdown().await;
}

#[tokio::test]
async fn http_publish_rates_are_per_forwarded_address() {
    let text = config("trusted_proxies = [\"127.0.0.1/32\"]", 10)
        .replace("[limits]\n", "[limits]\npublish_per_second = 1\n");
    assert!(text.contains("publish_per_second = 1"));
    let gw = start(&text).await;
    let addr = gw.local_addr();
    let http = reqwest::Client::new();
    let publish = async |forwarded_for: &str| {
        http.post(format!("http://{addr}/publish"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", forwarded_for)
            .body(r#"{"channel": "rates/x", "payload": 1}"#)
            .send()
            .await
            .expect("POST /publish answers")
            .status()
            .as_u16()
    };
    assert_eq!(publish("203.0.113.1").await, 200);
    assert_eq!(
        publish("203.0.113.1").await,
        429,
        "the same address's bucket is empty"
    );
    assert_eq!(
        publish("203.0.113.2").await,
        200,
        "another address has its own"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn rfc_7239_forwarded_headers_when_configured() {
    let gw = start(&config(
        "trusted_proxies = [\"127.0.0.1/32\"]\nforwarded_header = \"forwarded\"",
        1,
    ))
    .await;
    let addr = gw.local_addr();
    let header = [(
        "forwarded",
        "for=192.0.2.60;proto=https, for=\"[2001:db8:cafe::17]:4711\";by=127.0.0.1",
    )];
    let _first = connect(addr, b"", &header)
        .await
        .expect("a Forwarded client");
    assert_per_ip_refusal(connect(addr, b"", &header).await);
    // X-Forwarded-For is now the client's own header, and not read.
    let _other = connect(addr, b"", &xff("198.51.100.8"))
        .await
        .expect("a client with only X-Forwarded-For");
    expect_addresses(&gw, &["127.0.0.1:*", "[2001:db8:cafe::17]:4711"]).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    let gw = start(&config("trusted_proxies = [\"192.0.2.0/24\"]", 2)).await;
    let addr = gw.local_addr();
    let _a = connect(addr, b"", &xff("203.0.113.1"))
        .await
        .expect("first");
    let _b = connect(addr, b"", &[("forwarded", "for=203.0.113.2")])
        .await
        .expect("second");
    // Whatever the headers say, all three come from 127.0.0.1.
    assert_per_ip_refusal(connect(addr, b"", &xff("203.0.113.3")).await);
    let peers = remote_addresses(&gw).await;
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(
        peers.iter().all(|p| p.starts_with("127.0.0.1:")),
        "{peers:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_headers_name_the_client() {
    let gw = start(&config(
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true",
        1,
    ))
    .await;
    let addr = gw.local_addr();
    // With the PROXY protocol on, an X-Forwarded-For header does not name the client.
    let _v1 = connect(addr, &v1("203.0.113.7:51234"), &xff("198.51.100.1"))
        .await
        .expect("a v1 client");
    let _v2 = connect(addr, &v2("[2001:db8::9]:4000"), &[])
        .await
        .expect("a v2 client");
    expect_addresses(&gw, &["203.0.113.7:51234", "[2001:db8::9]:4000"]).await;
    // The per-IP cap (1 here) applies to the address in the header, in either version.
    assert_per_ip_refusal(connect(addr, &v2("203.0.113.7:6000"), &[]).await);
    assert_per_ip_refusal(connect(addr, &v1("[2001:db8::9]:4001"), &[]).await);
    let _v2_other = connect(addr, &v2("198.51.100.3:7000"), &[])
        .await
        .expect("a third client");

    // Plain HTTP behind the header works too.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&v1("192.0.2.44:1234")).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_trusted_peer_without_a_valid_proxy_header_is_cut_off() {
    let gw = start(&config(
        "trusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true\nhandshake_timeout = \"1s\"",
        10,
    ))
    .await;
    let addr = gw.local_addr();
    assert_cut_off(connect(addr, b"", &[]).await);
    assert_cut_off(connect(addr, b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", &[]).await);
    assert_cut_off(connect(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 51234\r\n", &[]).await);
    let mut wrong_version = v2("203.0.113.7:51234");
    wrong_version[12] = 0x11;
    assert_cut_off(connect(addr, &wrong_version, &[]).await);

    // A peer that sends nothing is closed after server.handshake_timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the gateway closes a silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // The gateway still serves a proxy that does it right.
    connect(addr, &v1("203.0.113.7:51234"), &[])
        .await
        .expect("a valid header is accepted");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_untrusted_peer_may_not_send_a_proxy_header() {
    let gw = start(&config(
        "trusted_proxies = [\"192.0.2.0/24\"]\nproxy_protocol = true",
        10,
    ))
    .await;
    let addr = gw.local_addr();
    assert_cut_off(connect(addr, &v1("203.0.113.7:51234"), &[]).await);
    assert_cut_off(connect(addr, &v2("203.0.113.7:51234"), &[]).await);
    // Its plain connections are served, under its own address.
    let _plain = connect(addr, b"", &[]).await.expect("a plain connection");
    let peers = remote_addresses(&gw).await;
    assert!(
        peers.len() == 1 && peers[0].starts_with("127.0.0.1:"),
        "{peers:?}"
    );
    gw.shutdown().await;
}
