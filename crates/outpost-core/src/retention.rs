//! Retention decisions for the hub's history tables: which object revisions may go.
//!
//! An object's revisions are kept while any of these hold:
//! - it is one of the object's last `keep` revisions (the newest by number);
//! - something still uses it: the object's current revision, a revision some node runs or
//!   prefetches, a rollout's target, its `previous` or a node's `from` (what a rollback goes to).
//!
//! So `outpost rollout history` shows at least the last `keep`, and an undo or a rollback
//! always finds the template it needs. Pure; the store loads the numbers and deletes the result
//! in one transaction.

use std::collections::{BTreeMap, BTreeSet};

/// Default number of revisions kept per object (`OUTPOST_REVISIONS_KEPT`).
pub const REVISIONS_KEPT: usize = 50;

/// The `(object key, revision)` pairs to delete. `revisions`: object key -> its revision
/// numbers (any order); `in_use`: pairs something still refers to.
pub fn revisions_to_prune(
    revisions: &BTreeMap<String, Vec<u64>>,
    in_use: &BTreeSet<(String, u64)>,
    keep: usize,
) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (key, revs) in revisions {
        let mut sorted = revs.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted.dedup();
        for r in sorted.into_iter().skip(keep) {
            if !in_use.contains(&(key.clone(), r)) {
                out.push((key.clone(), r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(revs: &[(&str, &[u64])], used: &[(&str, u64)], keep: usize, want: &[(&str, u64)]) {
        let revisions = revs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        let in_use = used.iter().map(|(k, r)| (k.to_string(), *r)).collect();
        let mut got = revisions_to_prune(&revisions, &in_use, keep);
        got.sort();
        let want: Vec<(String, u64)> = want.iter().map(|(k, r)| (k.to_string(), *r)).collect();
        assert_eq!(got, want, "{revs:?} used {used:?} keep {keep}");
    }

    #[test]
    fn keeps_the_last_n_and_what_is_in_use() {
        // fewer than keep: nothing goes
        check(&[("a", &[1, 2, 3])], &[], 3, &[]);
        // the oldest go, newest first by number whatever the order given
        check(&[("a", &[3, 1, 5, 2, 4])], &[], 2, &[("a", 1), ("a", 2), ("a", 3)]);
        // a revision a node still runs (or a rollout goes back to) stays
        check(&[("a", &[1, 2, 3, 4, 5])], &[("a", 2)], 2, &[("a", 1), ("a", 3)]);
        // in use for another object does not count
        check(&[("a", &[1, 2, 3]), ("b", &[1])], &[("b", 1)], 1, &[("a", 1), ("a", 2)]);
        // keep 0 still keeps what is used
        check(&[("a", &[1, 2])], &[("a", 2)], 0, &[("a", 1)]);
    }
}
