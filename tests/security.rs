//! The hostile-input matrix: authentication, authorisation, origins, limits and transport.
//!
//! Every case asserts the documented outcome, and that a well-behaved client on the same gateway
//! keeps receiving (`Bystander::still_receives`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, start, unique};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "test-secret-that-is-long-enough-0123456789";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub`, valid for an hour, with the issuer and audience the gateway expects.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": "wsbridge-tests", "aud": "web", "exp": now() + 3600})
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn pem_key(alg: Algorithm, file: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(file)).unwrap();
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        other => panic!("no fixture for {other:?}"),
    }
}

fn gateway_config(extra: &str) -> String {
    format!(
        r##"
[auth]
mode = "jwt"
secret = "{SECRET}"
issuer = "wsbridge-tests"
audience = "web"
leeway = "0s"

[server]
allowed_origins = ["https://app.example.com"]
max_subscriptions = 100
{extra}

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
subscribe_if = "{{device}} in claims.devices or 'admin' in claims.roles"
publish_if = "'operator' in claims.roles"

[[routes]]
channel = "public/#"
backend = "local"
topic = "public/#"
allow = ["subscribe", "publish"]
publish_if = "'admin' in claims.roles"
"##
    )
}

fn bearer(token: &str) -> impl FnOnce(&mut Request) + '_ {
    move |r: &mut Request| {
        r.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
    }
}

async fn connect_as(addr: SocketAddr, claims: &Value) -> Client {
    Client::try_connect(addr, bearer(&hs256(claims)))
        .await
        .unwrap_or_else(|e| panic!("connect refused: {e:?}"))
}

async fn refused(addr: SocketAddr, customise: impl FnOnce(&mut Request)) -> (u16, String) {
    match Client::try_connect(addr, customise).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => e,
    }
}

/// A well-behaved subscriber and an admin publisher on `public/...`.
struct Bystander {
    subscriber: Client,
    admin: Client,
    channel: String,
    seq: u64,
}

impl Bystander {
    async fn new(addr: SocketAddr) -> Bystander {
        let channel = format!("public/{}", unique("news"));
        let mut subscriber = connect_as(addr, &claims("reader")).await;
        subscriber.subscribe(&channel).await;
        let mut admin_claims = claims("root");
        admin_claims["roles"] = json!(["admin"]);
        let admin = connect_as(addr, &admin_claims).await;
        Bystander {
            subscriber,
            admin,
            channel,
            seq: 0,
        }
    }

    async fn still_receives(&mut self) {
        self.seq += 1;
        let ok = self
            .admin
            .publish(&self.channel, json!({"seq": self.seq}))
            .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        let m = self.subscriber.next_message().await;
        assert_eq!(
            m["payload"]["seq"], self.seq,
            "the well-behaved client keeps receiving"
        );
    }
}

#[tokio::test]
async fn refused_handshakes_get_401_with_a_short_reason() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;

    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 60);
    // `exp` is the first second the token is no longer good: refused at the upgrade rather than
    // accepted and closed with 4001 a moment later.
    let mut expiring_now = claims("alice");
    expiring_now["exp"] = json!(now());
    let mut not_yet = claims("alice");
    not_yet["nbf"] = json!(now() + 3600);
    let mut wrong_issuer = claims("alice");
    wrong_issuer["iss"] = json!("someone-else");
    let mut wrong_audience = claims("alice");
    wrong_audience["aud"] = json!("other-app");
    let mut no_subject = claims("alice");
    no_subject.as_object_mut().unwrap().remove("sub");
    let mut no_exp = claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let wrong_key = sign(
        Algorithm::HS256,
        &claims("alice"),
        &EncodingKey::from_secret(b"not-the-gateway-secret-0123456789abcdef").unwrap(),
    );
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("alice"))
    );
    let rs_on_hs = sign(
        Algorithm::RS256,
        &claims("alice"),
        &pem_key(Algorithm::RS256, "rsa_private.pem"),
    );

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing token", None, "missing token"),
        ("expired", Some(hs256(&expired)), "token expired"),
        (
            "expiring this second",
            Some(hs256(&expiring_now)),
            "token expired",
        ),
        (
            "not yet valid",
            Some(hs256(&not_yet)),
            "token not yet valid",
        ),
        (
            "wrong signature",
            Some(wrong_key),
            "invalid token signature",
        ),
        (
            "wrong issuer",
            Some(hs256(&wrong_issuer)),
            "invalid token issuer",
        ),
        (
            "wrong audience",
            Some(hs256(&wrong_audience)),
            "invalid token audience",
        ),
        (
            "no subject",
            Some(hs256(&no_subject)),
            "token lacks the sub claim",
        ),
        (
            "no expiry",
            Some(hs256(&no_exp)),
            "token lacks the exp claim",
        ),
        ("alg none", Some(alg_none), "token algorithm not allowed"),
        (
            "RS256 token on an HMAC gateway",
            Some(rs_on_hs),
            "token algorithm not allowed",
        ),
        ("garbage", Some("not.a.token".into()), "malformed token"),
    ];
    for (name, token, reason) in cases {
        let (status, body) = match &token {
            Some(t) => refused(addr, bearer(t)).await,
            None => refused(addr, |_| {}).await,
        };
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body.trim(), reason, "{name}");
        assert!(!body.contains(SECRET), "{name}: nothing about keys leaks");
        bystander.still_receives().await;
    }

    // Health endpoints stay open without a token.
    assert_eq!(common::http_get(addr, "/healthz").await.0, 200);
    assert_eq!(common::http_get(addr, "/readyz").await.0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn hs256_confusion_with_the_rsa_public_key_is_refused() {
    // A gateway verifying RS256 with a public key must not accept an HS256 token whose HMAC key is
    // that (public) key.
    let config = gateway_config("").replace(
        &format!("secret = \"{SECRET}\""),
        &format!("public_key_file = \"{}\"", fixture("rsa_public.pem")),
    );
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let forged = sign(
        Algorithm::HS256,
        &claims("mallory"),
        &EncodingKey::from_secret(&public_pem).unwrap(),
    );
    let (status, body) = refused(addr, bearer(&forged)).await;
    assert_eq!((status, body.trim()), (401, "token algorithm not allowed"));
    // The genuine RS256 token works.
    let good = sign(
        Algorithm::RS256,
        &claims("alice"),
        &pem_key(Algorithm::RS256, "rsa_private.pem"),
    );
    let mut alice = Client::try_connect(addr, bearer(&good))
        .await
        .expect("RS256 accepted");
    assert_eq!(alice.request(json!({"type": "ping"})).await["type"], "pong");
    gw.shutdown().await;
}

#[tokio::test]
async fn ec_ed25519_and_jwks_keys_verify_their_own_algorithms() {
    for (key_line, alg, private) in [
        (
            format!("public_key_file = \"{}\"", fixture("ec_public.pem")),
            Algorithm::ES256,
            "ec_private.pem",
        ),
        (
            format!("public_key_file = \"{}\"", fixture("ed_public.pem")),
            Algorithm::EdDSA,
            "ed_private.pem",
        ),
        (
            format!("jwks_file = \"{}\"", fixture("jwks.json")),
            Algorithm::RS256,
            "rsa_private.pem",
        ),
    ] {
        let config = gateway_config("").replace(&format!("secret = \"{SECRET}\""), &key_line);
        let gw = start(&config).await;
        let addr = gw.local_addr();
        let key = pem_key(alg, private);
        let mut header = Header::new(alg);
        header.kid = Some("test-rsa-1".into());
        let token = jsonwebtoken::encode(&header, &claims("alice"), &key).unwrap();
        let mut c = Client::try_connect(addr, bearer(&token))
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
        // An HS256 token is refused whatever secret it uses.
        let (status, _) = refused(addr, bearer(&hs256(&claims("alice")))).await;
        assert_eq!(status, 401, "{alg:?}");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn the_token_is_accepted_in_every_supported_place() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let token = hs256(&claims("alice"));

    let header = Client::try_connect(addr, bearer(&token)).await;
    let query = Client::try_connect(addr, |r| {
        *r.uri_mut() = format!("ws://{addr}/ws?access_token={token}")
            .parse()
            .unwrap();
    })
    .await;
    let cookie = Client::try_connect(addr, |r| {
        r.headers_mut().insert(
            "Cookie",
            HeaderValue::from_str(&format!("theme=dark; wsbridge_token={token}")).unwrap(),
        );
    })
    .await;
    let subprotocol = Client::try_connect(addr, |r| {
        r.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&format!("wsbridge.v1.json, access_token.{token}")).unwrap(),
        );
    })
    .await;
    for (place, client) in [
        ("header", header),
        ("query", query),
        ("cookie", cookie),
        ("subprotocol", subprotocol),
    ] {
        let mut client = client.unwrap_or_else(|e| panic!("{place}: {e:?}"));
        client.subscribe("users/alice/inbox").await;
    }

    // A token entry alone is not a protocol: the client must also offer wsbridge.v1.json.
    let (status, body) = refused(addr, |r| {
        r.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&format!("access_token.{token}")).unwrap(),
        );
    })
    .await;
    assert_eq!(status, 400, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn channels_outside_the_claims_are_forbidden() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;
    let mut alice_claims = claims("alice");
    alice_claims["devices"] = json!(["d1"]);
    alice_claims["roles"] = json!(["viewer"]);
    let mut alice = connect_as(addr, &alice_claims).await;

    alice.subscribe("users/alice/#").await;
    alice.subscribe("devices/d1/#").await;
    let cases = [
        (
            json!({"type": "subscribe", "channel": "users/bob/#"}),
            "forbidden",
        ),
        (
            json!({"type": "publish", "channel": "users/bob/inbox", "payload": "hi"}),
            "forbidden",
        ),
        (
            json!({"type": "subscribe", "channel": "users/+/#"}),
            "forbidden",
        ),
        (
            json!({"type": "subscribe", "channel": "devices/d2/#"}),
            "forbidden",
        ),
        (
            json!({"type": "subscribe", "channel": "devices/+/#"}),
            "forbidden",
        ),
        (
            json!({"type": "subscribe", "channel": "devices/#"}),
            "forbidden",
        ),
        (json!({"type": "subscribe", "channel": "#"}), "no_route"),
        (
            json!({"type": "publish", "channel": "devices/d1/cmd", "payload": "on"}),
            "forbidden",
        ),
        (
            json!({"type": "publish", "channel": "public/news", "payload": "spam"}),
            "forbidden",
        ),
    ];
    for (frame, code) in cases {
        let e = alice.request(frame.clone()).await;
        assert_eq!(e["code"], code, "{frame}: {e}");
        bystander.still_receives().await;
    }

    // What the claims do allow works, on the same connection.
    let ok = alice.publish("users/alice/notes", json!("mine")).await;
    assert_eq!(ok["type"], "ok");
    assert_eq!(alice.next_message().await["channel"], "users/alice/notes");

    // An operator may publish to devices; an admin may subscribe to all of them.
    let mut operator = claims("ops");
    operator["roles"] = json!(["operator", "admin"]);
    let mut ops = connect_as(addr, &operator).await;
    ops.subscribe("devices/+/#").await;
    assert_eq!(
        ops.publish("devices/d1/cmd", json!("on")).await["type"],
        "ok"
    );
    assert_eq!(ops.next_message().await["channel"], "devices/d1/cmd");
    assert_eq!(alice.next_message().await["channel"], "devices/d1/cmd");
    gw.shutdown().await;
}

#[tokio::test]
async fn template_values_cannot_inject_levels_or_wildcards() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;
    let mut admin = claims("root");
    admin["roles"] = json!(["admin", "operator"]);
    let mut c = connect_as(addr, &admin).await;
    let long = "x".repeat(2000);
    for channel in [
        "devices/d1+/x",
        "devices/d#/x",
        "devices//x",
        "devices/d\u{0}/x",
        "devices/d\n/x",
        long.as_str(),
    ] {
        for kind in ["subscribe", "publish"] {
            let e = c
                .request(json!({"type": kind, "channel": channel, "payload": 1}))
                .await;
            assert_eq!(e["code"], "invalid_channel", "{kind} {channel:?}: {e}");
        }
    }
    // A subject claim that would add topic levels cannot be used in a topic.
    let mut sneaky = connect_as(addr, &claims("bob/../alice")).await;
    let e = sneaky
        .request(json!({"type": "subscribe", "channel": "users/bob/../alice/#"}))
        .await;
    assert_eq!(e["type"], "error", "{e}");
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn in_band_refresh_keeps_the_subject_and_expiry_closes_with_4001() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;

    // Expiry without refresh closes the connection.
    let mut short = claims("alice");
    short["exp"] = json!(now() + 2);
    let mut expiring = connect_as(addr, &short).await;
    expiring.subscribe("users/alice/#").await;
    let (code, reason) = expiring.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    bystander.still_receives().await;

    // A refresh with another subject's token is refused and changes nothing.
    let mut short = claims("alice");
    short["exp"] = json!(now() + 3);
    let mut refreshed = connect_as(addr, &short).await;
    let e = refreshed
        .request(json!({"type": "auth", "token": hs256(&claims("mallory"))}))
        .await;
    assert_eq!(e["code"], "forbidden", "{e}");
    let e = refreshed
        .request(json!({"type": "subscribe", "channel": "users/mallory/#"}))
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = refreshed
        .request(json!({"type": "auth", "token": "garbage"}))
        .await;
    assert_eq!(e["code"], "invalid_token", "{e}");

    // A fresh token for the same subject moves the expiry: still open after the first `exp`.
    let ok = refreshed
        .request(json!({"type": "auth", "token": hs256(&claims("alice"))}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        refreshed.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn refresh_with_fewer_claims_revokes_subscriptions() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let mut with_device = claims("alice");
    with_device["devices"] = json!(["d1"]);
    let mut alice = connect_as(addr, &with_device).await;
    alice.subscribe("devices/d1/#").await;
    let ok = alice
        .request(json!({"type": "auth", "token": hs256(&claims("alice"))}))
        .await;
    assert_eq!(ok["type"], "ok");
    let status = alice.next_of("status").await;
    assert_eq!(status["code"], "subscription_revoked");
    assert_eq!(status["subscriptions"], json!(["devices/d1/#"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn wrong_origins_are_refused() {
    let gw = start(&gateway_config("")).await;
    let addr = gw.local_addr();
    let token = hs256(&claims("alice"));
    let with_origin = |origin: &'static str| {
        let token = token.clone();
        move |r: &mut Request| {
            bearer(&token)(r);
            r.headers_mut()
                .insert("Origin", HeaderValue::from_static(origin));
        }
    };
    let (status, body) = refused(addr, with_origin("https://evil.example.com")).await;
    assert_eq!((status, body.trim()), (403, "origin not allowed"));
    assert!(
        Client::try_connect(addr, with_origin("https://app.example.com"))
            .await
            .is_ok()
    );
    // Non-browser clients send no Origin and are not affected.
    assert!(Client::try_connect(addr, bearer(&token)).await.is_ok());
    gw.shutdown().await;
}

#[tokio::test]
async fn connection_caps_and_rates_per_address() {
    let gw = start(&gateway_config(
        "[limits]\nmax_connections_per_ip = 3\nnew_connections_per_second_per_ip = 1000\n",
    ))
    .await;
    let addr = gw.local_addr();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect_as(addr, &claims("alice")).await);
    }
    let (status, body) = refused(addr, bearer(&hs256(&claims("alice")))).await;
    assert_eq!(
        (status, body.trim()),
        (429, "too many connections from your address")
    );
    for c in &mut open {
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    }
    // Closing one frees its slot.
    let mut first = open.remove(0);
    first.ws.close(None).await.ok();
    drop(first);
    common::eventually("the slot is released", async || {
        Client::try_connect(addr, bearer(&hs256(&claims("alice"))))
            .await
            .is_ok()
    })
    .await;
    gw.shutdown().await;

    let gw = start(&gateway_config(
        "[limits]\nnew_connections_per_second_per_ip = 3\n",
    ))
    .await;
    let addr = gw.local_addr();
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(
            Client::try_connect(addr, bearer(&hs256(&claims("alice"))))
                .await
                .err(),
        );
    }
    assert!(outcomes[..3].iter().all(Option::is_none), "{outcomes:?}");
    assert!(
        outcomes[3..]
            .iter()
            .any(|o| matches!(o, Some((429, body)) if body.contains("too fast"))),
        "{outcomes:?}"
    );
    gw.shutdown().await;

    let gw = start(&gateway_config(
        "[limits]\nmax_connections = 2\nmax_connections_per_ip = 2\n",
    ))
    .await;
    let addr = gw.local_addr();
    let _a = connect_as(addr, &claims("a")).await;
    let _b = connect_as(addr, &claims("b")).await;
    let (status, _) = refused(addr, bearer(&hs256(&claims("c")))).await;
    assert_eq!(status, 503);
    gw.shutdown().await;
}

#[tokio::test]
async fn publish_floods_hit_rate_limited() {
    let gw = start(&gateway_config("[limits]\npublish_per_second = 5\n")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;
    let mut flooder = connect_as(addr, &claims("alice")).await;
    let mut codes = Vec::new();
    for _ in 0..20 {
        let reply = flooder.publish("users/alice/flood", json!("x")).await;
        codes.push(reply["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert!(
        codes.iter().filter(|c| *c == "ok").count() <= 6,
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    // The flooder's connection stays usable, and others are unaffected.
    assert_eq!(
        flooder.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn subscription_floods_hit_the_cap() {
    let gw =
        start(&gateway_config("").replace("max_subscriptions = 100", "max_subscriptions = 50"))
            .await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;
    let mut c = connect_as(addr, &claims("alice")).await;
    for i in 0..1000 {
        c.send(json!({"type": "subscribe", "id": i, "channel": format!("users/alice/{i}")}))
            .await;
    }
    // Both defences answer: the subscription cap, and the subscribe rate limit (100/s by
    // default) for the part of the flood beyond its burst.
    let (mut ok, mut capped, mut limited) = (0, 0, 0);
    for i in 0..1000 {
        match c.reply_to(json!(i)).await["code"].as_str() {
            None => ok += 1,
            Some("too_many_subscriptions") => capped += 1,
            Some("rate_limited") => limited += 1,
            Some(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 50);
    assert_eq!(capped + limited, 950);
    assert!(
        capped >= 50 && limited > 0,
        "capped {capped}, rate limited {limited}"
    );
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_handshakes_are_cut() {
    let gw = start(&gateway_config("handshake_timeout = \"300ms\"")).await;
    let addr = gw.local_addr();
    let mut bystander = Bystander::new(addr).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(common::WAIT, slow.read(&mut buf))
        .await
        .expect("the gateway gives up on the request head")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.contains("408"), "{text}");
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn wss_works_with_a_standard_client() {
    let tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        fixture("tls_cert.pem"),
        fixture("tls_key.pem")
    );
    let gw = start(&gateway_config(&tls)).await;
    let addr = gw.local_addr();

    let mut roots = rustls::RootCertStore::empty();
    let cert_pem = std::fs::read(fixture("tls_ca.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&cert_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls_stream = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let token = hs256(&claims("alice"));
    let request = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("wss://localhost:{}/ws", addr.port()))
        .header("Host", format!("localhost:{}", addr.port()))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls_stream)
        .await
        .expect("WebSocket over TLS");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type": "ping", "id": 1}).to_string().into(),
    ))
    .await
    .unwrap();
    let reply = loop {
        match ws.next().await.unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => break t,
            _ => continue,
        }
    };
    assert_eq!(
        serde_json::from_str::<Value>(&reply).unwrap()["type"],
        "pong"
    );

    // A plain-text client gets no WebSocket from a TLS listener.
    let plain = Client::try_connect(addr, bearer(&token)).await;
    assert!(plain.is_err());
    gw.shutdown().await;
}

#[tokio::test]
async fn injection_is_refused_in_mqtt_and_amqp_syntax() {
    let prefix = unique("inj");
    let config = gateway_config("").replace(
        "[backends.local]",
        &format!(
            r##"[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"

[backends.rabbit]
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[[routes]]
channel = "orders/{{region}}/#"
backend = "rabbit"
exchange = "amq.topic"
topic = "{prefix}.orders.{{region}}.#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "mine/#"
backend = "plant"
topic = "{prefix}/users/{{claims.sub}}/#"
allow = ["subscribe", "publish"]

[backends.local]"##
        ),
    );
    let gw = start(&config).await;
    let addr = gw.local_addr();
    common::eventually("the brokers are connected", async || gw.hub().is_ready()).await;
    let mut bystander = Bystander::new(addr).await;
    let mut c = connect_as(addr, &claims("alice")).await;

    // AMQP routing keys: '.', '*' and '#' inside a level would add levels or wildcards.
    for channel in [
        "orders/eu.west/x",
        "orders/eu*/x",
        "orders/eu/a.b",
        "orders/eu/a*",
    ] {
        for kind in ["subscribe", "publish"] {
            let e = c
                .request(json!({"type": kind, "channel": channel, "payload": 1}))
                .await;
            assert_eq!(e["code"], "invalid_channel", "{kind} {channel}: {e}");
            assert!(
                e["message"].as_str().unwrap().contains("routing key"),
                "{e}"
            );
        }
    }
    // The same route works with clean values.
    c.subscribe("orders/eu/+").await;
    assert_eq!(c.publish("orders/eu/7", json!("order")).await["type"], "ok");
    assert_eq!(c.next_message().await["channel"], "orders/eu/7");

    // MQTT topics: a subject claim with '/', '+' or '#' cannot widen the user's own topic.
    for sub in ["bob/#", "+", "a/b"] {
        let mut sneaky = connect_as(addr, &claims(sub)).await;
        for kind in ["subscribe", "publish"] {
            let e = sneaky
                .request(json!({"type": kind, "channel": "mine/inbox", "payload": 1}))
                .await;
            assert_eq!(e["code"], "invalid_channel", "{sub} {kind}: {e}");
        }
    }
    let mut alice = connect_as(addr, &claims("alice")).await;
    alice.subscribe("mine/#").await;
    assert_eq!(alice.publish("mine/inbox", json!("hi")).await["type"], "ok");
    assert_eq!(alice.next_message().await["channel"], "mine/inbox");
    bystander.still_receives().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn jwks_url_keys_are_fetched_and_used() {
    // A JWKS endpoint on 127.0.0.1, as an identity provider would serve it.
    let jwks = std::fs::read_to_string(fixture("jwks.json")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let body = jwks.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = stream.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    let config = gateway_config("").replace(
        &format!("secret = \"{SECRET}\""),
        &format!("jwks_url = \"http://{jwks_addr}/jwks.json\"\njwks_refresh = \"1s\""),
    );
    let gw = start(&config).await;
    let addr = gw.local_addr();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rsa-1".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims("alice"),
        &pem_key(Algorithm::RS256, "rsa_private.pem"),
    )
    .unwrap();
    common::eventually("the JWKS is fetched and the token accepted", async || {
        Client::try_connect(addr, bearer(&token)).await.is_ok()
    })
    .await;
    // A key id the set does not have is refused.
    header.kid = Some("someone-elses-key".into());
    let foreign = jsonwebtoken::encode(
        &header,
        &claims("alice"),
        &pem_key(Algorithm::RS256, "rsa_private.pem"),
    )
    .unwrap();
    let (status, body) = refused(addr, bearer(&foreign)).await;
    assert_eq!((status, body.trim()), (401, "unknown token key"));
    gw.shutdown().await;
    server.abort();
}
