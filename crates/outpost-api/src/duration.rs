//! The one parser and the one formatter of durations in outpost: `--ttl 24h`, `--offline-after
//! 90s`, `for: 5m` in an AlertPolicy, `maxAge: 7d`, and the coarse `5m` / `3d` of tables and
//! messages.
//!
//! Grammar: `0`, a plain number of seconds (`90`), or one or more `<digits><unit>` parts with
//! units `s`, `m`, `h`, `d` (`90s`, `5m`, `24h`, `7d`, `1h30m`). Every step is overflow-checked
//! and the total is capped at [`MAX_DURATION_SECS`] (100 years), so any `now + duration` in
//! milliseconds fits an `i64`.

use std::time::Duration;

/// The longest duration outpost accepts anywhere: 100 years of 365 days.
pub const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

/// Parse a duration (see the module doc). The error says what was given and what is expected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = |why: String| format!("{s:?} is not a duration like 90s, 5m, 24h or 7d: {why}");
    if s.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad(format!("expected a number before {rest:?}")));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad(format!("{} is too large", &rest[..digits])))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let mul = match unit {
            // A plain number is seconds, but only on its own ("90", not "1h30").
            "" if total == 0 && digits == s.len() => 1,
            "" => return Err(bad(format!("the number {n} at the end needs a unit"))),
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            other => return Err(bad(format!("unknown unit {other:?}; use s, m, h or d"))),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(mul)
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= MAX_DURATION_SECS)
            .ok_or_else(|| bad("longer than 100 years".into()))?;
    }
    Ok(Duration::from_secs(total))
}

/// [`parse_duration`] in whole seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    parse_duration(s).map(|d| d.as_secs())
}

/// `90s`, `5m`, `2h`, `3d`: coarse, for tables and messages. Negative values count as 0.
/// The instant `secs` seconds before `now` (Unix ms), for `since`-style parameters that come
/// from outside: saturates instead of overflowing, however large `secs` is.
pub fn ms_before(now: i64, secs: u64) -> i64 {
    let ms = i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000);
    now.saturating_sub(ms)
}

pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A Unix-ms instant as RFC 3339 UTC to the second (`2026-11-26T18:30:00Z`), for messages.
pub fn utc_time(ms: i64) -> String {
    jiff::Timestamp::from_second(ms.div_euclid(1000))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{ms} ms after the epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_read_as_rfc3339() {
        assert_eq!(utc_time(1_795_717_800_999), "2026-11-26T18:30:00Z");
    }

    #[test]
    fn parses() {
        for (text, secs) in [
            ("0", 0),
            ("90", 90),
            (" 90s ", 90),
            ("5m", 300),
            ("24h", 86_400),
            ("7d", 604_800),
            ("1h30m", 5_400),
            ("0d", 0),
            ("36500d", MAX_DURATION_SECS),
        ] {
            assert_eq!(parse_duration_secs(text), Ok(secs), "{text}");
        }
    }

    #[test]
    fn rejects_with_the_reason() {
        for (text, why) in [
            ("", "it is empty"),
            ("m", "expected a number before \"m\""),
            ("5y", "unknown unit \"y\""),
            ("5 m", "unknown unit \" m\""),
            ("1h30", "needs a unit"),
            ("-5m", "expected a number"),
            ("36501d", "longer than 100 years"),
            // the old CLI parser multiplied these unchecked
            ("213503982334601d", "longer than 100 years"),
            ("99999999999999999999s", "is too large"),
            ("18446744073709551615h", "longer than 100 years"),
        ] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains(why) && e.contains("is not a duration"), "{text}: {e}");
        }
    }

    #[test]
    fn formats_coarsely() {
        for (ms, text) in [
            (-5, "0s"),
            (0, "0s"),
            (119_999, "119s"),
            (120_000, "2m"),
            (7_199_000, "119m"),
            (7_200_000, "2h"),
            (172_800_000, "2d"),
            (i64::MAX, "106751991167d"),
        ] {
            assert_eq!(human_duration(ms), text, "{ms}");
        }
    }

    #[test]
    fn ms_before_saturates() {
        assert_eq!(ms_before(10_000, 3), 7_000);
        assert_eq!(ms_before(10_000, u64::MAX), 10_000 - i64::MAX);
        assert_eq!(ms_before(0, 17_730_071_656_886_478), -i64::MAX);
    }
}
