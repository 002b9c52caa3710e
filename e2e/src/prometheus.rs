//! A real Prometheus server (Debian package `prometheus`) on 127.0.0.1 scraping Envoy admin
//! endpoints, for tests that check what users' dashboards and alerts will see.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::client::http_request;
use crate::paths::{free_port, workspace_root};
use crate::process::spawn_tied_to_process;

/// A running Prometheus; stopped by pid (SIGTERM, then SIGKILL) on drop.
pub struct Prometheus {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// `promtool` (from the same Debian package), or an error saying how to install it.
pub fn promtool() -> Result<PathBuf> {
    find("promtool")
}

fn find(binary: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(binary))
                .find(|candidate| candidate.is_file())
        })
        .with_context(|| {
            format!(
                "{binary} not found: install the Debian package `prometheus` \
                 (`apt-get install prometheus`; `cargo xtask test` does this)"
            )
        })
}

impl Prometheus {
    /// Starts Prometheus scraping `/stats/prometheus` of each Envoy admin port every second,
    /// evaluating `rules` (if any) every second, and waits until it is ready.
    pub fn start(name: &str, admin_ports: &[u16], rules: Option<&Path>) -> Result<Prometheus> {
        let binary = find("prometheus")?;
        let port = free_port();
        let dir = workspace_root()
            .join("target/e2e-runs")
            .join(format!("{name}-prometheus-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))?;
        let targets: Vec<String> = admin_ports
            .iter()
            .map(|port| format!("'127.0.0.1:{port}'"))
            .collect();
        let rule_files = match rules {
            Some(path) => format!("rule_files: ['{}']\n", path.display()),
            None => String::new(),
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
             scrape_configs:\n- job_name: envoy\n  metrics_path: /stats/prometheus\n  \
             static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log"))?)
            .stderr(std::fs::File::create(dir.join("stderr.log"))?);
        let child = spawn_tied_to_process(command).context("cannot start prometheus")?;
        let mut prometheus = Prometheus {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http_request("GET", &prometheus.url("/-/ready"), &[], "")
                .is_ok_and(|response| response.status == 200);
            if ready {
                return Ok(prometheus);
            }
            if let Some(child) = prometheus.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("prometheus exited with {status}:\n{}", prometheus.log());
                }
            }
            if Instant::now() > deadline {
                bail!("prometheus was not ready after 30 s:\n{}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Prometheus's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// An instant query: each result's labels and value.
    pub fn query(&self, expr: &str) -> Result<Vec<(serde_json::Map<String, Value>, f64)>> {
        let mut encoded = String::new();
        for byte in expr.bytes() {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        let response = http_request(
            "GET",
            &self.url(&format!("/api/v1/query?query={encoded}")),
            &[],
            "",
        )?;
        let body = response.try_json()?;
        if body["status"] != "success" {
            bail!("query {expr:?} failed: {body}");
        }
        let results = body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(results
            .into_iter()
            .filter_map(|result| {
                let labels = result["metric"].as_object()?.clone();
                let value = result["value"][1].as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect())
    }

    /// Polls `expr` until `accept` says yes for its results, or `timeout` passes; returns the
    /// last results either way.
    pub fn wait_for(
        &self,
        expr: &str,
        timeout: Duration,
        accept: impl Fn(&[(serde_json::Map<String, Value>, f64)]) -> bool,
    ) -> Result<Vec<(serde_json::Map<String, Value>, f64)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let results = self.query(expr)?;
            if accept(&results) || Instant::now() > deadline {
                return Ok(results);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
