//! Live configuration changes: an Envoy whose listeners come from a file it watches
//! (`dynamic_resources.lds_config.path_config_source` with a `watched_directory`, the way a
//! static Envoy takes new listeners without a restart), and what the tests push into it.
//!
//! A push writes the whole listener set (LDS is state of the world) to a temporary file in
//! the watched directory and renames it over `lds.json`: Envoy reloads on the rename, never
//! on a half-written file. [`LiveEnvoy::push`] then waits until Envoy says how the update went
//! (`listener_manager.lds.update_success` or `update_rejected` moves).
//!
//! ```no_run
//! use eastwest_e2e::live_config::{LiveEnvoy, PushOutcome};
//! # fn f(listener: serde_json::Value, new_listener: serde_json::Value,
//! #      bootstrap: serde_json::Value) -> anyhow::Result<()> {
//! let envoy = LiveEnvoy::start("live", bootstrap, &[listener], &Default::default())?;
//! assert_eq!(envoy.push(&[new_listener])?, PushOutcome::Accepted);
//! # Ok(()) }
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::envoy::{Envoy, EnvoyOptions};
use crate::load::{self, LoadPlan, LoadReport};

/// The file Envoy reads the listeners from, inside the watched directory.
pub const LDS_FILE: &str = "lds.json";
/// How long a push may take to be accepted or rejected.
const PUSH_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// The `@type` of a listener resource.
const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// What Envoy did with a pushed listener set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// `listener_manager.lds.update_success` moved.
    Accepted,
    /// `listener_manager.lds.update_rejected` moved: the old listeners keep serving.
    Rejected,
}

/// `bootstrap` (from [`crate::bootstrap()`], its static listeners ignored) with its listeners
/// taken from `<lds_dir>/lds.json` instead, reloaded whenever a file is moved into `lds_dir`.
pub fn with_file_listeners(mut bootstrap: Value, lds_dir: &Path) -> Value {
    if let Some(resources) = bootstrap
        .get_mut("static_resources")
        .and_then(Value::as_object_mut)
    {
        resources.remove("listeners");
    }
    bootstrap["dynamic_resources"] = json!({
        "lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": lds_dir.join(LDS_FILE).display().to_string(),
                "watched_directory": {"path": lds_dir.display().to_string()},
            },
        },
    });
    bootstrap
}

/// Writes `listeners` as the LDS file of `lds_dir`, atomically (a rename within the
/// directory, which is also what makes Envoy reload).
pub fn write_listeners(lds_dir: &Path, listeners: &[Value], version: u64) -> Result<()> {
    write_resources(lds_dir, LDS_FILE, LISTENER_TYPE, listeners, version)
}

/// Writes `resources` (each given its `@type`) as the discovery file `file` of `dir`,
/// atomically.
fn write_resources(
    dir: &Path,
    file: &str,
    type_url: &str,
    resources: &[Value],
    version: u64,
) -> Result<()> {
    let resources: Vec<Value> = resources
        .iter()
        .map(|resource| {
            let mut resource = resource.clone();
            resource["@type"] = json!(type_url);
            resource
        })
        .collect();
    let document = json!({"version_info": version.to_string(), "resources": resources});
    let staging = dir.join(format!(".{file}.{version}.tmp"));
    std::fs::write(&staging, serde_json::to_vec_pretty(&document)?)
        .with_context(|| format!("cannot write {}", staging.display()))?;
    std::fs::rename(&staging, dir.join(file))
        .with_context(|| format!("cannot move {} into place", staging.display()))
}

/// The file an HTTP filter's configuration is discovered from (ECDS), in the watched
/// directory.
pub const ECDS_FILE: &str = "ecds.json";
const EXTENSION_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// An HTTP filter entry whose configuration Envoy discovers from `<dir>/ecds.json` (extension
/// config discovery, as Istio delivers WasmPlugins): `name` must match the resource's name
/// ([`LiveEnvoy::push_filter`]).
pub fn discovered_filter(name: &str, dir: &Path, type_url: &str) -> Value {
    json!({
        "name": name,
        "config_discovery": {
            "config_source": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": dir.join(ECDS_FILE).display().to_string(),
                    "watched_directory": {"path": dir.display().to_string()},
                },
            },
            "type_urls": [type_url],
        },
    })
}

/// An Envoy whose listeners are pushed through a watched file. Dropping it stops Envoy and
/// removes the directory.
pub struct LiveEnvoy {
    envoy: Envoy,
    lds_dir: tempfile::TempDir,
    version: AtomicU64,
}

impl LiveEnvoy {
    /// Starts Envoy on `bootstrap` (see [`with_file_listeners`]) with `listeners` as the first
    /// listener set, and waits until every listener accepts connections.
    pub fn start(
        name: &str,
        bootstrap: Value,
        listeners: &[Value],
        options: &EnvoyOptions,
    ) -> Result<LiveEnvoy> {
        let lds_dir = tempfile::Builder::new()
            .prefix(&format!("eastwest-lds-{name}-"))
            .tempdir()
            .context("cannot create the LDS directory")?;
        Self::start_in(lds_dir, name, bootstrap, listeners, options)
    }

    /// Like [`Self::start`], with the HTTP filter `filter` (as [`crate::bootstrap::wasm_filter`]
    /// builds it) discovered through ECDS from the same directory: `listener` gets the
    /// discovering filter entry to put in its chain and returns the listener. Push new
    /// configurations of the filter with [`Self::push_filter`].
    pub fn start_discovering(
        name: &str,
        bootstrap: Value,
        filter: &Value,
        listener: impl FnOnce(Value) -> Value,
        options: &EnvoyOptions,
    ) -> Result<LiveEnvoy> {
        let lds_dir = tempfile::Builder::new()
            .prefix(&format!("eastwest-lds-{name}-"))
            .tempdir()
            .context("cannot create the LDS directory")?;
        let filter_name = filter["name"].as_str().context("the filter has no name")?;
        let type_url = filter["typed_config"]["@type"]
            .as_str()
            .context("the filter's typed_config has no @type")?;
        let resource = json!({"name": filter_name, "typed_config": filter["typed_config"]});
        write_resources(
            lds_dir.path(),
            ECDS_FILE,
            EXTENSION_CONFIG_TYPE,
            &[resource],
            1,
        )?;
        let discovered = discovered_filter(filter_name, lds_dir.path(), type_url);
        Self::start_in(lds_dir, name, bootstrap, &[listener(discovered)], options)
    }

    fn start_in(
        lds_dir: tempfile::TempDir,
        name: &str,
        bootstrap: Value,
        listeners: &[Value],
        options: &EnvoyOptions,
    ) -> Result<LiveEnvoy> {
        write_listeners(lds_dir.path(), listeners, 1)?;
        let envoy = Envoy::start(
            name,
            with_file_listeners(bootstrap, lds_dir.path()),
            options,
        )?;
        let live = LiveEnvoy {
            envoy,
            lds_dir,
            version: AtomicU64::new(1),
        };
        // Envoy is ready once LDS has been read, but a listener binds on the workers a moment
        // later.
        for port in listeners.iter().filter_map(listener_port) {
            live.wait_until_listening(port, options.startup_timeout)?;
        }
        Ok(live)
    }

    pub fn envoy(&self) -> &Envoy {
        &self.envoy
    }

    pub fn lds_dir(&self) -> &Path {
        self.lds_dir.path()
    }

    /// Pushes a new listener set and waits until Envoy accepted or rejected it.
    pub fn push(&self, listeners: &[Value]) -> Result<PushOutcome> {
        let counter = |name: &str| self.envoy.counter(name).unwrap_or(0);
        let (success, rejected) = (
            counter("listener_manager.lds.update_success"),
            counter("listener_manager.lds.update_rejected"),
        );
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        write_listeners(self.lds_dir.path(), listeners, version)?;
        let deadline = Instant::now() + PUSH_TIMEOUT;
        loop {
            let stats = self.envoy.stats()?;
            let now = |name: &str| stats.get(name).copied().unwrap_or(0);
            if now("listener_manager.lds.update_rejected") > rejected {
                return Ok(PushOutcome::Rejected);
            }
            if now("listener_manager.lds.update_success") > success {
                return Ok(PushOutcome::Accepted);
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy `{}` neither accepted nor rejected listener version {version} within \
                     {PUSH_TIMEOUT:?} (run dir {})",
                    self.envoy.name(),
                    self.envoy.run_dir().display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Pushes a new configuration of the discovered HTTP filter `filter` (an HTTP filter
    /// entry as [`crate::bootstrap::wasm_filter`] builds it: its `typed_config` becomes the
    /// resource) and waits until Envoy took it or refused it
    /// (`extension_config_discovery.http_filter.<name>.config_reload` / `config_fail`).
    pub fn push_filter(&self, filter: &Value) -> Result<PushOutcome> {
        let name = filter["name"].as_str().context("the filter has no name")?;
        let stat = |what: &str| format!("extension_config_discovery.http_filter.{name}.{what}");
        let counter = |name: &str| self.envoy.counter(name).unwrap_or(0);
        let (reloaded, failed) = (
            counter(&stat("config_reload")),
            counter(&stat("config_fail")),
        );
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        let resource = json!({"name": name, "typed_config": filter["typed_config"]});
        write_resources(
            self.lds_dir.path(),
            ECDS_FILE,
            EXTENSION_CONFIG_TYPE,
            &[resource],
            version,
        )?;
        let deadline = Instant::now() + PUSH_TIMEOUT;
        loop {
            let stats = self.envoy.stats()?;
            let now = |name: &str| stats.get(name).copied().unwrap_or(0);
            if now(&stat("config_fail")) > failed {
                return Ok(PushOutcome::Rejected);
            }
            if now(&stat("config_reload")) > reloaded {
                return Ok(PushOutcome::Accepted);
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy `{}` neither took nor refused configuration {version} of {name} within \
                     {PUSH_TIMEOUT:?} (run dir {})",
                    self.envoy.name(),
                    self.envoy.run_dir().display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn wait_until_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "Envoy `{}`: no listener on port {port} after {timeout:?} (run dir {})",
                    self.envoy.name(),
                    self.envoy.run_dir().display()
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

fn listener_port(listener: &Value) -> Option<u16> {
    listener
        .pointer("/address/socket_address/port_value")?
        .as_u64()?
        .try_into()
        .ok()
}

/// Polls `check` every 50 ms until it returns true; returns how long that took. Errors after
/// `timeout`, naming `what`.
pub fn time_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if check() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("{what}: not seen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A load that runs in a thread while the test changes the configuration; [`Self::finish`]
/// waits for it (it is bounded by its plan's count and `max_duration`).
pub struct BackgroundLoad {
    thread: std::thread::JoinHandle<Result<LoadReport>>,
}

impl BackgroundLoad {
    /// Starts `plan` (give it a `rate` and a `max_duration`).
    pub fn start(plan: LoadPlan) -> BackgroundLoad {
        BackgroundLoad {
            thread: std::thread::spawn(move || load::run(&plan)),
        }
    }

    pub fn finish(self) -> Result<LoadReport> {
        match self.thread.join() {
            Ok(report) => report,
            Err(_) => bail!("the load generator's thread panicked"),
        }
    }
}

/// One HTTP/1.1 keep-alive connection, kept open across configuration changes: Envoy keeps an
/// established connection on the filter chain it was accepted with until the connection is
/// drained, and this is how a test sees that.
pub struct KeepAliveConnection {
    stream: TcpStream,
}

impl KeepAliveConnection {
    pub fn open(port: u16) -> Result<KeepAliveConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(KeepAliveConnection { stream })
    }

    /// GET `path` on this connection; the response's status and body (`content-length`
    /// framed, as Envoy forwards the test app's answers).
    pub fn get(&mut self, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        write!(
            self.stream,
            "GET {path} HTTP/1.1\r\nhost: keep-alive\r\n\r\n"
        )
        .context("sending on the kept-alive connection")?;
        let mut received = Vec::new();
        let mut buffer = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let read = self.stream.read(&mut buffer)?;
            if read == 0 {
                bail!("the kept-alive connection was closed");
            }
            received.extend_from_slice(&buffer[..read]);
        };
        let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|status| status.parse().ok())
            .context("no status line")?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .context("no content-length")?;
        while received.len() < head_end + length {
            let read = self.stream.read(&mut buffer)?;
            if read == 0 {
                bail!("the kept-alive connection was closed mid-body");
            }
            received.extend_from_slice(&buffer[..read]);
        }
        Ok((
            status,
            String::from_utf8_lossy(&received[head_end..head_end + length]).into_owned(),
        ))
    }
}

/// A copy of the Wasm module at `source` in `dir`, with a custom section named
/// `eastwest-build` holding `build` appended: a different file with a different sha256 (a new
/// module version to Envoy, which keys its VMs by the code's hash) that behaves the same.
pub fn module_version(source: &Path, dir: &Path, build: &str) -> Result<PathBuf> {
    let mut bytes =
        std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
    if bytes.get(..4) != Some(b"\0asm") {
        bail!("{} is not a Wasm module", source.display());
    }
    let name = b"eastwest-build";
    let mut payload = leb128(name.len());
    payload.extend_from_slice(name);
    payload.extend_from_slice(build.as_bytes());
    bytes.push(0); // custom section
    bytes.extend(leb128(payload.len()));
    bytes.extend(payload);
    let stem = source
        .file_stem()
        .map_or("module".into(), |stem| stem.to_string_lossy());
    let path = dir.join(format!("{stem}-{build}.wasm"));
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn leb128(mut value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_move_from_static_resources_to_the_watched_file() {
        let bootstrap = json!({"static_resources": {"listeners": [], "clusters": [{"name": "c"}]}});
        let config = with_file_listeners(bootstrap, Path::new("/lds"));
        assert!(config["static_resources"].get("listeners").is_none());
        assert_eq!(config["static_resources"]["clusters"][0]["name"], "c");
        let source = &config["dynamic_resources"]["lds_config"]["path_config_source"];
        assert_eq!(source["path"], "/lds/lds.json");
        assert_eq!(source["watched_directory"]["path"], "/lds");
    }

    #[test]
    fn a_push_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_listeners(dir.path(), &[json!({"name": "a"})], 7).unwrap();
        let written: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(LDS_FILE)).unwrap()).unwrap();
        assert_eq!(written["version_info"], "7");
        assert_eq!(written["resources"][0]["@type"], LISTENER_TYPE);
        assert_eq!(written["resources"][0]["name"], "a");
        // Nothing but the file itself is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_module_version_is_the_same_module_with_a_custom_section() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.wasm");
        // The smallest module: magic and version.
        std::fs::write(&source, b"\0asm\x01\0\0\0").unwrap();
        let copy = module_version(&source, dir.path(), "v2").unwrap();
        let bytes = std::fs::read(&copy).unwrap();
        assert_eq!(&bytes[..8], b"\0asm\x01\0\0\0");
        assert_eq!(bytes[8], 0, "a custom section");
        assert_eq!(usize::from(bytes[9]), bytes.len() - 10);
        assert!(bytes.ends_with(b"eastwest-buildv2"));
        assert_eq!(leb128(300), [0xac, 0x02]);
    }
}
