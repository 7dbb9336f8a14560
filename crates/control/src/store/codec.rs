//! Binary encoding of stored records (key metadata + value) and of the per-revision event
//! log entries of the embedded store. Little-endian, length-prefixed, versioned by a tag.

use bytes::Bytes;

use super::{Event, KeyValue, StoreError};

/// Format tag of a log entry; bump when the layout changes.
const LOG_FORMAT: u8 = 1;
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// Key metadata + value as stored in the key table (the key itself is the table key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub value: Bytes,
}

impl Record {
    pub(crate) fn into_kv(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

pub(crate) fn encode_record(create: u64, modr: u64, version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modr.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, StoreError> {
    let mut r = Reader { buf: bytes };
    let create_revision = r.u64()?;
    let mod_revision = r.u64()?;
    let version = r.u64()?;
    Ok(Record {
        create_revision,
        mod_revision,
        version,
        value: Bytes::copy_from_slice(r.buf),
    })
}

pub(crate) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(LOG_FORMAT);
    put_u32(&mut out, events.len());
    for event in events {
        match event {
            Event::Put { kv, prev } => {
                out.push(TAG_PUT);
                put_kv(&mut out, kv);
                match prev {
                    Some(prev) => {
                        out.push(1);
                        put_kv(&mut out, prev);
                    }
                    None => out.push(0),
                }
            }
            Event::Delete { key, mod_revision } => {
                out.push(TAG_DELETE);
                put_bytes(&mut out, key.as_bytes());
                out.extend_from_slice(&mod_revision.to_le_bytes());
            }
        }
    }
    out
}

pub(crate) fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let mut r = Reader { buf: bytes };
    let format = r.u8()?;
    if format != LOG_FORMAT {
        return Err(StoreError::Corrupt(format!(
            "unknown event log format {format}"
        )));
    }
    let count = r.u32()?;
    let mut events = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        match r.u8()? {
            TAG_PUT => {
                let kv = r.kv()?;
                let prev = match r.u8()? {
                    0 => None,
                    1 => Some(r.kv()?),
                    other => {
                        return Err(StoreError::Corrupt(format!("bad prev flag {other}")));
                    }
                };
                events.push(Event::Put { kv, prev });
            }
            TAG_DELETE => {
                let key = r.string()?;
                let mod_revision = r.u64()?;
                events.push(Event::Delete { key, mod_revision });
            }
            other => return Err(StoreError::Corrupt(format!("bad event tag {other}"))),
        }
    }
    if !r.buf.is_empty() {
        return Err(StoreError::Corrupt(
            "trailing bytes in event log entry".into(),
        ));
    }
    Ok(events)
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Keys and values are far below 4 GiB (redb caps values at 3 GiB).
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(out, kv.key.as_bytes());
    put_bytes(out, &kv.value);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(StoreError::Corrupt("truncated record".into()));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, StoreError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b) as usize)
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| StoreError::Corrupt("key is not UTF-8".into()))
    }

    fn kv(&mut self) -> Result<KeyValue, StoreError> {
        let key = self.string()?;
        let value = Bytes::copy_from_slice(self.bytes()?);
        Ok(KeyValue {
            key,
            value,
            create_revision: self.u64()?,
            mod_revision: self.u64()?,
            version: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn kv(key: &str, value: &str, c: u64, m: u64, v: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            create_revision: c,
            mod_revision: m,
            version: v,
        }
    }

    #[test]
    fn events_round_trip() {
        let events = vec![
            Event::Put {
                kv: kv("/a", "x", 1, 5, 3),
                prev: Some(kv("/a", "w", 1, 4, 2)),
            },
            Event::Put {
                kv: kv("/b", "", 5, 5, 1),
                prev: None,
            },
            Event::Delete {
                key: "/c".into(),
                mod_revision: 5,
            },
        ];
        assert_eq!(decode_events(&encode_events(&events)).unwrap(), events);
    }

    #[test]
    fn record_round_trip_and_truncation() {
        let enc = encode_record(3, 7, 2, b"hello");
        let rec = decode_record(&enc).unwrap();
        assert_eq!(
            (rec.create_revision, rec.mod_revision, rec.version),
            (3, 7, 2)
        );
        assert_eq!(&rec.value[..], b"hello");
        assert!(matches!(
            decode_record(&enc[..10]),
            Err(StoreError::Corrupt(_))
        ));
        let ev = encode_events(&[Event::Delete {
            key: "/k".into(),
            mod_revision: 1,
        }]);
        assert!(matches!(
            decode_events(&ev[..ev.len() - 1]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
