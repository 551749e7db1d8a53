//! Integration tests for `tbnet`, over real loopback sockets.
//!
//! One binary (to save link time); one module per concern. Every server binds
//! `127.0.0.1:0`. Shared fixtures and the bounded waits live in `support`.

mod admission;
mod budget;
mod client;
mod concurrency;
mod data_buffer;
mod descriptors;
mod events;
mod exactly_once;
mod examples;
mod faults;
mod framing;
mod half_close;
mod handles;
mod hostile;
mod manager_control;
mod metrics;
mod one_core;
mod ordered;
mod post;
mod queue_wait;
mod reconnect;
mod reconnect_storm;
mod regressions;
mod server;
mod services;
mod shared_handler;
mod shutdown;
mod soak;
mod spec;
mod status;
mod support;
#[cfg(feature = "tls")]
mod tls;
mod typed;
mod wire;
