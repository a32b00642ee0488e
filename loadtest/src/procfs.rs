//! What the kernel says about a process: CPU time, resident memory, open-file limit.
//!
//! Read from `/proc` (Linux only) so the tool needs no libc binding. Every reader returns
//! `None` where `/proc` is missing or says something unexpected: measurements degrade to
//! "not available", they never fail a run.

use std::sync::OnceLock;
use std::time::Duration;

/// A process to observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pid {
    /// The load tool itself.
    Own,
    /// Another process, such as the server.
    Other(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Own => "/proc/self".to_string(),
            Pid::Other(pid) => format!("/proc/{pid}"),
        }
    }
}

/// User plus system CPU time the process (all its threads) has used.
pub(crate) fn cpu_time(pid: Pid) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("{}/stat", pid.dir())).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    let hz = clock_ticks_per_sec();
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock tick rate (`USER_HZ`), asked of `getconf CLK_TCK` once.
///
/// It is 100 on every mainstream Linux build; the fallback only matters where `getconf` is
/// missing, and is that value.
pub(crate) fn clock_ticks_per_sec() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

/// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Resident set size now.
    pub(crate) rss: u64,
    /// The highest resident set size so far (the "high water mark").
    pub(crate) peak: u64,
}

/// The process's resident memory.
pub(crate) fn memory(pid: Pid) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("{}/status", pid.dir())).ok()?;
    parse_status_memory(&status)
}

/// `VmRSS` and `VmHWM` from the text of `/proc/<pid>/status`.
pub(crate) fn parse_status_memory(status: &str) -> Option<Memory> {
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let value = line[key.len()..].trim().strip_suffix("kB")?.trim();
        value.parse::<u64>().ok().map(|k| k * 1024)
    };
    let rss = kib("VmRSS:")?;
    Some(Memory {
        rss,
        peak: kib("VmHWM:").unwrap_or(rss),
    })
}

/// The open-file limit, soft and hard (`None` = unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdLimit {
    /// What the process may open now.
    pub(crate) soft: Option<u64>,
    /// What the soft limit may be raised to without privileges.
    pub(crate) hard: Option<u64>,
}

/// This process's open-file limit, from `/proc/self/limits`.
pub(crate) fn fd_limit() -> Option<FdLimit> {
    parse_fd_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The "Max open files" line of `/proc/<pid>/limits`.
pub(crate) fn parse_fd_limit(limits: &str) -> Option<FdLimit> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let parse = |v: &str| {
        if v == "unlimited" {
            Some(None)
        } else {
            v.parse().ok().map(Some)
        }
    };
    Some(FdLimit {
        soft: parse(values.next()?)?,
        hard: parse(values.next()?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1409 0 0 0 \
                    250 31 0 0 20 0 9 0 1234 123456 789 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(281));
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_memory_in_bytes() {
        let status = "Name:\taskstream\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status_memory(status),
            Some(Memory {
                rss: 10 << 20,
                peak: 20 << 20
            })
        );
        assert_eq!(parse_status_memory("Name:\tzombie\n"), None);
    }

    #[test]
    fn fd_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             62987                62987                processes \n\
                      Max open files            1024                 unlimited            files     \n";
        assert_eq!(
            parse_fd_limit(limits),
            Some(FdLimit {
                soft: Some(1024),
                hard: None
            })
        );
    }

    #[test]
    fn own_process_is_readable() {
        // On Linux: the tool can see itself. Elsewhere these are None, which is allowed.
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(cpu_time(Pid::Own).is_some());
            assert!(memory(Pid::Own).unwrap().rss > 0);
            assert!(fd_limit().is_some());
        }
    }
}
