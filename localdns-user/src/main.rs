fn main() {
    let mut ebpf = aya::EbpfLoader::new().load(localdns_user::EBPF_OBJECT).unwrap();
    for name in ["localdns_xdp", "localdns_tc"] {
        let prog = ebpf.program_mut(name).unwrap();
        let r = match prog {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            _ => panic!(),
        };
        match r {
            Ok(()) => println!("{name} loaded"),
            Err(e) => { println!("{name}: {e}"); if let aya::programs::ProgramError::LoadError{verifier_log, ..} = e { println!("{verifier_log}"); } }
        }
    }
}
