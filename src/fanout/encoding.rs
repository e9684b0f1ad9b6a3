//! The seam between the core and the client edges.
//!
//! The fan-out deals in broker messages, client channels and [`Status`] events; what a client
//! receives is bytes, and making them is its edge's job. Each edge (a WebSocket protocol, later
//! Server-Sent Events or an MQTT-over-WebSocket listener) implements [`Encoding`] once, as a
//! `static`, and hands it to the core with each subscriber. The core encodes a broker message at
//! most once per (subscription group, encoding) and shares the resulting [`Frame`] with every
//! subscriber that uses the same encoding.

use std::fmt;

use bytes::Bytes;

use super::status::Status;
use crate::backends::BrokerMessage;
use crate::transform::PayloadView;

/// Bytes an edge made for its clients, shared by every client that receives them. The core never
/// looks inside; the edge that made a frame knows how to write it.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Frame(bytes.into())
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({} bytes)", self.0.len())
    }
}

/// A broker message on its way to the subscribers of one client pattern.
pub struct Delivery<'a> {
    /// The concrete client channel.
    pub channel: &'a str,
    /// The client pattern the subscribers subscribed with.
    pub subscription: &'a str,
    pub message: &'a BrokerMessage,
}

/// How one client edge turns core events into frames.
pub trait Encoding: Send + Sync + 'static {
    /// A short name for logs, e.g. the subprotocol.
    fn name(&self) -> &'static str;

    /// Whether deliveries carry the route's client-side view of the payload (for instance JSON
    /// decoded from Protobuf) rather than the broker's bytes untouched. The view is computed once
    /// per subscription group, and only when one of its subscribers wants it.
    fn wants_payload_view(&self) -> bool;

    /// Encodes a broker message for one subscription. `view` is `Some` exactly when
    /// [`Encoding::wants_payload_view`]. Broker bytes are network input: this must not panic on
    /// any of them.
    fn delivery(&self, delivery: &Delivery<'_>, view: Option<&PayloadView>) -> Frame;

    /// Encodes a status event for one connection.
    fn status(&self, status: &Status) -> Frame;
}

/// Identifies an encoding by address, for the per-group frame cache.
pub(crate) fn same_encoding(a: &dyn Encoding, b: &dyn Encoding) -> bool {
    std::ptr::addr_eq(a as *const dyn Encoding, b as *const dyn Encoding)
}
