//! Model side of the engine: checkpoints, tokenizer, chat templates, incremental
//! detokenization, stop strings, and the engine-alone generation loop.

pub mod detok;
pub mod generate;
pub mod stop;
pub mod template;
pub mod tokenizer;
