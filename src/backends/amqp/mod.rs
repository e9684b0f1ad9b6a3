//! `type = "amqp"`: RabbitMQ (AMQP 0-9-1) exchanges and queues, through lapin.
//!
//! # How it works
//!
//! One connection per backend, named `wsbridge <backend> <instance>` so operators (and the fault
//! tests) can tell it apart. A supervisor task connects, declares the configured exchanges,
//! work queues and streams, declares the gateway's *private queue* (server-named, exclusive, auto-delete),
//! consumes it with a bounded prefetch, and re-establishes every active upstream; then it reports
//! `Up`. When the connection is lost it reports `Down`, waits with exponential backoff and does
//! it all again, so sockets keep their subscriptions without noticing more than two `status`
//! frames.
//!
//! Subscriptions ([`registry`]): an upstream on a normal route is a binding of the private queue
//! (exchange + binding key rendered from the client pattern, `+` → `*`, `#` → `#`); an upstream
//! on a work-queue route is a consumer of that shared durable queue; an upstream on a stream route
//! is a consumer of its own of that stream, read from a position ([`stream`]). Bindings and
//! work-queue consumers are reference-counted, so two upstreams needing the same binding share
//! it. A delivery arrives once per queue whichever bindings match; it is dispatched to every
//! upstream whose filter matches its routing key, once each, then acknowledged. Acks are batched
//! (`multiple`) and sent once the message has been handed to the fan-out, which never blocks, so
//! a slow socket never stalls the consumer.
//!
//! Publishes go through one channel in confirm mode: the client's `ok` waits for the broker's
//! ack. A nack, a returned (unroutable, `mandatory`) message, a channel error or the confirm
//! timeout become errors; a channel the broker closed is replaced on the next publish.

mod config;
mod message;
mod registry;
mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus, Consumer, ErrorKind,
    Event, ExchangeKind,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::adapter::{
    Backend, BackendError, BackendSettings, BuildContext, Capabilities, Health, Kind, Publish,
    PublishReceipt, StartPosition, Subscription, UpstreamId, contain,
};
use crate::config::{ConfigProblem, RouteConfig};
use crate::routing::TopicSyntax;
pub use config::{AmqpConfig, ExchangeConfig, ExchangeType, RouteSpec};
use registry::{Registry, Source};
use stream::StreamReader;

/// AMQP routing keys: `.`-separated words, `*` for one word, `#` for any number.
pub const ROUTING_KEY: TopicSyntax = TopicSyntax {
    name: "routing key",
    separator: Some('.'),
    single_wildcard: Some("*"),
    multi_wildcard: Some("#"),
    max_len: 255,
    value_char: |c| !matches!(c, '.' | '*' | '#') && !c.is_control(),
};

/// `type = "amqp"`.
pub const KIND: Kind = Kind {
    name: "amqp",
    parse: |table, path, problems| {
        AmqpConfig::from_section(table, path, problems)
            .map(|c| Box::new(c) as Box<dyn BackendSettings>)
    },
};

impl BackendSettings for AmqpConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        ROUTING_KEY
    }

    fn capabilities(&self) -> Capabilities {
        // Only stream routes keep positions, and the backend table does not know its routes:
        // a `from` on any other route is refused by `subscribe`, with the reason.
        Capabilities {
            replay: true,
            ..Capabilities::default()
        }
    }

    fn check_route(&self, route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
        let _ = self.route_spec(route, path, problems);
    }

    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(AmqpBackend::new(self, cx)?))
    }
}

/// How long closing the connection on shutdown may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running AMQP backend.
pub struct AmqpBackend {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    config: AmqpConfig,
    connection_name: String,
    routes: HashMap<usize, RouteSpec>,
    health: watch::Sender<Health>,
    /// Active upstreams; read for every delivery, so never held across an await.
    registry: RwLock<Registry>,
    /// Upstreams on stream routes, each with a consumer of its own; never held across an await.
    streams: std::sync::Mutex<HashMap<UpstreamId, Arc<StreamReader>>>,
    /// The live connection; `None` while disconnected. Serialises topology changes.
    session: tokio::sync::Mutex<Option<Session>>,
    /// The confirm-mode channel publishes share.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    shutdown: CancellationToken,
    /// Panics caught in this backend's delivery loops.
    panics: prometheus::IntCounter,
}

/// What exists on the broker for one connection.
struct Session {
    connection: Connection,
    /// For binds and unbinds. A failed operation closes it; it is reopened on next use.
    topology: Option<Channel>,
    /// The server-named private queue.
    queue: ShortString,
    /// Work-queue consumers, by queue name.
    work: HashMap<String, WorkConsumer>,
    /// Stream consumers, by upstream.
    readers: HashMap<UpstreamId, WorkConsumer>,
    /// Told why when a work-queue consumer ends while it is still wanted; the connection is
    /// then made again, as after a broker fault.
    lost: mpsc::UnboundedSender<String>,
}

struct WorkConsumer {
    channel: Channel,
    tag: ShortString,
}

/// A connection whose private queue is being consumed.
struct Running {
    status: ConnectionStatus,
    events: futures_util::stream::BoxStream<'static, Event>,
    channel: Channel,
    consumer: Consumer,
    /// Why a work-queue consumer of this connection ended unexpectedly.
    lost: mpsc::UnboundedReceiver<String>,
}

impl AmqpBackend {
    /// Starts the backend; connecting happens in the background.
    pub fn new(config: &AmqpConfig, cx: BuildContext<'_>) -> Result<Self, BackendError> {
        let mut problems = Vec::new();
        let mut routes = HashMap::new();
        for (index, route) in &cx.routes {
            let path = format!("routes[{index}]");
            if let Some(spec) = config.route_spec(route, &path, &mut problems) {
                routes.insert(*index, spec);
            }
        }
        if let Some(problem) = problems.first() {
            return Err(BackendError::Failed(format!("invalid route: {problem}")));
        }
        let shared = Arc::new(Shared {
            name: cx.name.to_owned(),
            config: config.clone(),
            connection_name: format!("wsbridge {} {}", cx.name, instance_id()),
            routes,
            health: watch::Sender::new(Health::Down {
                reason: "connecting".into(),
            }),
            registry: RwLock::new(Registry::default()),
            streams: std::sync::Mutex::new(HashMap::new()),
            session: tokio::sync::Mutex::new(None),
            publisher: tokio::sync::Mutex::new(None),
            shutdown: CancellationToken::new(),
            panics: cx.panics,
        });
        tokio::spawn(shared.clone().supervise());
        Ok(AmqpBackend { shared })
    }
}

/// Distinguishes this process's connections from every other gateway's.
fn instance_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A short description of a lapin error, for health reasons and logs.
fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(e) => format!("{} ({})", e.get_message(), e.get_id()),
        _ => error.to_string(),
    }
}

/// Maps a broker failure to what a client sees; `what` names the object the request was about.
fn broker_error(error: &lapin::Error, what: &str) -> BackendError {
    let rejected = |code, text: &str| BackendError::Rejected {
        code,
        message: format!("{what}: {text}"),
    };
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                rejected("not_found", e.get_message().as_str())
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                rejected("access_refused", e.get_message().as_str())
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                rejected("precondition_failed", e.get_message().as_str())
            }
            _ => BackendError::Failed(format!("{what}: {}", describe(error))),
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::RuntimeShutdownError(_) => {
            BackendError::Unavailable(format!("the broker connection was lost ({error})"))
        }
        _ => BackendError::Failed(format!("{what}: {}", describe(error))),
    }
}

fn unavailable(reason: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("not connected to the broker: {reason}"))
}

impl Shared {
    fn set_health(&self, health: Health) {
        self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health.clone();
            changed
        });
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    fn stream_readers(&self) -> std::sync::MutexGuard<'_, HashMap<UpstreamId, Arc<StreamReader>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, index: usize) -> Result<&RouteSpec, BackendError> {
        self.routes.get(&index).ok_or_else(|| {
            BackendError::Failed(format!("route {index} does not use backend {}", self.name))
        })
    }

    /// Connects, reconnecting with exponential backoff until shutdown.
    async fn supervise(self: Arc<Self>) {
        self.reconnect_loop().await;
        self.close_session().await;
    }

    async fn reconnect_loop(self: &Arc<Self>) {
        let mut delay = self.config.reconnect_initial;
        loop {
            let attempt = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                attempt = self.establish() => attempt,
            };
            match attempt {
                Ok(running) => {
                    delay = self.config.reconnect_initial;
                    tracing::info!(backend = %self.name, connection = %self.connection_name, "connected to the AMQP broker");
                    self.set_health(Health::Up);
                    let reason = tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        reason = contain::future(self.run(running)) => reason.unwrap_or_else(|panic| {
                            self.panics.inc();
                            tracing::error!(backend = %self.name, %panic, "the AMQP delivery loop panicked; reconnecting");
                            format!("the delivery loop failed ({panic})")
                        }),
                    };
                    tracing::warn!(backend = %self.name, %reason, "AMQP connection lost; reconnecting");
                    self.set_health(Health::Down {
                        reason: reason.clone(),
                    });
                    self.teardown(&reason).await;
                }
                Err(reason) => {
                    tracing::warn!(backend = %self.name, %reason, retry_in = ?delay, "cannot connect to the AMQP broker");
                    self.set_health(Health::Down { reason });
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.config.reconnect_max);
        }
    }

    /// Opens a connection with the whole topology: exchanges, work queues, the private queue
    /// and its consumer, and every active upstream.
    async fn establish(self: &Arc<Self>) -> Result<Running, String> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.connection_name.as_str()));
        let connection = Connection::connect(&self.config.url, properties)
            .await
            .map_err(|e| describe(&e))?;
        let status = connection.status().clone();
        let events = connection.events_listener().boxed();
        let step = |what: &'static str| move |e: lapin::Error| format!("{what}: {}", describe(&e));

        let topology = connection
            .create_channel()
            .await
            .map_err(step("opening a channel"))?;
        for exchange in &self.config.exchanges {
            let kind = match exchange.kind {
                ExchangeType::Topic => ExchangeKind::Topic,
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Fanout => ExchangeKind::Fanout,
            };
            let options = ExchangeDeclareOptions {
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                ..ExchangeDeclareOptions::default()
            };
            let name = message::short("exchange", &exchange.name).map_err(|e| e.to_string())?;
            topology
                .exchange_declare(name, kind, options, FieldTable::default())
                .await
                .map_err(|e| format!("declaring exchange {:?}: {}", exchange.name, describe(&e)))?;
        }
        let mut declared = HashSet::new();
        for spec in self.routes.values() {
            let (queue, is_stream) = match (&spec.queue, &spec.stream) {
                (Some(queue), _) => (queue, false),
                (None, Some(stream)) => (stream, true),
                (None, None) => continue,
            };
            let name = message::short("queue", queue).map_err(|e| e.to_string())?;
            let first = declared.insert(queue.clone());
            if first && is_stream {
                declare_stream(&connection, name.clone())
                    .await
                    .map_err(|e| format!("declaring stream {queue:?}: {}", describe(&e)))?;
            } else if first {
                topology
                    .queue_declare(
                        name.clone(),
                        QueueDeclareOptions::durable(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| format!("declaring queue {queue:?}: {}", describe(&e)))?;
            }
            if !spec.exchange.is_empty() {
                topology
                    .queue_bind(
                        name,
                        message::short("exchange", &spec.exchange).map_err(|e| e.to_string())?,
                        message::short("routing key", spec.bind_key(&spec.binding_key))
                            .map_err(|e| e.to_string())?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "binding queue {queue:?} to exchange {:?}: {}",
                            spec.exchange,
                            describe(&e)
                        )
                    })?;
            }
        }

        let channel = connection
            .create_channel()
            .await
            .map_err(step("opening a channel"))?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(step("setting the prefetch"))?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(step("declaring the private queue"))?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(step("consuming the private queue"))?;

        let mut session = self.session.lock().await;
        let (lost, lost_reasons) = mpsc::unbounded_channel();
        let mut live = Session {
            connection,
            topology: Some(topology),
            queue: queue.name().clone(),
            work: HashMap::new(),
            readers: HashMap::new(),
            lost,
        };
        let sources = self.registry().sources();
        for source in &sources {
            if let Err(e) = live.open(self, source).await {
                if !status.connected() {
                    return Err(e.to_string());
                }
                tracing::error!(backend = %self.name, ?source, error = %e, "cannot re-establish an upstream subscription");
            }
        }
        // Each stream upstream resumes after the last offset it read.
        let readers: Vec<_> = self.stream_readers().values().cloned().collect();
        for reader in &readers {
            if let Err(e) = live.open_stream(self, reader).await {
                if !status.connected() {
                    return Err(e.to_string());
                }
                tracing::error!(backend = %self.name, stream = %reader.stream, error = %e, "cannot re-establish a stream subscription");
            }
        }
        *session = Some(live);
        Ok(Running {
            status,
            events,
            channel,
            consumer,
            lost: lost_reasons,
        })
    }

    /// Consumes the private queue until the connection is lost; returns why it ended.
    async fn run(self: &Arc<Self>, running: Running) -> String {
        let Running {
            status,
            mut events,
            channel,
            consumer,
            mut lost,
        } = running;
        let watch_connection = async {
            while let Some(event) = events.next().await {
                if let Event::Error(e) = event
                    && !status.connected()
                {
                    return describe(&e);
                }
            }
            "the connection was closed".to_owned()
        };
        tokio::select! {
            reason = self.consume(channel, consumer, None) => reason,
            reason = watch_connection => reason,
            Some(reason) = lost.recv() => reason,
        }
    }

    /// Closes the connection for good.
    async fn close_session(&self) {
        let session = self.session.lock().await.take();
        if let Some(session) = session {
            let reply = "gateway shutting down".into();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.connection.close(200, reply)).await;
        }
        self.set_health(Health::Down {
            reason: "closed".into(),
        });
    }

    /// Forgets a lost connection, closing it if it is still half open.
    async fn teardown(&self, reason: &str) {
        let session = self.session.lock().await.take();
        if let Some(session) = session
            && session.connection.status().connected()
        {
            // The reason comes from the broker; the reply text must stay a short string.
            let reply = ShortString::try_new(format!("reconnecting: {reason}"))
                .unwrap_or_else(|_| "reconnecting".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.connection.close(320, reply)).await;
        }
    }

    /// Dispatches the deliveries of one consumer and acknowledges them once handed to the
    /// fan-out. `queue` is the work queue consumed, `None` for the private queue. Returns why
    /// consuming ended.
    async fn consume(
        self: &Arc<Self>,
        channel: Channel,
        mut consumer: Consumer,
        queue: Option<&str>,
    ) -> String {
        // Acks are sent for runs of deliveries at once; at most half the prefetch stays unacked
        // so the broker never waits for them.
        let batch = (usize::from(self.config.prefetch) / 2).max(1);
        let mut unacked: Option<u64> = None;
        let mut pending = 0;
        loop {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Some(tag) = unacked.take() {
                        pending = 0;
                        if let Err(e) = ack(&channel, tag).await {
                            return describe(&e);
                        }
                    }
                    consumer.next().await
                }
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return describe(&e),
                None => {
                    if let Some(tag) = unacked.take() {
                        let _ = ack(&channel, tag).await;
                    }
                    return "the consumer was cancelled".into();
                }
            };
            let tag = delivery.delivery_tag;
            let routing_key = delivery.routing_key.clone();
            let taken = contain::call(|| self.dispatch(queue, delivery)).unwrap_or_else(|panic| {
                // Acknowledged like a delivered message: given back, it would come again.
                self.panics.inc();
                tracing::error!(backend = %self.name, routing_key = %routing_key, %panic, "panic while dispatching an AMQP message; it was skipped");
                1
            });
            if taken == 0
                && let Some(queue) = queue
            {
                // A work-queue message nobody here takes. While subscriptions remain it cannot
                // map to any of them: leave it to the queue's dead-lettering rather than
                // requeueing it to this same consumer in a loop. With none left the consumer is
                // being cancelled: give the message back for the other consumers.
                if let Some(tag) = unacked.take() {
                    pending = 0;
                    if let Err(e) = ack(&channel, tag).await {
                        return describe(&e);
                    }
                }
                let requeue = self.registry().users(&Source::WorkQueue(queue.to_owned())) == 0;
                let options = BasicRejectOptions { requeue };
                if let Err(e) = channel.basic_reject(tag, options).await {
                    return describe(&e);
                }
                continue;
            }
            unacked = Some(tag);
            pending += 1;
            if pending >= batch {
                pending = 0;
                unacked = None;
                if let Err(e) = ack(&channel, tag).await {
                    return describe(&e);
                }
            }
        }
    }

    /// Hands a delivery to every matching upstream; returns how many there were.
    fn dispatch(&self, queue: Option<&str>, delivery: Delivery) -> usize {
        let Delivery {
            exchange,
            routing_key,
            properties,
            data,
            ..
        } = delivery;
        let message = message::to_broker_message(routing_key.as_str(), data, &properties);
        self.registry()
            .for_each_match(queue, exchange.as_str(), routing_key.as_str(), |sink| {
                sink.deliver(message.clone())
            })
    }

    /// The confirm-mode publish channel, reopened if the broker closed it.
    async fn publisher(&self) -> Result<Channel, BackendError> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let session = self.session.lock().await;
        let Some(session) = session.as_ref() else {
            return Err(unavailable(down_reason(&self.health)));
        };
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| broker_error(&e, "opening the publish channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_error(&e, "enabling publisher confirms"))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Stops using a publish channel whose outcome is unknown; publishes still waiting on it
    /// keep their own handle.
    async fn discard_publisher(&self, channel: &Channel) {
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == channel.id()) {
            *slot = None;
        }
    }
}

/// Declares a stream unless it exists. An existing stream is used as it is: declaring it again
/// would fail unless every argument (its retention, say) were repeated.
async fn declare_stream(connection: &Connection, name: ShortString) -> lapin::Result<()> {
    let probe = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match probe
        .queue_declare(name.clone(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = probe.close(200, "declared".into()).await;
            return Ok(());
        }
        // The broker closed the probe's channel with its answer.
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    let channel = connection.create_channel().await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    let declared = channel
        .queue_declare(name, QueueDeclareOptions::durable(), arguments)
        .await;
    let _ = channel.close(200, "declared".into()).await;
    declared.map(|_| ())
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

async fn ack(channel: &Channel, tag: u64) -> lapin::Result<()> {
    channel
        .basic_ack(tag, BasicAckOptions { multiple: true })
        .await
}

/// Why the backend is not connected, for errors while it is down.
fn down_reason(health: &watch::Sender<Health>) -> String {
    match &*health.borrow() {
        Health::Up => "the connection is being re-established".into(),
        Health::Down { reason } => reason.clone(),
    }
}

impl RouteSpec {
    /// The binding key for a filter: fanout exchanges ignore keys, so they bind with `""`.
    fn bind_key<'a>(&self, filter: &'a str) -> &'a str {
        match self.kind {
            ExchangeType::Fanout => "",
            ExchangeType::Topic | ExchangeType::Direct => filter,
        }
    }

    /// Why a subscription on this route cannot start from a position.
    fn no_positions(&self) -> String {
        let reads = match &self.queue {
            Some(queue) => format!("reads the work queue {queue:?}"),
            None => format!("binds to exchange {:?}", self.exchange),
        };
        format!(
            "only stream routes keep positions; this route {reads}, which keeps no history, so only \"from\": \"latest\" is possible"
        )
    }

    /// Where an upstream for `filter` on this route gets its messages.
    fn source(&self, filter: &str) -> Result<Source, BackendError> {
        if let Some(queue) = &self.queue {
            // Each message of a shared queue reaches one consumer; one that took messages for
            // part of the route only would have to refuse the rest.
            if filter != self.binding_key {
                return Err(BackendError::Rejected {
                    code: "unsupported_pattern",
                    message: format!(
                        "this channel is served by the work queue {queue:?}, which is consumed as a whole; subscribe to the pattern covering the whole route"
                    ),
                });
            }
            return Ok(Source::WorkQueue(queue.clone()));
        }
        let wildcard = filter.split('.').any(|w| w == "*" || w == "#");
        if self.kind == ExchangeType::Direct && wildcard {
            return Err(BackendError::Rejected {
                code: "unsupported_pattern",
                message: format!(
                    "exchange {:?} is a direct exchange, which matches whole routing keys only; subscribe to a channel without '+' or '#'",
                    self.exchange
                ),
            });
        }
        Ok(Source::Binding {
            exchange: self.exchange.clone(),
            key: self.bind_key(filter).to_owned(),
        })
    }
}

impl Session {
    /// The channel for binds, reopened if a failed operation closed it.
    async fn topology(&mut self) -> Result<Channel, BackendError> {
        if let Some(channel) = &self.topology
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.topology = None;
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| broker_error(&e, "opening a channel"))?;
        self.topology = Some(channel.clone());
        Ok(channel)
    }

    /// Creates what the broker must hold for a source: a binding or a work-queue consumer.
    async fn open(&mut self, shared: &Arc<Shared>, source: &Source) -> Result<(), BackendError> {
        match source {
            Source::Binding { exchange, key } => {
                let topology = self.topology().await?;
                topology
                    .queue_bind(
                        self.queue.clone(),
                        message::short("exchange", exchange)?,
                        message::short("routing key", key)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| broker_error(&e, &format!("binding to exchange {exchange:?}")))
            }
            Source::WorkQueue(queue) => {
                let what = format!("consuming queue {queue:?}");
                let channel = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| broker_error(&e, &what))?;
                channel
                    .basic_qos(shared.config.prefetch, BasicQosOptions::default())
                    .await
                    .map_err(|e| broker_error(&e, &what))?;
                let consumer = channel
                    .basic_consume(
                        message::short("queue", queue)?,
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| broker_error(&e, &what))?;
                let tag = consumer.tag();
                let worker = shared.clone();
                let (queue_name, consume_channel) = (queue.clone(), channel.clone());
                let (own_tag, lost) = (tag.clone(), self.lost.clone());
                tokio::spawn(async move {
                    let consumed =
                        worker.consume(consume_channel.clone(), consumer, Some(&queue_name));
                    let reason = contain::future(consumed).await.unwrap_or_else(|panic| {
                        worker.panics.inc();
                        tracing::error!(backend = %worker.name, queue = %queue_name, %panic, "an AMQP work-queue consumer panicked");
                        format!("the consumer failed ({panic})")
                    });
                    // Ended by an unsubscribe, the consumer is no longer listed; ended with its
                    // connection, that connection is being made again anyway. Otherwise (a
                    // panic, the broker cancelling it because the queue was deleted) its
                    // subscribers would silently get nothing more: make the connection again.
                    let wanted = worker.session.lock().await.as_ref().is_some_and(|session| {
                        session
                            .work
                            .get(&queue_name)
                            .is_some_and(|consumer| consumer.tag == own_tag)
                    });
                    if wanted && consume_channel.status().connected() {
                        tracing::warn!(backend = %worker.name, queue = %queue_name, %reason, "an AMQP work-queue consumer ended while subscribed; reconnecting");
                        let _ = lost.send(format!(
                            "the consumer of work queue {queue_name:?} ended ({reason})"
                        ));
                    } else {
                        tracing::debug!(backend = %worker.name, queue = %queue_name, %reason, "work queue consumer ended");
                    }
                    if consume_channel.status().connected() {
                        let _ = consume_channel.close(200, "unsubscribed".into()).await;
                    }
                });
                self.work
                    .insert(queue.clone(), WorkConsumer { channel, tag });
                Ok(())
            }
        }
    }

    /// Opens a consumer of `reader`'s stream at the next offset it wants (at first, its start).
    async fn open_stream(
        &mut self,
        shared: &Arc<Shared>,
        reader: &Arc<StreamReader>,
    ) -> Result<(), BackendError> {
        let what = format!("reading stream {:?}", reader.stream);
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| broker_error(&e, &what))?;
        // Streams are read with manual acks and a bounded prefetch; the acks give the credit.
        channel
            .basic_qos(shared.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| broker_error(&e, &what))?;
        let (generation, offset) = reader.reopen();
        let mut arguments = FieldTable::default();
        arguments.insert(message::STREAM_OFFSET.into(), offset);
        let consumer = channel
            .basic_consume(
                message::short("stream", &reader.stream)?,
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .map_err(|e| broker_error(&e, &what))?;
        let tag = consumer.tag();
        let (worker, own, lost) = (shared.clone(), reader.clone(), self.lost.clone());
        let consume_channel = channel.clone();
        tokio::spawn(async move {
            let read = worker.read_stream(&own, generation, &consume_channel, consumer);
            let reason = contain::future(read).await.unwrap_or_else(|panic| {
                worker.panics.inc();
                tracing::error!(backend = %worker.name, stream = %own.stream, %panic, "an AMQP stream consumer panicked");
                format!("the consumer failed ({panic})")
            });
            // Unsubscribed or replaced by the consumer of a new connection, it is not missed.
            // Otherwise (the broker cancelled it, its channel failed) its subscribers would get
            // nothing more: make the connection again, which resumes it where it stopped.
            if own.is_current(generation) {
                tracing::warn!(backend = %worker.name, stream = %own.stream, %reason, "an AMQP stream consumer ended while subscribed; reconnecting");
                let _ = lost.send(format!(
                    "the consumer of stream {:?} ended ({reason})",
                    own.stream
                ));
            } else {
                tracing::debug!(backend = %worker.name, stream = %own.stream, %reason, "stream consumer ended");
            }
            if consume_channel.status().connected() {
                let _ = consume_channel.close(200, "unsubscribed".into()).await;
            }
        });
        if let Some(old) = self
            .readers
            .insert(reader.id, WorkConsumer { channel, tag })
            && old.channel.status().connected()
        {
            let _ = old.channel.close(200, "replaced".into()).await;
        }
        Ok(())
    }

    /// Stops the consumer of an unsubscribed stream upstream.
    async fn close_stream(&mut self, id: UpstreamId) -> Result<(), BackendError> {
        let Some(consumer) = self.readers.remove(&id) else {
            return Ok(());
        };
        if !consumer.channel.status().connected() {
            return Ok(());
        }
        consumer
            .channel
            .close(200, "unsubscribed".into())
            .await
            .map_err(|e| broker_error(&e, "closing a stream consumer's channel"))
    }

    /// Removes what the broker holds for a source nobody uses any more.
    async fn close(&mut self, source: &Source) -> Result<(), BackendError> {
        match source {
            Source::Binding { exchange, key } => {
                let topology = self.topology().await?;
                topology
                    .queue_unbind(
                        self.queue.clone(),
                        message::short("exchange", exchange)?,
                        message::short("routing key", key)?,
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| broker_error(&e, &format!("unbinding from exchange {exchange:?}")))
            }
            Source::WorkQueue(queue) => {
                let Some(consumer) = self.work.remove(queue) else {
                    return Ok(());
                };
                consumer
                    .channel
                    .basic_cancel(consumer.tag, BasicCancelOptions::default())
                    .await
                    .map_err(|e| broker_error(&e, &format!("cancelling the consumer of {queue:?}")))
            }
        }
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError> {
        let shared = &self.shared;
        let spec = shared.route(subscription.route)?;
        if let Some(stream) = &spec.stream {
            let reader = Arc::new(StreamReader::new(stream, subscription)?);
            let mut session = shared.session.lock().await;
            let Some(live) = session.as_mut() else {
                return Err(unavailable(down_reason(&shared.health)));
            };
            // Listed first, so that an unsubscribe after an abandoned subscribe finds it.
            shared.stream_readers().insert(reader.id, reader.clone());
            let opened = live.open_stream(shared, &reader).await;
            if opened.is_err() {
                reader.stop();
                shared.stream_readers().remove(&reader.id);
            }
            return opened;
        }
        if subscription.start != StartPosition::Latest {
            return Err(BackendError::Unsupported(spec.no_positions()));
        }
        let source = spec.source(&subscription.filter)?;
        let mut session = shared.session.lock().await;
        let Some(live) = session.as_mut() else {
            return Err(unavailable(down_reason(&shared.health)));
        };
        if shared.registry().users(&source) == 0 {
            live.open(shared, &source).await?;
        }
        shared.registry_mut().insert(
            subscription.id,
            source,
            subscription.filter,
            subscription.sink,
        );
        Ok(())
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        let shared = &self.shared;
        let mut session = shared.session.lock().await;
        let reader = shared.stream_readers().remove(&id);
        if let Some(reader) = reader {
            reader.stop();
            return match session.as_mut() {
                Some(live) => live.close_stream(id).await,
                None => Ok(()),
            };
        }
        let Some((source, left)) = shared.registry_mut().remove(id) else {
            return Ok(());
        };
        match session.as_mut() {
            // Nothing to undo while disconnected: the next connection binds only what is used.
            Some(live) if left == 0 => live.close(&source).await,
            _ => Ok(()),
        }
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        let shared = &self.shared;
        let spec = shared.route(publish.route)?;
        let exchange = message::short("exchange", &spec.exchange)?;
        let routing_key = message::short("routing key", &publish.topic)?;
        let properties = message::publish_properties(&publish.headers)?;
        let options = BasicPublishOptions {
            mandatory: spec.mandatory,
            immediate: false,
        };
        let channel = shared.publisher().await?;
        let timeout = shared.config.confirm_timeout;
        let confirmed = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(exchange, routing_key, options, &publish.payload, properties)
                .await?
                .await
        })
        .await;
        let target = || {
            format!(
                "publish to exchange {:?} with routing key {:?}",
                spec.exchange, publish.topic
            )
        };
        match confirmed {
            Ok(Ok(Confirmation::Ack(None))) => Ok(PublishReceipt::default()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(BackendError::Rejected {
                code: "unroutable",
                message: format!(
                    "{}: no queue is bound for it, so the broker returned it ({} {})",
                    target(),
                    returned.reply_code,
                    returned.reply_text
                ),
            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(BackendError::Rejected {
                code: "publish_nacked",
                message: format!("{}: the broker refused the message (nack)", target()),
            }),
            Ok(Ok(Confirmation::NotRequested)) => {
                shared.discard_publisher(&channel).await;
                Err(BackendError::Failed(
                    "the publish channel is not in confirm mode".into(),
                ))
            }
            Ok(Err(e)) => {
                if !channel.status().connected() {
                    shared.discard_publisher(&channel).await;
                }
                Err(broker_error(&e, &target()))
            }
            Err(_) => {
                shared.discard_publisher(&channel).await;
                Err(BackendError::Timeout(timeout))
            }
        }
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        self.shared.registry().source_count() + self.shared.stream_readers().len()
    }

    async fn close(&self) {
        self.shared.shutdown.cancel();
        self.shared.close_session().await;
    }
}

impl Drop for AmqpBackend {
    /// A backend dropped without `close` (a gateway that failed to start) stops reconnecting.
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}
