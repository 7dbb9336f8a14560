//! The revisioned key-value store behind the control plane: the [`Store`] trait (etcd's
//! semantics), its value types and errors. [`RedbStore`] is the embedded implementation.
//!
//! # Model (the same as etcd's v3 MVCC API)
//!
//! - The store has one global **revision** (`u64`). An empty store is at revision 0. Every
//!   write that changes something (a put, a delete of a present key, a transaction with at
//!   least one such op) creates exactly one new revision, `current + 1`. Writes that change
//!   nothing (deleting an absent key, an empty transaction) create none, as in etcd.
//! - Each key carries `create_revision` (the revision that created it, reset when it is
//!   deleted and created again), `mod_revision` (the revision of its last change) and
//!   `version` (1 on creation, +1 on every put; a delete removes the key).
//! - Compare-and-swap uses the key's `mod_revision`; `0` means "the key must not exist".
//!   A failed compare is [`StoreError::Conflict`] carrying the key's current `mod_revision`.
//! - [`Store::watch`] streams [`WatchBatch`]es: all the events of one revision under a
//!   prefix, in revision order. Reading a [`RangeResponse`] at revision `R` and then
//!   watching from `R + 1` sees every later change exactly once.
//!
//! # Object safety
//!
//! Callers hold `Arc<dyn Store>`, so methods return [`BoxFuture`] (a boxed `Send` future)
//! instead of being `async fn`: the boxing costs one allocation per call, which is nothing
//! next to an fsync. Keys are borrowed for the life of the future.
//!
//! # Watch history and compaction
//!
//! Every revision's events are kept in an event log inside the store, so a watch can start
//! in the past. The log is compacted: the embedded store keeps the last
//! [`StoreOptions::history_revisions`] revisions (10 000 by default; retention is by count,
//! not by age), and [`Store::compact`] drops older history explicitly. Watching from a
//! revision at or below the compacted one fails with [`StoreError::Compacted`]; the caller
//! must re-list ([`Store::range`]) and watch from the list's revision + 1, as with etcd.
//!
//! # Slow watchers
//!
//! Writers never wait for watchers. Live events reach watchers through a bounded buffer
//! ([`StoreOptions::watch_buffer`] revisions); a watcher that falls further behind than
//! that gets [`StoreError::WatchLagged`] as the last item of its stream and must re-list.
//! Memory stays bounded whatever the number or speed of watchers.

mod codec;
mod redb;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;

pub use self::redb::RedbStore;

/// The future type returned by [`Store`] methods: boxed and `Send`, so `dyn Store` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default `--data-dir` of the embedded store.
pub const DEFAULT_DATA_DIR: &str = "./biplane-data";

/// The file name of the embedded store inside its data directory.
pub const STORE_FILE_NAME: &str = "store.redb";

/// A key with its value and revision metadata, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, e.g. `/registry/HTTPRoute/default/web`.
    pub key: String,
    /// The value bytes.
    pub value: Bytes,
    /// The revision at which this key was (last) created.
    pub create_revision: u64,
    /// The revision of the last put of this key.
    pub mod_revision: u64,
    /// How many times the key was put since it was created (1 after creation).
    pub version: u64,
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .finish()
    }
}

/// The condition a single-key write checks before it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Write unconditionally.
    #[default]
    None,
    /// The key's current `mod_revision` must equal this; `0` means the key must not exist.
    ModRevision(u64),
}

/// One comparison of a transaction: the key's current `mod_revision` must equal
/// `mod_revision` (`0` = the key must not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The expected `mod_revision`; `0` means absent.
    pub mod_revision: u64,
}

impl Compare {
    /// The key's `mod_revision` must be `mod_revision`.
    pub fn mod_revision(key: impl Into<String>, mod_revision: u64) -> Self {
        Self {
            key: key.into(),
            mod_revision,
        }
    }

    /// The key must not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self::mod_revision(key, 0)
    }
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or replace `key` with `value`.
    Put {
        /// The key written.
        key: String,
        /// The new value.
        value: Bytes,
    },
    /// Remove `key` (nothing happens if it is absent).
    Delete {
        /// The key removed.
        key: String,
    },
}

impl Op {
    /// A put op.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A delete op.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key this op writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// An atomic multi-key transaction: if every compare holds, every op applies at one new
/// revision; otherwise nothing changes and [`StoreError::Conflict`] names the first
/// failed compare. A key may appear in at most one op (as in etcd).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions checked first, all against the same snapshot.
    pub compares: Vec<Compare>,
    /// Writes applied if every compare holds.
    pub ops: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a compare.
    #[must_use]
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds an op.
    #[must_use]
    pub fn then(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }
}

/// The answer to [`Store::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResponse {
    /// The store revision the read was taken at.
    pub revision: u64,
    /// The key, if present.
    pub kv: Option<KeyValue>,
}

/// The answer to [`Store::range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResponse {
    /// The store revision the read was taken at: watch from `revision + 1` to follow it.
    pub revision: u64,
    /// Every key under the prefix, sorted by key (byte order).
    pub kvs: Vec<KeyValue>,
}

/// The answer to [`Store::put`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResponse {
    /// The new store revision (this put's revision; also `kv.mod_revision`).
    pub revision: u64,
    /// The key as now stored.
    pub kv: KeyValue,
    /// The key before the put, if it existed.
    pub prev: Option<KeyValue>,
}

/// The answer to [`Store::delete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteResponse {
    /// The store revision after the call: the delete's revision if a key was removed,
    /// else the unchanged current revision.
    pub revision: u64,
    /// The removed key, or `None` if it did not exist (nothing changed).
    pub prev: Option<KeyValue>,
}

/// The answer to [`Store::txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// The store revision after the transaction: the new revision if anything changed,
    /// else the unchanged current revision.
    pub revision: u64,
    /// For each op, in order, the key's value before the transaction (`None` if absent).
    pub prev: Vec<Option<KeyValue>>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key was created or replaced.
    Put {
        /// The key as stored after the change (`kv.mod_revision` is the event's revision).
        kv: KeyValue,
        /// The key before the change, if it existed.
        prev: Option<KeyValue>,
    },
    /// A key was removed.
    Delete {
        /// The removed key.
        key: String,
        /// The revision of the delete.
        mod_revision: u64,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// All events of one revision under a watched prefix (never empty), in the order the
/// ops were given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision these events happened at.
    pub revision: u64,
    /// The events, in op order.
    pub events: Vec<Event>,
}

/// A stream of [`WatchBatch`]es in strictly increasing revision order.
///
/// It implements [`tokio_stream::Stream`]; [`WatchStream::recv`] is the same without the
/// trait. An `Err` item ([`StoreError::WatchLagged`], [`StoreError::Compacted`],
/// [`StoreError::Closed`], ...) is always the last item: re-list and watch again.
/// Dropping the stream cancels the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchBatch, StoreError>>,
}

impl WatchStream {
    /// Wraps a receiver fed by a store implementation. The sender must respect the
    /// contract above (increasing revisions, an error ends the stream).
    pub fn from_receiver(rx: mpsc::Receiver<Result<WatchBatch, StoreError>>) -> Self {
        Self { rx }
    }

    /// The next batch; `None` once the watch has ended.
    pub async fn recv(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        self.rx.recv().await
    }
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<WatchBatch, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A precondition or transaction compare did not hold; nothing was written.
    #[error(
        "conflict on key {key:?}: expected mod_revision {expected}, current mod_revision {current} (0 = absent)"
    )]
    Conflict {
        /// The index of the failed compare in [`Txn::compares`] (0 for put/delete).
        index: usize,
        /// The key whose compare failed.
        key: String,
        /// The `mod_revision` the caller expected (0 = absent).
        expected: u64,
        /// The key's current `mod_revision` (0 = absent).
        current: u64,
    },
    /// A watch asked for history that has been compacted away: re-list, then watch from
    /// the list's revision + 1.
    #[error(
        "revision {requested} has been compacted (history starts after revision {compact_revision})"
    )]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The newest compacted revision; history is available from `compact_revision + 1`.
        compact_revision: u64,
    },
    /// [`Store::compact`] was asked to compact past the current revision.
    #[error("revision {requested} is in the future (current revision {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: u64,
        /// The store's current revision.
        current: u64,
    },
    /// The watcher fell too far behind the writers and was dropped: re-list and watch again.
    #[error(
        "watch fell behind by more than the buffer allows (at revision {revision}); re-list and watch again"
    )]
    WatchLagged {
        /// The last revision delivered to (or requested by) this watcher.
        revision: u64,
    },
    /// The request is malformed (empty key, same key twice in a transaction, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Another process (or another handle in this process) already has the store open.
    #[error("store {path} is already open by another process or handle")]
    AlreadyOpen {
        /// The store file.
        path: PathBuf,
    },
    /// The store could not be opened or created.
    #[error("cannot open store {path}")]
    Open {
        /// The store file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Stored bytes could not be decoded.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The storage backend failed (I/O error, ...).
    #[error("storage backend error")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store is shut down (or its worker died).
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the call may succeed if the caller re-reads and retries (conflicts) or
    /// re-lists and re-watches (compaction, lag).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. }
                | StoreError::Compacted { .. }
                | StoreError::WatchLagged { .. }
        )
    }
}

/// A revisioned key-value store with etcd's semantics (see the module docs).
///
/// Implementations must be safe to share (`Arc<dyn Store>`) and must never block the async
/// runtime.
pub trait Store: Send + Sync + 'static {
    /// Reads one key at the current revision.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResponse, StoreError>>;

    /// Reads every key starting with `prefix` (`""` = all keys), sorted by key, from one
    /// consistent snapshot, with the revision of that snapshot.
    fn range<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<RangeResponse, StoreError>>;

    /// Creates or replaces `key` if `precondition` holds; else [`StoreError::Conflict`].
    /// Acknowledged writes are durable.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<PutResponse, StoreError>>;

    /// Removes `key` if `precondition` holds; else [`StoreError::Conflict`]. Deleting an
    /// absent key (with [`Precondition::None`] or `ModRevision(0)`) succeeds, changes
    /// nothing and creates no revision.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<DeleteResponse, StoreError>>;

    /// Runs an atomic transaction (see [`Txn`]).
    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResponse, StoreError>>;

    /// Watches keys starting with `prefix` from `from_revision` (inclusive; `0` = only
    /// changes committed after this call). Past revisions are replayed from history, then
    /// live changes follow, with no gap and no duplicate. Fails with
    /// [`StoreError::Compacted`] if `from_revision` is at or below the compacted revision.
    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from_revision: u64,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>>;

    /// The latest committed revision.
    fn current_revision(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Drops watch history up to and including `revision` (keys are unaffected). Fails
    /// with [`StoreError::Compacted`] if it is already compacted that far and with
    /// [`StoreError::FutureRevision`] past the current revision.
    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Tuning of the embedded store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How many revisions of watch history to keep (at least 1). Older history is
    /// compacted automatically as writes go on.
    pub history_revisions: u64,
    /// How many revisions of live events a watcher may lag behind before it is dropped
    /// with [`StoreError::WatchLagged`] (shared ring buffer, at least 1).
    pub watch_buffer: usize,
    /// Per-watch queue of batches ready for the consumer (at least 1).
    pub watch_queue: usize,
    /// redb page cache size in bytes.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            history_revisions: 10_000,
            watch_buffer: 1024,
            watch_queue: 64,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}
