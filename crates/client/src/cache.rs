//! One account's state in the client: the last token the broker gave (read lock-free), and the
//! GetToken and Invalidate calls in flight, each shared by every concurrent caller.
//!
//! Single flight survives its leader: the call runs as its own task, and the callers await a
//! shared handle to it. A caller that gives up (its future dropped) neither cancels nor restarts
//! the call; every other waiter gets the same result, success or error.
//!
//! A GetToken answer may arrive after a newer token was stored (an Invalidate or a watch that
//! replaced the token the broker was about to hand out). A generation per slot, bumped by those
//! stores, keeps such a late answer out of the cache: a fetch stores its token only if the
//! generation is still the one it saw when it started.

use std::{
    future::Future,
    pin::Pin,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use futures_util::{FutureExt, future::Shared};
use std::sync::Arc;
use tokio::time::Instant;

use crate::{Error, Invalidated, Token};

type Call<T> = Shared<Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>>;

/// An account's slot.
#[derive(Default)]
pub(crate) struct Slot {
    /// The broker's current token as last seen. Readers load it without a lock.
    cached: ArcSwapOption<Token>,
    /// The GetToken in flight. A std `Mutex`: held to look at, clone or replace the handle,
    /// never across an `.await`.
    fetch: Mutex<Option<Fetch>>,
    /// The Invalidate in flight, with the token it reports. Same locking rule.
    invalidation: Mutex<Option<Invalidation>>,
    /// Bumped by every store of a token newer than any GetToken in flight (Invalidate, watch).
    /// A `Mutex`, not an atomic: a fetch compares it and stores under the lock, so an
    /// Invalidate cannot slip in between. Writers only; readers load `cached` without it.
    generation: Mutex<u64>,
}

struct Fetch {
    id: u64,
    /// Callers needing at most this much validity may join.
    min_validity: Duration,
    call: Call<Token>,
}

struct Invalidation {
    id: u64,
    reported: Box<str>,
    call: Call<Invalidated>,
}

/// Which flight a caller waits for.
pub(crate) enum Joined<T> {
    /// A cached token serves the caller.
    Cached(Token),
    /// A call in flight, started by this caller or another.
    Wait(Call<T>),
}

impl Slot {
    /// The cached token if it stays valid for more than `left` from `now`.
    pub(crate) fn fresh(&self, now: Instant, left: Duration) -> Option<Token> {
        let guard = self.cached.load();
        match &*guard {
            Some(token) if token.lasts_beyond(now, left) => Some(Token::clone(token)),
            _ => None,
        }
    }

    /// The cached token, whatever its age.
    pub(crate) fn current(&self) -> Option<Token> {
        self.cached.load_full().map(|t| Token::clone(&t))
    }

    /// Stores the broker's current token as it stands now (an Invalidate's or a watch's
    /// answer): newer than whatever a GetToken in flight will bring back.
    pub(crate) fn store(&self, token: &Token) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *generation = generation.wrapping_add(1);
        self.cached.store(Some(Arc::new(token.clone())));
    }

    /// The generation a fetch starting now must find unchanged to store its answer.
    fn generation(&self) -> u64 {
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a GetToken answer unless a newer token was stored since `seen`.
    fn store_fetched(&self, token: &Token, seen: u64) {
        let generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *generation == seen {
            self.cached.store(Some(Arc::new(token.clone())));
        }
    }

    /// Joins the GetToken in flight that asked for at least `min_validity`, or starts one with
    /// `start` (which must spawn the call). Re-checks the cache under the lock: a call that just
    /// ended stored its token before leaving the slot.
    pub(crate) fn join_fetch<F>(
        self: &Arc<Self>,
        margin: Duration,
        min_validity: Duration,
        start: F,
    ) -> Joined<Token>
    where
        F: FnOnce() -> Pin<Box<dyn Future<Output = Result<Token, Error>> + Send>>,
    {
        let mut fetch = self.fetch.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = self.fresh(Instant::now(), margin.saturating_add(min_validity)) {
            return Joined::Cached(token);
        }
        if let Some(f) = fetch.as_ref()
            && f.min_validity >= min_validity
        {
            return Joined::Wait(f.call.clone());
        }
        // None in flight, or one asking for less validity than this caller needs: start one
        // (later callers join the new one; the older one still answers its own waiters).
        let id = next_id();
        let slot = Arc::clone(self);
        let seen = self.generation();
        let call = start();
        let call = async move {
            let result = call.await;
            if let Ok(token) = &result {
                slot.store_fetched(token, seen);
            }
            slot.end_fetch(id);
            result
        };
        let call = spawn(call);
        *fetch = Some(Fetch {
            id,
            min_validity,
            call: call.clone(),
        });
        Joined::Wait(call)
    }

    fn end_fetch(&self, id: u64) {
        let mut fetch = self.fetch.lock().unwrap_or_else(PoisonError::into_inner);
        if fetch.as_ref().is_some_and(|f| f.id == id) {
            *fetch = None;
        }
    }

    /// Joins the Invalidate in flight for the same reported token, or starts one.
    pub(crate) fn join_invalidation<F>(
        self: &Arc<Self>,
        reported: &str,
        start: F,
    ) -> Call<Invalidated>
    where
        F: FnOnce() -> Pin<Box<dyn Future<Output = Result<Invalidated, Error>> + Send>>,
    {
        let mut slot = self
            .invalidation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = slot.as_ref()
            && *i.reported == *reported
        {
            return i.call.clone();
        }
        let id = next_id();
        let this = Arc::clone(self);
        let call = start();
        let call = spawn(async move {
            let result = call.await;
            if let Ok(answer) = &result {
                // The broker's current token, whatever the outcome.
                this.store(&answer.token);
            }
            this.end_invalidation(id);
            result
        });
        *slot = Some(Invalidation {
            id,
            reported: reported.into(),
            call: call.clone(),
        });
        call
    }

    fn end_invalidation(&self, id: u64) {
        let mut slot = self
            .invalidation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|i| i.id == id) {
            *slot = None;
        }
    }
}

/// Runs `call` as its own task; the returned handle can be awaited by any number of callers,
/// and dropping any of them does not stop the task.
fn spawn<T>(call: impl Future<Output = Result<T, Error>> + Send + 'static) -> Call<T>
where
    T: Clone + Send + Sync + 'static,
{
    let task = tokio::spawn(call);
    let joined: Pin<Box<dyn Future<Output = Result<T, Error>> + Send>> = Box::pin(async move {
        task.await.unwrap_or_else(|e| {
            Err(Error::Broker {
                code: tonic::Code::Internal,
                message: format!("the call to the broker ended abnormally: {e}"),
            })
        })
    });
    joined.shared()
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;
    use crate::token::test_token;

    const MARGIN: Duration = Duration::from_secs(30);

    type Start = Pin<Box<dyn Future<Output = Result<Token, Error>> + Send>>;
    type Gate = oneshot::Sender<Result<Token, Error>>;

    /// A start function counting its calls, answering what the gate sends.
    fn gated(starts: &Arc<AtomicUsize>) -> (Gate, impl FnOnce() -> Start) {
        let (tx, rx) = oneshot::channel();
        let starts = starts.clone();
        let start = move || {
            starts.fetch_add(1, Ordering::SeqCst);
            let call: Start = Box::pin(async move { rx.await.unwrap() });
            call
        };
        (tx, start)
    }

    fn wait(j: Joined<Token>) -> Call<Token> {
        match j {
            Joined::Wait(c) => c,
            Joined::Cached(_) => panic!("expected a call"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call_and_its_error() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, start) = gated(&starts);
        let first = wait(slot.join_fetch(MARGIN, Duration::ZERO, start));
        let (_unused, start2) = gated(&starts);
        let second = wait(slot.join_fetch(MARGIN, Duration::ZERO, start2));
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        tx.send(Err(Error::UnknownAccount {
            message: "nope".into(),
        }))
        .unwrap();
        let (a, b) = tokio::join!(first, second);
        assert_eq!(a.unwrap_err(), b.clone().unwrap_err());
        assert!(matches!(b, Err(Error::UnknownAccount { .. })));
        // Errors are not cached: the next caller starts a new call.
        let (_tx, start3) = gated(&starts);
        drop(wait(slot.join_fetch(MARGIN, Duration::ZERO, start3)));
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_gives_up_strands_no_follower() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, start) = gated(&starts);
        let leader = wait(slot.join_fetch(MARGIN, Duration::ZERO, start));
        let (_unused, start2) = gated(&starts);
        let follower = wait(slot.join_fetch(MARGIN, Duration::ZERO, start2));
        // The leader polls once, then is dropped (its caller was cancelled).
        let mut leader = Box::pin(leader);
        assert!(futures_util::poll!(leader.as_mut()).is_pending());
        drop(leader);
        tx.send(Ok(test_token("a", "t1", Duration::from_secs(3600))))
            .unwrap();
        let token = follower.await.unwrap();
        assert_eq!(token.access_token(), "t1");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_answers_until_the_margin() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, start) = gated(&starts);
        let call = wait(slot.join_fetch(MARGIN, Duration::ZERO, start));
        tx.send(Ok(test_token("a", "t1", Duration::from_secs(100))))
            .unwrap();
        call.await.unwrap();
        // 100 s of life, 30 s of margin: cached for about 70 s.
        let (_tx, start) = gated(&starts);
        assert!(matches!(
            slot.join_fetch(MARGIN, Duration::ZERO, start),
            Joined::Cached(_)
        ));
        // A caller needing 80 s more does not get it from the cache.
        let (_tx2, start) = gated(&starts);
        drop(wait(slot.join_fetch(
            MARGIN,
            Duration::from_secs(80),
            start,
        )));
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(69)).await;
        assert!(slot.fresh(Instant::now(), MARGIN).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(slot.fresh(Instant::now(), MARGIN).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn reports_of_one_token_share_one_invalidate_and_store_its_answer() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel::<()>();
        let rx = futures_util::FutureExt::shared(async move { rx.await.ok() });
        let start = |starts: Arc<AtomicUsize>, rx: futures_util::future::Shared<_>| {
            move || {
                starts.fetch_add(1, Ordering::SeqCst);
                let call: Pin<Box<dyn Future<Output = Result<Invalidated, Error>> + Send>> =
                    Box::pin(async move {
                        rx.await;
                        Ok(Invalidated {
                            outcome: crate::InvalidateOutcome::Invalidated,
                            invalidated: true,
                            token: test_token("a", "new", Duration::from_secs(3600)),
                        })
                    });
                call
            }
        };
        let a = slot.join_invalidation("old", start(starts.clone(), rx.clone()));
        let b = slot.join_invalidation("old", start(starts.clone(), rx.clone()));
        let other = slot.join_invalidation("older", start(starts.clone(), rx.clone()));
        assert_eq!(starts.load(Ordering::SeqCst), 2, "one per reported token");
        tx.send(()).unwrap();
        let (a, b, _) = tokio::join!(a, b, other);
        assert!(a.unwrap().token.same_token(&b.unwrap().token));
        assert_eq!(slot.current().unwrap().access_token(), "new");
    }

    /// An Invalidate answer (T2) stored while a GetToken was in flight; the GetToken's late
    /// answer (T1, the token just reported) must not replace it.
    #[tokio::test(start_paused = true)]
    async fn a_late_get_token_answer_does_not_replace_a_newer_token() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, start) = gated(&starts);
        let fetch = wait(slot.join_fetch(MARGIN, Duration::from_secs(60), start));
        let invalidation = slot.join_invalidation("t1", || {
            Box::pin(async {
                Ok(Invalidated {
                    outcome: crate::InvalidateOutcome::Invalidated,
                    invalidated: true,
                    token: test_token("a", "t2", Duration::from_secs(3600)),
                })
            })
        });
        invalidation.await.unwrap();
        tx.send(Ok(test_token("a", "t1", Duration::from_secs(80))))
            .unwrap();
        // The caller that asked gets its answer; the cache keeps the newer token.
        assert_eq!(fetch.await.unwrap().access_token(), "t1");
        assert_eq!(slot.current().unwrap().access_token(), "t2");
        let hot = slot.fresh(Instant::now(), MARGIN).unwrap();
        assert_eq!(hot.access_token(), "t2");
        // A watch's store counts the same way.
        let (tx, start) = gated(&starts);
        let fetch = wait(slot.join_fetch(MARGIN, Duration::from_secs(7200), start));
        slot.store(&test_token("a", "t3", Duration::from_secs(3600)));
        tx.send(Ok(test_token("a", "t2", Duration::from_secs(7300))))
            .unwrap();
        fetch.await.unwrap();
        assert_eq!(slot.current().unwrap().access_token(), "t3");
        // With nothing stored meanwhile, a fetch's answer is cached as before.
        let (tx, start) = gated(&starts);
        let fetch = wait(slot.join_fetch(MARGIN, Duration::from_secs(7200), start));
        tx.send(Ok(test_token("a", "t4", Duration::from_secs(9000))))
            .unwrap();
        fetch.await.unwrap();
        assert_eq!(slot.current().unwrap().access_token(), "t4");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_needing_more_validity_does_not_join_a_smaller_call() {
        let slot = Arc::new(Slot::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let (_tx, start) = gated(&starts);
        let _small = wait(slot.join_fetch(MARGIN, Duration::ZERO, start));
        let (_tx2, start) = gated(&starts);
        let _big = wait(slot.join_fetch(MARGIN, Duration::from_secs(600), start));
        let (_tx3, start) = gated(&starts);
        let _joins_big = wait(slot.join_fetch(MARGIN, Duration::from_secs(60), start));
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }
}
