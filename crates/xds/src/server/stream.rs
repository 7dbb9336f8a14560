//! The loop one ADS stream runs, shared by the SotW and Delta variants: read the first
//! request (it must carry the node), then interleave client requests, cache changes and
//! sends (one response at a time, only when the bounded outbound queue has room, built
//! from the latest snapshot so pending changes coalesce).

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::{broadcast, mpsc};
use tonic::{Status, Streaming};

use super::{Protocol, Shared, Snapshot, StreamCounter, StreamCtx};

/// How long a final error status may wait for room in the outbound queue.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// One protocol variant's per-stream state machine.
pub(crate) trait ProtocolState: Default + Send {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const PROTOCOL: Protocol;

    fn node(req: &Self::Request) -> Option<&Node>;
    fn on_request(&mut self, ctx: &mut StreamCtx, req: Self::Request) -> Result<(), Status>;
    /// Something is to be sent for this snapshot.
    fn has_work(&self, snapshot: &Snapshot) -> bool;
    /// The next response in push order, or `None` when nothing needs sending.
    fn next_response(
        &mut self,
        ctx: &mut StreamCtx,
        shared: &Shared,
        snapshot: &Snapshot,
    ) -> Option<Self::Response>;
}

pub(crate) type Tx<S> = mpsc::Sender<Result<<S as ProtocolState>::Response, Status>>;

/// The client certificate chain of a stream's connection (TLS with client auth only).
pub type PeerCerts = Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>;

pub(crate) async fn run<S: ProtocolState>(
    shared: Arc<Shared>,
    mut inbound: Streaming<S::Request>,
    peer: PeerCerts,
    tx: Tx<S>,
) {
    let _count = StreamCounter::new(&shared.fleet);
    if let Err(status) = serve::<S>(&shared, &mut inbound, peer, &tx).await {
        tracing::warn!(
            protocol = ?S::PROTOCOL,
            code = ?status.code(),
            message = status.message(),
            "ADS stream rejected"
        );
        shared
            .fleet
            .metrics()
            .streams_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(ERROR_SEND_TIMEOUT, tx.send(Err(status))).await;
    }
}

async fn serve<S: ProtocolState>(
    shared: &Shared,
    inbound: &mut Streaming<S::Request>,
    peer: PeerCerts,
    tx: &Tx<S>,
) -> Result<(), Status> {
    let first = match inbound.message().await {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => return Ok(()),
    };
    // Subscribed before the authorization check, so a revocation racing with it is seen.
    let mut disconnects = shared.disconnects.subscribe();
    let node = S::node(&first).cloned();
    let authorize = || match (&shared.authorizer.0, &node) {
        (Some(authorize), Some(node)) => authorize(node, peer.as_deref().map(Vec::as_slice)),
        _ => Ok(()),
    };
    authorize()?;
    let mut ctx = StreamCtx::start(shared, S::node(&first), S::PROTOCOL)?;
    let mut st = S::default();
    st.on_request(&mut ctx, first)?;
    loop {
        let snapshot = ctx.snapshot();
        let work = snapshot.as_ref().is_some_and(|s| st.has_work(s));
        tokio::select! {
            biased;
            msg = inbound.message() => match msg {
                Ok(Some(req)) => st.on_request(&mut ctx, req)?,
                Ok(None) => return Ok(()),
                Err(status) => {
                    tracing::debug!(node = %ctx.node_id, %status, "ADS stream closed by transport");
                    return Ok(());
                }
            },
            changed = ctx.watch.rx.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("the control plane is shutting down"));
                }
                ctx.watch.rx.borrow_and_update();
            },
            permit = tx.reserve(), if work => {
                let Ok(permit) = permit else { return Ok(()) };
                if let Some(s) = &snapshot
                    && let Some(resp) = st.next_response(&mut ctx, shared, s)
                {
                    permit.send(Ok(resp));
                }
            },
            () = tx.closed() => return Ok(()),
            gone = disconnects.recv() => match gone {
                Ok(id) if *id == *ctx.node_id => {
                    tracing::info!(node = %ctx.node_id, "ADS stream closed: node revoked");
                    return Err(Status::permission_denied(format!(
                        "node {id:?} was revoked by the control plane's operator"
                    )));
                }
                Ok(_) => {}
                // Missed some: ask the authorizer again.
                Err(broadcast::error::RecvError::Lagged(_)) => authorize()?,
                Err(broadcast::error::RecvError::Closed) => {}
            },
        }
    }
}
