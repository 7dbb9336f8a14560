//! The embedded [`Store`]: one redb file (`store.redb`) in the data directory, durable
//! commits, an in-file event log for watch history, and a bounded fan-out to live watchers.
//!
//! # Layout
//!
//! Three redb tables in one file:
//! - `keys`: key → (create_revision, mod_revision, version, value);
//! - `log`: revision → the events of that revision (the watch history);
//! - `meta`: `revision` (the current revision) and `compact_revision` (history is kept
//!   for revisions above it).
//!
//! A write transaction updates all three and commits with redb's default
//! `Durability::Immediate` (fsync before `commit` returns), so an acknowledged write
//! survives `kill -9` and power loss, and a crash at any moment leaves the whole
//! transaction or none of it.
//!
//! # Threads
//!
//! redb is synchronous: every call runs on `tokio::task::spawn_blocking`, so async callers
//! never block the runtime. Writes are serialized by a mutex taken on the blocking thread
//! (redb allows one write transaction at a time anyway); the same critical section
//! commits and then publishes the revision's events to live watchers, so watchers see
//! revisions in commit order. A write future dropped before it resolves may still commit
//! (as with any remote store): re-read to find out.
//!
//! # Watches
//!
//! A watch subscribes to a `tokio::sync::broadcast` ring of the last
//! [`StoreOptions::watch_buffer`] published revisions, noting under the publish lock the
//! last published revision `P`. A per-watch task replays `[from, P]` from the `log` table
//! (in chunks, with backpressure from the consumer), then forwards live revisions `> P`.
//! A watcher lagging more than the ring is ended with [`StoreError::WatchLagged`].
//!
//! # Ownership
//!
//! redb locks the file: a second `open` of the same directory, in this process or
//! another, fails with [`StoreError::AlreadyOpen`]. The file is closed when the last
//! clone of the [`RedbStore`] (and any watch still replaying history) is dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ::redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

use super::codec::{decode_events, decode_record, encode_events, encode_record};
use super::{
    BoxFuture, Compare, DeleteResponse, Event, GetResponse, KeyValue, Op, Precondition,
    PutResponse, RangeResponse, STORE_FILE_NAME, Store, StoreError, StoreOptions, Txn, TxnResponse,
    WatchBatch, WatchStream,
};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";

/// How many log revisions one replay step reads (one read transaction each).
const REPLAY_CHUNK: u64 = 256;

/// The redb-backed [`Store`]. Cheap to clone (all clones share one open database).
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .field("revision", &self.inner.published.load(Ordering::Acquire))
            .finish()
    }
}

struct Inner {
    db: Database,
    path: PathBuf,
    options: StoreOptions,
    /// Serializes writers; held on a blocking thread across commit and publish.
    writer: Mutex<WriterState>,
    /// Held briefly to publish a revision or to subscribe a watcher consistently.
    hub: Mutex<Hub>,
    /// The last published revision (== the last committed one once a write returns).
    published: AtomicU64,
}

struct WriterState {
    revision: u64,
    compact_revision: u64,
}

struct Hub {
    published: u64,
    tx: broadcast::Sender<Arc<WatchBatch>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent: the writer state is
    // only updated after a successful commit, and the hub update is two plain stores.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backend(e: impl Into<::redb::Error>) -> StoreError {
    StoreError::Backend(Box::new(e.into()))
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidRequest("empty key".into()));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))?
}

impl RedbStore {
    /// Opens (creating if needed) the store in `data_dir`, i.e. the file
    /// `data_dir/store.redb`. Blocking (it may repair the file after a crash): call it at
    /// startup or inside `spawn_blocking`.
    pub fn open(data_dir: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let dir = data_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            source: Box::new(e),
        })?;
        let path = dir.join(STORE_FILE_NAME);
        let db = ::redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::AlreadyOpen { path: path.clone() }
                }
                other => StoreError::Open {
                    path: path.clone(),
                    source: Box::new(other),
                },
            })?;
        let (revision, compact_revision) = init_tables(&db)?;
        let mut options = options;
        options.history_revisions = options.history_revisions.max(1);
        options.watch_buffer = options.watch_buffer.max(1);
        options.watch_queue = options.watch_queue.max(1);
        let (tx, _) = broadcast::channel(options.watch_buffer);
        tracing::info!(path = %path.display(), revision, compact_revision, "store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                options,
                writer: Mutex::new(WriterState {
                    revision,
                    compact_revision,
                }),
                hub: Mutex::new(Hub {
                    published: revision,
                    tx,
                }),
                published: AtomicU64::new(revision),
            }),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The options in force (after clamping to their minimums).
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }
}

/// Creates the tables if needed; returns (revision, compact_revision).
fn init_tables(db: &Database) -> Result<(u64, u64), StoreError> {
    let wtx = db.begin_write().map_err(backend)?;
    let state = {
        wtx.open_table(KEYS).map_err(backend)?;
        wtx.open_table(LOG).map_err(backend)?;
        let meta = wtx.open_table(META).map_err(backend)?;
        let revision = meta.get(META_REVISION).map_err(backend)?.map(|g| g.value());
        let compact = meta.get(META_COMPACT).map_err(backend)?.map(|g| g.value());
        (revision.unwrap_or(0), compact.unwrap_or(0))
    };
    wtx.commit().map_err(backend)?;
    Ok(state)
}

impl Inner {
    fn get(&self, key: &str) -> Result<GetResponse, StoreError> {
        check_key(key)?;
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let keys = rtx.open_table(KEYS).map_err(backend)?;
        let revision = meta_u64(&meta, META_REVISION)?;
        let kv = match keys.get(key).map_err(backend)? {
            Some(g) => Some(decode_record(g.value())?.into_kv(key.to_owned())),
            None => None,
        };
        Ok(GetResponse { revision, kv })
    }

    fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let keys = rtx.open_table(KEYS).map_err(backend)?;
        let revision = meta_u64(&meta, META_REVISION)?;
        let mut kvs = Vec::new();
        for item in keys.range::<&str>(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            kvs.push(decode_record(v.value())?.into_kv(k.to_owned()));
        }
        Ok(RangeResponse { revision, kvs })
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        for c in &txn.compares {
            check_key(&c.key)?;
        }
        let mut seen = std::collections::HashSet::with_capacity(txn.ops.len());
        for op in &txn.ops {
            check_key(op.key())?;
            if !seen.insert(op.key()) {
                return Err(StoreError::InvalidRequest(format!(
                    "key {:?} appears in more than one op of a transaction",
                    op.key()
                )));
            }
        }

        let mut w = lock(&self.writer);
        let wtx = self.db.begin_write().map_err(backend)?;
        let new_rev = w.revision + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        let mut prevs = Vec::with_capacity(txn.ops.len());
        let mut new_compact = w.compact_revision;
        {
            let mut keys = wtx.open_table(KEYS).map_err(backend)?;
            for (index, Compare { key, mod_revision }) in txn.compares.iter().enumerate() {
                let current = match keys.get(key.as_str()).map_err(backend)? {
                    Some(g) => decode_record(g.value())?.mod_revision,
                    None => 0,
                };
                if current != *mod_revision {
                    // Dropping `wtx` aborts the transaction.
                    return Err(StoreError::Conflict {
                        index,
                        key: key.clone(),
                        expected: *mod_revision,
                        current,
                    });
                }
            }
            for op in &txn.ops {
                let key = op.key();
                let prev = match keys.get(key).map_err(backend)? {
                    Some(g) => Some(decode_record(g.value())?.into_kv(key.to_owned())),
                    None => None,
                };
                match op {
                    Op::Put { value, .. } => {
                        let (create, version) = match &prev {
                            Some(p) => (p.create_revision, p.version + 1),
                            None => (new_rev, 1),
                        };
                        keys.insert(
                            key,
                            encode_record(create, new_rev, version, value).as_slice(),
                        )
                        .map_err(backend)?;
                        events.push(Event::Put {
                            kv: KeyValue {
                                key: key.to_owned(),
                                value: value.clone(),
                                create_revision: create,
                                mod_revision: new_rev,
                                version,
                            },
                            prev: prev.clone(),
                        });
                    }
                    Op::Delete { .. } => {
                        if prev.is_some() {
                            keys.remove(key).map_err(backend)?;
                            events.push(Event::Delete {
                                key: key.to_owned(),
                                mod_revision: new_rev,
                            });
                        }
                    }
                }
                prevs.push(prev);
            }
            if events.is_empty() {
                // Nothing changed: no revision, as in etcd. Dropping `wtx` aborts it.
                return Ok(TxnResponse {
                    revision: w.revision,
                    prev: prevs,
                });
            }
            let mut log = wtx.open_table(LOG).map_err(backend)?;
            log.insert(new_rev, encode_events(&events).as_slice())
                .map_err(backend)?;
            let mut meta = wtx.open_table(META).map_err(backend)?;
            meta.insert(META_REVISION, new_rev).map_err(backend)?;

            // Automatic compaction, amortized: let history grow by `slack` revisions past
            // the limit, then drop the oldest in one go.
            let history = self.options.history_revisions;
            let slack = (history / 16).max(1);
            if new_rev - w.compact_revision > history + slack {
                let target = new_rev - history;
                log.retain_in((w.compact_revision + 1)..=target, |_, _| false)
                    .map_err(backend)?;
                meta.insert(META_COMPACT, target).map_err(backend)?;
                new_compact = target;
            }
        }
        wtx.commit().map_err(backend)?;
        w.revision = new_rev;
        w.compact_revision = new_compact;
        self.publish(WatchBatch {
            revision: new_rev,
            events,
        });
        drop(w);
        Ok(TxnResponse {
            revision: new_rev,
            prev: prevs,
        })
    }

    /// Called with the writer lock held, right after the commit of `batch.revision`.
    fn publish(&self, batch: WatchBatch) {
        let mut hub = lock(&self.hub);
        hub.published = batch.revision;
        self.published.store(batch.revision, Ordering::Release);
        // An error only means "no watcher right now": nothing to deliver.
        let _ = hub.tx.send(Arc::new(batch));
    }

    fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        if revision > w.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: w.revision,
            });
        }
        if revision <= w.compact_revision {
            return Err(StoreError::Compacted {
                requested: revision,
                compact_revision: w.compact_revision,
            });
        }
        let wtx = self.db.begin_write().map_err(backend)?;
        {
            let mut log = wtx.open_table(LOG).map_err(backend)?;
            log.retain_in((w.compact_revision + 1)..=revision, |_, _| false)
                .map_err(backend)?;
            let mut meta = wtx.open_table(META).map_err(backend)?;
            meta.insert(META_COMPACT, revision).map_err(backend)?;
        }
        wtx.commit().map_err(backend)?;
        w.compact_revision = revision;
        Ok(())
    }

    /// Reads the log for revisions `from..=to`, keeping events under `prefix`.
    fn read_log(&self, prefix: &str, from: u64, to: u64) -> Result<Vec<WatchBatch>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let compact_revision = meta_u64(&meta, META_COMPACT)?;
        if from <= compact_revision {
            return Err(StoreError::Compacted {
                requested: from,
                compact_revision,
            });
        }
        let log = rtx.open_table(LOG).map_err(backend)?;
        let mut out = Vec::new();
        for item in log.range(from..=to).map_err(backend)? {
            let (rev, bytes) = item.map_err(backend)?;
            let events: Vec<Event> = decode_events(bytes.value())?
                .into_iter()
                .filter(|e| e.key().starts_with(prefix))
                .collect();
            if !events.is_empty() {
                out.push(WatchBatch {
                    revision: rev.value(),
                    events,
                });
            }
        }
        Ok(out)
    }

    fn compact_revision(&self) -> Result<u64, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        meta_u64(&meta, META_COMPACT)
    }
}

fn meta_u64(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64, StoreError> {
    Ok(meta.get(name).map_err(backend)?.map_or(0, |g| g.value()))
}

/// The per-watch task: replay history `[from, live_from)`, then forward live batches.
async fn run_watch(
    inner: Arc<Inner>,
    prefix: String,
    from: u64,
    live_from: u64,
    mut live: broadcast::Receiver<Arc<WatchBatch>>,
    out: mpsc::Sender<Result<WatchBatch, StoreError>>,
) {
    let mut next = from;
    while next < live_from {
        let to = (next + REPLAY_CHUNK - 1).min(live_from - 1);
        let (inner2, prefix2) = (inner.clone(), prefix.clone());
        match blocking(move || inner2.read_log(&prefix2, next, to)).await {
            Ok(batches) => {
                for b in batches {
                    if out.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        }
        next = to + 1;
    }
    // History is done: do not keep the database open on behalf of a live watch.
    drop(inner);
    loop {
        let received = tokio::select! {
            () = out.closed() => return,
            r = live.recv() => r,
        };
        match received {
            Ok(batch) => {
                if batch.revision < next {
                    continue;
                }
                next = batch.revision + 1;
                let events: Vec<Event> = batch
                    .events
                    .iter()
                    .filter(|e| e.key().starts_with(prefix.as_str()))
                    .cloned()
                    .collect();
                if events.is_empty() {
                    continue;
                }
                let b = WatchBatch {
                    revision: batch.revision,
                    events,
                };
                if out.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let _ = out
                    .send(Err(StoreError::WatchLagged {
                        revision: next.saturating_sub(1),
                    }))
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = out.send(Err(StoreError::Closed)).await;
                return;
            }
        }
    }
}

impl Store for RedbStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResponse, StoreError>> {
        let inner = self.inner.clone();
        let key = key.to_owned();
        Box::pin(blocking(move || inner.get(&key)))
    }

    fn range<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<RangeResponse, StoreError>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        Box::pin(blocking(move || inner.range(&prefix)))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<PutResponse, StoreError>> {
        let inner = self.inner.clone();
        let txn = single(key, precondition, Op::put(key, value.clone()));
        let key = key.to_owned();
        Box::pin(async move {
            let resp = blocking(move || inner.txn(&txn)).await?;
            let prev = resp.prev.into_iter().next().flatten();
            let (create_revision, version) = match &prev {
                Some(p) => (p.create_revision, p.version + 1),
                None => (resp.revision, 1),
            };
            Ok(PutResponse {
                revision: resp.revision,
                kv: KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: resp.revision,
                    version,
                },
                prev,
            })
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<DeleteResponse, StoreError>> {
        let inner = self.inner.clone();
        let txn = single(key, precondition, Op::delete(key));
        Box::pin(async move {
            let resp = blocking(move || inner.txn(&txn)).await?;
            Ok(DeleteResponse {
                revision: resp.revision,
                prev: resp.prev.into_iter().next().flatten(),
            })
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResponse, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.txn(&txn)))
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from_revision: u64,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        Box::pin(async move {
            let (live, live_from) = {
                let hub = lock(&inner.hub);
                (hub.tx.subscribe(), hub.published + 1)
            };
            let from = if from_revision == 0 {
                live_from
            } else {
                from_revision
            };
            if from < live_from {
                // Fail the call itself (not the stream) when the start is already gone.
                let inner2 = inner.clone();
                let compact_revision = blocking(move || inner2.compact_revision()).await?;
                if from <= compact_revision {
                    return Err(StoreError::Compacted {
                        requested: from,
                        compact_revision,
                    });
                }
            }
            let (tx, rx) = mpsc::channel(inner.options.watch_queue);
            tokio::spawn(run_watch(inner, prefix, from, live_from, live, tx));
            Ok(WatchStream::from_receiver(rx))
        })
    }

    fn current_revision(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let revision = self.inner.published.load(Ordering::Acquire);
        Box::pin(async move { Ok(revision) })
    }

    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.compact(revision)))
    }
}

/// A one-op transaction with the op's precondition as its only compare.
fn single(key: &str, precondition: Precondition, op: Op) -> Txn {
    let compares = match precondition {
        Precondition::None => Vec::new(),
        Precondition::ModRevision(rev) => vec![Compare::mod_revision(key, rev)],
    };
    Txn {
        compares,
        ops: vec![op],
    }
}
