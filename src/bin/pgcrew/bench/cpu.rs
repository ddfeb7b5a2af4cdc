//! CPU time spent by a benchmark phase: this process's (the instances run in it) and the
//! benchmark database's backends' (read from `/proc` when the server is on this machine). CPU
//! per unit of work holds up on a loaded machine where throughput does not: it is what a
//! change adds or saves, whoever else is waiting for the cores.

use std::collections::HashMap;
use std::time::Duration;

use pgcrew::Result;

/// User + system CPU time of this process so far.
pub(crate) fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// User + system CPU seconds of process `pid` from `/proc/<pid>/stat` (`None` when it is not
/// readable: another machine's server, or the process ended).
pub(crate) fn proc_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// CPU seconds of each listed process now (unreadable ones left out).
pub(crate) fn cpu_of(pids: Vec<i32>) -> HashMap<i32, f64> {
    pids.into_iter()
        .filter_map(|p| proc_cpu_secs(p).map(|s| (p, s)))
        .collect()
}

/// The process ids of the current database's backends other than `probe`'s own. Through the
/// pool's executor (an unnamed statement where the pool says so: behind PgBouncer a prepared
/// one is lost between its Parse and its Execute).
async fn backend_pids(probe: &pgcrew::db::Conn) -> Result<Vec<i32>> {
    let row = pgcrew::db::Executor::query_one(probe, pgcrew::sql!("bench/database_backends"), &[])
        .await?;
    Ok(row.try_get(0)?)
}

/// CPU counters at the start of a phase.
pub(crate) struct CpuMeter {
    process: Duration,
    backends: HashMap<i32, f64>,
}

/// CPU a phase used: this process's and the database backends' seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUsed {
    /// This process (the instances), CPU seconds.
    pub instance_secs: f64,
    /// The benchmark database's backends, CPU seconds (0 when `/proc` does not show them).
    pub server_secs: f64,
}

impl CpuMeter {
    /// Read the counters now (`probe`: a connection to the benchmark database).
    pub(crate) async fn start(probe: &pgcrew::db::Conn) -> Result<CpuMeter> {
        let backends = cpu_of(backend_pids(probe).await?);
        Ok(CpuMeter {
            process: process_cpu(),
            backends,
        })
    }

    /// CPU used since [`CpuMeter::start`]. Backends that started since count whole (their
    /// life is within the phase); backends that ended since are missed.
    pub(crate) async fn used(&self, probe: &pgcrew::db::Conn) -> Result<CpuUsed> {
        let process = process_cpu();
        let now = cpu_of(backend_pids(probe).await?);
        Ok(CpuUsed {
            instance_secs: process.saturating_sub(self.process).as_secs_f64(),
            server_secs: now
                .iter()
                .map(|(p, s)| s - self.backends.get(p).copied().unwrap_or(0.0))
                .sum(),
        })
    }
}
