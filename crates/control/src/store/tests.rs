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
    assert_eq!(
        s.get("/a").await.unwrap(),
        GetResponse {
            revision: 0,
            kv: None
        }
    );

    let r1 = s.put("/a", b("1"), Precondition::None).await.unwrap();
    assert_eq!(r1.revision, 1);
    assert_eq!(
        (r1.kv.create_revision, r1.kv.mod_revision, r1.kv.version),
        (1, 1, 1)
    );
    assert!(r1.prev.is_none());

    let r2 = s.put("/a", b("2"), Precondition::None).await.unwrap();
    assert_eq!(r2.revision, 2);
    assert_eq!(
        (r2.kv.create_revision, r2.kv.mod_revision, r2.kv.version),
        (1, 2, 2)
    );
    assert_eq!(r2.prev.as_ref().unwrap().value, b("1"));

    s.put("/b", b("x"), Precondition::None).await.unwrap();
    let d = s.delete("/a", Precondition::None).await.unwrap();
    assert_eq!(d.revision, 4);
    assert_eq!(d.prev.unwrap().mod_revision, 2);
    assert_eq!(
        s.get("/a").await.unwrap(),
        GetResponse {
            revision: 4,
            kv: None
        }
    );

    // Re-creation resets create_revision and version.
    let r5 = s.put("/a", b("3"), Precondition::None).await.unwrap();
    assert_eq!(
        (r5.kv.create_revision, r5.kv.mod_revision, r5.kv.version),
        (5, 5, 1)
    );
    let got = s.get("/a").await.unwrap();
    assert_eq!(got.revision, 5);
    assert_eq!(got.kv.unwrap(), r5.kv);

    // Deleting an absent key changes nothing and creates no revision (as etcd).
    let d = s.delete("/nope", Precondition::None).await.unwrap();
    assert_eq!(
        d,
        DeleteResponse {
            revision: 5,
            prev: None
        }
    );
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
    let r = s
        .put("/k", b("v1"), Precondition::ModRevision(0))
        .await
        .unwrap();
    assert_eq!(r.revision, 1);
    // Create-only fails once the key exists, reporting the current mod_revision.
    match s.put("/k", b("v2"), Precondition::ModRevision(0)).await {
        Err(StoreError::Conflict {
            index: 0,
            key,
            expected: 0,
            current: 1,
        }) => {
            assert_eq!(key, "/k")
        }
        other => panic!("unexpected {other:?}"),
    }
    let r = s
        .put("/k", b("v2"), Precondition::ModRevision(1))
        .await
        .unwrap();
    assert_eq!(r.revision, 2);
    let err = s
        .put("/k", b("v3"), Precondition::ModRevision(1))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: 1,
            current: 2,
            ..
        }
    ));
    assert!(err.is_retryable());
    let err = s
        .delete("/k", Precondition::ModRevision(1))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: 1,
            current: 2,
            ..
        }
    ));
    // Conflicts wrote nothing.
    assert_eq!(s.current_revision().await.unwrap(), 2);
    assert_eq!(s.get("/k").await.unwrap().kv.unwrap().value, b("v2"));

    let d = s.delete("/k", Precondition::ModRevision(2)).await.unwrap();
    assert_eq!(d.revision, 3);
    // Updating a missing key with a non-zero expectation conflicts with current 0.
    let err = s
        .put("/k", b("v4"), Precondition::ModRevision(2))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Conflict {
            expected: 2,
            current: 0,
            ..
        }
    ));
    // "Must not exist" on delete of a missing key is a no-op success.
    let d = s.delete("/k", Precondition::ModRevision(0)).await.unwrap();
    assert_eq!(
        d,
        DeleteResponse {
            revision: 3,
            prev: None
        }
    );
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
        Err(StoreError::Conflict {
            index: 1,
            key,
            expected: 0,
            current: 2,
        }) => {
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
    let got: Vec<_> = range
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.mod_revision))
        .collect();
    assert_eq!(got, vec![("/x/a", 3), ("/x/c", 3)]);

    // One revision means one watch batch with all events in op order.
    let mut w = s.watch("/x/", 3).await.unwrap();
    let batch = next(&mut w).await.unwrap();
    assert_eq!(batch.revision, 3);
    let keys: Vec<_> = batch.events.iter().map(Event::key).collect();
    assert_eq!(keys, vec!["/x/a", "/x/b", "/x/c"]);

    // A key may appear in one op only.
    let dup = Txn::new()
        .then(Op::put("/x/a", "1"))
        .then(Op::delete("/x/a"));
    assert!(matches!(
        s.txn(dup).await,
        Err(StoreError::InvalidRequest(_))
    ));
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
        [
            Event::Put {
                kv,
                prev: Some(prev),
            },
        ] => {
            assert_eq!((kv.version, kv.create_revision), (2, 1));
            assert_eq!(prev.value, b("1"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let b4 = next(&mut w).await.unwrap();
    assert_eq!(
        b4.events,
        vec![Event::Delete {
            key: "/w/a".into(),
            mod_revision: 4
        }]
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
    // `w` skipped revision 7 (outside its prefix) and sees 8 next.
    s.put("/w/c", b("1"), Precondition::None).await.unwrap(); // 8
    assert_eq!(next(&mut w).await.unwrap().revision, 8);
}

/// List at R, watch from R + 1 while writers run: applying the watched events to the list
/// must give exactly the final state, with every revision seen once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_loses_nothing_under_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Store> = Arc::new(open(&dir));
    const WRITERS: usize = 4;
    const WRITES: usize = 40;
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..WRITES {
                let key = format!("/c/{}", (w * 7 + i) % 10);
                if i % 5 == 4 {
                    s.delete(&key, Precondition::None).await.unwrap();
                } else {
                    let txn = Txn::new()
                        .then(Op::put(key, format!("{w}-{i}")))
                        .then(Op::put(format!("/c/w{w}"), format!("{i}")));
                    s.txn(txn).await.unwrap();
                }
            }
        }));
    }
    // Several list-then-watch clients starting at different moments.
    let mut clients = Vec::new();
    for c in 0..3u64 {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            // Start at different points of the write stream.
            while s.current_revision().await.unwrap() < c * 20 {
                tokio::task::yield_now().await;
            }
            let list = s.range("/c/").await.unwrap();
            let mut state: BTreeMap<String, KeyValue> = list
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect();
            let w = s.watch("/c/", list.revision + 1).await.unwrap();
            (list.revision, state_after(&mut state, w).await, state)
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // A sentinel write marks the end for the clients.
    let end = s
        .put("/c/~end", b("end"), Precondition::None)
        .await
        .unwrap()
        .revision;
    let final_state = s.range("/c/").await.unwrap();
    assert_eq!(final_state.revision, end);
    for c in clients {
        let (start, revisions, state) = c.await.unwrap();
        // Every revision after the list, exactly once, in order (all writes are under /c/,
        // deletes of absent keys create no revision).
        let expected: Vec<u64> = (start + 1..=end).collect();
        assert_eq!(revisions, expected);
        assert_eq!(state.into_values().collect::<Vec<_>>(), final_state.kvs);
    }
}

/// Applies watch batches to `state` until the `/c/~end` sentinel; returns the revisions.
async fn state_after(state: &mut BTreeMap<String, KeyValue>, mut w: WatchStream) -> Vec<u64> {
    let mut revisions = Vec::new();
    loop {
        let batch = next(&mut w).await.unwrap();
        revisions.push(batch.revision);
        let mut done = false;
        for e in batch.events {
            assert_eq!(e.revision(), batch.revision);
            match e {
                Event::Put { kv, .. } => {
                    done |= kv.key == "/c/~end";
                    state.insert(kv.key.clone(), kv);
                }
                Event::Delete { key, .. } => {
                    assert!(state.remove(&key).is_some(), "delete of unknown {key}");
                }
            }
        }
        if done {
            return revisions;
        }
    }
}

#[tokio::test]
async fn compaction_gives_typed_error_and_keeps_recent_history() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        history_revisions: 5,
        ..StoreOptions::default()
    };
    let s = RedbStore::open(dir.path(), opts).unwrap();
    for i in 0..20 {
        s.put(
            &format!("/k/{}", i % 3),
            b(&i.to_string()),
            Precondition::None,
        )
        .await
        .unwrap();
    }
    // At least the last 5 revisions stay; old ones are gone.
    match s.watch("/", 1).await {
        Err(StoreError::Compacted {
            requested: 1,
            compact_revision,
        }) => {
            assert!((10..=15).contains(&compact_revision), "{compact_revision}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut w = s.watch("/", 16).await.unwrap();
    for rev in 16..=20 {
        assert_eq!(next(&mut w).await.unwrap().revision, rev);
    }
    // Keys are not affected by compaction.
    assert_eq!(s.range("/k/").await.unwrap().kvs.len(), 3);

    // Explicit compaction.
    assert!(matches!(
        s.compact(21).await,
        Err(StoreError::FutureRevision {
            requested: 21,
            current: 20
        })
    ));
    s.compact(18).await.unwrap();
    assert!(matches!(
        s.compact(17).await,
        Err(StoreError::Compacted {
            requested: 17,
            compact_revision: 18
        })
    ));
    assert!(matches!(
        s.watch("/", 18).await,
        Err(StoreError::Compacted {
            requested: 18,
            compact_revision: 18
        })
    ));
    let mut w = s.watch("/", 19).await.unwrap();
    assert_eq!(next(&mut w).await.unwrap().revision, 19);
    // Compaction survives a reopen.
    drop((w, s));
    let s = RedbStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(matches!(
        s.watch("/", 18).await,
        Err(StoreError::Compacted { .. })
    ));
}

#[tokio::test]
async fn slow_watcher_is_dropped_with_lag_error_and_never_blocks_writers() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        watch_buffer: 4,
        watch_queue: 1,
        ..StoreOptions::default()
    };
    let s = RedbStore::open(dir.path(), opts).unwrap();
    let mut slow = s.watch("/", 0).await.unwrap();
    // Writers finish although nobody reads the watch.
    tokio::time::timeout(DEADLINE, async {
        for i in 0..50 {
            s.put("/k", b(&i.to_string()), Precondition::None)
                .await
                .unwrap();
        }
    })
    .await
    .expect("writers blocked by a slow watcher");
    let mut last = 0;
    loop {
        match tokio::time::timeout(DEADLINE, slow.recv()).await.unwrap() {
            Some(Ok(batch)) => {
                assert!(batch.revision > last);
                last = batch.revision;
            }
            Some(Err(StoreError::WatchLagged { revision })) => {
                assert_eq!(revision, last);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        last < 50,
        "a lagging watcher should not have received everything"
    );
    // The error is the last item.
    assert!(
        tokio::time::timeout(DEADLINE, slow.recv())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn reopen_keeps_data_revision_and_history() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(&dir);
        s.put("/a", b("1"), Precondition::None).await.unwrap();
        s.txn(Txn::new().then(Op::put("/b", "2")).then(Op::put("/c", "3")))
            .await
            .unwrap();
        s.delete("/a", Precondition::None).await.unwrap();
    }
    let s = open(&dir);
    assert_eq!(s.current_revision().await.unwrap(), 3);
    let r = s.range("").await.unwrap();
    assert_eq!(r.revision, 3);
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.mod_revision))
        .collect();
    assert_eq!(keys, vec![("/b", 2), ("/c", 2)]);
    let mut w = s.watch("", 1).await.unwrap();
    for rev in 1..=3 {
        assert_eq!(next(&mut w).await.unwrap().revision, rev);
    }
    assert_eq!(
        s.put("/d", b("4"), Precondition::None)
            .await
            .unwrap()
            .revision,
        4
    );
    assert_eq!(next(&mut w).await.unwrap().revision, 4);
}

#[tokio::test]
async fn second_open_is_refused_and_dropping_closes_watches() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    match RedbStore::open(dir.path(), StoreOptions::default()) {
        Err(e @ StoreError::AlreadyOpen { .. }) => {
            assert!(e.to_string().contains("already open"), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut w = s.watch("", 0).await.unwrap();
    drop(s);
    assert!(matches!(next(&mut w).await, Err(StoreError::Closed)));
    // The lock is released with the last handle.
    let s = open(&dir);
    assert_eq!(s.current_revision().await.unwrap(), 0);
}

#[tokio::test]
async fn dropping_a_replaying_watch_releases_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        watch_queue: 1,
        ..StoreOptions::default()
    };
    let s = RedbStore::open(dir.path(), opts).unwrap();
    for i in 0..5 {
        s.put("/a", b(&i.to_string()), Precondition::None)
            .await
            .unwrap();
    }
    // The replay task blocks on the full queue; dropping the stream must end it.
    let w = s.watch("", 1).await.unwrap();
    drop(w);
    drop(s);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match RedbStore::open(dir.path(), StoreOptions::default()) {
            Ok(s) => {
                assert_eq!(s.current_revision().await.unwrap(), 5);
                break;
            }
            Err(StoreError::AlreadyOpen { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
