//! JSON access log: one line per request, written to stdout off the request path.
//!
//! A line is formatted by hand into a `String` (no `serde_json::Value`, strings
//! JSON-escaped) when the response body ends, then handed to a dedicated writer thread
//! through a bounded channel. The request path never blocks on stdout: when the channel is
//! full (stdout is slower than the traffic) the line is dropped and counted in
//! [`dropped_lines`]. The writer flushes whenever its queue runs empty.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri, Version};

/// Lines that fit in the writer's queue; beyond this, lines are dropped.
const QUEUE: usize = 16 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static WRITER: OnceLock<Option<SyncSender<String>>> = OnceLock::new();

/// Access log lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// What is known about a request when its response ends.
#[derive(Debug)]
pub struct LogEntry {
    pub time: SystemTime,
    pub start: Instant,
    pub method: Method,
    /// The downstream request URI (path and query; the authority for HTTP/2).
    pub uri: Uri,
    /// The `Host` header, when the URI has no authority (HTTP/1).
    pub host: Option<HeaderValue>,
    pub version: Version,
    pub status: u16,
    /// Request body bytes, counted as frames stream upstream.
    pub bytes_received: Option<Arc<AtomicU64>>,
    /// Response body bytes, counted as frames stream downstream.
    pub bytes_sent: u64,
    pub upstream: Option<SocketAddr>,
    pub route: Option<Arc<str>>,
    pub listener: Arc<str>,
    pub error: Option<&'static str>,
}

impl LogEntry {
    /// Format and queue the line.
    pub fn emit(&self) {
        let mut line = String::with_capacity(384);
        self.format(&mut line);
        line.push('\n');
        let writer = WRITER.get_or_init(start_writer);
        if let Some(tx) = writer {
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The JSON object (without a trailing newline).
    pub fn format(&self, out: &mut String) {
        out.push_str("{\"time\":\"");
        write_rfc3339(out, self.time);
        out.push_str("\",\"method\":");
        json_str(out, self.method.as_str());
        out.push_str(",\"authority\":");
        match (self.uri.authority(), &self.host) {
            (Some(a), _) => json_str(out, a.as_str()),
            (None, Some(h)) => json_str(out, &String::from_utf8_lossy(h.as_bytes())),
            (None, None) => out.push_str("null"),
        }
        out.push_str(",\"path\":");
        json_str(out, self.uri.path_and_query().map_or("/", |p| p.as_str()));
        out.push_str(",\"protocol\":\"");
        out.push_str(match self.version {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_11 => "HTTP/1.1",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "unknown",
        });
        let received = self
            .bytes_received
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        let _ = write!(
            out,
            "\",\"status\":{},\"bytes_received\":{},\"bytes_sent\":{},\"duration_ms\":{:.3}",
            self.status,
            received,
            self.bytes_sent,
            self.start.elapsed().as_secs_f64() * 1000.0
        );
        out.push_str(",\"upstream\":");
        match self.upstream {
            Some(a) => {
                let _ = write!(out, "\"{a}\"");
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"route\":");
        match &self.route {
            Some(r) => json_str(out, r),
            None => out.push_str("null"),
        }
        out.push_str(",\"listener\":");
        json_str(out, &self.listener);
        out.push_str(",\"error\":");
        match self.error {
            Some(e) => json_str(out, e),
            None => out.push_str("null"),
        }
        out.push('}');
    }
}

fn start_writer() -> Option<SyncSender<String>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("biplane-access-log".into())
        .spawn(move || write_loop(&rx))
        .ok()
        .map(|_| tx)
}

/// Batches whatever is queued, then writes it under the stdout lock, which is released
/// between batches so other writers (tracing, the test harness) are never starved.
fn write_loop(rx: &Receiver<String>) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Ok(line) = rx.recv() {
        batch.extend_from_slice(line.as_bytes());
        while batch.len() < 256 * 1024
            && let Ok(line) = rx.try_recv()
        {
            batch.extend_from_slice(line.as_bytes());
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&batch);
        let _ = out.flush();
        drop(out);
        batch.clear();
    }
}

/// Append `s` as a JSON string literal.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn write_rfc3339(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day) — Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339() {
        let mut s = String::new();
        write_rfc3339(&mut s, UNIX_EPOCH);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2024-02-29T12:34:56.789Z
        write_rfc3339(
            &mut s,
            UNIX_EPOCH + Duration::from_millis(1_709_210_096_789),
        );
        assert_eq!(s, "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn escapes() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn line_is_json() {
        let e = LogEntry {
            time: UNIX_EPOCH,
            start: Instant::now(),
            method: Method::POST,
            uri: "/p?q=%221%22".parse().unwrap(),
            host: Some(HeaderValue::from_static("example.com")),
            version: Version::HTTP_11,
            status: 201,
            bytes_received: Some(Arc::new(AtomicU64::new(12))),
            bytes_sent: 34,
            upstream: Some("127.0.0.1:9".parse().unwrap()),
            route: Some("r0".into()),
            listener: "l".into(),
            error: None,
        };
        let mut s = String::new();
        e.format(&mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["authority"], "example.com");
        assert_eq!(v["path"], "/p?q=%221%22");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 201);
        assert_eq!(v["bytes_received"], 12);
        assert_eq!(v["bytes_sent"], 34);
        assert_eq!(v["upstream"], "127.0.0.1:9");
        assert_eq!(v["route"], "r0");
        assert_eq!(v["listener"], "l");
        assert!(v["error"].is_null());
        assert!(v["duration_ms"].is_number());
    }
}
