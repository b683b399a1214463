//! Code generation option for bpf-linker (it runs LLVM's BPF backend):
//! DNS fields sit at any byte offset, and without
//! `+allows-misaligned-mem-access` every unaligned u16/u64 load becomes
//! byte loads and shifts. The verifier insists on alignment only where the
//! CPU needs it (never on x86-64 or arm64).
fn main() {
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
