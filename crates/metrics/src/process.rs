//! The standard `process_*` metrics (the names every Prometheus client library
//! exports, so existing dashboards and `rate(process_cpu_seconds_total[1m])` work),
//! read from `/proc/self` at each scrape. Linux only; on a read error the metric
//! is left out of that scrape rather than reported wrong.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// CPU time, memory, open descriptors and threads of this process.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// The fields of `/proc/self/stat` this collector uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// utime + stime, seconds.
    pub cpu_seconds: f64,
    pub threads: i64,
    pub rss_bytes: i64,
    pub vsize_bytes: i64,
    /// Since boot, seconds.
    pub start_seconds_since_boot: f64,
}

/// Parses `/proc/PID/stat` text. The command name (field 2) is in parentheses
/// and may contain spaces and parentheses itself, so fields are counted from the
/// last `)`.
pub fn parse_stat(text: &str, ticks_per_sec: f64, page_size: i64) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    let num = |n: usize| f.get(n - 3).and_then(|s| s.parse::<i64>().ok());
    Some(ProcStat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks_per_sec,
        threads: num(20)?,
        start_seconds_since_boot: num(22)? as f64 / ticks_per_sec,
        vsize_bytes: num(23)?,
        rss_bytes: num(24)?.saturating_mul(page_size),
    })
}

fn sysconf(name: libc::c_int) -> Option<i64> {
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as i64)
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = encoder.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100) as f64;
        let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
        if let Some(s) = std::fs::read_to_string("/proc/self/stat").ok().and_then(|t| parse_stat(&t, ticks, page)) {
            let cpu = ConstCounter::new(s.cpu_seconds);
            let m = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                cpu.metric_type(),
            )?;
            cpu.encode(m)?;
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                s.rss_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory",
                "Virtual memory size",
                Some(&Unit::Bytes),
                s.vsize_bytes as f64,
            )?;
            gauge(&mut encoder, "process_threads", "Threads of the process", None, s.threads as f64)?;
            if let Some(boot) = boot_time() {
                gauge(
                    &mut encoder,
                    "process_start_time",
                    "Start time of the process since the Unix epoch",
                    Some(&Unit::Seconds),
                    boot + s.start_seconds_since_boot,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            gauge(&mut encoder, "process_open_fds", "Open file descriptors", None, dir.count() as f64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A command name with spaces and a ')' must not shift the fields.
        let text = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 104857600 2560 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(text, 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_seconds_since_boot, 123.45);
        assert_eq!(s.vsize_bytes, 104857600);
        assert_eq!(s.rss_bytes, 2560 * 4096);
        assert_eq!(parse_stat("garbage", 100.0, 4096), None);
    }

    #[test]
    fn this_process_is_reported() {
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(ProcessCollector));
        let text = crate::encode(&r);
        for name in
            ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_open_fds ", "process_threads "]
        {
            assert!(text.contains(name), "{name} missing in {text}");
        }
    }
}
