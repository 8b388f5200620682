//! Two network namespaces joined by a veth pair, optionally rate-limited, for
//! running a dwcp sender and receiver as two processes over a real (if
//! virtual) link, and for measuring that link with `iperf3`.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip`/`tc` from iproute2;
//! [`available`] says whether this process has them, so that tests can skip
//! with a reason. Everything created here is removed again: by
//! [`LinkPair`]'s `Drop` (which also runs when a test panics), and, for
//! processes that were killed before they could clean up, by a sweep of
//! stale `dwcp-<pid>-*` namespaces whose process is gone, done on every
//! [`LinkPair::create`].
//!
//! # Rate limiting
//!
//! With a rate, both veth ends get a `tbf` root qdisc on egress (data one way,
//! ACKs the other) with
//!
//! - `burst` = 8 ms at the rate ([`TBF_BURST_TIME`]), at least
//!   [`TBF_MIN_BURST`] bytes: 1 MB at 1 Gbit/s, 300 kB at 300 Mbit/s;
//! - `latency` = [`TBF_LATENCY`] (10 ms): the queue holds 10 ms at the rate on
//!   top of the burst before tbf drops.
//!
//! tbf charges each packet its L2 length (Ethernet header included, no
//! preamble, inter-frame gap or FCS), so the TCP goodput ceiling at MTU 1500
//! with timestamps is rate × 1448/1514 = 95.6 %: 956 Mbit/s at 1 Gbit/s
//! (a real 1 GbE wire gives ~941). tbf's `overhead 24` does not fix that
//! here: veth hands tbf GSO packets of up to 64 KiB, and the overhead is
//! charged once per packet, not per segment (measured: no change).
//!
//! The burst is what decides whether the ceiling is reached on a small
//! (2-core) machine: tokens that pile up beyond the burst while the sender,
//! the receiver and softirq processing compete for the CPU are lost, and a
//! burst below one GSO packet makes tbf split every packet. Measured with
//! shell-built pairs on the 2-core development VM (Linux 6.18, iperf3 3.12,
//! 5 s runs, Mbit/s received, 1 to 4 runs each; "retx": TCP retransmits):
//!
//! | rate    | burst | latency | `-P 1`        | `-P 4`        |
//! |---------|-------|---------|---------------|---------------|
//! | 1gbit   | 32kb  | 5-50 ms | 764-822, retx | 798-806, retx |
//! | 1gbit   | 64kb  | 50 ms   | 931, retx     | 940, retx     |
//! | 1gbit   | 256kb | 5 ms    | 865-927       | 928-934       |
//! | 1gbit   | 256kb | 20 ms   | 920-953       | 935-949       |
//! | 1gbit   | 512kb | 10 ms   | 952-956       | 949-955       |
//! | 1gbit   | 1mb   | 10 ms   | 951-958       | 955-958       |
//! | 300mbit | 128kb | 10 ms   | 284-286       | 283-286       |
//! | 300mbit | 300kb | 10 ms   | 286.8-287.2   | 287.1-287.4   |
//! | 300mbit | 1mb   | 10 ms   | 288.1-288.4   | 288.3-288.4   |
//!
//! With the parameters chosen (the 1mb and 300kb rows), through this module
//! (`measure_tbf_ceilings`, 3 runs): 1 Gbit/s `-P 1` 952.7-957.8 and `-P 4`
//! 957.1-957.8; 300 Mbit/s `-P 1` 286.9-287.1 and `-P 4` 286.4-287.1.
//! Results a little above the ceiling are the initial burst (1 MB is
//! 1.6 Mbit/s over 5 s, 8 Mbit/s over 1 s: short runs read high). Without a
//! rate the same pair carries ~9 Gbit/s.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::netref::{BulkResult, iperf3_via};
use crate::proc::run_capture;

/// Prefix of every namespace created here: `dwcp-<pid>-<n>-a` / `-b`.
const NS_PREFIX: &str = "dwcp-";

/// Name of the veth end inside namespace A (created there directly, so it
/// never clashes with anything in the caller's namespace).
const VETH_A: &str = "dwcp-a";

/// Name of the veth end inside namespace B.
const VETH_B: &str = "dwcp-b";

/// tbf bucket size, as time at the configured rate (see the module docs).
pub const TBF_BURST_TIME: Duration = Duration::from_millis(8);

/// Smallest tbf bucket, in bytes, whatever the rate.
pub const TBF_MIN_BURST: u64 = 16 * 1024;

/// tbf queueing latency: how long a packet may wait before tbf drops it.
pub const TBF_LATENCY: Duration = Duration::from_millis(10);

/// Highest rate [`LinkPair::create`] accepts: 1 Tbit/s. tc accepts far
/// higher numbers but silently installs a `rate 0bit burst 0b` qdisc for
/// some (e.g. `u64::MAX`), so absurd rates are refused up front.
pub const MAX_RATE_BITS_PER_SEC: u64 = 1_000_000_000_000;

/// How long one `ip` or `tc` invocation may take before it is treated as hung.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP port of the `iperf3` server inside namespace B. The namespace is
/// ours and fresh, so the default port is free.
const IPERF3_PORT: &str = "5201";

/// Pairs created by this process so far; numbers namespaces and addresses.
static PAIRS_CREATED: AtomicU32 = AtomicU32::new(0);

/// Which end of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The `-a` namespace, address `10.x.y.1`; the `iperf3` client side.
    A,
    /// The `-b` namespace, address `10.x.y.2`; the `iperf3` server side.
    B,
}

/// Two network namespaces joined by a veth pair, removed on drop.
#[derive(Debug)]
pub struct LinkPair {
    /// Namespace names, A then B.
    ns: [String; 2],
    /// Whether each namespace was created and so must be deleted.
    live: [bool; 2],
    /// Addresses, A then B.
    addr: [Ipv4Addr; 2],
    /// tbf rate on both ends; 0 for none.
    rate_bits_per_sec: u64,
}

impl LinkPair {
    /// Creates namespaces `dwcp-<pid>-<n>-a`/`-b` (n: a process-wide
    /// counter), a veth pair with one end in each, addresses `10.x.y.1/24` on
    /// A and `10.x.y.2/24` on B, and brings the links and `lo` up in both.
    ///
    /// `x` (200..=254) and `y` come from the pid and `n`, so pairs of one
    /// process never share a subnet and those of concurrent processes rarely
    /// do (it would not matter: each pair is isolated in its own namespaces).
    ///
    /// When `rate_bits_per_sec > 0`, a tbf qdisc limits BOTH veth ends'
    /// egress to that rate (parameters in the module docs).
    ///
    /// Fails with a clear error when not root, when `ip` (or, with a rate,
    /// `tc`) is missing, or when the rate is above [`MAX_RATE_BITS_PER_SEC`].
    /// On any failure mid-way, what was created is removed. Namespaces left
    /// behind by `dwcp` processes that no longer exist are removed first.
    pub fn create(rate_bits_per_sec: u64) -> Result<LinkPair> {
        ensure!(
            rate_bits_per_sec <= MAX_RATE_BITS_PER_SEC,
            "link rate {rate_bits_per_sec} bit/s is above the \
             {MAX_RATE_BITS_PER_SEC} bit/s tbf accepts here"
        );
        available().map_err(|reason| anyhow!(reason))?;
        sweep_stale();
        let pid = std::process::id();
        let n = PAIRS_CREATED.fetch_add(1, Ordering::Relaxed);
        // 55 values of x times 256 of y; n varies y first, so one process
        // gets 256 distinct subnets before any repeats.
        let slot = (u64::from(pid) * 256 + u64::from(n)) % (55 * 256);
        let x = 200 + u8::try_from(slot / 256).expect("slot / 256 < 55");
        let y = u8::try_from(slot % 256).expect("slot % 256 < 256");
        let mut pair = LinkPair {
            ns: [
                format!("{NS_PREFIX}{pid}-{n}-a"),
                format!("{NS_PREFIX}{pid}-{n}-b"),
            ],
            live: [false; 2],
            addr: [Ipv4Addr::new(10, x, y, 1), Ipv4Addr::new(10, x, y, 2)],
            rate_bits_per_sec,
        };
        // On error `pair` is dropped here, deleting what exists.
        pair.build()
            .with_context(|| format!("setting up veth pair {} <-> {}", pair.ns[0], pair.ns[1]))?;
        Ok(pair)
    }

    /// Creates namespaces, link, addresses and qdiscs; marks each namespace
    /// live as soon as it exists so that `Drop` removes it.
    fn build(&mut self) -> Result<()> {
        for (i, ns) in self.ns.iter().enumerate() {
            run_tool("ip", &["netns", "add", ns])?;
            self.live[i] = true;
        }
        let [ns_a, ns_b] = &self.ns;
        run_tool(
            "ip",
            &[
                "link", "add", VETH_A, "netns", ns_a, "type", "veth", "peer", "name", VETH_B,
                "netns", ns_b,
            ],
        )?;
        for (ns, dev, addr) in [(ns_a, VETH_A, self.addr[0]), (ns_b, VETH_B, self.addr[1])] {
            let cidr = format!("{addr}/24");
            run_tool("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            run_tool("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run_tool("ip", &["-n", ns, "link", "set", dev, "up"])?;
            if self.rate_bits_per_sec > 0 {
                let (rate, burst, latency) = tbf_args(self.rate_bits_per_sec);
                run_tool(
                    "tc",
                    &[
                        "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate,
                        "burst", &burst, "latency", &latency,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The address of `side`'s veth end.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        self.addr[side.index()]
    }

    /// The name of `side`'s namespace (as `ip netns` knows it).
    pub fn ns_name(&self, side: Side) -> &str {
        &self.ns[side.index()]
    }

    /// The tbf rate on both ends, in bits per second; 0 when unlimited.
    pub fn rate_bits_per_sec(&self) -> u64 {
        self.rate_bits_per_sec
    }

    /// A `Command` running `program` inside the namespace of `side` (as
    /// `ip netns exec NAME program`); add its arguments to the result.
    ///
    /// `ip netns exec` replaces itself with `program` (no fork), so the
    /// child's pid, exit status, signals and CPU time are `program`'s own.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns_name(side)]).arg(program);
        cmd
    }

    /// Runs `iperf3 -P streams -t secs` with the server in B and the client
    /// in A ([`crate::netref::iperf3_via`]), or returns `None` when `iperf3`
    /// is not installed.
    pub fn iperf3(&self, streams: usize, duration: Duration) -> Result<Option<BulkResult>> {
        let server_addr = self.addr(Side::B).to_string();
        iperf3_via(
            &|| self.command(Side::B, "iperf3"),
            &|| self.command(Side::A, "iperf3"),
            &server_addr,
            IPERF3_PORT,
            streams,
            duration,
        )
        .with_context(|| format!("iperf3 from {} to {}", self.ns[0], self.ns[1]))
    }
}

impl Drop for LinkPair {
    /// Deletes both namespaces (which removes the veth pair with them). Never
    /// panics; failures go to stderr.
    fn drop(&mut self) {
        for (ns, live) in self.ns.iter().zip(&mut self.live) {
            if std::mem::take(live)
                && let Err(e) = run_tool("ip", &["netns", "del", ns])
            {
                eprintln!("warning: removing network namespace {ns}: {e:#}");
            }
        }
    }
}

impl Side {
    /// Index into [`LinkPair`]'s per-side arrays.
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// tc's `rate`, `burst` and `latency` arguments for `rate_bits_per_sec`.
fn tbf_args(rate_bits_per_sec: u64) -> (String, String, String) {
    let bytes_per_sec = u128::from(rate_bits_per_sec / 8);
    let burst = bytes_per_sec * TBF_BURST_TIME.as_micros() / 1_000_000;
    let burst = u64::try_from(burst).unwrap_or(u64::MAX).max(TBF_MIN_BURST);
    (
        format!("{rate_bits_per_sec}bit"),
        burst.to_string(),
        format!("{}us", TBF_LATENCY.as_micros()),
    )
}

/// Whether this process can create namespaces: effective uid 0 with
/// CAP_NET_ADMIN and CAP_SYS_ADMIN, and `ip` runs. `Err` says why not, for
/// tests to print when they skip.
pub fn available() -> Result<(), String> {
    const NEEDS_ROOT: &str =
        "needs root (CAP_NET_ADMIN) to create network namespaces; run as root or skip";
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let euid = field("Uid:")
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok());
    let cap_eff = field("CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok());
    match (euid, cap_eff) {
        (Some(0), Some(caps))
            if caps & (1 << CAP_NET_ADMIN) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0 => {}
        (Some(euid), Some(caps)) => {
            return Err(format!("{NEEDS_ROOT} (euid {euid}, CapEff {caps:#x})"));
        }
        _ => return Err(format!("{NEEDS_ROOT} (cannot read euid/CapEff)")),
    }
    match Command::new("ip")
        .arg("-V")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`ip -V` failed ({s})")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err("`ip` not found; install iproute2 (`apt-get install -y iproute2`)".to_owned())
        }
        Err(e) => Err(format!("running `ip -V`: {e}")),
    }
}

/// Deletes namespaces named `dwcp-<pid>-<n>-a|b` whose `<pid>` no longer
/// runs: leftovers of processes killed before their `Drop` ran. Best
/// effort; failures go to stderr.
fn sweep_stale() {
    let Ok(out) = run_capture(Command::new("ip").args(["netns", "list"]), TOOL_TIMEOUT) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Lines look like `NAME` or `NAME (id: 3)`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = stale_pid(name) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = run_tool("ip", &["netns", "del", name]) {
            eprintln!("warning: removing stale network namespace {name}: {e:#}");
        }
    }
}

/// The pid in a name `dwcp-<pid>-<n>-a|b`, or `None` for any other name.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let rest = rest
        .strip_suffix("-a")
        .or_else(|| rest.strip_suffix("-b"))?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Runs `program args..`, failing with its stderr when it exits non-zero.
fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let line = format!("{program} {}", args.join(" "));
    let out = match run_capture(Command::new(program).args(args), TOOL_TIMEOUT) {
        Ok(out) => out,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::NotFound) =>
        {
            bail!("`{program}` not found; install iproute2 (`apt-get install -y iproute2`)");
        }
        Err(e) => return Err(e.context(format!("running `{line}`"))),
    };
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The namespaces `ip netns list` shows.
    fn namespaces() -> Vec<String> {
        let out = run_capture(Command::new("ip").args(["netns", "list"]), TOOL_TIMEOUT).unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Prints why namespace tests skip; true when they can run.
    fn can_run() -> bool {
        match available() {
            Ok(()) => true,
            Err(reason) => {
                println!("skipping: {reason}");
                false
            }
        }
    }

    /// Creates a pair at `rate`, checks it exists and carries TCP (via
    /// iperf3, 1 s), drops it and checks it is gone. Returns the Gbit/s
    /// measured, if iperf3 is installed.
    fn pair_round_trip(rate: u64) -> Option<f64> {
        let pair = LinkPair::create(rate).unwrap();
        let names = [
            pair.ns_name(Side::A).to_owned(),
            pair.ns_name(Side::B).to_owned(),
        ];
        let listed = namespaces();
        for name in &names {
            assert!(listed.contains(name), "{name} not in {listed:?}");
        }
        // The address really is on the veth end inside A.
        let out = run_capture(
            pair.command(Side::A, "ip")
                .args(["-4", "-o", "addr", "show"]),
            TOOL_TIMEOUT,
        )
        .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains(&format!("inet {}/24", pair.addr(Side::A))),
            "{shown}"
        );
        let gbps = match pair.iperf3(1, Duration::from_secs(1)).unwrap() {
            Some(r) => {
                println!("rate {rate} bit/s: iperf3 -P 1: {r:?}");
                assert_eq!(r.connections, 1);
                assert!(r.gbps() > 0.0 && r.bytes > 0 && r.seconds > 0.0, "{r:?}");
                Some(r.gbps())
            }
            None => {
                println!("skipping the iperf3 check: iperf3 not installed");
                None
            }
        };
        drop(pair);
        let listed = namespaces();
        for name in &names {
            assert!(!listed.contains(name), "{name} still in {listed:?}");
        }
        gbps
    }

    #[test]
    fn unlimited_pair_carries_tcp() {
        if can_run() {
            pair_round_trip(0);
        }
    }

    #[test]
    fn one_gbit_pair_is_limited() {
        if can_run()
            && let Some(gbps) = pair_round_trip(1_000_000_000)
        {
            assert!(gbps < 1.0, "{gbps} Gbit/s over a 1 Gbit/s tbf");
        }
    }

    #[test]
    fn pairs_get_distinct_names_and_subnets() {
        if !can_run() {
            return;
        }
        let (p, q) = (LinkPair::create(0).unwrap(), LinkPair::create(0).unwrap());
        assert_ne!(p.ns_name(Side::A), q.ns_name(Side::A));
        assert_ne!(p.addr(Side::A), q.addr(Side::A));
        for pair in [&p, &q] {
            let [a, b] = [pair.addr(Side::A).octets(), pair.addr(Side::B).octets()];
            assert_eq!(a[..3], b[..3]);
            assert_eq!((a[0], a[3], b[3]), (10, 1, 2));
            assert!(a[1] >= 200, "{a:?}");
        }
    }

    /// Deletes a namespace a test created by hand, even when it panics.
    struct NsGuard(String);

    impl Drop for NsGuard {
        fn drop(&mut self) {
            let _ = run_tool("ip", &["netns", "del", &self.0]);
        }
    }

    #[test]
    fn failure_midway_removes_what_was_created() {
        if !can_run() {
            return;
        }
        let pid = std::process::id();
        // Not `dwcp-<pid>-<n>-x` with a numeric n, so no sweep touches them.
        let (a, b) = (
            format!("dwcp-{pid}-midway-a"),
            format!("dwcp-{pid}-midway-b"),
        );
        // B already exists (and is not the pair's), so setup fails after A.
        run_tool("ip", &["netns", "add", &b]).unwrap();
        let _b = NsGuard(b.clone());
        let _a = NsGuard(a.clone());
        let mut pair = LinkPair {
            ns: [a.clone(), b.clone()],
            live: [false; 2],
            addr: [
                Ipv4Addr::new(10, 254, 255, 1),
                Ipv4Addr::new(10, 254, 255, 2),
            ],
            rate_bits_per_sec: 0,
        };
        let e = pair.build().unwrap_err();
        assert!(format!("{e:#}").contains("netns add"), "{e:#}");
        assert_eq!(pair.live, [true, false]);
        assert!(namespaces().contains(&a));
        drop(pair);
        let listed = namespaces();
        assert!(!listed.contains(&a), "{a} still in {listed:?}");
        assert!(listed.contains(&b), "{b}, not the pair's, was removed");
    }

    #[test]
    fn create_sweeps_namespaces_of_dead_processes() {
        if !can_run() {
            return;
        }
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let stale = format!("dwcp-{}-0-a", gone.id());
        run_tool("ip", &["netns", "add", &stale]).unwrap();
        let _stale = NsGuard(stale.clone());
        drop(LinkPair::create(0).unwrap());
        let listed = namespaces();
        assert!(!listed.contains(&stale), "{stale} still in {listed:?}");
    }

    #[test]
    fn absurd_rates_are_refused() {
        let e = LinkPair::create(u64::MAX).unwrap_err();
        assert!(e.to_string().contains("above"), "{e:#}");
    }

    /// Re-measures the table in the module docs (5 s per run, ~20 s in
    /// all): `cargo test -p dwcp-cli netns::tests::measure -- --ignored --nocapture`.
    #[test]
    #[ignore = "takes ~20 s; run by hand to re-measure the tbf table"]
    fn measure_tbf_ceilings() {
        if !can_run() {
            return;
        }
        for (rate, streams) in [
            (1_000_000_000, 1),
            (1_000_000_000, 4),
            (300_000_000, 1),
            (300_000_000, 4),
        ] {
            let pair = LinkPair::create(rate).unwrap();
            let Some(r) = pair.iperf3(streams, Duration::from_secs(5)).unwrap() else {
                println!("skipping: iperf3 not installed");
                return;
            };
            println!(
                "{} Mbit/s tbf, -P {streams}: {:.1} Mbit/s ({} bytes in {:.3} s)",
                rate / 1_000_000,
                r.gbps() * 1e3,
                r.bytes,
                r.seconds
            );
        }
    }

    #[test]
    fn tbf_burst_scales_with_rate() {
        assert_eq!(
            tbf_args(1_000_000_000),
            (
                "1000000000bit".to_owned(),
                "1000000".to_owned(),
                "10000us".to_owned()
            )
        );
        assert_eq!(tbf_args(300_000_000).1, "300000");
        assert_eq!(tbf_args(1_000_000).1, TBF_MIN_BURST.to_string());
    }

    #[test]
    fn stale_names_parse() {
        assert_eq!(stale_pid("dwcp-123-4-a"), Some(123));
        assert_eq!(stale_pid("dwcp-123-4-b"), Some(123));
        assert_eq!(stale_pid("dwcp-123-4-c"), None);
        assert_eq!(stale_pid("dwcp-x-4-a"), None);
        assert_eq!(stale_pid("other-123-4-a"), None);
    }
}
