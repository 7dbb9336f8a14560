//! Crash test of the embedded store: a child process runs multi-key transactions in a
//! loop and is killed with SIGKILL at a random moment, several times; after each kill the
//! store must reopen with every transaction all-or-nothing (all K keys equal), every
//! acknowledged transaction present, and revisions, versions and history consistent.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use biplane_control::store::{RedbStore, Store, StoreError, StoreOptions};
use rand::Rng;

const KEYS: usize = 8;
const ITERATIONS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn kill_9_mid_transaction_leaves_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut last_committed = 0u64;
    for iteration in 0..ITERATIONS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store_crash_writer"))
            .arg(dir.path())
            .arg(KEYS.to_string())
            .arg("1000000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wanted_acks = rng.random_range(1..=40u64);
        let mut last_acked = None;
        let started = Instant::now();
        for _ in 0..wanted_acks {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("child exited early: {:?}", child.try_wait()))
                .unwrap();
            let rev: u64 = line.trim().parse().unwrap();
            // Each run continues from the state the previous kill left.
            assert!(
                last_acked.is_none_or(|l| rev == l + 1),
                "non-contiguous ack {rev}"
            );
            last_acked = Some(rev);
            assert!(started.elapsed() < DEADLINE, "child too slow");
        }
        if iteration == 0 {
            // Single-process ownership: the running writer holds the lock.
            assert!(matches!(
                RedbStore::open(dir.path(), StoreOptions::default()),
                Err(StoreError::AlreadyOpen { .. })
            ));
        }
        // Kill at a random point inside the write loop (the delay only randomizes the
        // moment; correctness does not depend on it).
        std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "child finished instead of being killed");
        for line in lines {
            let rev: u64 = line.unwrap().trim().parse().unwrap();
            last_acked = Some(rev);
        }
        let last_acked = last_acked.unwrap();

        let committed = rt.block_on(check_store(dir.path()));
        // Durability: every acknowledged txn is there; at most one unacknowledged one too.
        assert!(
            committed == last_acked || committed == last_acked + 1,
            "iteration {iteration}: store at {committed}, last ack {last_acked}"
        );
        assert!(committed > last_committed);
        last_committed = committed;
    }
}

/// Reopens the store and checks its invariants; returns the current revision.
async fn check_store(dir: &std::path::Path) -> u64 {
    let store = RedbStore::open(dir, StoreOptions::default()).unwrap();
    let revision = store.current_revision().await.unwrap();
    let range = store.range("/crash/").await.unwrap();
    assert_eq!(range.revision, revision);
    assert_eq!(range.kvs.len(), KEYS, "a transaction was partially applied");
    let expected = value_for(revision);
    for kv in &range.kvs {
        // All keys hold the value of the same, last, transaction ...
        assert_eq!(&kv.value[..], &expected[..], "key {} differs", kv.key);
        // ... and every transaction since the first touched every key exactly once.
        assert_eq!(kv.mod_revision, revision);
        assert_eq!(kv.create_revision, 1);
        assert_eq!(kv.version, revision);
    }
    // The event log agrees: each retained revision has K puts of that revision's value.
    let from = revision.saturating_sub(20).max(1);
    let mut w = store.watch("/crash/", from).await.unwrap();
    for rev in from..=revision {
        let batch = tokio::time::timeout(DEADLINE, w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(batch.revision, rev);
        assert_eq!(batch.events.len(), KEYS);
        for e in &batch.events {
            match e {
                biplane_control::store::Event::Put { kv, .. } => {
                    assert_eq!(&kv.value[..], &value_for(rev)[..]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    revision
}

/// Same as the writer's `value_for` (kept in sync by this test failing otherwise).
fn value_for(revision: u64) -> Vec<u8> {
    let pad = usize::try_from(revision.wrapping_mul(37) % 3000).unwrap_or(0);
    let mut v = format!("{revision}:").into_bytes();
    v.resize(v.len() + pad, b'x');
    v
}
