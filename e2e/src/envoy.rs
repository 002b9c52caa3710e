//! A real Envoy process, started from a JSON bootstrap and stopped when dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::client::{http_request_with, RequestOptions};
use crate::paths::{envoy_binary, workspace_root};
use crate::process::spawn_tied_to_process;

/// How many lines of Envoy's log an error message carries.
const LOG_TAIL_LINES: usize = 60;
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long Drop waits after SIGTERM before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// How to run Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// `-l`: trace, debug, info, warning, error, critical, off.
    pub log_level: String,
    /// `--component-log-level`, e.g. `wasm:debug` (Wasm filters log under `wasm`).
    pub component_log_level: Option<String>,
    /// How long to wait for the admin `/ready` and the listeners (or, for
    /// [`Envoy::start_expecting_failure`], for the exit).
    pub startup_timeout: Duration,
    /// `--file-flush-interval-msec`: how soon the Envoy log and file access logs reach disk.
    /// Envoy's default is 10 s, far too slow for tests that read them.
    pub file_flush_interval: Duration,
    /// Further command-line arguments.
    pub extra_args: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            concurrency: 2,
            log_level: "info".into(),
            component_log_level: None,
            startup_timeout: Duration::from_secs(30),
            file_flush_interval: Duration::from_millis(100),
            extra_args: Vec::new(),
        }
    }
}

/// A running Envoy. Dropping it stops the process: SIGTERM, SIGKILL after 5 s, always reaped.
/// Its run directory (`<workspace>/target/e2e-runs/<name>-<pid>-<n>/`: bootstrap.json,
/// envoy.log, stdout.log, stderr.log, command.txt) stays for post-mortems; directories older
/// than a day are pruned.
#[derive(Debug)]
pub struct Envoy {
    name: String,
    child: Option<Child>,
    pid: u32,
    admin_port: u16,
    run_dir: PathBuf,
}

impl Envoy {
    /// Writes `bootstrap` into a fresh run directory, starts Envoy on it and waits until the
    /// admin `/ready` answers 200 and every listener of the bootstrap accepts TCP connections.
    /// On exit or timeout the process is killed and the error carries the tail of its log.
    pub fn start(name: &str, bootstrap: Value, options: &EnvoyOptions) -> Result<Envoy> {
        let listeners = listener_addresses(&bootstrap)?;
        let mut envoy = Self::spawn(name, &bootstrap, options)?;
        match envoy.wait_until_ready(&listeners, options.startup_timeout) {
            Ok(()) => Ok(envoy),
            Err(reason) => {
                envoy.terminate(Duration::ZERO);
                Err(anyhow!(
                    "Envoy `{name}` did not start: {reason:#}\n{}",
                    envoy.diagnostics()
                ))
            }
        }
    }

    /// Starts several Envoys at once, each as [`Envoy::start`] does with its
    /// `(name, bootstrap, options)`, and returns them in the same order once every one is
    /// ready: most of a start is compiling Wasm modules and waiting, so a test with a caller's
    /// and a callee's sidecar is ready sooner. If any fails, the others are stopped and the
    /// first error is returned.
    pub fn start_many(starts: Vec<(String, Value, EnvoyOptions)>) -> Result<Vec<Envoy>> {
        let results: Vec<Result<Envoy>> = std::thread::scope(|scope| {
            let threads: Vec<_> = starts
                .into_iter()
                .map(|(name, bootstrap, options)| {
                    scope.spawn(move || Envoy::start(&name, bootstrap, &options))
                })
                .collect();
            threads
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|_| Err(anyhow!("the thread starting Envoy panicked")))
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Starts Envoy and expects it to exit with a non-zero status within the startup timeout,
    /// e.g. because a Wasm filter refused its configuration. Returns Envoy's log (envoy.log,
    /// then stderr). It is an error if Envoy becomes ready instead (it is then killed), exits
    /// with status 0, or keeps running past the timeout.
    pub fn start_expecting_failure(
        name: &str,
        bootstrap: Value,
        options: &EnvoyOptions,
    ) -> Result<String> {
        let mut envoy = Self::spawn(name, &bootstrap, options)?;
        let deadline = Instant::now() + options.startup_timeout;
        loop {
            if let Some(status) = envoy.try_wait()? {
                if status.success() {
                    bail!(
                        "Envoy `{name}` exited with status 0 but was expected to fail\n{}",
                        envoy.diagnostics()
                    );
                }
                return Ok(envoy.full_log());
            }
            if envoy.admin_ready() {
                envoy.terminate(Duration::ZERO);
                bail!(
                    "Envoy `{name}` became ready but was expected to refuse its configuration\n{}",
                    envoy.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                envoy.terminate(Duration::ZERO);
                bail!(
                    "Envoy `{name}` neither failed nor became ready within {:?}\n{}",
                    options.startup_timeout,
                    envoy.diagnostics()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn spawn(name: &str, bootstrap: &Value, options: &EnvoyOptions) -> Result<Envoy> {
        let binary = envoy_binary()?;
        let admin_port = admin_port(bootstrap)?;
        let run_dir = new_run_dir(name)?;
        let bootstrap_path = run_dir.join("bootstrap.json");
        std::fs::write(&bootstrap_path, serde_json::to_vec_pretty(bootstrap)?)
            .with_context(|| format!("cannot write {}", bootstrap_path.display()))?;

        let mut command = Command::new(&binary);
        command
            .current_dir(&run_dir)
            .arg("-c")
            .arg(&bootstrap_path)
            .arg("--concurrency")
            .arg(options.concurrency.to_string())
            .arg("-l")
            .arg(&options.log_level);
        if let Some(levels) = &options.component_log_level {
            command.arg("--component-log-level").arg(levels);
        }
        command
            // Several Envoys run at once: no shared base id. Hot restart is off because with
            // it on every Envoy leaves a /dev/shm/envoy_shared_memory_* file behind, even on a
            // clean exit.
            .arg("--use-dynamic-base-id")
            .arg("--disable-hot-restart")
            .arg("--log-path")
            .arg(run_dir.join("envoy.log"))
            .arg("--file-flush-interval-msec")
            .arg(options.file_flush_interval.as_millis().max(1).to_string())
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(create_file(&run_dir.join("stdout.log"))?)
            .stderr(create_file(&run_dir.join("stderr.log"))?);
        std::fs::write(run_dir.join("command.txt"), format!("{command:?}\n"))?;

        let child = spawn_tied_to_process(command)
            .with_context(|| format!("cannot start Envoy {}", binary.display()))?;
        Ok(Envoy {
            name: name.to_owned(),
            pid: child.id(),
            child: Some(child),
            admin_port,
            run_dir,
        })
    }

    fn wait_until_ready(&mut self, listeners: &[SocketAddr], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut ready = false;
        let mut waiting_for: Vec<SocketAddr> = listeners.to_vec();
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("Envoy exited with {status}");
            }
            if !ready {
                ready = self.admin_ready();
            }
            if ready {
                waiting_for.retain(|address| {
                    TcpStream::connect_timeout(address, Duration::from_millis(250)).is_err()
                });
                if waiting_for.is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                if ready {
                    bail!("listeners not accepting connections after {timeout:?}: {waiting_for:?}");
                }
                bail!(
                    "admin http://127.0.0.1:{}/ready did not answer 200 within {timeout:?}",
                    self.admin_port
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn admin_ready(&self) -> bool {
        let options = RequestOptions {
            timeout: Duration::from_secs(1),
            ..RequestOptions::default()
        };
        let url = format!("http://127.0.0.1:{}/ready", self.admin_port);
        http_request_with(&options, "GET", &url, &[], "").is_ok_and(|r| r.status == 200)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The directory with bootstrap.json, envoy.log, stdout.log, stderr.log, command.txt.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// GET on the admin interface (`path` like `/stats?format=json`); errors unless 200.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        self.admin_call("GET", path)
    }

    /// POST on the admin interface (`/reset_counters`, `/healthcheck/fail`, ...); errors unless
    /// 200.
    pub fn admin_post(&self, path: &str) -> Result<String> {
        self.admin_call("POST", path)
    }

    fn admin_call(&self, method: &str, path: &str) -> Result<String> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        let response = crate::client::http_request(method, &url, &[], "")
            .with_context(|| format!("Envoy `{}` admin", self.name))?;
        if response.status != 200 {
            bail!(
                "Envoy `{}` admin {method} {path}: status {}: {}",
                self.name,
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }

    /// Every counter and gauge by full name (as `/stats?format=json` lists them, i.e. before
    /// tag extraction). Histograms and text readouts are left out.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let text = self.admin_get("/stats?format=json")?;
        parse_stats_json(&text)
    }

    /// The value of counter or gauge `name`, if Envoy has it (None also if admin is unreachable).
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.stats().ok()?.get(name).copied()
    }

    /// Polls until counter or gauge `name` is at least `minimum`; returns its value.
    pub fn wait_for_counter(&self, name: &str, minimum: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.counter(name);
            if let Some(value) = value.filter(|&value| value >= minimum) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "Envoy `{}`: {name} is {value:?} after {timeout:?}, expected at least {minimum}",
                    self.name
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `/stats/prometheus`: the Prometheus exposition, with stats_tags turned into labels.
    pub fn prometheus(&self) -> Result<String> {
        self.admin_get("/stats/prometheus")
    }

    /// The whole Envoy log so far (envoy.log; reaches disk within `file_flush_interval`).
    pub fn log(&self) -> String {
        read_lossy(&self.run_dir.join("envoy.log"))
    }

    /// Polls the Envoy log until it contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
                bail!(
                    "Envoy `{}`: {needle:?} not in its log after {timeout:?}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            None => Ok(None),
            Some(child) => child.try_wait().context("cannot query the Envoy process"),
        }
    }

    /// SIGTERM, then SIGKILL once `grace` has passed; always reaps. Idempotent.
    fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The child is not reaped until wait() below, so its pid cannot have been reused.
        if let Ok(None) = child.try_wait() {
            if !grace.is_zero() {
                send_signal(self.pid, libc::SIGTERM);
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.kill(); // SIGKILL
        }
        let _ = child.wait();
    }

    fn full_log(&self) -> String {
        let mut log = self.log();
        let stderr = read_lossy(&self.run_dir.join("stderr.log"));
        if !stderr.trim().is_empty() {
            log.push_str("\n--- stderr ---\n");
            log.push_str(&stderr);
        }
        log
    }

    /// The run directory and the tails of envoy.log and stderr, for error messages.
    fn diagnostics(&self) -> String {
        let mut text = format!("run dir: {}\n", self.run_dir.display());
        text.push_str(&format!(
            "--- last {LOG_TAIL_LINES} lines of envoy.log (list of compiled-in extensions left out) ---\n{}",
            tail(&without_extension_list(&self.log()), LOG_TAIL_LINES)
        ));
        let stderr = read_lossy(&self.run_dir.join("stderr.log"));
        if !stderr.trim().is_empty() {
            text.push_str(&format!("\n--- stderr ---\n{}", tail(&stderr, 20)));
        }
        text
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.terminate(TERMINATE_GRACE);
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Parses `/stats?format=json`: `{"stats": [{"name": n, "value": v}, ..., {"histograms": ..}]}`.
/// Entries without a numeric value (histograms, text readouts) are skipped.
pub fn parse_stats_json(text: &str) -> Result<BTreeMap<String, u64>> {
    let json: Value =
        serde_json::from_str(text).context("/stats?format=json did not return JSON")?;
    let entries = json
        .get("stats")
        .and_then(Value::as_array)
        .context("/stats?format=json has no `stats` array")?;
    Ok(entries
        .iter()
        .filter_map(|entry| {
            let name = entry.get("name")?.as_str()?;
            let value = entry.get("value")?;
            let value = value
                .as_u64()
                .or_else(|| value.as_f64().filter(|v| *v >= 0.0).map(|v| v as u64))?;
            Some((name.to_owned(), value))
        })
        .collect())
}

fn admin_port(bootstrap: &Value) -> Result<u16> {
    let port = bootstrap
        .pointer("/admin/address/socket_address/port_value")
        .and_then(Value::as_u64)
        .context("the bootstrap has no admin.address.socket_address.port_value; the harness needs the admin interface")?;
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => bail!("admin port {port} in the bootstrap: use a fixed port, e.g. from free_port()"),
    }
}

/// The TCP addresses of the bootstrap's static listeners (those with a socket address and a
/// fixed port); wildcard addresses are probed on loopback.
fn listener_addresses(bootstrap: &Value) -> Result<Vec<SocketAddr>> {
    let Some(listeners) = bootstrap
        .pointer("/static_resources/listeners")
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    let mut addresses = Vec::new();
    for listener in listeners {
        let Some(socket) = listener.pointer("/address/socket_address") else {
            continue;
        };
        if socket.get("protocol").and_then(Value::as_str) == Some("UDP") {
            continue;
        }
        let port = socket
            .get("port_value")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let Ok(port) = u16::try_from(port) else {
            bail!("listener port {port} is out of range");
        };
        if port == 0 {
            continue;
        }
        let host = match socket.get("address").and_then(Value::as_str) {
            None | Some("0.0.0.0") => "127.0.0.1",
            Some("::") => "::1",
            Some(host) => host,
        };
        let address = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("listener address {host}:{port}"))?
            .next()
            .with_context(|| format!("listener address {host}:{port} does not resolve"))?;
        addresses.push(address);
    }
    Ok(addresses)
}

/// Run directories older than this are deleted when a process starts its first Envoy, so
/// target/e2e-runs does not grow forever.
const RUN_DIR_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

fn new_run_dir(name: &str) -> Result<PathBuf> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static PRUNE: std::sync::Once = std::sync::Once::new();
    let runs_dir = workspace_root().join("target/e2e-runs");
    PRUNE.call_once(|| prune_old_run_dirs(&runs_dir));
    let safe_name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = runs_dir.join(format!(
        "{safe_name}-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    // A leftover from an earlier process that had the same pid.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn prune_old_run_dirs(runs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > RUN_DIR_RETENTION);
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn create_file(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Drops the startup listing of compiled-in extensions (about 100 very long lines that would
/// bury the interesting part of a short log).
fn without_extension_list(log: &str) -> String {
    log.lines()
        .filter(|line| !is_extension_list_line(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `[ts][tid][info][main] [source/server/server.cc:467]   envoy.filters.http: ...`
fn is_extension_list_line(line: &str) -> bool {
    let Some(at) = line.find("[main] [source/server/server.cc:") else {
        return false;
    };
    let rest = &line[at + "[main] [".len()..];
    rest.find("] ")
        .is_some_and(|end| rest[end + 2..].starts_with("  "))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `envoy --mode validate -c <config>` in `working_dir` (where relative paths in the
/// config, such as `dist/<filter>.wasm`, resolve): Envoy builds every listener, cluster and
/// filter, running the Wasm filters' `on_configure`, without serving traffic. Returns whether
/// it accepted the config, and its output.
pub fn validate_config(envoy: &Path, config: &Path, working_dir: &Path) -> (bool, String) {
    let output = Command::new(envoy)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
        ])
        .arg(config)
        .current_dir(working_dir)
        .output();
    match output {
        Ok(output) => (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ),
        Err(error) => (false, format!("cannot run {}: {error}", envoy.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_json_skips_histograms_and_text_readouts() {
        let text = r#"{"stats":[
            {"name":"cluster.app.upstream_rq_total","value":3},
            {"name":"server.version","value":"1.40.0"},
            {"histograms":{"supported_quantiles":[0,25],"computed_quantiles":[]}},
            {"name":"server.live","value":1}
        ]}"#;
        let stats = parse_stats_json(text).unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats["cluster.app.upstream_rq_total"], 3);
        assert_eq!(stats["server.live"], 1);
    }

    #[test]
    fn the_extension_list_is_left_out_of_log_tails() {
        let log = "[t][1][info][main] [source/server/server.cc:463] initializing epoch 0\n\
                   [t][1][info][main] [source/server/server.cc:467]   envoy.filters.http: a, b\n\
                   [t][1][critical][main] [source/server/server.cc:449] error x";
        let kept = without_extension_list(log);
        assert!(kept.contains("initializing epoch 0"));
        assert!(kept.contains("error x"));
        assert!(!kept.contains("envoy.filters.http"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
