//! Reservations of one token family that arrive together go to Redis as
//! one call of the reserve script.
//!
//! Why: under load most concurrent requests carry the same token (an agent
//! fanning out), and each `EVALSHA` costs Redis a command parse, a script
//! call, a `MULTI`/`EXEC` pair in its append-only log and a reply, and
//! costs the proxy a round trip through the client. At most [`IN_FLIGHT`]
//! rounds of calls are outstanding. A request that finds a round free
//! sends its reservation itself, at once (so latency at low load is what
//! it was, and nothing waits for a task to wake). The others queue; one
//! task sends everything queued as the next round when one is free, one
//! script call per family (all keys of one call stay in one Cluster slot;
//! families never wait for each other's calls).
//!
//! The script applies the reservations of a call one after the other, each
//! all-or-nothing, exactly as separate calls in that order would.
//!
//! A request that gives up while its reservation is out (its client left,
//! its deadline passed) spends nothing, as on the embedded store: a call
//! already sent is finished anyway, and the uses it counted for a request
//! no longer waiting are given back ([`give_back`]). Only a call whose
//! outcome is unknown (Redis did not answer in time) keeps its uses: deny
//! when unsure.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::finish_on_drop::FinishOnDrop;
use super::{FAMILIES, Inner, TTL_AFTER_EXPIRY, UNSEEN, family_keys, marker};
use crate::store::{StoreError, now_unix};

/// Rounds outstanding at once. While they wait for Redis's fsync, the next
/// requests queue. One round in flight would batch more (Redis spent ≈12%
/// less CPU per request in the load benchmark, for the same throughput; 4
/// gave no more either: benches/README.md) but make the second of two
/// concurrent requests wait for the first's round trip.
pub(super) const IN_FLIGHT: usize = 2;
/// Reservations in one script call at most (bounds the time Redis spends in
/// one script, during which it serves nobody else).
const MAX_BATCH: usize = 64;
/// Reservations taken into one round at most.
const MAX_ROUND: usize = 4096;

/// One reservation: the blocks of one request.
pub(super) struct Job {
    /// Families of the blocks, each once; `Block::family` indexes this.
    pub families: Vec<String>,
    pub blocks: Vec<Block>,
    /// Gets the script's answer for this reservation: status (0, or -1
    /// retired, -2 family full, -3 metadata needed), whether a block was
    /// new, then one count per block.
    pub answer: oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

pub(super) struct Block {
    /// 1-based position of the block's family in `Job::families`.
    pub family: usize,
    pub id: String,
    /// Metadata JSON, or empty when Redis is known to hold it.
    pub meta: String,
    pub expires: u64,
    /// Whether to write the block's last use.
    pub touch: bool,
}

/// The queue and the rounds.
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
    pub(super) rounds: Arc<Semaphore>,
}

impl Batcher {
    /// The batcher, and the receiving end for [`run`].
    pub(super) fn new() -> (Batcher, Rounds) {
        let (queue, rx) = mpsc::unbounded_channel();
        let rounds = Arc::new(Semaphore::new(IN_FLIGHT));
        (
            Batcher {
                queue,
                rounds: rounds.clone(),
            },
            Rounds { rx, rounds },
        )
    }
}

/// What [`run`] needs: the queue's receiving end and the round permits.
pub(super) struct Rounds {
    rx: mpsc::UnboundedReceiver<Job>,
    rounds: Arc<Semaphore>,
}

/// Sends `job` now if a round is free, or queues it for the next round.
/// Its answer arrives on `job.answer`; `Err` if the queue is gone.
pub(super) async fn submit(inner: &Arc<Inner>, job: Job) -> Result<(), Job> {
    match inner.batch.rounds.clone().try_acquire_owned() {
        Ok(round) => {
            // Sent from this request's own task (no hand-over to another);
            // if the request is dropped meanwhile, the call is finished on a
            // task of its own so that its answer is seen and given back.
            FinishOnDrop::new(send_round(inner.clone(), vec![job], round)).await;
            Ok(())
        }
        Err(_) => inner.batch.queue.send(job).map_err(|e| e.0),
    }
}

/// One call, then its round permit back.
async fn send_round(inner: Arc<Inner>, jobs: Vec<Job>, round: OwnedSemaphorePermit) {
    send(&inner, jobs).await;
    drop(round);
}

/// Gives back one use of each block (`(family, id)`) of a reservation that
/// Redis counted for a request no longer waiting for it: the request was
/// never forwarded. In the background: the request is gone.
pub(super) fn give_back<'a>(inner: &Arc<Inner>, blocks: impl Iterator<Item = (&'a str, &'a str)>) {
    let mut args: Vec<(String, String)> = Vec::new();
    for (family, id) in blocks {
        if let Some(k) = inner.known.get(id) {
            k.seen.store(UNSEEN, Ordering::Relaxed);
        }
        let [count, ..] = family_keys(family);
        args.push((count, id.to_string()));
    }
    // Called from destructors too: outside a runtime (its shutdown) there
    // is nothing to send the release on, and the uses stay counted.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let inner = inner.clone();
    rt.spawn(async move {
        let mut inv = inner.release.prepare_invoke();
        for (key, id) in &args {
            inv.key(key).arg(id);
        }
        let mut c = inner.conn();
        if let Err(e) = inner.op("release", inv.invoke_async::<()>(&mut c)).await {
            tracing::error!(error = %e, "giving back the uses of an abandoned reservation failed");
        }
    });
}

/// Sends queued jobs, a round at a time, until the store is gone.
pub(super) async fn run(weak: Weak<Inner>, rounds: Rounds) {
    let Rounds { mut rx, rounds } = rounds;
    let mut queued: Vec<Job> = Vec::new();
    loop {
        if rx.recv_many(&mut queued, MAX_ROUND).await == 0 {
            return;
        }
        // A round freed wakes this task before any request can take it
        // (the semaphore serves waiters first), so queued jobs go next.
        let Ok(round) = rounds.clone().acquire_owned().await else {
            return;
        };
        while queued.len() < MAX_ROUND {
            match rx.try_recv() {
                Ok(j) => queued.push(j),
                Err(_) => break,
            }
        }
        // A request that stopped waiting while queued (its client left, or
        // its deadline passed) is answered 503 or not at all: its use is
        // not spent.
        queued.retain(|j| !j.answer.is_closed());
        if queued.is_empty() {
            continue;
        }
        let Some(inner) = weak.upgrade() else { return };
        let calls = calls(&mut queued);
        // Its own task: the calls finish and answer even if the store is
        // closed meanwhile (this loop is aborted then).
        tokio::spawn(async move {
            futures_util::future::join_all(calls.into_iter().map(|jobs| send(&inner, jobs))).await;
            drop(round);
        });
    }
}

/// Groups `queued` (emptied) into script calls: one family each, at most
/// [`MAX_BATCH`] reservations.
fn calls(queued: &mut Vec<Job>) -> Vec<Vec<Job>> {
    let mut out: Vec<Vec<Job>> = Vec::new();
    // Families → the call still open for them (linear in the round, however
    // many families it holds).
    let mut open: std::collections::HashMap<Vec<String>, usize> = Default::default();
    for j in queued.drain(..) {
        match open.get(&j.families) {
            Some(&i) if out[i].len() < MAX_BATCH => out[i].push(j),
            _ => {
                open.insert(j.families.clone(), out.len());
                out.push(vec![j]);
            }
        }
    }
    out
}

/// One call of the reserve script for `jobs`, which share their families.
///
/// A call that may record a new block (one carrying metadata) first adds
/// its families to `till:families`, in the same pipeline: Redis runs one
/// connection's commands in order, so no counter can exist whose family the
/// list lacks, even if this process dies at any point. (A second command
/// after the script, as before, left a window in which `kill -9` orphaned
/// a new family: missing from the usage view and from `till store export`,
/// whose import could then give its uses back.) It cannot go inside the
/// script: the list is one global key, and a script's keys must stay in
/// the family's Cluster slot.
async fn send(inner: &Arc<Inner>, jobs: Vec<Job>) {
    let mut eval = redis::cmd("EVALSHA");
    eval.arg(inner.reserve.get_hash())
        .arg(jobs[0].families.len() * 5);
    for f in &jobs[0].families {
        for k in family_keys(f) {
            eval.arg(k);
        }
    }
    eval.arg(now_unix())
        .arg(inner.max_blocks_per_family.load(Ordering::Relaxed))
        .arg(TTL_AFTER_EXPIRY);
    for j in &jobs {
        eval.arg(j.blocks.len());
        for b in &j.blocks {
            eval.arg(b.family)
                .arg(&b.id)
                .arg(&b.meta)
                .arg(b.expires)
                .arg(if b.touch { "1" } else { "0" });
        }
    }
    let register = jobs
        .iter()
        .any(|j| j.blocks.iter().any(|b| !b.meta.is_empty()));
    let mut p = redis::pipe();
    if register {
        p.sadd(FAMILIES, &jobs[0].families).ignore();
    }
    p.add_command(eval);
    // Read after the script, on the same connection: if it still holds this
    // process's marker, the script ran on the data this process counts in
    // (a Redis wiped before it would have lost the marker too).
    p.get(marker::KEY);
    let mut conn = inner.conn();
    let call = async {
        match p.query_async::<(Vec<i64>, Option<String>)>(&mut conn).await {
            // Redis restarted, or flushed its scripts: load it, once.
            Err(e) if e.code() == Some("NOSCRIPT") => {
                inner.reserve.load_async(&mut conn).await?;
                p.query_async::<(Vec<i64>, Option<String>)>(&mut conn).await
            }
            other => other,
        }
    };
    // Uses counted on a wiped Redis stay counted there: deny when unsure.
    let got: Result<Vec<i64>, StoreError> = inner
        .op("reserve", call)
        .await
        .and_then(|(v, id)| inner.check_store_id(id.as_deref()).map(|()| v));
    let expected: usize = jobs.iter().map(|j| 2 + j.blocks.len()).sum();
    let got = got.and_then(|v| {
        if v.len() == expected {
            Ok(v)
        } else {
            Err(StoreError::Io(format!(
                "redis at {} answered the reserve script unexpectedly",
                inner.target
            )))
        }
    });
    let mut at = 0;
    for j in jobs {
        let n = 2 + j.blocks.len();
        let part = match &got {
            Ok(v) => Ok(v[at..at + n].to_vec()),
            Err(e) => Err(e.clone()),
        };
        at += n;
        // A request that stopped waiting (its client left) dropped its
        // receiver: what was counted for it goes back.
        if let Err(Ok(v)) = j.answer.send(part)
            && v.first() == Some(&0)
        {
            give_back(
                inner,
                j.blocks
                    .iter()
                    .map(|b| (j.families[b.family - 1].as_str(), b.id.as_str())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(family: &str, n: usize) -> Job {
        Job {
            families: vec![family.to_string()],
            blocks: vec![Block {
                family: 1,
                id: n.to_string(),
                meta: String::new(),
                expires: 0,
                touch: false,
            }],
            answer: oneshot::channel().0,
        }
    }

    /// A round becomes one call per family, none over [`MAX_BATCH`], each
    /// family's reservations in the order they queued.
    #[test]
    fn a_round_is_one_call_per_family_in_queue_order() {
        let mut queued: Vec<Job> = (0..200)
            .map(|n| job(["f", "g", "f", "h"][n % 4], n))
            .collect();
        let calls = calls(&mut queued);
        assert!(queued.is_empty());
        let shape: Vec<(String, usize)> = calls
            .iter()
            .map(|c| (c[0].families[0].clone(), c.len()))
            .collect();
        let want = [("f", 64), ("g", 50), ("h", 50), ("f", 36)];
        assert_eq!(shape, want.map(|(f, n)| (f.to_string(), n)).to_vec());
        for c in &calls {
            assert!(c.iter().all(|j| j.families == c[0].families));
            let ids: Vec<usize> = c.iter().map(|j| j.blocks[0].id.parse().unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        }
    }
}
