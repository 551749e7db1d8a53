//! A tarpc echo pair: `tarpc_echo server --addr A` prints `listening on
//! ADDR` and serves; `tarpc_echo client --addr A --conns C --depth D --size
//! S --secs T` drives it. bincode over length-delimited TCP frames, with
//! TCP_NODELAY on both sides (as tbnet sets it).

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use tarpc::server::{self, Channel};
use tarpc::{client, context, tokio_serde::formats::Bincode};
use tbnet_peers::{drive, ClientArgs, ServerArgs};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::LengthDelimitedCodec;

#[tarpc::service]
trait Echo {
    /// Returns the body unchanged.
    async fn echo(body: Vec<u8>) -> Vec<u8>;
}

#[derive(Clone)]
struct EchoServer;

impl Echo for EchoServer {
    async fn echo(self, _: context::Context, body: Vec<u8>) -> Vec<u8> {
        body
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

fn framed(stream: TcpStream) -> tokio_util::codec::Framed<TcpStream, LengthDelimitedCodec> {
    stream.set_nodelay(true).expect("TCP_NODELAY");
    LengthDelimitedCodec::builder()
        .max_frame_length(64 << 20)
        .new_framed(stream)
}

async fn serve(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("address"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let transport = tarpc::serde_transport::new(framed(stream), Bincode::default());
        let channel = server::BaseChannel::with_defaults(transport);
        tokio::spawn(
            channel
                .execute(EchoServer.serve())
                .for_each(|response| async move {
                    tokio::spawn(response);
                }),
        );
    }
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Server(args) => serve(args.addr).await,
        Command::Client(args) => {
            drive(
                "tarpc",
                &args,
                |addr| async move {
                    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                    let transport = tarpc::serde_transport::new(framed(stream), Bincode::default());
                    let mut config = client::Config::default();
                    config.max_in_flight_requests = 1 << 16;
                    Ok(EchoClient::new(config, transport).spawn())
                },
                |client: EchoClient, body| async move {
                    let mut cx = context::current();
                    cx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    client.echo(cx, body).await.map_err(|e| e.to_string())
                },
            )
            .await;
        }
    }
}
