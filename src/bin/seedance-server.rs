//! `seedance-server`: parse flags, start logging, run the server until SIGTERM/SIGINT.

use clap::Parser;
use seedance::config::{Cli, Command, Config};
use seedance::server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    server::shutdown::block_signals();
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => fail(2, &e.to_string()),
    };
    if cli.print_config && cli.command.is_none() {
        print!("{}", config.to_yaml());
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        None | Some(Command::Serve) => serve(config),
        Some(Command::Generate(args)) => generate(&args),
        Some(Command::Tokenize(args)) => tokenize(&args),
    }
}

/// `seedance-server tokenize`: the checkpoint's tokenizer alone.
fn tokenize(args: &seedance::config::TokenizeArgs) {
    let tok = match seedance::engine::build::load_tokenizer(&args.model) {
        Ok(t) => t,
        Err(e) => fail(1, &e),
    };
    for text in &args.texts {
        match tok.encode(text, args.add_special) {
            Ok(ids) => println!("{}", serde_json::json!(ids)),
            Err(e) => fail(1, &e.to_string()),
        }
    }
}

/// `seedance-server generate`: the engine alone, no server (issue 3's command-line check).
fn generate(args: &seedance::model::generate::GenerateArgs) {
    use seedance::engine::build::{load_for_cli, SingleSequence};
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => fail(2, &e.to_string()),
    };
    let (model, tok, device) = match load_for_cli(&args.model, &args.device, 0) {
        Ok(m) => m,
        Err(e) => fail(1, &e),
    };
    if let Some(n) = args.parallel {
        return generate_parallel(usize::from(n), args.ids, &opts, model, &tok, &device);
    }
    let max_len = model
        .config()
        .max_position_embeddings
        .min(opts.max_tokens as usize + 8192);
    let mut lm = match SingleSequence::new(model, max_len, &device) {
        Ok(lm) => lm,
        Err(e) => fail(1, &e),
    };
    let mut stdout = std::io::stdout().lock();
    match seedance::model::generate::generate(&mut lm, &tok, &opts, &mut stdout) {
        Ok(stats) => {
            use std::io::Write;
            let _ = writeln!(stdout);
            tracing::info!(?stats, "generation finished");
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

/// `seedance-server generate --parallel N` (see the flag's help).
fn generate_parallel(
    n: usize,
    print_ids: bool,
    opts: &seedance::model::generate::GenerateOptions,
    model: seedance::model::transformer::Transformer,
    tok: &seedance::model::tokenizer::Tokenizer,
    device: &seedance::backend::cuda::device::Selected,
) {
    let prompt = match tok.encode(&opts.prompt, true) {
        Ok(p) => p,
        Err(e) => fail(1, &e.to_string()),
    };
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); n];
    let stats = seedance::engine::build::generate_parallel(
        model,
        device,
        &prompt,
        n,
        &opts.sampling,
        opts.max_tokens as usize,
        &mut |seq, t| ids[seq].push(t),
    );
    match stats {
        Ok(stats) => {
            if print_ids {
                for seq in &ids {
                    let line: Vec<String> = seq.iter().map(u32::to_string).collect();
                    println!("{}", line.join(" "));
                }
            }
            tracing::info!(?stats, "parallel generation finished");
        }
        Err(e) => fail(1, &e),
    }
}

fn serve(config: Config) {
    // Every log line names the instance: the server's threads enter this span too.
    let span = tracing::info_span!("seedance", instance = %config.resume.instance_id);
    let _in = span.enter();
    if config.engine.model == "null" {
        tracing::info!("model: null (fixed text, no weights) — measures the serving path only");
    }
    let server = match server::start(config) {
        Ok(s) => s,
        Err(e) => fail(1, &e.to_string()),
    };
    server::shutdown::watch(server.stopper(), server.reloader());
    eprintln!("listening on {}", server.addr);
    if let Some(tls) = server.tls_addr {
        eprintln!("tls listening on {tls}");
    }
    server.join();
    tracing::info!("shut down cleanly");
}

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("seedance-server: {msg}");
    std::process::exit(code);
}
