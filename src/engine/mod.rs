//! The engine thread's parts: the sampler (more to come: queues, scheduler, KV cache).

pub mod sampler;
