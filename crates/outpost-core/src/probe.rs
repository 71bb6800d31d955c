//! Probe results to probe state, with Kubernetes' meaning: a probe's result flips to failing
//! after `failureThreshold` consecutive failures and to passing after `successThreshold`
//! consecutive successes. Startup and readiness start out not passed; liveness starts passed.
//! Liveness and readiness results are ignored until the startup probe has passed.

use outpost_api::ProbeSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Counter {
    pub passing: bool,
    successes: u32,
    failures: u32,
}

/// Per-process probe state.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeState {
    pub startup: Counter,
    pub liveness: Counter,
    pub readiness: Counter,
    /// `<kind> probe failed: <message>` of the latest failure.
    pub last_failure: Option<String>,
}

/// What a probe result means for the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Nothing,
    /// Startup or liveness failed past its threshold: restart the container.
    Restart(String),
    /// Readiness changed.
    Ready(bool),
}

impl ProbeState {
    /// Initial state for a container with these probes defined.
    pub fn new(startup: bool, readiness: bool) -> Self {
        Self {
            startup: Counter {
                passing: !startup,
                ..Default::default()
            },
            liveness: Counter {
                passing: true,
                ..Default::default()
            },
            readiness: Counter {
                passing: !readiness,
                ..Default::default()
            },
            last_failure: None,
        }
    }

    pub fn started(&self) -> bool {
        self.startup.passing
    }

    pub fn ready(&self) -> bool {
        self.startup.passing && self.readiness.passing
    }

    pub fn record(&mut self, kind: ProbeKind, spec: &ProbeSpec, ok: bool, message: &str) -> Verdict {
        if kind != ProbeKind::Startup && !self.started() {
            return Verdict::Nothing;
        }
        if !ok {
            self.last_failure = Some(format!("{} probe failed: {message}", kind.as_str()));
        }
        let was_ready = self.ready();
        let c = match kind {
            ProbeKind::Startup => &mut self.startup,
            ProbeKind::Liveness => &mut self.liveness,
            ProbeKind::Readiness => &mut self.readiness,
        };
        if kind == ProbeKind::Startup && c.passing {
            return Verdict::Nothing; // startup probes stop once passed
        }
        if ok {
            c.failures = 0;
            c.successes += 1;
            if c.successes >= spec.success_threshold {
                c.passing = true;
            }
        } else {
            c.successes = 0;
            c.failures += 1;
            if c.failures >= spec.failure_threshold {
                c.passing = false;
                if matches!(kind, ProbeKind::Startup | ProbeKind::Liveness) {
                    c.failures = 0;
                    return Verdict::Restart(format!(
                        "{} probe failed {} times: {message}",
                        kind.as_str(),
                        spec.failure_threshold
                    ));
                }
            }
        }
        if self.ready() != was_ready {
            Verdict::Ready(self.ready())
        } else {
            Verdict::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::ProbeAction;
    use ProbeKind::*;

    fn spec(failure: u32, success: u32) -> ProbeSpec {
        ProbeSpec {
            action: ProbeAction::TcpSocket {
                host: "127.0.0.1".into(),
                port: 1,
            },
            initial_delay_seconds: 0,
            period_seconds: 1,
            timeout_seconds: 1,
            failure_threshold: failure,
            success_threshold: success,
        }
    }

    fn check(st: &mut ProbeState, steps: &[(ProbeKind, bool, Verdict)]) {
        let s = spec(3, 2);
        for (i, (k, ok, want)) in steps.iter().enumerate() {
            let p = if *k == Readiness { s.clone() } else { spec(3, 1) };
            assert_eq!(&st.record(*k, &p, *ok, "boom"), want, "step {i}");
        }
    }

    #[test]
    fn readiness_needs_success_threshold_and_failure_threshold() {
        let mut st = ProbeState::new(false, true);
        assert!(!st.ready());
        check(
            &mut st,
            &[
                (Readiness, true, Verdict::Nothing),
                (Readiness, true, Verdict::Ready(true)),
                (Readiness, false, Verdict::Nothing),
                (Readiness, false, Verdict::Nothing),
                (Readiness, true, Verdict::Nothing), // a success resets the failure count
                (Readiness, false, Verdict::Nothing),
                (Readiness, false, Verdict::Nothing),
                (Readiness, false, Verdict::Ready(false)),
            ],
        );
        assert_eq!(st.last_failure.as_deref(), Some("readiness probe failed: boom"));
    }

    #[test]
    fn liveness_restarts_after_threshold_and_waits_for_startup() {
        let mut st = ProbeState::new(true, false);
        assert!(!st.ready(), "not ready before startup passes");
        check(
            &mut st,
            &[
                (Liveness, false, Verdict::Nothing), // ignored before startup
                (Liveness, false, Verdict::Nothing),
                (Liveness, false, Verdict::Nothing),
                (Startup, true, Verdict::Ready(true)),
                (Liveness, false, Verdict::Nothing),
                (Liveness, false, Verdict::Nothing),
                (
                    Liveness,
                    false,
                    Verdict::Restart("liveness probe failed 3 times: boom".into()),
                ),
            ],
        );
    }

    #[test]
    fn startup_failure_restarts() {
        let mut st = ProbeState::new(true, false);
        check(
            &mut st,
            &[
                (Startup, false, Verdict::Nothing),
                (Startup, false, Verdict::Nothing),
                (
                    Startup,
                    false,
                    Verdict::Restart("startup probe failed 3 times: boom".into()),
                ),
            ],
        );
    }
}
