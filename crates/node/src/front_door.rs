//! The front door: the stream socket drivers connect to. Each connection
//! is one driver; frames are length-delimited protobuf `Envelope`s (tokio
//! util's `LengthDelimitedCodec`: a 4-byte big-endian length, then the
//! bytes). The connection tasks only move frames: every decision is the
//! client node's.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use casa_node_protocol::pb::{Envelope, ProtocolErrorCode};
use casa_node_protocol::{DriverId, Framing};
use futures::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::endpoint::FrontDoorEndpoint;

/// What the connection tasks report to the client node.
#[derive(Debug)]
pub enum DriverEvent {
    /// A driver connected; envelopes for it go into `outbox`, and dropping
    /// the sender closes the connection once what was queued is written.
    Connected {
        /// The new driver.
        driver: DriverId,
        /// Its outgoing queue.
        outbox: mpsc::UnboundedSender<Envelope>,
    },
    /// A driver sent an envelope.
    Request {
        /// The driver.
        driver: DriverId,
        /// What it sent.
        envelope: Envelope,
    },
    /// A driver's connection closed.
    Disconnected {
        /// The driver.
        driver: DriverId,
    },
}

/// The front door could not be opened.
#[derive(Debug, Error)]
pub enum FrontDoorError {
    /// Plain TCP would expose the cluster to anyone who can reach the port.
    #[error(
        "a tcp:// front door needs TLS and a token, which this version does not provide; use unix://PATH"
    )]
    TcpWithoutTls,
    /// Another cluster is listening there.
    #[error("{0}: a casa-node front door is already listening there")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A bound front door, ready to accept drivers.
#[derive(Debug)]
pub struct FrontDoor {
    listener: UnixListener,
    path: PathBuf,
    framing: Framing,
}

impl FrontDoor {
    /// Binds the front door at `endpoint`. A stale socket left by a dead
    /// cluster is replaced; a live one is an error.
    pub async fn bind(
        endpoint: &FrontDoorEndpoint,
        framing: Framing,
    ) -> Result<FrontDoor, FrontDoorError> {
        let path = match endpoint {
            FrontDoorEndpoint::Unix(path) => path.clone(),
            FrontDoorEndpoint::Tcp(_) => return Err(FrontDoorError::TcpWithoutTls),
        };
        let io_err = |source| FrontDoorError::Io {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )));
            }
            if UnixStream::connect(&path).await.is_ok() {
                return Err(FrontDoorError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(io_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(FrontDoor {
            listener,
            path,
            framing,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts drivers until the returned task is aborted, reporting to
    /// `events`. Connections from another user are refused (the peer's
    /// uid, from `SO_PEERCRED`, must be ours).
    pub fn serve(self, events: mpsc::UnboundedSender<DriverEvent>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let uid = nix::unistd::getuid().as_raw();
            let mut next = 1;
            loop {
                let stream = match self.listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off rather
                        // than spin.
                        tracing::warn!("front door: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == uid => {}
                    Ok(cred) => {
                        tracing::warn!(
                            "front door: refused a connection from uid {} (pid {:?})",
                            cred.uid(),
                            cred.pid()
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "front door: refused a connection whose peer is unknown: {e}"
                        );
                        continue;
                    }
                }
                let driver = DriverId(next);
                next += 1;
                tokio::spawn(connection(stream, driver, self.framing, events.clone()));
            }
        })
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The codec both ends of the front door use.
pub fn codec(framing: Framing) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(framing.max_frame())
        .new_codec()
}

async fn connection(
    stream: UnixStream,
    driver: DriverId,
    framing: Framing,
    events: mpsc::UnboundedSender<DriverEvent>,
) {
    let (read_half, write_half) = stream.into_split();
    let mut reader = FramedRead::new(read_half, codec(framing));
    let mut writer = FramedWrite::new(write_half, codec(framing));
    let (outbox, mut queue) = mpsc::unbounded_channel::<Envelope>();
    // The client node holds the only strong sender: when it drops it, the
    // writer ends and the connection closes. This side only reports bad
    // frames while the connection is open.
    let errors = outbox.downgrade();
    if events
        .send(DriverEvent::Connected { driver, outbox })
        .is_err()
    {
        return;
    }
    // Everything queued for the driver goes out in as few writes as the
    // codec's buffer allows: under load, one system call and one wake-up
    // of the driver carry many replies.
    let write = tokio::spawn(async move {
        while let Some(first) = queue.recv().await {
            let mut next = Some(first);
            while let Some(envelope) = next {
                match framing.encode_body(&envelope) {
                    Ok(bytes) => {
                        if writer.feed(Bytes::from(bytes)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("{driver}: a reply could not be framed: {e}"),
                }
                next = queue.try_recv().ok();
            }
            if SinkExt::<Bytes>::flush(&mut writer).await.is_err() {
                return;
            }
        }
    });
    loop {
        match reader.next().await {
            None => break,
            Some(Ok(frame)) => match framing.decode_body(frame.freeze()) {
                Ok(envelope) => {
                    if events
                        .send(DriverEvent::Request { driver, envelope })
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("{driver}: dropped a malformed frame: {e}");
                    if let Some(outbox) = errors.upgrade() {
                        let _ = outbox.send(Envelope::error(
                            0,
                            ProtocolErrorCode::Malformed,
                            e.to_string(),
                        ));
                    }
                }
            },
            Some(Err(e)) => {
                // An oversized frame or a broken stream: the stream is out
                // of step, so say why and close.
                tracing::warn!("{driver}: closing: {e}");
                let code = if e.kind() == io::ErrorKind::InvalidData {
                    ProtocolErrorCode::TooLarge
                } else {
                    ProtocolErrorCode::Malformed
                };
                if let Some(outbox) = errors.upgrade() {
                    let _ = outbox.send(Envelope::error(0, code, e.to_string()));
                }
                break;
            }
        }
    }
    let _ = events.send(DriverEvent::Disconnected { driver });
    let _ = write.await;
}
