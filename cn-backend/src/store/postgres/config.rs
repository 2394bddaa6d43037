//! Where and how the PostgreSQL engine connects: the `postgres://` URL and its options
//! (`sslmode`, `sslrootcert`, pool size), and the rustls connector that checks the server against
//! the CA given there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::store::StoreError;

/// Where and how to connect, parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct PgConfig {
    pub(super) config: postgres::Config,
    /// CA certificate file for TLS (`sslrootcert`); TLS is used iff set.
    pub(super) ca: Option<PathBuf>,
    /// Idle connections kept open for reuse.
    pub max_idle: usize,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the password.
        f.debug_struct("PgConfig")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("ca", &self.ca)
            .finish()
    }
}

/// Whether `url` selects the PostgreSQL engine.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl PgConfig {
    /// Parses a `postgres://user:password@host:port/dbname?…` URL (without a password in it,
    /// `PGPASSWORD` is used if set). Besides what the driver
    /// understands (`host=/socket/dir`, `connect_timeout`, …) it takes `sslmode=disable` or
    /// `sslmode=verify-full` with `sslrootcert=/path/ca.pem`. Without TLS, every host must be a
    /// Unix socket directory or a loopback address.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad = |m: String| StoreError::Database(format!("store URL: {m}"));
        if !is_postgres_url(url) {
            return Err(bad("expected postgres://…".into()));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut sslmode = None;
        let mut ca = None;
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => ca = Some(PathBuf::from(v)),
                _ => rest.push(kv),
            }
        }
        let stripped = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config: postgres::Config = stripped
            .parse()
            .map_err(|e: postgres::Error| bad(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("cn-backend");
        // Server notices ("relation … already exists, skipping" from the idempotent first
        // migration step, on every start against an existing database) are detail for
        // debugging; the driver would log them at info, in front of the one line a failed start
        // prints.
        config.notice_callback(|n| {
            tracing::debug!(
                severity = n.severity(),
                "PostgreSQL notice: {}",
                n.message()
            );
        });
        // A password kept out of the (world-readable) configuration file.
        if config.get_password().is_none()
            && let Some(pw) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty())
        {
            config.password(pw.as_encoded_bytes());
        }
        match sslmode.as_deref() {
            Some("verify-full") => {
                if ca.is_none() {
                    return Err(bad(
                        "sslmode=verify-full needs sslrootcert=/path/ca.pem".into()
                    ));
                }
                config.ssl_mode(postgres::config::SslMode::Require);
            }
            None | Some("disable") => {
                if ca.is_some() {
                    return Err(bad("sslrootcert given without sslmode=verify-full".into()));
                }
                ca = None;
                let local = config.get_hosts().iter().all(|h| match h {
                    postgres::config::Host::Unix(_) => true,
                    postgres::config::Host::Tcp(name) => {
                        name == "localhost"
                            || name
                                .parse::<std::net::IpAddr>()
                                .is_ok_and(|a| a.is_loopback())
                    }
                });
                if !local {
                    return Err(bad(
                        "a connection without TLS is allowed only over a Unix socket or to a \
                         loopback address; add sslmode=verify-full&sslrootcert=/path/ca.pem"
                            .into(),
                    ));
                }
                config.ssl_mode(postgres::config::SslMode::Disable);
            }
            Some(other) => {
                return Err(bad(format!(
                    "sslmode={other} is not supported (use verify-full, or disable for a local \
                     socket)"
                )));
            }
        }
        Ok(Self {
            config,
            ca,
            max_idle: 8,
        })
    }
}

pub(super) fn tls_connector(
    ca: &PathBuf,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |m: String| StoreError::Database(format!("sslrootcert {}: {m}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
