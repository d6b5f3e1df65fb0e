//! Launch wrappers of the model's kernels, one method per kernel entry point, mirroring the
//! CPU ops (src/backend/cpu): forward outputs are overwritten, backward gradients are
//! ADDED to. Buffers are row-major; shapes beside every argument. Activations are
//! `T: Activation` (f32 or bf16), weights and their gradients fp32. Every length is checked
//! against the shapes before a launch, so a wrong call is an error, never a wild access.

use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

use super::runtime::{Activation, CudaRuntime, DeviceRead, DeviceWrite, check_len, dim, driver};
use crate::backend::cpu::AttentionDropout;
use crate::error::{Error, Result};
use launch::LaunchShape;

/// The launch shape of every kernel (this file's, and those of matmul.rs, loss.rs, optim.rs
/// and cast.rs), as pure functions of the tensor shapes: no device needed, so a CPU
/// emulation of the kernels runs the very grids the GPU gets. The constants restate the
/// kernels' own (kernels/*.cu); each function names the kernels it serves. Errors: a shape
/// that no grid can cover.
pub mod launch {
    use cudarc::driver::LaunchConfig;

    use crate::backend::cuda::runtime::blocks;
    use crate::error::{Error, Result};

    /// Threads per block of the elementwise kernels (one thread per element).
    pub const ELEMENTWISE_THREADS: usize = 256;
    /// Threads per block of the one-warp-per-row kernels (8 rows per block).
    pub const ROW_THREADS: usize = 256;
    /// Threads per block of version 1 of attention (one block per query row).
    pub const ATTENTION_THREADS: usize = 128;
    /// Threads per prompt block of the ranking loss; a prompt's further completions loop.
    pub const LOSS_THREADS: usize = 64;
    /// Blocks of the gradient norm's first stage per gradient buffer, of NORM_THREADS
    /// threads. Fixed (not per device) so the summation order, hence the result, is the
    /// same on every GPU. The second stage is one block of NORM_FINISH_THREADS.
    pub const NORM_BLOCKS: usize = 256;
    pub const NORM_THREADS: usize = 512;
    pub const NORM_FINISH_THREADS: usize = 1024;
    /// Columns per block of the column reductions, and row slices per block: one warp per
    /// slice (COLUMN_TILE x COLUMN_SLICES threads; kernels/common.cuh column_tile_sum).
    pub const COLUMN_TILE: usize = 32;
    pub const COLUMN_SLICES: usize = 32;
    /// The flash attention tiles (kernels/attention.cu): FLASH_ROWS own rows per block (4
    /// warps of 4), streamed tiles of FLASH_TILE rows, head sizes up to FLASH_MAX_HEAD.
    pub const FLASH_ROWS: usize = 16;
    pub const FLASH_TILE: usize = 32;
    pub const FLASH_THREADS: usize = 128;
    pub const FLASH_MAX_HEAD: usize = 128;
    /// Dynamic shared memory a kernel may use without opting in; launch wrappers raise the
    /// kernel's limit for a shape that needs more.
    pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;
    /// The most the flash kernels may ask for: what every compute capability >= 8.0 allows.
    pub const MAX_SHARED_BYTES: u32 = 99 * 1024;

    /// Grid (x, y, z), threads per block (1-D) and dynamic shared memory of one launch.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct LaunchShape {
        pub grid: (u32, u32, u32),
        pub block: u32,
        pub shared_bytes: u32,
    }

    impl LaunchShape {
        fn new(grid: (u32, u32, u32), block: usize, shared_bytes: u32) -> LaunchShape {
            LaunchShape {
                grid,
                block: block as u32,
                shared_bytes,
            }
        }

        /// The dynamic shared memory limit the kernel must be raised to before this launch
        /// (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), when it needs more than the
        /// default; None when the default does.
        pub fn shared_opt_in(self) -> Option<u32> {
            (self.shared_bytes > DEFAULT_SHARED_BYTES).then_some(self.shared_bytes)
        }

        pub fn config(self) -> LaunchConfig {
            LaunchConfig {
                grid_dim: self.grid,
                block_dim: (self.block, 1, 1),
                shared_mem_bytes: self.shared_bytes,
            }
        }
    }

    /// One thread per element of `len` (> 0): embedding_forward,
    /// embedding_backward_positions, bias_gelu_forward, tanh_*, residual_forward, dropout_*,
    /// cls_pool_*, bias_broadcast_forward, adamw_update*, cast_*.
    pub fn elementwise(op: &str, len: usize) -> Result<LaunchShape> {
        let grid = blocks(op, len, ELEMENTWISE_THREADS)?;
        Ok(LaunchShape::new((grid, 1, 1), ELEMENTWISE_THREADS, 0))
    }

    /// One warp per row of `rows`: layernorm_forward, residual_layernorm_forward,
    /// layernorm_backward_input, flash_attention_backward_dot.
    pub fn warp_rows(op: &str, rows: usize) -> Result<LaunchShape> {
        let grid = blocks(op, rows * 32, ROW_THREADS)?;
        Ok(LaunchShape::new((grid, 1, 1), ROW_THREADS, 0))
    }

    /// Column sums of a [rows, c] matrix, one block per COLUMN_TILE columns of COLUMN_TILE
    /// x COLUMN_SLICES threads: bias_backward, bias_gelu_backward, layernorm_backward_params.
    pub fn column_tiles(op: &str, c: usize) -> Result<LaunchShape> {
        let grid = blocks(op, c, COLUMN_TILE)?;
        Ok(LaunchShape::new(
            (grid, 1, 1),
            COLUMN_TILE * COLUMN_SLICES,
            0,
        ))
    }

    /// embedding_backward_rows: one block per used table row, threads over the channels
    /// (for tables whose rows are used by few positions each: the word table).
    pub fn embedding_rows(op: &str, distinct: usize) -> Result<LaunchShape> {
        let grid = blocks(op, distinct, 1)?;
        Ok(LaunchShape::new((grid, 1, 1), ELEMENTWISE_THREADS, 0))
    }

    /// embedding_backward_rows_tiled: the column reduction of each used row's positions,
    /// grid (column tiles of c, distinct rows) (for rows used by many positions: the type
    /// table).
    pub fn embedding_rows_tiled(op: &str, c: usize, distinct: usize) -> Result<LaunchShape> {
        let grid = (blocks(op, c, COLUMN_TILE)?, y_blocks(op, distinct)?, 1);
        Ok(LaunchShape::new(grid, COLUMN_TILE * COLUMN_SLICES, 0))
    }

    /// The backward of an embedding table whose `distinct` used rows are used by
    /// `positions` positions in all: (kernel, shape). Rows used by many positions each (the
    /// type table) are column reductions over their positions (embedding_backward_rows_tiled);
    /// rows used by few (the word table) get one block each (embedding_backward_rows). The
    /// choice depends on the ids only, so the sums stay identical run to run.
    pub fn embedding_table(
        op: &str,
        positions: usize,
        c: usize,
        distinct: usize,
    ) -> Result<(&'static str, LaunchShape)> {
        if positions >= COLUMN_SLICES * distinct {
            Ok((
                "embedding_backward_rows_tiled",
                embedding_rows_tiled(op, c, distinct)?,
            ))
        } else {
            Ok(("embedding_backward_rows", embedding_rows(op, distinct)?))
        }
    }

    /// ranking_loss_forward_backward: one block of LOSS_THREADS per prompt.
    pub fn ranking_loss(op: &str, prompts: usize) -> Result<LaunchShape> {
        let grid = blocks(op, prompts, 1)?;
        Ok(LaunchShape::new((grid, 1, 1), LOSS_THREADS, 0))
    }

    /// global_norm_squared_partial: NORM_BLOCKS blocks (grid-stride over the buffer).
    pub fn norm_partial() -> LaunchShape {
        LaunchShape::new((NORM_BLOCKS as u32, 1, 1), NORM_THREADS, 0)
    }

    /// global_norm_squared_finish: one block.
    pub fn norm_finish() -> LaunchShape {
        LaunchShape::new((1, 1, 1), NORM_FINISH_THREADS, 0)
    }

    /// Version 1 of attention, attention_forward and attention_backward_query: one block per
    /// (sequence, head, query row), a row of t fp32 scores in shared memory (<= 48 KiB).
    pub fn attention_rows(op: &str, b: usize, t: usize, nh: usize) -> Result<LaunchShape> {
        let bytes = t * std::mem::size_of::<f32>();
        if bytes > DEFAULT_SHARED_BYTES as usize {
            return Err(Error::internal(format!(
                "{op}: sequences of {t} tokens need {bytes} bytes of shared memory per row, over 48 KiB"
            )));
        }
        let grid = blocks(op, b * nh * t, 1)?;
        Ok(LaunchShape::new(
            (grid, 1, 1),
            ATTENTION_THREADS,
            bytes as u32,
        ))
    }

    /// Version 1's attention_backward_key: one block per (sequence, head, key row), one
    /// thread per head dim (a whole number of warps, at most 256).
    pub fn attention_key_rows(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let grid = blocks(op, b * nh * t, 1)?;
        Ok(LaunchShape::new(
            (grid, 1, 1),
            hs.div_ceil(32).clamp(1, 8) * 32,
            0,
        ))
    }

    /// flash_attention_forward: grid (query tiles of FLASH_ROWS, b*nh); shared: own queries
    /// [FLASH_ROWS, hs], keys [FLASH_TILE, hs|1], values [FLASH_TILE, hs], fp32.
    pub fn flash_forward(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let floats = FLASH_ROWS * hs + FLASH_TILE * (hs | 1) + FLASH_TILE * hs;
        flash_shape(op, b, t, nh, hs, floats)
    }

    /// flash_attention_backward_key (grid over key tiles) and flash_attention_backward_query
    /// (grid over query tiles): (tiles of FLASH_ROWS, b*nh); shared: two own tiles
    /// [FLASH_ROWS, hs] and two streamed tiles [FLASH_TILE, hs|1], fp32.
    pub fn flash_backward(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let floats = 2 * FLASH_ROWS * hs + 2 * FLASH_TILE * (hs | 1);
        flash_shape(op, b, t, nh, hs, floats)
    }

    /// Version 3 of flash attention (tensor cores, bf16; kernels/attention.cu `tc_*`): own
    /// rows per block (TC_THREADS / 32 warps of 16) and the rows of a streamed tile: always
    /// TC_FORWARD_TILE in the forward, in the backward 64 for head sizes up to 64, else 32
    /// (so that the backward's shared memory stays within MAX_SHARED_BYTES).
    pub const TC_ROWS: usize = 64;
    pub const TC_THREADS: usize = 128;
    pub const TC_FORWARD_TILE: usize = 64;

    /// The rows of the backward's streamed tiles at head size hs (`tc_backward_tile`).
    pub fn tc_backward_tile(hs: usize) -> usize {
        if hs.div_ceil(16) * 16 <= 64 { 64 } else { 32 }
    }

    /// flash_attention_tc_forward: grid (query tiles of TC_ROWS, b*nh); shared: own queries
    /// and a key and a value tile of TC_FORWARD_TILE rows (bf16), per warp a scratch
    /// [16, tile + 4] (fp32) and weights [16, tile + 8] (bf16).
    pub fn flash_tc_forward(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let tile = TC_FORWARD_TILE;
        tc_shape(op, (b, t, nh, hs), TC_ROWS + 2 * tile, tile, 1, 1, 0)
    }

    /// flash_attention_tc_backward_key (grid over key tiles): own keys and values, a query
    /// and a dout tile; per warp two scratches and two weight tiles; lse and dot of a tile.
    pub fn flash_tc_backward_key(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let tile = tc_backward_tile(hs);
        tc_shape(
            op,
            (b, t, nh, hs),
            2 * TC_ROWS + 2 * tile,
            tile,
            2,
            2,
            2 * tile,
        )
    }

    /// flash_attention_tc_backward_query (grid over query tiles): own queries and douts, a
    /// key and a value tile; per warp two scratches and one weight tile.
    pub fn flash_tc_backward_query(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let tile = tc_backward_tile(hs);
        tc_shape(op, (b, t, nh, hs), 2 * TC_ROWS + 2 * tile, tile, 2, 1, 0)
    }

    /// The kernels' layout in bytes: `head_rows` bf16 rows of stride hp + 8 (hp = hs rounded
    /// up to 16), then per warp `scratches` fp32 [16, tile + 4] and `weights` bf16
    /// [16, tile + 8], then `floats` fp32.
    fn tc_shape(
        op: &str,
        (b, t, nh, hs): (usize, usize, usize, usize),
        head_rows: usize,
        tile: usize,
        scratches: usize,
        weights: usize,
        floats: usize,
    ) -> Result<LaunchShape> {
        if hs == 0 || hs > FLASH_MAX_HEAD {
            return Err(Error::internal(format!(
                "{op}: head size {hs} is outside 1..={FLASH_MAX_HEAD}"
            )));
        }
        let warps = TC_THREADS / 32;
        let ld_head = hs.div_ceil(16) * 16 + 8;
        let bytes = head_rows * ld_head * 2
            + warps * scratches * 16 * (tile + 4) * 4
            + warps * weights * 16 * (tile + 8) * 2
            + floats * 4;
        // At most about 88 KiB (the backward key kernel at hs 64).
        debug_assert!(bytes <= MAX_SHARED_BYTES as usize);
        let grid = (blocks(op, t, TC_ROWS)?, y_blocks(op, b * nh)?, 1);
        Ok(LaunchShape::new(grid, TC_THREADS, bytes as u32))
    }

    fn flash_shape(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        floats: usize,
    ) -> Result<LaunchShape> {
        if hs == 0 || hs > FLASH_MAX_HEAD {
            return Err(Error::internal(format!(
                "{op}: head size {hs} is outside 1..={FLASH_MAX_HEAD}"
            )));
        }
        // hs <= 128 keeps this under MAX_SHARED_BYTES (about 49 KiB at most).
        let bytes = (floats * std::mem::size_of::<f32>()) as u32;
        debug_assert!(bytes <= MAX_SHARED_BYTES);
        let grid = (blocks(op, t, FLASH_ROWS)?, y_blocks(op, b * nh)?, 1);
        Ok(LaunchShape::new(grid, FLASH_THREADS, bytes))
    }

    /// A grid's y extent: at most 65535 blocks.
    fn y_blocks(op: &str, count: usize) -> Result<u32> {
        if (1..=65535).contains(&count) {
            Ok(count as u32)
        } else {
            Err(Error::internal(format!(
                "{op}: {count} blocks along the grid's y axis, the limit is 65535"
            )))
        }
    }
}

/// The token ids of one batch on the device, checked against the table sizes once, with
/// the row lists the deterministic embedding backward walks: for every distinct id, the
/// positions that use it, ascending.
pub struct TokenBatch {
    pub b: usize,
    pub t: usize,
    input_ids: CudaSlice<u32>,      // [b*t]
    token_type_ids: CudaSlice<u32>, // [b*t]
    word_rows: RowLists,
    type_rows: RowLists,
}

/// Positions grouped by table row (CSR): block u of the backward adds the positions
/// positions[starts[u]..starts[u+1]] into table row rows[u].
struct RowLists {
    distinct: usize,
    rows: CudaSlice<i32>,      // [distinct]
    starts: CudaSlice<i32>,    // [distinct + 1]
    positions: CudaSlice<i32>, // [b*t]
}

impl RowLists {
    fn new(rt: &CudaRuntime, ids: &[u32]) -> Result<RowLists> {
        let mut order: Vec<i32> = (0..dim("embedding", "b*t", ids.len())?).collect();
        // Stable: equal ids keep their positions ascending, the CPU's summation order.
        order.sort_by_key(|&p| ids[p as usize]);
        let (mut rows, mut starts) = (Vec::new(), Vec::new());
        for (k, &p) in order.iter().enumerate() {
            let id = ids[p as usize] as i32;
            if rows.last() != Some(&id) {
                rows.push(id);
                starts.push(k as i32);
            }
        }
        starts.push(order.len() as i32);
        Ok(RowLists {
            distinct: rows.len(),
            rows: rt.upload(&rows)?,
            starts: rt.upload(&starts)?,
            positions: rt.upload(&order)?,
        })
    }
}

impl TokenBatch {
    /// input_ids, token_type_ids [b*t]; ids must be < vocab, types < ntypes, t <= max_pos.
    pub fn new(
        rt: &CudaRuntime,
        input_ids: &[u32],
        token_type_ids: &[u32],
        b: usize,
        t: usize,
        (vocab, max_pos, ntypes): (usize, usize, usize),
    ) -> Result<TokenBatch> {
        let op = "embedding";
        check_len(op, "input_ids", input_ids.len(), b * t)?;
        check_len(op, "token_type_ids", token_type_ids.len(), b * t)?;
        if t > max_pos {
            return Err(Error::internal(format!(
                "{op}: sequences of {t} tokens but only {max_pos} positions"
            )));
        }
        for (ids, limit, what) in [
            (input_ids, vocab, "token id"),
            (token_type_ids, ntypes, "token type"),
        ] {
            if let Some((at, id)) = ids
                .iter()
                .enumerate()
                .find(|&(_, &id)| id as usize >= limit)
            {
                return Err(Error::internal(format!(
                    "{op}: {what} {id} at position {at} is outside the table of {limit} rows"
                )));
            }
        }
        Ok(TokenBatch {
            b,
            t,
            input_ids: rt.upload(input_ids)?,
            token_type_ids: rt.upload(token_type_ids)?,
            word_rows: RowLists::new(rt, input_ids)?,
            type_rows: RowLists::new(rt, token_type_ids)?,
        })
    }
}

/// A kernel looked up for launches of one shape, its dynamic shared memory limit already
/// raised when the shape needs more than the default. A launch: push the kernel's
/// parameters on `args()`, in order, then `launch` them.
pub(crate) struct Kernel<'a> {
    rt: &'a CudaRuntime,
    op: &'a str,
    function: CudaFunction,
    shape: LaunchShape,
}

impl Kernel<'_> {
    /// An empty argument list of this kernel, on the runtime's stream.
    pub(crate) fn args(&self) -> LaunchArgs<'_> {
        self.rt.stream().launch_builder(&self.function)
    }

    /// Launches `args` (from `args()`) with this kernel's shape; a failure names the op.
    ///
    /// # Safety
    /// `args` must be the kernel's parameters in number, order and type, and every buffer
    /// must hold what the kernel touches at this shape (the wrappers check lengths first).
    pub(crate) unsafe fn launch(&self, mut args: LaunchArgs<'_>) -> Result<()> {
        unsafe { args.launch(self.shape.config()) }.map_err(driver(self.op))?;
        Ok(())
    }
}

/// The name of the `T` instance of a kernel templated on the activation type.
pub(crate) fn typed<T: Activation>(kernel: &str) -> String {
    format!("{kernel}_{}", T::SUFFIX)
}

/// The view of buffer `name` of `op`, checked to hold `expected` elements.
pub(crate) fn checked_view<'a, T>(
    op: &str,
    name: &str,
    buffer: &'a impl DeviceRead<T>,
    expected: usize,
) -> Result<CudaView<'a, T>> {
    let view = buffer.view();
    check_len(op, name, view.len(), expected)?;
    Ok(view)
}

/// The mutable view of buffer `name` of `op`, checked to hold `expected` elements.
pub(crate) fn checked_view_mut<'a, T>(
    op: &str,
    name: &str,
    buffer: &'a mut impl DeviceWrite<T>,
    expected: usize,
) -> Result<CudaViewMut<'a, T>> {
    let view = buffer.view_mut();
    check_len(op, name, view.len(), expected)?;
    Ok(view)
}

impl CudaRuntime {
    /// Kernel `name` of kernels/`module`.cu, ready for launches of `shape` on behalf of `op`.
    pub(crate) fn kernel<'a>(
        &'a self,
        op: &'a str,
        module: &str,
        name: &str,
        shape: LaunchShape,
    ) -> Result<Kernel<'a>> {
        let function = self.function(module, name)?;
        if let Some(limit) = shape.shared_opt_in() {
            // cudarc's set_attribute does not make the context current itself.
            self.context()
                .bind_to_thread()
                .map_err(driver(&format!("{op}: bind the context")))?;
            function
                .set_attribute(
                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    limit as i32,
                )
                .map_err(driver(&format!(
                    "{op}: allow {limit} bytes of shared memory"
                )))?;
        }
        Ok(Kernel {
            rt: self,
            op,
            function,
            shape,
        })
    }

    /// out[b*t, c] = wte[input_ids] + wpe[position] + wtt[token_type_ids].
    /// wte [vocab, c], wpe [max_pos, c], wtt [ntypes, c], all fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        tokens: &TokenBatch,
        wte: &impl DeviceRead<f32>,
        wpe: &impl DeviceRead<f32>,
        wtt: &impl DeviceRead<f32>,
        c: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        let bt = tokens.b * tokens.t;
        let out = &mut checked_view_mut(op, "out", out, bt * c)?;
        let (wte, wpe, wtt) = (&wte.view(), &wpe.view(), &wtt.view());
        check_tables(
            op,
            c,
            [("wte", wte.len()), ("wpe", wpe.len()), ("wtt", wtt.len())],
        )?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::elementwise(op, bt * c)?;
        let kernel = self.kernel(op, "embedding", &typed::<T>("embedding_forward"), shape)?;
        let (bt_i, t_i, c_i) = (
            dim(op, "b*t", bt)?,
            dim(op, "t", tokens.t)?,
            dim(op, "c", c)?,
        );
        let mut args = kernel.args();
        args.arg(out)
            .arg(&tokens.input_ids)
            .arg(&tokens.token_type_ids)
            .arg(wte)
            .arg(wpe)
            .arg(wtt)
            .arg(&bt_i)
            .arg(&t_i)
            .arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// dwte, dwpe, dwtt += the gradients of embedding_forward given dout [b*t, c].
    /// Deterministic: no atomics (see kernels/embedding.cu).
    pub fn embedding_backward<T: Activation>(
        &self,
        dwte: &mut impl DeviceWrite<f32>,
        dwpe: &mut impl DeviceWrite<f32>,
        dwtt: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        tokens: &TokenBatch,
        c: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        let (b, t) = (tokens.b, tokens.t);
        let dout = &checked_view(op, "dout", dout, b * t * c)?;
        let (dwte, dwpe, dwtt) = (
            &mut dwte.view_mut(),
            &mut dwpe.view_mut(),
            &mut dwtt.view_mut(),
        );
        check_tables(
            op,
            c,
            [
                ("dwte", dwte.len()),
                ("dwpe", dwpe.len()),
                ("dwtt", dwtt.len()),
            ],
        )?;
        if dout.is_empty() {
            return Ok(());
        }
        let c_i = dim(op, "c", c)?;
        for (table, lists) in [
            (&mut *dwte, &tokens.word_rows),
            (&mut *dwtt, &tokens.type_rows),
        ] {
            let (name, shape) = launch::embedding_table(op, b * t, c, lists.distinct)?;
            let kernel = self.kernel(op, "embedding", &typed::<T>(name), shape)?;
            let mut args = kernel.args();
            args.arg(table)
                .arg(dout)
                .arg(&lists.rows)
                .arg(&lists.starts)
                .arg(&lists.positions)
                .arg(&c_i);
            unsafe { kernel.launch(args) }?;
        }
        let shape = launch::elementwise(op, t * c)?;
        let positions = self.kernel(
            op,
            "embedding",
            &typed::<T>("embedding_backward_positions"),
            shape,
        )?;
        let (b_i, t_i) = (dim(op, "b", b)?, dim(op, "t", t)?);
        let mut args = positions.args();
        args.arg(dwpe).arg(dout).arg(&b_i).arg(&t_i).arg(&c_i);
        unsafe { positions.launch(args) }
    }

    /// out[n, c] = LayerNorm(inp[n, c]) · weight[c] + bias[c]; saves mean[n], rstd[n].
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        mean: &mut impl DeviceWrite<f32>,
        rstd: &mut impl DeviceWrite<f32>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<f32>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let op = "layernorm_forward";
        let out = &mut checked_view_mut(op, "out", out, n * c)?;
        let mean = &mut checked_view_mut(op, "mean", mean, n)?;
        let rstd = &mut checked_view_mut(op, "rstd", rstd, n)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, c)?;
        let bias = &checked_view(op, "bias", bias, c)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::warp_rows(op, n)?;
        let kernel = self.kernel(op, "layernorm", &typed::<T>("layernorm_forward"), shape)?;
        let (n_i, c_i, eps_f) = (dim(op, "n", n)?, dim(op, "c", c)?, eps as f32);
        let mut args = kernel.args();
        args.arg(out)
            .arg(mean)
            .arg(rstd)
            .arg(inp)
            .arg(weight)
            .arg(bias)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&eps_f);
        unsafe { kernel.launch(args) }
    }

    /// The residual add fused with the LayerNorm after it: sum[n, c] = a + b (saved: it is
    /// the next residual stream and the input the backward needs), out = LayerNorm(sum).
    /// Its backward is layernorm_backward on `sum`; the gradient then goes to both a and b.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        sum: &mut impl DeviceWrite<T>,
        mean: &mut impl DeviceWrite<f32>,
        rstd: &mut impl DeviceWrite<f32>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        weight: &impl DeviceRead<f32>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let op = "residual_layernorm_forward";
        let out = &mut checked_view_mut(op, "out", out, n * c)?;
        let sum = &mut checked_view_mut(op, "sum", sum, n * c)?;
        let mean = &mut checked_view_mut(op, "mean", mean, n)?;
        let rstd = &mut checked_view_mut(op, "rstd", rstd, n)?;
        let a = &checked_view(op, "a", a, n * c)?;
        let b = &checked_view(op, "b", b, n * c)?;
        let weight = &checked_view(op, "weight", weight, c)?;
        let bias = &checked_view(op, "bias", bias, c)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::warp_rows(op, n)?;
        let kernel = self.kernel(
            op,
            "layernorm",
            &typed::<T>("residual_layernorm_forward"),
            shape,
        )?;
        let (n_i, c_i, eps_f) = (dim(op, "n", n)?, dim(op, "c", c)?, eps as f32);
        let mut args = kernel.args();
        args.arg(out)
            .arg(sum)
            .arg(mean)
            .arg(rstd)
            .arg(a)
            .arg(b)
            .arg(weight)
            .arg(bias)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&eps_f);
        unsafe { kernel.launch(args) }
    }

    /// dinp[n, c], dweight[c], dbias[c] += the gradients of layernorm_forward given dout.
    /// Two launches: the input gradient row by row, then the column sums.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dweight: &mut impl DeviceWrite<f32>,
        dbias: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<f32>,
        mean: &impl DeviceRead<f32>,
        rstd: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, n * c)?;
        let dweight = &mut checked_view_mut(op, "dweight", dweight, c)?;
        let dbias = &mut checked_view_mut(op, "dbias", dbias, c)?;
        let dout = &checked_view(op, "dout", dout, n * c)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, c)?;
        let mean = &checked_view(op, "mean", mean, n)?;
        let rstd = &checked_view(op, "rstd", rstd, n)?;
        if dinp.is_empty() {
            return Ok(());
        }
        let (n_i, c_i) = (dim(op, "n", n)?, dim(op, "c", c)?);
        let shape = launch::warp_rows(op, n)?;
        let input = self.kernel(
            op,
            "layernorm",
            &typed::<T>("layernorm_backward_input"),
            shape,
        )?;
        let mut args = input.args();
        args.arg(dinp)
            .arg(dout)
            .arg(inp)
            .arg(weight)
            .arg(mean)
            .arg(rstd)
            .arg(&n_i)
            .arg(&c_i);
        unsafe { input.launch(args) }?;
        let shape = launch::column_tiles(op, c)?;
        let params = self.kernel(
            op,
            "layernorm",
            &typed::<T>("layernorm_backward_params"),
            shape,
        )?;
        let mut args = params.args();
        args.arg(dweight)
            .arg(dbias)
            .arg(dout)
            .arg(inp)
            .arg(mean)
            .arg(rstd)
            .arg(&n_i)
            .arg(&c_i);
        unsafe { params.launch(args) }
    }

    /// out[n, c] = gelu(inp[n, c] + bias[c]), exact erf form.
    pub fn bias_gelu_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "bias_gelu_forward";
        let out = &mut checked_view_mut(op, "out", out, n * c)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let bias = &checked_view(op, "bias", bias, c)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::elementwise(op, n * c)?;
        let kernel = self.kernel(op, "activation", &typed::<T>(op), shape)?;
        let (n_i, c_i) = (dim(op, "n", n)?, dim(op, "c", c)?);
        let mut args = kernel.args();
        args.arg(out).arg(inp).arg(bias).arg(&n_i).arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// With g = dout · gelu'(inp + bias): dinp[n, c] += g, dbias[c] += column sums of g.
    #[allow(clippy::too_many_arguments)]
    pub fn bias_gelu_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dbias: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        inp: &impl DeviceRead<T>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "bias_gelu_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, n * c)?;
        let dbias = &mut checked_view_mut(op, "dbias", dbias, c)?;
        let dout = &checked_view(op, "dout", dout, n * c)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let bias = &checked_view(op, "bias", bias, c)?;
        if dinp.is_empty() {
            return Ok(());
        }
        let shape = launch::column_tiles(op, c)?;
        let kernel = self.kernel(op, "activation", &typed::<T>(op), shape)?;
        let (n_i, c_i) = (dim(op, "n", n)?, dim(op, "c", c)?);
        let mut args = kernel.args();
        args.arg(dinp)
            .arg(dbias)
            .arg(dout)
            .arg(inp)
            .arg(bias)
            .arg(&n_i)
            .arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// out = tanh(inp), elementwise.
    pub fn tanh_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
    ) -> Result<()> {
        let op = "tanh_forward";
        let inp = &inp.view();
        let len = inp.len();
        let out = &mut checked_view_mut(op, "out", out, len)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(
            op,
            "activation",
            &typed::<T>(op),
            launch::elementwise(op, len)?,
        )?;
        let mut args = kernel.args();
        args.arg(out).arg(inp).arg(&len);
        unsafe { kernel.launch(args) }
    }

    /// dinp += dout · (1 - out²), from the saved output.
    pub fn tanh_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        out: &impl DeviceRead<T>,
        dout: &impl DeviceRead<T>,
    ) -> Result<()> {
        let op = "tanh_backward";
        let dinp = &mut dinp.view_mut();
        let len = dinp.len();
        let out = &checked_view(op, "out", out, len)?;
        let dout = &checked_view(op, "dout", dout, len)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(
            op,
            "activation",
            &typed::<T>(op),
            launch::elementwise(op, len)?,
        )?;
        let mut args = kernel.args();
        args.arg(dinp).arg(out).arg(dout).arg(&len);
        unsafe { kernel.launch(args) }
    }

    /// out = a + b, elementwise. (Its backward is a plain copy of dout into both inputs'
    /// gradients, which the caller does by accumulating dout where it is needed.)
    pub fn residual_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
    ) -> Result<()> {
        let op = "residual_forward";
        let out = &mut out.view_mut();
        let len = out.len();
        let a = &checked_view(op, "a", a, len)?;
        let b = &checked_view(op, "b", b, len)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(
            op,
            "activation",
            &typed::<T>(op),
            launch::elementwise(op, len)?,
        )?;
        let mut args = kernel.args();
        args.arg(out).arg(a).arg(b).arg(&len);
        unsafe { kernel.launch(args) }
    }

    /// Inverted dropout: out = inp / (1 - p) where element i is kept, else 0; the mask is
    /// the CPU's `dropout_keep(seed, i, p)` bit for bit. p in [0, 1].
    pub fn dropout_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        p: f64,
        seed: u64,
    ) -> Result<()> {
        self.dropout_launch("dropout_forward", out, inp, p, seed)
    }

    /// dinp += dout / (1 - p) where element i was kept (same p and seed as the forward).
    pub fn dropout_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        p: f64,
        seed: u64,
    ) -> Result<()> {
        self.dropout_launch("dropout_backward", dinp, dout, p, seed)
    }

    /// The two dropout kernels take the same arguments: (written, read, len, p, scale, seed).
    fn dropout_launch<T: Activation>(
        &self,
        op: &str,
        written: &mut impl DeviceWrite<T>,
        read: &impl DeviceRead<T>,
        p: f64,
        seed: u64,
    ) -> Result<()> {
        let written = &mut written.view_mut();
        let len = written.len();
        let read = &checked_view(op, "input", read, len)?;
        let scale = dropout_scale(op, p)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(
            op,
            "dropout",
            &typed::<T>(op),
            launch::elementwise(op, len)?,
        )?;
        let mut args = kernel.args();
        args.arg(written)
            .arg(read)
            .arg(&len)
            .arg(&p)
            .arg(&scale)
            .arg(&seed);
        unsafe { kernel.launch(args) }
    }

    /// keep[i] = 1 if element i survives dropout (p, seed), else 0: the mask alone.
    pub fn dropout_mask(&self, keep: &mut impl DeviceWrite<u8>, p: f64, seed: u64) -> Result<()> {
        let op = "dropout_mask";
        let keep = &mut keep.view_mut();
        let len = keep.len();
        dropout_scale(op, p)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(op, "dropout", op, launch::elementwise(op, len)?)?;
        let mut args = kernel.args();
        args.arg(keep).arg(&len).arg(&p).arg(&seed);
        unsafe { kernel.launch(args) }
    }

    /// Version 1 ("stored probabilities"; the model uses flash_attention_forward):
    /// out[b, t, nh*hs] = dropout(softmax(q kᵀ / √hs over the real keys)) · v; probs
    /// [b, nh, t, t] saved, before dropout. mask [b, t]: 1 real token, 0 padding. As the
    /// CPU: padded keys get weight 0, a sequence with no real token attends uniformly, and
    /// the dropout mask is the CPU's (`AttentionDropout`) bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        probs: &mut impl DeviceWrite<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        mask: &impl DeviceRead<u8>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let op = "attention_forward";
        let act = b * t * nh * hs;
        let out = &mut checked_view_mut(op, "out", out, act)?;
        let probs = &mut checked_view_mut(op, "probs", probs, b * nh * t * t)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        if probs.is_empty() || hs == 0 {
            return Ok(());
        }
        let shape = launch::attention_rows(op, b, t, nh)?;
        let kernel = self.kernel(op, "attention", &typed::<T>(op), shape)?;
        let scalars = AttentionArgs::new(op, (b, t, nh, hs), dropout)?;
        let mut args = kernel.args();
        args.arg(out).arg(probs).arg(q).arg(k).arg(v).arg(mask);
        scalars.push(&mut args);
        unsafe { kernel.launch(args) }
    }

    /// Version 1 ("stored probabilities"): dq, dk, dv [b, t, nh*hs] += the gradients of
    /// attention_forward given dout, the saved probs and the forward's dropout. dscores [b, nh, t, t] is scratch
    /// (overwritten). The mask is not needed: it is encoded in probs (0 at padded keys).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: Activation>(
        &self,
        dq: &mut impl DeviceWrite<T>,
        dk: &mut impl DeviceWrite<T>,
        dv: &mut impl DeviceWrite<T>,
        dscores: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        probs: &impl DeviceRead<f32>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let op = "attention_backward";
        let act = b * t * nh * hs;
        let dq = &mut checked_view_mut(op, "dq", dq, act)?;
        let dk = &mut checked_view_mut(op, "dk", dk, act)?;
        let dv = &mut checked_view_mut(op, "dv", dv, act)?;
        let dout = &checked_view(op, "dout", dout, act)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let probs = &checked_view(op, "probs", probs, b * nh * t * t)?;
        let dscores = &mut checked_view_mut(op, "dscores", dscores, b * nh * t * t)?;
        if probs.is_empty() || hs == 0 {
            return Ok(());
        }
        let query_shape = launch::attention_rows(op, b, t, nh)?;
        let key_shape = launch::attention_key_rows(op, b, t, nh, hs)?;
        let scalars = AttentionArgs::new(op, (b, t, nh, hs), dropout)?;

        let query = self.kernel(
            op,
            "attention",
            &typed::<T>("attention_backward_query"),
            query_shape,
        )?;
        let mut args = query.args();
        args.arg(dq)
            .arg(&mut *dscores)
            .arg(dout)
            .arg(k)
            .arg(v)
            .arg(probs);
        scalars.push(&mut args);
        unsafe { query.launch(args) }?;

        let key = self.kernel(
            op,
            "attention",
            &typed::<T>("attention_backward_key"),
            key_shape,
        )?;
        let dscores = dscores.as_view();
        let mut args = key.args();
        args.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(q)
            .arg(probs)
            .arg(&dscores);
        scalars.push(&mut args);
        unsafe { key.launch(args) }
    }

    /// Versions 2 and 3 of attention_forward (`kernels`), flash-style: the same out
    /// [b, t, nh*hs] without the [b, nh, t, t] probabilities; lse [b, nh, t] (fp32) saves
    /// log Σ_j exp(s_ij) over the allowed keys of each query row, from which the backward
    /// recomputes them. Same mask, uniform case and dropout mask as version 1 and the CPU.
    /// hs <= 128.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        lse: &mut impl DeviceWrite<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        mask: &impl DeviceRead<u8>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
        kernels: FlashKernels,
    ) -> Result<()> {
        let op = "flash_attention_forward";
        kernels.check::<T>(op)?;
        let act = b * t * nh * hs;
        let out = &mut checked_view_mut(op, "out", out, act)?;
        let lse = &mut checked_view_mut(op, "lse", lse, b * nh * t)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let (name, shape) = match kernels {
            FlashKernels::CudaCores => (op, launch::flash_forward(op, b, t, nh, hs)?),
            FlashKernels::TensorCores => (
                "flash_attention_tc_forward",
                launch::flash_tc_forward(op, b, t, nh, hs)?,
            ),
        };
        let kernel = self.kernel(op, "attention", &typed::<T>(name), shape)?;
        let scalars = AttentionArgs::new(op, (b, t, nh, hs), dropout)?;
        let mut args = kernel.args();
        args.arg(out).arg(lse).arg(q).arg(k).arg(v).arg(mask);
        scalars.push(&mut args);
        unsafe { kernel.launch(args) }
    }

    /// Versions 2 and 3 of attention_backward (`kernels`, as the forward's): dq, dk, dv
    /// [b, t, nh*hs] += the gradients of flash_attention_forward given dout, its output
    /// `out` (unchanged since), its lse and the same mask and dropout. row_dot [b, nh, t] is
    /// scratch (overwritten). Three launches, no atomics (deterministic): row_dot = dout ·
    /// out per query row, then dk and dv per key tile, then dq per query tile, each
    /// recomputing the probabilities.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward<T: Activation>(
        &self,
        dq: &mut impl DeviceWrite<T>,
        dk: &mut impl DeviceWrite<T>,
        dv: &mut impl DeviceWrite<T>,
        row_dot: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        out: &impl DeviceRead<T>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        lse: &impl DeviceRead<f32>,
        mask: &impl DeviceRead<u8>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
        kernels: FlashKernels,
    ) -> Result<()> {
        let op = "flash_attention_backward";
        kernels.check::<T>(op)?;
        let act = b * t * nh * hs;
        let dq = &mut checked_view_mut(op, "dq", dq, act)?;
        let dk = &mut checked_view_mut(op, "dk", dk, act)?;
        let dv = &mut checked_view_mut(op, "dv", dv, act)?;
        let dout = &checked_view(op, "dout", dout, act)?;
        let out = &checked_view(op, "out", out, act)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let lse = &checked_view(op, "lse", lse, b * nh * t)?;
        let row_dot = &mut checked_view_mut(op, "row_dot", row_dot, b * nh * t)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let dot_shape = launch::warp_rows(op, b * nh * t)?;
        let [(key_name, key_shape), (query_name, query_shape)] = match kernels {
            FlashKernels::CudaCores => {
                let tiles = launch::flash_backward(op, b, t, nh, hs)?;
                [
                    ("flash_attention_backward_key", tiles),
                    ("flash_attention_backward_query", tiles),
                ]
            }
            FlashKernels::TensorCores => [
                (
                    "flash_attention_tc_backward_key",
                    launch::flash_tc_backward_key(op, b, t, nh, hs)?,
                ),
                (
                    "flash_attention_tc_backward_query",
                    launch::flash_tc_backward_query(op, b, t, nh, hs)?,
                ),
            ],
        };
        let scalars = AttentionArgs::new(op, (b, t, nh, hs), dropout)?;

        let dot = self.kernel(
            op,
            "attention",
            &typed::<T>("flash_attention_backward_dot"),
            dot_shape,
        )?;
        let mut args = dot.args();
        args.arg(&mut *row_dot).arg(dout).arg(out);
        scalars.push_dims(&mut args);
        unsafe { dot.launch(args) }?;
        let row_dot = row_dot.as_view();

        let key = self.kernel(op, "attention", &typed::<T>(key_name), key_shape)?;
        let mut args = key.args();
        args.arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v);
        args.arg(lse).arg(&row_dot).arg(mask);
        scalars.push(&mut args);
        unsafe { key.launch(args) }?;

        let query = self.kernel(op, "attention", &typed::<T>(query_name), query_shape)?;
        let mut args = query.args();
        args.arg(dq).arg(dout).arg(q).arg(k).arg(v);
        args.arg(lse).arg(&row_dot).arg(mask);
        scalars.push(&mut args);
        unsafe { query.launch(args) }
    }

    /// out[b, c] = inp[b, 0, c] with inp [b, t, c]: the [CLS] position.
    pub fn cls_pool_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "cls_pool_forward";
        let out = &mut checked_view_mut(op, "out", out, b * c)?;
        let inp = &checked_view(op, "inp", inp, b * t * c)?;
        self.pool_launch::<T>(op, out, inp, b, t, c)
    }

    /// dinp[b, 0, c] += dout[b, c]; the other positions get nothing.
    pub fn cls_pool_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "cls_pool_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, b * t * c)?;
        let dout = &checked_view(op, "dout", dout, b * c)?;
        self.pool_launch::<T>(op, dinp, dout, b, t, c)
    }

    /// out[b*t, c] = wte[input_ids], wte [vocab, c] fp32: a decoder's embedding (the token
    /// table alone; positions enter through RoPE).
    pub fn token_embedding_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        tokens: &TokenBatch,
        wte: &impl DeviceRead<f32>,
        c: usize,
    ) -> Result<()> {
        let op = "token_embedding_forward";
        let bt = tokens.b * tokens.t;
        let out = &mut checked_view_mut(op, "out", out, bt * c)?;
        let wte = &wte.view();
        check_tables(op, c, [("wte", wte.len())])?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::elementwise(op, bt * c)?;
        let kernel = self.kernel(op, "embedding", &typed::<T>(op), shape)?;
        let (bt_i, c_i) = (dim(op, "b*t", bt)?, dim(op, "c", c)?);
        let mut args = kernel.args();
        args.arg(out)
            .arg(&tokens.input_ids)
            .arg(wte)
            .arg(&bt_i)
            .arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// dwte [vocab, c] += the scatter of dout [b*t, c] to the tokens' rows: the word-table
    /// launch of embedding_backward (deterministic, no atomics).
    pub fn token_embedding_backward<T: Activation>(
        &self,
        dwte: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        tokens: &TokenBatch,
        c: usize,
    ) -> Result<()> {
        let op = "token_embedding_backward";
        let bt = tokens.b * tokens.t;
        let dout = &checked_view(op, "dout", dout, bt * c)?;
        let dwte = &mut dwte.view_mut();
        check_tables(op, c, [("dwte", dwte.len())])?;
        if dout.is_empty() {
            return Ok(());
        }
        let lists = &tokens.word_rows;
        let (name, shape) = launch::embedding_table(op, bt, c, lists.distinct)?;
        let kernel = self.kernel(op, "embedding", &typed::<T>(name), shape)?;
        let c_i = dim(op, "c", c)?;
        let mut args = kernel.args();
        args.arg(dwte)
            .arg(dout)
            .arg(&lists.rows)
            .arg(&lists.starts)
            .arg(&lists.positions)
            .arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// da += dout, db += dout (the residual add's backward): dropout_backward's kernel at
    /// p = 0, which keeps every element with scale 1.
    pub fn residual_backward<T: Activation>(
        &self,
        da: &mut impl DeviceWrite<T>,
        db: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
    ) -> Result<()> {
        // dropout_launch checks dout's length against each gradient's.
        self.dropout_launch("dropout_backward", da, dout, 0.0, 0)?;
        self.dropout_launch("dropout_backward", db, dout, 0.0, 0)
    }

    /// out[b, c] = inp[b, rows[b], c] with inp [b, t, c]; rows [b] on the host, each < t.
    pub fn last_token_pool_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "last_token_pool_forward";
        let b = rows.len();
        let out = &mut checked_view_mut(op, "out", out, b * c)?;
        let inp = &checked_view(op, "inp", inp, b * t * c)?;
        self.last_token_pool_launch(op, out, inp, rows, t, c)
    }

    /// dinp[b, rows[b], c] += dout[b, c]; the other positions get nothing.
    pub fn last_token_pool_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "last_token_pool_backward";
        let b = rows.len();
        let dinp = &mut checked_view_mut(op, "dinp", dinp, b * t * c)?;
        let dout = &checked_view(op, "dout", dout, b * c)?;
        self.last_token_pool_launch(op, dinp, dout, rows, t, c)
    }

    /// The two last-token kernels, named as their op, take (written, read, rows, b, t, c);
    /// the rows are checked below t and uploaded.
    fn last_token_pool_launch<T: Activation>(
        &self,
        op: &str,
        written: &mut CudaViewMut<'_, T>,
        read: &CudaView<'_, T>,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        if let Some((seq, row)) = rows.iter().enumerate().find(|&(_, &r)| r as usize >= t) {
            return Err(Error::internal(format!(
                "{op}: row {row} of sequence {seq} is outside its {t} tokens"
            )));
        }
        let b = rows.len();
        if b * t * c == 0 {
            return Ok(());
        }
        let rows = self.upload(rows)?;
        let kernel = self.kernel(op, "pool", &typed::<T>(op), launch::elementwise(op, b * c)?)?;
        let (b_i, t_i, c_i) = (dim(op, "b", b)?, dim(op, "t", t)?, dim(op, "c", c)?);
        let mut args = kernel.args();
        args.arg(written)
            .arg(read)
            .arg(&rows)
            .arg(&b_i)
            .arg(&t_i)
            .arg(&c_i);
        unsafe { kernel.launch(args) }
    }

    /// The two pool kernels, named as their op, take (written, read, b, t, c).
    fn pool_launch<T: Activation>(
        &self,
        op: &str,
        written: &mut CudaViewMut<'_, T>,
        read: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        if b * t * c == 0 {
            return Ok(());
        }
        let kernel = self.kernel(op, "pool", &typed::<T>(op), launch::elementwise(op, b * c)?)?;
        let (b_i, t_i, c_i) = (dim(op, "b", b)?, dim(op, "t", t)?, dim(op, "c", c)?);
        let mut args = kernel.args();
        args.arg(written).arg(read).arg(&b_i).arg(&t_i).arg(&c_i);
        unsafe { kernel.launch(args) }
    }
}

/// Tables [rows, c], each (name, len), must be whole numbers of rows.
fn check_tables<const N: usize>(op: &str, c: usize, tables: [(&str, usize); N]) -> Result<()> {
    for (name, len) in tables {
        if c == 0 || !len.is_multiple_of(c) {
            return Err(Error::internal(format!(
                "{op}: {name} has {len} elements, not a whole number of rows of {c}"
            )));
        }
    }
    Ok(())
}

/// 1 / (1 - p) rounded to fp32, as the CPU's f32 ops do; p must be in [0, 1].
fn dropout_scale(op: &str, p: f64) -> Result<f32> {
    if (0.0..=1.0).contains(&p) {
        Ok((1.0 / (1.0 - p)) as f32)
    } else {
        Err(Error::internal(format!("{op}: p = {p} is not in [0, 1]")))
    }
}

/// Which kernels compute flash attention: version 2 on CUDA cores (f32 and bf16, fp32
/// arithmetic throughout) or version 3 on tensor cores (bf16 only; the probabilities and
/// their gradients are rounded to bf16 before they multiply, as FlashAttention-2 does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernels {
    CudaCores,
    TensorCores,
}

impl FlashKernels {
    /// What the device model runs for activations of type T: tensor cores where the type
    /// has them (bf16).
    pub fn for_activation<T: Activation>() -> FlashKernels {
        if T::TENSOR_CORE_ATTENTION {
            FlashKernels::TensorCores
        } else {
            FlashKernels::CudaCores
        }
    }

    fn check<T: Activation>(self, op: &str) -> Result<()> {
        if self == FlashKernels::TensorCores && !T::TENSOR_CORE_ATTENTION {
            return Err(Error::internal(format!(
                "{op}: the tensor-core kernels take bf16 activations, not {}",
                T::SUFFIX
            )));
        }
        Ok(())
    }
}

/// The scalar arguments every attention kernel ends with: b, t, nh, hs as the kernels'
/// ints, then (all but the row-dot pre-pass) scale = 1/sqrt(hs) and the dropout's
/// (drop_p, drop_scale, seed), with p = 0 (no hashing) when there is no dropout.
struct AttentionArgs {
    dims: [i32; 4],
    scale: f32,
    drop_p: f64,
    drop_scale: f32,
    seed: u64,
}

impl AttentionArgs {
    fn new(
        op: &str,
        (b, t, nh, hs): (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> Result<AttentionArgs> {
        let (drop_p, drop_scale, seed) = match dropout {
            None => (0.0, 1.0, 0),
            Some(d) if (0.0..1.0).contains(&d.p) => (d.p, dropout_scale(op, d.p)?, d.seed),
            Some(d) => {
                return Err(Error::internal(format!(
                    "{op}: dropout p = {} is not in [0, 1)",
                    d.p
                )));
            }
        };
        Ok(AttentionArgs {
            dims: [
                dim(op, "b", b)?,
                dim(op, "t", t)?,
                dim(op, "nh", nh)?,
                dim(op, "hs", hs)?,
            ],
            scale: (1.0 / (hs as f64).sqrt()) as f32,
            drop_p,
            drop_scale,
            seed,
        })
    }

    /// Pushes b, t, nh, hs.
    fn push_dims<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        for d in &self.dims {
            launch.arg(d);
        }
    }

    /// Pushes b, t, nh, hs, scale, drop_p, drop_scale, seed.
    fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        self.push_dims(launch);
        launch
            .arg(&self.scale)
            .arg(&self.drop_p)
            .arg(&self.drop_scale)
            .arg(&self.seed);
    }
}
