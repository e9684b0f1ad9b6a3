//! JSON Schema (draft 2020-12) checks on what clients publish (`json_schema` on a route).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A compiled schema, shared by every publish on its route.
#[derive(Clone)]
pub struct JsonSchema {
    path: PathBuf,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonSchema")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl JsonSchema {
    /// Reads and compiles a schema file.
    pub fn load(path: &Path) -> Result<JsonSchema, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        let validator = jsonschema::draft202012::new(&schema)
            .map_err(|e| format!("{} is not a valid JSON Schema: {e}", path.display()))?;
        Ok(JsonSchema {
            path: path.to_owned(),
            validator: Arc::new(validator),
        })
    }

    /// Checks a value; the error names the failing path(s), e.g. `/samples/0/value: ...`.
    pub fn check(&self, value: &serde_json::Value) -> Result<(), String> {
        let problems: Vec<String> = self
            .validator
            .iter_errors(value)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("{at}: {e}")
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "payload does not match the route's JSON schema: {}",
                problems.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> JsonSchema {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/reading.schema.json");
        JsonSchema::load(&path).unwrap()
    }

    #[test]
    fn accepts_and_refuses_with_the_failing_path() {
        let s = schema();
        let good = json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 21.5}]});
        assert_eq!(s.check(&good), Ok(()));
        let cases = [
            (
                json!({"deviceId": 7, "samples": [{"sensor": "t", "value": 1}]}),
                "/deviceId",
            ),
            (
                json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1e9}]}),
                "/samples/0/value",
            ),
            (
                json!({"samples": [{"sensor": "t", "value": 1}]}),
                "deviceId",
            ),
            (
                json!({"deviceId": "d1", "samples": [{"sensor": "t", "value": 1}], "extra": 1}),
                "extra",
            ),
            (json!("just text"), "/"),
        ];
        for (value, needle) in cases {
            let err = s.check(&value).unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn bad_schema_files_are_explained() {
        assert!(
            JsonSchema::load(Path::new("/nonexistent.json"))
                .unwrap_err()
                .contains("cannot read")
        );
    }
}
