//! What the kernel says about a process: its resident memory and the CPU time it used. Shared
//! by the bench's binaries.

use anyhow::{Context, Result};

/// A process's resident memory now, in KiB.
pub fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The CPU time a process used so far, user and system, in seconds.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, in parentheses, may hold spaces: fields count from after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("odd /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Ok((ticks(11)? + ticks(12)?) / ticks_per_second)
}

/// The kernel's clock ticks per second, in which /proc counts CPU time.
pub async fn ticks_per_second() -> Result<f64> {
    let out = tokio::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .await
        .context("getconf CLK_TCK")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK printed no number")
}
