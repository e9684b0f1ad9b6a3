//! The built-in console page, embedded in the binary: `console/` at `/console/` and the
//! JavaScript client's build (`clients/js/dist/`) at `/console/client/`, so the page imports
//! `./client/index.js`. Nothing is fetched at run time. `build.rs` makes Cargo rebuild when
//! either folder changes.

use include_dir::{Dir, include_dir};

static CONSOLE: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/console");
static CLIENT: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/clients/js/dist");

/// An embedded file and its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub bytes: &'static [u8],
    pub content_type: &'static str,
}

/// The asset at `path` below `/console/` (`""` is the page itself).
pub fn asset(path: &str) -> Option<Asset> {
    let path = if path.is_empty() { "index.html" } else { path };
    // Embedded paths never hold these; refusing them early keeps lookups to plain names.
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return None;
    }
    let file = match path.strip_prefix("client/") {
        Some(rest) => CLIENT.get_file(rest)?,
        None => CONSOLE.get_file(path)?,
    };
    Some(Asset {
        bytes: file.contents(),
        content_type: content_type(path),
    })
}

/// The content type for a file name, by its extension.
pub fn content_type(path: &str) -> &'static str {
    let extension = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "ts" | "txt" | "md" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(
            content_type("client/index.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("a/b.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type("index.d.ts"), "text/plain; charset=utf-8");
        assert_eq!(content_type("index.js.map"), "application/json");
        assert_eq!(content_type("LICENSE"), "application/octet-stream");
    }

    #[test]
    fn the_page_and_the_client_are_embedded() {
        let page = asset("").expect("console/index.html is embedded");
        assert_eq!(page.content_type, "text/html; charset=utf-8");
        assert_eq!(asset("index.html"), Some(page));
        assert!(asset("client/index.js").is_some(), "the client's entry");
        assert_eq!(asset("../Cargo.toml"), None);
        assert_eq!(asset("client/../index.html"), None);
        assert_eq!(asset("missing.js"), None);
    }
}
