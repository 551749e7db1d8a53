//! A server adaptor that dispatches requests by packet code.

use crate::hash::FastMap;
use std::fmt;
use std::sync::Arc;

use crate::message::{Message, ERROR_BAD_REQUEST, ERROR_UNKNOWN_PCODE};
use crate::packet::{Packet, PacketCode};
use crate::server::{Responder, ServerAdaptor};

/// What a [`Router`] does with a request whose packet code has no route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unrouted {
    /// Answer with an error reply, code
    /// [`ERROR_UNKNOWN_PCODE`](crate::ERROR_UNKNOWN_PCODE) (the default):
    /// the caller learns at once instead of waiting for its timeout.
    #[default]
    ErrorReply,
    /// Drop it unanswered and count it in
    /// [`StatsSnapshot::unrouted`](crate::StatsSnapshot::unrouted) (what a
    /// tbnet server does with a packet code it does not know).
    Drop,
}

/// Dispatches requests to a handler per packet code.
///
/// Handlers are [`ServerAdaptor`]s (any `Fn(Packet, Responder)`), or typed
/// with [`route_message`](Self::route_message). Like any adaptor, they may
/// reply at once or later from another thread.
///
/// # Examples
/// ```
/// use tbnet::{ConnectionManager, Error, Packet, Responder, Router, Transport};
///
/// let router = Router::new()
///     .route(1, |req: Packet, resp: Responder| {
///         let _ = resp.reply(req.reply("pong"));
///     })
///     .route(2, |_req: Packet, resp: Responder| {
///         let _ = resp.reply_error(404, "nothing here");
///     });
/// let transport = Transport::builder().start()?;
/// let addr = transport.listen("127.0.0.1:0", router)?;
/// let client = ConnectionManager::new(&transport);
///
/// assert_eq!(client.call(addr, Packet::new(1, "ping"), None)?.body(), "pong");
/// let refused = client.call(addr, Packet::new(2, ""), None);
/// assert!(matches!(refused, Err(Error::Remote { code: 404, .. })));
/// let unknown = client.call(addr, Packet::new(3, ""), None);
/// assert!(matches!(unknown, Err(Error::Remote { code: tbnet::ERROR_UNKNOWN_PCODE, .. })));
/// # Ok::<(), tbnet::Error>(())
/// ```
#[derive(Default)]
pub struct Router {
    routes: FastMap<PacketCode, Arc<dyn ServerAdaptor>>,
    unrouted: Unrouted,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut codes: Vec<_> = self.routes.keys().map(|c| c.get()).collect();
        codes.sort_unstable();
        f.debug_struct("Router")
            .field("codes", &codes)
            .field("unrouted", &self.unrouted)
            .finish()
    }
}

impl Router {
    /// A router with no routes that answers unknown codes with an error
    /// reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends requests with packet code `code` to `handler` (replacing any
    /// earlier route for it).
    pub fn route(mut self, code: impl Into<PacketCode>, handler: impl ServerAdaptor) -> Self {
        self.routes.insert(code.into(), Arc::new(handler));
        self
    }

    /// Sends requests with packet code `M::PCODE` to `handler`, decoded as
    /// `M`. A body that does not decode is answered with an error reply,
    /// code [`ERROR_BAD_REQUEST`](crate::ERROR_BAD_REQUEST), and never
    /// reaches the handler; the connection is unaffected.
    pub fn route_message<M, F>(self, handler: F) -> Self
    where
        M: Message,
        F: Fn(M, Responder) + Send + Sync + 'static,
    {
        self.route(M::PCODE, move |request: Packet, responder: Responder| {
            let pcode = request.pcode();
            match M::decode(request.into_body()) {
                Ok(message) => handler(message, responder),
                Err(e) => refuse_bad_body(responder, pcode, &e),
            }
        })
    }

    /// What to do with requests whose code has no route (default
    /// [`Unrouted::ErrorReply`]).
    pub fn on_unrouted(mut self, policy: Unrouted) -> Self {
        self.unrouted = policy;
        self
    }
}

impl ServerAdaptor for Router {
    fn handle_packet(&self, request: Packet, responder: Responder) {
        if let Some(handler) = self.routes.get(&request.pcode()) {
            handler.handle_packet(request, responder);
            return;
        }
        tracing::debug!(peer = %responder.peer(), pcode = %request.pcode(), "no route for packet code");
        match self.unrouted {
            Unrouted::ErrorReply => {
                let message = format!("no handler for packet code {}", request.pcode());
                let _ = responder.reply_error(ERROR_UNKNOWN_PCODE, &message);
            }
            Unrouted::Drop => {
                responder.count_unrouted();
                responder.ignore();
            }
        }
    }
}

/// Answers a request whose body did not decode: an error reply with code
/// [`ERROR_BAD_REQUEST`](crate::ERROR_BAD_REQUEST); the handler never sees it.
pub(crate) fn refuse_bad_body(
    responder: Responder,
    pcode: crate::PacketCode,
    reason: &dyn std::fmt::Display,
) {
    tracing::debug!(peer = %responder.peer(), %pcode, %reason, "request body did not decode");
    let _ = responder.reply_error(ERROR_BAD_REQUEST, &format!("bad request body: {reason}"));
}
