//! Printing helpers shared by the client commands: kubectl's aligned tables, its
//! human-readable ages (`5s`, `3m20s`, `2d4h`), RFC 3339 timestamps, and YAML/JSON output.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::Failure;

/// A table printed like kubectl's: upper-case headers, columns padded to their widest cell
/// and separated by three spaces, no trailing spaces.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 timestamp (`2026-11-25T10:00:00Z`, `...00.123+01:00`) to Unix
/// seconds. Returns `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.as_bytes();
            if o.len() != 6 || o[3] != b':' {
                return None;
            }
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// kubectl's `HumanDuration`: `45s`, `2m30s`, `17m`, `5h10m`, `30h`, `3d4h`, `120d`, `2y30d`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".to_owned();
    }
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    let two = |a: i64, ua: &str, b: i64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        two(m, "m", secs % 60, "s")
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        two(h, "h", m % 60, "m")
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        two(d, "d", h % 24, "h")
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if h < 24 * 365 * 8 {
        two(d / 365, "y", d % 365, "d")
    } else {
        format!("{}y", d / 365)
    }
}

/// The age of an RFC 3339 timestamp (`<unknown>` when absent or unreadable).
pub fn age(timestamp: Option<&str>, now: i64) -> String {
    match timestamp.and_then(parse_rfc3339) {
        Some(t) => human_duration(now - t),
        None => "<unknown>".to_owned(),
    }
}

/// One YAML document (no leading `---`), ending with a newline.
pub fn to_yaml(value: &Value) -> Result<String, Failure> {
    let mut s = serde_saphyr::to_string(value)
        .map_err(|e| Failure::Other(format!("cannot print YAML: {e}")))?;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}

/// Documents as a YAML stream: each one after a `---` line.
pub fn to_yaml_stream<'a>(values: impl IntoIterator<Item = &'a Value>) -> Result<String, Failure> {
    let mut out = String::new();
    for v in values {
        out.push_str("---\n");
        out.push_str(&to_yaml(v)?);
    }
    Ok(out)
}

/// Pretty JSON ending with a newline.
pub fn to_json(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    s.push('\n');
    s
}

/// The string at a JSON pointer (`/metadata/name`), if it is one.
pub fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The first `n` characters of a version, as `git` shortens hashes.
pub fn short(version: &str, n: usize) -> &str {
    match version.char_indices().nth(n) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_like_kubectl() {
        let mut t = Table::new(&["NAME", "HOSTNAMES", "AGE"]);
        t.row(vec![
            "web".into(),
            "a.example,b.example".into(),
            "5s".into(),
        ]);
        t.row(vec!["api-long-name".into(), "".into(), "10m".into()]);
        assert_eq!(
            t.render(),
            "NAME            HOSTNAMES             AGE\n\
             web             a.example,b.example   5s\n\
             api-long-name                         10m\n"
        );
        assert_eq!(
            Table::new(&["NODE", "GATEWAY"]).render(),
            "NODE   GATEWAY\n"
        );
    }

    #[test]
    fn timestamps_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2026-11-25T10:00:00.123456789Z"),
            Some(1_795_600_800)
        );
        assert_eq!(
            parse_rfc3339("2026-11-25T11:00:00+01:00"),
            Some(1_795_600_800)
        );
        assert_eq!(
            parse_rfc3339("2026-11-25T09:30:00-00:30"),
            Some(1_795_600_800)
        );
        for bad in [
            "",
            "2026-11-25",
            "2026-13-01T00:00:00Z",
            "2026-11-25T10:00:00",
            "2026-11-25T10:00:00.Z",
            "x026-11-25T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_read_like_kubectl() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (150, "2m30s"),
            (599, "9m59s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (30 * 3600, "30h"),
            (2 * 86_400 + 3600, "2d1h"),
            (3 * 86_400, "3d"),
            (100 * 86_400, "100d"),
            (800 * 86_400, "2y70d"),
            (9 * 365 * 86_400, "9y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
        assert_eq!(age(Some("1970-01-01T00:00:00Z"), 150), "2m30s");
        assert_eq!(age(None, 150), "<unknown>");
        assert_eq!(age(Some("yesterday"), 150), "<unknown>");
    }

    #[test]
    fn yaml_round_trips_and_quotes_ambiguous_strings() {
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "tls", "labels": {"on": "yes", "zero": "010", "n": "null"}},
            "spec": {"port": 80, "weights": [1, 2], "enabled": true, "empty": {}, "list": []},
        });
        let text = to_yaml(&doc).unwrap();
        let back: Value = serde_saphyr::from_str_with_options(&text, {
            let mut o = serde_saphyr::Options::default();
            o.strict_booleans = true;
            o
        })
        .unwrap();
        assert_eq!(back, doc, "{text}");
        let stream = to_yaml_stream([&doc, &doc]).unwrap();
        assert_eq!(stream.matches("---\n").count(), 2);
        assert!(stream.starts_with("---\napiVersion: v1\n"), "{stream}");
    }

    #[test]
    fn helpers() {
        assert_eq!(short("0123456789abcdef", 8), "01234567");
        assert_eq!(short("42", 8), "42");
        let v = json!({"metadata": {"name": "x"}});
        assert_eq!(str_at(&v, "/metadata/name"), Some("x"));
        assert_eq!(str_at(&v, "/metadata/uid"), None);
        assert!(to_json(&v).ends_with("}\n"));
    }
}
