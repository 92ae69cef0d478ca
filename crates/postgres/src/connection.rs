//! Opening connections: TLS with rustls, and the server settings every session of the store
//! starts with (`statement_timeout`, `search_path`, untranslated messages).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use taskhistory_core::StoreError;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PgConfig, SslMode, StatementObserver};
use crate::error::from_postgres;
use diesel_async::SimpleAsyncConnection;
use tokio::sync::mpsc;

/// Opens a tokio-postgres connection, with TLS or without as configured, and evaluates
/// `$then` with its client and connection (whose type depends on the TLS choice). With a
/// connector, its session settings (falling back once to translated messages, see
/// `Connector::refused_untranslated`); with `@with`, the settings given.
macro_rules! open {
    ($connector:expr, $op:expr, |$client:ident, $connection:ident| $then:expr) => {{
        let c = $connector;
        if !c.untranslated() {
            open!(@with c, c.tls, c.pg_translated, $op, |$client, $connection| $then)
        } else {
            match open!(@raw c.tls, c.pg, |$client, $connection| $then) {
                Err(e) if c.refused_untranslated(&e) => {
                    open!(@with c, c.tls, c.pg_translated, $op, |$client, $connection| $then)
                }
                Err(e) => return Err(c.named(from_postgres($op, e))),
                Ok(value) => value,
            }
        }
    }};
    (@with $c:expr, $tls:expr, $pg:expr, $op:expr, |$client:ident, $connection:ident| $then:expr) => {
        open!(@raw $tls, $pg, |$client, $connection| $then)
            .map_err(|e| $c.named(from_postgres($op, e)))?
    };
    (@raw $tls:expr, $pg:expr, |$client:ident, $connection:ident| $then:expr) => {
        match &$tls {
            None => match $pg.connect(NoTls).await {
                Ok(($client, $connection)) => Ok($then),
                Err(e) => Err(e),
            },
            Some(tls) => match $pg.connect(tls.clone()).await {
                Ok(($client, $connection)) => Ok($then),
                Err(e) => Err(e),
            },
        }
    };
}

impl Connector {
    /// A connection that could not be made names the server tried (`host:port`), so a
    /// refused connection says where it went.
    pub(crate) fn named(&self, error: StoreError) -> StoreError {
        let StoreError::Unavailable { operation, source } = error else {
            return error;
        };
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .zip(self.pg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect();
        StoreError::Unavailable {
            operation,
            source: format!("{}: {source}", hosts.join(",")).into(),
        }
    }
}

/// The start-up option that asks for untranslated server messages (see [`crate::error`]).
const UNTRANSLATED: &str = " -c lc_messages=C";

/// Opens connections as the configuration says: one place for the pool, the migrator and
/// anything else that needs a connection.
#[derive(Clone)]
pub(crate) struct Connector {
    pg: tokio_postgres::Config,
    /// `pg` without [`UNTRANSLATED`], for a role that may not set `lc_messages`.
    pg_translated: tokio_postgres::Config,
    /// Whether sessions start with untranslated messages: true until the server refuses it.
    untranslated: Arc<AtomicBool>,
    tls: Option<MakeRustlsConnect>,
    observer: Option<StatementObserver>,
    /// Behind a transaction pooler: what each operation's transaction sets first.
    transaction_setup: Option<Arc<str>>,
    /// Where watchers `LISTEN`, when not where the store connects.
    listen: Option<tokio_postgres::Config>,
}

/// Drives a listening connection, passing notification payloads on until it ends.
async fn forward_notifications<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = futures::StreamExt::next(&mut messages).await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if tx.send(n.payload().to_owned()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "taskhistory: the watchers' connection was lost");
                return;
            }
        }
    }
}

/// Wraps a client whose connection already runs, for use behind a transaction pooler:
/// diesel-async's set-up statements (prepared, then executed) run inside one transaction so
/// the pooler keeps them on one server connection.
async fn behind_pooler(
    client: tokio_postgres::Client,
) -> Result<diesel::ConnectionResult<AsyncPgConnection>, StoreError> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| from_postgres("connect", e))?;
    let mut conn = AsyncPgConnection::try_from(client).await;
    if let Ok(c) = &mut conn {
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| crate::error::from_diesel("connect", e))?;
    }
    Ok(conn)
}

/// Hands the SQL text of each statement to the configured observer.
struct Observer(StatementObserver);

impl diesel::connection::Instrumentation for Observer {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = event {
            let text = query.to_string();
            // diesel appends the bound values after this marker; only the SQL is passed on.
            let sql = text.split("-- binds:").next().unwrap_or(&text);
            (self.0)(sql.trim());
        }
    }
}

impl Connector {
    pub(crate) fn new(config: &PgConfig) -> Result<Self, StoreError> {
        let mut pg = config.pg.clone();
        let mut options = format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis().max(1)
        );
        if let Some(schema) = &config.schema {
            // Validated as a plain identifier: no quoting or escaping needed.
            options.push_str(&format!(" -c search_path={schema}"));
        }
        let transaction_setup = config.pgbouncer.then(|| {
            let mut setup = format!(
                "SET LOCAL statement_timeout = {}",
                config.statement_timeout.as_millis().max(1)
            );
            if let Some(schema) = &config.schema {
                setup.push_str(&format!("; SET LOCAL search_path TO {schema}"));
            }
            Arc::from(setup)
        });
        let tls = match config.ssl_mode {
            SslMode::Disable => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
            SslMode::Prefer => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
                Some(MakeRustlsConnect::new(unverified_tls()?))
            }
            SslMode::Require => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(MakeRustlsConnect::new(unverified_tls()?))
            }
            SslMode::VerifyFull => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(MakeRustlsConnect::new(verified_tls(config)?))
            }
        };
        let mut pg_translated = pg.clone();
        if !config.pgbouncer {
            pg_translated.options(&options);
            pg.options(format!("{options}{UNTRANSLATED}"));
        }
        for pg in [&mut pg, &mut pg_translated] {
            pg.connect_timeout(config.connect_timeout);
            pg.keepalives(true).keepalives_idle(Duration::from_secs(60));
        }
        // Behind a pooler no start-up options reach the server: messages are as it speaks.
        let untranslated = Arc::new(AtomicBool::new(!config.pgbouncer));
        if config.pgbouncer {
            tracing::warn!(
                "taskhistory: behind PgBouncer the server's messages reach the store as the \
                 server speaks: timeouts, deadlocks and shutdowns are recognised only on a \
                 server whose lc_messages is English or C"
            );
        }
        Ok(Connector {
            pg,
            pg_translated,
            untranslated,
            tls,
            observer: config.statement_observer.clone(),
            transaction_setup,
            listen: config.listen.clone(),
        })
    }

    /// Behind a transaction pooler, the `SET LOCAL`s each operation's transaction starts
    /// with; `None` on a direct connection.
    pub(crate) fn transaction_setup(&self) -> Option<&str> {
        self.transaction_setup.as_deref()
    }

    /// Opens one connection. Boxed: the handshake's state (TLS included) is about 11 KB,
    /// which every future awaiting it inline would carry, and move, on every call, though
    /// a connection opens once in its life (`docs/performance.md`, "Futures' size").
    pub(crate) fn connect(&self) -> BoxFuture<'_, Result<AsyncPgConnection, StoreError>> {
        Box::pin(self.open_connection())
    }

    /// Opens a connection for reads that share it (direct connections only): its session
    /// runs every statement with its generic plan ([`SHARED_READS_SESSION`](crate::sql::SHARED_READS_SESSION)).
    pub(crate) fn connect_shared(&self) -> BoxFuture<'_, Result<AsyncPgConnection, StoreError>> {
        Box::pin(async move {
            let mut conn = self.open_connection().await?;
            conn.batch_execute(crate::sql::SHARED_READS_SESSION)
                .await
                .map_err(|e| crate::error::from_diesel("connect", e))?;
            Ok(conn)
        })
    }

    async fn open_connection(&self) -> Result<AsyncPgConnection, StoreError> {
        let op = "connect";
        let pooled = self.transaction_setup.is_some();
        let conn = open!(self, op, |client, connection| if pooled {
            tokio::spawn(connection);
            behind_pooler(client).await?
        } else {
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        });
        let mut conn = conn.map_err(|e| StoreError::Unavailable {
            operation: op,
            source: Box::new(e),
        })?;
        if self.transaction_setup.is_some() {
            // A pooler hands each transaction any server connection: a statement must be
            // prepared, run and closed inside one transaction, never cached.
            diesel_async::AsyncConnection::set_prepared_statement_cache_size(
                &mut conn,
                diesel::connection::CacheSize::Disabled,
            );
        }
        if let Some(observer) = &self.observer {
            diesel_async::AsyncConnection::set_instrumentation(
                &mut conn,
                Observer(observer.clone()),
            );
        }
        Ok(conn)
    }

    /// Opens one plain tokio-postgres connection with the pool's settings (start-up options
    /// on a direct connection; behind a pooler the caller runs
    /// [`transaction_setup`](Self::transaction_setup) in each transaction): for COPY, which
    /// diesel-async does not speak. Boxed, as [`connect`](Self::connect).
    pub(crate) fn connect_raw(&self) -> BoxFuture<'_, Result<tokio_postgres::Client, StoreError>> {
        Box::pin(async move {
            let op = "connect";
            Ok(open!(self, op, |client, connection| {
                tokio::spawn(connection);
                client
            }))
        })
    }

    /// Whether the store's sessions get untranslated server messages, which the error map
    /// needs for the SQLSTATEs diesel-async drops (false behind a transaction pooler, or when
    /// the role may not set `lc_messages`: then only an English-speaking server is classified
    /// right, and `health` says so).
    pub(crate) fn untranslated(&self) -> bool {
        self.untranslated.load(Ordering::Relaxed)
    }

    /// Notes that the server refused untranslated messages to this role (insufficient
    /// privilege to set `lc_messages`; PostgreSQL 15+ lets a superuser
    /// `GRANT SET ON PARAMETER lc_messages`, see `least_privilege_grants`), so that sessions
    /// open without asking; `true` when that was the reason `error` refused a session.
    fn refused_untranslated(&self, error: &tokio_postgres::Error) -> bool {
        let refused = error.code()
            == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
            && error
                .as_db_error()
                .is_some_and(|db| db.message().contains("lc_messages"));
        if refused && self.untranslated.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "taskhistory: this role may not set lc_messages, so the server's messages may be \
                 translated and some errors (statement timeout, deadlock, shutdown) may not be \
                 recognised; grant it with `GRANT SET ON PARAMETER lc_messages TO <role>` \
                 (PostgreSQL 15+), or run the server with lc_messages = 'C' or English"
            );
        }
        refused
    }

    /// Hands `sql` to the configured statement observer (statements sent outside diesel).
    pub(crate) fn observe(&self, sql: &str) {
        if let Some(observer) = &self.observer {
            observer(sql.trim());
        }
    }

    /// Whether watchers can `LISTEN` here: not through a transaction pooler, unless a direct
    /// URL for them was given.
    pub(crate) fn can_listen(&self) -> bool {
        self.transaction_setup.is_none() || self.listen.is_some()
    }

    /// Opens a dedicated connection (never pooled) that `LISTEN`s on `channel`. Notification
    /// payloads arrive on the receiver, which ends when the connection is lost; dropping the
    /// client closes it.
    pub(crate) async fn listen(
        &self,
        channel: &str,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), StoreError> {
        let op = "watch";
        let (tx, rx) = mpsc::unbounded_channel();
        let client = match &self.listen {
            // A direct URL of its own (behind a transaction pooler): as given.
            Some(pg) => open!(@with self, self.tls, pg, op, |client, connection| {
                tokio::spawn(forward_notifications(connection, tx.clone()));
                client
            }),
            // The store's own settings, with the same fallback as every other session.
            None => open!(self, op, |client, connection| {
                tokio::spawn(forward_notifications(connection, tx.clone()));
                client
            }),
        };
        // The channel name is built from a validated schema name: a plain identifier.
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .map_err(|e| from_postgres(op, e))?;
        Ok((client, rx))
    }

    /// Asks the server to cancel what `token`'s connection is running (best effort).
    pub(crate) fn cancel(&self, token: tokio_postgres::CancelToken) {
        let tls = self.tls.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let result = match tls {
                    Some(tls) => token.cancel_query(tls).await,
                    None => token.cancel_query(NoTls).await,
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "cancel request failed");
                }
            });
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(reason: impl std::fmt::Display) -> StoreError {
    StoreError::configuration("DB_SSLMODE", format!("TLS set-up failed: {reason}"))
}

fn verified_tls(config: &PgConfig) -> Result<ClientConfig, StoreError> {
    let mut roots = RootCertStore::empty();
    match &config.ssl_root_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::configuration("DB_SSLROOTCERT", format!("{}: {e}", path.display()))
            })?;
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    StoreError::configuration("DB_SSLROOTCERT", format!("{}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::configuration("DB_SSLROOTCERT", format!("{}: {e}", path.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(StoreError::configuration(
                    "DB_SSLROOTCERT",
                    format!("{} holds no certificate", path.display()),
                ));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // Unparseable system certificates are skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn unverified_tls() -> Result<ClientConfig, StoreError> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth())
}

/// sslmode prefer/require: encryption without authentication of the server, as libpq does
/// without a root certificate. Signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
