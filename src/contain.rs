//! Panic containment at task boundaries.
//!
//! A panic is a bug, but one connection's or one broker message's bug must not stop anything
//! else. Each boundary (a session, a writer, one delivery to a subscription group, a backend's
//! delivery loop) runs its work through [`call`] or [`future`], and on a panic logs it with what
//! it was serving, counts it in `wsbridge_panics_total{component}` and carries on. The panic
//! message itself is also printed by the standard panic hook.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use futures_util::FutureExt;

/// What a caught panic said, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked(pub String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn describe(payload: Box<dyn Any + Send>) -> Panicked {
    let text = match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    };
    Panicked(text)
}

/// Runs `f`, turning a panic into an error. Whatever `f` touched is the caller's to repair or
/// discard: callers only use this where the state a panic can leave is dropped or re-checked.
pub fn call<R>(f: impl FnOnce() -> R) -> Result<R, Panicked> {
    catch_unwind(AssertUnwindSafe(f)).map_err(describe)
}

/// Runs a future to completion, turning a panic in any of its polls into an error.
pub async fn future<F: Future>(f: F) -> Result<F::Output, Panicked> {
    AssertUnwindSafe(f).catch_unwind().await.map_err(describe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(call(|| 7), Ok(7));
        let text = call(|| -> u8 { panic!("bad byte {}", 0xff) }).unwrap_err();
        assert_eq!(text.0, "bad byte 255");
        let text = call(|| -> u8 { panic!("static") }).unwrap_err();
        assert_eq!(text.0, "static");
    }

    #[tokio::test]
    async fn a_panicking_future_is_caught() {
        let result = future(async {
            tokio::task::yield_now().await;
            panic!("in a poll");
        })
        .await;
        assert_eq!(result, Err(Panicked("in a poll".into())));
    }
}
