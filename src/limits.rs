//! The `[limits]` table: connection caps at accept time and per-connection publish rates.
//!
//! Connection limits are checked before any HTTP is parsed: total open connections, open
//! connections per client IP, and new connections per second per IP (a token bucket). (The
//! server checks connections from trusted proxies once it knows the client they carry.) A refused
//! connection gets a short HTTP 503 or 429 and is closed. Publish limits are token buckets per
//! connection, in messages and bytes per second; a publish over the limit is answered with
//! `rate_limited` and not sent. Subscribes and unsubscribes share a bucket of their own, also
//! answered with `rate_limited`. HTTP publishes (`POST /publish`), which have no connection to
//! count against, use the same two publish rates per client address ([`AddressPublishLimiter`]).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::config::ConfigProblem;

/// The `[limits]` table. A value of 0 turns that limit off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Open connections in total.
    pub max_connections: usize,
    /// Open connections per client IP address.
    pub max_connections_per_ip: usize,
    /// New connections per second per client IP address (burst of the same size).
    pub new_connections_per_second_per_ip: u32,
    /// Publishes per second per connection (burst of the same size).
    pub publish_per_second: u32,
    /// Publish payload bytes per second per connection.
    pub publish_bytes_per_second: u32,
    /// Subscribe and unsubscribe requests per second per connection (burst of the same size).
    pub subscribe_per_second: u32,
    /// Replay subscriptions (`from` other than `"latest"`) one connection may hold at once.
    pub max_replays_per_connection: usize,
    /// Replay subscriptions the whole gateway holds at once.
    pub max_replays: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            new_connections_per_second_per_ip: 200,
            publish_per_second: 1_000,
            publish_bytes_per_second: 10 * 1024 * 1024,
            subscribe_per_second: 100,
            max_replays_per_connection: 10,
            max_replays: 1_000,
        }
    }
}

impl LimitsConfig {
    /// No limits at all (benchmarks, tests of other behaviour).
    pub fn unlimited() -> Self {
        LimitsConfig {
            max_connections: 0,
            max_connections_per_ip: 0,
            new_connections_per_second_per_ip: 0,
            publish_per_second: 0,
            publish_bytes_per_second: 0,
            subscribe_per_second: 0,
            max_replays_per_connection: 0,
            max_replays: 0,
        }
    }

    pub(crate) fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        if self.max_connections != 0 && self.max_connections_per_ip > self.max_connections {
            problems.push(ConfigProblem::new(
                "limits.max_connections_per_ip",
                format!(
                    "{} is above limits.max_connections ({})",
                    self.max_connections_per_ip, self.max_connections
                ),
            ));
        }
    }
}

/// Why a connection was refused at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The gateway holds `max_connections`.
    Full,
    /// This address holds `max_connections_per_ip`.
    PerIp,
    /// This address opens connections too fast.
    Rate,
}

impl Refusal {
    /// The HTTP status code and reason, and the text body of the refusal.
    pub fn status_and_body(self) -> (u16, &'static str, &'static str) {
        match self {
            Refusal::Full => (503, "Service Unavailable", "too many connections\n"),
            Refusal::PerIp => (
                429,
                "Too Many Requests",
                "too many connections from your address\n",
            ),
            Refusal::Rate => (
                429,
                "Too Many Requests",
                "new connections from your address too fast\n",
            ),
        }
    }

    /// The raw HTTP response sent before closing.
    pub fn response(self) -> String {
        let (code, reason, body) = self.status_and_body();
        format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Counts open connections and paces new ones.
pub struct ConnectionLimits {
    config: LimitsConfig,
    open: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Held while a connection is open; releases its slot when dropped.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        ConnectionLimits {
            rate: NonZeroU32::new(config.new_connections_per_second_per_ip)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            config: config.clone(),
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        }
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        if let Some(rate) = &self.rate
            && rate.check_key(&ip).is_err()
        {
            return Err(Refusal::Rate);
        }
        let max = self.config.max_connections;
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refusal::Full);
        }
        let per_ip = self.config.max_connections_per_ip;
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if per_ip != 0 && *count >= per_ip {
            drop(count);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Forgets rate state of addresses that have been quiet (bounds memory).
    pub fn forget_idle(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        self.limits.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// Token buckets for one connection's requests.
pub struct RequestLimiter {
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<(DefaultDirectRateLimiter, u32)>,
    subscribes: Option<DefaultDirectRateLimiter>,
}

impl RequestLimiter {
    /// `max_message_size` bounds one publish, so the byte bucket holds at least that much.
    pub fn new(config: &LimitsConfig, max_message_size: usize) -> Self {
        let bytes = NonZeroU32::new(config.publish_bytes_per_second).map(|rate| {
            let burst = rate.max(
                NonZeroU32::new(max_message_size.min(u32::MAX as usize) as u32).unwrap_or(rate),
            );
            (
                RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                burst.get(),
            )
        });
        RequestLimiter {
            messages: NonZeroU32::new(config.publish_per_second)
                .map(|n| RateLimiter::direct(Quota::per_second(n))),
            bytes,
            subscribes: NonZeroU32::new(config.subscribe_per_second)
                .map(|n| RateLimiter::direct(Quota::per_second(n))),
        }
    }

    /// Takes one subscribe or unsubscribe from its bucket, or says it exceeds the limit.
    pub fn check_subscribe(&self) -> Result<(), String> {
        match &self.subscribes {
            Some(bucket) if bucket.check().is_err() => Err(
                "subscribe rate limit reached (limits.subscribe_per_second); the request was not carried out".into(),
            ),
            _ => Ok(()),
        }
    }

    /// Takes one publish of `size` bytes from the buckets, or says which limit it exceeds.
    pub fn check_publish(&self, size: usize) -> Result<(), String> {
        if let Some(messages) = &self.messages
            && messages.check().is_err()
        {
            return Err("publish rate limit reached (limits.publish_per_second)".into());
        }
        if let Some((bytes, burst)) = &self.bytes {
            let n = size.clamp(1, *burst as usize) as u32;
            let n = NonZeroU32::new(n).expect("clamped to at least 1");
            if !matches!(bytes.check_n(n), Ok(Ok(()))) {
                return Err(
                    "publish byte rate limit reached (limits.publish_bytes_per_second)".into(),
                );
            }
        }
        Ok(())
    }
}

/// How many checks an [`AddressPublishLimiter`] makes between forgetting quiet addresses.
const FORGET_EVERY: u64 = 1024;

/// The publish rates (`limits.publish_per_second`, `limits.publish_bytes_per_second`) per client
/// address, for publishes that arrive without a connection of their own (HTTP publish).
pub struct AddressPublishLimiter {
    messages: Option<DefaultKeyedRateLimiter<IpAddr>>,
    bytes: Option<(DefaultKeyedRateLimiter<IpAddr>, u32)>,
    checks: AtomicU64,
}

impl AddressPublishLimiter {
    /// `max_message_size` bounds one publish, so the byte bucket holds at least that much.
    pub fn new(config: &LimitsConfig, max_message_size: usize) -> Self {
        let bytes = NonZeroU32::new(config.publish_bytes_per_second).map(|rate| {
            let burst = rate.max(
                NonZeroU32::new(max_message_size.min(u32::MAX as usize) as u32).unwrap_or(rate),
            );
            (
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
                burst.get(),
            )
        });
        AddressPublishLimiter {
            messages: NonZeroU32::new(config.publish_per_second)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            bytes,
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one publish of `size` bytes from `ip`'s buckets, or says which limit it exceeds.
    pub fn check_publish(&self, ip: IpAddr, size: usize) -> Result<(), String> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            if let Some(messages) = &self.messages {
                messages.retain_recent();
            }
            if let Some((bytes, _)) = &self.bytes {
                bytes.retain_recent();
            }
        }
        if let Some(messages) = &self.messages
            && messages.check_key(&ip).is_err()
        {
            return Err(
                "publish rate limit reached for your address (limits.publish_per_second)".into(),
            );
        }
        if let Some((bytes, burst)) = &self.bytes {
            let n =
                NonZeroU32::new(size.clamp(1, *burst as usize) as u32).unwrap_or(NonZeroU32::MIN);
            if !matches!(bytes.check_key_n(&ip, n), Ok(Ok(()))) {
                return Err(
                    "publish byte rate limit reached for your address (limits.publish_bytes_per_second)"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_caps_release_on_drop() {
        let limits = Arc::new(ConnectionLimits::new(&LimitsConfig {
            max_connections: 3,
            max_connections_per_ip: 2,
            new_connections_per_second_per_ip: 0,
            ..LimitsConfig::unlimited()
        }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limits.admit(a).unwrap();
        let _p2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refusal::PerIp));
        let _p3 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some(Refusal::Full));
        drop(p1);
        let _p4 = limits.admit(a).unwrap();
        assert_eq!(limits.open_connections(), 3);
    }

    #[test]
    fn new_connection_rate_is_per_address() {
        let limits = Arc::new(ConnectionLimits::new(&LimitsConfig {
            new_connections_per_second_per_ip: 2,
            ..LimitsConfig::unlimited()
        }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let _k1 = limits.admit(a).unwrap();
        let _k2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refusal::Rate));
        assert!(limits.admit(b).is_ok());
    }

    #[test]
    fn publish_limits_count_messages_and_bytes() {
        let messages = RequestLimiter::new(
            &LimitsConfig {
                publish_per_second: 3,
                ..LimitsConfig::unlimited()
            },
            1024,
        );
        assert!((0..3).all(|_| messages.check_publish(10).is_ok()));
        assert!(
            messages
                .check_publish(10)
                .unwrap_err()
                .contains("publish_per_second")
        );

        let bytes = RequestLimiter::new(
            &LimitsConfig {
                publish_bytes_per_second: 100,
                ..LimitsConfig::unlimited()
            },
            50,
        );
        assert!(bytes.check_publish(60).is_ok());
        assert!(
            bytes
                .check_publish(60)
                .unwrap_err()
                .contains("publish_bytes_per_second")
        );
        assert!(
            RequestLimiter::new(&LimitsConfig::unlimited(), 10)
                .check_publish(1 << 20)
                .is_ok()
        );
    }

    #[test]
    fn address_publish_limits_are_per_address() {
        let limiter = AddressPublishLimiter::new(
            &LimitsConfig {
                publish_per_second: 2,
                ..LimitsConfig::unlimited()
            },
            1024,
        );
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limiter.check_publish(a, 10).is_ok());
        assert!(limiter.check_publish(a, 10).is_ok());
        assert!(
            limiter
                .check_publish(a, 10)
                .unwrap_err()
                .contains("publish_per_second")
        );
        assert!(limiter.check_publish(b, 10).is_ok());

        let bytes = AddressPublishLimiter::new(
            &LimitsConfig {
                publish_bytes_per_second: 100,
                ..LimitsConfig::unlimited()
            },
            50,
        );
        assert!(bytes.check_publish(a, 60).is_ok());
        assert!(
            bytes
                .check_publish(a, 60)
                .unwrap_err()
                .contains("publish_bytes_per_second")
        );
        assert!(bytes.check_publish(b, 60).is_ok());
    }
}
