//! localdns daemon library: everything `localdns-user` does, in modules the
//! integration tests can use directly.
pub mod addrs;
pub mod cache;
pub mod config;
pub mod corefile;
pub mod fastpath;
pub mod forward;
pub mod ifaces;
pub mod listen;
pub mod loopdetect;
pub mod metrics;
pub mod notrack;
pub mod querylog;
pub mod resolvconf;
pub mod resolver;
pub mod service;
pub mod synth;
pub mod validate;
pub mod wire;
