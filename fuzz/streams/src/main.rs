//! `cargo xtask fuzz`: seeded, replayable random and hostile streams through every module in
//! `dist/` (the three filters and `eastwest.wasm`), in the harness, in several configurations
//! each, with the project's security and boundedness properties checked on every stream.
//!
//! Each configuration runs its streams in batches; a batch is one fresh harness (its VMs, shared
//! data and metrics) fed streams `batch * BATCH .. (batch + 1) * BATCH`, each stream generated
//! from `(seed, configuration, stream index)` alone. So any stream can be replayed exactly: run
//! its batch up to it (`--config NAME --stream I`).

mod check;
mod configs;
mod generate;
mod rng;
mod wasm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use configs::FuzzConfig;

/// Streams per harness: enough for every tiny cap to overflow many times over, few enough that
/// replaying one stream (its batch up to it) takes a fraction of a second.
pub const BATCH: u64 = 4096;

/// Bounds (series, budgets, shared-data keys) are checked after every this many streams of a
/// batch and at its end; the other properties after every stream.
pub const BOUNDS_EVERY: u64 = 64;

const HELP: &str = "\
eastwest-fuzz-streams [--streams N] [--seed S] [--threads T] [--dist DIR] [--quiet]
                      [--memory-cap-pages P]   (each VM's memory maximum; default 512 = 32 MiB)
eastwest-fuzz-streams --seed S --config NAME --stream I      (replay one stream, verbosely)
eastwest-fuzz-streams --list                                 (the configurations)

Random and hostile streams through every module in DIR (default dist/) in the harness, in
several configurations each; each stream is checked (see docs/fuzzing.md). N is the total
(default 1,000,000), shared evenly between the configurations of the modules found.
";

struct Args {
    streams: u64,
    seed: u64,
    threads: usize,
    dist: PathBuf,
    config: Option<String>,
    stream: Option<u64>,
    list: bool,
    quiet: bool,
    memory_cap_pages: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        streams: 1_000_000,
        seed: 1,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        dist: PathBuf::from("dist"),
        config: None,
        stream: None,
        list: false,
        quiet: false,
        memory_cap_pages: wasm::MEMORY_CAP_PAGES,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--streams" => args.streams = parse_count(&value("--streams")?)?,
            "--seed" => args.seed = parse_count(&value("--seed")?)?,
            "--threads" => args.threads = parse_count(&value("--threads")?)?.max(1) as usize,
            "--dist" => args.dist = PathBuf::from(value("--dist")?),
            "--config" => args.config = Some(value("--config")?),
            "--stream" => args.stream = Some(parse_count(&value("--stream")?)?),
            "--list" => args.list = true,
            "--quiet" => args.quiet = true,
            "--memory-cap-pages" => {
                args.memory_cap_pages = parse_count(&value("--memory-cap-pages")?)?
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}\n\n{HELP}")),
        }
    }
    if args.config.is_some() != args.stream.is_some() {
        return Err("--config and --stream go together (they name the stream to replay)".into());
    }
    Ok(args)
}

/// `1000000`, `1_000_000`, `1e6`, `0x2a`.
fn parse_count(text: &str) -> Result<u64, String> {
    let clean = text.replace('_', "");
    let parsed = if let Some(hex) = clean.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else if let Some((mantissa, exponent)) = clean.split_once(['e', 'E']) {
        match (mantissa.parse::<u64>(), exponent.parse::<u32>()) {
            (Ok(m), Ok(e)) => 10u64.checked_pow(e).and_then(|p| p.checked_mul(m)),
            _ => None,
        }
    } else {
        clean.parse().ok()
    };
    parsed.ok_or(format!("{text:?} is not a count"))
}

/// What one batch found.
#[derive(Default)]
struct Tally {
    streams: u64,
    bound_checks: u64,
    local_replies: u64,
    max_instructions: u64,
    /// The largest linear memory of any VM at a bound check, in bytes.
    max_memory: usize,
}

/// A property that did not hold.
pub struct Failure {
    pub stream: u64,
    pub what: String,
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("eastwest-fuzz-streams: {error}");
            std::process::exit(2);
        }
    };
    let configs = configs::available(&args.dist);
    if configs.is_empty() {
        eprintln!(
            "eastwest-fuzz-streams: no module in {} (run `cargo xtask build`)",
            args.dist.display()
        );
        std::process::exit(2);
    }
    if args.list {
        for config in &configs {
            let then: Vec<String> = config
                .then
                .iter()
                .map(|(module, json)| format!(" -> {module} {json}"))
                .collect();
            println!(
                "{:<44} {} {}{}",
                config.name,
                config.module,
                config.config,
                then.concat()
            );
        }
        return;
    }
    if let (Some(name), Some(stream)) = (&args.config, args.stream) {
        std::process::exit(replay(&args, &configs, name, stream));
    }
    std::process::exit(run(&args, &configs));
}

fn replay(args: &Args, configs: &[FuzzConfig], name: &str, stream: u64) -> i32 {
    let Some((index, config)) = configs.iter().enumerate().find(|(_, c)| c.name == name) else {
        eprintln!("eastwest-fuzz-streams: no configuration {name:?} (see --list)");
        return 2;
    };
    let batch = stream / BATCH;
    println!(
        "replaying stream {stream} of {name} (seed {}): streams {}..={stream} of its batch, bounds \
         checked after every stream",
        args.seed,
        batch * BATCH
    );
    let wasm = match wasm::load(&args.dist, config, args.memory_cap_pages) {
        Ok(wasm) => wasm,
        Err(error) => {
            eprintln!("{error}");
            return 2;
        }
    };
    let outcome = run_batch(
        args.seed,
        index,
        config,
        &wasm,
        batch * BATCH..stream + 1,
        Some(stream),
        1,
    );
    match outcome {
        Ok(_) => {
            println!("stream {stream} of {name}: every property holds");
            0
        }
        Err(failure) => {
            println!(
                "stream {} of {name} FAILED: {}",
                failure.stream, failure.what
            );
            1
        }
    }
}

/// One unit of work: a configuration's batch.
struct Unit {
    config: usize,
    batch: u64,
    streams: std::ops::Range<u64>,
}

fn run(args: &Args, configs: &[FuzzConfig]) -> i32 {
    let per_config = args.streams.div_ceil(configs.len() as u64);
    let mut units = Vec::new();
    for (index, _) in configs.iter().enumerate() {
        let mut start = 0;
        while start < per_config {
            let end = (start + BATCH).min(per_config);
            units.push(Unit {
                config: index,
                batch: start / BATCH,
                streams: start..end,
            });
            start = end;
        }
    }
    // Interleave configurations so both threads stay busy until the end.
    units.sort_by_key(|unit| (unit.batch, unit.config));
    println!(
        "eastwest-fuzz-streams: seed {}, {} configurations of {} modules, {per_config} streams \
         each ({} in all), {} threads",
        args.seed,
        configs.len(),
        configs
            .iter()
            .flat_map(FuzzConfig::modules)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        per_config * configs.len() as u64,
        args.threads
    );
    let wasm: Vec<Vec<Vec<u8>>> = match configs
        .iter()
        .map(|config| wasm::load(&args.dist, config, args.memory_cap_pages))
        .collect::<Result<_, _>>()
    {
        Ok(wasm) => wasm,
        Err(error) => {
            eprintln!("{error}");
            return 2;
        }
    };
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    // A configuration that failed runs no more batches; the others go on.
    let failed: Vec<AtomicBool> = configs.iter().map(|_| AtomicBool::new(false)).collect();
    let tallies: Mutex<Vec<Tally>> = Mutex::new(configs.iter().map(|_| Tally::default()).collect());
    let failures: Mutex<Vec<(usize, Failure)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            scope.spawn(|| loop {
                let Some(unit) = units.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                if failed[unit.config].load(Ordering::Relaxed) {
                    continue;
                }
                let config = &configs[unit.config];
                match run_batch(
                    args.seed,
                    unit.config,
                    config,
                    &wasm[unit.config],
                    unit.streams.clone(),
                    None,
                    BOUNDS_EVERY,
                ) {
                    Ok(tally) => {
                        let mut tallies = tallies.lock().unwrap();
                        let total = &mut tallies[unit.config];
                        total.streams += tally.streams;
                        total.bound_checks += tally.bound_checks;
                        total.local_replies += tally.local_replies;
                        total.max_instructions = total.max_instructions.max(tally.max_instructions);
                        total.max_memory = total.max_memory.max(tally.max_memory);
                    }
                    Err(failure) => {
                        failed[unit.config].store(true, Ordering::Relaxed);
                        failures.lock().unwrap().push((unit.config, failure));
                    }
                }
            });
        }
    });
    let took = started.elapsed();
    let tallies = tallies.into_inner().unwrap();
    let mut failures = failures.into_inner().unwrap();
    // The first failure of each configuration (two threads may each have found one).
    failures.sort_by_key(|(config, failure)| (*config, failure.stream));
    failures.dedup_by_key(|(config, _)| *config);
    if !args.quiet || !failures.is_empty() {
        println!(
            "\n{:<44} {:<13} {:>7} {:>6} {:>12} {:>10} {:>14} {:>12}",
            "configuration",
            "module",
            "streams",
            "traps",
            "bound checks",
            "local 503",
            "max instr/str",
            "max VM MiB"
        );
        for (config, tally) in configs.iter().zip(&tallies) {
            println!(
                "{:<44} {:<13} {:>7} {:>6} {:>12} {:>10} {:>14} {:>12.1}",
                config.name,
                if config.then.is_empty() {
                    config.module
                } else {
                    "chain"
                },
                tally.streams,
                failures
                    .iter()
                    .filter(|(c, f)| configs[*c].name == config.name && f.what.starts_with("trap"))
                    .count(),
                tally.bound_checks,
                tally.local_replies,
                tally.max_instructions,
                tally.max_memory as f64 / (1024.0 * 1024.0)
            );
        }
    }
    let streams: u64 = tallies.iter().map(|t| t.streams).sum();
    let bound_checks: u64 = tallies.iter().map(|t| t.bound_checks).sum();
    let traps = failures
        .iter()
        .filter(|(_, failure)| failure.what.starts_with("trap"))
        .count();
    println!(
        "\n{streams} streams in {:.1}s ({:.0} streams/s), seed {}: {} failures ({traps} traps), \
         {bound_checks} bound checks",
        took.as_secs_f64(),
        streams as f64 / took.as_secs_f64().max(1e-9),
        args.seed,
        failures.len()
    );
    for (config, failure) in &failures {
        let name = &configs[*config].name;
        println!(
            "\nFAILED: seed {} configuration {name} stream {}: {}\nreplay: cargo xtask fuzz --seed {} \
             --config {name} --stream {}",
            args.seed, failure.stream, failure.what, args.seed, failure.stream
        );
    }
    if failures.is_empty() {
        0
    } else {
        1
    }
}

fn print_headers(title: &str, message: Option<&eastwest_harness::Message>) {
    println!("{title}:");
    match message {
        None => println!("  (none)"),
        Some(message) => {
            for (name, value) in &message.headers {
                println!(
                    "  {}: {:?}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value)
                );
            }
        }
    }
}

fn print_input(input: &generate::StreamInput) {
    println!(
        "worker {}, {:?}; the certificate proves namespace {:?}",
        input.worker, input.direction, input.proven_namespace
    );
    println!("per-stream attributes: {}", input.properties);
    print_headers("request", Some(&input.request));
    print_headers("upstream answer", Some(&input.response));
}

fn print_result(result: &eastwest_harness::StreamResult) {
    print_headers("reached the upstream", result.upstream_request.as_ref());
    print_headers("the client got", result.downstream_response.as_ref());
    if let Some(reply) = &result.local_reply {
        println!("local reply: {} {:?}", reply.status, reply.details);
    }
    for line in &result.logs {
        println!("log {}: {}", line.level, line.message);
    }
    println!("{} instructions", result.instructions);
}

/// Runs `streams` (all of one batch) through a fresh harness for `config`; the first property
/// that does not hold ends it. `verbose`: the stream to print in full.
fn run_batch(
    seed: u64,
    config_index: usize,
    config: &FuzzConfig,
    wasm: &[Vec<u8>],
    streams: std::ops::Range<u64>,
    verbose: Option<u64>,
    bounds_every: u64,
) -> Result<Tally, Failure> {
    let mut h = config.harness(wasm).map_err(|error| Failure {
        stream: streams.start,
        what: format!("the harness refused the module or its configuration: {error}"),
    })?;
    let mut tally = Tally::default();
    let end = streams.end;
    for stream in streams {
        let mut rng = rng::Rng::for_stream(seed, config_index as u64, stream);
        let input = generate::stream(&mut rng, config, stream);
        if verbose == Some(stream) {
            print_input(&input);
        }
        let id = h.run(
            input.worker,
            Some(&input.properties),
            input.request.clone(),
            Some((input.response.clone(), 0)),
        );
        let result = h.result(id);
        if verbose == Some(stream) {
            print_result(&result);
        }
        tally.streams += 1;
        tally.max_instructions = tally.max_instructions.max(result.instructions);
        if result.local_reply.is_some() {
            tally.local_replies += 1;
        }
        check::stream(config, &h, &input, &result).map_err(|what| Failure { stream, what })?;
        let last = stream + 1 == end;
        if (stream + 1) % bounds_every == 0 || last {
            tally.bound_checks += 1;
            check::bounds(config, &h).map_err(|what| Failure { stream, what })?;
            let largest = h.memory_sizes().into_iter().max().unwrap_or(0);
            tally.max_memory = tally.max_memory.max(largest);
        }
    }
    Ok(tally)
}
