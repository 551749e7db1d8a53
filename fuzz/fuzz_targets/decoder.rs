//! Feeds arbitrary bytes, in arbitrary chunks, to the frame decoder.
//!
//! Run with `cargo fuzz run decoder` from the repository root (needs a
//! nightly toolchain and `cargo install cargo-fuzz`).
//!
//! Checks: no panic; every packet decoded in chunks is the one decoded from
//! the whole input at once; the buffer never holds more than twice what
//! arrived plus two read chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tbnet::proto::{DefaultStreamer, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let streamer = DefaultStreamer::new().with_max_body_len(1 << 16);
    let chunk = usize::from(split).max(1);

    let mut whole = FrameDecoder::new();
    whole.extend_from_slice(data);
    let mut expected = Vec::new();
    let whole_error = loop {
        match whole.next_packet(&streamer) {
            Ok(Some(p)) => expected.push(p),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    let mut chunked = FrameDecoder::with_read_chunk(chunk);
    let mut got = Vec::new();
    let mut chunked_error = false;
    for piece in data.chunks(chunk) {
        let mut src = piece;
        while !src.is_empty() {
            chunked.read_from(&mut src).expect("reading a slice cannot fail");
        }
        assert!(chunked.capacity() <= 2 * (chunked.buffered() + 2 * 64 * 1024));
        loop {
            match chunked.next_packet(&streamer) {
                Ok(Some(p)) => got.push(p),
                Ok(None) => break,
                Err(_) => {
                    chunked_error = true;
                    break;
                }
            }
        }
        if chunked_error {
            break;
        }
    }
    assert_eq!(got, expected);
    assert_eq!(chunked_error, whole_error);
});
