//! Buffers as handles into a backend's arenas, in the manner of llm.c's pointers into one
//! allocation: a model names every tensor by (arena, offset, length) and never holds
//! memory itself, so one model runs on any backend, and each backend decides what an arena
//! is (a `Vec` on the host, one device allocation on the GPU) and its element type.

use std::ops::Range;

use crate::error::{Error, Result};

/// The arenas every backend owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arena {
    /// The parameters, in the model's parameter layout (fp32 master weights on the GPU).
    Params,
    /// d loss / d parameter, in the parameter layout (fp32).
    Grads,
    /// The activations and the backward's scratch, in the activation type (f32 or bf16 on
    /// the GPU).
    Acts,
    /// What stays fp32 whatever the activation type: normalisation statistics, the
    /// attention's saved state, the reward head and its logits.
    Stats,
}

/// The range of one arena that `bufs` tile together, without gaps (e.g. one layer's
/// parameters): what a backward announces final with `Backend::grads_final`.
pub fn span(bufs: impl IntoIterator<Item = Buf>) -> Result<Range<usize>> {
    let mut bufs: Vec<Buf> = bufs.into_iter().collect();
    bufs.sort_by_key(|b| b.offset);
    let (Some(first), Some(last)) = (bufs.first(), bufs.last()) else {
        return Ok(0..0);
    };
    let tiled = bufs
        .windows(2)
        .all(|w| w[0].arena == w[1].arena && w[0].range().end == w[1].offset);
    match tiled {
        true => Ok(first.offset..last.range().end),
        false => Err(Error::internal(format!(
            "{} tensors from offset {} do not lie together in one arena",
            bufs.len(),
            first.offset
        ))),
    }
}

/// A tensor: `len` elements of `arena` from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub arena: Arena,
    pub offset: usize,
    pub len: usize,
}

impl Buf {
    /// The whole of an arena of `len` elements.
    pub fn whole(arena: Arena, len: usize) -> Buf {
        Buf {
            arena,
            offset: 0,
            len,
        }
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }

    /// Elements `start..start + len` of this buffer (e.g. one row of a table).
    pub fn part(&self, start: usize, len: usize) -> Buf {
        assert!(
            start + len <= self.len,
            "Buf::part: {start}+{len} past {}",
            self.len
        );
        Buf {
            arena: self.arena,
            offset: self.offset + start,
            len,
        }
    }

    /// The same place in another arena of the same layout (a parameter's gradient).
    pub fn in_arena(&self, arena: Arena) -> Buf {
        Buf { arena, ..*self }
    }

    fn overlaps(&self, other: &Buf) -> bool {
        self.arena == other.arena
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}

/// Consecutive buffers cut off the front of an arena: how a model lays out its
/// parameters and activations.
pub struct Carver {
    arena: Arena,
    next: usize,
}

impl Carver {
    pub fn new(arena: Arena) -> Carver {
        Carver { arena, next: 0 }
    }

    pub fn take(&mut self, len: usize) -> Buf {
        let buf = Buf {
            arena: self.arena,
            offset: self.next,
            len,
        };
        self.next += len;
        buf
    }

    /// Elements taken so far: the arena's length once the layout is done.
    pub fn used(&self) -> usize {
        self.next
    }
}

/// The buffers one op call borrows, checked so that a buffer it writes overlaps no other
/// buffer of the call: what makes the backends' lending of arena parts sound.
#[derive(Default)]
pub(crate) struct Loans {
    lent: Vec<(Buf, bool)>, // (buffer, written)
}

impl Loans {
    /// Records `buf` (written or read); an overlap with a written buffer is a bug of the
    /// model that asked for it.
    pub(crate) fn lend(&mut self, buf: Buf, write: bool) -> Result<()> {
        if let Some((other, _)) = self
            .lent
            .iter()
            .find(|(other, other_write)| (write || *other_write) && buf.overlaps(other))
        {
            return Err(Error::internal(format!(
                "an op writes a buffer that overlaps another of its buffers: {buf:?} and {other:?}"
            )));
        }
        self.lent.push((buf, write));
        Ok(())
    }
}

/// Checks that `buf` lies within an arena of `len` elements.
pub(crate) fn check_bounds(buf: Buf, len: usize) -> Result<()> {
    if buf
        .offset
        .checked_add(buf.len)
        .is_some_and(|end| end <= len)
    {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{buf:?} lies outside its arena of {len} elements"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_is_the_range_its_buffers_tile_and_refuses_a_gap() {
        let buf = |offset, len| Buf {
            arena: Arena::Grads,
            offset,
            len,
        };
        assert_eq!(span([buf(30, 5), buf(10, 20)]).unwrap(), 10..35);
        assert!(span([buf(10, 20), buf(31, 5)]).is_err());
        let other = Buf {
            arena: Arena::Params,
            ..buf(30, 5)
        };
        assert!(span([buf(10, 20), other]).is_err());
    }
}
