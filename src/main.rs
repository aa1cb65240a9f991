//! `eps2v` binary: parse the command line, run, print the error chain, exit.

use clap::Parser;

fn main() {
    let cli = eps2v::cli::Cli::parse();
    eps2v::nn::tune_cpu_runtime();
    match eps2v::nn::on_pool(|| eps2v::cli::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            let stopped = matches!(
                err.downcast_ref::<eps2v::Error>(),
                Some(eps2v::Error::Interrupted(_))
            );
            eprintln!("{}: {err}", if stopped { "stopped" } else { "error" });
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            let code = err
                .downcast_ref::<eps2v::Error>()
                .map(eps2v::Error::exit_code)
                .unwrap_or(2);
            std::process::exit(code);
        }
    }
}
