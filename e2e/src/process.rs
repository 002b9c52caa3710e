//! Child processes that cannot outlive the test process.
//!
//! On Linux the child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a
//! test binary killed by a timeout, a Ctrl-C or an abort leaves no Envoy behind. The kernel ties
//! that signal to the *thread* that forked the child, not to the process: a child forked by a
//! test thread would be killed as soon as that test thread ends, even though the process lives
//! on (for example when a fixture started by one test is shared with others). So every child is
//! forked by one long-lived spawner thread that exists until the process exits.

use std::io;
use std::process::{Child, Command};

/// Spawns `command` so that the kernel kills it if this process dies.
pub fn spawn_tied_to_process(command: Command) -> io::Result<Child> {
    imp::spawn(command)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::sync::mpsc;
    use std::sync::OnceLock;

    type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

    fn spawner() -> io::Result<&'static mpsc::Sender<SpawnJob>> {
        static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
        if let Some(sender) = SPAWNER.get() {
            return Ok(sender);
        }
        let (sender, jobs) = mpsc::channel::<SpawnJob>();
        // The sender lives in a static and is never dropped, so this thread runs until the
        // process exits; that is what keeps PR_SET_PDEATHSIG from firing early.
        std::thread::Builder::new()
            .name("eastwest-e2e-spawner".into())
            .spawn(move || {
                for (mut command, reply) in jobs {
                    let _ = reply.send(command.spawn());
                }
            })?;
        // If two threads raced here, the loser's spawner thread exits when its sender drops.
        Ok(SPAWNER.get_or_init(|| sender))
    }

    pub(super) fn spawn(mut command: Command) -> io::Result<Child> {
        let parent_pid = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (prctl, getppid); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl ran; then no signal would ever come.
                if libc::getppid() as u32 != parent_pid {
                    return Err(io::Error::other("parent exited while spawning"));
                }
                Ok(())
            });
        }
        let (reply, result) = mpsc::channel();
        spawner()?
            .send((command, reply))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        result
            .recv()
            .map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::process::{Child, Command};

    // Without PR_SET_PDEATHSIG, Drop of the owning handle is the only cleanup.
    pub(super) fn spawn(mut command: Command) -> io::Result<Child> {
        command.spawn()
    }
}
