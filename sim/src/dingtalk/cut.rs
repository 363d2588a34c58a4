//! A TCP stream the simulator can cut after a chosen number of written bytes, to drop the
//! socket in the middle of a frame (the client then sees a truncated WebSocket frame and EOF).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Remaining bytes that may be written; `usize::MAX` means no limit.
#[derive(Debug, Clone)]
pub struct CutSwitch(Arc<AtomicUsize>);

impl Default for CutSwitch {
    fn default() -> Self {
        CutSwitch(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

impl CutSwitch {
    /// Allow `n` more bytes, then fail every write.
    pub fn cut_after(&self, n: usize) {
        self.0.store(n, Ordering::SeqCst);
    }
}

pub struct CutStream<S> {
    inner: S,
    switch: CutSwitch,
}

impl<S> CutStream<S> {
    pub fn new(inner: S, switch: CutSwitch) -> Self {
        CutStream { inner, switch }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CutStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CutStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let left = self.switch.0.load(Ordering::SeqCst);
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "cut by the simulator")));
        }
        let n = buf.len().min(left);
        let res = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(written)) = &res
            && left != usize::MAX
        {
            self.switch.0.store(left - written, Ordering::SeqCst);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
