//! Jobs and CronJobs on the node: what has run, persisted so a restart neither repeats a
//! finished Job nor runs one schedule time twice.
//!
//! On-disk format: `<data-dir>/workloads/<workload>/job.json`, a [`JobState`] written
//! write-temp, fsync, rename (`identity::write_atomic`). The reconciler records a CronJob's
//! `last_scheduled` *before* it starts (or skips) that run, so a `kill -9` between the two at
//! worst loses one run and never doubles it; a Job's `done` is written when its pod ends for
//! good. A missing or unreadable file is a fresh state (a Job then runs, a CronJob waits for
//! its next schedule time from now).

use std::path::Path;

use outpost_api::{Phase, UnixMs};
use serde::{Deserialize, Serialize};

/// One finished CronJob run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub scheduled: UnixMs,
    pub finished: UnixMs,
    pub succeeded: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// A Job's outcome for the spec hash it ran.
    #[serde(default)]
    pub done: Option<(String, Phase)>,
    /// A CronJob's last handled schedule time.
    #[serde(default)]
    pub last_scheduled: Option<UnixMs>,
    /// A CronJob run is in progress (started for `last_scheduled`).
    #[serde(default)]
    pub active: bool,
    /// Finished CronJob runs, newest last, pruned to the history limits.
    #[serde(default)]
    pub history: Vec<Run>,
}

impl JobState {
    pub fn load(dir: &Path) -> Self {
        std::fs::read(dir.join("job.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::identity::write_atomic(&dir.join("job.json"), &bytes, 0o644)
            .map_err(|e| format!("cannot write {}: {e}", dir.join("job.json").display()))
    }

    /// Has the Job finished for this spec hash?
    pub fn finished(&self, hash: &str) -> bool {
        self.done.as_ref().is_some_and(|(h, _)| h == hash)
    }

    /// Record a finished CronJob run and keep the newest `successful`/`failed` ones.
    pub fn record_run(&mut self, run: Run, successful: u32, failed: u32) {
        self.active = false;
        self.history.push(run);
        let runs: Vec<(UnixMs, bool)> = self.history.iter().map(|r| (r.scheduled, r.succeeded)).collect();
        let drop = outpost_core::cron::prune_history(&runs, successful, failed);
        self.history.retain(|r| !drop.contains(&r.scheduled));
    }
}

/// The node's local time zone for schedules without `timeZone`: `TZ`, else the system's, else UTC.
pub fn local_zone() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC)
}
