//! Frame parsing must never panic, whatever the gateway (or something pretending to be it) sends:
//! arbitrary text through the envelope parser, the robot-message parser on its data, and the
//! ACK builders on whatever parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zhuli::dingtalk::{
    frame::{self, StreamFrame},
    message::RobotMessage,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(f) = StreamFrame::parse(text) {
        let _ = frame::ping_ack(&f);
        if let Ok(m) = RobotMessage::parse(&f.data) {
            let _ = m.text();
            let _ = m.kind_name();
        }
    }
    // The data field on its own, as the message parser sees it.
    if let Ok(m) = RobotMessage::parse(text) {
        let _ = m.text();
    }
});
