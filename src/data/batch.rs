//! A padded batch of token sequences, as every backend's ops read it.

/// A padded batch of token sequences: B sequences of T tokens.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub input_ids: Vec<u32>,      // [B, T]
    pub token_type_ids: Vec<u32>, // [B, T]
    pub mask: Vec<u8>,            // [B, T] 1 = real token, 0 = padding
    pub b: usize,
    pub t: usize,
    /// The sequences of each prompt, in order (consecutive, summing to B): the completions
    /// that continue one prompt, which a decoder may run once (the shared prefix). Empty
    /// when the sequences are unrelated.
    pub groups: Vec<usize>,
}

impl Batch {
    /// Pads sequences (ids, types) to the longest with `pad_id`.
    pub fn from_sequences<'s>(
        seqs: impl IntoIterator<Item = (&'s [u32], &'s [u8])>,
        pad_id: u32,
    ) -> Batch {
        let seqs: Vec<_> = seqs.into_iter().collect();
        let b = seqs.len();
        let t = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut batch = Batch {
            input_ids: vec![pad_id; b * t],
            token_type_ids: vec![0; b * t],
            mask: vec![0; b * t],
            b,
            t,
            groups: Vec::new(),
        };
        for (row, (ids, types)) in seqs.iter().enumerate() {
            let at = row * t;
            batch.input_ids[at..at + ids.len()].copy_from_slice(ids);
            for (j, &ty) in types.iter().enumerate() {
                batch.token_type_ids[at + j] = ty as u32;
            }
            batch.mask[at..at + ids.len()].fill(1);
        }
        batch
    }

    /// The same batch, its sequences grouped by prompt (`groups`).
    pub fn grouped(mut self, groups: Vec<usize>) -> Batch {
        debug_assert_eq!(groups.iter().sum::<usize>(), self.b);
        self.groups = groups;
        self
    }

    /// [B] the group (prompt) of each sequence; every sequence its own without groups.
    pub fn of_sequence(&self) -> Vec<u32> {
        if self.groups.is_empty() {
            return (0..self.b as u32).collect();
        }
        let mut of = Vec::with_capacity(self.b);
        for (g, &n) in self.groups.iter().enumerate() {
            of.extend(std::iter::repeat_n(g as u32, n));
        }
        of
    }
}
