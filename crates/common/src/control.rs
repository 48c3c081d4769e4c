//! Control frames on a QUIC stream: [`crate::protocol`]'s pure codec, read and written.

use quinn::{RecvStream, SendStream};

use crate::protocol::{decode_frame_header, DecodeError, FRAME_HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control stream closed")]
    Closed,
    #[error("reading the control stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing the control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("malformed control frame: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads one frame; its body is decoded by the caller, which knows the direction.
pub async fn read_frame(recv: &mut RecvStream) -> Result<(u8, Vec<u8>), FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        other => other?,
    }
    let (kind, len) = decode_frame_header(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok((kind, body))
}

pub async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), FrameError> {
    send.write_all(frame).await?;
    Ok(())
}
