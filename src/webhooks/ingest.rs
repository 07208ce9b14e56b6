//! Durable storage of verified deliveries, with group commit.
//!
//! Each request hands its verified delivery to a collector and waits for the
//! answer. The collector takes whatever has queued, up to a batch size, and
//! commits it in one transaction on one of a few writer tasks. It never waits
//! for a batch to fill: under light load a batch is one delivery and commits
//! at once; under load, deliveries queue while the writers are busy and the
//! next batch carries them all, so one fsync covers many 2xx answers.
//!
//! A delivery's answer is sent only after its transaction commits, which is
//! what makes a 2xx to Stripe mean "stored".

use std::{collections::HashSet, sync::Arc};

use anyhow::Context;
use axum::body::Bytes;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{
    envelope::{Envelope, EnvelopeError},
    signature::Signature,
};
use crate::{
    audit::{self, RequestContext},
    crypto::{Keyring, PayloadContext, Sealed, Sealer},
    dead_letters,
    events::{
        apply,
        store::{self as events, EventStatus, NewEvent},
    },
};

/// A delivery whose signature and timestamp have been verified.
pub struct Delivery {
    pub signature: Signature,
    pub signed_at: DateTime<Utc>,
    pub payload: Bytes,
    pub envelope: Result<Envelope, EnvelopeError>,
    /// The request it came in, for its audit record.
    pub context: RequestContext,
}

/// What became of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new event, now durable.
    Stored,
    /// The event id was already stored: Stripe's retry, acknowledged again.
    Duplicate,
    /// Authentic but not a usable event: quarantined.
    DeadLettered,
    /// This exact signed delivery was already accepted.
    Replayed,
}

/// The batch could not be committed; nothing of it was stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("storing the delivery failed")]
pub struct WriteFailed {
    /// The database was out of reach, as opposed to refusing the write.
    pub unavailable: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Transactions in flight at once. More than one keeps Postgres busy
    /// while a commit waits on its fsync.
    pub writers: usize,
    pub max_batch: usize,
    /// Deliveries that may wait for a writer before new ones wait to queue.
    pub queue: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            writers: 4,
            max_batch: 64,
            queue: 1024,
        }
    }
}

struct Job {
    delivery: Delivery,
    reply: oneshot::Sender<Result<Outcome, WriteFailed>>,
}

#[derive(Clone)]
pub struct EventWriter {
    jobs: mpsc::Sender<Job>,
}

impl EventWriter {
    /// Starts the collector. It stops by itself once every `EventWriter`
    /// clone is dropped and the queue is drained.
    pub fn start(
        pool: PgPool,
        keyring: Keyring,
        wake: Arc<Notify>,
        options: WriterOptions,
    ) -> Self {
        let (jobs, queue) = mpsc::channel(options.queue);
        tokio::spawn(collect(queue, pool, keyring, wake, options));
        Self { jobs }
    }

    pub async fn store(&self, delivery: Delivery) -> Result<Outcome, WriteFailed> {
        let (reply, answer) = oneshot::channel();
        let job = Job { delivery, reply };
        let closed = WriteFailed { unavailable: true };
        self.jobs.send(job).await.map_err(|_| closed.clone())?;
        answer.await.map_err(|_| closed)?
    }
}

async fn collect(
    mut queue: mpsc::Receiver<Job>,
    pool: PgPool,
    keyring: Keyring,
    wake: Arc<Notify>,
    options: WriterOptions,
) {
    let writers = Arc::new(Semaphore::new(options.writers.max(1)));
    while let Some(first) = queue.recv().await {
        // Wait for a free writer before draining: whatever queues meanwhile
        // joins this batch.
        let Ok(permit) = writers.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < options.max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let writer = write(pool.clone(), keyring.clone(), batch, wake.clone(), permit);
        tokio::spawn(writer);
    }
}

async fn write(
    pool: PgPool,
    keyring: Keyring,
    batch: Vec<Job>,
    wake: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
) {
    let (deliveries, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|j| (j.delivery, j.reply)).unzip();
    let results = match store_batch(&pool, &keyring, &deliveries).await {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(err) if unavailable(&err) || deliveries.len() == 1 => {
            log_failure(&err, deliveries.len());
            let failed = WriteFailed {
                unavailable: unavailable(&err),
            };
            vec![Err(failed); deliveries.len()]
        }
        // Something in the batch was refused by the database. Each delivery
        // is tried on its own, so one bad delivery cannot fail the others.
        Err(err) => {
            log_failure(&err, deliveries.len());
            store_one_by_one(&pool, &keyring, &deliveries).await
        }
    };
    if results.contains(&Ok(Outcome::Stored)) {
        wake.notify_one();
    }
    for (reply, result) in replies.into_iter().zip(results) {
        answer(reply, result);
    }
}

async fn store_one_by_one(
    pool: &PgPool,
    keyring: &Keyring,
    deliveries: &[Delivery],
) -> Vec<Result<Outcome, WriteFailed>> {
    let mut results = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let single = std::slice::from_ref(delivery);
        let result = match store_batch(pool, keyring, single).await {
            Ok(outcomes) => Ok(outcomes[0]),
            Err(err) => {
                log_failure(&err, 1);
                Err(WriteFailed {
                    unavailable: unavailable(&err),
                })
            }
        };
        results.push(result);
    }
    results
}

/// A database error may sit under a data key error: look down the chain.
fn unavailable(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .any(crate::db::is_unavailable)
}

fn log_failure(err: &anyhow::Error, batch: usize) {
    tracing::error!(
        error = format!("{err:#}"),
        batch,
        "webhook batch not stored"
    );
}

/// The request may have gone (client disconnected); its delivery is stored
/// or not all the same, and Stripe's retry will be deduplicated.
fn answer(
    reply: oneshot::Sender<Result<Outcome, WriteFailed>>,
    result: Result<Outcome, WriteFailed>,
) {
    if reply.send(result).is_err() {
        tracing::debug!("webhook caller left before its delivery was answered");
    }
}

async fn store_batch(
    pool: &PgPool,
    keyring: &Keyring,
    deliveries: &[Delivery],
) -> anyhow::Result<Vec<Outcome>> {
    // Taken before the transaction: a new data key commits on its own first.
    let sealer = keyring.sealer().await.context("get a data key")?;
    let mut tx = pool.begin().await.context("begin webhook batch")?;
    let mut outcomes = vec![Outcome::Replayed; deliveries.len()];
    let fresh = claim_nonces(&mut tx, deliveries).await?;
    let mut events = Vec::new();
    for &i in &fresh {
        match &deliveries[i].envelope {
            Ok(envelope) => events.push((i, envelope)),
            Err(err) => {
                quarantine(&mut tx, &sealer, err, &deliveries[i].payload)
                    .await
                    .context("dead-letter malformed delivery")?;
                outcomes[i] = Outcome::DeadLettered;
            }
        }
    }
    let mut any_pending = false;
    for (i, outcome, pending) in insert_events(&mut tx, &sealer, deliveries, events).await? {
        outcomes[i] = outcome;
        any_pending |= pending;
    }
    record_outcomes(&mut tx, deliveries, &outcomes).await?;
    if any_pending {
        // Delivered on commit, to every replica's workers.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::events::worker::CHANNEL)
            .execute(&mut *tx)
            .await
            .context("notify workers")?;
    }
    tx.commit().await.context("commit webhook batch")?;
    Ok(outcomes)
}

/// Stores authentic bytes that are not a usable event as a dead letter,
/// sealed for the entry's id, which is drawn first for that reason.
async fn quarantine(
    tx: &mut PgConnection,
    sealer: &Sealer,
    err: &EnvelopeError,
    payload: &[u8],
) -> anyhow::Result<()> {
    let id = dead_letters::store::next_id(tx).await?;
    let sealed = sealer.seal(PayloadContext::DeadLetter(id), payload)?;
    dead_letters::store::insert_malformed(tx, id, err.reason(), err.detail(), &sealed).await?;
    Ok(())
}

/// One audit record per delivery, in the batch's transaction. A replay is
/// recorded where it is refused, with its forensic record.
async fn record_outcomes(
    tx: &mut PgConnection,
    deliveries: &[Delivery],
    outcomes: &[Outcome],
) -> anyhow::Result<()> {
    let actors: Vec<String> = deliveries
        .iter()
        .map(
            |d| match d.envelope.as_ref().ok().and_then(|e| e.account.as_deref()) {
                Some(account) => format!("stripe:{account}"),
                None => "stripe".to_owned(),
            },
        )
        .collect();
    let records: Vec<audit::Record> = deliveries
        .iter()
        .zip(outcomes)
        .zip(&actors)
        .filter(|((_, outcome), _)| **outcome != Outcome::Replayed)
        .map(|((delivery, outcome), actor)| delivery_record(delivery, *outcome, actor))
        .collect();
    audit::record_many(&mut *tx, &records)
        .await
        .context("audit webhook batch")
}

fn delivery_record<'a>(
    delivery: &'a Delivery,
    outcome: Outcome,
    actor: &'a str,
) -> audit::Record<'a> {
    let action = match outcome {
        Outcome::Stored => "webhook.accepted",
        Outcome::Duplicate => "webhook.deduplicated",
        Outcome::DeadLettered | Outcome::Replayed => "webhook.quarantined",
    };
    let mut record =
        audit::Record::new(actor, action, audit::Outcome::Done).context(&delivery.context);
    match &delivery.envelope {
        Ok(envelope) => record = record.resource(envelope.id.as_str()),
        Err(err) => record = record.reason(err.reason()),
    }
    record
}

/// Records each delivery's signature as used and returns the indexes of the
/// deliveries seen for the first time. Rows go in sorted order so that two
/// batches never wait on each other's keys in opposite orders.
async fn claim_nonces(
    tx: &mut PgConnection,
    deliveries: &[Delivery],
) -> anyhow::Result<Vec<usize>> {
    let mut first_seen: Vec<usize> = Vec::with_capacity(deliveries.len());
    let mut in_batch = HashSet::new();
    for (i, d) in deliveries.iter().enumerate() {
        if in_batch.insert(d.signature) {
            first_seen.push(i);
        }
    }
    first_seen.sort_by_key(|&i| deliveries[i].signature);
    let signatures: Vec<&[u8]> = first_seen
        .iter()
        .map(|&i| &deliveries[i].signature[..])
        .collect();
    let signed_at: Vec<DateTime<Utc>> = first_seen
        .iter()
        .map(|&i| deliveries[i].signed_at)
        .collect();
    let inserted: Vec<Vec<u8>> = sqlx::query_scalar(
        "INSERT INTO webhook_nonces (signature, signed_at)
         SELECT * FROM UNNEST($1::bytea[], $2::timestamptz[])
         ON CONFLICT (signature) DO NOTHING
         RETURNING signature",
    )
    .bind(&signatures)
    .bind(&signed_at)
    .fetch_all(&mut *tx)
    .await
    .context("record webhook nonces")?;
    let inserted: HashSet<&[u8]> = inserted.iter().map(Vec::as_slice).collect();
    first_seen.retain(|&i| inserted.contains(&deliveries[i].signature[..]));
    first_seen.sort_unstable();
    Ok(first_seen)
}

/// Stores the events and says, per delivery index, whether each was new and
/// whether it now waits for the worker.
async fn insert_events(
    tx: &mut PgConnection,
    sealer: &Sealer,
    deliveries: &[Delivery],
    mut events: Vec<(usize, &Envelope)>,
) -> anyhow::Result<Vec<(usize, Outcome, bool)>> {
    events.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    let mut rows: Vec<NewEvent> = Vec::with_capacity(events.len());
    for &(i, envelope) in &events {
        let context = PayloadContext::Event(envelope.id.as_str());
        let sealed = sealer
            .seal(context, &deliveries[i].payload)
            .context("encrypt event payload")?;
        rows.push(new_event(envelope, sealed));
    }
    let stored = events::insert_batch(tx, &rows)
        .await
        .context("store webhook events")?;
    let mut newly_stored: HashSet<&str> = stored.iter().map(String::as_str).collect();
    // Within one batch the first delivery of an id takes it; any later one
    // with the same id is a duplicate, as it would be in a later batch.
    events.sort_by_key(|&(i, _)| i);
    Ok(events
        .into_iter()
        .map(|(i, envelope)| {
            if newly_stored.remove(envelope.id.as_str()) {
                (i, Outcome::Stored, apply::handles(&envelope.event_type))
            } else {
                (i, Outcome::Duplicate, false)
            }
        })
        .collect())
}

/// Types the worker does not act on are stored already marked ignored, so the
/// worker never has to look at them.
fn new_event(envelope: &Envelope, payload: Sealed) -> NewEvent<'_> {
    let handled = apply::handles(&envelope.event_type);
    NewEvent {
        envelope,
        payload,
        status: if handled {
            EventStatus::Pending
        } else {
            EventStatus::Ignored
        },
        detail: (!handled).then_some("event type not handled"),
    }
}
