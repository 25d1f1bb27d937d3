//! Percentiles and what the process costs: resident memory and CPU time.

use std::time::Duration;

/// The `p`-th percentile (nearest rank) of `values`; 0 when there are none.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Resident memory of this process now, in bytes (Linux `/proc/self/statm`; 0 elsewhere).
pub(crate) fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok())).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn usage() -> libc::rusage {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    }
}

/// User and system CPU time of this process so far (every thread).
pub(crate) fn cpu_time() -> Duration {
    let u = usage();
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Peak resident memory of this process so far, in bytes.
pub(crate) fn peak_rss_bytes() -> u64 {
    (usage().ru_maxrss as u64) * 1024
}

/// What the nodes cost. Time in the simulation is real time (the nodes run on tokio's clock,
/// not a virtual one), so "CPU per simulated second" is CPU seconds per wall second.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Cost {
    /// Resident memory the nodes added, per node, once all had joined and held their cores.
    pub(crate) memory_per_node_kib: f64,
    /// Peak resident memory of the whole run.
    pub(crate) peak_rss_mib: f64,
    /// CPU seconds per second while the network was idle (keep-alives, DHT upkeep, gossipsub
    /// heartbeats), for the whole network and per node.
    pub(crate) cpu_per_second_idle: f64,
    pub(crate) cpu_ms_per_node_per_second_idle: f64,
    /// CPU seconds per second over the whole run (joining, lookups, writes, churn).
    pub(crate) cpu_per_second_run: f64,
    /// Wall time of the run.
    pub(crate) wall_s: f64,
}

impl Cost {
    /// `nodes` running, memory before any and after all joined, CPU while idle for `idle`,
    /// and over the whole `wall` time.
    pub(crate) fn new(nodes: usize, rss_start: u64, rss_nodes: u64, idle_cpu: Duration, idle: Duration, run_cpu: Duration, wall: Duration) -> Cost {
        let nodes = nodes.max(1) as f64;
        let idle_rate = idle_cpu.as_secs_f64() / idle.as_secs_f64().max(1e-9);
        Cost {
            memory_per_node_kib: rss_nodes.saturating_sub(rss_start) as f64 / 1024.0 / nodes,
            peak_rss_mib: peak_rss_bytes() as f64 / (1024.0 * 1024.0),
            cpu_per_second_idle: idle_rate,
            cpu_ms_per_node_per_second_idle: idle_rate * 1000.0 / nodes,
            cpu_per_second_run: run_cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            wall_s: wall.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 1.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn this_process_has_memory_and_spends_cpu() {
        let before = cpu_time();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time() > before);
        assert!(rss_bytes() > 0 && peak_rss_bytes() >= rss_bytes() / 2);
    }
}
