//! Micro-benchmarks of the pure core: frame codec, channel table, completions.
//!
//! Run with `cargo bench --bench core`.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tbnet::proto::{DefaultStreamer, FrameDecoder, PacketStreamer, WriteQueue};
use tbnet::{
    ChannelPool, Completion, ConnectionManager, Dispatch, Packet, Responder, Transport, WaitObject,
};

const SIZES: [(usize, &str); 3] = [(64, "64B"), (4096, "4KiB"), (1 << 20, "1MiB")];

fn codec(c: &mut Criterion) {
    let streamer = DefaultStreamer::new();
    let mut group = c.benchmark_group("codec");
    for (size, name) in SIZES {
        let packet = Packet::new(1, Bytes::from(vec![7u8; size]));
        group.throughput(Throughput::Bytes((size + 16) as u64));
        group.bench_with_input(BenchmarkId::new("encode", name), &packet, |b, packet| {
            let mut queue = WriteQueue::new();
            b.iter(|| {
                queue.push(&streamer, black_box(packet));
                let n = queue.len();
                queue.advance(n);
            });
        });
        let mut wire = BytesMut::new();
        streamer.encode(&packet, &mut wire);
        group.bench_with_input(BenchmarkId::new("decode", name), &wire, |b, wire| {
            let mut decoder = FrameDecoder::new();
            b.iter(|| {
                decoder.extend_from_slice(wire);
                black_box(decoder.next_packet(&streamer).unwrap().unwrap());
            });
        });
    }
    group.finish();
}

fn channels(c: &mut Criterion) {
    let mut group = c.benchmark_group("channel_pool");
    group.bench_function("allocate_complete", |b| {
        let mut pool = ChannelPool::new(1024);
        let deadline = Instant::now() + Duration::from_secs(60);
        let response = Packet::new(1, "");
        b.iter(|| {
            let id = pool
                .allocate(Completion::callback(|r| drop(black_box(r))), deadline)
                .unwrap();
            pool.complete(id, response.clone()).unwrap().fire();
        });
    });
    group.bench_function("allocate_complete_with_1000_pending", |b| {
        let mut pool = ChannelPool::new(4096);
        let start = Instant::now();
        for i in 0..1000 {
            let _ = pool.allocate(
                Completion::callback(|_| {}),
                start + Duration::from_secs(60 + i),
            );
        }
        let response = Packet::new(1, "");
        b.iter(|| {
            let id = pool
                .allocate(
                    Completion::callback(|_| {}),
                    start + Duration::from_secs(30),
                )
                .unwrap();
            pool.complete(id, response.clone()).unwrap().fire();
        });
    });
    group.bench_function("expire_one_of_10000", |b| {
        b.iter_batched(
            || {
                let mut pool = ChannelPool::new(16384);
                let start = Instant::now();
                for _ in 0..10_000 {
                    let _ = pool.allocate(
                        Completion::callback(|_| {}),
                        start + Duration::from_secs(60),
                    );
                }
                let _ = pool.allocate(Completion::callback(|_| {}), start);
                (pool, start)
            },
            |(mut pool, start)| {
                let mut out = Vec::new();
                pool.expire(start, &mut out);
                out.into_iter().for_each(|r| r.fire());
                pool
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn wait_object(c: &mut Criterion) {
    let mut group = c.benchmark_group("wait_object");
    group.bench_function("same_thread_round_trip", |b| {
        let response = Packet::new(1, "");
        b.iter(|| {
            let mut wait = WaitObject::new();
            wait.completion().complete(Ok(response.clone()));
            black_box(wait.wait_any());
        });
    });
    group.bench_function("cross_thread_round_trip", |b| {
        let (tx, rx) = std::sync::mpsc::channel::<Completion>();
        let responder = std::thread::spawn(move || {
            for completion in rx {
                completion.complete(Ok(Packet::new(1, "")));
            }
        });
        b.iter(|| {
            let mut wait = WaitObject::new();
            tx.send(wait.completion()).unwrap();
            black_box(wait.wait_any());
        });
        drop(tx);
        responder.join().unwrap();
    });
    group.finish();
}

/// One request's round trip over loopback with the server handling it on
/// the IO thread, and with the hand-off to a worker: the difference is the
/// worker queue's cost (push, wake, pop, reply from another thread).
fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_trip_1x1");
    for (name, dispatch) in [
        ("io_thread", Dispatch::IoThread),
        ("workers", Dispatch::Workers),
    ] {
        let server = Transport::builder()
            .workers(2)
            .dispatch(dispatch)
            .start()
            .unwrap();
        let addr = server
            .listen("127.0.0.1:0", |req: Packet, resp: Responder| {
                let _ = resp.reply(req.reply(req.body().clone()));
            })
            .unwrap();
        let client = Transport::builder().workers(1).start().unwrap();
        let manager = ConnectionManager::new(&client);
        let body = Bytes::from_static(b"0123456789abcdef0123456789abcdef");
        group.bench_function(name, |b| {
            b.iter(|| {
                manager
                    .call(addr, Packet::new(1, body.clone()), None)
                    .unwrap()
            });
        });
        client.stop();
        server.stop();
    }
    group.finish();
}

criterion_group!(benches, codec, channels, wait_object, dispatch);
criterion_main!(benches);
