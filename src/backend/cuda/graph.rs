//! CUDA graphs for decode steps, one per (batch-size bucket, context bucket).
//!
//! A decode step is ~10 launches per layer (≈ 160–300 per token); at batch 1 the launch overhead
//! alone is comparable to the step. Capturing the step once per shape and replaying it makes the
//! CPU cost one `cuGraphLaunch`. Rules the caller keeps:
//! - Every per-step input (token ids, positions, slots, block tables, sampling params) lives in a
//!   fixed device buffer sized for the bucket and is refreshed with one `memcpy_htod` before
//!   `launch`; the batch is padded up to its bucket (padding rows point at a scratch block).
//! - The split-KV count and the block-table stride change launch shapes, so the key carries the
//!   context bucket they are derived from (`plan::ctx_bucket`: a power of two ≥ `SPLIT_LEN`),
//!   and the step metadata layout is a function of the key alone (`plan::MetaLayout`).
//! - [`DecodeGraphs::run`] runs the step once *eagerly* before capturing: that grows the
//!   launchers' workspaces outside the capture (an allocation inside a capture would belong to
//!   the graph) and surfaces shape errors as ordinary errors. A workspace that moves (a larger
//!   shape seen later) makes every graph captured before stale: they are dropped and re-captured
//!   on their next use ([`CudaOps::workspace_epoch`]).
//! - Host-to-device copies happen before `run`, outside any capture (a pinned buffer's copy
//!   would add an event wait to the capture).

use super::ops::CudaOps;
use super::CudaError;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use std::collections::HashMap;

/// Batch sizes a graph is captured for; a batch runs in the smallest bucket that holds it.
pub const BATCH_BUCKETS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 192, 256];

/// The bucket for `batch`, or `None` above the largest (run uncaptured).
pub fn bucket(batch: usize) -> Option<usize> {
    BATCH_BUCKETS.iter().copied().find(|&b| b >= batch.max(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Rows of the step, padding included (an entry of [`BATCH_BUCKETS`]).
    pub batch_bucket: usize,
    /// Longest context the attention is launched for (fixes split-KV and the table stride).
    pub ctx_bucket: usize,
}

#[derive(Default)]
pub struct DecodeGraphs {
    graphs: HashMap<GraphKey, CudaGraph>,
    /// The launchers' workspace epoch the graphs were captured under.
    epoch: u64,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised (CUDA
// driver API, "Graph object thread safety"). `DecodeGraphs` is owned by one device model, which
// `&mut self` serialises; it is not `Sync`, so it is never shared between threads, only moved
// (once, onto the engine thread).
unsafe impl Send for DecodeGraphs {}

impl DecodeGraphs {
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }

    /// Replays the graph for `key`, capturing it first (with `step`) if there is none yet.
    pub fn run(
        &mut self,
        ops: &mut CudaOps,
        key: GraphKey,
        mut step: impl FnMut(&mut CudaOps) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        if ops.workspace_epoch() != self.epoch {
            self.graphs.clear();
            self.epoch = ops.workspace_epoch();
        }
        if !self.graphs.contains_key(&key) {
            step(ops)?; // eager run: workspaces grow here, not inside the capture
            if ops.workspace_epoch() != self.epoch {
                self.graphs.clear();
                self.epoch = ops.workspace_epoch();
            }
            ops.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let recorded = step(ops);
            // End the capture whatever happened, so the stream is usable again. A failed step
            // also invalidates the capture: report the step's error, not the capture's.
            let graph = ops.stream.end_capture(CUgraphInstantiate_flags(0));
            recorded?;
            let Some(graph) = graph? else {
                return Err(CudaError::Shape(format!("{key:?}: empty decode graph")));
            };
            self.graphs.insert(key, graph);
        }
        match self.graphs.get(&key) {
            Some(g) => Ok(g.launch()?),
            None => Err(CudaError::Shape(format!("{key:?}: graph missing"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_and_stop_at_the_largest() {
        assert_eq!(bucket(0), Some(1));
        assert_eq!(bucket(1), Some(1));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(64), Some(64));
        assert_eq!(bucket(65), Some(128));
        assert_eq!(bucket(256), Some(256));
        assert_eq!(bucket(257), None);
    }
}
