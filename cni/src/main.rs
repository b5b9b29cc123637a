//! `rsdn-cni`: reads `CNI_*` from the environment and the config from stdin, writes the
//! result or a CNI error object to stdout, and nothing else.

use std::io::Write;

fn main() {
    let outcome = rsdn_cni::invoke(|k| std::env::var(k).ok(), &mut std::io::stdin().lock());
    if let Some(out) = outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    std::process::exit(outcome.exit_code);
}
