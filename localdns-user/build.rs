//! Builds the eBPF object (nightly, bpfel-unknown-none, BTF) into OUT_DIR so
//! the daemon can embed it.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "localdns-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../localdns-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
