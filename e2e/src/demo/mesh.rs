//! Starting and stopping the demo mesh: one service process and one Envoy sidecar per
//! service, every process stopped by pid when the [`Mesh`] is dropped (and killed by the
//! kernel if the demo itself dies: see [`crate::process`]).

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::service::Call;
use super::sidecar::{sidecar_bootstrap, Filters, MeshLayout, Ports};
use super::topology::{self, ServiceSpec, SERVICES};
use crate::certs::{TestCa, WorkloadCert};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::paths::free_port;
use crate::process::spawn_tied_to_process;

/// How long one Envoy may take to become ready (four start at once on a small machine).
const ENVOY_STARTUP: Duration = Duration::from_secs(90);
const SERVICE_STARTUP: Duration = Duration::from_secs(15);
const TERMINATE_GRACE: Duration = Duration::from_secs(3);

/// A service process; stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct ServiceProcess {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl ServiceProcess {
    fn spawn(binary: &Path, spec: &ServiceSpec, ports: Ports, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{}.log", spec.name));
        let output = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg(spec.name)
            .arg("--port")
            .arg(ports.app.to_string())
            .arg("--outbound-port")
            .arg(ports.outbound.to_string())
            .arg("--work")
            .arg(spec.work);
        for call in spec.calls {
            let call = Call {
                service: call.service.to_owned(),
                path: call.path.to_owned(),
                probability: call.probability,
                required: call.required,
            };
            command.arg("--call").arg(call.to_arg());
        }
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = spawn_tied_to_process(command)
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(ServiceProcess {
            name: spec.name.to_owned(),
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the service accepts connections on `port`.
    fn wait_until_listening(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "service {} exited with {status}:\n{}",
                        self.name,
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "service {} did not listen on port {port} within {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Not reaped before wait() below, so the pid cannot have been reused.
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + TERMINATE_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// One service of the running mesh.
pub struct MeshService {
    pub spec: &'static ServiceSpec,
    pub ports: Ports,
    /// The sidecar's certificate (SPIFFE id `spiffe://cluster.local/ns/shop/sa/<service>`).
    pub cert: WorkloadCert,
    pub app: ServiceProcess,
    pub sidecar: Envoy,
}

/// The running mesh. Dropping it stops every process it started.
pub struct Mesh {
    // Sidecars and services stop when this is dropped, in field order.
    pub services: Vec<MeshService>,
    pub ca: TestCa,
    pub log_dir: PathBuf,
}

impl Mesh {
    /// Starts the four services, then their sidecars (concurrently, one worker each), with
    /// certificates and logs under `out_dir` (`certs/`, `logs/`).
    pub fn start(service_binary: &Path, out_dir: &Path) -> Result<Mesh> {
        // One worker each: four sidecars, four services and the driver share the machine.
        Mesh::start_with_workers(service_binary, out_dir, 1)
    }

    /// As [`Mesh::start`], with `workers` Envoy worker threads per sidecar (`--concurrency`;
    /// the soak runs two, so the retry budgets are shared across workers as in production).
    pub fn start_with_workers(service_binary: &Path, out_dir: &Path, workers: u32) -> Result<Mesh> {
        let filters = Filters::from_dist()?;
        let log_dir = out_dir.join("logs");
        let cert_dir = out_dir.join("certs");
        for dir in [&log_dir, &cert_dir] {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let ca = TestCa::new_in(topology::TRUST_DOMAIN, &cert_dir)?;
        let all_ports: Vec<(&str, Ports)> = SERVICES
            .iter()
            .map(|spec| {
                let ports = Ports {
                    app: free_port(),
                    inbound: free_port(),
                    outbound: free_port(),
                    admin: free_port(),
                };
                (spec.name, ports)
            })
            .collect();
        let ports_of = |name: &str| {
            all_ports
                .iter()
                .find(|(service, _)| *service == name)
                .map(|(_, ports)| *ports)
                .expect("every service has ports")
        };

        let mut apps = Vec::new();
        for spec in &SERVICES {
            apps.push(ServiceProcess::spawn(
                service_binary,
                spec,
                ports_of(spec.name),
                &log_dir,
            )?);
        }
        for (app, spec) in apps.iter_mut().zip(&SERVICES) {
            app.wait_until_listening(ports_of(spec.name).app, SERVICE_STARTUP)?;
        }

        let layout = MeshLayout {
            ports: &ports_of,
            filters: &filters,
            log_dir: &log_dir,
        };
        let mut bootstraps = Vec::new();
        let mut certs = Vec::new();
        for spec in &SERVICES {
            let cert = ca.issue_workload(topology::NAMESPACE, spec.name)?;
            bootstraps.push(sidecar_bootstrap(spec, &cert, &layout)?);
            certs.push(cert);
        }
        let options = EnvoyOptions {
            concurrency: workers,
            log_level: "warning".into(),
            startup_timeout: ENVOY_STARTUP,
            ..EnvoyOptions::default()
        };
        let started: Vec<Result<Envoy>> = std::thread::scope(|scope| {
            let handles: Vec<_> = SERVICES
                .iter()
                .zip(bootstraps)
                .map(|(spec, config)| {
                    let options = options.clone();
                    scope.spawn(move || {
                        Envoy::start(&format!("demo-{}", spec.name), config, &options)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err(anyhow!("starting an Envoy panicked")))
                })
                .collect()
        });
        // On any failure the Envoys that did start and every service are dropped (stopped).
        let mut sidecars = Vec::new();
        for result in started {
            sidecars.push(result?);
        }
        let services = SERVICES
            .iter()
            .zip(apps)
            .zip(sidecars)
            .zip(certs)
            .map(|(((spec, app), sidecar), cert)| MeshService {
                spec,
                ports: ports_of(spec.name),
                cert,
                app,
                sidecar,
            })
            .collect();
        Ok(Mesh {
            services,
            ca,
            log_dir,
        })
    }

    pub fn service(&self, name: &str) -> Option<&MeshService> {
        self.services
            .iter()
            .find(|service| service.spec.name == name)
    }

    /// Every process the mesh started: (what, pid).
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .flat_map(|service| {
                [
                    (format!("{} service", service.spec.name), service.app.pid()),
                    (
                        format!("{} sidecar", service.spec.name),
                        service.sidecar.pid(),
                    ),
                ]
            })
            .collect()
    }
}
