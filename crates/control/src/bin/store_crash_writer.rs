//! Test-only helper for `tests/store_crash.rs`: opens the store in a data directory and
//! runs multi-key transactions in a loop (each writes the same counter value, equal to the
//! transaction's revision, to K keys), printing each acknowledged revision, until it is
//! killed or has done `max_txns`.
//!
//! Usage: `store_crash_writer DATA_DIR KEYS MAX_TXNS`

use std::error::Error;
use std::io::Write;

use biplane_control::store::{Compare, Op, RedbStore, Store, StoreOptions, Txn};

/// The value a transaction writes at `revision`: the revision, then padding whose length
/// varies so transactions touch different numbers of pages.
fn value_for(revision: u64) -> Vec<u8> {
    let pad = usize::try_from(revision.wrapping_mul(37) % 3000).unwrap_or(0);
    let mut v = format!("{revision}:").into_bytes();
    v.resize(v.len() + pad, b'x');
    v
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, keys, max] = args.as_slice() else {
        return Err("usage: store_crash_writer DATA_DIR KEYS MAX_TXNS".into());
    };
    let keys: usize = keys.parse()?;
    let max: u64 = max.parse()?;
    // Small history so automatic compaction runs (and gets interrupted) too.
    let options = StoreOptions {
        history_revisions: 50,
        ..StoreOptions::default()
    };
    let store = RedbStore::open(dir, options)?;
    let mut revision = store.current_revision().await?;
    let mut out = std::io::stdout().lock();
    for _ in 0..max {
        let counter = revision + 1;
        let value = bytes::Bytes::from(value_for(counter));
        // Each key must still be at the previous revision: checks the state as it goes.
        let mut txn = Txn::new();
        for k in 0..keys {
            txn = txn
                .when(Compare::mod_revision(format!("/crash/{k}"), revision))
                .then(Op::put(format!("/crash/{k}"), value.clone()));
        }
        let resp = store.txn(txn).await?;
        if resp.revision != counter {
            return Err(format!("revision {} after txn, expected {counter}", resp.revision).into());
        }
        revision = counter;
        writeln!(out, "{counter}")?;
        out.flush()?;
    }
    Ok(())
}
