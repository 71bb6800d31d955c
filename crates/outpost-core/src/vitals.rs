//! Which of a node's stored vitals samples a history answer carries: the samples since the
//! asked time, downsampled to a bounded number of points so an answer stays small (24 h at one
//! sample a minute is 1,440 samples; a chart needs a few hundred).
//!
//! Downsampling keeps peaks: consecutive samples are grouped into equal runs and each run
//! becomes one point with the **maximum** of each series and the time of its last sample, so a
//! one-minute CPU spike stays visible in a day's chart.
//!
//! Must never: read clocks or files (samples and times come in as arguments).

use outpost_api::VitalsPoint;

/// The points of `samples` (oldest first) taken at or after `since`, at most `max_points`
/// (at least 1) of them, oldest first.
pub fn history(samples: &[VitalsPoint], since: i64, max_points: usize) -> Vec<VitalsPoint> {
    let max_points = max_points.max(1);
    let from = samples.partition_point(|p| p.at < since);
    let kept = &samples[from..];
    if kept.len() <= max_points {
        return kept.to_vec();
    }
    // Runs of `size` samples, the remainder spread over the first runs, so runs differ by one
    // sample at most and there are exactly `max_points` of them.
    let (size, extra) = (kept.len() / max_points, kept.len() % max_points);
    let mut out = Vec::with_capacity(max_points);
    let mut start = 0;
    for i in 0..max_points {
        let len = size + usize::from(i < extra);
        out.push(peak(&kept[start..start + len]));
        start += len;
    }
    out
}

fn peak(run: &[VitalsPoint]) -> VitalsPoint {
    let mut p = run[run.len() - 1];
    for s in run {
        p.cpu = p.cpu.max(s.cpu);
        p.mem = p.mem.max(s.mem);
        p.disk = p.disk.max(s.disk);
        p.load1 = p.load1.max(s.load1);
        p.temp_c = match (p.temp_c, s.temp_c) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(at: i64, cpu: f32) -> VitalsPoint {
        VitalsPoint {
            at,
            cpu,
            mem: 10.0,
            disk: 20.0,
            load1: 0.5,
            temp_c: None,
        }
    }

    /// (samples as (at, cpu), since, max) -> expected (at, cpu).
    fn check(samples: &[(i64, f32)], since: i64, max: usize, expected: &[(i64, f32)]) {
        let s: Vec<_> = samples.iter().map(|&(a, c)| pt(a, c)).collect();
        let got: Vec<_> = history(&s, since, max).iter().map(|p| (p.at, p.cpu)).collect();
        assert_eq!(got, expected, "samples {samples:?} since {since} max {max}");
    }

    #[test]
    fn since_and_downsampling() {
        check(&[], 0, 10, &[]);
        // fewer than the cap: as they are, from `since` on
        check(&[(1, 1.0), (2, 2.0), (3, 3.0)], 0, 10, &[(1, 1.0), (2, 2.0), (3, 3.0)]);
        check(&[(1, 1.0), (2, 2.0), (3, 3.0)], 2, 10, &[(2, 2.0), (3, 3.0)]);
        check(&[(1, 1.0), (2, 2.0)], 5, 10, &[]);
        // 6 into 3: pairs, each the peak at the pair's last time
        check(
            &[(1, 1.0), (2, 9.0), (3, 3.0), (4, 1.0), (5, 0.0), (6, 5.0)],
            0,
            3,
            &[(2, 9.0), (4, 3.0), (6, 5.0)],
        );
        // 5 into 2: runs of 3 and 2
        check(
            &[(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.0)],
            0,
            2,
            &[(3, 3.0), (5, 4.0)],
        );
        // a cap of 0 is 1
        check(&[(1, 1.0), (2, 7.0)], 0, 0, &[(2, 7.0)]);
    }

    #[test]
    fn a_day_fits_the_cap_and_keeps_a_spike() {
        let mut day: Vec<_> = (0..1440).map(|m| pt(m * 60_000, 5.0)).collect();
        day[700].cpu = 99.0;
        day[10].temp_c = Some(61.0);
        let h = history(&day, 0, outpost_api::MAX_VITALS_POINTS as usize);
        assert_eq!(h.len(), 300);
        assert!(h.windows(2).all(|w| w[0].at < w[1].at));
        assert_eq!(h.last().unwrap().at, 1439 * 60_000);
        assert_eq!(h.iter().filter(|p| p.cpu == 99.0).count(), 1);
        assert_eq!(h.iter().filter(|p| p.temp_c == Some(61.0)).count(), 1);
    }
}
