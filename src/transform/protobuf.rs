//! Protobuf payloads: `.proto` files compiled at start-up, and the proto3 JSON mapping.
//!
//! The `schemas` config key lists `.proto` files and folders; they are compiled in pure Rust
//! (protox) into a descriptor pool, so users add message types without rebuilding wsbridge or
//! installing `protoc`. Routes name a message type (`format = "protobuf:iot.v1.Reading"`); broker
//! bytes decode into a dynamic message (prost-reflect) and serialize as canonical proto3 JSON
//! (lowerCamelCase names, 64-bit integers as strings, enums by name, well-known types in their JSON
//! forms). Client JSON is parsed with the proto3 JSON rules (original field names accepted too,
//! unknown fields refused) and encoded.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

use super::{ClientPayload, DecodeError, PayloadError};
use crate::config::ConfigProblem;

/// Message types compiled from the configured `.proto` files.
#[derive(Debug, Clone)]
pub struct Schemas {
    pool: DescriptorPool,
}

impl Schemas {
    /// No message types.
    pub fn empty() -> Schemas {
        Schemas {
            pool: DescriptorPool::new(),
        }
    }

    /// Compiles every `.proto` file named by `paths` (files, or folders searched recursively).
    /// Each folder, and each file's folder, is an import root. Problems are recorded under
    /// `schemas[i]` with the file, line and column protox reports.
    pub fn load(paths: &[PathBuf], problems: &mut Vec<ConfigProblem>) -> Schemas {
        let mut roots: Vec<PathBuf> = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let key = format!("schemas[{i}]");
            if path.is_dir() {
                let before = files.len();
                collect_protos(path, &mut files);
                if files.len() == before {
                    problems.push(ConfigProblem::new(
                        key,
                        format!("{} contains no .proto files", path.display()),
                    ));
                }
                roots.push(path.clone());
            } else if path.is_file() {
                files.push(path.clone());
                roots.push(match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                    _ => PathBuf::from("."),
                });
            } else {
                problems.push(ConfigProblem::new(
                    key,
                    format!("{} does not exist", path.display()),
                ));
            }
        }
        if files.is_empty() {
            return Schemas::empty();
        }
        let compiled = protox::Compiler::new(&roots).and_then(|mut compiler| {
            compiler.include_imports(true);
            compiler.open_files(&files)?;
            Ok(compiler.descriptor_pool())
        });
        match compiled {
            Ok(pool) => Schemas { pool },
            Err(e) => {
                problems.push(ConfigProblem::new("schemas", describe_error(&e)));
                Schemas::empty()
            }
        }
    }

    /// The message type with this full name (`package.Message`).
    pub fn message(&self, name: &str) -> Result<MessageDescriptor, String> {
        self.pool.get_message_by_name(name).ok_or_else(|| {
            let known: Vec<String> = self
                .pool
                .all_messages()
                .map(|m| m.full_name().to_owned())
                .filter(|n| !n.starts_with("google.protobuf."))
                .take(20)
                .collect();
            if known.is_empty() {
                format!("unknown message type {name:?}: no message types are loaded; list .proto files in `schemas`")
            } else {
                format!(
                    "unknown message type {name:?}; loaded: {}",
                    known.join(", ")
                )
            }
        })
    }
}

fn collect_protos(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_protos(&path, into);
        } else if path.extension().is_some_and(|e| e == "proto") {
            into.push(path);
        }
    }
}

/// protox errors name the file; add the line and column of the first problem.
fn describe_error(e: &protox::Error) -> String {
    use miette::Diagnostic;
    let text = e.to_string();
    let position = e
        .labels()
        .and_then(|mut labels| labels.next())
        .and_then(|label| e.source_code()?.read_span(label.inner(), 0, 0).ok())
        .map(|span| (span.line() + 1, span.column() + 1));
    match (e.file(), position) {
        (Some(file), Some((line, column))) => format!("{file}:{line}:{column}: {text}"),
        (Some(file), None) if !text.contains(file) => format!("{file}: {text}"),
        _ => text,
    }
}

/// Decodes broker bytes as `message` and returns its canonical proto3 JSON.
pub fn to_json(message: &MessageDescriptor, bytes: &[u8]) -> Result<Bytes, DecodeError> {
    let decoded = DynamicMessage::decode(message.clone(), bytes)
        .map_err(|e| DecodeError(format!("not a valid {}: {e}", message.full_name())))?;
    let mut out = serde_json::Serializer::new(Vec::with_capacity(bytes.len() * 2 + 16));
    decoded
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .map_err(|e| DecodeError(format!("{} has no JSON form: {e}", message.full_name())))?;
    Ok(Bytes::from(out.into_inner()))
}

/// Encodes a client payload as `message`: JSON is parsed with the proto3 JSON rules; raw bytes
/// must already be a valid encoding and pass through untouched.
pub fn from_client(
    message: &MessageDescriptor,
    payload: ClientPayload,
) -> Result<Bytes, PayloadError> {
    match payload {
        ClientPayload::Json(raw) => {
            let mut json = serde_json::Deserializer::from_str(raw.get());
            let mut track = serde_path_to_error::Track::new();
            let parsed = DynamicMessage::deserialize_with_options(
                message.clone(),
                serde_path_to_error::Deserializer::new(&mut json, &mut track),
                &DeserializeOptions::new().deny_unknown_fields(true),
            );
            let parsed = parsed.and_then(|m| json.end().map(|_| m)).map_err(|e| {
                let path = track.path().to_string();
                let at = if path == "." || path.is_empty() {
                    String::new()
                } else {
                    format!(" at field {path}")
                };
                PayloadError(format!(
                    "payload is not a valid {}{at}: {}",
                    message.full_name(),
                    e.to_string().split(" at line ").next().unwrap_or_default()
                ))
            })?;
            Ok(Bytes::from(parsed.encode_to_vec()))
        }
        ClientPayload::Text(_) => Err(PayloadError(format!(
            "a {} payload is a JSON object (or raw bytes with \"encoding\": \"base64\"), not a string",
            message.full_name()
        ))),
        ClientPayload::Binary(bytes) => {
            DynamicMessage::decode(message.clone(), bytes.as_ref()).map_err(|e| {
                PayloadError(format!(
                    "payload is not a valid {}: {e}",
                    message.full_name()
                ))
            })?;
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn schemas() -> Schemas {
        let mut problems = Vec::new();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let s = Schemas::load(&[root], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        s
    }

    fn json(text: &str) -> ClientPayload {
        ClientPayload::Json(RawValue::from_string(text.to_owned()).unwrap())
    }

    #[test]
    fn round_trips_the_canonical_json_mapping() {
        let reading = schemas().message("iot.v1.Reading").unwrap();
        let input = r#"{"device_id":"d1","takenAt":"2026-11-28T12:00:00Z","samples":[{"sensor":"t","value":21.5,"unit":"UNIT_CELSIUS"}],"sequence":"9007199254740993","labels":{"room":"lab"},"location":{"latitude":52.5,"longitude":13.4},"mains":true}"#;
        let bytes = from_client(&reading, json(input)).unwrap();
        let out: serde_json::Value =
            serde_json::from_slice(&to_json(&reading, &bytes).unwrap()).unwrap();
        assert_eq!(out["deviceId"], "d1", "lowerCamelCase names");
        assert_eq!(
            out["sequence"], "9007199254740993",
            "64-bit integers as strings"
        );
        assert_eq!(out["samples"][0]["unit"], "UNIT_CELSIUS", "enums by name");
        assert_eq!(
            out["takenAt"], "2026-11-28T12:00:00Z",
            "Timestamp as RFC 3339"
        );
        assert_eq!(out["labels"]["room"], "lab");
        assert_eq!(out["mains"], true);
        assert!(
            out.get("batteryVolts").is_none(),
            "the other oneof member is absent"
        );
    }

    #[test]
    fn bad_json_names_the_field() {
        let reading = schemas().message("iot.v1.Reading").unwrap();
        let err = |text: &str| from_client(&reading, json(text)).unwrap_err().0;
        assert!(
            err(r#"{"deviceId": 5}"#).contains("deviceId"),
            "{}",
            err(r#"{"deviceId": 5}"#)
        );
        let unknown = err(r#"{"colour": "red"}"#);
        assert!(unknown.contains("colour"), "{unknown}");
        let nested = err(r#"{"samples": [{"value": "hot"}]}"#);
        assert!(
            nested.contains("samples") && nested.contains("value"),
            "{nested}"
        );
        let range = err(r#"{"location": {"latitude": 1e400}}"#);
        assert!(range.contains("location"), "{range}");
        assert!(from_client(&reading, ClientPayload::Text("x".into())).is_err());
        assert!(
            from_client(
                &reading,
                ClientPayload::Binary(Bytes::from_static(&[0xff, 0xff]))
            )
            .is_err()
        );
    }

    #[test]
    fn garbage_bytes_are_a_decode_error() {
        let reading = schemas().message("iot.v1.Reading").unwrap();
        assert!(to_json(&reading, &[0x0a, 0xff, 0x01]).is_err());
    }

    #[test]
    fn load_reports_missing_files_and_syntax_errors() {
        let dir = std::env::temp_dir().join(format!("wsbridge-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let broken = dir.join("broken.proto");
        std::fs::write(
            &broken,
            "syntax = \"proto3\";\nmessage A {\n  int32 x = ;\n}\n",
        )
        .unwrap();
        let mut problems = Vec::new();
        Schemas::load(&[broken.clone(), dir.join("missing.proto")], &mut problems);
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("schemas[1]: ") && t.contains("does not exist")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("broken.proto:3:")),
            "{text:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
