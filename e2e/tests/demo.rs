//! `eastwest-demo` (what `cargo xtask demo` runs), end to end: a short run whose summary shows
//! the four service pairs with their teams, the unexpected dependency and the retry budget's
//! denials during the outage, with a self-contained HTML report; `--keep-running` serving
//! until Ctrl-C, its sidecars running `dist/eastwest.wasm` (read back from each Envoy's
//! `/config_dump`); and Ctrl-C during the traffic (sent to the whole process group, as a
//! terminal does). Every time, no process the demo started may be left running.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eastwest_e2e::http_request;
use eastwest_e2e::process::spawn_tied_to_process;
use serde_json::Value;

/// A running `eastwest-demo` in its own process group, its output collected line by line.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    output: Arc<Mutex<String>>,
    _out_dir: tempfile::TempDir,
    out_path: std::path::PathBuf,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let out_dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_eastwest-demo"));
        command
            .args(args)
            .arg("--out-dir")
            .arg(out_dir.path())
            .arg("--service-binary")
            .arg(env!("CARGO_BIN_EXE_eastwest-demo-service"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that a test can signal it as a terminal signals a
        // foreground job (every process of the group).
        // SAFETY: setpgid is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = spawn_tied_to_process(command).expect("start eastwest-demo");
        let output = Arc::new(Mutex::new(String::new()));
        let (sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let collected = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                collected.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = sender.send(line);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let collected = output.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            collected
                .lock()
                .unwrap()
                .push_str(&format!("--- stderr ---\n{text}"));
        });
        let out_path = out_dir.path().to_path_buf();
        Demo {
            child,
            lines,
            output,
            _out_dir: out_dir,
            out_path,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The first line (from now on) satisfying `wanted`.
    fn wait_for_line(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no such line within {timeout:?}; output so far:\n{}",
                    self.output()
                ),
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the rest of the output.
                std::thread::sleep(Duration::from_millis(200));
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "eastwest-demo still running after {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: libc::c_int, whole_group: bool) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our child (or its process group, whose id is its pid).
        unsafe {
            libc::kill(if whole_group { -pid } else { pid }, signal);
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // A failing test must not leave the mesh behind: SIGKILL for the demo, whose
        // children then get SIGKILL from the kernel (PR_SET_PDEATHSIG).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pids the demo printed for its services and sidecars (`(pid N)`).
fn started_pids(output: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = output
        .lines()
        .filter(|line| line.contains(" service :") && line.contains("sidecar (pid"))
        .flat_map(|line| {
            line.split("pid ")
                .skip(1)
                .filter_map(|rest| rest.split(')').next()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort();
    pids.dedup();
    pids
}

/// Processes among `pids` that still run an Envoy or a demo service.
fn still_running(pids: &[u32]) -> Vec<(u32, String)> {
    pids.iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = cmdline.contains("envoy") || cmdline.contains("eastwest-demo-service");
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')));
            (ours && !zombie).then_some((*pid, cmdline))
        })
        .collect()
}

fn assert_all_stopped(output: &str) {
    let pids = started_pids(output);
    assert_eq!(
        pids.len(),
        8,
        "4 services and 4 sidecars expected:\n{output}"
    );
    let running = still_running(&pids);
    assert!(running.is_empty(), "left running: {running:?}\n{output}");
    assert!(
        output.contains("Stopped all 8 processes of the mesh"),
        "{output}"
    );
}

/// The numbers after `key` in `line` (e.g. `admitted`), in order.
fn numbers_before(line: &str, key: &str) -> Vec<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|pair| pair[1].starts_with(key))
        .filter_map(|pair| pair[0].parse().ok())
        .collect()
}

/// The names of a chain's HTTP filters and, for each Wasm filter, the module file and its
/// configuration.
type FilterChain = (Vec<String>, Vec<(String, Value)>);

/// What a sidecar's `/config_dump` says it runs: one entry per HTTP connection manager.
fn http_filter_chains(config_dump: &Value) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let mut pending = vec![config_dump];
    while let Some(current) = pending.pop() {
        if let Some(filters) = current.get("http_filters").and_then(Value::as_array) {
            let names = filters
                .iter()
                .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            let wasm = filters
                .iter()
                .filter_map(|f| {
                    let config = f.pointer("/typed_config/config")?;
                    let file = config
                        .pointer("/vm_config/code/local/filename")?
                        .as_str()?
                        .to_owned();
                    let text = config.pointer("/configuration/value")?.as_str()?;
                    Some((file, serde_json::from_str(text).unwrap()))
                })
                .collect();
            chains.push((names, wasm));
        }
        match current {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.values()),
            _ => {}
        }
    }
    chains
}

#[test]
fn a_run_prints_the_service_map_budget_denials_and_the_unexpected_dependency() {
    let mut demo = Demo::start(&["--duration", "15s"]);
    let status = demo.wait(Duration::from_secs(120));
    let output = demo.output();
    assert!(status.success(), "{status}\n{output}");
    assert!(
        output
            .contains("Envoy sidecars (dist/eastwest.wasm: label-enrich, telemetry, retry-budget)"),
        "{output}"
    );

    let map_line = |source: &str, destination: &str| -> String {
        output
            .lines()
            .find(|line| {
                line.trim_start()
                    .starts_with(&format!("{source} → {destination} "))
            })
            .unwrap_or_else(|| panic!("no line for {source} → {destination}:\n{output}"))
            .to_owned()
    };
    let front = map_line("frontend (team web)", "checkout (team orders)");
    let pay = map_line("checkout (team orders)", "payments (team payments)");
    map_line("checkout (team orders)", "inventory (team supply)");
    let unexpected = map_line("inventory (team supply)", "payments (team payments)");
    for line in [&front, &pay] {
        assert!(
            line.contains(" req ") && line.contains("p95") && line.contains("p99"),
            "{line}"
        );
        assert!(!line.contains("UNEXPECTED"), "{line}");
    }
    assert!(unexpected.ends_with("UNEXPECTED"), "{unexpected}");
    // The outage shows as errors on the pairs toward payments, and end to end.
    let error_ratio = |line: &str| -> f64 {
        let words: Vec<&str> = line.split_whitespace().collect();
        let index = words.iter().position(|w| *w == "err").expect("err");
        words[index - 1].trim_end_matches('%').parse().unwrap()
    };
    assert!(error_ratio(&pay) > 5.0, "{pay}");
    let phases = output
        .lines()
        .find(|line| line.contains("payments failing from"))
        .unwrap_or_else(|| panic!("no outage line:\n{output}"));
    let percents: Vec<f64> = phases
        .split_whitespace()
        .filter_map(|word| word.trim_end_matches([',', '%']).parse().ok())
        .collect();
    // "from A s to B s: errors X% before, Y% during, Z% after"
    let [_, _, before, during, after] = percents[..] else {
        panic!("{phases}");
    };
    assert!(before < 10.0 && during > 50.0 && after < 10.0, "{phases}");

    // The budget denied retries toward payments.
    let budget = output
        .lines()
        .find(|line| line.trim_start().starts_with("→ payments"))
        .unwrap_or_else(|| panic!("no retry line for payments:\n{output}"));
    let denied: f64 = numbers_before(budget, "denied").iter().sum();
    assert!(denied > 0.0, "{budget}");
    let unexpected_section = output
        .split("Unexpected dependencies")
        .nth(1)
        .unwrap_or_else(|| panic!("no unexpected dependencies section:\n{output}"));
    assert!(
        unexpected_section.contains("inventory (team supply) → payments (team payments): "),
        "{output}"
    );

    let report_line = output
        .lines()
        .find_map(|line| line.strip_prefix("Report: "))
        .unwrap_or_else(|| panic!("no report path:\n{output}"));
    assert_eq!(
        std::path::Path::new(report_line),
        demo.out_path.join("report.html").canonicalize().unwrap()
    );
    let report = std::fs::read_to_string(report_line).unwrap();
    assert!(report.contains("<svg"), "no inline SVG");
    assert!(report.contains("inventory"), "the graph names the services");
    for external in [
        "<script",
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
    ] {
        assert!(!report.contains(external), "the report loads {external}");
    }
    assert_all_stopped(&output);
}

#[test]
fn keep_running_serves_the_mesh_until_ctrl_c() {
    let mut demo = Demo::start(&["--duration", "6s", "--keep-running"]);
    demo.wait_for_line(
        |line| line.contains("Ctrl-C stops it"),
        Duration::from_secs(90),
    );
    let frontend = demo.wait_for_line(
        |line| line.trim_start().starts_with("curl -s http://127.0.0.1:"),
        Duration::from_secs(5),
    );
    let url = frontend.split_whitespace().nth(2).unwrap().to_owned();
    let response = http_request("GET", &url, &[], "").unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.text().contains("checkout"), "{}", response.text());
    let mut metrics_urls = Vec::new();
    for _ in 0..4 {
        let metrics = demo.wait_for_line(
            |line| line.contains("/stats/prometheus"),
            Duration::from_secs(5),
        );
        metrics_urls.push(metrics.split_whitespace().nth(1).unwrap().to_owned());
    }
    let scrape = http_request("GET", &metrics_urls[0], &[], "").unwrap();
    assert!(
        scrape.text().contains("eastwest_requests_total{"),
        "{}",
        metrics_urls[0]
    );
    // Every sidecar runs dist/eastwest.wasm, one filter on each listener, the three features
    // in it: retry-budget in `server` mode inbound, `client-headers` outbound.
    for metrics_url in &metrics_urls {
        let dump_url = metrics_url.replace(
            "/stats/prometheus",
            "/config_dump?resource=static_listeners",
        );
        let dump: Value =
            serde_json::from_str(&http_request("GET", &dump_url, &[], "").unwrap().text()).unwrap();
        let chains = http_filter_chains(&dump);
        assert_eq!(chains.len(), 2, "{dump_url}: two listeners");
        let mut modes = Vec::new();
        for (names, wasm) in chains {
            assert_eq!(
                names,
                ["eastwest", "envoy.filters.http.router"],
                "{dump_url}"
            );
            assert_eq!(wasm.len(), 1, "{dump_url}");
            let (file, config) = &wasm[0];
            assert!(file.ends_with("/dist/eastwest.wasm"), "{dump_url}: {file}");
            for section in ["label_enrich", "telemetry", "retry_budget"] {
                assert!(config[section].is_object(), "{dump_url}: {config}");
            }
            modes.push(config["retry_budget"]["mode"].as_str().unwrap().to_owned());
        }
        modes.sort();
        assert_eq!(modes, ["client-headers", "server"], "{dump_url}");
    }

    // `kill -INT <pid>`: only the demo gets the signal; it stops its processes itself.
    demo.signal(libc::SIGINT, false);
    let status = demo.wait(Duration::from_secs(30));
    let output = demo.output();
    assert!(status.success(), "{status}\n{output}");
    assert_all_stopped(&output);
}

#[test]
fn ctrl_c_during_the_traffic_stops_every_process() {
    let mut demo = Demo::start(&["--duration", "120s"]);
    demo.wait_for_line(|line| line.contains("warm-up"), Duration::from_secs(90));
    // As a terminal does: SIGINT to every process of the foreground process group, the
    // Envoys and services included.
    demo.signal(libc::SIGINT, true);
    let status = demo.wait(Duration::from_secs(30));
    let output = demo.output();
    assert_eq!(
        status.code(),
        Some(130),
        "{status:?} {:?}\n{output}",
        status.signal()
    );
    assert!(output.contains("cut short by Ctrl-C"), "{output}");
    assert_all_stopped(&output);
}
