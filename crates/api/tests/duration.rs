//! Gateway API duration parsing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::str::FromStr;
use std::time::Duration;

use biplane_api::{GatewayDuration, parse_duration};

#[test]
fn valid_durations() {
    for (text, want) in [
        ("0s", Duration::ZERO),
        ("10s", Duration::from_secs(10)),
        ("500ms", Duration::from_millis(500)),
        ("1m30s", Duration::from_secs(90)),
        ("1h", Duration::from_secs(3600)),
        ("1h2m3s4ms", Duration::from_millis(3_723_004)),
        ("99999ms", Duration::from_millis(99_999)),
        ("2s1h", Duration::from_secs(3602)),
    ] {
        assert_eq!(parse_duration(text).unwrap(), want, "{text}");
    }
}

#[test]
fn invalid_durations() {
    for text in [
        "",
        "10",
        "s",
        "1.5s",
        "-1s",
        "100000s",
        "1d",
        "10 s",
        "1h1h",
        "1s2ms3m4h5s",
        "1S",
        " 1s",
    ] {
        assert!(parse_duration(text).is_err(), "{text:?} should be rejected");
    }
    let e = parse_duration("1x").unwrap_err().to_string();
    assert!(e.contains("\"1x\""), "{e}");
}

#[test]
fn gateway_duration_type() {
    let d = GatewayDuration::from_str("1m30s").unwrap();
    assert_eq!(d.as_std(), Duration::from_secs(90));
    assert_eq!(d.as_str(), "1m30s");
    assert_eq!(d.to_string(), "1m30s");
    assert!(GatewayDuration::from_str("nope").is_err());
    assert_eq!(
        GatewayDuration::from_std(Duration::from_secs(5)).as_str(),
        "5s"
    );
    assert_eq!(
        GatewayDuration::from_std(Duration::from_millis(1500)).as_str(),
        "1500ms"
    );
    assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
}
