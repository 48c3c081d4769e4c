//! Control frames on a QUIC stream: [`crate::wire::protocol`]'s pure codec, read and written.

use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::wire::protocol::{decode_frame_header, DecodeError, FRAME_HEADER_LEN};

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

/// Control frames as [`frames`] reads them: (type, body), or the error that ended the reading.
pub type Frames = mpsc::Receiver<Result<(u8, Vec<u8>), FrameError>>;

/// Frames read from `recv` by a task of its own, until the first error (which is passed on
/// too). A `select!` loop that waits on the receiver loses nothing when another branch wins,
/// where one that awaited [`read_frame`] could drop half a frame. The task ends with the
/// returned handle.
pub fn frames(mut recv: RecvStream) -> (Frames, AbortOnDropHandle<()>) {
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut recv).await;
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    (rx, AbortOnDropHandle::new(task))
}

pub async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), FrameError> {
    send.write_all(frame).await?;
    Ok(())
}
