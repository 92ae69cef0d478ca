//! TLS against a real server this test starts: a CA and a server certificate made here, a
//! server that accepts only TLS connections (`hostssl` in pg_hba), `sslmode=verify-full`
//! that works with the right CA and refuses a wrong one or a name the certificate does not
//! carry.
//!
//! The server runs from the installed binaries (`/usr/lib/postgresql/<v>/bin`), as user
//! `postgres` when the test runs as root (initdb refuses root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::json;
use taskhistory_core::{StoreError, TaskHistoryStore, TaskStepResult};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};

fn bin_dir() -> PathBuf {
    taskhistory_testing::postgres_bin_dir().expect(
        "no initdb under /usr/lib/postgresql/*/bin: install the PostgreSQL server \
         (bash scripts/ensure-postgres.sh) to run the TLS tests",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program args...`, as `postgres` when we are root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chown_to_server_user(path: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown {} failed", path.display());
    }
}

/// Starts a server that only accepts TLS, with `cert`/`key`.
fn start_tls_server(cert_pem: &str, key_pem: &str) -> Server {
    let bin = bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    chown_to_server_user(dir.path());
    let out = as_server_user(&bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(data.join("server.crt"), cert_pem).unwrap();
    std::fs::write(data.join("server.key"), key_pem).unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    chown_to_server_user(dir.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let port = free_port();
    let child = as_server_user(&bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", data.display()))
        .args(["-c", "ssl=on", "-c", "fsync=off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Server {
        child,
        port,
        _dir: dir,
    }
}

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn pki() -> Pki {
    let (ca_cert, ca_key) = ca("taskhistory test CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn config(port: u16, host: &str, ca_file: &Path) -> PgConfig {
    PgConfig::from_url(&format!("postgres://postgres@{host}:{port}/postgres"))
        .unwrap()
        .ssl_mode(SslMode::VerifyFull)
        .ssl_root_cert(ca_file)
        .schema("tls_test")
        .pool_size(1, 2)
        .connect_timeout(Duration::from_secs(5))
}

/// Connects, retrying while the server starts.
async fn connect(config: PgConfig) -> Result<PgTaskHistoryStore, StoreError> {
    let mut last = None;
    for _ in 0..100 {
        match PgTaskHistoryStore::connect(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if e.to_string().contains("Connection refused") => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_accepts_the_right_ca_and_refuses_others() {
    let pki = pki();
    let server = start_tls_server(&pki.cert_pem, &pki.key_pem);
    let files = tempfile::tempdir().unwrap();
    let good_ca = files.path().join("ca.pem");
    std::fs::write(&good_ca, &pki.ca_pem).unwrap();
    let (other_ca, _) = ca("some other CA");
    let wrong_ca = files.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, other_ca.pem()).unwrap();

    // The right CA: connects (over TLS: the server takes nothing else) and works.
    let store = connect(config(server.port, "localhost", &good_ca))
        .await
        .unwrap_or_else(|e| panic!("verify-full with the right CA failed: {e}"));
    store.init_database_schema().await.unwrap();
    let step = TaskStepResult::running("s", json!({"tls": true}), "");
    store.save_task_history("u", "t", 0, &step).await.unwrap();
    assert_eq!(
        store.load_task_history("u", "t").await.unwrap()[0].result,
        step
    );
    store.close().await;

    // A wrong CA: refused, with a reason that says why.
    let err = connect(config(server.port, "localhost", &wrong_ca))
        .await
        .expect_err("verify-full trusted a certificate from an unknown CA");
    // A configuration error (no retry cures it; the CLI exits 2), naming what to set.
    assert!(
        matches!(&err, StoreError::Configuration { setting, .. } if setting == "sslrootcert"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let text = err.to_string().to_lowercase();
    assert!(text.contains("certificate"), "{err}");

    // The right CA but a name the certificate does not carry (127.0.0.1): refused too,
    // saying which name was asked for.
    let err = connect(config(server.port, "127.0.0.1", &good_ca))
        .await
        .expect_err("verify-full accepted a certificate for another name");
    assert!(
        matches!(&err, StoreError::Configuration { setting, .. } if setting == "host"),
        "{err:?}"
    );
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    // Without TLS the server refuses: proof that the success above was encrypted.
    let plain = config(server.port, "localhost", &good_ca).ssl_mode(SslMode::Disable);
    let err = connect(plain).await.expect_err("a plain connection got in");
    assert!(err.to_string().contains("no pg_hba.conf entry"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_a_configuration_error() {
    let (ca_cert, ca_key) = ca("taskhistory test CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let server = start_tls_server(&cert.pem(), &key.serialize_pem());
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let err = connect(config(server.port, "localhost", &ca_file))
        .await
        .expect_err("verify-full accepted an expired certificate");
    assert!(
        matches!(&err, StoreError::Configuration { setting, .. } if setting == "sslmode"),
        "{err:?}"
    );
    assert!(err.to_string().contains("validity"), "{err}");
}
