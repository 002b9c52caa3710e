//! What the filters cost one Envoy sidecar, the way an operator sees it: CPU time per request of
//! the Envoy process, its memory, the latency it adds at a moderate rate, next to the wasm
//! instructions the harness counts and the targets of DESIGN.md §8.
//!
//! ```text
//! eastwest-bench [--rounds 3] [--duration 8s] [--warmup 2s] [--rate 2000]
//!                [--latency-duration 4s] [--connections 16] [--wrk-threads 1]
//!                [--only NAME,...] [--dist DIR] [--harness-json PATH]
//!                [--json-out target/bench/bench.json] [--concurrency 1] [--no-pin] [--nice N]
//!                [--filter NAME=PATH.wasm [--config NAME=JSON]]...
//! ```
//!
//! Configurations (one Envoy each, `--concurrency 1`, node metadata like an Istio sidecar's:
//! `NAMESPACE`, `LABELS` app/team/criticality/environment, locality region; one OUTBOUND
//! listener with the shipped sidecar's route settings, one cluster):
//! `no-filter`; `wasm-noop` (a WAT module that does nothing); `lua-baggage` (an
//! `envoy.filters.http.lua` filter appending the six ownership labels to `baggage`, what a
//! user would write instead); `label-enrich`, `telemetry`, `retry-budget` alone (outbound);
//! `chain-3-modules` (the three in the order and with the configurations above, one VM each,
//! as the static sidecar's outbound listener runs them); `eastwest-all` (dist/eastwest.wasm
//! with all three features; "not built" while it is missing). `--filter` adds configurations.
//!
//! The upstream is a second Envoy answering every request itself (`direct_response`: 200, a
//! small body and `x-eastwest-peer: service.name=orders,k8s.namespace.name=shop`), so the far
//! side costs little. With two or more CPUs the measured Envoys run on the last CPU and the
//! upstream, wrk and this process (the open-loop generator) on the others.
//!
//! Every round runs each configuration once, in alternating order: a wrk warm-up, a closed-loop
//! wrk run (CPU time of the measured Envoy from `/proc/PID/stat` over the run, divided by the
//! requests), VmRSS, then an open-loop run at `--rate` (p50 and p99 from an hdrhistogram).
//! Every request carries eight headers, `baggage: userid=7` among them. The figures and how
//! they are compared are in `eastwest_e2e::bench`. Exit status 1 when a request failed or a
//! configuration could not be set up; a missed target does not fail the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eastwest_e2e::bench::{
    self, ConfigurationResult, HarnessReport, OpenLoopRun, Report, Run, Status, CHAIN, EASTWEST,
    LABEL_ENRICH, LUA_BAGGAGE, NO_FILTER, RETRY_BUDGET, TELEMETRY, WASM_NOOP,
};
use eastwest_e2e::load::{self, LoadPlan};
use eastwest_e2e::process::spawn_tied_to_process;
use eastwest_e2e::{
    bootstrap, free_port, http_request, wasm_filter, ClusterBuilder, Envoy, EnvoyOptions,
    ListenerBuilder, Node, TrafficDirection,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: eastwest-bench [--rounds 3] [--duration 8s] [--warmup 2s] [--rate 2000]
       [--latency-duration 4s] [--connections 16] [--wrk-threads 1] [--only NAME,...]
       [--dist DIR] [--harness-json PATH] [--json-out target/bench/bench.json]
       [--concurrency 1] [--no-pin] [--nice N] [--filter NAME=PATH.wasm [--config NAME=JSON]]...
--nice -10 (root or CAP_SYS_NICE) puts the Envoys, wrk and the generator ahead of other work
on a busy machine; the default leaves priorities alone.
configurations: no-filter wasm-noop lua-baggage label-enrich telemetry retry-budget
                chain-3-modules eastwest-all (--only keeps no-filter and wasm-noop, the
                references, and the --filter ones)";

/// wrk prints this line from its `done` hook; latencies are in microseconds.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  io.write(string.format("EASTWEST_WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// The headers of every request besides `Host` (which wrk and the generator add): eight in all,
/// as an application's HTTP client sends them, with a baggage member and a trace context.
const REQUEST_HEADERS: &[(&str, &str)] = &[
    ("user-agent", "eastwest-bench/2"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", "en-US,en;q=0.9"),
    ("baggage", "userid=7"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("x-request-id", "7f3c9a2e-1b4d-4e8f-9a6b-2c5d8e1f0a3b"),
];

/// What the upstream Envoy answers.
const UPSTREAM_BODY: &str = "{\"service\":\"orders\",\"status\":\"ok\"}\n";
const UPSTREAM_PEER_HEADER: &str = "service.name=orders,k8s.namespace.name=shop";

/// The measured sidecar's workload, as its node metadata and the Lua filter name it.
const WORKLOAD: &str = "checkout";
const NAMESPACE: &str = "shop";
const POD_LABELS: &[(&str, &str)] = &[
    ("app", "checkout"),
    ("team", "shop-core"),
    ("criticality", "high"),
    ("environment", "production"),
];
const REGION: &str = "eu-west-1";

/// What a user writes instead of label-enrich's outbound stamping: append this workload's six
/// ownership labels (DESIGN.md §3) to the W3C `baggage` request header.
const LUA_BAGGAGE_CODE: &str = r#"
local labels = "service.name=checkout,k8s.namespace.name=shop,deployment.environment.name=production,cloud.region=eu-west-1,eastwest.team=shop-core,service.criticality=high"
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local baggage = headers:get("baggage")
  if baggage == nil or baggage == "" then
    headers:replace("baggage", labels)
  else
    headers:replace("baggage", baggage .. "," .. labels)
  end
end
"#;

struct Args {
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    rate: f64,
    latency_duration: Duration,
    connections: u32,
    wrk_threads: u32,
    concurrency: u32,
    only: Option<Vec<String>>,
    dist: PathBuf,
    harness_json: Option<PathBuf>,
    json_out: PathBuf,
    pin: bool,
    /// Nice value for the Envoys, wrk and the generator (negative: ahead of other work).
    nice: i32,
    filters: Vec<(String, PathBuf)>,
    configs: Vec<(String, Value)>,
}

/// A configuration to set up.
struct Plan {
    name: String,
    description: String,
    /// The HTTP filters before the router, in the ways to write them that are tried in order
    /// until Envoy accepts one (eastwest.wasm's shared `direction` at the top level, else in
    /// each section).
    variants: Vec<Vec<Value>>,
    status: Status,
    harness_modules: Vec<String>,
    /// Whether the response to the client still carries `x-eastwest-peer` (label-enrich
    /// removes it): checked once, so a filter that silently does nothing is noticed.
    peer_header_kept: Option<bool>,
}

/// A configuration with its Envoy running.
struct Measured {
    plan: usize,
    envoy: Envoy,
    url: String,
    filters: Vec<Value>,
    runs: Vec<Run>,
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("eastwest-bench: {error:#}");
            std::process::exit(1);
        }
    }
}

/// Measures, prints, writes the JSON; false when a request failed or a configuration failed.
fn run() -> Result<bool> {
    let started = Instant::now();
    let args = parse_args()?;
    let wrk = find_in_path("wrk").context(
        "wrk not found; install it with `apt-get install wrk` (cargo xtask bench does this)",
    )?;
    let envoy_binary = eastwest_e2e::envoy_binary()?;
    let harness = read_harness_json(args.harness_json.as_deref());

    let scratch = tempfile::tempdir()?;
    let script = scratch.path().join("report.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let noop_path = scratch.path().join("noop.wasm");
    std::fs::write(&noop_path, eastwest_e2e::wat_modules::noop_module()?)?;

    let mut plans = plans(&args, &noop_path);
    let upstream = start_upstream()?;
    let mut measured: Vec<Measured> = Vec::new();
    for (index, plan) in plans.iter_mut().enumerate() {
        if plan.status != Status::Measured {
            continue;
        }
        match start_configuration(plan, &args, upstream.port) {
            Ok((envoy, url, filters)) => {
                eprintln!("started {:<16} Envoy pid {}", plan.name, envoy.pid());
                measured.push(Measured {
                    plan: index,
                    envoy,
                    url,
                    filters,
                    runs: Vec::new(),
                });
            }
            Err(error) => {
                eprintln!("configuration `{}` failed: {error:#}", plan.name);
                plan.status = Status::Failed(format!("{error:#}"));
            }
        }
    }
    if !measured.iter().any(|m| plans[m.plan].name == NO_FILTER) {
        bail!("the no-filter configuration did not start; nothing to compare with");
    }

    let pinning = Pinning::new(args.pin, args.nice);
    pinning.pin_load_side(upstream.envoy.pid());
    eprintln!(
        "{} configurations x {} rounds: {:?} warm-up + {:?} closed loop (wrk -t{} -c{}) + {:?} \
         open loop at {} req/s each; {}",
        measured.len(),
        args.rounds,
        args.warmup,
        args.duration,
        args.wrk_threads,
        args.connections,
        args.latency_duration,
        args.rate,
        pinning.describe()
    );
    let load = LoadSide {
        wrk: &wrk,
        script: &script,
        args: &args,
        pinning: &pinning,
    };
    let load_average_at_start = bench::load_average();
    for round in 1..=args.rounds {
        let mut order: Vec<usize> = (0..measured.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for (position, index) in order.into_iter().enumerate() {
            let configuration = &mut measured[index];
            pinning.pin_measured(configuration.envoy.pid());
            let run = load
                .measure(configuration, round, position)
                .with_context(|| format!("round {round}, `{}`", plans[configuration.plan].name))?;
            eprintln!(
                "round {round}/{} {:<16} {:>6.1} µs/req {:>7.0} req/s  RSS {:>5.1} MiB  {}{}",
                args.rounds,
                plans[configuration.plan].name,
                run.cpu_us_per_request(),
                run.requests_per_second(),
                run.rss_mib(),
                run.open_loop.as_ref().map_or(String::new(), |o| format!(
                    "p50 {:.0} µs p99 {:.0} µs",
                    o.p50_us, o.p99_us
                )),
                match run.total_errors() {
                    0 => String::new(),
                    errors => format!("  {errors} errors"),
                }
            );
            configuration.runs.push(run);
        }
    }

    let (harness_report, harness_raw) = match harness {
        Ok((report, raw)) => (Ok(report), Some(raw)),
        Err(reason) => (Err(reason), None),
    };
    let configurations: Vec<ConfigurationResult> = plans
        .iter()
        .enumerate()
        .map(|(index, plan)| {
            let running = measured.iter().find(|m| m.plan == index);
            ConfigurationResult {
                name: plan.name.clone(),
                description: plan.description.clone(),
                status: plan.status.clone(),
                http_filters: running.map_or_else(
                    || plan.variants.first().cloned().unwrap_or_default(),
                    |m| m.filters.clone(),
                ),
                envoy_run_dir: running.map(|m| m.envoy.run_dir().display().to_string()),
                runs: running.map(|m| m.runs.clone()).unwrap_or_default(),
                harness_modules: plan.harness_modules.clone(),
            }
        })
        .collect();
    let (envoy_version, envoy_version_output) = envoy_version(&envoy_binary);
    let (git_commit, git_dirty) = git_state();
    let report = Report {
        date: bench::utc_timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        git_commit,
        git_dirty,
        envoy_binary: envoy_binary.display().to_string(),
        envoy_version,
        envoy_version_output,
        machine: json!({
            "cpus": pinning.cpus,
            "clock_ticks_per_second": bench::clock_ticks_per_second(),
            "pinned": pinning.enabled(),
            "measured_envoy_cpu": pinning.measured_cpu(),
            "load_side_cpus": pinning.load_cpus(),
            "load_average_at_start": load_average_at_start,
            "load_average_at_end": bench::load_average(),
        }),
        options: json!({
            "rounds": args.rounds,
            "warmup_s": args.warmup.as_secs_f64(),
            "duration_s": args.duration.as_secs_f64(),
            "rate": args.rate,
            "latency_duration_s": args.latency_duration.as_secs_f64(),
            "connections": args.connections,
            "wrk_threads": args.wrk_threads,
            "envoy_concurrency": args.concurrency,
            "only": args.only,
            "nice": args.nice,
            "upstream": "a second Envoy with direct_response",
        }),
        request_headers: REQUEST_HEADERS
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        configurations,
        harness: harness_report,
        harness_raw,
        rate: args.rate,
        connections: args.connections,
    };
    // Stop the Envoys (by pid, in Drop) before printing.
    drop(measured);
    drop(upstream);

    println!("\n{}", report.render());
    if let Some(parent) = args.json_out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(
        &args.json_out,
        serde_json::to_vec_pretty(&report.to_json())?,
    )
    .with_context(|| format!("cannot write {}", args.json_out.display()))?;
    println!(
        "JSON report (every figure, the rounds' raw numbers, Envoy {}, commit {}{}): {}",
        report.envoy_version.as_deref().unwrap_or("?"),
        report
            .git_commit
            .as_deref()
            .map_or("?", |c| &c[..c.len().min(12)]),
        if report.git_dirty == Some(true) {
            " + uncommitted changes"
        } else {
            ""
        },
        args.json_out.display()
    );
    println!("took {:.0} s", started.elapsed().as_secs_f64());

    let failed: Vec<String> = report
        .configurations
        .iter()
        .filter(|c| matches!(c.status, Status::Failed(_)))
        .map(|c| c.name.clone())
        .collect();
    let with_errors: Vec<String> = report
        .configurations
        .iter()
        .filter(|c| c.runs.iter().any(|r| r.total_errors() > 0))
        .map(|c| c.name.clone())
        .collect();
    if !failed.is_empty() {
        eprintln!("eastwest-bench: configurations that could not be set up: {failed:?}");
    }
    if !with_errors.is_empty() {
        eprintln!(
            "eastwest-bench: requests failed (non-2xx, socket errors or timeouts) for: \
             {with_errors:?}"
        );
    }
    Ok(failed.is_empty() && with_errors.is_empty())
}

/// The configurations in table order, with what is missing or left out marked.
fn plans(args: &Args, noop_path: &Path) -> Vec<Plan> {
    let module = |name: &str| -> Result<PathBuf, String> {
        let path = args.dist.join(format!("{name}.wasm"));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} is missing (cargo xtask build)",
                relative(&path).display()
            ))
        }
    };
    let label_config = json!({"direction": "outbound", "peer_trust": "any"});
    let telemetry_config = json!({"direction": "outbound"});
    let retry_config = json!({"mode": "client-headers"});
    let modules = |names: &[(&str, &Value)]| -> Result<Vec<Value>, String> {
        names
            .iter()
            .map(|(name, config)| Ok(wasm_filter(name, &module(name)?, (*config).clone())))
            .collect()
    };
    let lua = json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_BAGGAGE_CODE},
        },
    });
    let eastwest_variants = module("eastwest").map(|path| {
        [
            json!({"direction": "outbound", "label_enrich": {"peer_trust": "any"},
                   "telemetry": {}, "retry_budget": {"mode": "client-headers"}}),
            json!({"label_enrich": {"direction": "outbound", "peer_trust": "any"},
                   "telemetry": {"direction": "outbound"},
                   "retry_budget": {"mode": "client-headers"}}),
        ]
        .into_iter()
        .map(|config| vec![wasm_filter("eastwest", &path, config)])
        .collect::<Vec<_>>()
    });
    let mut plans = vec![
        plan(NO_FILTER, "Envoy alone (the reference)", Ok(vec![vec![]]), &[], Some(true)),
        plan(
            WASM_NOOP,
            "a Wasm module that does nothing (wat_modules::noop_module): Envoy's Wasm floor",
            Ok(vec![vec![wasm_filter(WASM_NOOP, noop_path, json!({}))]]),
            &[],
            None,
        ),
        plan(
            LUA_BAGGAGE,
            "a Lua filter appending the six ownership labels to baggage (what a user writes instead)",
            Ok(vec![vec![lua]]),
            &[],
            None,
        ),
        plan(
            LABEL_ENRICH,
            "label-enrich alone {\"direction\":\"outbound\",\"peer_trust\":\"any\"}",
            modules(&[("label-enrich", &label_config)]).map(|f| vec![f]),
            &["label-enrich"],
            Some(false),
        ),
        plan(
            TELEMETRY,
            "telemetry alone {\"direction\":\"outbound\"}",
            modules(&[("telemetry", &telemetry_config)]).map(|f| vec![f]),
            &["telemetry"],
            None,
        ),
        plan(
            RETRY_BUDGET,
            "retry-budget alone {\"mode\":\"client-headers\"}",
            modules(&[("retry-budget", &retry_config)]).map(|f| vec![f]),
            &["retry-budget"],
            None,
        ),
        plan(
            CHAIN,
            "label-enrich, telemetry, retry-budget chained, one VM each (the static sidecar's outbound listener)",
            modules(&[
                ("label-enrich", &label_config),
                ("telemetry", &telemetry_config),
                ("retry-budget", &retry_config),
            ])
            .map(|f| vec![f]),
            &["label-enrich", "telemetry", "retry-budget"],
            Some(false),
        ),
        plan(
            EASTWEST,
            "dist/eastwest.wasm with label_enrich, telemetry and retry_budget in one VM",
            eastwest_variants,
            &["eastwest"],
            Some(false),
        ),
    ];
    for (name, path) in &args.filters {
        let config = args
            .configs
            .iter()
            .find(|(config_name, _)| config_name == name)
            .map_or_else(|| json!({}), |(_, config)| config.clone());
        plans.push(plan(
            name,
            &format!("{} with {config}", relative(path).display()),
            Ok(vec![vec![wasm_filter(name, path, config)]]),
            &[],
            None,
        ));
    }
    if let Some(only) = &args.only {
        for plan in &mut plans {
            let reference = plan.name == NO_FILTER || plan.name == WASM_NOOP;
            let extra = args.filters.iter().any(|(name, _)| *name == plan.name);
            if !reference && !extra && !only.contains(&plan.name) {
                plan.status = Status::Skipped;
            }
        }
    }
    plans
}

fn plan(
    name: &str,
    description: &str,
    variants: Result<Vec<Vec<Value>>, String>,
    harness_modules: &[&str],
    peer_header_kept: Option<bool>,
) -> Plan {
    let (variants, status) = match variants {
        Ok(variants) => (variants, Status::Measured),
        Err(reason) => (Vec::new(), Status::NotBuilt(reason)),
    };
    Plan {
        name: name.to_owned(),
        description: description.to_owned(),
        variants,
        status,
        harness_modules: harness_modules.iter().map(|m| (*m).to_owned()).collect(),
        peer_header_kept,
    }
}

fn relative(path: &Path) -> &Path {
    path.strip_prefix(eastwest_e2e::workspace_root())
        .unwrap_or(path)
}

/// The upstream: an Envoy answering every request itself.
struct Upstream {
    envoy: Envoy,
    port: u16,
}

fn start_upstream() -> Result<Upstream> {
    let port = free_port();
    let mut listener = ListenerBuilder::new("upstream", port, "none")
        .stat_prefix("upstream")
        .build();
    let route = listener
        .pointer_mut(
            "/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes/0",
        )
        .context("the listener builder's JSON changed: no route to replace")?;
    *route = json!({
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
        "response_headers_to_add": [
            {"header": {"key": "x-eastwest-peer", "value": UPSTREAM_PEER_HEADER}},
        ],
    });
    let config = bootstrap(
        &Node::istio_sidecar("orders", NAMESPACE, &[("app", "orders")]),
        free_port(),
        vec![listener],
        vec![],
        &[],
    );
    let envoy =
        Envoy::start("bench-upstream", config, &envoy_options(1)).context("the upstream Envoy")?;
    Ok(Upstream { envoy, port })
}

fn envoy_options(concurrency: u32) -> EnvoyOptions {
    EnvoyOptions {
        concurrency,
        log_level: "warning".into(),
        ..EnvoyOptions::default()
    }
}

/// Starts the configuration's Envoy with the first filter variant it accepts and sends one
/// request through it.
fn start_configuration(
    plan: &Plan,
    args: &Args,
    upstream_port: u16,
) -> Result<(Envoy, String, Vec<Value>)> {
    let mut refusals = Vec::new();
    for (attempt, filters) in plan.variants.iter().enumerate() {
        let listen = free_port();
        let mut listener = ListenerBuilder::new("outbound", listen, "orders")
            .traffic_direction(TrafficDirection::Outbound)
            .stat_prefix("outbound")
            // The shipped sidecar's outbound route (envoy-configs/static/).
            .route_field("timeout", json!("5s"))
            .retry_policy(json!({
                "retry_on": "5xx,reset,connect-failure",
                "num_retries": 2,
                "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
            }))
            .virtual_host_field("include_request_attempt_count", json!(true));
        for filter in filters {
            listener = listener.http_filter(filter.clone());
        }
        let node = Node::istio_sidecar(WORKLOAD, NAMESPACE, POD_LABELS)
            .with_locality(Some(REGION), Some("eu-west-1a"));
        let config = bootstrap(
            &node,
            free_port(),
            vec![listener.build()],
            vec![ClusterBuilder::new("orders", upstream_port).build()],
            &[],
        );
        let name = format!("bench-{}", plan.name);
        let envoy = match Envoy::start(&name, config, &envoy_options(args.concurrency)) {
            Ok(envoy) => envoy,
            Err(error) => {
                if attempt + 1 < plan.variants.len() {
                    eprintln!(
                        "`{}`: Envoy refused the filter configuration variant {}; trying the \
                         next one",
                        plan.name,
                        attempt + 1
                    );
                }
                refusals.push(format!("{error:#}"));
                continue;
            }
        };
        let url = format!("http://127.0.0.1:{listen}/orders/42");
        check_request(&envoy, &url, plan)?;
        return Ok((envoy, url, filters.clone()));
    }
    bail!(
        "Envoy refused every way to write its filters:\n{}",
        refusals.join("\n---\n")
    )
}

/// One request first: a filter that rejects everything would otherwise look fast.
fn check_request(envoy: &Envoy, url: &str, plan: &Plan) -> Result<()> {
    let headers: Vec<(&str, &[u8])> = REQUEST_HEADERS
        .iter()
        .map(|(name, value)| (*name, value.as_bytes()))
        .collect();
    let response = http_request("GET", url, &headers, "")?;
    if response.status != 200 {
        bail!(
            "a test request got status {} ({}); Envoy log in {}",
            response.status,
            response.text(),
            envoy.run_dir().display()
        );
    }
    if let Some(kept) = plan.peer_header_kept {
        let present = response.header("x-eastwest-peer").is_some();
        if present != kept {
            bail!(
                "the response {} x-eastwest-peer, expected {}: is the filter running? Envoy \
                 log in {}",
                if present { "carries" } else { "lacks" },
                if kept {
                    "it"
                } else {
                    "label-enrich to remove it"
                },
                envoy.run_dir().display()
            );
        }
    }
    Ok(())
}

/// wrk and the open-loop generator.
struct LoadSide<'a> {
    wrk: &'a Path,
    script: &'a Path,
    args: &'a Args,
    pinning: &'a Pinning,
}

impl LoadSide<'_> {
    /// One configuration in one round: warm-up, the closed-loop CPU run, RSS, the open-loop
    /// latency run.
    fn measure(&self, configuration: &Measured, round: usize, position: usize) -> Result<Run> {
        let pid = configuration.envoy.pid();
        if !self.args.warmup.is_zero() {
            self.wrk(&configuration.url, self.args.warmup)?;
        }
        let measured_cpu = self.pinning.measured_cpu();
        let busy = || measured_cpu.and_then(|cpu| bench::read_cpu_busy_ticks(cpu).ok());
        let started = Instant::now();
        let busy_before = busy();
        let before = bench::read_cpu_ticks(pid)?;
        let closed = self.wrk(&configuration.url, self.args.duration)?;
        let after = bench::read_cpu_ticks(pid)?;
        let busy_after = busy();
        let wall = started.elapsed().as_secs_f64();
        let rss_kib = bench::read_rss_kib(pid)?;
        let ticks = bench::clock_ticks_per_second() as f64;
        let envoy_ticks = after.saturating_sub(before);
        // What else ran on the measured Envoy's CPU, as a share of the run's wall time.
        let other_load_share = match (busy_before, busy_after) {
            (Some(b), Some(a)) => Some(
                a.saturating_sub(b).saturating_sub(envoy_ticks) as f64 / ticks / wall.max(1e-9),
            ),
            _ => None,
        };
        let open_loop = if self.args.latency_duration.is_zero() {
            None
        } else {
            Some(self.open_loop(&configuration.url, pid, ticks)?)
        };
        Ok(Run {
            round,
            position,
            cpu_seconds: envoy_ticks as f64 / ticks,
            requests: closed.requests,
            duration_s: closed.duration_s,
            errors: closed.errors,
            wrk_p50_us: closed.p50_us,
            wrk_p99_us: closed.p99_us,
            rss_kib,
            other_load_share,
            open_loop,
        })
    }

    fn wrk(&self, url: &str, duration: Duration) -> Result<WrkResult> {
        let seconds = duration.as_secs_f64().round().max(1.0) as u64;
        let mut command = Command::new(self.wrk);
        command
            .arg(format!("-t{}", self.args.wrk_threads))
            .arg(format!("-c{}", self.args.connections))
            .arg(format!("-d{seconds}s"))
            .arg("-s")
            .arg(self.script);
        for (name, value) in REQUEST_HEADERS {
            command.arg("-H").arg(format!("{name}: {value}"));
        }
        command
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_tied_to_process(command).context("cannot start wrk")?;
        let output = child.wait_with_output().context("wrk failed")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk exited with {}: {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        parse_wrk_report(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
    }

    fn open_loop(&self, url: &str, pid: u32, ticks: f64) -> Result<OpenLoopRun> {
        let rate = self.args.rate;
        let duration = self.args.latency_duration;
        let requests = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
        let mut plan = LoadPlan::new(url, requests)
            .rate(rate)
            .concurrency(64)
            .max_duration(duration + Duration::from_secs(3))
            .request_timeout(Duration::from_secs(2));
        for (name, value) in REQUEST_HEADERS {
            plan = plan.header(name, *value);
        }
        let before = bench::read_cpu_ticks(pid)?;
        let report = load::run(&plan)?;
        let after = bench::read_cpu_ticks(pid)?;
        let ok: u64 = report
            .by_status
            .iter()
            .filter(|(status, _)| (200..300).contains(*status))
            .map(|(_, count)| count)
            .sum();
        Ok(OpenLoopRun {
            rate,
            sent: report.sent,
            completed: report.completed,
            errors: (report.completed - ok) + report.errors.total() + report.abandoned,
            p50_us: report.latency.value_at_quantile(0.5) as f64,
            p99_us: report.latency.value_at_quantile(0.99) as f64,
            max_lag_us: report.max_lag.as_secs_f64() * 1e6,
            cpu_seconds: after.saturating_sub(before) as f64 / ticks,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct WrkResult {
    requests: u64,
    duration_s: f64,
    /// Non-2xx/3xx responses plus socket errors.
    errors: u64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_wrk_report(output: &str) -> Result<WrkResult> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("EASTWEST_WRK "))
        .context("no EASTWEST_WRK line")?;
    let field = |key: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}"))?
            .parse::<f64>()
            .with_context(|| format!("{key} is not a number"))
    };
    let duration_s = field("duration_us")? / 1e6;
    if duration_s <= 0.0 {
        bail!("zero duration");
    }
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|key| field(key))
        .sum::<Result<f64>>()?;
    Ok(WrkResult {
        requests: field("requests")? as u64,
        duration_s,
        errors: errors as u64,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

/// Which CPUs the measured Envoys and the load side (upstream Envoy, wrk, this process) use.
struct Pinning {
    /// CPUs this process could use before pinning.
    cpus: usize,
    measured: Option<usize>,
    load: Vec<usize>,
    nice: i32,
}

impl Pinning {
    /// With at least two CPUs and `pin`: the last CPU for the measured Envoys, the others for
    /// the load side.
    fn new(pin: bool, nice: i32) -> Pinning {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if !pin || cpus < 2 {
            return Pinning {
                cpus,
                measured: None,
                load: Vec::new(),
                nice,
            };
        }
        Pinning {
            cpus,
            measured: Some(cpus - 1),
            load: (0..cpus - 1).collect(),
            nice,
        }
    }

    fn enabled(&self) -> bool {
        self.measured.is_some()
    }

    fn measured_cpu(&self) -> Option<usize> {
        self.measured
    }

    fn load_cpus(&self) -> &[usize] {
        &self.load
    }

    fn describe(&self) -> String {
        match self.measured {
            Some(cpu) => format!(
                "measured Envoys pinned to CPU {cpu}, upstream Envoy, wrk and the generator to \
                 CPUs {:?}",
                self.load
            ),
            None => "not pinned (one CPU, or --no-pin)".into(),
        }
    }

    /// The upstream Envoy and this process (wrk and the generator inherit it).
    fn pin_load_side(&self, upstream_pid: u32) {
        if self.enabled() {
            set_affinity_of_all_threads(upstream_pid, &self.load);
            set_affinity_of_all_threads(std::process::id(), &self.load);
        }
        self.renice(upstream_pid);
        self.renice(std::process::id());
    }

    /// Sets the nice value of every thread of `pid` (when `--nice` asks for one).
    fn renice(&self, pid: u32) {
        if self.nice == 0 {
            return;
        }
        for tid in threads(pid) {
            // SAFETY: plain system call on a thread id.
            let result =
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, self.nice) };
            if result != 0 {
                eprintln!(
                    "cannot set nice {} on thread {tid} of {pid}: {}",
                    self.nice,
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
    }

    /// Every thread of a measured Envoy, before each of its runs (threads it started since
    /// inherit the affinity anyway; this keeps it certain).
    fn pin_measured(&self, pid: u32) {
        if let Some(cpu) = self.measured {
            set_affinity_of_all_threads(pid, &[cpu]);
        }
        self.renice(pid);
    }
}

/// The thread ids of process `pid`.
fn threads(pid: u32) -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Sets the CPU affinity of every thread of `pid`; returns how many threads were pinned.
fn set_affinity_of_all_threads(pid: u32, cpus: &[usize]) -> usize {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    threads(pid)
        .into_iter()
        .filter(|&tid| {
            // SAFETY: `set` is a valid cpu_set_t of the size given.
            unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
            }
        })
        .count()
}

/// The harness's report and its JSON, or why there is none.
fn read_harness_json(path: Option<&Path>) -> Result<(HarnessReport, Value), String> {
    let path = path.ok_or("no --harness-json given (cargo xtask bench passes one)")?;
    let text = std::fs::read_to_string(path).map_err(|error| {
        format!(
            "cannot read {} ({error}); `eastwest-harness bench --json` did not write it",
            path.display()
        )
    })?;
    let report = HarnessReport::parse(&text)
        .map_err(|error| format!("{} is not the expected report: {error:#}", path.display()))?;
    let raw = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    Ok((report, raw))
}

/// The release (`1.40.0`) and the full `envoy --version` line.
fn envoy_version(binary: &Path) -> (Option<String>, Option<String>) {
    let Ok(output) = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    else {
        return (None, None);
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let line = text
        .lines()
        .find(|line| line.contains("version:"))
        .map(|line| line.trim().to_owned());
    (bench::parse_envoy_version(&text), line)
}

/// `git rev-parse HEAD` and whether tracked files differ from it.
fn git_state() -> (Option<String>, Option<bool>) {
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .args(args)
            .current_dir(eastwest_e2e::workspace_root())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let commit = git(&["rev-parse", "HEAD"]).map(|c| c.trim().to_owned());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.trim().is_empty());
    (commit, dirty)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 10s, 500ms, 1m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (use ms, s or m)"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_args() -> Result<Args> {
    parse_args_from(std::env::args().skip(1))
}

fn parse_args_from(raw: impl IntoIterator<Item = String>) -> Result<Args> {
    let mut args = Args {
        rounds: 3,
        duration: Duration::from_secs(8),
        warmup: Duration::from_secs(2),
        rate: 2000.0,
        latency_duration: Duration::from_secs(4),
        connections: 16,
        wrk_threads: 1,
        concurrency: 1,
        only: None,
        dist: eastwest_e2e::workspace_root().join("dist"),
        harness_json: None,
        json_out: eastwest_e2e::workspace_root().join("target/bench/bench.json"),
        pin: true,
        nice: 0,
        filters: Vec::new(),
        configs: Vec::new(),
    };
    let mut raw = raw.into_iter();
    while let Some(flag) = raw.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (flag, None),
        };
        let mut value = || -> Result<String> {
            inline
                .clone()
                .or_else(|| raw.next())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        fn number<T: std::str::FromStr>(flag: &str, text: String) -> Result<T> {
            text.parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not a number"))
        }
        match flag.as_str() {
            "--rounds" => args.rounds = number(&flag, value()?)?,
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--warmup" => args.warmup = parse_duration(&value()?)?,
            "--rate" => args.rate = number(&flag, value()?)?,
            "--latency-duration" => args.latency_duration = parse_duration(&value()?)?,
            "--connections" => args.connections = number(&flag, value()?)?,
            "--wrk-threads" => args.wrk_threads = number(&flag, value()?)?,
            "--concurrency" => args.concurrency = number(&flag, value()?)?,
            "--only" => {
                let names: Vec<String> = value()?
                    .split(',')
                    .map(|name| name.trim().to_owned())
                    .filter(|name| !name.is_empty())
                    .collect();
                for name in &names {
                    if !bench::CONFIGURATIONS.contains(&name.as_str()) {
                        bail!(
                            "--only {name}: no such configuration (one of {})",
                            bench::CONFIGURATIONS.join(", ")
                        );
                    }
                }
                args.only = Some(names);
            }
            "--dist" => args.dist = std::path::absolute(value()?)?,
            "--harness-json" => args.harness_json = Some(PathBuf::from(value()?)),
            "--json-out" => args.json_out = PathBuf::from(value()?),
            "--no-pin" => args.pin = false,
            "--nice" => args.nice = number(&flag, value()?)?,
            "--filter" => {
                let value = value()?;
                let (name, path) = value
                    .split_once('=')
                    .with_context(|| format!("--filter {value}: expected NAME=PATH.wasm"))?;
                let path = std::path::absolute(path)
                    .with_context(|| format!("--filter {value}: bad path"))?;
                if !path.is_file() {
                    bail!("--filter {name}: {} does not exist", path.display());
                }
                if bench::CONFIGURATIONS.contains(&name)
                    || args.filters.iter().any(|(other, _)| other == name)
                {
                    bail!("--filter {name}: duplicate or reserved name");
                }
                args.filters.push((name.to_owned(), path));
            }
            "--config" => {
                let value = value()?;
                let (name, config) = value
                    .split_once('=')
                    .with_context(|| format!("--config {value}: expected NAME=JSON"))?;
                let config: Value = serde_json::from_str(config)
                    .with_context(|| format!("--config {name}: not valid JSON"))?;
                args.configs.push((name.to_owned(), config));
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    for (name, _) in &args.configs {
        if !args.filters.iter().any(|(filter, _)| filter == name) {
            bail!("--config {name}: no --filter {name}=PATH given");
        }
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than zero");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of requests per second");
    }
    if args.connections == 0 || args.wrk_threads == 0 || args.wrk_threads > args.connections {
        bail!("--connections and --wrk-threads must be positive, with no more threads than connections");
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args> {
        parse_args_from(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn parses_the_wrk_report_line() {
        let output = "Running 1s test\nEASTWEST_WRK requests=20000 duration_us=2000000 connect=0 \
                      read=1 write=0 status=2 timeout=0 p50_us=450 p99_us=2500\n";
        let result = parse_wrk_report(output).unwrap();
        assert_eq!(result.requests, 20_000);
        assert_eq!(result.duration_s, 2.0);
        assert_eq!(result.p99_us, 2500.0);
        assert_eq!(result.errors, 3);
        assert!(parse_wrk_report("Running 1s test\n").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn defaults_fit_ten_minutes_and_options_override_them() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.rounds, 3);
        assert_eq!(args.duration, Duration::from_secs(8));
        assert_eq!(args.rate, 2000.0);
        assert_eq!(args.connections, 16);
        assert!(args.json_out.ends_with("target/bench/bench.json"));
        // 8 configurations x 3 rounds x (2 s + 8 s + 4 s) = 5.6 min of load.
        let per_run = args.warmup + args.duration + args.latency_duration;
        assert!(per_run * 8 * args.rounds as u32 <= Duration::from_secs(400));

        let args = parse(&[
            "--rounds=5",
            "--duration",
            "20s",
            "--rate",
            "500",
            "--only",
            "eastwest-all,chain-3-modules",
            "--json-out",
            "/tmp/b.json",
            "--no-pin",
        ])
        .unwrap();
        assert_eq!(args.rounds, 5);
        assert_eq!(args.duration, Duration::from_secs(20));
        assert_eq!(args.rate, 500.0);
        assert_eq!(
            args.only,
            Some(vec![
                "eastwest-all".to_string(),
                "chain-3-modules".to_string()
            ])
        );
        assert_eq!(args.json_out, PathBuf::from("/tmp/b.json"));
        assert!(!args.pin);

        assert!(parse(&["--only", "label-enrich,nope"]).is_err());
        assert!(parse(&["--rounds", "0"]).is_err());
        assert!(parse(&["--rate", "-1"]).is_err());
        assert!(parse(&["--surprise"]).is_err());
        assert!(parse(&["--config", "x={}"]).is_err());
    }

    #[test]
    fn only_keeps_the_references_and_marks_the_rest_skipped() {
        let mut args = parse(&["--only", "telemetry"]).unwrap();
        args.dist = PathBuf::from("/nonexistent");
        let plans = plans(&args, Path::new("/tmp/noop.wasm"));
        let status = |name: &str| {
            plans
                .iter()
                .find(|p| p.name == name)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(status(NO_FILTER), Status::Measured);
        assert_eq!(status(WASM_NOOP), Status::Measured);
        assert_eq!(status(LUA_BAGGAGE), Status::Skipped);
        assert_eq!(status(CHAIN), Status::Skipped);
        // Asked for, but not built.
        assert!(
            matches!(status(TELEMETRY), Status::NotBuilt(reason) if reason.contains("telemetry.wasm"))
        );
    }

    #[test]
    fn the_chain_runs_the_three_modules_in_the_sidecars_order_one_vm_each() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["label-enrich", "telemetry", "retry-budget", "eastwest"] {
            std::fs::write(dir.path().join(format!("{name}.wasm")), b"\0asm").unwrap();
        }
        let mut args = parse(&[]).unwrap();
        args.dist = dir.path().to_path_buf();
        let plans = plans(&args, Path::new("/tmp/noop.wasm"));
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, bench::CONFIGURATIONS);
        let chain = plans.iter().find(|p| p.name == CHAIN).unwrap();
        let filters = &chain.variants[0];
        let vm_ids: Vec<&str> = filters
            .iter()
            .map(|f| {
                f["typed_config"]["config"]["vm_config"]["vm_id"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(vm_ids, ["label-enrich", "telemetry", "retry-budget"]);
        let config = |filter: &Value| -> Value {
            serde_json::from_str(
                filter["typed_config"]["config"]["configuration"]["value"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            config(&filters[0]),
            json!({"direction": "outbound", "peer_trust": "any"})
        );
        assert_eq!(config(&filters[1]), json!({"direction": "outbound"}));
        assert_eq!(config(&filters[2]), json!({"mode": "client-headers"}));
        let eastwest = plans.iter().find(|p| p.name == EASTWEST).unwrap();
        assert_eq!(eastwest.status, Status::Measured);
        assert_eq!(eastwest.variants.len(), 2);
        assert_eq!(
            config(&eastwest.variants[0][0])["direction"],
            json!("outbound")
        );
        assert_eq!(
            config(&eastwest.variants[1][0])["telemetry"]["direction"],
            json!("outbound")
        );
        let lua = plans.iter().find(|p| p.name == LUA_BAGGAGE).unwrap();
        let code = lua.variants[0][0]["typed_config"]["default_source_code"]["inline_string"]
            .as_str()
            .unwrap();
        for key in [
            "service.name=",
            "k8s.namespace.name=",
            "deployment.environment.name=",
            "cloud.region=",
            "eastwest.team=",
            "service.criticality=",
        ] {
            assert!(code.contains(key), "{key}");
        }
    }

    #[test]
    fn requests_carry_eight_headers_with_baggage() {
        // Host is added by wrk and the generator.
        assert_eq!(REQUEST_HEADERS.len() + 1, 8);
        assert!(REQUEST_HEADERS.contains(&("baggage", "userid=7")));
    }
}
