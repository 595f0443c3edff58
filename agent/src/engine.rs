//! The inference engine: llama.cpp (llama-cpp-2) behind a bounded queue.
//!
//! `parallel_slots` worker threads each own a llama context on the shared model and take
//! jobs from a queue of `queue_depth`; a full queue is refused at once (the API answers
//! 429). Each job applies the model's own chat template, decodes the prompt, and samples
//! token by token — greedy at temperature 0, else top-p, temperature and a seeded
//! distribution — until an end-of-generation token, a stop sequence, `max_tokens`, or
//! the receiver going away (the client disconnected), which stops generation at once.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use serde::{Deserialize, Serialize};

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

/// Engine settings (the EdgeModel's `runtime` section).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A GGUF file that has been verified.
    pub model_path: PathBuf,
    /// Model id on the API.
    pub served_name: String,
    /// Context window per slot, in tokens.
    pub context_size: u32,
    /// CPU threads per slot.
    pub threads: i32,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// Requests decoded concurrently.
    pub parallel_slots: usize,
    /// Requests that may wait for a slot.
    pub queue_depth: usize,
    /// The decrypted model `model_path` names (a sealed memfd), kept as long as the
    /// engine lives; `None` for a model file on disk.
    pub plaintext: Option<std::sync::Arc<edgefleet_secmem::SealedModel>>,
    /// Which model (its verified artifact) and plugins this is, as receipts name it;
    /// `None` where nothing verified it against a fleet's revision (no receipts).
    pub provenance: Option<edgefleet_trust::receipt::Provenance>,
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded.
    #[error("loading the model: {0}")]
    Load(String),
    /// The request cannot be served as asked.
    #[error("{0}")]
    Invalid(String),
    /// llama.cpp failed during generation.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is busy and the queue is full.
    #[error("all {0} slots busy and the queue is full")]
    QueueFull(usize),
    /// The engine stopped.
    #[error("the engine stopped")]
    Stopped,
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// Whether `role` is one the chat template takes (`system`, `user`, `assistant`).
pub fn is_chat_role(role: &str) -> bool {
    matches!(role, "system" | "user" | "assistant")
}

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Seed of the sampling distribution.
    pub seed: u32,
    /// Generation stops before any of these.
    pub stop: Vec<String>,
    /// Suppress the end-of-generation tokens, so that exactly `max_tokens` come out
    /// (unless a stop sequence matches). For benchmarks, like llama-bench's generation.
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of generation token or stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a job reports, in order: deltas, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Delta(String),
    /// Finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: u32,
        /// Generated tokens.
        completion_tokens: u32,
    },
    /// Failed; the message says why.
    Failed(String),
}

struct Job {
    messages: Vec<ChatMessage>,
    sampling: Sampling,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    /// When it was submitted: time to first token and duration count its wait for a
    /// slot, as the client sees them.
    submitted: Instant,
}

/// Counters for metrics and health.
#[derive(Debug)]
pub struct Stats {
    /// Requests the engine completed (a cancelled one too).
    pub requests: AtomicU64,
    /// Requests failed on the server's side (llama.cpp errors): what error-rate gates
    /// judge, with the plugin failures.
    pub failures: AtomicU64,
    /// Requests a plugin failed (trap, fuel, deadline) before the engine saw them.
    pub plugin_failures_before: AtomicU64,
    /// Requests a plugin failed on the answer or a chunk of it (the engine counted
    /// them in `requests` too).
    pub plugin_failures_after: AtomicU64,
    /// Requests refused as the client's mistake (a prompt that does not fit the
    /// context): answered 400, never counted as failures, so that no API user can fail
    /// a fleet's rollout by sending long prompts.
    pub rejected: AtomicU64,
    /// Generations stopped because the client went away.
    pub cancelled: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Microseconds spent generating (after the prompt).
    pub generation_micros: AtomicU64,
    /// Prompt tokens decoded.
    pub prompt_tokens: AtomicU64,
    /// Microseconds to first token, summed.
    pub ttft_micros: AtomicU64,
    /// Seconds from a request's start to its first token.
    pub ttft_seconds: crate::histogram::Histogram,
    /// Seconds from a request's start to its last token.
    pub duration_seconds: crate::histogram::Histogram,
    /// Tokens per second of each request's generation (after the prompt).
    pub request_tokens_per_second: crate::histogram::Histogram,
    /// Slots decoding now.
    pub busy: AtomicUsize,
    /// Requests admitted and not finished (running + waiting).
    pub admitted: AtomicUsize,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            failures: Default::default(),
            plugin_failures_before: Default::default(),
            plugin_failures_after: Default::default(),
            rejected: Default::default(),
            cancelled: Default::default(),
            generated_tokens: Default::default(),
            generation_micros: Default::default(),
            prompt_tokens: Default::default(),
            ttft_micros: Default::default(),
            ttft_seconds: crate::histogram::Histogram::new(crate::histogram::LATENCY_SECONDS),
            duration_seconds: crate::histogram::Histogram::new(crate::histogram::LATENCY_SECONDS),
            request_tokens_per_second: crate::histogram::Histogram::new(
                crate::histogram::TOKENS_PER_SECOND,
            ),
            busy: Default::default(),
            admitted: Default::default(),
        }
    }
}

impl Stats {
    /// Requests waiting for a slot: admitted and not yet running.
    pub fn waiting(&self) -> usize {
        self.admitted
            .load(Ordering::Relaxed)
            .saturating_sub(self.busy.load(Ordering::Relaxed))
    }
}

/// A loaded model with its worker slots.
pub struct Engine {
    jobs: SyncSender<Job>,
    control_tokens: Vec<String>,
    config: EngineConfig,
    stats: Arc<Stats>,
    load_millis: u64,
    model_bytes: u64,
    model_params: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Stats {
    /// Requests served, done or failed: completed by the engine, failed in it, or
    /// failed by a plugin before it. A generation the client cancelled is neither a
    /// success nor a failure of the revision, and is left out (so that cancelling many
    /// requests cannot dilute a real error rate).
    pub fn served(&self) -> u64 {
        let served = self
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(self.cancelled.load(Ordering::Relaxed))
            + self.failures.load(Ordering::Relaxed)
            + self.plugin_failures_before.load(Ordering::Relaxed);
        // A stream a plugin failed mid-way the engine counts as cancelled: it is
        // still one served request, failed.
        served.max(self.server_failures())
    }

    /// Zeroes the counters of finished work (the device's own checks, golden prompts, are
    /// not the revision's serving record). Call it before any client's request: work in
    /// flight (`busy`, `admitted`) is left alone.
    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.failures,
            &self.plugin_failures_before,
            &self.plugin_failures_after,
            &self.rejected,
            &self.cancelled,
            &self.generated_tokens,
            &self.generation_micros,
            &self.prompt_tokens,
            &self.ttft_micros,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.ttft_seconds.reset();
        self.duration_seconds.reset();
        self.request_tokens_per_second.reset();
    }

    /// Of [`Stats::served`], the server's failures: the engine's and the plugins'.
    pub fn server_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
            + self.plugin_failures_before.load(Ordering::Relaxed)
            + self.plugin_failures_after.load(Ordering::Relaxed)
    }
}

impl Engine {
    /// Loads the model and starts the slots.
    pub fn load(config: EngineConfig) -> Result<Self, EngineError> {
        if config.parallel_slots == 0 || config.queue_depth == 0 || config.context_size < 128 {
            return Err(EngineError::Invalid(
                "need at least one slot, a queue of at least one, and a context of 128 tokens"
                    .into(),
            ));
        }
        let backend = backend()?;
        let started = Instant::now();
        let mut params = LlamaModelParams::default().with_n_gpu_layers(config.gpu_layers);
        if config.plaintext.is_some() {
            // A decrypted model: llama.cpp locks its mapping of it too.
            params = params.with_use_mlock(true);
        }
        let model = Arc::new(
            LlamaModel::load_from_file(backend, &config.model_path, &params)
                .map_err(|e| EngineError::Load(format!("{}: {e}", config.model_path.display())))?,
        );
        // The model must carry a chat template: we never guess one.
        model
            .chat_template(None)
            .map_err(|e| EngineError::Load(format!("no chat template in the model: {e}")))?;
        // The texts of control tokens (`<|im_start|>`, …): user content must not smuggle
        // them into the prompt, where they would parse as real role markers.
        let vocab = model.vocab();
        let mut control_tokens: Vec<String> = vocab
            .tokens()
            .filter(|t| vocab.is_control(*t))
            .filter_map(|t| {
                vocab
                    .text(t)
                    .and_then(|c| c.to_str().ok())
                    .map(str::to_owned)
            })
            .filter(|t| t.len() > 1)
            .collect();
        control_tokens.sort();
        control_tokens.dedup();
        let load_millis = started.elapsed().as_millis() as u64;
        let model_bytes = model.size();
        let model_params = model.n_params();

        // Admission is counted in `Stats::admitted` (running + waiting); the channel only
        // needs room for everything admitted.
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Job>(config.parallel_slots + config.queue_depth);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(Stats::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for slot in 0..config.parallel_slots {
            let (model, rx, stats, config, ready) = (
                model.clone(),
                rx.clone(),
                stats.clone(),
                config.clone(),
                ready_tx.clone(),
            );
            std::thread::Builder::new()
                .name(format!("llama-slot-{slot}"))
                .spawn(move || worker(&model, &rx, &stats, &config, &ready))
                .map_err(|e| EngineError::Load(format!("starting slot {slot}: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..config.parallel_slots {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(EngineError::Load(e)),
                Err(_) => return Err(EngineError::Load("a slot exited while starting".into())),
            }
        }
        Ok(Self {
            jobs: tx,
            control_tokens,
            config,
            stats,
            load_millis,
            model_bytes,
            model_params,
        })
    }

    /// Queues a generation; events arrive on the returned receiver. Dropping the
    /// receiver stops the generation.
    pub fn submit(
        &self,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, SubmitError> {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        // At most `parallel_slots` running plus `queue_depth` waiting.
        let capacity = self.config.parallel_slots + self.config.queue_depth;
        if self
            .stats
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .is_err()
        {
            return Err(SubmitError::QueueFull(self.config.parallel_slots));
        }
        match self.jobs.try_send(Job {
            messages,
            sampling,
            events,
            submitted: Instant::now(),
        }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.admitted.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(self.config.parallel_slots),
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Texts of the model's control tokens, which request content must not contain.
    pub fn control_tokens(&self) -> &[String] {
        &self.control_tokens
    }

    /// The first message (by index) whose content contains a control token, and that token.
    pub fn control_token_in(&self, messages: &[ChatMessage]) -> Option<(usize, &str)> {
        messages.iter().enumerate().find_map(|(i, m)| {
            self.control_tokens
                .iter()
                .find(|t| m.content.contains(t.as_str()))
                .map(|t| (i, t.as_str()))
        })
    }

    /// Settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The counters, shared (for work that outlives a borrow of the engine).
    pub fn shared_stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Milliseconds the model took to load.
    pub fn load_millis(&self) -> u64 {
        self.load_millis
    }

    /// Bytes of the model's tensors, as llama.cpp counts them.
    pub fn model_bytes(&self) -> u64 {
        self.model_bytes
    }

    /// Parameters of the model.
    pub fn model_params(&self) -> u64 {
        self.model_params
    }

    /// Whether a slot is free: what `/readyz` reports. (A request arriving while every
    /// slot is busy still queues until the queue is full.)
    pub fn has_capacity(&self) -> bool {
        self.stats.busy.load(Ordering::Relaxed) < self.config.parallel_slots
    }
}

fn worker(
    model: &LlamaModel,
    jobs: &Mutex<std::sync::mpsc::Receiver<Job>>,
    stats: &Stats,
    config: &EngineConfig,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) {
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.context_size))
        .with_n_batch(config.context_size.min(512))
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("creating a context: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the engine was dropped
            },
            Err(_) => return,
        };
        stats.busy.fetch_add(1, Ordering::Relaxed);
        let result = generate(model, &mut ctx, &job, stats);
        stats.busy.fetch_sub(1, Ordering::Relaxed);
        stats.admitted.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(done) => {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if let Some(done) = done {
                    let _ = job.events.send(done);
                } else {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let counter = match e {
                    EngineError::Invalid(_) => &stats.rejected,
                    EngineError::Load(_) | EngineError::Inference(_) => &stats.failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Failed(e.to_string()));
            }
        }
    }
}

/// Holds back text that may be the start of a stop sequence.
fn emit_safe_len(text: &str, emitted: usize, stop: &[String]) -> usize {
    let hold = stop
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let mut end = text.len().saturating_sub(hold).max(emitted);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Runs one job. `Ok(None)` means the receiver went away and generation stopped.
fn generate(
    model: &LlamaModel,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    job: &Job,
    stats: &Stats,
) -> Result<Option<Event>, EngineError> {
    let started = job.submitted;
    if job.events.is_closed() {
        return Ok(None);
    }
    let vocab = model.vocab();
    let template = model
        .chat_template(None)
        .map_err(|e| EngineError::Inference(e.to_string()))?;
    let chat = job
        .messages
        .iter()
        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Invalid(format!("messages: {e}")))?;
    let prompt = model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| EngineError::Inference(e.to_string()))?;
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let n_ctx = ctx.n_ctx() as usize;
    if tokens.is_empty() || tokens.len() + job.sampling.max_tokens as usize > n_ctx {
        return Err(EngineError::Invalid(format!(
            "prompt of {} tokens plus max_tokens {} exceeds the context of {n_ctx}",
            tokens.len(),
            job.sampling.max_tokens
        )));
    }
    ctx.clear_kv_cache();
    let n_batch = ctx.n_batch().max(1) as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let mut pos: i32 = 0;
    let last = tokens.len() - 1;
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (i, t) in chunk.iter().enumerate() {
            batch
                .add(*t, pos, &[0], c * n_batch + i == last)
                .map_err(|e| EngineError::Inference(e.to_string()))?;
            pos += 1;
        }
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        if job.events.is_closed() {
            return Ok(None);
        }
    }
    stats
        .prompt_tokens
        .fetch_add(tokens.len() as u64, Ordering::Relaxed);

    let s = &job.sampling;
    let mut sampler = if s.temperature <= 0.0 {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(s.top_p, 1),
            LlamaSampler::temp(s.temperature),
            LlamaSampler::dist(s.seed),
        ])
    };
    if s.ignore_eos {
        let biases: Vec<LlamaLogitBias> = [vocab.eos(), vocab.eot()]
            .into_iter()
            .filter(|t| t.0 >= 0)
            .map(|t| LlamaLogitBias::new(t, f32::NEG_INFINITY))
            .collect();
        sampler = LlamaSampler::chain_simple([
            LlamaSampler::logit_bias(vocab.n_tokens(), &biases),
            sampler,
        ]);
    }
    let gen_started = Instant::now();
    let mut bytes: Vec<u8> = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let mut generated = 0u32;
    let mut finish = FinishReason::Length;
    while generated < s.max_tokens {
        if job.events.is_closed() {
            return Ok(None);
        }
        // `sample` also accepts the token into the sampler chain.
        let token = sampler.sample(ctx, batch.n_tokens() - 1);
        if vocab.is_eog(token) {
            finish = FinishReason::Stop;
            break;
        }
        generated += 1;
        if generated == 1 {
            stats
                .ttft_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            stats.ttft_seconds.observe(started.elapsed().as_secs_f64());
        }
        bytes.extend(vocab.token_to_piece(token, false, None));
        // Move the longest valid UTF-8 prefix into the text.
        // Move complete UTF-8 into the text; a sequence that can never be valid becomes
        // U+FFFD, an incomplete one waits for the next token.
        loop {
            match std::str::from_utf8(&bytes) {
                Ok(v) => {
                    text.push_str(v);
                    bytes.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            bytes.drain(..valid + bad);
                        }
                        None => {
                            bytes.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(at) = s
            .stop
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min()
        {
            text.truncate(at);
            finish = FinishReason::Stop;
            break;
        }
        let safe = emit_safe_len(&text, emitted, &s.stop);
        if safe > emitted {
            if job
                .events
                .send(Event::Delta(text[emitted..safe].to_owned()))
                .is_err()
            {
                return Ok(None);
            }
            emitted = safe;
        }
        batch.clear();
        batch
            .add(token, pos, &[0], true)
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        pos += 1;
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Inference(e.to_string()))?;
    }
    if !bytes.is_empty() {
        text.push('\u{FFFD}');
    }
    if emitted < text.len()
        && job
            .events
            .send(Event::Delta(text[emitted..].to_owned()))
            .is_err()
    {
        return Ok(None);
    }
    stats
        .generated_tokens
        .fetch_add(u64::from(generated), Ordering::Relaxed);
    stats
        .generation_micros
        .fetch_add(gen_started.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats
        .duration_seconds
        .observe(started.elapsed().as_secs_f64());
    let generating = gen_started.elapsed().as_secs_f64();
    if generated > 0 && generating > 0.0 {
        stats
            .request_tokens_per_second
            .observe(f64::from(generated) / generating);
    }
    Ok(Some(Event::Done {
        finish_reason: finish,
        prompt_tokens: tokens.len() as u32,
        completion_tokens: generated,
    }))
}

/// Whether `path` looks like a GGUF file (magic `GGUF`).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}
