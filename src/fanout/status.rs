//! Status events: what the gateway tells a client on its own (docs/PROTOCOL.md, Status codes).

/// A `status` event. Edges render it in their own format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// What happened: `backend_down`, `backend_up`, `messages_dropped`, `messages_conflated`,
    /// `gap`, `decode_error`, `subscription_revoked`, `shutting_down`.
    pub code: &'static str,
    /// For humans.
    pub message: String,
    /// The backend the event concerns, by name.
    pub backend: Option<String>,
    /// The client's subscriptions (patterns) the event concerns.
    pub subscriptions: Vec<String>,
    /// How many messages (`messages_dropped`, `messages_conflated`).
    pub count: Option<u64>,
    /// Where a log no longer holds requested messages (`gap`).
    pub partition: Option<i32>,
    pub requested_offset: Option<i64>,
    pub available_offset: Option<i64>,
    /// When the gateway will close this connection (`shutting_down`), in ms from now.
    pub reconnect_after_ms: Option<u64>,
}
