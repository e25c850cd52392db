//! The chat model's output layer, computed here rather than by llama.cpp.
//!
//! Why: for Gemma 3 270M the output layer (262,144 × 640, Q8_0, tied to the
//! token embeddings) is most of a decoding step, and llama.cpp's CPU kernels
//! for it cost nearly as much per extra sequence as for the first: its
//! blocked kernel re-does the byte multiplies and scale work for every
//! (row, sequence) pair and reads each weight block more than once. Here each
//! weight block is read once per step and its bytes, absolute values and signs
//! serve every sequence of the step, so four sequences cost little more than
//! one (decision 70, `docs/benchmarks.md`, "The output layer, computed by the
//! node").
//!
//! How: llama.cpp computes the model up to its final norm (`result_norm`); an
//! evaluation callback stops the graph there on steps where every token of
//! the batch wants logits (a generation step), copies the normed hidden
//! states, and [`Head::logits`] turns them into logits with the weights read
//! straight from the GGUF file. On other steps (prompts) llama.cpp runs its
//! whole graph as before.
//!
//! The arithmetic is llama.cpp's: the hidden state is quantized to Q8_0 (a
//! scale per 32 values, rounded to half precision) and dotted with the Q8_0
//! weights block by block, so logits agree with llama.cpp's to float rounding.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use memmap2::Mmap;

/// Values per Q8_0 block.
const BLOCK: usize = 32;
/// Bytes per Q8_0 block: a half-precision scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// ggml's type id for Q8_0.
const GGML_TYPE_Q8_0: u32 = 8;
/// Architectures whose logits are exactly `output · result_norm`, with no
/// bias, scale or soft-capping after it, as llama.cpp builds their graphs.
const PLAIN_OUTPUT: &[&str] = &["gemma3"];

/// The output layer's weights, mapped from the model file.
pub struct Head {
    map: Mmap,
    /// Where the weights start in `map`.
    start: usize,
    n_embd: usize,
    n_vocab: usize,
    threads: usize,
    kernel: Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AVX2 with AVX-512 VNNI's byte dot products on 256-bit registers.
    Vnni,
    /// AVX2's `maddubs`/`madd` pair.
    Avx2,
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Head")
            .field("n_embd", &self.n_embd)
            .field("n_vocab", &self.n_vocab)
            .field("threads", &self.threads)
            .field("kernel", &self.kernel)
            .finish()
    }
}

impl Head {
    /// The output layer of the GGUF model at `path`, or why this node leaves it
    /// to llama.cpp (another architecture, another weight type, a CPU without
    /// AVX2, or `CXMPUTE_CHAT_OUTPUT=llama`).
    pub fn open(path: &Path, threads: usize) -> Result<Head> {
        if std::env::var("CXMPUTE_CHAT_OUTPUT").is_ok_and(|v| v == "llama") {
            bail!("CXMPUTE_CHAT_OUTPUT=llama");
        }
        let kernel = Kernel::detect().context("this CPU lacks AVX2, FMA or F16C")?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the model file is not written while the node runs; llama.cpp
        // maps the same file the same way.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let gguf = gguf::read(&map)?;
        if !PLAIN_OUTPUT.contains(&gguf.architecture.as_str()) {
            bail!(
                "architecture {} is not one whose output layer the node computes",
                gguf.architecture
            );
        }
        if gguf.softcapping {
            bail!("the model soft-caps its logits");
        }
        let tensor = gguf
            .tensors
            .iter()
            .find(|t| t.name == "output.weight")
            .or_else(|| gguf.tensors.iter().find(|t| t.name == "token_embd.weight"))
            .context("the model has no output or token embedding weights")?;
        if tensor.kind != GGML_TYPE_Q8_0 {
            bail!("{} is ggml type {}, not Q8_0", tensor.name, tensor.kind);
        }
        let [n_embd, n_vocab] = match tensor.dims[..] {
            [e, v] => [e, v].map(|d| usize::try_from(d).unwrap_or(usize::MAX)),
            _ => bail!("{} has {} dimensions", tensor.name, tensor.dims.len()),
        };
        if n_embd == 0 || n_embd % BLOCK != 0 {
            bail!("{} rows of {n_embd} values are not whole Q8_0 blocks", tensor.name);
        }
        let start = gguf
            .data_start
            .checked_add(usize::try_from(tensor.offset).unwrap_or(usize::MAX))
            .context("tensor offset out of range")?;
        let len = n_vocab
            .checked_mul(n_embd / BLOCK * BLOCK_BYTES)
            .context("tensor size out of range")?;
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            bail!("{} runs past the end of the file", tensor.name);
        }
        Ok(Head {
            map,
            start,
            n_embd,
            n_vocab,
            threads: threads.max(1),
            kernel,
        })
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn describe(&self) -> &'static str {
        match self.kernel {
            Kernel::Vnni => "node (AVX-512 VNNI)",
            Kernel::Avx2 => "node (AVX2)",
        }
    }

    fn weights(&self) -> &[u8] {
        &self.map[self.start..self.start + self.n_vocab * self.row_bytes()]
    }

    fn row_bytes(&self) -> usize {
        self.n_embd / BLOCK * BLOCK_BYTES
    }

    /// Logits for each row of `hidden` (rows of `n_embd` values), one row of
    /// `n_vocab` after another in `out`.
    pub fn logits(&self, hidden: &[f32], out: &mut Vec<f32>) {
        let acts: Vec<Quantized> = hidden.chunks_exact(self.n_embd).map(Quantized::new).collect();
        out.clear();
        out.resize(acts.len() * self.n_vocab, 0.0);
        if acts.is_empty() {
            return;
        }
        // The vocabulary is split between the threads; each gets its stretch
        // of every row of `out`.
        let threads = self.threads.min(self.n_vocab.div_ceil(1024)).max(1);
        let per = self.n_vocab.div_ceil(threads);
        let mut shares: Vec<Vec<&mut [f32]>> = (0..threads).map(|_| Vec::with_capacity(acts.len())).collect();
        for row in out.chunks_mut(self.n_vocab) {
            let mut rest = row;
            for share in &mut shares {
                let n = per.min(rest.len());
                let (mine, after) = std::mem::take(&mut rest).split_at_mut(n);
                share.push(mine);
                rest = after;
            }
        }
        let acts = &acts;
        on_team(shares.into_iter().enumerate().collect(), |(t, share)| {
            self.columns(t * per, acts, share)
        });
    }

    /// Vocabulary entries from `from` on, as many as each of `outs` holds, for
    /// every activation row (`outs[k]` for `acts[k]`).
    fn columns(&self, from: usize, acts: &[Quantized], mut outs: Vec<&mut [f32]>) {
        let n = outs.first().map_or(0, |o| o.len());
        let rb = self.row_bytes();
        let w = &self.weights()[from * rb..(from + n) * rb];
        // Up to four activation rows share each pass over the weights.
        for (acts, outs) in acts.chunks(4).zip(outs.chunks_mut(4)) {
            match acts.len() {
                1 => self.pass::<1>(w, acts, outs),
                2 => self.pass::<2>(w, acts, outs),
                3 => self.pass::<3>(w, acts, outs),
                _ => self.pass::<4>(w, acts, outs),
            }
        }
    }

    fn pass<const N: usize>(&self, w: &[u8], acts: &[Quantized], outs: &mut [&mut [f32]]) {
        let Ok(acts): Result<&[Quantized; N], _> = acts.try_into() else {
            return;
        };
        // SAFETY: `kernel` was chosen by `Kernel::detect`, which checked that
        // this CPU has the instructions the function is compiled for.
        unsafe {
            match self.kernel {
                Kernel::Vnni => x86::rows_vnni::<N>(w, self.n_embd, acts, outs),
                Kernel::Avx2 => x86::rows_avx2::<N>(w, self.n_embd, acts, outs),
            }
        }
    }
}

impl Kernel {
    fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            if !(is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            {
                return None;
            }
            if std::env::var("CXMPUTE_CHAT_OUTPUT").is_ok_and(|v| v == "avx2") {
                return Some(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                return Some(Kernel::Vnni);
            }
            Some(Kernel::Avx2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// One hidden-state row quantized as llama.cpp quantizes a matrix
/// multiplication's activations for Q8_0 weights.
pub struct Quantized {
    /// `n_embd` signed bytes.
    q: Vec<i8>,
    /// One scale per block, already rounded through half precision.
    d: Vec<f32>,
}

impl Quantized {
    pub fn new(x: &[f32]) -> Quantized {
        let mut q = Vec::with_capacity(x.len());
        let mut d = Vec::with_capacity(x.len() / BLOCK);
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            q.extend(block.iter().map(|v| (v * inv).round() as i8));
            d.push(half::f16::from_f32(scale).to_f32());
        }
        Quantized { q, d }
    }
}

/// The plain-Rust dot product of one weight row with `a`: the reference the
/// vector kernels are tested against.
#[cfg(test)]
fn dot_reference(row: &[u8], a: &Quantized) -> f32 {
    let mut sum = 0f32;
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let dw = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut dot = 0i32;
        for i in 0..BLOCK {
            dot += i32::from(block[2 + i] as i8) * i32::from(a.q[b * BLOCK + i]);
        }
        sum += dot as f32 * dw * a.d[b];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Quantized, BLOCK, BLOCK_BYTES};

    /// A kernel is a way to take the 32 bytes of a weight block apart once
    /// (`$weight`) and to dot them with each activation block (`$dot`), the
    /// activation bytes prepared once per call (`$act`).
    macro_rules! rows_kernel {
        ($name:ident, $features:literal, $act:ident, $weight:ident, $dot:ident) => {
            /// Dot products of the weight rows in `w` with the `N` rows of `acts`:
            /// `outs[k][r]` for row `r` and `acts[k]`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const N: usize>(
                w: &[u8],
                n_embd: usize,
                acts: &[Quantized; N],
                outs: &mut [&mut [f32]],
            ) {
                let blocks = n_embd / BLOCK;
                let row_bytes = blocks * BLOCK_BYTES;
                // Block-major: the `N` activation blocks of weight block `b`
                // at `b * N ..`.
                let mut prepared = Vec::with_capacity(blocks * N);
                for b in 0..blocks {
                    for a in acts {
                        // SAFETY: each activation row holds `blocks` × 32 bytes.
                        prepared.push($act(unsafe {
                            _mm256_loadu_si256(a.q.as_ptr().add(b * BLOCK).cast())
                        }));
                    }
                }
                let rows = outs.first().map_or(0, |o| o.len());
                for r in 0..rows {
                    let row = &w[r * row_bytes..(r + 1) * row_bytes];
                    let mut acc = [_mm256_setzero_ps(); N];
                    for ((b, block), prepared) in row
                        .chunks_exact(BLOCK_BYTES)
                        .enumerate()
                        .zip(prepared.chunks_exact(N))
                    {
                        let dw = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([block[0], block[1]])));
                        // SAFETY: `block` is 34 bytes: a 2-byte scale, then the 32 loaded.
                        let wv = $weight(unsafe { _mm256_loadu_si256(block.as_ptr().add(2).cast()) });
                        for s in 0..N {
                            let dot = $dot(wv, prepared[s]);
                            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(acts[s].d[b]));
                            acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[s]);
                        }
                    }
                    for (s, out) in outs.iter_mut().enumerate().take(N) {
                        out[r] = hsum(acc[s]);
                    }
                }
            }
        };
    }

    // VNNI multiplies unsigned by signed bytes. The activations are made
    // unsigned by adding 128 (flipping their top bit), and the weights'
    // sums times 128 start each dot product below zero to take it back off:
    // the same integer sums, without a sign fix-up per activation block.
    rows_kernel!(
        rows_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        act_vnni,
        weight_vnni,
        dot_vnni
    );
    // AVX2's byte multiply saturates in 16 bits, so it takes the weights'
    // magnitudes and moves their signs onto the activations, as llama.cpp does.
    rows_kernel!(rows_avx2, "avx2,fma,f16c", act_avx2, weight_avx2, dot_avx2);

    #[inline]
    #[target_feature(enable = "avx2")]
    fn act_vnni(a: __m256i) -> __m256i {
        _mm256_xor_si256(a, _mm256_set1_epi8(i8::MIN))
    }

    /// The weights, and minus 128 times their sums in each 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn weight_vnni(w: __m256i) -> (__m256i, __m256i) {
        let zero = _mm256_setzero_si256();
        let sums = _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(i8::MIN), w);
        (w, _mm256_sub_epi32(zero, sums))
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn dot_vnni((w, start): (__m256i, __m256i), a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(start, a, w)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn act_avx2(a: __m256i) -> __m256i {
        a
    }

    /// The weights, and their magnitudes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn weight_avx2(w: __m256i) -> (__m256i, __m256i) {
        (w, _mm256_abs_epi8(w))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2((w, magnitudes): (__m256i, __m256i), a: __m256i) -> __m256i {
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(a, w)),
            _mm256_set1_epi16(1),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::Quantized;

    pub(super) unsafe fn rows_vnni<const N: usize>(_: &[u8], _: usize, _: &[Quantized; N], _: &mut [&mut [f32]]) {}
    pub(super) unsafe fn rows_avx2<const N: usize>(_: &[u8], _: usize, _: &[Quantized; N], _: &mut [&mut [f32]]) {}
}

/// Runs `job` on every item, one item per thread, on llama.cpp's threads
/// (see [`omp`]) where it can, on threads of its own elsewhere.
pub fn on_team<T: Send>(items: Vec<T>, job: impl Fn(T) + Sync) {
    if items.len() <= 1 {
        items.into_iter().for_each(job);
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let items: Vec<std::sync::Mutex<Option<T>>> =
            items.into_iter().map(|i| std::sync::Mutex::new(Some(i))).collect();
        let take = |t: usize| items.get(t).and_then(|i| i.lock().ok()?.take());
        omp::run(items.len(), &|t: usize| {
            if let Some(item) = take(t) {
                job(item);
            }
        });
        // Should the team have come short of threads, the rest here.
        (0..items.len()).filter_map(take).for_each(job);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    std::thread::scope(|s| {
        let mut items = items.into_iter();
        // The last item runs on this thread.
        let last = items.next_back();
        for item in items {
            s.spawn(|| job(item));
        }
        if let Some(item) = last {
            job(item);
        }
    });
}

/// llama.cpp's threads: ggml computes with OpenMP (GNU's libgomp, which
/// llama-cpp-sys-2 links), whose threads keep spinning for a while after each
/// parallel region. Work handed to the same team starts on them at once,
/// where a thread of our own would share a core with a spinning one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod omp {
    use std::ffi::{c_int, c_uint, c_void};

    unsafe extern "C" {
        fn GOMP_parallel(f: unsafe extern "C" fn(*mut c_void), data: *mut c_void, threads: c_uint, flags: c_uint);
        fn omp_get_thread_num() -> c_int;
    }

    /// Runs `job(t)` for every `t` in `0..threads`, one per OpenMP thread, and
    /// returns when all have.
    pub fn run<F: Fn(usize) + Sync>(threads: usize, job: &F) {
        unsafe extern "C" fn each<F: Fn(usize) + Sync>(data: *mut c_void) {
            // SAFETY: `data` is the `&F` passed below, alive until
            // `GOMP_parallel` returns.
            let job = unsafe { &*(data as *const F) };
            // SAFETY: a plain query of the calling thread's number.
            let t = usize::try_from(unsafe { omp_get_thread_num() }).unwrap_or(0);
            // A panic must not unwind into C.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(t)));
        }
        let threads = c_uint::try_from(threads).unwrap_or(1);
        // SAFETY: `each::<F>` reads `data` as the `F` it is.
        unsafe { GOMP_parallel(each::<F>, std::ptr::from_ref(job).cast_mut().cast(), threads, 0) }
    }
}

/// What the evaluation callback shares with the engine thread. llama.cpp
/// calls the callback on the thread that called `llama_decode`, so plain
/// cells do.
#[derive(Debug, Default)]
pub struct Capture {
    /// Set by the engine for a step whose hidden states it wants.
    armed: Cell<bool>,
    n_embd: usize,
    /// The normed hidden states of the step's tokens, in batch order.
    hidden: RefCell<Vec<f32>>,
    /// Set when `result_norm` did not look as expected: the step then has
    /// llama.cpp's logits only where its graph ran on.
    odd: Cell<bool>,
    /// Let llama.cpp's graph run to the end anyway, so that its logits can be
    /// compared with the node's (`ChatOptions::check_output_layer`).
    verify: bool,
    /// Armed decodes so far, and the one whose `result_norm` is to be taken
    /// as malformed (`ChatOptions::fault_output_capture_at`, tests only).
    armed_count: Cell<u64>,
    fault_at: Option<u64>,
}

impl Capture {
    pub fn new(n_embd: usize, verify: bool, fault_at: Option<u64>) -> Capture {
        Capture {
            n_embd,
            verify,
            fault_at,
            ..Capture::default()
        }
    }

    pub fn verifies(&self) -> bool {
        self.verify
    }

    /// Arms (or disarms) the capture for the next decode, forgetting what the
    /// last one caught.
    pub fn arm(&self, on: bool) {
        self.armed.set(on);
        if on {
            self.armed_count.set(self.armed_count.get() + 1);
        }
        self.odd.set(false);
        self.hidden.borrow_mut().clear();
    }

    /// What the armed decode caught: `None` if the graph did not stop where
    /// expected, so the step's logits must come from llama.cpp.
    pub fn take(&self, rows: usize, out: &mut Vec<f32>) -> Option<()> {
        self.armed.set(false);
        let hidden = self.hidden.borrow();
        if self.odd.get() || hidden.len() != rows * self.n_embd {
            return None;
        }
        out.clear();
        out.extend_from_slice(&hidden);
        Some(())
    }
}

/// llama.cpp's evaluation callback (`cb_eval`): asked about every node of the
/// graph in order (`ask`), then called again with the node's data for those
/// it said yes to; answering false then stops the rest of the graph.
///
/// # Safety
/// `data` is the `Capture` the context was created with, alive as long as
/// the context, and `t` a valid tensor, as llama.cpp guarantees.
pub unsafe extern "C" fn on_node(t: *mut llama_cpp_sys_2::ggml_tensor, ask: bool, data: *mut c_void) -> bool {
    // SAFETY: as the function's contract says.
    let (capture, t) = unsafe { (&*(data as *const Capture), &*t) };
    if !capture.armed.get() || capture.odd.get() {
        return false;
    }
    // SAFETY: ggml names are NUL-terminated within their 64 bytes.
    let name = unsafe { std::ffi::CStr::from_ptr(t.name.as_ptr()) };
    if name.to_bytes() != b"result_norm" {
        return false;
    }
    if ask {
        return true;
    }
    let cols = usize::try_from(t.ne[0]).unwrap_or(0);
    let rows = usize::try_from(t.ne[1]).unwrap_or(0);
    let plain = t.type_ == 0 // GGML_TYPE_F32
        && cols == capture.n_embd
        && t.ne[2] == 1
        && t.ne[3] == 1
        && t.nb[0] == 4
        && t.nb[1] == 4 * cols
        && !t.data.is_null();
    if !plain || capture.fault_at == Some(capture.armed_count.get()) {
        capture.odd.set(true);
        // Let llama.cpp finish its graph.
        return true;
    }
    // SAFETY: a contiguous f32 tensor of `rows` × `cols`, computed.
    let values = unsafe { std::slice::from_raw_parts(t.data as *const f32, rows * cols) };
    capture.hidden.borrow_mut().extend_from_slice(values);
    // Stop here: the step's logits are the node's to compute.
    capture.verify
}

/// Just enough of GGUF (v2 and v3) to find a tensor's bytes.
mod gguf {
    use anyhow::{bail, Context as _, Result};

    pub struct Info {
        pub architecture: String,
        pub softcapping: bool,
        pub tensors: Vec<Tensor>,
        pub data_start: usize,
    }

    pub struct Tensor {
        pub name: String,
        pub dims: Vec<u64>,
        pub kind: u32,
        pub offset: u64,
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
            let end = end.context("the GGUF header ends early")?;
            let s = &self.bytes[self.at..end];
            self.at = end;
            Ok(s)
        }
        fn u32(&mut self) -> Result<u32> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
        }
        fn u64(&mut self) -> Result<u64> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
        }
        fn len(&mut self) -> Result<usize> {
            usize::try_from(self.u64()?).context("length out of range")
        }
        fn string(&mut self) -> Result<String> {
            let n = self.len()?;
            Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
        }
        /// Skips a value of `kind`, or returns it when it is a string or number.
        fn value(&mut self, kind: u32) -> Result<Value> {
            Ok(match kind {
                0 | 1 | 7 => Value::Number(f64::from(self.take(1)?[0])),
                2 | 3 => {
                    self.take(2)?;
                    Value::Other
                }
                4 => Value::Number(f64::from(self.u32()?)),
                5 => Value::Number(f64::from(self.u32()? as i32)),
                6 => Value::Number(f64::from(f32::from_bits(self.u32()?))),
                8 => Value::Text(self.string()?),
                9 => {
                    let item = self.u32()?;
                    let n = self.len()?;
                    match item {
                        0 | 1 | 7 => drop(self.take(n)?),
                        2 | 3 => drop(self.take(n.checked_mul(2).context("array too long")?)?),
                        4..=6 => drop(self.take(n.checked_mul(4).context("array too long")?)?),
                        10..=12 => drop(self.take(n.checked_mul(8).context("array too long")?)?),
                        8 => {
                            for _ in 0..n {
                                let len = self.len()?;
                                self.take(len)?;
                            }
                        }
                        other => bail!("GGUF arrays of type {other} are not known"),
                    }
                    Value::Other
                }
                10 | 11 => {
                    self.take(8)?;
                    Value::Other
                }
                12 => Value::Number(f64::from_bits(self.u64()?)),
                other => bail!("GGUF value type {other} is not known"),
            })
        }
    }

    enum Value {
        Number(f64),
        Text(String),
        Other,
    }

    pub fn read(bytes: &[u8]) -> Result<Info> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != b"GGUF" {
            bail!("not a GGUF file");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not known");
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut architecture = String::new();
        let mut softcapping = false;
        let mut alignment = 32usize;
        for _ in 0..n_kv {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind)?;
            match (key.as_str(), value) {
                ("general.architecture", Value::Text(a)) => architecture = a,
                ("general.alignment", Value::Number(n)) if n >= 1.0 => alignment = n as usize,
                (k, Value::Number(n)) if k.ends_with(".final_logit_softcapping") || k.ends_with(".logit_scale") => {
                    softcapping |= n != 0.0 && !(k.ends_with(".logit_scale") && n == 1.0)
                }
                _ => {}
            }
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                bail!("tensor {name} has {n_dims} dimensions");
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let kind = r.u32()?;
            let offset = r.u64()?;
            tensors.push(Tensor {
                name,
                dims,
                kind,
                offset,
            });
        }
        let data_start = r.at.div_ceil(alignment) * alignment;
        Ok(Info {
            architecture,
            softcapping,
            tensors,
            data_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, n_embd: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut w = Vec::with_capacity(rows * n_embd / BLOCK * BLOCK_BYTES);
        for _ in 0..rows * n_embd / BLOCK {
            let d = half::f16::from_f32(0.0005 + (next() % 1000) as f32 * 1e-5);
            w.extend_from_slice(&d.to_le_bytes());
            // -128 included: the sign trick must handle it.
            w.extend((0..BLOCK).map(|_| next() as u8));
        }
        w
    }

    fn hidden(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    #[test]
    fn quantizing_keeps_each_block_within_half_a_step() {
        let x = hidden(64, 3);
        let q = Quantized::new(&x);
        for (i, v) in x.iter().enumerate() {
            let back = f32::from(q.q[i]) * q.d[i / BLOCK];
            assert!((back - v).abs() <= q.d[i / BLOCK] * 0.51 + 1e-3, "{i}: {v} → {back}");
        }
        assert_eq!(Quantized::new(&[0.0; 32]).q, vec![0; 32]);
    }

    #[test]
    fn every_kernel_agrees_with_the_plain_dot_product_for_one_to_four_rows() {
        let Some(best) = Kernel::detect() else { return };
        let (rows, n_embd) = (37, 128);
        let w = weights(rows, n_embd, 11);
        for n in 1..=4 {
            let acts: Vec<Quantized> = (0..n)
                .map(|k| Quantized::new(&hidden(n_embd, 100 + k as u64)))
                .collect();
            for kernel in [Kernel::Avx2, best] {
                let head = Head::for_test(w.clone(), n_embd, rows, kernel);
                let mut got = vec![vec![0f32; rows]; n];
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(Vec::as_mut_slice).collect();
                match n {
                    1 => head.pass::<1>(&w, &acts, &mut outs),
                    2 => head.pass::<2>(&w, &acts, &mut outs),
                    3 => head.pass::<3>(&w, &acts, &mut outs),
                    _ => head.pass::<4>(&w, &acts, &mut outs),
                }
                for (r, row) in w.chunks_exact(n_embd / BLOCK * BLOCK_BYTES).enumerate() {
                    for (k, a) in acts.iter().enumerate() {
                        let want = dot_reference(row, a);
                        let got = got[k][r];
                        assert!(
                            (want - got).abs() <= 1e-4 * want.abs().max(1.0),
                            "{kernel:?} row {r} act {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn logits_come_out_row_after_row_whatever_the_threads() {
        let Some(kernel) = Kernel::detect() else { return };
        let (rows, n_embd) = (3001, 64);
        let w = weights(rows, n_embd, 5);
        let x = hidden(n_embd * 6, 9);
        let mut one = Vec::new();
        let mut head = Head::for_test(w.clone(), n_embd, rows, kernel);
        head.logits(&x, &mut one);
        assert_eq!(one.len(), 6 * rows);
        head.threads = 3;
        let mut three = Vec::new();
        head.logits(&x, &mut three);
        assert_eq!(one, three);
        let row_bytes = n_embd / BLOCK * BLOCK_BYTES;
        for k in [0usize, 4, 5] {
            let a = Quantized::new(&x[k * n_embd..(k + 1) * n_embd]);
            for r in [0usize, 1500, rows - 1] {
                let want = dot_reference(&w[r * row_bytes..(r + 1) * row_bytes], &a);
                assert!((three[k * rows + r] - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"not a model").expect("write");
        let err = Head::open(&path, 2).expect_err("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("GGUF") || text.contains("AVX2") || text.contains("CXMPUTE_CHAT_OUTPUT"),
            "{text}"
        );
    }

    impl Head {
        fn for_test(w: Vec<u8>, n_embd: usize, n_vocab: usize, kernel: Kernel) -> Head {
            let mut map = memmap2::MmapMut::map_anon(w.len()).expect("anonymous map");
            map.copy_from_slice(&w);
            Head {
                map: map.make_read_only().expect("read-only map"),
                start: 0,
                n_embd,
                n_vocab,
                threads: 1,
                kernel,
            }
        }
    }
}
