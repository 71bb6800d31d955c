//! Leases with fencing for the hub's once-only work (the rollout controller, alert rules,
//! webhook delivery, GitOps polling, retention, ...): which replica of several on one database
//! may act for a controller, and for how long.
//!
//! ```text
//!   row (per controller name): holder, token, expires_at
//!
//!   free:   no row, or expires_at <= now         -> take it: holder = me, token + 1
//!   mine:   holder == me                         -> renew:   same token, new expires_at
//!   busy:   holder != me and expires_at > now    -> wait
//! ```
//!
//! The token is a counter that grows at every change of holder, never otherwise. Every write a
//! holder makes carries its [`Fence`] (name, holder, token) and the store refuses it, in the
//! same transaction, when the row's holder and token are no longer those: a replica that
//! stalled past its lease (a long GC-free pause still happens: a frozen VM, a stopped process)
//! and comes back cannot act after another took over.
//!
//! A holder stops acting on its own *before* the lease ends ([`acting_until`]): a renewal that
//! began at `t` is good until `t + period - margin`, measured from when the request was sent, so
//! a slow answer never stretches it. The store's conditional update (compare holder, token and
//! expiry) is what decides a race; this module only computes the rows to write.
//!
//! Pure: `now` is an argument; the hub's lease keeper (`outpost-hub` controllers) loads the row,
//! calls [`claim`] and writes the result with a conditional UPDATE.

use outpost_api::UnixMs;

/// One lease row as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// Grows by one at every change of holder.
    pub token: u64,
    pub expires_at: UnixMs,
}

/// What a holder's writes carry; the store refuses a write whose fence is not current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The lease (controller) name.
    pub lease: String,
    pub holder: String,
    pub token: u64,
}

/// Lease period and renew interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts after each renewal (default 15 s).
    pub period_ms: i64,
    /// How often the holder renews (default 5 s); less than half the period.
    pub renew_every_ms: i64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            period_ms: 15_000,
            renew_every_ms: 5_000,
        }
    }
}

impl Timing {
    /// A timing from configured values: the period at least 200 ms, the renew interval at most a
    /// third of the period (so two renewals may fail before the lease runs out).
    pub fn new(period_ms: i64, renew_every_ms: i64) -> Timing {
        let period_ms = period_ms.max(200);
        Timing {
            period_ms,
            renew_every_ms: renew_every_ms.clamp(50, period_ms / 3),
        }
    }

    /// The holder stops acting this long before its lease ends: a fifth of the period.
    pub fn margin_ms(&self) -> i64 {
        self.period_ms / 5
    }
}

/// What to do with a lease row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Write this row (a conditional UPDATE on the row read, or an INSERT when there was none).
    Take(Lease),
    /// Someone else holds it until then.
    Busy { holder: String, until: UnixMs },
}

/// The row to write for `me` at `now`, given the row read.
pub fn claim(current: Option<&Lease>, me: &str, now: UnixMs, t: &Timing) -> Claim {
    let expires_at = now + t.period_ms;
    match current {
        None => Claim::Take(Lease {
            holder: me.to_string(),
            token: 1,
            expires_at,
        }),
        // Renewing (or taking back a lease nobody took meanwhile): no change of holder.
        Some(l) if l.holder == me => Claim::Take(Lease {
            holder: me.to_string(),
            token: l.token,
            expires_at,
        }),
        Some(l) if l.expires_at <= now => Claim::Take(Lease {
            holder: me.to_string(),
            token: l.token + 1,
            expires_at,
        }),
        Some(l) => Claim::Busy {
            holder: l.holder.clone(),
            until: l.expires_at,
        },
    }
}

/// Until when a holder whose renewal was *sent* at `sent_at` may act.
pub fn acting_until(sent_at: UnixMs, t: &Timing) -> UnixMs {
    sent_at + t.period_ms - t.margin_ms()
}

/// May the holder act at `now`, given until when its last good renewal lets it.
pub fn may_act(until: Option<UnixMs>, now: UnixMs) -> bool {
    until.is_some_and(|u| now < u)
}

/// Is the fence a write carries still current for the row read (inside the write's
/// transaction)?
pub fn fence_holds(row: Option<(&str, u64)>, f: &Fence) -> bool {
    row.is_some_and(|(holder, token)| holder == f.holder && token == f.token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(holder: &str, token: u64, expires_at: UnixMs) -> Lease {
        Lease {
            holder: holder.into(),
            token,
            expires_at,
        }
    }

    fn check(current: Option<Lease>, me: &str, now: UnixMs, want: Claim) {
        let t = Timing::new(3000, 1000);
        assert_eq!(claim(current.as_ref(), me, now, &t), want, "{current:?} {me} at {now}");
    }

    #[test]
    fn claims() {
        let take = |h: &str, tok, exp| Claim::Take(l(h, tok, exp));
        // free: nobody ever held it
        check(None, "a", 100, take("a", 1, 3100));
        // mine: renew, same token
        check(Some(l("a", 4, 2000)), "a", 1000, take("a", 4, 4000));
        // mine, lapsed, nobody took it: same token (no change of holder)
        check(Some(l("a", 4, 900)), "a", 1000, take("a", 4, 4000));
        // another's, still valid: busy
        check(
            Some(l("b", 4, 2000)),
            "a",
            1000,
            Claim::Busy {
                holder: "b".into(),
                until: 2000,
            },
        );
        // another's, expired exactly now: free, the token grows
        check(Some(l("b", 4, 1000)), "a", 1000, take("a", 5, 4000));
        // another's, long expired
        check(Some(l("b", 9, 10)), "a", 1000, take("a", 10, 4000));
    }

    #[test]
    fn a_holder_stops_before_its_lease_ends() {
        let t = Timing::new(15_000, 5_000);
        assert_eq!(t, Timing::default());
        let until = acting_until(1000, &t);
        assert_eq!(until, 1000 + 15_000 - 3000);
        // the lease row says 16_000; the holder stops acting at 13_000
        for (now, acts) in [(1000, true), (12_999, true), (13_000, false), (16_000, false)] {
            assert_eq!(may_act(Some(until), now), acts, "at {now}");
        }
        assert!(!may_act(None, 0));
    }

    #[test]
    fn timing_is_bounded() {
        assert_eq!(
            Timing::new(3000, 5000),
            Timing {
                period_ms: 3000,
                renew_every_ms: 1000
            }
        );
        assert_eq!(
            Timing::new(10, 1),
            Timing {
                period_ms: 200,
                renew_every_ms: 50
            }
        );
    }

    #[test]
    fn fences() {
        let f = Fence {
            lease: "rollouts".into(),
            holder: "a".into(),
            token: 3,
        };
        for (row, ok) in [
            (Some(("a", 3)), true),
            (Some(("a", 4)), false),
            (Some(("b", 3)), false),
            (None, false),
        ] {
            assert_eq!(fence_holds(row, &f), ok, "{row:?}");
        }
    }
}
