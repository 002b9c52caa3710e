//! `eastwest-harness run [FILTER.wasm] --scenario SCENARIO.yaml [--config CONFIG.json]
//! [--workers N] [--root-id ID] [--prometheus]`
//! `eastwest-harness profile FILTER.wasm --scenario SCENARIO.yaml [--config CONFIG.json]
//! [--out PATH] [--top N] [--warmup N] [--all] [--workers N] [--root-id ID]`
//! `eastwest-harness bench [--modules DIR] [--requests N] [--config NAME=JSON]... [--json PATH]`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use eastwest_harness::profile::ProfileScope;
use eastwest_harness::scenario::{self, Overrides, Scenario};

const USAGE: &str = "usage: eastwest-harness run [FILTER.wasm] --scenario SCENARIO.yaml \
[--config CONFIG.json] [--workers N] [--root-id ID] [--prometheus]
         FILTER.wasm is left out when the scenario lists a chain (plugins:)
       eastwest-harness profile FILTER.wasm --scenario SCENARIO.yaml [--config CONFIG.json]
         [--out PATH] [--top N] [--warmup N] [--all] [--workers N] [--root-id ID]
         the functions that execute the most wasm instructions in the scenario's streams (exact
         counts, self and inclusive), and a folded-stacks file for flame graphs (default
         target/profile/<module>.<scenario>.folded, or next to the scenario without ./target)
       eastwest-harness bench [--modules DIR] [--requests N] [--config NAME=JSON]... [--json PATH]
         requests per second through a no-op filter on one core, then for every DIR/*.wasm
         (default dist/), outbound and inbound, wasm instructions per typical request (median
         and maximum over the run, and per callback) against DESIGN.md's targets
       eastwest-harness schema
         the JSON schema of scenario files (harness/scenario.schema.json)";

/// Requests timed through the no-op filter by default (a quarter of that through each module).
const DEFAULT_BENCH_REQUESTS: usize = 20_000;
/// Functions listed by `profile` by default.
const DEFAULT_TOP: usize = 25;

/// Writes a command's document to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Exit codes: 0 success, 1 a guest trap, 2 usage or bad scenario, 3 bad module or start failure.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("eastwest-harness: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn usage(message: &str) -> Failure {
    (2, format!("{message}\n{USAGE}"))
}

fn run(args: &[String]) -> Result<ExitCode, Failure> {
    match args.first().map(String::as_str) {
        Some("run") => run_scenario(&args[1..]),
        Some("profile") => profile(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("schema") if args.len() == 1 => {
            let text = serde_json::to_string_pretty(&scenario::schema())
                .map_err(|e| (3, e.to_string()))?;
            emit(&format!("{text}\n"));
            Ok(ExitCode::SUCCESS)
        }
        Some("-h" | "--help") | None => Err(usage("")),
        Some(other) => Err(usage(&format!("unknown command {other:?}"))),
    }
}

/// What `run` and `profile` share: the module, the scenario and the overrides.
struct ScenarioArgs {
    /// None when the scenario lists its `plugins`.
    wasm_path: Option<String>,
    scenario_path: String,
    overrides: Overrides,
    /// Flags the command handles itself, with their values.
    extra: Vec<(String, Option<String>)>,
}

/// Parses `FILTER.wasm --scenario S [--config C] [--workers N] [--root-id ID]` plus the
/// command's own flags (`flags`: name, whether it takes a value).
fn scenario_args(args: &[String], flags: &[(&str, bool)]) -> Result<ScenarioArgs, Failure> {
    let (mut wasm, mut scenario_path, mut overrides, mut extra) =
        (None, None, Overrides::default(), Vec::new());
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--scenario" => scenario_path = Some(value("--scenario")?),
            "--config" => {
                let path = value("--config")?;
                let text =
                    std::fs::read(&path).map_err(|e| (2, format!("cannot read {path}: {e}")))?;
                overrides.config = Some(text);
            }
            "--workers" => {
                let text = value("--workers")?;
                overrides.workers = Some(
                    text.parse()
                        .map_err(|_| usage(&format!("--workers: not a number: {text}")))?,
                );
            }
            "--root-id" => overrides.root_id = Some(value("--root-id")?),
            other => match flags.iter().find(|(name, _)| *name == other) {
                Some((name, true)) => extra.push((name.to_string(), Some(value(name)?))),
                Some((name, false)) => extra.push((name.to_string(), None)),
                None if !other.starts_with("--") && wasm.is_none() => {
                    wasm = Some(other.to_string())
                }
                None => return Err(usage(&format!("unknown argument {other:?}"))),
            },
        }
    }
    Ok(ScenarioArgs {
        wasm_path: wasm,
        scenario_path: scenario_path.ok_or_else(|| usage("missing --scenario"))?,
        overrides,
        extra,
    })
}

/// The module (None when the scenario lists `plugins`), the chain, and the scenario.
type Loaded = (Option<Vec<u8>>, Vec<eastwest_harness::Plugin>, Scenario);

fn load(args: &ScenarioArgs) -> Result<Loaded, Failure> {
    let path = &args.scenario_path;
    let text =
        std::fs::read_to_string(path).map_err(|e| (2, format!("cannot read {path}: {e}")))?;
    let scenario = scenario::parse(&text).map_err(|e| (2, format!("{path}: {e}")))?;
    let bytes = match &args.wasm_path {
        Some(wasm) => {
            Some(std::fs::read(wasm).map_err(|e| (3, format!("cannot read {wasm}: {e}")))?)
        }
        None if scenario.plugins.is_empty() => {
            return Err(usage("missing FILTER.wasm (or plugins in the scenario)"))
        }
        None => None,
    };
    let base = Path::new(path).parent().unwrap_or(Path::new("."));
    let plugins = scenario::load_plugins(&scenario, base).map_err(run_failure)?;
    Ok((bytes, plugins, scenario))
}

fn run_failure(e: eastwest_harness::HarnessError) -> Failure {
    let code = if e.0.starts_with("bad scenario") {
        2
    } else {
        3
    };
    (code, e.0)
}

fn trap_failure(traps: &[eastwest_harness::TrapRecord]) -> Result<ExitCode, Failure> {
    match traps.first() {
        Some(trap) => Err((
            1,
            format!(
                "the filter trapped in {} on worker {}: {}",
                trap.callback, trap.worker, trap.message
            ),
        )),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn run_scenario(args: &[String]) -> Result<ExitCode, Failure> {
    let args = scenario_args(args, &[("--prometheus", false)])?;
    let prometheus = !args.extra.is_empty();
    let (bytes, plugins, scenario) = load(&args)?;
    let (harness, output) =
        scenario::run_chain(bytes.as_deref(), plugins, &scenario, args.overrides)
            .map_err(run_failure)?;
    if prometheus {
        let tags: Vec<(String, String)> = scenario
            .stats_tags
            .iter()
            .map(|t| (t.tag_name.clone(), t.regex.clone()))
            .collect();
        emit(&harness.prometheus(&tags).map_err(|e| (2, e.0))?);
    } else {
        let text = serde_json::to_string_pretty(&output).map_err(|e| (3, e.to_string()))?;
        emit(&format!("{text}\n"));
    }
    trap_failure(&output.traps)
}

fn file_stem(path: &str) -> String {
    Path::new(path)
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "profile".into())
}

/// `target/profile/<module>.<scenario>.folded` when the current directory has a `target/`
/// (a cargo workspace), else `<module>.<scenario>.folded` next to the scenario.
fn default_profile_path(wasm_path: &str, scenario_path: &str) -> PathBuf {
    let file = format!(
        "{}.{}.folded",
        file_stem(wasm_path),
        file_stem(scenario_path)
    );
    if Path::new("target").is_dir() {
        Path::new("target").join("profile").join(file)
    } else {
        Path::new(scenario_path)
            .parent()
            .unwrap_or(Path::new("."))
            .join(file)
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn profile(args: &[String]) -> Result<ExitCode, Failure> {
    let mut args = scenario_args(
        args,
        &[
            ("--out", true),
            ("--top", true),
            ("--warmup", true),
            ("--all", false),
        ],
    )?;
    let (mut out, mut top, mut warmup, mut scope) =
        (None, DEFAULT_TOP, 0usize, ProfileScope::Streams);
    for (flag, value) in std::mem::take(&mut args.extra) {
        let value = value.unwrap_or_default();
        let number = |value: &str| {
            value
                .parse::<usize>()
                .map_err(|_| usage(&format!("{flag}: not a number: {value}")))
        };
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(value)),
            "--top" => top = number(&value)?,
            "--warmup" => warmup = number(&value)?,
            _ => scope = ProfileScope::Everything,
        }
    }
    let (bytes, _, scenario) = load(&args)?;
    let (Some(bytes), Some(wasm_path)) = (bytes, args.wasm_path.clone()) else {
        return Err(usage(
            "profile needs FILTER.wasm: a profile is of one module (profile a chain's modules one at a time)",
        ));
    };
    if warmup > 0 && warmup >= scenario.streams.len() {
        return Err(usage(&format!(
            "--warmup {warmup}: the scenario has {} streams, so none would be profiled",
            scenario.streams.len()
        )));
    }
    let out = out.unwrap_or_else(|| default_profile_path(&wasm_path, &args.scenario_path));
    args.overrides.profile = Some(scope);
    args.overrides.profile_warmup = warmup;
    let (harness, output) =
        scenario::run(&bytes, &scenario, args.overrides).map_err(run_failure)?;
    let profile = harness
        .profile()
        .ok_or_else(|| (3, "the harness kept no profile".to_string()))?;
    let streams = &output.streams[warmup..];
    let stream_instructions: u64 = streams.iter().map(|s| s.instructions).sum();
    let total = profile.total();
    println!(
        "eastwest-harness profile: {} with {}",
        wasm_path, args.scenario_path
    );
    let warmed = if warmup > 0 {
        format!(" after {}", plural(warmup, "warm-up stream"))
    } else {
        String::new()
    };
    let profiled = plural(streams.len(), "stream");
    match scope {
        ProfileScope::Streams => println!(
            "{profiled}{warmed}: {total} instructions (the sum of their `instructions`: \
             {stream_instructions})"
        ),
        ProfileScope::Everything => println!(
            "every callback{warmed}: {total} instructions ({profiled}: {stream_instructions})"
        ),
    }
    let callbacks: Vec<String> = profile
        .callbacks
        .iter()
        .map(|(name, cost)| format!("{name} {} ({}x)", cost.instructions, cost.calls))
        .collect();
    println!("by callback: {}", callbacks.join(", "));
    println!();
    print!("{}", profile.table(top));
    if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| (2, format!("cannot create {}: {e}", dir.display())))?;
    }
    std::fs::write(&out, profile.folded())
        .map_err(|e| (2, format!("cannot write {}: {e}", out.display())))?;
    println!(
        "\nfolded stacks: {} (flamegraph.pl, inferno-flamegraph, speedscope)",
        out.display()
    );
    trap_failure(&output.traps)
}

fn bench(args: &[String]) -> Result<ExitCode, Failure> {
    let mut settings = eastwest_harness::bench::Settings {
        requests: DEFAULT_BENCH_REQUESTS,
        configs: BTreeMap::new(),
    };
    let (mut modules, mut json_path) = ("dist".to_string(), None);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--modules" => modules = value("--modules")?,
            "--requests" => {
                let text = value("--requests")?;
                settings.requests =
                    text.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        usage(&format!("--requests: not a positive number: {text}"))
                    })?;
            }
            "--config" => {
                let text = value("--config")?;
                let (name, config) = text
                    .split_once('=')
                    .filter(|(name, _)| !name.is_empty())
                    .ok_or_else(|| usage(&format!("--config: not NAME=JSON: {text}")))?;
                settings
                    .configs
                    .insert(name.to_string(), config.to_string());
            }
            "--json" => json_path = Some(value("--json")?),
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "eastwest-harness: a debug build: requests/s are far below a release build's \
             (instructions/request are the same)"
        );
    }
    let report = eastwest_harness::bench::run(Path::new(&modules), &settings).map_err(|e| {
        let code = if e.0.starts_with("--config") { 2 } else { 3 };
        (code, e.0)
    })?;
    println!(
        "eastwest-harness: one worker on one core; {} requests through the no-op filter, then \
         for each module in {modules}/ and direction {} warm-up requests and {} counted \
         (the same typical request)",
        settings.requests,
        eastwest_harness::bench::WARMUP_REQUESTS,
        (settings.requests / 4).max(1)
    );
    print!("{}", eastwest_harness::bench::table(&report));
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report).map_err(|e| (3, e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| (2, format!("cannot write {path}: {e}")))?;
    }
    Ok(ExitCode::SUCCESS)
}
