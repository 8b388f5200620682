//! Sizes (`4096`, `64KiB`, `1GiB`), rates (`300mbit`, `1gbit`, `0`) and
//! durations (`50ms`, `2s`) as the command line takes and prints them.

use std::time::Duration;

use anyhow::{Context, Result, bail};

fn split_number(s: &str) -> Result<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if end == 0 {
        bail!("'{s}' does not start with a number");
    }
    let n: f64 = s[..end]
        .parse()
        .with_context(|| format!("'{s}' is not a number"))?;
    Ok((n, s[end..].trim()))
}

/// Parses a size in bytes: a plain number, or a number with `KiB`, `MiB`,
/// `GiB`, `TiB` (powers of 1024) or `kB`, `MB`, `GB` (powers of 1000).
pub fn parse_size(s: &str) -> Result<u64> {
    let (n, unit) = split_number(s)?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "T" => 1024.0f64.powi(4),
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => bail!("unknown size unit '{unit}' in '{s}' (use 4096, 64KiB, 512MiB, 1GiB)"),
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        bail!("size '{s}' is out of range");
    }
    if v.fract() != 0.0 {
        bail!("size '{s}' is not a whole number of bytes");
    }
    Ok(v as u64)
}

/// Parses a rate in bits per second as tc writes them: `300mbit`, `1gbit`,
/// `100kbit`, `10bit`, `0` (unlimited); tc's byte units (`bps`, `kbps`,
/// `mbps`, `gbps`: bytes per second) mean what they mean to tc.
pub fn parse_rate(s: &str) -> Result<u64> {
    let (n, unit) = split_number(s)?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" if n == 0.0 => 0.0,
        "bit" => 1.0,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        _ => bail!("unknown rate '{s}' (use 300mbit, 1gbit, 100gbit, or 0 for unlimited)"),
    };
    let v = n * mult;
    if !v.is_finite() || v > u64::MAX as f64 || v.fract() != 0.0 {
        bail!("rate '{s}' is out of range");
    }
    Ok(v as u64)
}

/// Parses a duration: a number with `ns`, `us` (or `µs`), `ms`, `s` or
/// `min`, such as `50us`, `50ms`, `2s`, `1.5s`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (n, unit) = split_number(s)?;
    let nanos_per: f64 = match unit {
        "" if n == 0.0 => 0.0,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "min" => 60e9,
        _ => bail!("unknown duration '{s}' (use 50us, 50ms, 2s, or 0)"),
    };
    let v = n * nanos_per;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        bail!("duration '{s}' is out of range");
    }
    Ok(Duration::from_nanos(v.round() as u64))
}

/// Formats a duration the way [`parse_duration`] reads it (`50us`, `3s`).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// Formats bytes with binary units (`64KiB`, `1.5GiB`).
pub fn format_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else if v.fract() == 0.0 {
        format!("{v}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Formats a rate in bits per second the way tc does (`1gbit`, `300mbit`).
pub fn format_rate(bps: u64) -> String {
    if bps == 0 {
        return "unlimited".into();
    }
    for (m, u) in [(1e12, "tbit"), (1e9, "gbit"), (1e6, "mbit"), (1e3, "kbit")] {
        let v = bps as f64 / m;
        if v >= 1.0 {
            return if v.fract() == 0.0 {
                format!("{v}{u}")
            } else {
                format!("{v:.2}{u}")
            };
        }
    }
    format!("{bps}bit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("0.5").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999TiB").is_err());
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("300mbit").unwrap(), 300_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("100gbit").unwrap(), 100_000_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("2.5Gbit").unwrap(), 2_500_000_000);
        // tc's byte units are bytes per second.
        assert_eq!(parse_rate("125mbps").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("1000bps").unwrap(), 8000);
        assert!(parse_rate("1gb").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5").is_err());
        assert_eq!(format_rate(1_000_000_000), "1gbit");
        assert_eq!(format_rate(300_000_000), "300mbit");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("50µs").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("100ns").unwrap(), Duration::from_nanos(100));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_micros(50)), "50us");
        assert_eq!(format_duration(Duration::from_secs(3)), "3s");
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::ZERO), "0");
    }
}
