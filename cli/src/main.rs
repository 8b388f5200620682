//! `dwcp`: serve, send, benchmark and demonstrate dwcp.

mod bench_codec;
mod bench_engine;
mod bench_migration;
mod bench_transport;
mod demo;
mod migrate;
mod netns;
mod netref;
mod proc;
mod transfer;
mod units;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// dwcp moves memory images, files and running VMs between machines.
#[derive(Debug, Parser)]
#[command(name = "dwcp", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs dwcp's main job on a built-in default: a live migration of a
    /// guest dirtying memory, on loopback (`--codec`: the codec demo).
    Demo(DemoArgs),
    /// Measures a part of dwcp next to its reference.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Writes a new pre-shared key (mode 0600) for `serve` and `send`.
    Keygen(KeygenArgs),
    /// Receives files and directory trees into a directory.
    Serve(ServeArgs),
    /// Sends files and directory trees to a `dwcp serve`.
    Send(SendArgs),
    /// Live-migrates the KVM test guest between two processes: run
    /// `--incoming ADDR` on the destination, then `--to ADDR` on the source.
    Migrate(MigrateArgs),
    /// One side of `dwcp bench transport`, run inside its namespace.
    #[command(subcommand, hide = true)]
    BenchPeer(BenchPeerCmd),
}

#[derive(Debug, Subcommand)]
enum BenchPeerCmd {
    /// Receives one session into memory and reports.
    Recv(RecvPeerArgs),
    /// Sends generated data (or a file) as one region and reports.
    Send(SendPeerArgs),
}

#[derive(Debug, Args)]
struct RecvPeerArgs {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, value_parser = parse_size)]
    limit: u64,
    #[arg(long, value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
}

#[derive(Debug, Args)]
struct SendPeerArgs {
    #[arg(long)]
    to: String,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, value_parser = bench_transport::Data::parse)]
    data: bench_transport::Data,
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long, value_parser = transfer::parse_streams)]
    streams: dwcp_transport::StreamCount,
    #[arg(long)]
    mode: String,
    #[arg(long, value_parser = parse_rate)]
    link_rate: u64,
    #[arg(long, value_parser = parse_size)]
    kill_stream_at: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
}

#[derive(Debug, Args)]
struct TransportBenchArgs {
    /// What to send: random (incompressible), synthetic (the memory
    /// corpus), or a file.
    #[arg(long, default_value = "random", value_parser = bench_transport::Data::parse)]
    data: bench_transport::Data,
    /// Bytes to send of random or synthetic data (512MiB, 1GiB).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    size: u64,
    /// Data streams: 1..=64, or auto.
    #[arg(long, default_value = "4")]
    streams: String,
    /// Codec policies, comma-separated, each measured in every run:
    /// datacenter, internet, auto, none.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    mode: Vec<String>,
    /// tbf rate of the veth link (300mbit, 1gbit; 0 for unlimited).
    #[arg(long, value_parser = parse_rate, default_value = "1gbit")]
    rate: u64,
    /// Runs, interleaved; medians are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Engine workers of each side (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
    /// Cut one data stream's connection when a third of the data is
    /// acknowledged; report what was sent again.
    #[arg(long)]
    kill_stream: bool,
    /// Skip the iperf3 reference.
    #[arg(long)]
    no_iperf3: bool,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the key; an existing file is never overwritten.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct AuthArgs {
    /// The pre-shared key file (`dwcp keygen FILE`); both sides need it.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Run without authentication; only with a peer started the same way.
    #[arg(long)]
    insecure_no_auth: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// Directory files are written into.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    auth: AuthArgs,
    /// Engine workers (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Files and directories (sent recursively); `-` alone sends standard
    /// input, as one file named by --name, written in order as it arrives.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The name standard input is stored under (with `-`).
    #[arg(long, default_value = "stdin")]
    name: String,
    /// The receiver (host:port).
    #[arg(long)]
    to: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// Data streams: 1..=64, or auto.
    #[arg(long, default_value = "auto", value_parser = transfer::parse_streams)]
    streams: dwcp_transport::StreamCount,
    /// Codec policy: datacenter (LZ4), internet (ZStd), auto, none.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Rate limit on the wire (300mbit, 1gbit; 0 for none).
    #[arg(long, default_value = "0", value_parser = transfer::parse_rate_limit)]
    rate_limit: u64,
    /// One JSON object at the end instead of the progress bar and summary.
    #[arg(long)]
    json: bool,
    /// Engine workers (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// Source: migrate the guest to this destination (host:port).
    #[arg(long, conflicts_with = "incoming")]
    to: Option<String>,
    /// Destination: receive a guest on this address (host:port).
    #[arg(long)]
    incoming: Option<String>,
    #[command(flatten)]
    auth: AuthArgs,
    /// Guest RAM (a multiple of 4MiB, 16MiB to 3GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    ram: u64,
    /// Rate at which the guest dirties memory, MiB/s.
    #[arg(long, default_value_t = 30)]
    dirty: u32,
    /// Downtime limit.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    downtime: Duration,
    /// Give up (the source runs on) after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    deadline: Duration,
    /// Data streams: 1..=64, or auto (the default, 2, is one per shard:
    /// measured faster than 4 on a gigabit link; see docs/migration.md).
    #[arg(long, default_value = "2", value_parser = transfer::parse_streams)]
    streams: dwcp_transport::StreamCount,
    /// Page codec policy: datacenter (LZ4), internet (ZStd), auto (per
    /// frame, from the link the transport measures; LZ4 until it has), none.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Rate limit on the wire (300mbit, 1gbit; 0 for none).
    #[arg(long, default_value = "0", value_parser = transfer::parse_rate_limit)]
    rate_limit: u64,
    /// Destination: how long to run the guest after it arrives.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    run_after: Duration,
    /// Destination: do not allocate all guest RAM and the page codec's
    /// state before listening (pages are then allocated as they arrive,
    /// with a page fault each).
    #[arg(long)]
    no_prealloc: bool,
    /// Source: send round 0 through stateless page encoders (its pages
    /// stay out of the codec state that later rounds delta against):
    /// less CPU, faster for an idle guest when the CPU is what limits,
    /// slower when the link is (docs/migration.md).
    #[arg(long)]
    round0_stateless: bool,
    /// One JSON object at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Run the codec demo instead (HDE on the built-in corpus).
    #[arg(long)]
    codec: bool,
    /// Size of the codec demo's built-in corpus.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    size: u64,
    /// Guest RAM of the migration demo.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    ram: u64,
    /// Rate at which the guest dirties memory, MiB/s.
    #[arg(long, default_value_t = 30)]
    dirty: u32,
    /// Move the in-process synthetic guest even where KVM works.
    #[arg(long)]
    synthetic: bool,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// The HDE codec per policy, with `lz4 -b1`, `zstd -b1` and `zstd -b3`
    /// on the same bytes.
    Codec(CodecBenchArgs),
    /// The io_uring engine on loopback: bulk TCP throughput over 1 and N
    /// connections and small-message echo latency, next to plain std::net
    /// sockets and iperf3.
    Engine(EngineBenchArgs),
    /// An AMST session between two network namespaces joined by veth
    /// (optionally limited with tbf), next to `iperf3 -P N` on the same
    /// link. Needs root.
    Transport(TransportBenchArgs),
    /// A live migration of the standard workload guest between two network
    /// namespaces joined by veth (tbf-limited), as two processes.
    Migration(MigrationBenchArgs),
}

#[derive(Debug, Args)]
struct MigrationBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    ram: u64,
    /// Rate at which the guest dirties memory, MiB/s.
    #[arg(long, default_value_t = 30)]
    dirty: u32,
    /// tbf rate of the link (1gbit, 300mbit; 0 for unlimited).
    #[arg(long, default_value = "1gbit", value_parser = transfer::parse_rate_limit)]
    rate: u64,
    /// Downtime limit.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    downtime: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    deadline: Duration,
    /// Page codec policy: datacenter, internet, auto, none.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Data streams: 1..=64, or auto (as `dwcp migrate`).
    #[arg(long, default_value = "2")]
    streams: String,
    /// Timed runs (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Skip the untimed warm-up run.
    #[arg(long)]
    no_warmup: bool,
    /// Send round 0 through stateless page encoders (`dwcp migrate
    /// --round0-stateless`; the C VMM keeps libdwcp's default).
    #[arg(long)]
    round0_stateless: bool,
    /// Also migrate with this C VMM over libdwcp (ffi/examples/kvm_vmm),
    /// alternating runs with `dwcp migrate`, and compare the medians.
    #[arg(long)]
    vmm: Option<std::path::PathBuf>,
    /// One JSON object (the medians) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EngineBenchArgs {
    /// Connections of the multi-connection bulk rows.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    connections: u64,
    /// Engine workers (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
    /// Timed length of each run (50ms, 2s).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,
    /// Bytes per send of the bulk rows (64KiB, 256KiB, 1MiB).
    #[arg(long, value_parser = parse_size, default_value = "256KiB")]
    write_size: u64,
    /// Send with plain sends instead of zero-copy sends.
    #[arg(long)]
    no_zc: bool,
    /// Receive with plain receives instead of a multishot receive.
    #[arg(long)]
    no_multishot: bool,
    /// Engine sends in flight per bulk connection, each with its own buffer.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    in_flight: u64,
    /// Size of each provided receive buffer of the multishot receive.
    #[arg(long, value_parser = parse_size, default_value = "64KiB")]
    recv_buffer_size: u64,
    /// Runs of each measurement, interleaved; medians are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Connections of the echo rows, one message in flight on each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    echo_connections: u64,
    /// Bytes per echo message.
    #[arg(long, value_parser = parse_size, default_value = "64")]
    echo_size: u64,
    /// How long an idle echo-engine worker polls before it sleeps (0: never).
    #[arg(long, value_parser = parse_duration, default_value = "50us")]
    spin: Duration,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CodecBenchArgs {
    /// A memory image (raw pages) to use instead of the synthetic corpus.
    #[arg(long, conflicts_with = "synthetic")]
    input: Option<PathBuf>,
    /// Size of the synthetic corpus (4096, 64KiB, 512MiB, 1GiB).
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    synthetic: u64,
    /// Seed of the synthetic corpus.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Link rate the `auto` policy optimises for (300mbit, 1gbit, 100gbit).
    #[arg(long, value_parser = parse_rate, default_value = "1gbit")]
    link_rate: u64,
    /// Rounds, each measuring every row and running each C reference once; medians are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Size of the written all-zero memory for the zero-scan row (0 skips it).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    zero_scan: u64,
    /// Skip the C lz4 / zstd reference runs.
    #[arg(long)]
    no_references: bool,
    /// ZStd level of the `internet` policy.
    #[arg(long, default_value_t = dwcp_codec::DEFAULT_INTERNET_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=dwcp_codec::MAX_ZSTD_LEVEL as i64))]
    internet_level: i32,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    units::parse_size(s).map_err(|e| e.to_string())
}

fn parse_rate(s: &str) -> Result<u64, String> {
    units::parse_rate(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s).map_err(|e| e.to_string())
}

fn progress(json: bool) -> impl FnMut(&str) {
    let show = !json && std::io::stderr().is_terminal();
    move |msg: &str| {
        if show {
            eprintln!("  .. {msg}");
        }
    }
}

fn bench_codec(a: &CodecBenchArgs) -> Result<()> {
    if a.link_rate == 0 {
        bail!("--link-rate must be a real rate for the auto policy (e.g. 1gbit), not 0");
    }
    let opts = bench_codec::Options {
        input: a.input.clone(),
        synthetic: a.synthetic,
        seed: a.seed,
        link_bps: a.link_rate,
        repeat: a.repeat as usize,
        zero_scan: a.zero_scan,
        references: !a.no_references,
        internet_level: a.internet_level,
        ref_iterations: 3,
    };
    let rows = bench_codec::run(&opts, progress(a.json))?;
    emit(&rows, a.link_rate, a.json);
    Ok(())
}

fn bench_engine(a: &EngineBenchArgs) -> Result<()> {
    if a.duration.is_zero() {
        bail!("--duration must be longer than 0");
    }
    if a.write_size == 0 || a.write_size > 1 << 30 {
        bail!("--write-size must be between 1 byte and 1GiB");
    }
    if a.echo_size == 0 || a.echo_size > 1 << 20 {
        bail!("--echo-size must be between 1 byte and 1MiB");
    }
    let opts = bench_engine::Options {
        connections: a.connections as usize,
        workers: a.workers.map(|w| w as usize),
        duration: a.duration,
        write_size: a.write_size as usize,
        zero_copy: !a.no_zc,
        multishot: !a.no_multishot,
        in_flight: a.in_flight as usize,
        recv_buffer_size: u32::try_from(a.recv_buffer_size)
            .ok()
            .filter(|n| (1..=1 << 24).contains(n))
            .context("--recv-buffer-size must be between 1 byte and 16MiB")?,
        repeat: a.repeat as usize,
        echo_connections: a.echo_connections as usize,
        echo_size: a.echo_size as usize,
        spin: a.spin,
    };
    let report = bench_engine::run(&opts, progress(a.json))?;
    if a.json {
        report.print_json();
    } else {
        report.print_table();
    }
    Ok(())
}

fn bench_transport(a: &TransportBenchArgs) -> Result<()> {
    let opts = bench_transport::Options {
        data: a.data.clone(),
        size: a.size,
        streams: a.streams.clone(),
        modes: a.mode.clone(),
        rate_bps: a.rate,
        repeat: a.repeat as usize,
        workers: a.workers.map(|w| w as usize),
        kill_stream: a.kill_stream.then_some(1.0 / 3.0),
        no_iperf3: a.no_iperf3,
    };
    let report = bench_transport::run(&opts, progress(a.json))?;
    if a.json {
        report.print_json();
    } else {
        report.print_table();
    }
    Ok(())
}

fn bench_migration(a: &MigrationBenchArgs) -> Result<()> {
    let o = bench_migration::Options {
        ram: a.ram,
        dirty: a.dirty,
        rate_bps: a.rate,
        downtime: a.downtime,
        deadline: a.deadline,
        mode: a.mode.clone(),
        streams: a.streams.clone(),
        repeat: a.repeat as usize,
        warmup: !a.no_warmup,
        round0_stateless: a.round0_stateless,
        vmm: a.vmm.clone(),
    };
    let (rust, c) = bench_migration::run(&o, progress(a.json))?;
    let r = bench_migration::summary(&o, bench_migration::Vmm::Rust, &rust);
    if a.json {
        println!("{r}");
    } else {
        bench_migration::print_table(&o, bench_migration::Vmm::Rust, &rust);
    }
    if !c.is_empty() {
        let cs = bench_migration::summary(&o, bench_migration::Vmm::C, &c);
        let cmp = bench_migration::comparison(&r, &cs);
        if a.json {
            println!("{cs}");
            println!("{cmp}");
        } else {
            println!();
            bench_migration::print_table(&o, bench_migration::Vmm::C, &c);
            println!(
                "\nC VMM / dwcp migrate, medians: total {:.3}x ({}), downtime {:.3}x ({}); the floor is within 10% or 3 ms",
                cmp["total_ratio"].as_f64().unwrap_or(f64::NAN),
                if cmp["total_within"] == true {
                    "within"
                } else {
                    "NOT within"
                },
                cmp["downtime_ratio"].as_f64().unwrap_or(f64::NAN),
                if cmp["downtime_within"] == true {
                    "within"
                } else {
                    "NOT within"
                },
            );
        }
    }
    Ok(())
}

fn emit(rows: &[bench_codec::Row], link_bps: u64, json: bool) {
    if json {
        for r in rows {
            println!("{}", r.to_json(link_bps));
        }
    } else {
        bench_codec::print_table(rows, link_bps);
    }
}

fn demo(a: &DemoArgs) -> Result<()> {
    if !a.codec {
        return demo::run(&demo::DemoOptions {
            ram: usize::try_from(a.ram).context("--ram")?,
            dirty: a.dirty,
            json: a.json,
            synthetic: a.synthetic,
        });
    }
    if !a.json {
        println!("dwcp demo --codec: the codec demo.");
        println!(
            "HDE encodes {} of built-in synthetic memory (50% zero, 20% text, 20% code, 10% random pages),",
            units::format_size(a.size)
        );
        println!(
            "then a second version of it with counters changed in every non-zero page, under each policy;"
        );
        println!("every decoded page is checked against the original.\n");
    }
    let opts = bench_codec::Options {
        input: None,
        synthetic: a.size,
        seed: 1,
        link_bps: 1_000_000_000,
        repeat: 1,
        zero_scan: a.size,
        references: true,
        internet_level: dwcp_codec::DEFAULT_INTERNET_LEVEL,
        ref_iterations: 1,
    };
    let rows = bench_codec::run(&opts, progress(a.json))?;
    emit(&rows, opts.link_bps, a.json);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Cmd::Demo(a) => demo(a),
        Cmd::Bench(BenchCmd::Codec(a)) => bench_codec(a),
        Cmd::Bench(BenchCmd::Engine(a)) => bench_engine(a),
        Cmd::Bench(BenchCmd::Transport(a)) => bench_transport(a),
        Cmd::Bench(BenchCmd::Migration(a)) => bench_migration(a),
        Cmd::BenchPeer(BenchPeerCmd::Recv(a)) => {
            bench_transport::recv_peer(&bench_transport::RecvPeer {
                listen: a.listen.clone(),
                key: a.key.clone(),
                limit: a.limit,
                timeout: a.timeout,
                workers: a.workers.map(|w| w as usize),
            })
        }
        Cmd::BenchPeer(BenchPeerCmd::Send(a)) => {
            bench_transport::send_peer(&bench_transport::SendPeer {
                to: a.to.clone(),
                key: a.key.clone(),
                data: a.data.clone(),
                size: a.size,
                streams: a.streams,
                mode: a.mode.clone(),
                link_rate: a.link_rate,
                kill_stream_at: a.kill_stream_at,
                workers: a.workers.map(|w| w as usize),
            })
        }
        Cmd::Keygen(a) => transfer::keygen(&a.file),
        Cmd::Migrate(a) => transfer::key_from(a.auth.key.as_deref(), a.auth.insecure_no_auth)
            .and_then(|key| {
                migrate::run(&migrate::MigrateOptions {
                    to: a.to.clone(),
                    incoming: a.incoming.clone(),
                    key,
                    ram: a.ram,
                    dirty: a.dirty,
                    downtime: a.downtime,
                    deadline: a.deadline,
                    streams: a.streams,
                    mode: a.mode.clone(),
                    rate_limit_bps: a.rate_limit,
                    run_after: a.run_after,
                    prealloc: !a.no_prealloc,
                    round0_stateless: a.round0_stateless,
                    json: a.json,
                })
            }),
        Cmd::Serve(a) => transfer::key_from(a.auth.key.as_deref(), a.auth.insecure_no_auth)
            .and_then(|key| transfer::serve(&a.listen, &a.dir, key, a.workers.map(|w| w as usize))),
        Cmd::Send(a) => transfer::key_from(a.auth.key.as_deref(), a.auth.insecure_no_auth)
            .and_then(|key| {
                transfer::send(&transfer::SendOptions {
                    paths: a.paths.clone(),
                    stdin_name: a.name.clone(),
                    to: a.to.clone(),
                    key,
                    streams: a.streams,
                    mode: a.mode.clone(),
                    rate_limit_bps: a.rate_limit,
                    json: a.json,
                    workers: a.workers.map(|w| w as usize),
                })
            }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwcp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
