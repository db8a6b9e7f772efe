//! A peer driven by hand over QUIC (hostile, stuck or just precise): an
//! authorized connection to a receiver, its control stream, and Hellos.

use std::time::Duration;

use nightpass::net::transport::{self, Identity, Tuning};
use nightpass_proto::wire::{self, control::Msg, Mode};

/// A multi-threaded tokio runtime (two workers) for a test that drives a
/// peer by hand.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A Hello as a sender sends it first: protocol version, `volume`, `mode`,
/// the source's size and the chunk size; the rest as the caller sets it
/// (`..hello_for(...)`).
pub fn hello_for(volume: &str, mode: Mode, source_size: u64, chunk_size: u32) -> wire::Hello {
    wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: volume.into(),
        mode: mode as i32,
        source_size,
        chunk_size,
        ..Default::default()
    }
}

/// A peer holding an authorized identity, driven by hand (hostile, stuck or
/// just precise): its endpoint, its connection to the receiver and the
/// control stream it opened.
pub struct AuthorizedPeer {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl AuthorizedPeer {
    /// Connects with `identity` to the receiver on 127.0.0.1:`port` whose
    /// fingerprint is `server_fp`, and opens the control stream; the error
    /// in words when either fails.
    pub async fn try_connect(
        identity: &Identity,
        port: u16,
        server_fp: &str,
        tuning: &Tuning,
    ) -> Result<AuthorizedPeer, String> {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let (ep, conn) = transport::connect(identity, addr, server_fp, tuning)
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(AuthorizedPeer {
            ep,
            conn,
            send,
            recv,
        })
    }

    /// [`AuthorizedPeer::try_connect`], which must succeed.
    pub async fn connect(
        identity: &Identity,
        port: u16,
        server_fp: &str,
        tuning: &Tuning,
    ) -> AuthorizedPeer {
        AuthorizedPeer::try_connect(identity, port, server_fp, tuning)
            .await
            .unwrap_or_else(|e| panic!("an authorized peer could not connect: {e}"))
    }

    /// Sends `hello` on the control stream.
    pub async fn hello(&mut self, hello: wire::Hello) -> nightpass::error::Result<()> {
        transport::send_control(&mut self.send, Msg::Hello(hello)).await
    }

    /// The receiver's next control message (`None`: the stream ended).
    pub async fn answer(&mut self) -> nightpass::error::Result<Option<Msg>> {
        transport::recv_control(&mut self.recv).await
    }

    /// The receiver's next control message within `limit`; `None` when it
    /// did not come in time, the stream ended or failed.
    pub async fn answer_within(&mut self, limit: Duration) -> Option<Msg> {
        tokio::time::timeout(limit, self.answer())
            .await
            .ok()
            .and_then(|m| m.ok())
            .flatten()
    }

    /// Reads the answer to the Hello, which must be a Welcome.
    pub async fn expect_welcome(&mut self) -> wire::Welcome {
        match self.answer().await {
            Ok(Some(Msg::Welcome(w))) => w,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Reads the answer to the Hello, which must be a Refusal.
    pub async fn expect_refusal(&mut self) -> wire::Refusal {
        match self.answer().await {
            Ok(Some(Msg::Refusal(r))) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Closes the connection and waits (up to 2 s) until the receiver knows,
    /// so it does not hold the volume for this session until its idle
    /// timeout.
    pub async fn close(self) {
        self.ep.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ep.wait_idle()).await;
    }
}
