//! Opening one upstream WebSocket: TCP, TLS for `wss://` (system trust roots), the handshake,
//! all within one deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer of an upstream connection, as small as the client side's.
const READ_BUFFER_SIZE: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes to the upstream socket (each relayed message is
/// flushed anyway).
const WRITE_BUFFER_SIZE: usize = 16 * 1024;

/// A byte stream to an upstream, plain or TLS.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> UpstreamIo for T {}

/// An open upstream WebSocket.
pub type UpstreamSocket = WebSocketStream<Pin<Box<dyn UpstreamIo>>>;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
}

/// A checked `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    /// As configured (the label of its metrics, the admin API's `upstream`).
    pub url: String,
    pub secure: bool,
    pub host: String,
    pub port: u16,
}

impl UpstreamUrl {
    /// Parses a configured URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => {
                return Err(format!(
                    "{url:?} must be a ws:// or wss:// URL, e.g. \"ws://127.0.0.1:9101/chat\""
                ));
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        Ok(UpstreamUrl {
            url: url.to_owned(),
            secure,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: uri.port_u16().unwrap_or(if secure { 443 } else { 80 }),
        })
    }

    /// This URL with the client's query string appended (after its own, if any).
    pub fn with_query(&self, query: Option<&str>) -> String {
        match query.filter(|q| !q.is_empty()) {
            None => self.url.clone(),
            Some(q) if self.url.contains('?') => format!("{}&{q}", self.url),
            Some(q) => format!("{}?{q}", self.url),
        }
    }
}

/// The TLS client for `wss://` upstreams, trusting the system's CA certificates.
pub fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A malformed system certificate must not keep the others from being used.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The WebSocket settings of an upstream connection: small buffers, messages up to the
/// tungstenite default size (64 MiB).
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(WRITE_BUFFER_SIZE)
}

/// Opens `request` to `upstream` within `timeout`; returns the socket and the subprotocol the
/// upstream chose.
pub async fn open(
    upstream: &UpstreamUrl,
    request: Request,
    timeout: Duration,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<(UpstreamSocket, Option<String>), ConnectError> {
    let attempt = async {
        let tcp = TcpStream::connect((upstream.host.as_str(), upstream.port)).await?;
        let _ = tcp.set_nodelay(true);
        let io: Pin<Box<dyn UpstreamIo>> = if upstream.secure {
            let connector = tls.ok_or_else(|| ConnectError::Tls("no TLS client".into()))?;
            let name = rustls::pki_types::ServerName::try_from(upstream.host.clone())
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
            Box::pin(stream)
        } else {
            Box::pin(tcp)
        };
        let (socket, response) =
            tokio_tungstenite::client_async_with_config(request, io, Some(socket_config()))
                .await
                .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        let chosen = response
            .headers()
            .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((socket, chosen))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ws_and_wss_urls() {
        let u = UpstreamUrl::parse("ws://127.0.0.1:9101/chat").unwrap();
        assert_eq!(
            (u.secure, u.host.as_str(), u.port),
            (false, "127.0.0.1", 9101)
        );
        let u = UpstreamUrl::parse("wss://chat.example.com/socket").unwrap();
        assert_eq!((u.secure, u.port), (true, 443));
        let u = UpstreamUrl::parse("ws://[::1]:80/").unwrap();
        assert_eq!(u.host, "::1");
        assert!(UpstreamUrl::parse("http://a/").is_err());
        assert!(UpstreamUrl::parse("ws://user:pw@a/").is_err());
        assert!(UpstreamUrl::parse("nonsense").is_err());
    }

    #[test]
    fn appends_the_client_query() {
        let u = UpstreamUrl::parse("ws://a:1/chat").unwrap();
        assert_eq!(u.with_query(Some("room=5")), "ws://a:1/chat?room=5");
        assert_eq!(u.with_query(Some("")), "ws://a:1/chat");
        let u = UpstreamUrl::parse("ws://a:1/chat?v=2").unwrap();
        assert_eq!(u.with_query(Some("room=5")), "ws://a:1/chat?v=2&room=5");
    }
}
