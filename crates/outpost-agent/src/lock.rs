//! One agent per data directory, and no start while a previous agent's child is between `fork`
//! and `exec`.
//!
//! The agent holds an exclusive `flock` on `<data-dir>/agent.lock` for as long as it runs. The
//! descriptor is close-on-exec, and a lock belongs to the open file description, which `fork`
//! shares: a child the agent is starting holds the lock until its `exec` (or its exit), and a
//! workload never holds it afterwards. Such a child is invisible to the `/proc` scan that finds
//! the agent's processes (before `exec` it carries the agent's environment, not its unit's), so
//! an agent killed at that instant would otherwise leave a process that its successor does not
//! see, starts again, and then finds twice. Waiting for the lock closes that window; it also
//! keeps a second agent off a data directory that one already uses.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// The held lock; released when dropped (or when the process dies).
pub struct AgentLock {
    _lock: Flock<File>,
}

/// How long to wait for the lock: a child's `fork`-to-`exec` takes milliseconds; a longer wait
/// means another agent runs on this data directory.
pub const WAIT: Duration = Duration::from_secs(10);

/// Take the data directory's lock, waiting up to `wait`.
pub fn acquire(data_dir: &Path, wait: Duration) -> Result<AgentLock, String> {
    let path = data_dir.join("agent.lock");
    let deadline = Instant::now() + wait;
    let mut waited = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                if waited {
                    tracing::info!(lock = %path.display(), "the previous agent's last child has started; going on");
                }
                return Ok(AgentLock { _lock: lock });
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "another outpost agent (or a process it was starting) still holds {} after {}s: \
                         stop the other agent that uses this data directory, then start this one again",
                        path.display(),
                        wait.as_secs()
                    ));
                }
                if !waited {
                    tracing::info!(lock = %path.display(), "waiting for the previous agent's children to finish starting");
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_is_refused_and_gets_it_once_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), WAIT).unwrap();
        let e = acquire(dir.path(), Duration::from_millis(100)).err().unwrap();
        assert!(e.contains("another outpost agent"), "{e}");
        drop(first);
        acquire(dir.path(), Duration::from_millis(100)).unwrap();
    }
}
