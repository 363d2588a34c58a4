//! End-to-end tests: the real `zhuli` binary against the gateway simulator on loopback.

mod conformance;
mod faults;
mod roundtrip;
mod support;
