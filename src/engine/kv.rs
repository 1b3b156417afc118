//! Paged KV cache: fixed-size blocks, a free-list allocator and one block table per sequence.
//!
//! A sequence's keys and values live in blocks of `block_size` token slots (16 by default). A
//! sequence owns a [`BlockTable`]: the ids of its blocks in position order, so token position `p`
//! sits in block `table.blocks()[p / block_size]`, slot `p % block_size`. Blocks come from one
//! [`BlockAllocator`] shared by all sequences; the scheduler admits a request only when enough
//! blocks are free and, when they run out, preempts a sequence (frees its table, recomputes later).
//!
//! Storage ([`KvCache`]): per layer, one K and one V array of F16, laid out
//! `(num_blocks, kv_heads, block_size, head_dim)`. For one KV head, one block is a contiguous
//! `block_size × head_dim` tile, so a decode step reads each of a sequence's blocks as a few
//! contiguous runs (one per KV head) and the attention kernel converts a whole tile at once.

use half::f16;
use half::vec::HalfBitsVecExt;
use thiserror::Error;

/// Default number of token slots per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Running out of blocks is an ordinary event (the scheduler preempts), not a bug.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    #[error("KV cache out of blocks: need {needed}, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

/// Free-list allocator over block ids `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free block ids; allocation pops from the end so recently freed (cache-warm) blocks go first.
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        let free = (0..num_blocks as u32).rev().collect();
        Self { free, num_blocks }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks in use, for `seedance_kv_cache_usage_ratio`.
    pub fn usage_ratio(&self) -> f64 {
        if self.num_blocks == 0 {
            return 0.0;
        }
        (self.num_blocks - self.free.len()) as f64 / self.num_blocks as f64
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, KvError> {
        if n > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        Ok(self.free.split_off(at))
    }

    /// Returns blocks to the free list.
    pub fn free(&mut self, blocks: &[u32]) {
        debug_assert!(blocks.iter().all(|&b| (b as usize) < self.num_blocks));
        debug_assert!(
            self.free.len() + blocks.len() <= self.num_blocks,
            "double free"
        );
        self.free.extend_from_slice(blocks);
    }
}

/// The blocks of one sequence, in position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Token slots this table can hold.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// Blocks still needed so that `num_tokens` positions fit.
    pub fn blocks_needed(&self, num_tokens: usize, block_size: usize) -> usize {
        num_tokens
            .div_ceil(block_size)
            .saturating_sub(self.blocks.len())
    }

    /// Grows the table so positions `0..num_tokens` have a slot (all or nothing).
    pub fn reserve(
        &mut self,
        alloc: &mut BlockAllocator,
        num_tokens: usize,
        block_size: usize,
    ) -> Result<(), KvError> {
        let need = self.blocks_needed(num_tokens, block_size);
        if need > 0 {
            let new = alloc.allocate(need)?;
            self.blocks.extend_from_slice(&new);
        }
        Ok(())
    }

    /// Gives every block back (sequence finished, cancelled or preempted).
    pub fn release(&mut self, alloc: &mut BlockAllocator) {
        alloc.free(&self.blocks);
        self.blocks.clear();
    }
}

/// Shape of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvConfig {
    /// Bytes of F16 K+V storage this config needs.
    pub fn bytes(&self) -> usize {
        2 * 2 * self.num_layers * self.num_blocks * self.block_size * self.kv_heads * self.head_dim
    }

    /// Blocks that fit in `bytes` for a model of this shape.
    pub fn blocks_for_bytes(
        bytes: usize,
        num_layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        let per_block = 2 * 2 * num_layers * block_size * kv_heads * head_dim;
        bytes / per_block.max(1)
    }
}

/// K and V storage for every layer; see the module doc for the layout.
pub struct KvCache {
    cfg: KvConfig,
    /// Per layer: (num_blocks, kv_heads, block_size, head_dim).
    k: Vec<Vec<f16>>,
    /// Per layer: (num_blocks, kv_heads, block_size, head_dim).
    v: Vec<Vec<f16>>,
}

impl KvCache {
    pub fn new(cfg: KvConfig) -> Self {
        let per_layer = cfg.num_blocks * cfg.kv_heads * cfg.block_size * cfg.head_dim;
        // Zeroed u16 storage comes from calloc: pages are mapped only when a block is first
        // written, so a large cache costs nothing at start-up. f16 +0.0 is all-zero bits.
        let zeroed = || -> Vec<f16> { vec![0u16; per_layer].reinterpret_into() };
        let k = (0..cfg.num_layers).map(|_| zeroed()).collect();
        let v = (0..cfg.num_layers).map(|_| zeroed()).collect();
        Self { cfg, k, v }
    }

    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }

    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// Element offset of (block, kv_head, slot, 0) within one layer's array.
    #[inline]
    pub fn offset(&self, block: u32, kv_head: usize, slot: usize) -> usize {
        let c = &self.cfg;
        ((block as usize * c.kv_heads + kv_head) * c.block_size + slot) * c.head_dim
    }

    /// One layer's K and V arrays, (num_blocks, kv_heads, block_size, head_dim) each.
    pub fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Writes the K and V rows of one token at `pos` of the sequence with `table`.
    /// `k`, `v`: (kv_heads, head_dim). The caller has reserved the slot (`pos < capacity`).
    pub fn write(&mut self, layer: usize, table: &BlockTable, pos: usize, k: &[f32], v: &[f32]) {
        let bs = self.cfg.block_size;
        let hd = self.cfg.head_dim;
        let block = table.blocks[pos / bs];
        for h in 0..self.cfg.kv_heads {
            let o = self.offset(block, h, pos % bs);
            let src = h * hd..(h + 1) * hd;
            for (d, s) in self.k[layer][o..o + hd].iter_mut().zip(&k[src.clone()]) {
                *d = f16::from_f32(*s);
            }
            for (d, s) in self.v[layer][o..o + hd].iter_mut().zip(&v[src]) {
                *d = f16::from_f32(*s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_free_returns_every_block() {
        let mut a = BlockAllocator::new(10);
        let x = a.allocate(3).unwrap();
        let y = a.allocate(7).unwrap();
        assert_eq!(a.num_free(), 0);
        assert!((a.usage_ratio() - 1.0).abs() < 1e-12);
        assert_eq!(
            a.allocate(1),
            Err(KvError::OutOfBlocks { needed: 1, free: 0 })
        );
        a.free(&x);
        a.free(&y);
        assert_eq!(a.num_free(), 10);
        let mut all = a.allocate(10).unwrap();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut a = BlockAllocator::new(4);
        let mut t = BlockTable::new();
        assert!(t.reserve(&mut a, 100, 16).is_err());
        assert_eq!(a.num_free(), 4);
        assert!(t.blocks().is_empty());
    }

    #[test]
    fn block_table_grows_by_whole_blocks_and_releases() {
        let mut a = BlockAllocator::new(8);
        let mut t = BlockTable::new();
        t.reserve(&mut a, 1, 16).unwrap();
        assert_eq!(t.blocks().len(), 1);
        t.reserve(&mut a, 16, 16).unwrap();
        assert_eq!(t.blocks().len(), 1);
        t.reserve(&mut a, 17, 16).unwrap();
        assert_eq!(t.blocks().len(), 2);
        assert_eq!(t.capacity(16), 32);
        assert_eq!(t.blocks_needed(60, 16), 2);
        t.release(&mut a);
        assert_eq!(a.num_free(), 8);
        assert!(t.blocks().is_empty());
    }

    #[test]
    fn many_sequences_leak_nothing() {
        let mut a = BlockAllocator::new(64);
        let mut tables: Vec<BlockTable> = (0..8).map(|_| BlockTable::new()).collect();
        for step in 1..=40usize {
            for (i, t) in tables.iter_mut().enumerate() {
                let _ = t.reserve(&mut a, step * (i + 1), 16);
            }
            if step % 7 == 0 {
                tables[step % 8].release(&mut a);
            }
        }
        for t in &mut tables {
            t.release(&mut a);
        }
        assert_eq!(a.num_free(), 64);
    }

    #[test]
    fn write_lands_in_the_documented_slot() {
        let cfg = KvConfig {
            num_layers: 1,
            num_blocks: 4,
            block_size: 4,
            kv_heads: 2,
            head_dim: 3,
        };
        let mut kv = KvCache::new(cfg);
        let mut a = BlockAllocator::new(4);
        let mut t = BlockTable::new();
        t.reserve(&mut a, 6, 4).unwrap();
        let k = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let v = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
        kv.write(0, &t, 5, &k, &v);
        let b = t.blocks()[1];
        let (ks, vs) = kv.layer(0);
        let o = kv.offset(b, 1, 1);
        assert_eq!(ks[o].to_f32(), 4.0);
        assert_eq!(vs[o + 2].to_f32(), -6.0);
        assert_eq!(cfg.bytes(), 2 * 2 * 4 * 4 * 2 * 3);
    }
}
