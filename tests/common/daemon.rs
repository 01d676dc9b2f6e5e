//! `submitd serve` run as a real child process, for signals, crashes and logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `submitd serve` as a child process.
pub struct Daemon {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts the binary and waits until it accepts connections.
    pub async fn start(config_path: &Path, submission: SocketAddr, log_path: &Path) -> Self {
        Self::start_with(config_path, submission, log_path, &[], "info").await
    }

    /// Starts the binary with extra global arguments (before `serve`) and a `RUST_LOG` filter.
    pub async fn start_with(
        config_path: &Path,
        submission: SocketAddr,
        log_path: &Path,
        args: &[&str],
        rust_log: &str,
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_submitd"))
            .arg("--config")
            .arg(config_path)
            .args(args)
            .arg("serve")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn submitd serve");
        let mut daemon = Self {
            child: Some(child),
            log_path: log_path.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("submitd exited early with {status}\n{}", daemon.log());
            }
            if tokio::net::TcpStream::connect(submission).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "submitd did not listen on {submission}\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        daemon
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM; waits up to `secs` for the exit and returns the status and how long it took.
    pub async fn terminate(&mut self, secs: u64) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = started + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return (status, started.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "submitd still running {secs}s after SIGTERM\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
