//! Property tests for the parsers that face the network: the client frame decoder, the channel
//! pattern matcher and the route template mapper, and the checks of `tests/harness` that the
//! `cargo fuzz` targets also run (broker bytes into every format and encoding, client frames,
//! Protobuf⇄JSON). They run a bounded number of cases with every `cargo test`; raise
//! `PROPTEST_CASES` for a longer search, or run the fuzz targets (fuzz/README.md).

mod harness;

use axum::extract::ws::Message;
use proptest::prelude::*;
use wsbridge::edge::ws::protocol::Protocol;
use wsbridge::routing::{
    Captures, ChannelPattern, ChannelTemplate, NoClaims, TopicSyntax, TopicTemplate,
};

const DOCUMENTED_CODES: &[&str] = &[
    "invalid_json",
    "invalid_frame",
    "unknown_type",
    "unsupported_frame",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(10_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A channel level: printable text without '/', '+', '#'.
fn level() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.:@ -]{1,8}"
}

fn channel() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(level(), 1..6)
}

/// A JSON value, including deep nesting and odd strings.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        ".{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("id".to_string()),
                    Just("channel".to_string()),
                    Just("payload".to_string()),
                    Just("encoding".to_string()),
                    Just("headers".to_string()),
                    Just("from".to_string()),
                    Just("partition".to_string()),
                    Just("token".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    /// Any text decodes to a request or to a documented error; nothing panics.
    #[test]
    fn decoder_never_panics_on_text(text in ".{0,200}") {
        if let Err(e) = Protocol::Json.decode(&Message::Text(text.as_str().into())) {
            prop_assert!(DOCUMENTED_CODES.contains(&e.code), "{}", e.code);
        }
    }

    /// Any JSON object decodes or fails with a documented code, and keeps its id when it has a
    /// valid one.
    #[test]
    fn decoder_handles_arbitrary_objects(value in json_value(), kind in prop_oneof![
        Just("subscribe"), Just("unsubscribe"), Just("publish"), Just("ping"), Just("auth"), Just("x")
    ], id in any::<u32>()) {
        let mut value = value;
        if let Some(map) = value.as_object_mut() {
            map.insert("type".into(), kind.into());
            map.insert("id".into(), id.into());
        }
        let text = value.to_string();
        match Protocol::Json.decode(&Message::Text(text.as_str().into())) {
            Ok(request) => prop_assert_eq!(serde_json::to_value(request.id()).unwrap(), serde_json::json!(id)),
            Err(e) => {
                prop_assert!(DOCUMENTED_CODES.contains(&e.code), "{}", e.code);
                if value.is_object() {
                    prop_assert_eq!(e.id.map(|i| serde_json::to_value(i).unwrap()), Some(serde_json::json!(id)));
                }
            }
        }
    }

    /// Binary frames on the JSON protocol always get `unsupported_frame`.
    #[test]
    fn decoder_refuses_binary(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let e = Protocol::Json.decode(&Message::Binary(bytes.into())).unwrap_err();
        prop_assert_eq!(e.code, "unsupported_frame");
    }

    /// Parsing arbitrary text never panics, and a parsed pattern prints back as it was written.
    #[test]
    fn pattern_parser_round_trips(text in "[a-z/+#\\x00 ]{0,40}") {
        if let Ok(p) = ChannelPattern::parse(&text) {
            prop_assert_eq!(p.as_str(), text.as_str());
            prop_assert!(p.levels().iter().all(|l| !l.as_str().is_empty()));
        }
    }

    /// Matching agrees with a straightforward reference implementation of MQTT matching.
    #[test]
    fn pattern_matching_agrees_with_reference(
        channel in prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..5),
        pattern in prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("+"), Just("#")], 1..5),
    ) {
        let channel = channel.join("/");
        let text = pattern.join("/");
        let Ok(p) = ChannelPattern::parse(&text) else {
            // Only a `#` before the end makes these invalid.
            prop_assert!(pattern[..pattern.len() - 1].contains(&"#"));
            return Ok(());
        };
        let reference = {
            let c: Vec<&str> = channel.split('/').collect();
            let mut i = 0;
            let mut matched = true;
            for level in &pattern {
                if *level == "#" { i = c.len(); break; }
                if i >= c.len() || (*level != "+" && *level != c[i]) { matched = false; break; }
                i += 1;
            }
            matched && i == c.len()
        };
        prop_assert_eq!(p.matches(&channel), reference, "{} vs {}", text, channel);
    }

    /// A concrete channel mapped to a topic maps back to the same channel, through templates with
    /// literal levels, placeholders, partial levels and `#`, in `/` and `.` syntaxes.
    #[test]
    fn templates_round_trip(site in level(), device in level(), tail in channel(), dotted in any::<bool>()) {
        let dot = wsbridge::backends::amqp::ROUTING_KEY;
        let (syntax, topic) = if dotted { (dot, "plant.{site}.dev-{device}.#") } else { (TopicSyntax::SLASH, "plant/{site}/dev-{device}/#") };
        let template = ChannelTemplate::parse("s/{site}/d/{device}/#").unwrap();
        let topic_template = TopicTemplate::parse(topic, syntax).unwrap();
        let channel = format!("s/{site}/d/{device}/{}", tail.join("/"));
        let pattern = ChannelPattern::parse(&channel).unwrap();
        let bindings = template.bind(&pattern, &NoClaims).unwrap();
        match topic_template.render(&bindings, &NoClaims) {
            Ok(rendered) => {
                prop_assert!(!rendered.is_filter);
                let mut captures = Captures::default();
                prop_assert!(topic_template.capture(&rendered.text, &mut captures));
                prop_assert_eq!(template.render(&captures), Some(channel.clone()));
            }
            Err(_) => {
                // Only values that contain the syntax's separator or wildcards are refused.
                let all = [site.as_str(), device.as_str()].into_iter().chain(tail.iter().map(String::as_str));
                prop_assert!(dotted && all.into_iter().any(|v| v.contains('.')), "{} refused", channel);
            }
        }
    }

    /// Any broker bytes reach every client encoding through every route format in a form the
    /// client can parse and that gives back the bytes.
    #[test]
    fn broker_bytes_always_make_usable_frames(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            (90usize..140).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
            "[\\[\\]{}\"\\\\0-9e.:,a-]{0,300}".prop_map(String::into_bytes),
        ],
        key in prop::collection::vec(any::<u8>(), 0..8),
        header in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        harness::broker_bytes(&payload, &key, &header);
    }

    /// Any bytes as a client frame, in both protocols, decode or fail with a documented code.
    #[test]
    fn client_frames_decode_or_fail_cleanly(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            json_value().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        harness::client_frame(&bytes);
    }

    /// Protobuf bytes that decode have a JSON form that encodes back to the same message.
    #[test]
    fn protobuf_json_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        harness::protobuf_round_trip(&bytes);
    }
}

/// Found by the `protobuf_json` fuzz target: a map field whose entries come back in another
/// order is the same message.
#[test]
fn protobuf_map_order_is_not_part_of_the_round_trip() {
    harness::protobuf_round_trip(&[
        26, 0, 42, 8, 10, 1, 0, 45, 26, 0, 42, 8, 10, 1, 0, 45, 0, 64, 255, 255, 42, 32, 32,
    ]);
}
