//! CronJob schedules: the five-field cron grammar Kubernetes accepts, parsed into sets.
//!
//! `minute hour day-of-month month day-of-week`, each `*`, a number, a range `a-b`, a list
//! `a,b`, a step `*/n` or `a-b/n`; month and weekday names (`jan`, `mon`); `7` is Sunday; `?`
//! is `*`. Macros: `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//! `@hourly`. As in cron, when both day-of-month and day-of-week are restricted a day matches
//! if either does. When the schedule fires is decided by `outpost_core::cron` (pure, with the
//! time zone); this module only checks and parses the text.

use serde::{Deserialize, Serialize};

/// A parsed schedule: bit `i` set when value `i` matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronSchedule {
    pub minutes: u64,
    pub hours: u32,
    /// Bits 1..=31.
    pub days_of_month: u32,
    /// Bits 1..=12.
    pub months: u16,
    /// Bits 0..=6, Sunday is 0.
    pub days_of_week: u8,
    /// Day-of-month field was `*` (or `?`).
    pub dom_any: bool,
    /// Day-of-week field was `*` (or `?`).
    pub dow_any: bool,
}

impl CronSchedule {
    /// Does this (month, day, weekday with Sunday 0) match the day fields?
    pub fn day_matches(&self, month: u32, day: u32, weekday: u32) -> bool {
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << day) != 0;
        let dow = self.days_of_week & (1 << weekday) != 0;
        match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }
    pub fn hour_matches(&self, hour: u32) -> bool {
        self.hours & (1 << hour) != 0
    }
    pub fn minute_matches(&self, minute: u32) -> bool {
        self.minutes & (1 << minute) != 0
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parse a schedule; the error names the field and what is wrong.
pub fn parse_schedule(text: &str) -> Result<CronSchedule, String> {
    let t = text.trim();
    let expanded = match t {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other if other.starts_with('@') => {
            return Err(format!(
                "{other:?} is not a schedule macro; use @yearly, @monthly, @weekly, @daily or @hourly, or five fields"
            ))
        }
        other => other,
    };
    if expanded.starts_with("TZ=") || expanded.starts_with("CRON_TZ=") {
        return Err("a time zone inside the schedule is not allowed (as in Kubernetes); use spec.timeZone".into());
    }
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "{t:?} has {} fields; a schedule has five: minute hour day-of-month month day-of-week (e.g. \"*/5 * * * *\")",
            fields.len()
        ));
    }
    let minutes = field(fields[0], "minute", 0, 59, &[])?;
    let hours = field(fields[1], "hour", 0, 23, &[])?;
    let dom = field(fields[2], "day-of-month", 1, 31, &[])?;
    let months = field(fields[3], "month", 1, 12, &MONTHS)?;
    let mut dow = field(fields[4], "day-of-week", 0, 7, &DAYS)?;
    if dow & (1 << 7) != 0 {
        dow = (dow & !(1 << 7)) | 1;
    }
    let any = |f: &str| f == "*" || f == "?";
    Ok(CronSchedule {
        minutes,
        hours: hours as u32,
        days_of_month: dom as u32,
        months: months as u16,
        days_of_week: dow as u8,
        dom_any: any(fields[2]),
        dow_any: any(fields[4]),
    })
}

fn field(text: &str, name: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // month names start at 1, weekday names at 0
            return Ok(i as u32 + u32::from(min == 1));
        }
        let n: u32 = s
            .parse()
            .map_err(|_| format!("{name} field {text:?}: {s:?} is not a number between {min} and {max}"))?;
        if n < min || n > max {
            return Err(format!("{name} field {text:?}: {n} is outside {min}-{max}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name} field {text:?}: step {s:?} must be a positive number"))?;
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("{name} field {text:?}: range {a}-{b} runs backwards"));
            }
            (a, b)
        } else {
            let a = value(range)?;
            (a, if part.contains('/') { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let s = parse_schedule("*/15 * * * *").unwrap();
        assert_eq!(s.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        let s = parse_schedule("5 3 * * mon-fri").unwrap();
        assert!(s.minute_matches(5) && !s.minute_matches(6) && s.hour_matches(3));
        assert!(s.day_matches(6, 10, 1) && !s.day_matches(6, 10, 0));
        let s = parse_schedule("0 0 1 jan *").unwrap();
        assert!(s.day_matches(1, 1, 3) && !s.day_matches(2, 1, 3));
        let s = parse_schedule("0 0 13 * 5").unwrap(); // the 13th OR any Friday
        assert!(s.day_matches(3, 13, 2) && s.day_matches(3, 14, 5) && !s.day_matches(3, 14, 4));
        assert_eq!(parse_schedule("0 0 * * 7").unwrap().days_of_week, 1);
        assert_eq!(parse_schedule("@hourly").unwrap(), parse_schedule("0 * * * *").unwrap());
        for (bad, why) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "outside 0-59"),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "backwards"),
            ("@often", "not a schedule macro"),
            ("TZ=UTC 0 * * * *", "spec.timeZone"),
            ("x * * * *", "not a number"),
        ] {
            let e = parse_schedule(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
