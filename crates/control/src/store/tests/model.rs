//! Property test: random sequences of put/delete/txn/get/range run against the redb store
//! and an in-memory model (a `BTreeMap` and a revision counter) must give identical
//! answers, ranges, revisions and watch event sequences (live and replayed).

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::super::*;
use super::DEADLINE;

const KEYS: [&str; 5] = ["/a/1", "/a/2", "/a/10", "/ab", "/b/1"];
const PREFIXES: [&str; 5] = ["", "/a/", "/a", "/b/", "/c"];
const SENTINEL: &str = "/a/~end";

#[derive(Clone, Copy, Debug)]
enum Pre {
    None,
    /// The key's current mod_revision (succeeds).
    Current,
    /// Must not exist.
    Absent,
    /// Some revision, probably wrong.
    Stale(u64),
}

#[derive(Clone, Debug)]
enum Cmd {
    Put {
        key: usize,
        val: u8,
        pre: Pre,
    },
    Delete {
        key: usize,
        pre: Pre,
    },
    Txn {
        compares: Vec<(usize, Pre)>,
        ops: Vec<(usize, Option<u8>)>,
    },
    Get {
        key: usize,
    },
    Range {
        prefix: usize,
    },
}

fn pre() -> impl Strategy<Value = Pre> {
    prop_oneof![
        3 => Just(Pre::None),
        3 => Just(Pre::Current),
        1 => Just(Pre::Absent),
        1 => (1u64..30).prop_map(Pre::Stale),
    ]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let key = 0..KEYS.len();
    prop_oneof![
        4 => (key.clone(), any::<u8>(), pre()).prop_map(|(key, val, pre)| Cmd::Put { key, val, pre }),
        2 => (key.clone(), pre()).prop_map(|(key, pre)| Cmd::Delete { key, pre }),
        3 => (
            prop::collection::vec((key.clone(), pre()), 0..3),
            prop::collection::vec((key.clone(), prop::option::weighted(0.7, any::<u8>())), 0..4),
        )
            .prop_map(|(compares, ops)| Cmd::Txn { compares, ops }),
        1 => key.prop_map(|key| Cmd::Get { key }),
        1 => (0..PREFIXES.len()).prop_map(|prefix| Cmd::Range { prefix }),
    ]
}

/// What a call returned, in a comparable form.
#[derive(Debug, PartialEq)]
enum Outcome {
    Put(PutResponse),
    Delete(DeleteResponse),
    Txn(TxnResponse),
    Get(GetResponse),
    Range(RangeResponse),
    Conflict {
        index: usize,
        key: String,
        expected: u64,
        current: u64,
    },
}

fn outcome<T>(r: Result<T, StoreError>, f: impl FnOnce(T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => f(v),
        Err(StoreError::Conflict {
            index,
            key,
            expected,
            current,
        }) => Outcome::Conflict {
            index,
            key,
            expected,
            current,
        },
        Err(e) => panic!("unexpected store error: {e}"),
    }
}

#[derive(Default)]
struct Model {
    kvs: BTreeMap<String, KeyValue>,
    revision: u64,
    log: Vec<WatchBatch>,
}

impl Model {
    fn mod_revision(&self, key: &str) -> u64 {
        self.kvs.get(key).map_or(0, |kv| kv.mod_revision)
    }

    fn resolve(&self, key: &str, pre: Pre) -> Option<u64> {
        match pre {
            Pre::None => None,
            Pre::Current => Some(self.mod_revision(key)),
            Pre::Absent => Some(0),
            Pre::Stale(n) => Some(n),
        }
    }

    fn txn(&mut self, txn: &Txn) -> Result<TxnResponse, Box<Outcome>> {
        for (index, c) in txn.compares.iter().enumerate() {
            let current = self.mod_revision(&c.key);
            if current != c.mod_revision {
                return Err(Box::new(Outcome::Conflict {
                    index,
                    key: c.key.clone(),
                    expected: c.mod_revision,
                    current,
                }));
            }
        }
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut prev = Vec::new();
        for op in &txn.ops {
            let old = self.kvs.get(op.key()).cloned();
            match op {
                Op::Put { key, value } => {
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: old.as_ref().map_or(rev, |o| o.create_revision),
                        mod_revision: rev,
                        version: old.as_ref().map_or(1, |o| o.version + 1),
                    };
                    self.kvs.insert(key.clone(), kv.clone());
                    events.push(Event::Put {
                        kv,
                        prev: old.clone(),
                    });
                }
                Op::Delete { key } => {
                    if self.kvs.remove(key).is_some() {
                        events.push(Event::Delete {
                            key: key.clone(),
                            mod_revision: rev,
                        });
                    }
                }
            }
            prev.push(old);
        }
        if !events.is_empty() {
            self.revision = rev;
            self.log.push(WatchBatch {
                revision: rev,
                events,
            });
        }
        Ok(TxnResponse {
            revision: self.revision,
            prev,
        })
    }

    fn run(&mut self, cmd: &Cmd) -> Outcome {
        match cmd {
            Cmd::Put { key, val, pre } => {
                let key = KEYS[*key];
                let txn = single(key, self.resolve(key, *pre), Op::put(key, vec![*val]));
                match self.txn(&txn) {
                    Ok(r) => Outcome::Put(PutResponse {
                        revision: r.revision,
                        kv: self.kvs[key].clone(),
                        prev: r.prev.into_iter().next().flatten(),
                    }),
                    Err(c) => *c,
                }
            }
            Cmd::Delete { key, pre } => {
                let key = KEYS[*key];
                let txn = single(key, self.resolve(key, *pre), Op::delete(key));
                match self.txn(&txn) {
                    Ok(r) => Outcome::Delete(DeleteResponse {
                        revision: r.revision,
                        prev: r.prev.into_iter().next().flatten(),
                    }),
                    Err(c) => *c,
                }
            }
            Cmd::Txn { .. } => match self.txn(&self.build_txn(cmd)) {
                Ok(r) => Outcome::Txn(r),
                Err(c) => *c,
            },
            Cmd::Get { key } => Outcome::Get(GetResponse {
                revision: self.revision,
                kv: self.kvs.get(KEYS[*key]).cloned(),
            }),
            Cmd::Range { prefix } => Outcome::Range(self.range(PREFIXES[*prefix])),
        }
    }

    fn range(&self, prefix: &str) -> RangeResponse {
        RangeResponse {
            revision: self.revision,
            kvs: self
                .kvs
                .values()
                .filter(|kv| kv.key.starts_with(prefix))
                .cloned()
                .collect(),
        }
    }

    /// Resolves a generated transaction against the current state (ops on distinct keys).
    fn build_txn(&self, cmd: &Cmd) -> Txn {
        let Cmd::Txn { compares, ops } = cmd else {
            return Txn::new();
        };
        let mut txn = Txn::new();
        for (key, pre) in compares {
            if let Some(rev) = self.resolve(KEYS[*key], *pre) {
                txn = txn.when(Compare::mod_revision(KEYS[*key], rev));
            }
        }
        let mut seen = Vec::new();
        for (key, val) in ops {
            if seen.contains(key) {
                continue;
            }
            seen.push(*key);
            txn = txn.then(match val {
                Some(v) => Op::put(KEYS[*key], vec![*v]),
                None => Op::delete(KEYS[*key]),
            });
        }
        txn
    }
}

fn single(key: &str, pre: Option<u64>, op: Op) -> Txn {
    let txn = Txn::new().then(op);
    match pre {
        Some(rev) => txn.when(Compare::mod_revision(key, rev)),
        None => txn,
    }
}

async fn run_on_store(s: &dyn Store, model: &Model, cmd: &Cmd) -> Outcome {
    match cmd {
        Cmd::Put { key, val, pre } => {
            let key = KEYS[*key];
            let pre = model
                .resolve(key, *pre)
                .map_or(Precondition::None, Precondition::ModRevision);
            outcome(s.put(key, Bytes::from(vec![*val]), pre).await, Outcome::Put)
        }
        Cmd::Delete { key, pre } => {
            let key = KEYS[*key];
            let pre = model
                .resolve(key, *pre)
                .map_or(Precondition::None, Precondition::ModRevision);
            outcome(s.delete(key, pre).await, Outcome::Delete)
        }
        Cmd::Txn { .. } => outcome(s.txn(model.build_txn(cmd)).await, Outcome::Txn),
        Cmd::Get { key } => outcome(s.get(KEYS[*key]).await, Outcome::Get),
        Cmd::Range { prefix } => outcome(s.range(PREFIXES[*prefix]).await, Outcome::Range),
    }
}

/// Collects batches until the sentinel's revision.
async fn collect(w: &mut WatchStream, end: u64) -> Vec<WatchBatch> {
    let mut out = Vec::new();
    loop {
        let batch = tokio::time::timeout(DEADLINE, w.recv())
            .await
            .expect("watch timed out")
            .expect("watch ended")
            .expect("watch error");
        let rev = batch.revision;
        out.push(batch);
        if rev >= end {
            return out;
        }
    }
}

fn filtered(log: &[WatchBatch], prefix: &str, from: u64) -> Vec<WatchBatch> {
    log.iter()
        .filter(|b| b.revision >= from)
        .filter_map(|b| {
            let events: Vec<Event> = b
                .events
                .iter()
                .filter(|e| e.key().starts_with(prefix))
                .cloned()
                .collect();
            (!events.is_empty()).then(|| WatchBatch {
                revision: b.revision,
                events,
            })
        })
        .collect()
}

async fn run_case(
    cmds: Vec<Cmd>,
    live_prefix: usize,
    replay_prefix: usize,
    replay_from: u64,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(dir.path(), StoreOptions::default()).expect("open");
    let s: &dyn Store = &store;
    let mut model = Model::default();
    let live_prefix = PREFIXES[live_prefix];
    let mut live = s.watch(live_prefix, 0).await.expect("watch");

    for cmd in &cmds {
        let got = run_on_store(s, &model, cmd).await;
        let want = model.run(cmd);
        prop_assert_eq!(got, want, "command {:?}", cmd);
        prop_assert_eq!(s.current_revision().await.expect("rev"), model.revision);
    }
    for prefix in PREFIXES {
        prop_assert_eq!(s.range(prefix).await.expect("range"), model.range(prefix));
    }

    // The sentinel is under every prefix but "/b/" and "/c": close those with a write too.
    let end = Txn::new()
        .then(Op::put(SENTINEL, "end"))
        .then(Op::put("/b/~end", "end"))
        .then(Op::put("/c~end", "end"));
    let got = s.txn(end.clone()).await.expect("sentinel");
    let want = model
        .txn(&end)
        .map_err(|c| TestCaseError::fail(format!("{c:?}")))?;
    prop_assert_eq!(&got, &want);

    let live_got = collect(&mut live, want.revision).await;
    prop_assert_eq!(live_got, filtered(&model.log, live_prefix, 1));

    let replay_prefix = PREFIXES[replay_prefix];
    let from = 1 + replay_from % want.revision;
    let mut replay = s.watch(replay_prefix, from).await.expect("watch");
    let replay_got = collect(&mut replay, want.revision).await;
    prop_assert_eq!(replay_got, filtered(&model.log, replay_prefix, from));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        cmds in prop::collection::vec(cmd(), 1..40),
        live_prefix in 0..PREFIXES.len(),
        replay_prefix in 0..PREFIXES.len(),
        replay_from in any::<u64>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_case(cmds, live_prefix, replay_prefix, replay_from))?;
    }
}
