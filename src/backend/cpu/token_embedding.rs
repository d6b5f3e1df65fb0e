//! A decoder's embeddings: the token table alone (positions enter through RoPE, there are
//! no token types), as Llama's, Mistral's and Qwen2's `embed_tokens`.

use rayon::prelude::*;

use crate::float::Float;

/// `token_embedding_backward` splits the vocabulary into this many ranges of dwte rows, one
/// task each: fixed, so the partition does not depend on the thread count.
const VOCAB_TASKS: usize = 64;

fn check_shapes(op: &str, rows: usize, ids: &[u32], table: usize, c: usize) {
    assert_eq!(rows, ids.len() * c, "{op}: out/dout is not [n, c]");
    assert!(
        c > 0 && table.is_multiple_of(c),
        "{op}: the table is not [v, c]"
    );
    let v = table / c;
    if let Some(id) = ids.iter().find(|&&id| id as usize >= v) {
        panic!("{op}: token id {id} is outside the table of {v} rows");
    }
}

/// out[n, c] = wte[ids[n]]; wte [v, c]. The ids must be in range (the model checks user
/// data first; an id out of range here is a bug and panics).
pub fn token_embedding_forward<F: Float>(out: &mut [F], ids: &[u32], wte: &[F], c: usize) {
    check_shapes("token_embedding_forward", out.len(), ids, wte.len(), c);
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(c).zip(ids).for_each(|(out_row, &id)| {
        let id = id as usize;
        out_row.copy_from_slice(&wte[id * c..(id + 1) * c]);
    });
}

/// dwte[ids[n]] += dout[n] for every row n. Deterministic: every table row is owned by one
/// task, which adds its tokens in order.
pub fn token_embedding_backward<F: Float>(dwte: &mut [F], dout: &[F], ids: &[u32], c: usize) {
    check_shapes("token_embedding_backward", dout.len(), ids, dwte.len(), c);
    if dwte.is_empty() {
        return;
    }
    let v = dwte.len() / c;
    let rows_per_task = v.div_ceil(VOCAB_TASKS).max(1);
    dwte.par_chunks_mut(rows_per_task * c)
        .enumerate()
        .for_each(|(task, dwte)| {
            let first = task * rows_per_task;
            let owned = first..first + dwte.len() / c;
            for (row, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if !owned.contains(&id) {
                    continue;
                }
                let at = (id - first) * c;
                for (g, &d) in dwte[at..at + c]
                    .iter_mut()
                    .zip(&dout[row * c..(row + 1) * c])
                {
                    *g += d;
                }
            }
        });
}
