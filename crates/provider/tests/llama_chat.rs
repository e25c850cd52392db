//! The built-in chat engine with the real model (Gemma 3 270M through llama.cpp).
//!
//! The model is not downloaded here: `scripts/fetch-model.sh` (run by
//! scripts/test.sh and CI) puts it in the cache. Without it these tests pass
//! with a loud SKIP message, unless CXMPUTE_REQUIRE_MODELS is set, when they fail.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cxmpute_protocol::openai::{ChatMessage, ChatRequest};
use cxmpute_protocol::parse::parse_json;
use cxmpute_provider::engines::llama::engine::{Event, FinishReason};
use cxmpute_provider::engines::llama::params::ChatParams;
use cxmpute_provider::engines::llama::{ChatOptions, Completion, LlamaChat};
use cxmpute_provider::models;
use serde_json::{json, Value};

fn model_file() -> Option<PathBuf> {
    if let Some(f) = models::cached_gemma() {
        return Some(f);
    }
    let required = std::env::var_os("CXMPUTE_REQUIRE_MODELS").is_some_and(|v| !v.is_empty());
    assert!(
        !required,
        "CXMPUTE_REQUIRE_MODELS is set but {} is not in {}; run scripts/fetch-model.sh",
        models::GEMMA_ID,
        models::models_dir().display()
    );
    eprintln!(
        "\n*** SKIPPED: the chat model {} is not in {}. Run scripts/fetch-model.sh to test the chat engine. ***\n",
        models::GEMMA_ID,
        models::models_dir().display()
    );
    None
}

/// One engine per test binary; `None` when the model is absent (test skipped).
fn engine() -> Option<Arc<LlamaChat>> {
    static ENGINE: OnceLock<Option<Arc<LlamaChat>>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let file = model_file()?;
            let started = Instant::now();
            let options = ChatOptions {
                slots: 4,
                context_per_slot: 1024,
                ..ChatOptions::default()
            };
            let engine = LlamaChat::load(&file, options).expect("load the chat model");
            eprintln!("loaded {} in {:?}", file.display(), started.elapsed());
            Some(Arc::new(engine))
        })
        .clone()
}

fn request(body: Value) -> ChatRequest {
    parse_json(body.to_string().as_bytes()).expect("valid chat request")
}

fn ask(question: &str, extra: Value) -> (Vec<ChatMessage>, ChatParams) {
    let mut body = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": question}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let req = request(body);
    let params = ChatParams::from_request(&req).expect("valid params");
    (req.messages, params)
}

fn complete(engine: &LlamaChat, question: &str, extra: Value) -> Completion {
    let (messages, params) = ask(question, extra);
    engine.complete_blocking(&messages, &params).expect("completion")
}

#[test]
fn greedy_and_seeded_answers_repeat_exactly() {
    // An engine of its own with one slot: on the shared engine another test's
    // request could join a step, and a step of several sequences computes
    // with other kernels than one of a single sequence (see below).
    let Some(file) = model_file() else { return };
    let options = ChatOptions {
        slots: 1,
        context_per_slot: 1024,
        ..ChatOptions::default()
    };
    let engine = &LlamaChat::load(&file, options).expect("load");
    let greedy = json!({"temperature": 0, "max_tokens": 24});
    let a = complete(engine, "What is the capital of France?", greedy.clone());
    let b = complete(engine, "What is the capital of France?", greedy);
    eprintln!("greedy: {:?}", a.text);
    assert!(!a.text.trim().is_empty(), "{a:?}");
    assert_eq!(a.text, b.text);

    let seeded = json!({"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_tokens": 24});
    let c = complete(engine, "Write a sentence about the sea.", seeded.clone());
    let d = complete(engine, "Write a sentence about the sea.", seeded);
    eprintln!("seeded: {:?}", c.text);
    assert_eq!(c.text, d.text);
}

#[test]
fn max_tokens_caps_the_answer_and_usage_counts_tokens() {
    let Some(engine) = engine() else { return };
    let engine = &*engine;
    let (messages, params) = ask(
        "List the numbers from one to one hundred, separated by commas.",
        json!({"temperature": 0, "max_tokens": 5}),
    );
    let prompt_tokens = engine.prompt(&messages).expect("prompt").tokens.len() as u32;
    let before = engine.step_times();
    let done = engine.complete_blocking(&messages, &params).expect("completion");
    eprintln!("{done:?}");
    // One step read the prompt and gave the first token, four more the rest
    // (other tests share the engine, so there may be more).
    let steps = engine.step_times().since(before);
    assert!(steps.steps >= 5 && !steps.decode.is_zero(), "{steps:?}");
    assert_eq!(done.reason, FinishReason::Length);
    assert_eq!(done.completion_tokens, 5);
    assert_eq!(done.prompt_tokens, prompt_tokens);
    assert!(done.pieces >= 1 && done.pieces <= 5, "{done:?}");
}

#[test]
fn a_stop_sequence_ends_the_answer_before_it() {
    let Some(engine) = engine() else { return };
    let engine = &*engine;
    let q = "Describe a cat in two sentences.";
    let free = complete(engine, q, json!({"temperature": 0, "max_tokens": 30}));
    eprintln!("without stop: {:?}", free.text);
    // Stop at the third word of the answer the model gives anyway: greedy
    // decoding makes the text before it identical.
    let words: Vec<&str> = free.text.split_whitespace().collect();
    assert!(words.len() >= 4, "answer too short to test stops: {:?}", free.text);
    let stop = format!(" {}", words[2]);
    let cut = free.text.find(&stop).expect("stop word in the answer");
    let stopped = complete(
        engine,
        q,
        json!({"temperature": 0, "max_tokens": 30, "stop": [stop, "never-appears"]}),
    );
    assert_eq!(stopped.text, free.text[..cut]);
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert!(stopped.completion_tokens < free.completion_tokens);
}

#[test]
fn concurrent_requests_each_get_their_own_answer() {
    let Some(engine) = engine() else { return };
    let engine = &*engine;
    // Questions with a clear answer. Batched decoding uses other CPU kernels than
    // single-sequence decoding (4-row tiles instead of dot products), which round
    // differently; where two tokens are nearly tied (an open-ended prompt a base
    // model just echoes) that can flip a greedy choice. See docs/engines.md.
    let questions = [
        "What is the capital of France?",
        "What is the capital of Japan?",
        "What is the largest planet in the solar system?",
        "How many days are in a week?",
    ];
    let params = json!({"temperature": 0, "max_tokens": 16});
    let alone: Vec<String> = questions
        .iter()
        .map(|q| complete(engine, q, params.clone()).text)
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let params = params.clone();
                s.spawn(move || complete(engine, q, params).text)
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    // Which rows a step batches depends on timing (a busy machine starts the
    // threads at different steps), and batched kernels round differently, so
    // a near-tie late in an answer may go either way. What must hold: every
    // request gets the answer to its own question, never another's.
    for ((q, a), t) in questions.iter().zip(&alone).zip(&together) {
        eprintln!("{q} -> {a:?} alone, {t:?} batched");
        assert!(!t.trim().is_empty(), "no batched answer for {q:?}");
    }
    let (france, japan) = (&together[0], &together[1]);
    assert!(
        france.contains("Paris") && !france.contains("Tokyo"),
        "France, batched: {france:?}"
    );
    assert!(
        japan.contains("Tokyo") && !japan.contains("Paris"),
        "Japan, batched: {japan:?}"
    );
    // The same prompt four times at once: four answers to that prompt.
    let same: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let params = params.clone();
                s.spawn(move || complete(engine, questions[0], params).text)
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    assert!(
        same.iter().all(|t| t.contains("Paris") && !t.contains("Tokyo")),
        "identical requests batched together: {same:?}"
    );
    assert!(alone[0].contains("Paris"), "France, alone: {:?}", alone[0]);
}

#[test]
fn the_nodes_output_layer_gives_llama_cpps_logits() {
    // The node computes the output layer of generation steps itself where the
    // CPU allows (engines/llama/head.rs). In check mode llama.cpp computes it
    // too and every row of logits is compared: one, two, three and four
    // sequences at a time, as four answers start and end.
    let Some(engine) = engine() else { return };
    if !engine.output_layer().starts_with("node") {
        eprintln!("this CPU has no AVX2: llama.cpp computes the output layer");
        return;
    }
    let Some(file) = model_file() else { return };
    let options = ChatOptions {
        slots: 4,
        context_per_slot: 1024,
        check_output_layer: true,
        ..ChatOptions::default()
    };
    let checked = LlamaChat::load(&file, options).expect("load");
    let questions = [
        ("What is the capital of France?", 8),
        ("Count from 1 to 20, separated by commas: 1, 2, 3,", 40),
        ("What is the capital of Japan?", 16),
        ("Write a sentence about the sea.", 24),
    ];
    std::thread::scope(|s| {
        for (q, max_tokens) in questions {
            let checked = &checked;
            s.spawn(move || {
                complete(
                    checked,
                    q,
                    json!({"temperature": 0.7, "seed": 3, "max_tokens": max_tokens}),
                )
            });
        }
    });
    let (rows, worst) = checked.output_layer_check();
    eprintln!(
        "{} rows compared with llama.cpp's; largest difference {worst:e} of the row's largest logit",
        rows
    );
    assert!(rows >= 40, "only {rows} rows were compared");
    assert!(worst <= 1e-5, "the node's logits differ from llama.cpp's by {worst:e}");
    assert!(checked.step_times().head_steps >= 20);
}

#[test]
fn a_step_whose_hidden_states_cannot_be_caught_is_decoded_again_by_llama_cpp() {
    // Should llama.cpp's graph not end in the node the engine expects, the
    // step's tokens leave the KV cache and are decoded again, llama.cpp
    // computing the output layer from then on. The fault is injected at the
    // third generation step; the answer must be the one without it.
    let Some(engine) = engine() else { return };
    if !engine.output_layer().starts_with("node") {
        return;
    }
    let Some(file) = model_file() else { return };
    let load = |fault: Option<u64>| {
        let options = ChatOptions {
            slots: 1,
            context_per_slot: 1024,
            fault_output_capture_at: fault,
            ..ChatOptions::default()
        };
        LlamaChat::load(&file, options).expect("load")
    };
    let (clean, faulty) = (load(None), load(Some(3)));
    let ask = |e: &LlamaChat| {
        complete(
            e,
            "Write a sentence about the sea.",
            json!({"temperature": 0, "max_tokens": 32}),
        )
    };
    let (want, got) = (ask(&clean), ask(&faulty));
    eprintln!("{got:?}");
    assert_eq!(got, want);
    assert!(clean.step_times().head_steps >= 5);
    assert_eq!(
        faulty.step_times().head_steps,
        2,
        "the node's output layer ran on after the fault"
    );
}

#[test]
fn dropping_the_receiver_frees_the_sequence() {
    // An engine of its own with one slot, so that nothing else keeps it busy and
    // a leaked sequence would block the next request.
    let Some(file) = model_file() else { return };
    let options = ChatOptions {
        slots: 1,
        context_per_slot: 1024,
        ..ChatOptions::default()
    };
    let engine = LlamaChat::load(&file, options).expect("load");
    let (messages, params) = ask(
        "Count from one to one thousand.",
        json!({"temperature": 0, "max_tokens": 900}),
    );
    let mut generation = engine.start(&messages, &params).expect("start");
    assert!(generation.events.blocking_recv().is_some());
    drop(generation);
    let until = Instant::now() + Duration::from_secs(10);
    while engine.busy() > 0 {
        assert!(
            Instant::now() < until,
            "the engine kept generating for a dropped request"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let next = complete(&engine, "Say hello.", json!({"temperature": 0, "max_tokens": 4}));
    assert!(next.completion_tokens >= 1);
}

#[test]
fn a_sequence_moved_to_a_freed_id_keeps_its_context() {
    // An engine of its own with two slots. The first request (sequence 0) ends
    // after one token while the second (sequence 1) is still answering, so the
    // engine moves the second into id 0 (one pass over the weights per step)
    // and must carry its KV cache along: with a lost or wrong cache the rest of
    // the count would not follow from the prompt.
    let Some(file) = model_file() else { return };
    let options = ChatOptions {
        slots: 2,
        context_per_slot: 1024,
        ..ChatOptions::default()
    };
    let engine = LlamaChat::load(&file, options).expect("load");
    let greedy = |max_tokens: u32| json!({"temperature": 0, "max_tokens": max_tokens});
    let count = "Count from 1 to 40, separated by commas: 1, 2, 3, 4, 5,";
    let (short_messages, short_params) = ask(count, greedy(6));
    let (long_messages, long_params) = ask(count, greedy(64));
    // The short request is running (sequence 0) before the long one is sent,
    // so the long one takes sequence 1.
    let mut short = engine.start(&short_messages, &short_params).expect("start");
    let Some(Event::Text(first)) = short.events.blocking_recv() else {
        panic!("the short request produced no text");
    };
    let long = engine.start(&long_messages, &long_params).expect("start");
    let short = first + &short.wait().expect("short answer").text;
    let moved = long.wait().expect("long answer").text;
    assert!(
        engine.sequences_moved() >= 1,
        "the long answer was never moved (short answer {short:?})"
    );
    for run in ["9, 10, 11", "15, 16, 17"] {
        assert!(moved.contains(run), "the moved answer lost the count: {moved:?}");
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let Some(engine) = engine() else { return };
    let engine = &*engine;
    let long = "word ".repeat(3000);
    let (messages, params) = ask(&long, json!({}));
    match engine.start(&messages, &params) {
        Err(cxmpute_provider::engines::llama::ChatError::TooLong { prompt, limit }) => {
            assert!(prompt > limit as usize)
        }
        other => panic!("expected TooLong, got {:?}", other.map(|g| g.prompt_tokens)),
    }
}

/// The node's HTTP route, in process: SSE chunks in OpenAI's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_streams_chunks_and_answers_json() {
    let Some(engine) = tokio::task::spawn_blocking(engine).await.expect("load") else {
        return;
    };
    let base = serve(engine).await;
    let http = reqwest::Client::new();
    let body = json!({
        "model": "gemma-3-270m",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 16,
    });

    let whole: Value = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    eprintln!("{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0))
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let res = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let sse = res.text().await.expect("body");
    let events: Vec<&str> = sse.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(content.len() > 1, "expected several content chunks: {sse}");
    assert_eq!(content.concat(), text, "streamed and whole answers differ");
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .expect("a finish chunk");
    assert!(finish == "length" || finish == "stop");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);

    let bad = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}))
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status(), 400);
    let err: Value = bad.json().await.expect("json");
    assert_eq!(err["error"]["param"], "temperature");
}

async fn serve(engine: Arc<LlamaChat>) -> String {
    use cxmpute_protocol::link::Hello;
    use cxmpute_provider::engines::{BuiltinChat, Engines};
    use cxmpute_provider::server::{router, NodeState};

    let engines = Engines {
        speech: None,
        chat: Some(BuiltinChat {
            model: models::GEMMA_ID.into(),
            engine,
        }),
        minilm: None,
        cpu_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        scrape: None,
        upstream: None,
        ollama: None,
    };
    let hello = Hello {
        node_version: "test".into(),
        offers: engines.offers(),
        max_concurrency: 8,
        placement: Default::default(),
    };
    let state = NodeState::new(engines, hello, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}
