#![no_std]
//! Host-side stub so `localdns-user` can name this crate as a build dependency.
