//! A private RabbitMQ node for the reliability cases (DESIGN §5).
//!
//! A broker restart cannot be done on the broker every other test shares, so the reliability
//! cases run on a node of their own: one per test process, started on first use
//! (`rabbitmq-server -detached`) from a directory of its own, with its own node name, ports and
//! Erlang cookie and none of the machine's `/etc/rabbitmq` settings; stopped when the process
//! exits — by an `atexit` hook on a normal exit, and by a watchdog process when the test process
//! dies without running it (killed on a timeout). No node outlives the test binary.
//!
//! A restart stops the node (SIGTERM: RabbitMQ's graceful shutdown) and starts it again from
//! the same directory, so durable queues and persistent messages survive it exactly as they
//! would a real broker restart. (Not `rabbitmqctl stop_app` / `start_app`: on RabbitMQ 3.10.8
//! here `start_app` cannot bind the AMQP listener again inside the same node — `eaddrinuse` —
//! and leaves the node broken.)
//!
//! A node can also listen for TLS ([`PrivateNode::start_with_tls`]), with certificates the
//! test made, on a second port ([`PrivateNode::amqps_url`]): the TLS tests of the RabbitMQ
//! bridge run against it. Nodes of one process have names, directories and ports of their own.
//!
//! Everything here blocks (it waits for processes and ports; `rabbitmqctl` takes about a second
//! per call): call it from `spawn_blocking`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

/// Where Debian's RabbitMQ keeps `rabbitmq-server` and `rabbitmqctl` (the `/usr/sbin` wrappers
/// would switch to the `rabbitmq` user and its files).
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";
/// Environment variable naming another directory holding `rabbitmq-server` and `rabbitmqctl`.
pub const BIN_DIR_ENV: &str = "PURISTA_RABBITMQ_BIN_DIR";

/// How long a node may take to accept connections (3–5 s here when idle; more when the machine
/// is busy with other tests).
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node may take to stop before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Ports outside Linux's ephemeral range (32768–60999), so that no outgoing connection holds
/// the node's port while it is down for a restart.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TLS listener for a private node: PEM certificates the test made.
#[derive(Clone)]
pub struct TlsListener {
    /// The CA certificate(s) the node trusts for client certificates (`ssl_options.cacertfile`).
    pub ca_certificate_pem: String,
    /// The node's certificate, valid for `127.0.0.1` (and `localhost`).
    pub certificate_pem: String,
    /// The private key of the node's certificate.
    pub key_pem: String,
    /// `true`: a client must present a certificate signed by the CA (`verify_peer` with
    /// `fail_if_no_peer_cert`); `false`: none is asked for (`verify_none`).
    pub require_client_certificate: bool,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field(
                "require_client_certificate",
                &self.require_client_certificate,
            )
            .finish_non_exhaustive()
    }
}

/// A RabbitMQ node this process started.
pub struct PrivateNode {
    name: String,
    port: u16,
    /// The TLS listener's port, when the node has one.
    tls_port: Option<u16>,
    dist_port: u16,
    dir: PathBuf,
    bin_dir: PathBuf,
    /// True from launching the node until it is stopped.
    launched: AtomicBool,
}

impl PrivateNode {
    /// Starts a node for this process. `Err` says why it could not be started.
    pub fn start() -> Result<Arc<PrivateNode>, String> {
        PrivateNode::launch("the reliability cases", "", None)
    }

    /// Starts a node of this process that also listens for TLS (AMQP over TLS on a port of its
    /// own, see [`PrivateNode::amqps_url`]). `Err` says why it could not be started.
    pub fn start_with_tls(tls: TlsListener) -> Result<Arc<PrivateNode>, String> {
        static TLS_NODES: AtomicU32 = AtomicU32::new(0);
        let n = TLS_NODES.fetch_add(1, Ordering::Relaxed);
        PrivateNode::launch("the TLS tests", &format!("-tls{n}"), Some(tls))
    }

    /// `Err(why)` when no node can be started here because RabbitMQ is not installed: a cheap
    /// check, for deciding before anything runs whether the cases that need a node can.
    pub fn installed() -> Result<(), String> {
        let server = Self::bin_dir().join("rabbitmq-server");
        if server.exists() {
            Ok(())
        } else {
            Err(format!(
                "no private RabbitMQ node can be started: {} does not exist (install RabbitMQ or set {BIN_DIR_ENV})",
                server.display()
            ))
        }
    }

    fn bin_dir() -> PathBuf {
        std::env::var_os(BIN_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR))
    }

    /// Starts a node named and placed after this process and `suffix` (unique per node).
    fn launch(
        purpose: &str,
        suffix: &str,
        tls: Option<TlsListener>,
    ) -> Result<Arc<PrivateNode>, String> {
        Self::installed().map_err(|why| format!("{why} (needed for {purpose})"))?;
        let bin_dir = Self::bin_dir();
        let pid = std::process::id();
        let dir = scratch_dir().join(format!("purista-rabbitmq-{pid}{suffix}"));
        prepare_dir(&dir).map_err(|e| format!("preparing {}: {e}", dir.display()))?;
        if let Some(tls) = &tls {
            write_tls_files(&dir, tls).map_err(|e| format!("preparing {}: {e}", dir.display()))?;
        }
        let mut last_error = String::new();
        // A port taken between our check and the node's bind makes the boot fail: try others.
        for attempt in 0..3 {
            let (port, dist_port) = (free_port()?, free_port()?);
            let tls_port = match &tls {
                Some(_) => Some(free_port()?),
                None => None,
            };
            if port == dist_port || tls_port.is_some_and(|t| t == port || t == dist_port) {
                continue;
            }
            let node = PrivateNode {
                name: format!("purista-conformance-{pid}{suffix}@localhost"),
                port,
                tls_port,
                dist_port,
                dir: dir.clone(),
                bin_dir: bin_dir.clone(),
                launched: AtomicBool::new(false),
            };
            if let Some(tls) = &tls {
                node.write_config(tls)
                    .map_err(|e| format!("preparing {}: {e}", dir.display()))?;
            }
            if attempt == 0 {
                node.spawn_watchdog()?;
            }
            match node.boot() {
                Ok(()) => {
                    let node = Arc::new(node);
                    stop_at_exit(node.clone());
                    return Ok(node);
                }
                Err(e) => {
                    node.stop();
                    last_error = e;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "the private RabbitMQ node for {purpose} did not start: {last_error}"
        ))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@127.0.0.1:<tls port>/%2f`, when the node listens for TLS.
    pub fn amqps_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
    }

    /// The TLS listener's port, when the node has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Stops the node and starts it again; returns once it accepts connections.
    pub fn restart(&self) -> Result<(), String> {
        self.stop();
        self.boot()
    }

    /// Stops the node (as a crash of the broker host would look to clients that reconnect: a
    /// refused connection); [`PrivateNode::bring_up`] starts it again from the same directory.
    pub fn take_down(&self) {
        self.stop();
    }

    /// Starts the node again after [`PrivateNode::take_down`]; returns once it accepts
    /// connections.
    pub fn bring_up(&self) -> Result<(), String> {
        self.boot()
    }

    /// Freezes the node's process (SIGSTOP): connections stay open, nothing is answered, new
    /// connections are accepted by the kernel but never greeted, as with a broker stalled by
    /// its host. [`PrivateNode::thaw`] lets it go on.
    /// Returns once every thread of the node is stopped: `kill` only queues the signal, and a
    /// node running on another core answers on until the kernel next interrupts it.
    pub fn freeze(&self) -> Result<(), String> {
        let pid = self.beam_pid().ok_or("the node has no pid file")?;
        signal(pid, libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the node (pid {pid}) did not stop within 10 s of SIGSTOP"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets a frozen node go on (SIGCONT).
    pub fn thaw(&self) -> Result<(), String> {
        let pid = self.beam_pid().ok_or("the node has no pid file")?;
        signal(pid, libc::SIGCONT);
        Ok(())
    }

    /// Sets the node's memory high watermark (a fraction of the machine's memory). A tiny one
    /// (`0.000001`) raises the memory alarm at once: the broker blocks every publishing
    /// connection (`connection.blocked`) until it is set back (RabbitMQ's default is `0.4`).
    pub fn set_memory_high_watermark(&self, fraction: f64) -> Result<(), String> {
        self.ctl(&["set_vm_memory_high_watermark", &format!("{fraction}")])
            .map(drop)
    }

    /// Closes every client connection whose name contains `name_part`; returns how many.
    pub fn close_connections(&self, name_part: &str, reason: &str) -> Result<usize, String> {
        // Table output: one connection per line, `pid<TAB>client_properties`, the pid in the
        // `<node.x.y.z>` form `close_connection` takes.
        let listing = self.ctl(&["list_connections", "pid", "client_properties", "-q"])?;
        let pids: Vec<String> = listing
            .lines()
            .filter(|line| line.contains(name_part))
            .filter_map(|line| line.split('\t').next())
            .map(|pid| pid.trim().to_string())
            .collect();
        // One `rabbitmqctl` each, all at once: each takes about a second to start.
        let closing: Vec<_> = pids
            .iter()
            .map(|pid| {
                self.command("rabbitmqctl")
                    .args(["-n", &self.name, "close_connection", pid, reason])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("running rabbitmqctl: {e}"))
            })
            .collect::<Result<_, _>>()?;
        for child in closing {
            let out = child
                .wait_with_output()
                .map_err(|e| format!("rabbitmqctl close_connection: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "rabbitmqctl close_connection failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(pids.len())
    }

    /// Launches the node and waits until it accepts connections.
    fn boot(&self) -> Result<(), String> {
        self.launched.store(true, Ordering::SeqCst);
        let launched = self
            .command("rabbitmq-server")
            .arg("-detached")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("running rabbitmq-server: {e}"))?;
        if !launched.status.success() {
            return Err(format!(
                "rabbitmq-server -detached failed: {}",
                String::from_utf8_lossy(&launched.stderr).trim()
            ));
        }
        let began = Instant::now();
        // The TLS listener starts with the plain one; wait for every listener anyway.
        let listeners: Vec<SocketAddr> = std::iter::once(self.port)
            .chain(self.tls_port)
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .collect();
        loop {
            let accepting = |address: &SocketAddr| {
                TcpStream::connect_timeout(address, Duration::from_millis(200)).is_ok()
            };
            if listeners.iter().all(accepting) {
                return Ok(());
            }
            // The node writes its pid file early in its boot: a dead pid, or no file long
            // after the launch, means the boot failed (e.g. its port was taken).
            let died = match self.beam_pid() {
                Some(pid) => !alive(pid),
                None => began.elapsed() > Duration::from_secs(15),
            };
            if died {
                return Err(format!(
                    "node {} exited while booting{}",
                    self.name,
                    self.log_errors()
                ));
            }
            if began.elapsed() > BOOT_DEADLINE {
                return Err(format!(
                    "node {} did not accept connections on {listeners:?} within {BOOT_DEADLINE:?}{}",
                    self.name,
                    self.log_errors()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the node gracefully (SIGTERM: RabbitMQ shuts down as `rabbitmqctl stop` would,
    /// without a second's CLI start-up) and waits until its process is gone, killing it past
    /// the deadline.
    fn stop(&self) {
        if !self.launched.swap(false, Ordering::SeqCst) {
            return;
        }
        // A node stopped right after its launch may not have written its pid file yet.
        let began = Instant::now();
        let pid = loop {
            match self.beam_pid() {
                Some(pid) => break Some(pid),
                None if began.elapsed() > Duration::from_secs(10) => break None,
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        match pid {
            Some(pid) => {
                // A frozen node would ignore the SIGTERM until the deadline.
                signal(pid, libc::SIGCONT);
                signal(pid, libc::SIGTERM);
                let began = Instant::now();
                while alive(pid) && began.elapsed() < STOP_DEADLINE {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if alive(pid) {
                    signal(pid, libc::SIGKILL);
                }
            }
            // No pid: ask the node by name, should it be running after all.
            None => drop(self.ctl(&["stop"])),
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Runs `rabbitmqctl -n <node> args…`; its stdout, or why it failed.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out: Output = self
            .command("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output()
            .map_err(|e| format!("running rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {} failed: {} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A RabbitMQ script of this node: its own files, ports, node name and Erlang cookie (in
    /// `HOME`), none of the machine's `/etc/rabbitmq` settings (they name the shared node and
    /// its port).
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new(self.bin_dir.join(script));
        self.apply_env(&mut c);
        c.current_dir(&self.dir).stdin(Stdio::null());
        c
    }

    fn apply_env(&self, c: &mut Command) {
        let d = &self.dir;
        c.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}");
    }

    /// `rabbitmq.conf` with the TLS listener on this node's TLS port, using the files
    /// [`write_tls_files`] put into the node's directory.
    fn write_config(&self, tls: &TlsListener) -> std::io::Result<()> {
        let Some(port) = self.tls_port else {
            return Ok(());
        };
        let files = self.dir.join("tls");
        let verify = if tls.require_client_certificate {
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
        } else {
            "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
        };
        let config = format!(
            "# private node of the purista conformance suite: plain listener from RABBITMQ_NODE_*\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             {verify}",
            files.join("ca.pem").display(),
            files.join("server.pem").display(),
            files.join("server.key").display(),
        );
        std::fs::write(self.dir.join("rabbitmq.conf"), config)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("node.pid")
    }

    fn beam_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The last error lines of the node's log, for a failure message.
    fn log_errors(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("[error]")).collect();
        if errors.is_empty() {
            return format!(" (log: {})", log.display());
        }
        let tail = &errors[errors.len().saturating_sub(3)..];
        format!(" ({}: {})", log.display(), tail.join(" | "))
    }

    /// A process that outlives this one only to stop the node and remove its directory should
    /// this process die without its `atexit` hook (killed). Its own process group, so a signal
    /// to the test's group does not take it along; no stdio, so the test runner does not wait
    /// on it.
    fn spawn_watchdog(&self) -> Result<(), String> {
        // $1: this process, $2: the node's directory, $3: its pid file (written during a boot:
        // wait for it should this process have died in the middle of one).
        const SCRIPT: &str = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
            [ -d "$2" ] || exit 0
            n=0
            while [ ! -s "$3" ] && [ $n -lt 40 ]; do sleep 0.5; n=$((n+1)); done
            if pid=$(cat "$3" 2>/dev/null); then
                kill -CONT "$pid" 2>/dev/null
                kill -TERM "$pid" 2>/dev/null
                n=0
                while kill -0 "$pid" 2>/dev/null && [ $n -lt 60 ]; do sleep 0.5; n=$((n+1)); done
                kill -KILL "$pid" 2>/dev/null
            fi
            rm -rf "$2"
        "#;
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .args(["-c", SCRIPT, "purista-rabbitmq-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(self.pid_file())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(drop)
            .map_err(|e| format!("starting the node's watchdog: {e}"))
    }

    /// Stops the node and removes its directory.
    fn destroy(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where node directories go: memory-backed `/dev/shm` where there is one (a persistent message
/// is confirmed once written; on a disk that is an fsync per batch, and the reliability cases
/// publish 10 000 of them), else the temp dir. The node's data survives its restart either way.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir.join("log"))?;
    std::fs::write(
        dir.join("rabbitmq.conf"),
        "# private node of the purista conformance suite: listener from RABBITMQ_NODE_*\n",
    )?;
    std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
    std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
    let cookie = dir.join(".erlang.cookie");
    std::fs::write(
        &cookie,
        format!("PURISTA{:016X}", rand::rng().random::<u64>()),
    )?;
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
}

/// The node's certificate, key and CA into `<dir>/tls`, readable by this user only.
fn write_tls_files(dir: &Path, tls: &TlsListener) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let files = dir.join("tls");
    std::fs::create_dir_all(&files)?;
    std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(files.join("ca.pem"), &tls.ca_certificate_pem)?;
    std::fs::write(files.join("server.pem"), &tls.certificate_pem)?;
    std::fs::write(files.join("server.key"), &tls.key_pem)
}

/// A port nothing listens on, reserved for this process: no other test process of ours picks
/// it while this one runs.
///
/// A free port alone is not enough: between the pick and the node's bind (seconds, while it
/// boots) and while a node is down for a restart, another test process could pick the same
/// port, and its node would take it. Our boot check would then see a listener on "our" port and
/// hand out another process's node, whose restarts drop our connections. The reservation is an
/// abstract Unix socket named after the port, bound for the life of the process: the kernel
/// refuses a second bind and releases the name when the process ends, however it ends, and no
/// file is left behind.
fn free_port() -> Result<u16, String> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};

    static RESERVED: Mutex<Vec<UnixListener>> = Mutex::new(Vec::new());
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(PORTS);
        let name = format!("purista-conformance-rabbitmq-port-{port}");
        let Ok(address) = UnixAddr::from_abstract_name(name.as_bytes()) else {
            continue;
        };
        let Ok(reservation) = UnixListener::bind_addr(&address) else {
            // Another test process holds this port.
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            RESERVED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(reservation);
            return Ok(port);
        }
    }
    Err(format!("no free port in {PORTS:?}"))
}

/// True while the process runs. A zombie (exited, not yet reaped by its parent — the node is
/// detached, so that is pid 1, which may take its time) counts as gone.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // `pid (comm) S …`: the state follows the last `)`.
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().next().map(|state| state != "Z")
            })
            .unwrap_or(true)
}

/// True when every thread of process `pid` is in the stopped state (`T` in its `stat`).
/// Where `/proc` cannot tell (not Linux), true: the signal has been sent.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    threads.flatten().all(|thread| {
        std::fs::read_to_string(thread.path().join("stat"))
            .ok()
            // The state follows the command name, which is in parentheses and may hold any
            // character: look after the last `)`.
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_none_or(|state| state == 'T' || state == 't')
    })
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: `pid` is the node this process started (read from its pid file).
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The nodes this process started, destroyed when it exits.
static AT_EXIT: Mutex<Vec<Arc<PrivateNode>>> = Mutex::new(Vec::new());

/// Registers `node` to be destroyed when the process exits normally.
fn stop_at_exit(node: Arc<PrivateNode>) {
    extern "C" fn destroy_nodes() {
        let nodes = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
        for node in nodes {
            node.destroy();
        }
    }
    static HOOK: std::sync::Once = std::sync::Once::new();
    AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(node);
    HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn` with no arguments.
        unsafe {
            libc::atexit(destroy_nodes);
        }
    });
}
