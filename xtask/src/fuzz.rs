//! `cargo xtask fuzz`: the seeded stream fuzzer over dist/ in the harness (`fuzz/streams`), and
//! on demand the coverage-guided parser targets (`fuzz/parsers`, cargo fuzz on nightly).

use std::path::{Path, PathBuf};

use crate::error::{bail, Error, Result};
use crate::process::{is_executable, Cmd};
use crate::workspace::Workspace;
use crate::{build, test};

pub const HELP: &str = "\
cargo xtask fuzz [--streams N] [--seed S] [--threads T] [--no-build]
cargo xtask fuzz --seed S --config NAME --stream I         replay one stream, verbosely
cargo xtask fuzz --list                                    the configurations
cargo xtask fuzz --parsers [--time 60s] [--target NAME]    coverage-guided parser targets

Streams: builds dist/ (unless --no-build), then drives N random and hostile streams (default
1,000,000, shared evenly between the configurations) through every module in dist/ in the
harness (fuzz/streams, built in release), on T threads (default: every core), and checks
each stream: no trap, no forged claim under peer_trust mtls or none, x-eastwest-peer never to
the caller's app, other baggage members byte for byte, series, budgets, shared-data keys and
memory within their caps. A failure prints the seed, the stream and the command that replays
it. Seed default 1: the same seed runs the same streams.

Parsers: cargo fuzz (libFuzzer, nightly toolchain) on the pure parsers, each target for
--time (default 60s): baggage, peer_metadata, attempt_headers, cluster_names, configuration,
peer_trust (or only --target). Seeds are in fuzz/parsers/corpus/<target>/ (committed); what a
run finds goes to fuzz/parsers/corpus-work/<target>/, crashes to fuzz/parsers/artifacts/.
cargo-fuzz is installed into .eastwest/tools/ on first use.

See docs/fuzzing.md.
";

/// The parser targets, in the order they run.
pub const PARSER_TARGETS: [&str; 6] = [
    "baggage",
    "peer_metadata",
    "attempt_headers",
    "cluster_names",
    "configuration",
    "peer_trust",
];

/// The seeded pass `cargo xtask test` runs: every configuration, a thousand streams each, in the
/// debug build the unit tests already compiled (well within a minute).
pub const TEST_STREAMS: &str = "25000";
pub const TEST_SEED: &str = "20261130";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Arguments for the stream fuzzer (everything but --no-build).
    streams_args: Vec<String>,
    no_build: bool,
    parsers: bool,
    seconds: u64,
    target: Option<String>,
}

pub fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut options = Options {
        seconds: 60,
        ..Options::default()
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| Error::msg(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--no-build" => options.no_build = true,
            "--parsers" => options.parsers = true,
            "--time" => options.seconds = parse_seconds(&value("--time")?)?,
            "--target" => {
                let target = value("--target")?;
                if !PARSER_TARGETS.contains(&target.as_str()) {
                    bail!("no parser target {target:?}: {}", PARSER_TARGETS.join(", "));
                }
                options.target = Some(target);
            }
            "--streams" | "--seed" | "--threads" | "--config" | "--stream" => {
                let value = value(arg)?;
                options.streams_args.extend([arg.clone(), value]);
            }
            "--list" | "--quiet" => options.streams_args.push(arg.clone()),
            other => bail!("`cargo xtask fuzz` has no option {other:?}\n\n{HELP}"),
        }
    }
    if options.parsers && !options.streams_args.is_empty() {
        bail!("--parsers takes only --time and --target");
    }
    Ok(Some(options))
}

/// `60`, `60s`, `5m`, `1h`.
fn parse_seconds(text: &str) -> Result<u64> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bail!("--time {text:?}: a number of seconds, or with s, m or h"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| Error::msg(format!("--time {text:?}: not a duration")))?;
    Ok(number * factor)
}

pub fn fuzz(ws: &Workspace, options: &Options) -> Result<()> {
    if options.parsers {
        return fuzz_parsers(ws, options);
    }
    let replaying = options.streams_args.iter().any(|arg| arg == "--stream");
    let listing = options.streams_args.iter().any(|arg| arg == "--list");
    if !options.no_build && !replaying && !listing {
        build::build_wasm_modules(ws)?;
    }
    streams(ws, "--release", &options.streams_args)
}

/// Runs the stream fuzzer (`profile`: `--release`, or empty for the debug build).
pub fn streams(ws: &Workspace, profile: &str, args: &[String]) -> Result<()> {
    Cmd::cargo()
        .args(["run", "-q"])
        .args((!profile.is_empty()).then_some(profile))
        .args(["-p", "eastwest-fuzz-streams", "--", "--dist"])
        .arg(ws.dist_dir())
        .args(args)
        .env("EASTWEST_HARNESS_CACHE", test::harness_cache(ws))
        .current_dir(&ws.root)
        .run()
        .map_err(|e| Error::msg(format!("the stream fuzzer failed: {e}")))
}

fn fuzz_parsers(ws: &Workspace, options: &Options) -> Result<()> {
    let cargo_fuzz = cargo_fuzz(ws)?;
    let fuzz_dir = ws.root.join("fuzz").join("parsers");
    let targets: Vec<&str> = match &options.target {
        Some(target) => vec![target.as_str()],
        None => PARSER_TARGETS.to_vec(),
    };
    for target in targets {
        let seeds = fuzz_dir.join("corpus").join(target);
        let work = fuzz_dir.join("corpus-work").join(target);
        std::fs::create_dir_all(&work)
            .map_err(|e| Error::msg(format!("{}: {e}", work.display())))?;
        println!(
            "\n==> cargo fuzz run {target} for {}s (seeds: {})",
            options.seconds,
            relative(ws, &seeds).display()
        );
        // The working corpus comes first: libFuzzer writes what it finds there, never into the
        // committed seeds.
        Cmd::new(&cargo_fuzz)
            .args(["run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .current_dir(&ws.root)
            .run()
            .map_err(|e| {
                Error::msg(format!(
                    "cargo fuzz found a failure in {target} (the input is under \
                     fuzz/parsers/artifacts/{target}/): {e}"
                ))
            })?;
    }
    Ok(())
}

fn relative<'a>(ws: &Workspace, path: &'a Path) -> &'a Path {
    path.strip_prefix(&ws.root).unwrap_or(path)
}

/// `cargo-fuzz` from .eastwest/tools, installed there from crates.io on first use. It runs
/// directly (`cargo-fuzz run ...`, not through cargo, which would not look in .eastwest/tools)
/// with `RUSTUP_TOOLCHAIN=nightly`, so the cargo it starts builds with nightly.
fn cargo_fuzz(ws: &Workspace) -> Result<PathBuf> {
    let root = ws.local_tools_dir().join("tools");
    let binary = root.join("bin").join("cargo-fuzz");
    if !is_executable(&binary) {
        println!(
            "The parser targets run under cargo-fuzz; installing it into .eastwest/tools \
             (project-local, git-ignored; compiles from source once: a few minutes)."
        );
        Cmd::cargo()
            .args(["install", "--locked", "cargo-fuzz", "--root"])
            .arg(&root)
            .current_dir(&ws.root)
            .run()?;
    }
    let nightly = Cmd::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.is_ok_and(|output| output.status.success()) {
        bail!(
            "cargo fuzz needs the nightly toolchain (libFuzzer's sanitizer flags): \
             `rustup toolchain install nightly`"
        );
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn stream_options_pass_through_and_parsers_take_a_time() {
        let options = parse(&["--streams", "1e6", "--seed", "7"])
            .unwrap()
            .unwrap();
        assert_eq!(options.streams_args, ["--streams", "1e6", "--seed", "7"]);
        assert!(!options.parsers);
        let options = parse(&["--parsers", "--time", "2m"]).unwrap().unwrap();
        assert!(options.parsers);
        assert_eq!(options.seconds, 120);
        assert!(parse(&["--parsers", "--streams", "5"]).is_err());
        assert!(parse(&["--parsers", "--target", "nope"]).is_err());
        assert!(parse(&["--fast"]).is_err());
        assert_eq!(parse(&["--help"]).unwrap(), None);
    }

    #[test]
    fn durations_read_as_seconds() {
        assert_eq!(parse_seconds("60").unwrap(), 60);
        assert_eq!(parse_seconds("45s").unwrap(), 45);
        assert_eq!(parse_seconds("1h").unwrap(), 3600);
        assert!(parse_seconds("soon").is_err());
    }
}
