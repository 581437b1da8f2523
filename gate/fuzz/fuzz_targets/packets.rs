//! Feeds arbitrary bytes to what a hostile VM container reaches in the gate:
//! frames split the way the gate's reader splits them, each decided as a call
//! (interleaved with libvirtd replies that could admit a domain), and the
//! domain XML policy on the raw text. Any panic is a bug; so is a verdict
//! that forwards a call the allow-list does not name.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use libvirt_wire::protocol::{self, MessageType, REMOTE_PROGRAM};
use virtkube_gate::identity::Identity;
use virtkube_gate::policy::{self, RealPaths};
use virtkube_gate::relay::{self, CallerProcess, Gate, Session, Verdict};

fuzz_target!(|data: &[u8]| {
    let gate = Gate::default();
    let who = Identity::Pod {
        uid: "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b".into(),
    };
    let session = Mutex::new(Session::of(CallerProcess { pid: 1, start_ticks: 1 }));
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let Ok(len) = protocol::check_length(len) else { break };
        if len > relay::MAX_CLIENT_PACKET || rest.len() < len {
            break;
        }
        if let Ok((header, payload)) = protocol::decode_packet(&rest[4..len]) {
            if header.kind == MessageType::Reply {
                let _ = relay::note_reply(&session, &header, payload);
            } else {
                let verdict = relay::decide(&header, payload, &[], &who, &gate, &mut session.lock().unwrap());
                if matches!(verdict, Verdict::Forward | Verdict::Rewrite(_)) && header.program == REMOTE_PROGRAM && header.kind == MessageType::Call {
                    assert!(
                        policy::allowed_call(header.procedure).is_some(),
                        "procedure {} forwarded",
                        header.procedure
                    );
                }
            }
        }
        rest = &rest[len..];
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::check_domain_xml(text, &who, &gate.policy, &RealPaths);
    }
});
