//! `eps2v` binary: parse the command line, run, print the error chain, exit.

fn main() {
    // `eps2v … | head`: a closed stdout ends the process quietly, as for
    // other command-line tools, instead of a panic at the next print (the
    // stages' writes are atomic, so this is as safe as any other kill).
    #[cfg(unix)]
    // SAFETY: restoring the default action of one signal before any
    // thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = eps2v::cli::parse();
    let json = cli.json;
    eps2v::nn::tune_cpu_runtime();
    match eps2v::nn::on_pool(|| eps2v::cli::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            let stopped = matches!(
                err.downcast_ref::<eps2v::Error>(),
                Some(eps2v::Error::Interrupted(_))
            );
            let message = err.to_string();
            let mut said = message.clone();
            eprintln!("{}: {said}", if stopped { "stopped" } else { "error" });
            // A cause the message above already quotes (an I/O error after
            // its path) is not printed again.
            let mut causes = Vec::new();
            for cause in err.chain().skip(1) {
                let cause = cause.to_string();
                if !said.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                    causes.push(cause.clone());
                }
                said = cause;
            }
            let code = err
                .downcast_ref::<eps2v::Error>()
                .map(eps2v::Error::exit_code)
                .unwrap_or(2);
            // `--json`: stdout still holds one JSON document, so that a
            // script reading it learns why instead of failing to parse.
            if json {
                let doc = serde_json::json!({
                    "error": message,
                    "causes": causes,
                    "interrupted": stopped,
                    "exit_code": code,
                });
                println!("{doc:#}");
            }
            std::process::exit(code);
        }
    }
}
