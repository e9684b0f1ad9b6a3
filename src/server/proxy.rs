//! Behind a load balancer: which TCP peers are trusted proxies (`server.trusted_proxies`), and
//! the client address such a peer reports.
//!
//! A trusted peer reports the client either in a PROXY protocol v1/v2 header sent before
//! anything else on the connection (`server.proxy_protocol = true`; parsed with the `ppp`
//! crate), or in each request's `Forwarded` (RFC 7239) or `X-Forwarded-For` header. Every proxy
//! on the way appends the address it received the request from, so the list is read from the
//! right: the first entry that is not itself a trusted proxy is the client. Anything a client
//! wrote to the left of that is ignored, since the client could have forged it. Nothing an
//! untrusted peer sends is believed.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::Peer;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;

/// The first bytes of a PROXY protocol v1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The signature that opens a PROXY protocol v2 header.
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
/// The fixed part of a v2 header: signature, version and command, family, address length.
const V2_FIXED_LENGTH: usize = 16;
/// Longest v1 header, `\r\n` included (the specification's limit).
const V1_MAX_LENGTH: usize = 107;

/// The header a trusted proxy names the client in (`server.forwarded_header`). Only that one is
/// read: a proxy that writes one of them passes the other on as the client sent it, forged or
/// not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (nginx, HAProxy, most cloud load balancers).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The parsed `server.trusted_proxies`, and the header they name clients in.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// One `server.trusted_proxies` entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address.
    pub fn parse_entry(entry: &str) -> Option<IpNet> {
        let entry = entry.trim();
        IpNet::from_str(entry)
            .ok()
            .or_else(|| IpAddr::from_str(entry).ok().map(IpNet::from))
    }

    /// The valid entries of `entries` (`ServerConfig::validate` reports the others).
    pub fn new(entries: &[String], header: ForwardedHeader) -> Self {
        TrustedProxies {
            nets: entries
                .iter()
                .filter_map(|e| Self::parse_entry(e))
                .collect(),
            header,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy. An IPv4 address seen through an IPv6 socket
    /// (`::ffff:10.0.0.1`) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client a trusted proxy reports in the request's `X-Forwarded-For` or `Forwarded`
    /// header (whichever `server.forwarded_header` names). `None` when it names no client the
    /// gateway can believe (no header, or an obfuscated or unparsable entry where the client
    /// should be); the connection's own peer is then the client.
    pub fn client_address(&self, headers: &HeaderMap) -> Option<SocketAddr> {
        let lines = |name| {
            headers
                .get_all(name)
                .into_iter()
                .filter_map(|v| v.to_str().ok())
        };
        let hops: Vec<Option<SocketAddr>> = match self.header {
            ForwardedHeader::Forwarded => lines("forwarded")
                .flat_map(|line| split_unquoted(line, ','))
                .map(forwarded_for)
                .collect(),
            ForwardedHeader::XForwardedFor => lines("x-forwarded-for")
                .flat_map(|line| line.split(','))
                .map(parse_node)
                .collect(),
        };
        let mut leftmost = None;
        for hop in hops.iter().rev() {
            let addr = (*hop)?;
            if !self.contains(addr.ip()) {
                return Some(addr);
            }
            leftmost = Some(addr);
        }
        // Every hop is a trusted proxy: the request started on one of them.
        leftmost
    }
}

/// Splits on `separator` outside double-quoted strings.
fn split_unquoted(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter()
}

/// The `for=` node of one `Forwarded` element (`for=192.0.2.60;proto=http;by=203.0.113.43`).
fn forwarded_for(element: &str) -> Option<SocketAddr> {
    split_unquoted(element, ';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value))
            .flatten()
    })
}

/// A node as proxies write it: `192.0.2.60`, `192.0.2.60:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally double-quoted. Port 0 when none is given. `unknown`,
/// obfuscated identifiers (`_hidden`) and anything else give `None`.
fn parse_node(node: &str) -> Option<SocketAddr> {
    let node = node.trim();
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node)
        .trim();
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip = Ipv6Addr::from_str(ip).ok()?;
        let port = match after {
            "" => 0,
            _ => port(after.strip_prefix(':')?)?,
        };
        return Some(SocketAddr::new(IpAddr::V6(ip), port));
    }
    if let Ok(ip) = IpAddr::from_str(node) {
        return Some(SocketAddr::new(ip, 0));
    }
    let (ip, p) = node.rsplit_once(':')?;
    let ip = std::net::Ipv4Addr::from_str(ip).ok()?;
    Some(SocketAddr::new(IpAddr::V4(ip), port(p)?))
}

/// A decimal port; obfuscated ports (`_abc`) are not ports.
fn port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Why a trusted peer's PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one PROXY protocol v1 or v2 header from the start of `stream`, leaving what
/// follows (TLS, HTTP) unread. Gives the client's address, or `None` for a header that names no
/// client (v1 `UNKNOWN`, v2 `LOCAL`: the proxy's own health checks), whose connection then
/// counts as the proxy's. The caller bounds the time this takes.
pub async fn read_proxy_header<S>(stream: &mut S) -> Result<Option<SocketAddr>, ProxyHeaderError>
where
    S: AsyncRead + Unpin,
{
    // A v1 header is at least 15 bytes ("PROXY UNKNOWN\r\n") and a v2 header 16, so reading the
    // v2 signature's 12 bytes never reads past the header.
    let mut header = vec![0u8; V2_SIGNATURE.len()];
    stream.read_exact(&mut header).await?;
    if header == V2_SIGNATURE {
        header.resize(V2_FIXED_LENGTH, 0);
        stream.read_exact(&mut header[V2_SIGNATURE.len()..]).await?;
        let length = u16::from_be_bytes([header[14], header[15]]) as usize;
        let start = header.len();
        header.resize(start + length, 0);
        stream.read_exact(&mut header[start..]).await?;
    } else if header.starts_with(V1_PREFIX) {
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX_LENGTH {
                return Err(ProxyHeaderError::Malformed(
                    "a v1 header longer than 107 bytes".into(),
                ));
            }
            header.push(stream.read_u8().await?);
        }
    } else {
        return Err(ProxyHeaderError::Missing);
    }
    parse_proxy_header(&header)
}

/// The client address in one complete PROXY protocol header.
pub fn parse_proxy_header(header: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let malformed = |e: &dyn std::fmt::Display| ProxyHeaderError::Malformed(e.to_string());
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(parsed)) => Ok(match parsed.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V1(Err(e)) => Err(malformed(&format!("{e:?}"))),
        ppp::HeaderResult::V2(Ok(parsed)) => {
            if parsed.command == ppp::v2::Command::Local {
                return Ok(None);
            }
            Ok(match parsed.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
            })
        }
        ppp::HeaderResult::V2(Err(e)) => Err(malformed(&format!("{e:?}"))),
    }
}

/// Whether an untrusted peer opens its connection with a PROXY protocol header, which it may not
/// send. Looks without consuming, and waits only as long as the first bytes leave it open.
pub async fn sends_proxy_header(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 12];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let seen = &buf[..n];
        let v1 = V1_PREFIX.starts_with(&seen[..n.min(V1_PREFIX.len())]);
        let v2 = V2_SIGNATURE.starts_with(seen);
        if !(v1 || v2) {
            return false;
        }
        if (v1 && n >= V1_PREFIX.len()) || (v2 && n == V2_SIGNATURE.len()) {
            return true;
        }
        // A prefix of a header so far: look again once more bytes can have come (the socket
        // stays readable while the prefix sits unread, so waiting for readiness would spin).
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The middleware of a connection from a trusted proxy that reports clients in headers: for each
/// request, finds the client, counts it against the per-address limits (refusing it as the
/// accept loop refuses a direct connection), and hands the handlers its [`Peer`].
#[derive(Clone)]
pub(super) struct ForwardedClients {
    pub proxies: Arc<TrustedProxies>,
    pub limits: Arc<ConnectionLimits>,
    pub tcp_peer: SocketAddr,
    pub abort: CancellationToken,
    pub metrics: Arc<Metrics>,
}

impl ForwardedClients {
    pub(super) async fn admit(self, mut request: Request, next: Next) -> Response {
        let addr = self
            .proxies
            .client_address(request.headers())
            .unwrap_or(self.tcp_peer);
        match self.limits.admit(addr.ip()) {
            Ok(permit) => {
                request.extensions_mut().insert(Peer {
                    addr,
                    tcp_peer: self.tcp_peer,
                    _permit: Arc::new(permit),
                    abort: self.abort,
                });
                next.run(request).await
            }
            Err(refusal) => {
                tracing::debug!(peer = %addr, proxy = %self.tcp_peer, ?refusal, "request refused by limits");
                self.metrics.upgrade_refused("limits");
                let (code, _, body) = refusal.status_and_body();
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn proxies_reading(entries: &[&str], header: ForwardedHeader) -> TrustedProxies {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        TrustedProxies::new(&entries, header)
    }

    fn proxies(entries: &[&str]) -> TrustedProxies {
        proxies_reading(entries, ForwardedHeader::XForwardedFor)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn entries_are_cidrs_or_addresses() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "fd00::/8"]);
        assert!(p.contains("10.1.2.3".parse().unwrap()));
        assert!(p.contains("192.168.1.7".parse().unwrap()));
        assert!(!p.contains("192.168.1.8".parse().unwrap()));
        assert!(p.contains("fd12::1".parse().unwrap()));
        assert!(p.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(TrustedProxies::parse_entry("10.0.0.0/33").is_none());
        assert!(TrustedProxies::parse_entry("proxy.local").is_none());
    }

    #[test]
    fn config_problems_name_the_entry() {
        let config = crate::server::ServerConfig {
            trusted_proxies: vec![
                "10.0.0.0/8".into(),
                "192.0.2.1".into(),
                "10.0.0.0/33".into(),
            ],
            ..Default::default()
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(
            shown[0].starts_with("server.trusted_proxies[2]: invalid CIDR \"10.0.0.0/33\""),
            "{shown:?}"
        );
        let config = crate::server::ServerConfig {
            proxy_protocol: true,
            ..Default::default()
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .to_string()
                .starts_with("server.proxy_protocol: ")
        );
    }

    #[test]
    fn x_forwarded_for_gives_the_rightmost_untrusted_address() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.4, 10.0.0.2")]);
        assert_eq!(p.client_address(&h), addr("198.51.100.4:0"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.4:5555"),
        ]);
        assert_eq!(p.client_address(&h), addr("198.51.100.4:5555"));
        let h = headers(&[("x-forwarded-for", "2001:db8::7, [2001:db8::8]:443")]);
        assert_eq!(p.client_address(&h), addr("[2001:db8::8]:443"));
        // Only proxies: the left-most one is where the request started.
        let h = headers(&[("x-forwarded-for", "10.0.0.5, 10.0.0.2")]);
        assert_eq!(p.client_address(&h), addr("10.0.0.5:0"));
    }

    #[test]
    fn forwarded_is_parsed_per_rfc_7239_when_configured() {
        let p = proxies_reading(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        let h = headers(&[
            (
                "forwarded",
                "for=192.0.2.43, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.3;by=10.0.0.1",
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(p.client_address(&h), addr("[2001:db8:cafe::17]:4711"));
        let h = headers(&[(
            "forwarded",
            "proto=http;For=\"192.0.2.60:8080\";by=10.0.0.9",
        )]);
        assert_eq!(p.client_address(&h), addr("192.0.2.60:8080"));
        // The header the proxies do not write is the client's own, and not read.
        let h = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(p.client_address(&h), None);
        let h = headers(&[("forwarded", "for=198.51.100.1")]);
        assert_eq!(proxies(&["10.0.0.0/8"]).client_address(&h), None);
    }

    #[test]
    fn obfuscated_unknown_and_garbage_name_no_client() {
        let p = proxies_reading(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        for h in [
            headers(&[("forwarded", "for=_hidden, for=10.0.0.2")]),
            headers(&[("forwarded", "for=unknown")]),
            headers(&[("forwarded", "for=\"192.0.2.1:_port\"")]),
            headers(&[("forwarded", "proto=https")]),
            headers(&[("forwarded", "for=\"[2001:db8::1\"")]),
        ] {
            assert_eq!(p.client_address(&h), None, "{h:?}");
        }
        let p = proxies(&["10.0.0.0/8"]);
        for h in [
            headers(&[("x-forwarded-for", "unknown")]),
            headers(&[("x-forwarded-for", "_hidden")]),
            headers(&[("x-forwarded-for", "not an address")]),
            headers(&[("x-forwarded-for", "[2001:db8::1")]),
            headers(&[("x-forwarded-for", "")]),
            headers(&[("x-forwarded-for", "999.1.1.1")]),
            headers(&[]),
        ] {
            assert_eq!(p.client_address(&h), None, "{h:?}");
        }
        // An entry the client forged left of the real one is never reached.
        let h = headers(&[("x-forwarded-for", "garbage, 198.51.100.4")]);
        assert_eq!(p.client_address(&h), addr("198.51.100.4:0"));
    }

    #[test]
    fn proxy_v1_headers() {
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n").unwrap(),
            addr("203.0.113.7:51234")
        );
        assert_eq!(
            parse_proxy_header(b"PROXY TCP6 2001:db8::9 2001:db8::1 4000 443\r\n").unwrap(),
            addr("[2001:db8::9]:4000")
        );
        assert_eq!(parse_proxy_header(b"PROXY UNKNOWN\r\n").unwrap(), None);
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 2001:db8::9 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 443\r\n",
        ] {
            assert!(
                matches!(parse_proxy_header(bad), Err(ProxyHeaderError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn v2(command: ppp::v2::Command, source: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let destination: SocketAddr = if source.is_ipv4() {
            "10.0.0.1:443".parse().unwrap()
        } else {
            "[2001:db8::1]:443".parse().unwrap()
        };
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | command,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .write_tlv(ppp::v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap()
    }

    #[test]
    fn proxy_v2_headers() {
        use ppp::v2::Command;
        let header = v2(Command::Proxy, "203.0.113.7:51234");
        assert_eq!(
            parse_proxy_header(&header).unwrap(),
            addr("203.0.113.7:51234")
        );
        let header = v2(Command::Proxy, "[2001:db8::9]:4000");
        assert_eq!(
            parse_proxy_header(&header).unwrap(),
            addr("[2001:db8::9]:4000")
        );
        let header = v2(Command::Local, "203.0.113.7:51234");
        assert_eq!(parse_proxy_header(&header).unwrap(), None);
        let mut wrong_version = v2(Command::Proxy, "203.0.113.7:51234");
        wrong_version[12] = 0x31;
        assert!(parse_proxy_header(&wrong_version).is_err());
    }

    #[tokio::test]
    async fn reading_stops_at_the_end_of_the_header() {
        for header in [
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec(),
            v2(ppp::v2::Command::Proxy, "203.0.113.7:51234"),
        ] {
            let mut input = header.clone();
            input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            let mut reader = &input[..];
            let client = read_proxy_header(&mut reader).await.unwrap();
            assert_eq!(client, addr("203.0.113.7:51234"));
            assert_eq!(reader, b"GET / HTTP/1.1\r\n\r\n");
        }
        let mut plain = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        assert!(matches!(
            read_proxy_header(&mut plain).await,
            Err(ProxyHeaderError::Missing)
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read_proxy_header(&mut long.as_bytes()).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut truncated = &b"PROXY TCP4 203.0.113.7"[..];
        assert!(matches!(
            read_proxy_header(&mut truncated).await,
            Err(ProxyHeaderError::Io(_))
        ));
    }
}
