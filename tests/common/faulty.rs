//! A backend driven directly, through the adapter contract, with a subscriber that panics on one
//! payload: how the backend's own delivery loop survives a bug in what it delivers to. (Inside
//! the gateway every subscriber is a fan-out with its own panic boundary, so only a test can put
//! a panic this close to a backend's loop.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use wsbridge::Config;
use wsbridge::backends::{
    Backend, BrokerMessage, BuildContext, Health, MessageSink, StartPosition, Subscription,
    SubscriptionEvent,
};

use super::WAIT;

/// The payload that makes [`Panicky`] panic.
pub const BOOM: &[u8] = b"boom";

/// Records every payload it is given, and panics on [`BOOM`].
#[derive(Default)]
pub struct Panicky(Mutex<Vec<Vec<u8>>>);

impl Panicky {
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `payload` has been received.
    pub async fn wait_for(&self, payload: &[u8]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.received().iter().any(|p| p == payload) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} never reached the subscriber; it got {:?}",
                String::from_utf8_lossy(payload),
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl MessageSink for Panicky {
    fn deliver(&self, message: BrokerMessage) {
        self.0.lock().unwrap().push(message.payload.to_vec());
        assert!(
            &message.payload[..] != BOOM,
            "the subscriber cannot take this"
        );
    }

    fn event(&self, _: SubscriptionEvent) {}
}

/// A backend built from config text (one backend named `name`, its routes), with the counter
/// its panics go to.
pub fn build(text: &str, name: &str) -> (Arc<dyn Backend>, prometheus::IntCounter) {
    let config = Config::from_toml(text).unwrap_or_else(|e| panic!("config: {e}"));
    let panics = prometheus::IntCounter::new("panics", "caught panics").unwrap();
    let routes = config
        .routes()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.backend == name)
        .collect();
    let backend = config.backends()[name]
        .build(BuildContext {
            name,
            routes,
            panics: panics.clone(),
        })
        .unwrap_or_else(|e| panic!("backend {name}: {e}"));
    (backend, panics)
}

/// Every health the backend reports from now on, in order.
pub struct HealthLog(Arc<Mutex<Vec<Health>>>);

impl HealthLog {
    pub fn start(backend: &dyn Backend) -> HealthLog {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut health: watch::Receiver<Health> = backend.health();
        let seen = log.clone();
        tokio::spawn(async move {
            seen.lock()
                .unwrap()
                .push(health.borrow_and_update().clone());
            while health.changed().await.is_ok() {
                seen.lock()
                    .unwrap()
                    .push(health.borrow_and_update().clone());
            }
        });
        HealthLog(log)
    }

    pub fn entries(&self) -> Vec<Health> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until the last reported health is `up`.
    pub async fn wait_up(&self, what: &str) {
        self.wait(what, |log| log.last().is_some_and(Health::is_up))
            .await
    }

    /// Waits (bounded) until the log satisfies `check`.
    pub async fn wait(&self, what: &str, check: impl Fn(&[Health]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !check(&self.entries()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {what}; health so far {:?}",
                self.entries()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Subscribes `sink` to `filter` through route 0, from the latest message.
pub async fn subscribe(backend: &dyn Backend, id: u64, filter: &str, sink: Arc<Panicky>) {
    let subscription = Subscription {
        id,
        route: 0,
        filter: filter.to_owned(),
        key: None,
        start: StartPosition::Latest,
        sink,
    };
    tokio::time::timeout(WAIT, backend.subscribe(subscription))
        .await
        .expect("subscribe in time")
        .expect("subscribe accepted");
}

/// The outcome of a panic the backend contained around one message: the panic was counted once,
/// the subscriber got `one`, the message it panicked on and `two`, in order, and the backend
/// stayed up from the moment it connected.
pub fn assert_contained(sink: &Panicky, panics: &prometheus::IntCounter, health: &HealthLog) {
    assert_eq!(panics.get(), 1);
    assert_eq!(
        sink.received(),
        vec![b"one".to_vec(), BOOM.to_vec(), b"two".to_vec()]
    );
    let log = health.entries();
    let connected = log.iter().position(|h| h.is_up()).expect("it connected");
    assert!(log[connected..].iter().all(|h| h.is_up()), "{log:?}");
}
