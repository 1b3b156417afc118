//! `seedance-client`: stream a generation to stdout over WebSocket, surviving dropped
//! connections (reconnect with exponential backoff and full jitter, resume, ack).
//!
//!     seedance-client chat --url ws://127.0.0.1:8080/v1/chat "Tell me a story"

use std::io::Write;
use std::time::Duration;

use clap::{Parser, Subcommand};
use seedance::client::{chat, ChatOptions, Event};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "seedance-client",
    version,
    about = "WebSocket client for seedance-server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one prompt and stream the answer (resuming across dropped connections).
    Chat(ChatArgs),
}

#[derive(clap::Args)]
struct ChatArgs {
    /// The prompt (a single user message; the server applies the chat template).
    prompt: String,
    /// Server endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/chat")]
    url: String,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// token, chunk or full.
    #[arg(long)]
    stream_mode: Option<String>,
    /// Use the prompt as raw text (no chat template).
    #[arg(long)]
    raw: bool,
    /// Print every server message as one JSON line instead of the text.
    #[arg(long)]
    json: bool,
    /// Reconnect attempts in a row without progress before giving up.
    #[arg(long, default_value_t = 12)]
    retries: u32,
    /// First backoff step in ms (doubles per attempt, capped at --backoff-max-ms; full jitter).
    #[arg(long, default_value_t = 100)]
    backoff_ms: u64,
    #[arg(long, default_value_t = 5000)]
    backoff_max_ms: u64,
    /// Request id (the server's `id` field).
    #[arg(long, default_value = "c1")]
    id: String,
}

fn main() {
    let Cmd::Chat(a) = Cli::parse().command;
    let mut req = if a.raw {
        json!({"prompt": a.prompt})
    } else {
        json!({"messages": [{"role": "user", "content": a.prompt}]})
    };
    if let Some(n) = a.max_tokens {
        req["max_tokens"] = n.into();
    }
    if let Some(t) = a.temperature {
        req["temperature"] = t.into();
    }
    if let Some(s) = a.seed {
        req["seed"] = s.into();
    }
    if let Some(m) = &a.stream_mode {
        req["stream_mode"] = m.as_str().into();
    }
    let mut o = ChatOptions::new(&a.url, req);
    o.id = a.id.clone();
    o.max_retries = a.retries;
    o.backoff_base = Duration::from_millis(a.backoff_ms);
    o.backoff_max = Duration::from_millis(a.backoff_max_ms.max(a.backoff_ms));
    let stdout = std::io::stdout();
    let json_out = a.json;
    let result = chat(&o, |ev| {
        let mut out = stdout.lock();
        match ev {
            Event::Message(m) if json_out => {
                let _ = writeln!(out, "{m}");
            }
            Event::Text(t) if !json_out => {
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            }
            Event::Reconnecting {
                attempt,
                after,
                delay,
                why,
            } => eprintln!(
                "seedance-client: connection lost ({why}); resuming after seq {after} in {} ms (attempt {attempt})",
                delay.as_millis()
            ),
            _ => {}
        }
    });
    match result {
        Ok(done) => {
            if !json_out {
                println!();
            }
            let reason = done["finish_reason"].as_str().unwrap_or("?");
            if !matches!(reason, "stop" | "length") {
                eprintln!("seedance-client: finished: {reason}");
            }
        }
        Err(e) => {
            eprintln!("seedance-client: {e}");
            std::process::exit(1);
        }
    }
}
