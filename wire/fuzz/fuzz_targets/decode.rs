//! Feeds arbitrary bytes to every decoder a hostile libvirtd can reach: the
//! length check, the header, error payloads, lifecycle events, domain refs and
//! the XDR primitives. Any panic, or an allocation beyond the input, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use libvirt_wire::protocol::{self, DomainRef, LifecycleMessage};
use libvirt_wire::xdr::Decoder;

fuzz_target!(|data: &[u8]| {
    // A stream of frames, split the way the reader splits them.
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let Ok(len) = protocol::check_length(len) else { break };
        if rest.len() < len {
            break;
        }
        let body = &rest[4..len];
        if let Ok((_header, payload)) = protocol::decode_packet(body) {
            let _ = protocol::decode_error(payload);
            let _ = LifecycleMessage::decode(payload);
            let _ = DomainRef::decode(&mut Decoder::new(payload));
        }
        rest = &rest[len..];
    }
    // The primitives on the raw bytes.
    let mut d = Decoder::new(data);
    let _ = d.string("s");
    let _ = d.opt_string("o");
    let _ = d.array_len("a", 1 << 20, 4);
    let _ = d.fixed_opaque::<16>("u");
    let _ = d.i64("h");
    let _ = d.bool("b");
});
