//! Every open client connection (WebSocket sessions, Server-Sent Events streams and proxied
//! WebSocket pairs), for the admin API.
//!
//! A connection registers itself when it starts and holds the [`Registration`]; dropping it (the
//! connection ending, by a panic too) removes the entry. An entry shares the connection's
//! [`Outbox`] (its queued and dropped counts are read when asked for) and a list of its
//! subscription patterns, updated on subscribe and unsubscribe only: nothing here is touched per
//! delivered message.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;

use super::sse::event::SSE;
use super::ws::protocol::Protocol;
use crate::fanout::{Encoding, Outbox, Status};

/// WebSocket close code (and SSE status code) for a connection closed through the admin API.
pub const CLOSE_BY_ADMINISTRATOR: u16 = 4002;
/// The close reason that goes with [`CLOSE_BY_ADMINISTRATOR`].
pub const CLOSED_BY_ADMINISTRATOR: &str = "closed by administrator";

/// Which edge a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    WebSocket(Protocol),
    Sse,
    /// A client relayed to an upstream WebSocket service by a proxy route.
    Proxy,
}

impl ConnectionKind {
    /// `ws`, `sse` or `proxy`.
    pub fn edge(&self) -> &'static str {
        match self {
            ConnectionKind::WebSocket(_) => "ws",
            ConnectionKind::Sse => "sse",
            ConnectionKind::Proxy => "proxy",
        }
    }

    /// The negotiated subprotocol (`wsbridge.v1.json`, `wsbridge.v1.protobuf`), `sse`, or
    /// `proxy` (a proxied pair's own subprotocol is in [`ProxiedTo`]).
    pub fn protocol(&self) -> &'static str {
        match self {
            ConnectionKind::WebSocket(p) => p.subprotocol(),
            ConnectionKind::Sse => "sse",
            ConnectionKind::Proxy => "proxy",
        }
    }
}

/// Where a proxied connection is relayed to.
#[derive(Debug, Clone)]
pub struct ProxiedTo {
    /// The proxy route's public path.
    pub proxy: String,
    /// The upstream URL, as configured.
    pub upstream: String,
    /// The subprotocol the upstream chose, if any.
    pub subprotocol: Option<String>,
}

/// One open connection as the admin API shows it.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    /// The client's address.
    pub remote_address: SocketAddr,
    /// The token's subject; `None` for anonymous connections.
    pub subject: Option<String>,
    pub kind: ConnectionKind,
    pub connected_since: SystemTime,
    /// For a proxied connection, its route and upstream.
    pub proxied: Option<ProxiedTo>,
    outbox: Arc<Outbox>,
    subscriptions: Mutex<Vec<String>>,
}

impl Connection {
    /// The channel patterns it is subscribed to, sorted.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Messages queued for it now, and messages dropped for it (slow consumer) so far.
    pub fn queue_counts(&self) -> (usize, u64) {
        self.outbox.counts()
    }

    pub(crate) fn subscribed(&self, pattern: &str) {
        let mut list = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(at) = list.binary_search_by(|p| p.as_str().cmp(pattern)) {
            list.insert(at, pattern.to_owned());
        }
    }

    pub(crate) fn unsubscribed(&self, pattern: &str) {
        let mut list = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(at) = list.binary_search_by(|p| p.as_str().cmp(pattern)) {
            list.remove(at);
        }
    }

    /// Closes the connection: a WebSocket gets close code 4002 with the reason "closed by
    /// administrator"; an SSE stream gets a `closed_by_administrator` status event and ends.
    pub fn close_by_administrator(&self) {
        if self.kind == ConnectionKind::Sse {
            self.outbox.push_control(SSE.status(&Status {
                code: "closed_by_administrator",
                message: "an administrator closed this stream".into(),
                ..Status::default()
            }));
        }
        self.outbox
            .close(CLOSE_BY_ADMINISTRATOR, CLOSED_BY_ADMINISTRATOR);
    }
}

/// The open connections by id.
#[derive(Debug, Default)]
pub struct Connections {
    open: DashMap<u64, Arc<Connection>>,
}

/// What a connection needs to register.
pub struct NewConnection {
    pub id: u64,
    pub remote_address: SocketAddr,
    pub subject: Option<String>,
    pub kind: ConnectionKind,
    pub outbox: Arc<Outbox>,
}

impl Connections {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lists a connection until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, new: NewConnection) -> Registration {
        self.insert(new, None)
    }

    /// Lists a proxied connection until the returned registration is dropped. Closing it by
    /// administrator asks its outbox to close, as for any WebSocket.
    pub fn register_proxied(self: &Arc<Self>, new: NewConnection, to: ProxiedTo) -> Registration {
        self.insert(new, Some(to))
    }

    fn insert(self: &Arc<Self>, new: NewConnection, proxied: Option<ProxiedTo>) -> Registration {
        let entry = Arc::new(Connection {
            id: new.id,
            remote_address: new.remote_address,
            subject: new.subject,
            kind: new.kind,
            connected_since: SystemTime::now(),
            proxied,
            outbox: new.outbox,
            subscriptions: Mutex::new(Vec::new()),
        });
        self.open.insert(new.id, entry.clone());
        Registration {
            registry: self.clone(),
            entry,
        }
    }

    /// One connection.
    pub fn get(&self, id: u64) -> Option<Arc<Connection>> {
        self.open.get(&id).map(|e| e.value().clone())
    }

    /// Every open connection, by id.
    pub fn list(&self) -> Vec<Arc<Connection>> {
        let mut all: Vec<Arc<Connection>> = self.open.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Messages queued for all connections together.
    pub fn queued_messages(&self) -> usize {
        self.open.iter().map(|e| e.value().queue_counts().0).sum()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// A connection's place in [`Connections`]; removed when dropped.
pub struct Registration {
    registry: Arc<Connections>,
    entry: Arc<Connection>,
}

impl Registration {
    pub fn entry(&self) -> &Arc<Connection> {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .open
            .remove_if(&self.entry.id, |_, e| Arc::ptr_eq(e, &self.entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_until_its_registration_drops() {
        let registry = Arc::new(Connections::new());
        let registration = registry.register(NewConnection {
            id: 7,
            remote_address: SocketAddr::from(([127, 0, 0, 1], 4000)),
            subject: Some("alice".into()),
            kind: ConnectionKind::Sse,
            outbox: Arc::new(Outbox::new(4, 1024)),
        });
        registration.entry().subscribed("b/#");
        registration.entry().subscribed("a/+");
        registration.entry().subscribed("a/+");
        assert_eq!(registry.get(7).unwrap().subscriptions(), ["a/+", "b/#"]);
        registration.entry().unsubscribed("a/+");
        assert_eq!(registry.list()[0].subscriptions(), ["b/#"]);
        assert_eq!(registry.list()[0].kind.edge(), "sse");
        drop(registration);
        assert!(registry.get(7).is_none());
        assert!(registry.is_empty());
    }
}
