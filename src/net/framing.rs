//! Framing on QUIC streams: length-prefixed frames, data frames whose
//! stream reset is an answer, control messages with a deadline once begun,
//! and heartbeats that keep a quiet session alive.
//!
//! Owns how bytes become frames and messages on a stream; opens no stream
//! and decides nothing about what a message means.

use std::time::Duration;

use crate::error::{Error, Result};

/// Reads one frame body of at most `max` bytes; `None` at a clean end of
/// stream. A stream the peer reset is an error.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<bytes::Bytes>> {
    match read_data_frame(recv, max).await? {
        DataFrame::Frame(b) => Ok(Some(b)),
        DataFrame::Finished => Ok(None),
        DataFrame::Abandoned => Err(Error::Network("the peer reset the stream".into())),
    }
}

/// What [`read_data_frame`] found.
pub enum DataFrame {
    /// One frame body.
    Frame(bytes::Bytes),
    /// The stream ended cleanly between frames.
    Finished,
    /// The peer reset the stream (it gave up sending on it); a frame it had
    /// not completed is dropped.
    Abandoned,
}

/// Reads one frame body of at most `max` bytes from a stream whose reset
/// is an answer of its own ([`DataFrame::Abandoned`]), not an error.
pub async fn read_data_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<DataFrame> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(DataFrame::Finished),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(_))) => {
            return Ok(DataFrame::Abandoned)
        }
        // The peer closed the whole connection with the success code between frames.
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(a),
        ))) if a.error_code == quinn::VarInt::from_u32(0) => return Ok(DataFrame::Finished),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(Error::Peer(format!(
                "stream ended inside a frame header ({n} of 4 bytes)"
            )))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    read_body(recv, prefix, max).await
}

/// Reads the body of a frame whose length `prefix` has arrived.
async fn read_body(recv: &mut quinn::RecvStream, prefix: [u8; 4], max: usize) -> Result<DataFrame> {
    let len =
        nightpass_proto::wire::frame_len(prefix, max).map_err(|e| Error::Peer(e.to_string()))?;
    // Assemble the body from the stream's own buffers: no zero-filling, one copy.
    let mut body = bytes::BytesMut::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(Error::Peer(format!(
                    "stream ended inside a frame ({} of {len} bytes)",
                    body.len()
                )))
            }
            Err(quinn::ReadError::Reset(_)) => return Ok(DataFrame::Abandoned),
            Err(e) => return Err(read_error(e)),
        }
    }
    Ok(DataFrame::Frame(body.freeze()))
}

/// A failed read as an operator reads it.
fn read_error(e: quinn::ReadError) -> Error {
    match e {
        quinn::ReadError::ConnectionLost(c) => match c {
            quinn::ConnectionError::ApplicationClosed(a) => Error::Network(format!(
                "peer closed the session: {}",
                String::from_utf8_lossy(&a.reason)
            )),
            other => Error::Network(format!("connection lost: {other}")),
        },
        other => Error::Network(format!("stream read failed: {other}")),
    }
}

/// Writes buffers (one or more, forming one frame) to a stream.
pub async fn write_bufs(send: &mut quinn::SendStream, bufs: &mut [bytes::Bytes]) -> Result<()> {
    send.write_all_chunks(bufs).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(a)) => {
            Error::Network(format!(
                "peer closed the session: {}",
                String::from_utf8_lossy(&a.reason)
            ))
        }
        other => Error::Network(format!("stream write failed: {other}")),
    })
}

/// Longest a control frame may take to arrive once its first byte has, and
/// to leave once we began writing it: a peer must not keep a session (and
/// its slot, or its volume) by sending 3 of a frame's 4 header bytes, or by
/// never reading what it asked for. The largest control frame (4 MiB) still
/// crosses a link of 1.2 Mbit/s in that time.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// Reads one control frame body of at most `max` bytes; `None` at a clean
/// end of stream. Waiting for a frame to begin has no limit here (each
/// session sets its own); once its first byte has arrived, the rest must
/// within [`FRAME_DEADLINE`].
async fn read_control_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<bytes::Bytes>> {
    let mut prefix = [0u8; 4];
    loop {
        match recv.read(&mut prefix[..1]).await {
            Ok(Some(1)) => break,
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(None),
            // The peer closed the whole connection with the success code between frames.
            Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(a)))
                if a.error_code == quinn::VarInt::from_u32(0) =>
            {
                return Ok(None)
            }
            Err(quinn::ReadError::Reset(_)) => {
                return Err(Error::Network("the peer reset the stream".into()))
            }
            Err(e) => return Err(read_error(e)),
        }
    }
    let rest = async {
        match recv.read_exact(&mut prefix[1..]).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(Error::Peer(format!(
                    "stream ended inside a frame header ({} of 4 bytes)",
                    n + 1
                )))
            }
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(_))) => {
                return Err(Error::Network("the peer reset the stream".into()))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        read_body(recv, prefix, max).await
    };
    match tokio::time::timeout(FRAME_DEADLINE, rest).await {
        Err(_) => Err(Error::Peer(format!(
            "a control frame the peer began did not complete within {} s",
            FRAME_DEADLINE.as_secs()
        ))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(DataFrame::Frame(b))) => Ok(Some(b)),
        Ok(Ok(_)) => Err(Error::Network("the peer reset the stream".into())),
    }
}

/// Writes one control message as a frame.
pub async fn send_control(
    send: &mut quinn::SendStream,
    msg: nightpass_proto::wire::control::Msg,
) -> Result<()> {
    let frame = nightpass_proto::wire::encode_frame(&nightpass_proto::wire::Control::new(msg));
    tokio::time::timeout(FRAME_DEADLINE, write_bufs(send, &mut [frame]))
        .await
        .map_err(|_| {
            Error::Network(format!(
                "the peer did not read our control stream for {} s",
                FRAME_DEADLINE.as_secs()
            ))
        })?
}

/// Awaits `work` while keeping the session's control stream alive: a
/// heartbeat at once and every [`nightpass_proto::wire::HEARTBEAT_INTERVAL_S`] after, so a
/// receiver that has sent all it had to send does not take our silence for
/// a dead sender (it ends a session silent for three intervals): a verify
/// waiting on its own source read, a sender writing a large manifest.
pub async fn with_heartbeats<T>(
    send: &mut quinn::SendStream,
    work: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::pin!(work);
    let mut beat = tokio::time::interval(Duration::from_secs(
        nightpass_proto::wire::HEARTBEAT_INTERVAL_S,
    ));
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = beat.tick() => {
                send_control(
                    send,
                    nightpass_proto::wire::control::Msg::Heartbeat(nightpass_proto::wire::Heartbeat {}),
                )
                .await?;
            }
        }
    }
}

/// Reads one control message; `None` at a clean end of stream.
pub async fn recv_control(
    recv: &mut quinn::RecvStream,
) -> Result<Option<nightpass_proto::wire::control::Msg>> {
    match read_control_frame(recv, nightpass_proto::wire::MAX_CONTROL_FRAME).await? {
        None => Ok(None),
        Some(body) => nightpass_proto::wire::decode_control(body)
            .map(Some)
            .map_err(|e| Error::Peer(format!("bad control message: {e}"))),
    }
}
