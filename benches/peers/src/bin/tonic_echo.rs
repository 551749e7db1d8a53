//! A tonic (gRPC) echo pair: `tonic_echo server --addr A` prints `listening
//! on ADDR` and serves; `tonic_echo client --addr A --conns C --depth D
//! --size S --secs T` drives it, one HTTP/2 channel per connection with
//! `depth` concurrent streams. Protobuf types generated at build time by
//! tonic-prost-build from proto/echo.proto (compiled by protox).

use clap::{Parser, Subcommand};
use futures::StreamExt;
use tbnet_peers::{drive, ClientArgs, ServerArgs};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

mod pb {
    tonic::include_proto!("echo");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::Body;

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<Body>) -> Result<Response<Body>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve echo requests.
    Server(ServerArgs),
    /// Drive a server.
    Client(ClientArgs),
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Server(args) => {
            let listener = TcpListener::bind(args.addr).await.expect("bind");
            println!("listening on {}", listener.local_addr().expect("address"));
            // Accepted here rather than by tonic, so TCP_NODELAY is set on
            // each connection here too (tonic's own setting applies only to
            // listeners it binds).
            let incoming = TcpListenerStream::new(listener).map(|stream| {
                if let Ok(stream) = &stream {
                    let _ = stream.set_nodelay(true);
                }
                stream
            });
            Server::builder()
                .add_service(EchoServer::new(EchoService))
                .serve_with_incoming(incoming)
                .await
                .expect("serve");
        }
        Command::Client(args) => {
            drive(
                "tonic",
                &args,
                |addr| async move {
                    let channel = Channel::from_shared(format!("http://{addr}"))
                        .map_err(|e| e.to_string())?
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(EchoClient::new(channel))
                },
                |mut client: EchoClient<Channel>, data| async move {
                    let answer = client
                        .echo(Body { data })
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(answer.into_inner().data)
                },
            )
            .await;
        }
    }
}
