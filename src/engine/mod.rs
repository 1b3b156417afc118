//! Serving engine: the paged KV cache (scheduler, sampler and queues join here).

pub mod kv;
