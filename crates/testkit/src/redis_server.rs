//! A private `redis-server` per test: its own free port, its own temporary directory, no
//! persistence. The binary comes from `REDIS_SERVER` or `PATH`; when there is none the test
//! fails with a message saying how to install it (never skips).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::{Connection, Value};

/// How long a server may take to accept connections (a guard against hangs, not a timing
/// assertion).
const START_WITHIN: Duration = Duration::from_secs(20);

/// A `redis-server` child process on `127.0.0.1`, stopped when dropped.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
    tls: Option<RedisTls>,
    child: Option<Child>,
    paused: bool,
}

/// TLS material for [`RedisServer::start_tls`] (PEM files).
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// The server certificate chain.
    pub cert_file: PathBuf,
    /// The server key.
    pub key_file: PathBuf,
    /// The CA that signed it (clients verify with it).
    pub ca_file: PathBuf,
}

impl RedisServer {
    /// Starts a server with no password.
    pub fn start() -> Self {
        Self::launch(None, None)
    }

    /// Starts a server whose default user needs `password` (`requirepass`) and that also knows
    /// an ACL user `broker` with the same password.
    pub fn start_with_password(password: &str) -> Self {
        Self::launch(Some(password.to_owned()), None)
    }

    /// Starts a server that speaks TLS only (port is the TLS port), with the files of `tls`.
    pub fn start_tls(tls: RedisTls) -> Self {
        Self::launch(None, Some(tls))
    }

    fn launch(password: Option<String>, tls: Option<RedisTls>) -> Self {
        let binary = redis_binary();
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut server = Self {
            binary,
            port: free_port(),
            dir,
            password,
            tls,
            child: None,
            paused: false,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT` (or `rediss://localhost:PORT` with TLS), without credentials.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no")
            .arg("--maxmemory-policy")
            .arg("noeviction")
            .arg("--loglevel")
            .arg("warning")
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        match &self.tls {
            Some(tls) => {
                cmd.arg("--port")
                    .arg("0")
                    .arg("--tls-port")
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert_file)
                    .arg("--tls-key-file")
                    .arg(&tls.key_file)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca_file)
                    .arg("--tls-auth-clients")
                    .arg("no");
            }
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
        }
        if let Some(pw) = &self.password {
            cmd.arg("--requirepass").arg(pw);
            cmd.args([
                "--user",
                "broker",
                "on",
                &format!(">{pw}"),
                "~*",
                "&*",
                "+@all",
            ]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (set REDIS_SERVER or install redis-server)",
                    self.binary.display()
                )
            });
        self.child = Some(child);
        self.paused = false;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server exited at start ({status}):\n{log}");
            }
            let ready = match self.tls {
                // A TCP connect is all a TLS server can be asked without a TLS client here.
                Some(_) => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
                // Ours, not another test's server that took the port while ours was down
                // (a restart reuses the port): the answering process must be our child.
                None => {
                    let ours = self.pid().map(|pid| format!("process_id:{pid}\r\n"));
                    self.try_connection()
                        .and_then(|mut c| {
                            redis::cmd("INFO")
                                .arg("server")
                                .query::<String>(&mut c)
                                .ok()
                        })
                        .zip(ours)
                        .is_some_and(|(info, ours)| info.contains(&ours))
                }
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not ready within {START_WITHIN:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_connection(&self) -> Option<Connection> {
        let url = match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        };
        redis::Client::open(url)
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()
    }

    /// An admin connection (not for TLS servers).
    pub fn connection(&self) -> Connection {
        assert!(self.tls.is_none(), "no admin connection to a TLS server");
        let conn = self
            .try_connection()
            .expect("admin connection to the test redis-server");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        conn
    }

    /// Runs one command on an admin connection.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut self.connection())
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Every key, with what it holds as raw bytes: strings as they are, hashes as their field
    /// names and values, and each key's `DUMP` serialization besides.
    pub fn dump_all(&self) -> Vec<(String, Vec<u8>)> {
        let mut conn = self.connection();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::new();
        for key in keys {
            let mut bytes: Vec<u8> = redis::cmd("DUMP")
                .arg(&key)
                .query::<Option<Vec<u8>>>(&mut conn)
                .expect("DUMP")
                .unwrap_or_default();
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).expect("TYPE");
            match kind.as_str() {
                "string" => {
                    let v: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).expect("GET");
                    bytes.extend(v);
                }
                "hash" => {
                    let v: Vec<Vec<u8>> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query(&mut conn)
                        .expect("HGETALL");
                    for part in v {
                        bytes.extend(part);
                    }
                }
                _ => {}
            }
            out.push((key, bytes));
        }
        out
    }

    /// `CLIENT KILL TYPE pubsub`: drops every subscriber connection. Returns how many.
    pub fn kill_pubsub_clients(&self) -> usize {
        // Subscribers speaking RESP3 may count as normal clients: kill by the `sub` field.
        let list: String = self.cmd(&["CLIENT", "LIST"]);
        let mut killed = 0;
        for line in list.lines() {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let subscribed =
                field("sub").is_some_and(|n| n != "0") || field("psub").is_some_and(|n| n != "0");
            if let (true, Some(id)) = (subscribed, field("id")) {
                let n: i64 = self.cmd(&["CLIENT", "KILL", "ID", &id]);
                killed += n as usize;
            }
        }
        let by_type: i64 = self.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        killed + by_type as usize
    }

    /// How many clients are subscribed to `channel`.
    pub fn subscribers(&self, channel: &str) -> usize {
        let v: Vec<Value> = self.cmd(&["PUBSUB", "NUMSUB", channel]);
        match v.get(1) {
            Some(Value::Int(n)) => *n as usize,
            _ => 0,
        }
    }

    /// Stops the server (SIGKILL: no persistence to flush) and waits for it to exit. The
    /// port stays this server's for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers. Resumed by
    /// [`RedisServer::resume`] or on drop.
    pub fn pause(&mut self) {
        let pid = self.pid().expect("server running");
        signal(pid, "STOP");
        self.paused = true;
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
        self.paused = false;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// The redis-server binary: `REDIS_SERVER`, else the first `redis-server` on `PATH`.
fn redis_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "REDIS_SERVER={} is not a file; point it at a redis-server binary",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("redis-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found on PATH and REDIS_SERVER is not set: these tests need a \
                 real Redis. Install it (Debian/Ubuntu: `apt-get install redis-server`; \
                 scripts/test-all does this) or set REDIS_SERVER=/path/to/redis-server"
            )
        })
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
