//! BERT's embeddings before their LayerNorm: word + token type + position.

use rayon::prelude::*;

use super::COLUMN_CHUNK;
use crate::float::Float;

/// `embedding_backward` splits the vocabulary into this many ranges of dwte rows, one task
/// each: fixed, so the partition does not depend on the thread count.
const VOCAB_TASKS: usize = 64;

/// out[b*t, c] = wte[input_ids] + wtt[token_type_ids] + wpe[position], positions 0..t in
/// each sequence. Added in Hugging Face's order, (word + type) + position.
/// wte [v, c], wpe [max_pos, c], wtt [n_types, c]; ids must be in range (the caller
/// validates user data; an id out of range here is a bug and panics).
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward<F: Float>(
    out: &mut [F],
    input_ids: &[u32],
    token_type_ids: &[u32],
    wte: &[F],
    wpe: &[F],
    wtt: &[F],
    b: usize,
    t: usize,
    c: usize,
) {
    check_shapes(
        out.len(),
        input_ids,
        token_type_ids,
        wte.len(),
        wpe.len(),
        wtt.len(),
        b,
        t,
        c,
    );
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(c)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (id, tt, pos) = (
                input_ids[row] as usize,
                token_type_ids[row] as usize,
                row % t,
            );
            let word = &wte[id * c..(id + 1) * c];
            let token_type = &wtt[tt * c..(tt + 1) * c];
            let position = &wpe[pos * c..(pos + 1) * c];
            for (((o, &w), &y), &p) in out_row.iter_mut().zip(word).zip(token_type).zip(position) {
                *o = w + y + p;
            }
        });
}

/// Scatter-add of dout[b*t, c] into dwte[input_ids], dwpe[position], dwtt[token_type_ids].
/// Deterministic: every gradient row is owned by one task that adds its tokens in order.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<F: Float>(
    dwte: &mut [F],
    dwpe: &mut [F],
    dwtt: &mut [F],
    dout: &[F],
    input_ids: &[u32],
    token_type_ids: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    check_shapes(
        dout.len(),
        input_ids,
        token_type_ids,
        dwte.len(),
        dwpe.len(),
        dwtt.len(),
        b,
        t,
        c,
    );
    if dout.is_empty() {
        return;
    }
    let add_row = |acc: &mut [F], row: usize| {
        for (a, &d) in acc.iter_mut().zip(&dout[row * c..(row + 1) * c]) {
            *a += d;
        }
    };
    // dwte: each task owns a range of vocabulary rows and scans all tokens for its ids.
    let vocab = dwte.len() / c;
    let rows_per_task = vocab.div_ceil(VOCAB_TASKS);
    dwte.par_chunks_mut(rows_per_task * c)
        .enumerate()
        .for_each(|(task, dwte_rows)| {
            let first = task * rows_per_task;
            for (row, &id) in input_ids.iter().enumerate() {
                let local = (id as usize).wrapping_sub(first);
                if local < rows_per_task {
                    add_row(&mut dwte_rows[local * c..(local + 1) * c], row);
                }
            }
        });
    // dwpe: one task per position, summing over the batch.
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(pos, dwpe_row)| {
            for seq in 0..b {
                add_row(dwpe_row, seq * t + pos);
            }
        });
    // dwtt: few rows (BERT has 2), so split each row into column blocks instead.
    for (tt, dwtt_row) in dwtt.chunks_exact_mut(c).enumerate() {
        dwtt_row
            .par_chunks_mut(COLUMN_CHUNK)
            .enumerate()
            .for_each(|(chunk_index, acc)| {
                let j0 = chunk_index * COLUMN_CHUNK;
                for (row, &id) in token_type_ids.iter().enumerate() {
                    if id as usize == tt {
                        let d = &dout[row * c + j0..row * c + j0 + acc.len()];
                        for (a, &x) in acc.iter_mut().zip(d) {
                            *a += x;
                        }
                    }
                }
            });
    }
}

/// Shapes shared by the forward and the backward; panics name the mismatch.
#[allow(clippy::too_many_arguments)]
fn check_shapes(
    rows_len: usize,
    input_ids: &[u32],
    token_type_ids: &[u32],
    wte_len: usize,
    wpe_len: usize,
    wtt_len: usize,
    b: usize,
    t: usize,
    c: usize,
) {
    assert!(c > 0, "embedding: c must be positive");
    assert_eq!(
        rows_len,
        b * t * c,
        "embedding: activations are not [b*t, c]"
    );
    assert_eq!(input_ids.len(), b * t, "embedding: input_ids is not [b*t]");
    assert_eq!(
        token_type_ids.len(),
        b * t,
        "embedding: token_type_ids is not [b*t]"
    );
    assert!(
        wte_len.is_multiple_of(c) && wpe_len.is_multiple_of(c) && wtt_len.is_multiple_of(c),
        "embedding: tables are not [_, c]"
    );
    let (vocab, max_pos, n_types) = (wte_len / c, wpe_len / c, wtt_len / c);
    assert!(
        t <= max_pos,
        "embedding: t = {t} exceeds max_pos = {max_pos}"
    );
    if let Some(&id) = input_ids.iter().find(|&&id| id as usize >= vocab) {
        panic!("embedding: input id {id} is outside the vocabulary of {vocab}");
    }
    if let Some(&tt) = token_type_ids.iter().find(|&&tt| tt as usize >= n_types) {
        panic!("embedding: token type {tt} is outside the {n_types} types");
    }
}
