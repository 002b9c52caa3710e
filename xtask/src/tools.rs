//! Tools the commands need, installed on first use so a fresh machine (or CI) needs nothing
//! but Rust: Debian packages through apt, and wasm-bindgen's test runner through cargo.

use std::path::{Path, PathBuf};

use crate::error::{bail, Error, Result};
use crate::process::{find_on_path, is_executable, Cmd};
use crate::workspace::Workspace;

/// Finds `binary` on PATH, installing `debian_package` with apt when it is missing.
/// `why` completes "it is needed ...", e.g. "to generate load for `cargo xtask bench`".
pub fn ensure_tool(binary: &str, debian_package: &str, why: &str) -> Result<PathBuf> {
    if let Some(path) = find_on_path(binary) {
        return Ok(path);
    }
    println!("`{binary}` is not on PATH; it is needed {why}.");
    install_debian_package(debian_package).map_err(|e| {
        Error::msg(format!(
            "`{binary}` is needed {why}, and installing it failed: {e}\n\
             Install it by hand (Debian/Ubuntu: `apt-get install {debian_package}`) and run again."
        ))
    })?;
    find_on_path(binary).ok_or_else(|| {
        Error::msg(format!(
            "installed the Debian package `{debian_package}`, but `{binary}` is still not on \
             PATH; install `{binary}` by hand and run again"
        ))
    })
}

/// `apt-get install -y <package>`, as root or through sudo; `apt-get update` and one retry
/// when the install fails (a fresh machine often has no package lists yet).
pub fn install_debian_package(package: &str) -> Result<()> {
    if find_on_path("apt-get").is_none() {
        bail!("apt-get is not available on this machine");
    }
    let as_root = |args: &[&str]| -> Cmd {
        let apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"];
        if is_root() {
            Cmd::new(apt[0]).args(&apt[1..]).args(args)
        } else {
            Cmd::new("sudo").args(apt).args(args)
        }
    };
    if !is_root() && find_on_path("sudo").is_none() {
        bail!("installing a Debian package needs root, and this user is not root and has no sudo");
    }
    println!("Installing the Debian package `{package}`.");
    if as_root(&["install", "-y", package]).run().is_ok() {
        return Ok(());
    }
    println!("The install failed; refreshing the package lists and trying once more.");
    as_root(&["update"]).run()?;
    as_root(&["install", "-y", package]).run()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of this process.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The `wasm-bindgen-test-runner` whose version equals `wasm_bindgen_version` (the
/// `wasm-bindgen` in Cargo.lock; the runner refuses modules from any other version), installed
/// into `.eastwest/tools` on first use.
pub fn wasm_bindgen_test_runner(ws: &Workspace, wasm_bindgen_version: &str) -> Result<PathBuf> {
    let root = ws.local_tools_dir().join("tools");
    let runner = root.join("bin").join("wasm-bindgen-test-runner");
    let installed = installed_runner_version(&runner);
    if installed.as_deref() == Some(wasm_bindgen_version) {
        return Ok(runner);
    }
    match installed {
        Some(other) => println!(
            "The wasm unit tests need wasm-bindgen-test-runner {wasm_bindgen_version} (the \
             wasm-bindgen version in Cargo.lock), but .eastwest/tools has {other}. Installing \
             wasm-bindgen-cli {wasm_bindgen_version} (compiles from source: a few minutes)."
        ),
        None => println!(
            "The wasm unit tests run under wasm-bindgen-test-runner, which must be the same \
             version as wasm-bindgen in Cargo.lock ({wasm_bindgen_version}). Installing \
             wasm-bindgen-cli {wasm_bindgen_version} into .eastwest/tools (project-local, \
             git-ignored; compiles from source once: a few minutes, then it is reused)."
        ),
    }
    let install = |locked: bool| {
        Cmd::cargo()
            .arg("install")
            .args(locked.then_some("--locked"))
            .args(["wasm-bindgen-cli", "--version", wasm_bindgen_version])
            // Only the runner: the other binaries would add link time for nothing.
            .args(["--bin", "wasm-bindgen-test-runner", "--root"])
            .arg(&root)
            .current_dir(&ws.root)
            .run()
    };
    if install(true).is_err() {
        // Seen with 0.2.130: its Cargo.lock pins webpki-roots 1.0.11, which the registry this
        // project reaches does not have. wasm-bindgen-cli pins its own wasm-bindgen crates
        // exactly, so the runner's version is the same either way.
        println!(
            "The install with wasm-bindgen-cli's own Cargo.lock failed; trying once more with \
             the newest compatible dependencies."
        );
        install(false)?;
    }
    match installed_runner_version(&runner) {
        Some(v) if v == wasm_bindgen_version => Ok(runner),
        found => bail!(
            "after installing wasm-bindgen-cli {wasm_bindgen_version}, {} reports version {}; \
             remove .eastwest/tools and run again",
            runner.display(),
            found.unwrap_or_else(|| "nothing".into())
        ),
    }
}

fn installed_runner_version(runner: &Path) -> Option<String> {
    if !is_executable(runner) {
        return None;
    }
    let output = Cmd::new(runner).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    parse_runner_version(&String::from_utf8_lossy(&output.stdout))
}

/// `wasm-bindgen-test-runner 0.2.100` -> `0.2.100`.
fn parse_runner_version(version_output: &str) -> Option<String> {
    let version = version_output.split_whitespace().nth(1)?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_version_is_the_second_word() {
        assert_eq!(
            parse_runner_version("wasm-bindgen-test-runner 0.2.100\n").as_deref(),
            Some("0.2.100")
        );
        assert_eq!(parse_runner_version("error: unknown flag"), None);
        assert_eq!(parse_runner_version(""), None);
    }

    #[test]
    fn a_tool_already_on_path_is_found_without_installing() {
        let sh = ensure_tool("sh", "dash", "for this test").unwrap();
        assert!(sh.ends_with("sh"));
    }
}
