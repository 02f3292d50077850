//! A Redis call that outlives the request that made it.
//!
//! Redis runs a command it has received whatever the proxy does next. If
//! the request that sent it is dropped (its client left, its deadline
//! passed) while the answer is on its way, what the call did (a use
//! counted, a key claimed, a slot taken) must still be learnt, so that it
//! can be undone for a request that was never forwarded.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls a call in place; dropped before it ends, spawns the rest of it. A
/// call sent to Redis runs there whatever the proxy does, so its answer
/// must be read to know what it counted (or, for a write that follows a
/// count, so that it is not left half done).
pub(super) struct FinishOnDrop(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl FinishOnDrop {
    pub(super) fn new(f: impl Future<Output = ()> + Send + 'static) -> Self {
        FinishOnDrop(Some(Box::pin(f)))
    }
}

impl Future for FinishOnDrop {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(f) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        let r = f.as_mut().poll(cx);
        if r.is_ready() {
            self.0 = None;
        }
        r
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            // Outside a runtime (its shutdown) there is nothing left to
            // finish the call on; Redis keeps what it counted.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Dropped after it started, the call still runs to its end; dropped
    /// after its end, nothing runs twice.
    #[tokio::test]
    async fn a_call_dropped_midway_finishes_on_its_own() {
        let done = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        let call = FinishOnDrop::new(async move {
            let _ = wait.await;
            d.store(true, Ordering::SeqCst);
        });
        // Started (polled once, pending), then its request gives up.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), call)
                .await
                .is_err()
        );
        assert!(!done.load(Ordering::SeqCst));
        go.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(done.load(Ordering::SeqCst), "the rest ran on its own task");

        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = runs.clone();
        FinishOnDrop::new(async move {
            r.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
