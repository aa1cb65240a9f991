//! `eps2v` binary: parse the command line, run, print the error chain, exit.

fn main() {
    let cli = eps2v::cli::parse();
    eps2v::nn::tune_cpu_runtime();
    match eps2v::nn::on_pool(|| eps2v::cli::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            let stopped = matches!(
                err.downcast_ref::<eps2v::Error>(),
                Some(eps2v::Error::Interrupted(_))
            );
            let mut said = err.to_string();
            eprintln!("{}: {said}", if stopped { "stopped" } else { "error" });
            // A cause the message above already quotes (an I/O error after
            // its path) is not printed again.
            for cause in err.chain().skip(1) {
                let cause = cause.to_string();
                if !said.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                }
                said = cause;
            }
            let code = err
                .downcast_ref::<eps2v::Error>()
                .map(eps2v::Error::exit_code)
                .unwrap_or(2);
            std::process::exit(code);
        }
    }
}
