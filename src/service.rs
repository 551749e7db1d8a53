//! Declared services: one [`service!`](macro@crate::service) declaration names
//! each method's packet code, request and response types, and generates a
//! typed client and a server trait.
//!
//! What travels is what a hand-written [`Router`] and
//! [`ConnectionManager`] would send: a request under the method's packet
//! code, its response under the same code, the body in the service's
//! [`Codec`]. The error-reply convention is kept: an unknown code is
//! answered with [`ERROR_UNKNOWN_PCODE`](crate::ERROR_UNKNOWN_PCODE), a body
//! that does not decode with [`ERROR_BAD_REQUEST`](crate::ERROR_BAD_REQUEST),
//! a response that does not encode with [`ERROR_BAD_RESPONSE`], and a
//! handler's [`ErrorReply`] with its own code; the client sees each as
//! [`Error::Remote`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::client::ConnectionManager;
use crate::codec::Codec;
use crate::completion::ResponseFuture;
use crate::error::Error;
use crate::packet::{Packet, PacketCode};
use crate::router::Router;
use crate::server::Responder;

pub use crate::proto::reply::ERROR_BAD_RESPONSE;

/// A handler's refusal: sent as an error reply, seen by the caller as
/// [`Error::Remote`] with this code and message. Use codes from 0 up;
/// negative ones are the framework's.
///
/// # Examples
/// ```
/// let refusal = tbnet::ErrorReply::new(404, "no such key");
/// assert_eq!((refusal.code(), refusal.message()), (404, "no such key"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    code: i32,
    message: String,
}

impl ErrorReply {
    /// A refusal with an application error `code` and a `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }

    /// The error code.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// Routes packet code `code` to `handler`, decoding requests and encoding
/// responses with `C` (what [`service!`](macro@crate::service)'s `into_router`
/// does for each method).
pub fn route<C, Req, Resp, F>(router: Router, code: i32, handler: F) -> Router
where
    C: Codec<Req> + Codec<Resp>,
    Req: 'static,
    Resp: 'static,
    F: Fn(Req) -> Result<Resp, ErrorReply> + Send + Sync + 'static,
{
    router.route(code, move |request: Packet, responder: Responder| {
        let pcode = request.pcode();
        let decoded = <C as Codec<Req>>::decode(request.into_body());
        let result = match decoded {
            Ok(request) => handler(request),
            Err(e) => return crate::router::refuse_bad_body(responder, pcode, &e),
        };
        let _ = match result {
            Ok(response) => match <C as Codec<Resp>>::to_packet(pcode, &response) {
                Ok(packet) => responder.reply(packet),
                Err(e) => {
                    tracing::warn!(%pcode, reason = %e, "response did not encode");
                    responder
                        .reply_error(ERROR_BAD_RESPONSE, &format!("response did not encode: {e}"))
                }
            },
            Err(refusal) => responder.reply_error(refusal.code, &refusal.message),
        };
    })
}

/// One typed request about to be sent by a generated client: choose a
/// timeout, then wait for it ([`wait`](Self::wait)), `.await` it (or take
/// its [`future`](Self::future)), or hand it a callback
/// ([`then`](Self::then)).
///
/// Nothing is sent until one of those is called.
#[must_use = "a Call sends nothing until waited for, awaited, or given a callback"]
pub struct Call<'a, T> {
    manager: &'a ConnectionManager,
    server: SocketAddr,
    request: Result<Packet, Error>,
    timeout: Option<Duration>,
    decode: fn(Packet) -> Result<T, Error>,
}

impl<T> fmt::Debug for Call<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("server", &self.server)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Decodes a response to a request sent under `code`: its code must match.
fn decode_response<C: Codec<T>, T>(expected: PacketCode, response: Packet) -> Result<T, Error> {
    if response.pcode() != expected {
        return Err(Error::BadMessage {
            pcode: response.pcode().get(),
            reason: format!("expected a response with packet code {expected}").into(),
        });
    }
    C::from_packet(response)
}

impl<'a, T: Send + 'static> Call<'a, T> {
    /// A request for `code`, encoded with `C`, to `server` through
    /// `manager`. Generated clients call this; its response must come back
    /// under `code` and decode with `C`.
    pub fn new<C, Req>(
        manager: &'a ConnectionManager,
        server: SocketAddr,
        code: PacketCode,
        request: &Req,
        decode: fn(Packet) -> Result<T, Error>,
    ) -> Self
    where
        C: Codec<Req> + Codec<T>,
    {
        Call {
            manager,
            server,
            request: <C as Codec<Req>>::to_packet(code, request),
            timeout: None,
            decode,
        }
    }

    /// The decoder [`new`](Self::new) expects for a method of code `code`
    /// with codec `C` (generated code passes it, monomorphised per method).
    pub fn decoder<C: Codec<T>, const CODE: i32>() -> fn(Packet) -> Result<T, Error> {
        |response| decode_response::<C, T>(PacketCode(CODE), response)
    }

    /// Gives up after `timeout` (default: the manager's default timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets or clears the timeout (`None`: the manager's default).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request and blocks until its outcome.
    ///
    /// # Errors
    /// As for [`ConnectionManager::call`]; also [`Error::Remote`] for an
    /// error reply and [`Error::BadMessage`] for a request that does not
    /// encode or a response that does not decode.
    pub fn wait(self) -> Result<T, Error> {
        let request = self.request?;
        let response = self.manager.call(self.server, request, self.timeout)?;
        (self.decode)(response)
    }

    /// Sends the request and returns a future of its outcome, for any
    /// executor; dropping it cancels the request. (`.await` on the `Call`
    /// does the same.)
    ///
    /// # Errors
    /// As for [`ConnectionManager::call_async`], and [`Error::BadMessage`]
    /// for a request that does not encode.
    pub fn future(self) -> Result<TypedFuture<T>, Error> {
        let request = self.request?;
        let inner = self
            .manager
            .call_async(self.server, request, self.timeout)
            .map_err(Error::from)?;
        Ok(TypedFuture {
            inner: Ok(inner),
            decode: self.decode,
            _output: PhantomData,
        })
    }

    /// Sends the request; `callback` runs once with its outcome, where
    /// [`ConnectionManager::send`] runs callbacks.
    ///
    /// # Errors
    /// As for [`ConnectionManager::send`] (the callback then does not
    /// run), and [`Error::BadMessage`] for a request that does not encode.
    pub fn then<F>(self, callback: F) -> Result<(), Error>
    where
        F: FnOnce(Result<T, Error>) + Send + 'static,
    {
        let request = self.request?;
        let decode = self.decode;
        self.manager
            .send(
                self.server,
                request,
                self.timeout,
                move |result: Result<Packet, Error>| callback(result.and_then(decode)),
            )
            .map_err(Error::from)
    }
}

impl<T: Send + 'static> IntoFuture for Call<'_, T> {
    type Output = Result<T, Error>;
    type IntoFuture = TypedFuture<T>;

    /// Sends the request; a request that could not be sent resolves to its
    /// error at once.
    fn into_future(self) -> TypedFuture<T> {
        let decode = self.decode;
        self.future().unwrap_or_else(|error| TypedFuture {
            inner: Err(Some(error)),
            decode,
            _output: PhantomData,
        })
    }
}

/// The future of a [`Call`]: resolves to the decoded response or the
/// request's error. Dropping it cancels the request.
#[must_use = "a TypedFuture does nothing unless polled, and dropping it cancels the request"]
pub struct TypedFuture<T> {
    /// The request's future, or the error that kept it from being sent.
    inner: Result<ResponseFuture, Option<Error>>,
    decode: fn(Packet) -> Result<T, Error>,
    _output: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for TypedFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TypedFuture").field(&self.inner).finish()
    }
}

impl<T> Future for TypedFuture<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let decode = self.decode;
        match &mut self.inner {
            Ok(future) => Pin::new(future)
                .poll(cx)
                .map(|result| result.and_then(decode)),
            // Polled again after Ready: the error was handed out already.
            Err(error) => Poll::Ready(Err(error.take().unwrap_or(Error::Shutdown))),
        }
    }
}

/// Declares a service: its methods' packet codes, request and response
/// types, and the body codec. Generates a module holding a server trait
/// `Service` (implement it, then `into_router()` serves it) and a typed
/// `Client`.
///
/// ```text
/// service! {
///     /// Docs for the module.
///     pub service NAME {
///         codec = CODEC;                      // a codec::Codec for every type below
///         /// Docs for the method.
///         rpc METHOD(REQUEST) -> RESPONSE = PACKET_CODE;
///         ...
///     }
/// }
/// ```
///
/// Names inside resolve as in the module around the declaration (the
/// generated module imports it with `use super::*`). Each method's docs are
/// carried over to both the trait method and the client method. Method
/// names must not be `new`, `server`, `manager` or `into_router` (the
/// generated items' own names).
///
/// In the generated module `NAME`:
/// - `trait Service`: one `fn METHOD(&self, request: REQUEST) ->
///   Result<RESPONSE, ErrorReply>` per method; handlers run on the worker
///   pool. `service.into_router()` gives a [`Router`] for
///   [`Transport::listen`](crate::Transport::listen).
/// - `struct Client<M = Arc<ConnectionManager>>`: `Client::new(manager,
///   server)`, then `client.METHOD(&request)` returns a [`Call`]:
///   `.wait()` blocks, `.await` (or `.future()`) gives a future, `.then(f)`
///   runs a callback; each takes an optional `.timeout(d)` first. `M` is
///   anything that derefs to a [`ConnectionManager`] (`&ConnectionManager`,
///   `Arc<ConnectionManager>`).
/// - `mod codes`: one `PacketCode` constant per method, named after it.
///
/// # Examples
/// Declare services at module level (not inside a function body: the
/// generated module sees what its parent module holds).
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tbnet::{codec::Raw, service, ConnectionManager, Error, ErrorReply, Transport};
///
/// service! {
///     /// Says things back.
///     pub service echo {
///         codec = Raw;
///         /// Returns the text unchanged.
///         rpc say(String) -> String = 1;
///         /// Returns the text's length in decimal, refusing empty ones.
///         rpc count(String) -> String = 2;
///     }
/// }
///
/// struct Echo;
///
/// impl echo::Service for Echo {
///     fn say(&self, text: String) -> Result<String, ErrorReply> {
///         Ok(text)
///     }
///     fn count(&self, text: String) -> Result<String, ErrorReply> {
///         match text.len() {
///             0 => Err(ErrorReply::new(1, "empty")),
///             n => Ok(n.to_string()),
///         }
///     }
/// }
///
/// # fn main() -> Result<(), Error> {
/// let server = Transport::builder().start()?;
/// let addr = server.listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap(), echo::Service::into_router(Echo))?;
///
/// let transport = Transport::builder().start()?;
/// let client = echo::Client::new(Arc::new(ConnectionManager::new(&transport)), addr);
///
/// // Blocking, with the manager's default timeout.
/// assert_eq!(client.say(&"hi".to_string()).wait()?, "hi");
///
/// // Awaited (any executor), with a timeout.
/// let four = tokio_test::block_on(async {
///     client.count(&"four".to_string()).timeout(Duration::from_secs(5)).await
/// })?;
/// assert_eq!(four, "4");
///
/// // A callback.
/// let (tx, rx) = std::sync::mpsc::channel();
/// client.count(&String::new()).then(move |result| tx.send(result).unwrap())?;
/// assert!(matches!(rx.recv().unwrap(), Err(Error::Remote { code: 1, .. })));
/// # Ok(())
/// # }
/// ```
#[macro_export]
macro_rules! service {
    (
        $(#[$meta:meta])*
        $vis:vis service $name:ident {
            codec = $codec:ty;
            $(
                $(#[$method_meta:meta])*
                rpc $method:ident($request:ty) -> $response:ty = $code:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        #[allow(clippy::module_name_repetitions)]
        $vis mod $name {
            #![allow(unused_imports)]
            use super::*;

            /// The packet code of each method.
            #[allow(non_upper_case_globals)]
            pub mod codes {
                $(
                    #[doc = concat!("The packet code of `", stringify!($method), "`.")]
                    pub const $method: $crate::PacketCode = $crate::PacketCode($code);
                )*
            }

            /// The server side: implement each method, then serve
            /// [`into_router`](Service::into_router) on a transport.
            pub trait Service: ::core::marker::Send + ::core::marker::Sync + 'static {
                $(
                    $(#[$method_meta])*
                    fn $method(&self, request: $request) -> ::core::result::Result<$response, $crate::ErrorReply>;
                )*

                /// A router sending each method's packet code to its
                /// handler; other codes get the router's default error reply.
                fn into_router(self) -> $crate::Router
                where
                    Self: ::core::marker::Sized,
                {
                    let service = ::std::sync::Arc::new(self);
                    let router = $crate::Router::new();
                    $(
                        let handler = ::std::sync::Arc::clone(&service);
                        let router = $crate::service::route::<$codec, $request, $response, _>(
                            router,
                            $code,
                            move |request| handler.$method(request),
                        );
                    )*
                    let _ = service;
                    router
                }
            }

            /// The client side: one method per call, each returning a
            /// [`Call`]($crate::service::Call) to wait for, await, or hand a
            /// callback.
            pub struct Client<M = ::std::sync::Arc<$crate::ConnectionManager>> {
                manager: M,
                server: ::std::net::SocketAddr,
            }

            impl<M: ::core::clone::Clone> ::core::clone::Clone for Client<M> {
                fn clone(&self) -> Self {
                    Client {
                        manager: self.manager.clone(),
                        server: self.server,
                    }
                }
            }

            impl<M> ::core::fmt::Debug for Client<M> {
                fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    f.debug_struct(concat!(stringify!($name), "::Client"))
                        .field("server", &self.server)
                        .finish_non_exhaustive()
                }
            }

            impl<M: ::core::ops::Deref<Target = $crate::ConnectionManager>> Client<M> {
                /// A client for the service at `server`, sending through
                /// `manager`.
                pub fn new(manager: M, server: impl ::core::convert::Into<::std::net::SocketAddr>) -> Self {
                    Client {
                        manager,
                        server: server.into(),
                    }
                }

                /// The server's address.
                pub fn server(&self) -> ::std::net::SocketAddr {
                    self.server
                }

                /// The connection manager the calls go through.
                pub fn manager(&self) -> &$crate::ConnectionManager {
                    &self.manager
                }

                $(
                    $(#[$method_meta])*
                    pub fn $method(&self, request: &$request) -> $crate::service::Call<'_, $response> {
                        $crate::service::Call::new::<$codec, $request>(
                            &self.manager,
                            self.server,
                            $crate::PacketCode($code),
                            request,
                            $crate::service::Call::<'_, $response>::decoder::<$codec, { $code }>(),
                        )
                    }
                )*
            }
        }
    };
}
