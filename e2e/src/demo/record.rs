//! What one demo run recorded: the timeline, the driver's counts and the sidecars' metrics,
//! from which the summary and the report are made.

use std::time::Duration;

use super::driver::DriverCounts;
use super::metrics::{Pair, PairStats, Snapshot};
use super::topology;

/// One look at the mesh during the run.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the traffic started.
    pub at: Duration,
    pub driver: DriverCounts,
    /// The sidecars' metrics (None when no sidecar could be scraped).
    pub mesh: Option<Snapshot>,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The planned traffic duration and the time traffic actually ran.
    pub planned: Duration,
    pub elapsed: Duration,
    pub rate: f64,
    /// When the outage started and ended (since the traffic started), if it did.
    pub outage_start: Option<Duration>,
    pub outage_end: Option<Duration>,
    pub samples: Vec<Sample>,
    /// The last (or final) metrics of the mesh.
    pub mesh: Snapshot,
    pub driver: DriverCounts,
    pub driver_p95_ms: Option<f64>,
    pub driver_p99_ms: Option<f64>,
    /// Ctrl-C (or SIGTERM) cut the run short.
    pub interrupted: bool,
}

impl RunRecord {
    /// The pairs in reading order: by the caller's distance from the entry, then names.
    pub fn pairs(&self) -> Vec<(&Pair, &PairStats)> {
        let mut pairs: Vec<(&Pair, &PairStats)> = self
            .mesh
            .pairs
            .iter()
            .filter(|(_, stats)| stats.requests > 0.0 || stats.unexpected > 0.0)
            .collect();
        pairs.sort_by_key(|((source, destination), _)| {
            (
                topology::depth(source),
                topology::depth(destination),
                source.clone(),
                destination.clone(),
            )
        });
        pairs
    }

    /// The driver's counts over `[from, to)` (sample times), from the samples.
    pub fn driver_between(&self, from: Duration, to: Duration) -> DriverCounts {
        let at = |time: Duration| {
            self.samples
                .iter()
                .rfind(|sample| sample.at <= time)
                .map(|sample| sample.driver)
                .unwrap_or_default()
        };
        let end = if to >= self.elapsed {
            self.driver
        } else {
            at(to)
        };
        end.minus(&at(from))
    }
}
