//! HTTP/1 on a loopback listener for the simulators (the scripted model, the GitHub server):
//! one task per connection, everything stopped by one token.

use std::{convert::Infallible, future::Future};

use http::{Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve `handle` on `listener` until `stop` is cancelled.
pub fn spawn<H, F, B>(listener: TcpListener, stop: CancellationToken, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let (handle, stop) = (handle.clone(), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
}
