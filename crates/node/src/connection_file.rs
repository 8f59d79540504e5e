//! The connection file of a `tcp://` front door, after Jupyter's: a JSON
//! file only its owner can read, holding where the front door listens, the
//! token a driver must present, the certificate drivers trust, the node's
//! private key, and the key that signs node links.
//!
//! ```json
//! {"endpoint": "tcp://HOST:PORT", "token": "<64 hex digits>",
//!  "cert": "-----BEGIN CERTIFICATE-----...", "key": "-----BEGIN PRIVATE KEY-----...",
//!  "signing_key": "<64 hex digits>"}
//! ```
//!
//! `up` creates a missing file with a fresh self-signed certificate, token
//! and signing key; an existing one is read as it is, so an operator can put
//! a site certificate in it. A copy for drivers may leave out `key`.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

use crate::endpoint::{self, FrontDoorEndpoint};

/// Names the connection file for `up`, `run`, the CLI's driver commands
/// and the Python driver, when no flag or argument does.
pub const CONNECTION_FILE_VAR: &str = "CASA_NODE_CONNECTION_FILE";

/// Random bytes in the token and the signing key.
const SECRET_BYTES: usize = 32;

/// A connection file that cannot be used.
#[derive(Debug, Error)]
#[error("connection file {path}: {problem}")]
pub struct ConnectionFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

/// The stored form.
#[derive(Serialize, Deserialize)]
struct Stored {
    endpoint: String,
    token: String,
    cert: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    signing_key: String,
}

/// A checked connection file.
#[derive(Clone)]
pub struct ConnectionFile {
    path: PathBuf,
    endpoint: String,
    token: String,
    cert: String,
    key: Option<String>,
    signing_key: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for ConnectionFile {
    /// Names the file and endpoint only: the secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionFile")
            .field("path", &self.path)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ConnectionFile {
    /// Reads and checks the file at `path`: it must be this user's, closed
    /// to group and others, and hold every field in a usable form.
    pub fn read(path: &Path) -> Result<ConnectionFile, ConnectionFileError> {
        let problem = |problem: String| ConnectionFileError {
            path: path.to_owned(),
            problem,
        };
        let mut file = fs::File::open(path).map_err(|e| problem(e.to_string()))?;
        // The open file's metadata, not the path's: what is checked is what
        // is read.
        let meta = file.metadata().map_err(|e| problem(e.to_string()))?;
        let uid = nix::unistd::getuid().as_raw();
        if meta.uid() != uid {
            return Err(problem(format!(
                "belongs to uid {}, not to this user (uid {uid}); a connection file holds secrets and must be its user's own",
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "group or others may access it (mode {mode:03o}); it holds secrets: make it 0600 (`chmod 600 {}`)",
                path.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| problem(e.to_string()))?;
        let stored: Stored =
            serde_json::from_str(&text).map_err(|e| problem(format!("not valid JSON: {e}")))?;
        Self::check(path, stored)
    }

    /// For `up` and `run`: reads the file at `path`, or, when it does not
    /// exist, makes fresh material for a front door at `endpoint` (a
    /// `tcp://HOST:PORT`) without writing it yet; see [`write_new`].
    ///
    /// [`write_new`]: Self::write_new
    pub fn read_or_generate(
        path: &Path,
        endpoint: &FrontDoorEndpoint,
    ) -> Result<(ConnectionFile, bool), ConnectionFileError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Self::read(path).map(|file| (file, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Self::generate(path, endpoint).map(|file| (file, true))
            }
            Err(e) => Err(ConnectionFileError {
                path: path.to_owned(),
                problem: e.to_string(),
            }),
        }
    }

    /// Fresh material: a self-signed certificate for the endpoint's host
    /// (and this machine's loopback names), a token and a signing key.
    fn generate(
        path: &Path,
        endpoint: &FrontDoorEndpoint,
    ) -> Result<ConnectionFile, ConnectionFileError> {
        let problem = |problem: String| ConnectionFileError {
            path: path.to_owned(),
            problem,
        };
        let host = tcp_host(endpoint).ok_or_else(|| {
            problem(format!(
                "{endpoint}: a connection file is for tcp://HOST:PORT front doors"
            ))
        })?;
        let mut names = vec![
            host.clone(),
            crate::hostname(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.sort();
        names.dedup();
        // rcgen makes an IP address SAN of a name that parses as one.
        let mut params = rcgen::CertificateParams::new(names)
            .map_err(|e| problem(format!("making the certificate: {e}")))?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("casa-node front door {host}"),
        );
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        // OpenSSL's strict verification (Python 3.13's default) wants it.
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate()
            .map_err(|e| problem(format!("making the private key: {e}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| problem(format!("making the certificate: {e}")))?;
        let token = random().map_err(&problem)?;
        let signing_key = random().map_err(&problem)?;
        Ok(ConnectionFile {
            path: path.to_owned(),
            endpoint: endpoint.to_string(),
            token: hex(&token),
            cert: cert.pem(),
            key: Some(key.serialize_pem()),
            signing_key,
        })
    }

    fn check(path: &Path, stored: Stored) -> Result<ConnectionFile, ConnectionFileError> {
        let problem = |problem: String| ConnectionFileError {
            path: path.to_owned(),
            problem,
        };
        match stored.endpoint.parse::<FrontDoorEndpoint>() {
            Ok(FrontDoorEndpoint::Tcp(_)) => {}
            Ok(_) => {
                return Err(problem(format!(
                    "\"endpoint\" is {:?}: expected tcp://HOST:PORT",
                    stored.endpoint
                )));
            }
            Err(e) => return Err(problem(format!("\"endpoint\": {e}"))),
        }
        if unhex(&stored.token).is_none() {
            return Err(problem(format!(
                "\"token\" must be {} hex digits",
                2 * SECRET_BYTES
            )));
        }
        let signing_key = unhex(&stored.signing_key).ok_or_else(|| {
            problem(format!(
                "\"signing_key\" must be {} hex digits",
                2 * SECRET_BYTES
            ))
        })?;
        let file = ConnectionFile {
            path: path.to_owned(),
            endpoint: stored.endpoint,
            token: stored.token,
            cert: stored.cert,
            key: stored.key,
            signing_key,
        };
        file.certificates()?;
        if file.key.is_some() {
            file.private_key()?;
        }
        Ok(file)
    }

    /// Writes a file made by [`read_or_generate`](Self::read_or_generate)
    /// with `endpoint` (where the front door listens now: a port chosen by
    /// the system is known once bound). It appears whole, mode 0600, in a
    /// directory made 0700 if missing; if another process made the file
    /// meanwhile, that one is read instead.
    pub fn write_new(
        mut self,
        endpoint: &FrontDoorEndpoint,
    ) -> Result<ConnectionFile, ConnectionFileError> {
        self.endpoint = endpoint.to_string();
        let problem = |problem: String| ConnectionFileError {
            path: self.path.clone(),
            problem,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                endpoint::private_dir(dir).map_err(|e| problem(e.to_string()))?;
            }
        }
        let tmp = self.write_temporary().map_err(|e| problem(e.to_string()))?;
        // A hard link fails if the name exists: the file appears whole, and
        // a file made meanwhile by someone else is never overwritten.
        let linked = fs::hard_link(&tmp, &self.path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(self),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::read(&self.path),
            Err(e) => Err(problem(e.to_string())),
        }
    }

    /// Rewrites the file with `endpoint`, keeping the rest: for a front
    /// door that listens somewhere other than the file said.
    pub fn update_endpoint(
        mut self,
        endpoint: &FrontDoorEndpoint,
    ) -> Result<ConnectionFile, ConnectionFileError> {
        self.endpoint = endpoint.to_string();
        let tmp = self.write_temporary().map_err(|e| ConnectionFileError {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ConnectionFileError {
                path: self.path.clone(),
                problem: e.to_string(),
            }
        })?;
        Ok(self)
    }

    /// The file's contents in a new 0600 file next to it.
    fn write_temporary(&self) -> io::Result<PathBuf> {
        let stored = Stored {
            endpoint: self.endpoint.clone(),
            token: self.token.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            signing_key: hex(&self.signing_key),
        };
        let mut text = serde_json::to_string_pretty(&stored).map_err(io::Error::other)?;
        text.push('\n');
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".tmp{}", std::process::id()));
        let tmp = self.path.with_file_name(name);
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The front door's endpoint, `tcp://HOST:PORT`.
    pub fn endpoint(&self) -> FrontDoorEndpoint {
        self.endpoint
            .parse()
            .expect("checked when the file was read")
    }

    /// The token a driver presents in its `Hello`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The certificate(s) drivers trust, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert
    }

    /// The key that signs messages on node links.
    pub fn signing_key(&self) -> &[u8; SECRET_BYTES] {
        &self.signing_key
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, ConnectionFileError> {
        let certs = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.problem(format!("\"cert\" is not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(self.problem("\"cert\" holds no PEM certificate".into()));
        }
        Ok(certs)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, ConnectionFileError> {
        let Some(key) = &self.key else {
            return Err(self.problem(
                "has no \"key\": the node needs the private key of the certificate".into(),
            ));
        };
        PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| self.problem(format!("\"key\" is not a PEM private key: {e}")))
    }

    fn problem(&self, problem: String) -> ConnectionFileError {
        ConnectionFileError {
            path: self.path.clone(),
            problem,
        }
    }

    /// The TLS settings of the front door: this file's certificate and key.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ConnectionFileError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.problem(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.certificates()?, self.private_key()?)
            .map_err(|e| self.problem(format!("\"cert\" and \"key\": {e}")))?;
        // Drivers hold one long connection and never resume a session; no
        // tickets also means nothing arrives after the handshake that a
        // driver's reading thread would handle while another thread writes.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    /// The TLS settings of a driver: trusts this file's certificate(s) and
    /// nothing else.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, ConnectionFileError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certificates()? {
            roots
                .add(cert)
                .map_err(|e| self.problem(format!("\"cert\": {e}")))?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.problem(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// The crypto of both ends: ring, which builds with a C compiler alone.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The HOST of a `tcp://HOST:PORT`, without an IPv6 address's brackets.
pub fn tcp_host(endpoint: &FrontDoorEndpoint) -> Option<String> {
    let FrontDoorEndpoint::Tcp(addr) = endpoint else {
        return None;
    };
    let (host, _) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(host.to_owned())
}

pub(crate) fn random() -> Result<[u8; SECRET_BYTES], String> {
    let mut bytes = [0u8; SECRET_BYTES];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; SECRET_BYTES]> {
    if text.len() != 2 * SECRET_BYTES || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; SECRET_BYTES];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "casa-node-connection-file-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn endpoint() -> FrontDoorEndpoint {
        "tcp://127.0.0.1:7000".parse().unwrap()
    }

    #[test]
    fn a_new_file_is_private_whole_and_reads_back() {
        let dir = scratch("new");
        let path = dir.join("sub").join("cluster.json");
        let (fresh, created) = ConnectionFile::read_or_generate(&path, &endpoint()).unwrap();
        assert!(created);
        assert!(!path.exists(), "nothing is written before write_new");
        let written = fresh.write_new(&endpoint()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let read = ConnectionFile::read(&path).unwrap();
        assert_eq!(read.token(), written.token());
        assert_eq!(read.token().len(), 64);
        assert_eq!(read.signing_key(), written.signing_key());
        assert_ne!(hex(read.signing_key()), read.token());
        assert_eq!(read.endpoint(), endpoint());
        read.server_config().unwrap();
        read.client_config().unwrap();
        let (again, created) = ConnectionFile::read_or_generate(&path, &endpoint()).unwrap();
        assert!(!created);
        assert_eq!(again.token(), read.token());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_others_can_read_is_refused_naming_the_path() {
        let dir = scratch("open");
        let path = dir.join("cluster.json");
        let (fresh, _) = ConnectionFile::read_or_generate(&path, &endpoint()).unwrap();
        fresh.write_new(&endpoint()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = ConnectionFile::read(&path).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("mode 644"), "{error}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(ConnectionFile::read(&path).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let dir = scratch("bad");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.json");
        let (fresh, _) = ConnectionFile::read_or_generate(&path, &endpoint()).unwrap();
        let good = fresh.write_new(&endpoint()).unwrap();
        let rewrite = |field: &str, value: serde_json::Value| {
            let mut json: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            json[field] = value;
            let tmp = dir.join("edited.json");
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .unwrap();
            file.write_all(json.to_string().as_bytes()).unwrap();
            ConnectionFile::read(&tmp).unwrap_err().to_string()
        };
        assert!(rewrite("token", "abc".into()).contains("\"token\""));
        assert!(rewrite("signing_key", "zz".into()).contains("\"signing_key\""));
        assert!(rewrite("endpoint", "unix:///tmp/x".into()).contains("\"endpoint\""));
        assert!(rewrite("cert", "not pem".into()).contains("\"cert\""));
        assert!(rewrite("key", "not pem".into()).contains("\"key\""));
        drop(good);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A TLS handshake over an in-memory pipe, as a driver naming `name`.
    async fn handshake(file: &ConnectionFile, name: &str) -> Result<(), String> {
        let (near, far) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(file.server_config().unwrap());
        let server = tokio::spawn(async move { acceptor.accept(far).await.map(drop) });
        let connector = tokio_rustls::TlsConnector::from(file.client_config().unwrap());
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let client = connector.connect(name, near).await.map(drop);
        let _ = server.await;
        client.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_certificate_names_the_host_and_loopback() {
        for (host, bare) in [
            ("127.0.0.2", "127.0.0.2"),
            ("[::2]", "::2"),
            ("example.org", "example.org"),
        ] {
            let endpoint: FrontDoorEndpoint = format!("tcp://{host}:1").parse().unwrap();
            assert_eq!(tcp_host(&endpoint).as_deref(), Some(bare));
            let (file, _) =
                ConnectionFile::read_or_generate(Path::new("/nonexistent/x.json"), &endpoint)
                    .unwrap();
            for name in [bare, "localhost", "127.0.0.1", "::1"] {
                handshake(&file, name)
                    .await
                    .unwrap_or_else(|e| panic!("{host}: {name}: {e}"));
            }
            let error = handshake(&file, "elsewhere.example").await.unwrap_err();
            assert!(error.contains("certificate"), "{error}");
        }
    }
}
