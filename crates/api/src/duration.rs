//! Gateway API durations (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`, e.g. `10s`, `1m30s`, `500ms`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"10s\", \"1m30s\", \"500ms\")")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a Gateway API duration into a [`Duration`].
///
/// The grammar is `^([0-9]{1,5}(h|m|s|ms)){1,4}$`: one to four parts, each one to five
/// digits and a unit. The same unit may not appear twice (Gateway API's GEP-2257 asks for
/// that too, and Go's parser would add them up, which nobody means).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut total = Duration::ZERO;
    let mut parts = 0;
    let mut seen = [false; 4];
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &input[start..i];
        if digits.is_empty() {
            return Err(err("each part must start with digits"));
        }
        if digits.len() > 5 {
            return Err(err("at most 5 digits per part"));
        }
        let n: u64 = digits.parse().map_err(|_| err("bad number"))?;
        let rest = &input[i..];
        let (unit, len, slot) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2, 3)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1, 0)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1, 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1, 2)
        } else {
            return Err(err("each number needs a unit: h, m, s or ms"));
        };
        if seen[slot] {
            return Err(err("a unit appears twice"));
        }
        seen[slot] = true;
        i += len;
        parts += 1;
        if parts > 4 {
            return Err(err("at most 4 parts"));
        }
        total += unit * u32::try_from(n).map_err(|_| err("bad number"))?;
    }
    Ok(total)
}

/// A duration as written in a resource (`timeouts.request: 10s`).
///
/// It keeps the text the user wrote (for round trips and messages) and the parsed value.
/// Deserialization accepts any string so that validation can report a bad duration with its
/// field path together with every other problem; resources returned by
/// [`crate::parse_documents`] only hold valid durations. Build one in code with
/// [`GatewayDuration::from_str`] or [`GatewayDuration::from_std`].
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayDuration {
    text: String,
    parsed: Result<Duration, DurationError>,
}

impl GatewayDuration {
    /// Wraps a std duration (rendered in milliseconds when not a whole number of seconds).
    pub fn from_std(d: Duration) -> Self {
        let text = if d.subsec_millis() == 0 && d.as_secs() > 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        };
        Self {
            text,
            parsed: Ok(d),
        }
    }

    /// The parsed value; `Duration::ZERO` for an invalid text (never the case after
    /// [`crate::parse_documents`] succeeded).
    pub fn as_std(&self) -> Duration {
        self.parsed.clone().unwrap_or_default()
    }

    /// The parse outcome.
    pub fn parsed(&self) -> Result<Duration, DurationError> {
        self.parsed.clone()
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub(crate) fn from_text(text: String) -> Self {
        let parsed = parse_duration(&text);
        Self { text, parsed }
    }
}

impl FromStr for GatewayDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = parse_duration(s)?;
        Ok(Self {
            text: s.to_owned(),
            parsed: Ok(d),
        })
    }
}

impl fmt::Debug for GatewayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayDuration({:?})", self.text)
    }
}

impl fmt::Display for GatewayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GatewayDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GatewayDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from_text)
    }
}
