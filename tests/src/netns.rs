//! Network namespace guards.
