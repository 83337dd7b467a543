//! `moela serve` over loopback HTTP with the shipped model: answers, streams, usage, the cached prefix,
//! every error in OpenAI's shape (each followed by a request that succeeds), a full queue, concurrent
//! requests that answer as they do alone, and clients that leave mid-stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running server, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moela"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("moela serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the address line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Self { child, addr }
    }

    /// Sends one HTTP/1.0 request (the server then closes the connection after the body) and returns the
    /// status line's code and the body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = self.send(method, path, body);
        let mut out = String::new();
        s.read_to_string(&mut out).expect("a response");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, body.to_string())
    }

    fn send(&self, method: &str, path: &str, body: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).expect("connects");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        s
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (code, text) = self.request("POST", path, body.to_string().as_bytes());
        (code, parse(&text))
    }

    fn health(&self) -> Value {
        parse(&self.request("GET", "/health", b"").1)
    }

    /// Waits until every slot is free again, up to `limit`.
    fn idle(&self, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let h = self.health();
            if h["slots_processing"] == 0 || start.elapsed() > limit {
                return h;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn ask(question: &str) -> Value {
    json!({"messages": [{"role": "user", "content": question}], "max_tokens": 400})
}

/// The data lines of a server-sent event stream, `[DONE]` included.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn chat_answers_stream_and_reuse_the_cached_prefix() {
    let s = Server::start(&["--parallel", "2"]);
    let (code, models) = s.request("GET", "/v1/models", b"");
    assert_eq!(code, 200);
    assert_eq!(parse(&models)["data"][0]["id"], "moela-arith-tiny");
    assert_eq!(s.health()["slots_idle"], 2);

    let (code, r) = s.post("/v1/chat/completions", &ask("What is 2 + 3?"));
    assert_eq!(code, 200, "{r}");
    let message = &r["choices"][0]["message"];
    assert_eq!(message["content"], "The answer is 5.", "{r}");
    assert!(
        message["reasoning_content"].as_str().unwrap().contains("2 + 3 = 5"),
        "{r}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["object"], "chat.completion");
    let u = &r["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let reasoning = u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap();
    assert!(
        reasoning > 0 && reasoning < u["completion_tokens"].as_u64().unwrap(),
        "{u}"
    );

    // Streamed: the same text in deltas, a usage chunk, then [DONE].
    let mut req = ask("What is 2 + 3?");
    req["stream"] = true.into();
    req["stream_options"] = json!({"include_usage": true});
    let (code, body) = s.request("POST", "/v1/chat/completions", req.to_string().as_bytes());
    assert_eq!(code, 200);
    let events = events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| parse(e)).collect();
    let text = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect()
    };
    assert_eq!(text("content"), message["content"].as_str().unwrap());
    assert_eq!(
        text("reasoning_content"),
        message["reasoning_content"].as_str().unwrap()
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], u["completion_tokens"]);
    // The same prompt again found its slot's cache: all but the last prompt token reused.
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        u["prompt_tokens"].as_u64().unwrap() - 1
    );

    // A follow-up repeating the conversation prefills only its new turn.
    let follow = json!({"messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "What is 4 + 4?"},
    ], "max_tokens": 400});
    let (code, r) = s.post("/v1/chat/completions", &follow);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], "The answer is 8.");
    assert!(
        r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0,
        "{r}"
    );

    // max_tokens and stop; a raw completion.
    let mut short = ask("What is 2 + 3?");
    short["max_tokens"] = 3.into();
    let (_, r) = s.post("/v1/chat/completions", &short);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    let mut stopped = ask("What is 2 + 3?");
    stopped["stop"] = json!(["answer"]);
    let (_, r) = s.post("/v1/chat/completions", &stopped);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["message"]["content"], "The ");
    let (code, r) = s.post("/v1/completions", &json!({"prompt": "What is", "max_tokens": 5}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["usage"]["completion_tokens"], 5);
}

#[test]
fn bad_requests_get_openai_errors_and_leave_the_server_working() {
    let s = Server::start(&["--parallel", "1", "--max-context", "64", "--body-limit", "4000"]);
    let good = || {
        let (code, r) = s.post("/v1/chat/completions", &ask("What is 1 + 1?"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], "The answer is 2.");
    };
    let error = |code: u16, body: &str, want: u16, param: Option<&str>, what: &str| {
        let e = parse(body);
        assert_eq!(code, want, "{what}: {e}");
        let m = e["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no message in {e}"));
        assert!(!m.is_empty() && e["error"]["type"].is_string(), "{what}: {e}");
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{what}: {e}");
        }
        good();
    };
    let raw = |body: &[u8]| s.request("POST", "/v1/chat/completions", body);

    let (c, b) = raw(b"{\"messages\": [");
    error(c, &b, 400, None, "malformed JSON");
    let (c, b) = raw(json!({"messages": "hi"}).to_string().as_bytes());
    error(c, &b, 400, Some("messages"), "messages not an array");
    let mut r = ask("hi");
    r["temperature"] = "hot".into();
    let (c, b) = raw(r.to_string().as_bytes());
    error(c, &b, 400, Some("temperature"), "temperature not a number");
    r["temperature"] = 1.into();
    r["top_p"] = 3.into();
    let (c, b) = raw(r.to_string().as_bytes());
    error(c, &b, 400, Some("top_p"), "top_p out of range");
    let mut r = ask("hi");
    r["messages"][0]["role"] = "robot".into();
    let (c, b) = raw(r.to_string().as_bytes());
    error(c, &b, 400, Some("messages[0].role"), "unknown role");
    let mut r = ask("hi");
    r["model"] = "gpt-4o".into();
    let (c, b) = raw(r.to_string().as_bytes());
    error(c, &b, 404, Some("model"), "unknown model");
    let (c, b) = raw(ask(&"1 + 1 ".repeat(40)).to_string().as_bytes());
    error(c, &b, 400, Some("messages"), "prompt over the context");
    assert!(b.contains("context_length_exceeded"), "{b}");
    let (c, b) = raw(ask(&"x".repeat(5000)).to_string().as_bytes());
    error(c, &b, 413, None, "body over the limit");
    let (c, b) = s.request("GET", "/v2/nothing", b"");
    error(c, &b, 404, None, "unknown route");
    assert_eq!(s.health()["slots_idle"], 1);
}

#[test]
fn a_full_queue_is_refused_and_a_client_that_leaves_frees_its_place() {
    let s = Server::start(&["--parallel", "1", "--queue", "1"]);
    let long = "What is 987654321987654321 + 123456789123456789?";
    // A long streamed answer holds the only slot.
    let mut req = ask(long);
    req["stream"] = true.into();
    let mut held = s.send("POST", "/v1/chat/completions", req.to_string().as_bytes());
    let mut first = [0u8; 256];
    let n = held.read(&mut first).expect("the stream starts");
    assert!(
        String::from_utf8_lossy(&first[..n]).contains("200"),
        "the stream started"
    );
    assert_eq!(s.health()["slots_processing"], 1);
    // The next request waits in the queue's one place; the one after is refused with Retry-After.
    let queued = s.send(
        "POST",
        "/v1/chat/completions",
        ask("What is 1 + 1?").to_string().as_bytes(),
    );
    let until = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let h = s.health();
            if done(&h) {
                return h;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{what}: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until("the second request queued", &|h| h["requests_waiting"] == 1);
    let (code, body) = s.request(
        "POST",
        "/v1/chat/completions",
        ask("What is 1 + 1?").to_string().as_bytes(),
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(parse(&body)["error"]["code"], "server_busy");
    // A queued client that leaves gives its place back at once.
    drop(queued);
    until("the queued client's place freed", &|h| h["requests_waiting"] == 0);
    // The streaming client leaves: its generation stops and the slot is free again.
    drop(held);
    let h = s.idle(Duration::from_secs(30));
    assert_eq!(h["slots_idle"], 1, "{h}");
    assert_eq!(h["requests_cancelled"], 1, "{h}");
    let (code, r) = s.post("/v1/chat/completions", &ask("What is 1 + 1?"));
    assert_eq!(code, 200, "{r}");
}

/// The server process's resident memory, in bytes (Linux).
fn resident(s: &Server) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The assistant message of a streamed answer, folded from its chunks.
fn streamed_message(s: &Server, question: &str) -> Value {
    let mut req = ask(question);
    req["stream"] = true.into();
    let (_, body) = s.request("POST", "/v1/chat/completions", req.to_string().as_bytes());
    let chunks: Vec<Value> = events(&body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| parse(e))
        .collect();
    let text = |f: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][f].as_str())
            .collect()
    };
    json!({"role": "assistant", "content": text("content"), "reasoning_content": text("reasoning_content")})
}

#[test]
fn concurrent_requests_answer_as_they_do_alone() {
    let s = Server::start(&["--parallel", "4", "--queue", "96"]);
    let questions: Vec<String> = (0..16)
        .map(|i| format!("What is {} + {}?", 10 + i * 7, 3 + i))
        .collect();
    let alone: Vec<Value> = questions
        .iter()
        .map(|q| s.post("/v1/chat/completions", &ask(q)).1["choices"][0]["message"].clone())
        .collect();
    // 64 requests at once over four slots (the rest wait in the queue), streamed and not, and 16 clients
    // that leave after the first bytes; twice, so that the second round shows whether memory grows.
    let round = || -> Vec<Value> {
        std::thread::scope(|scope| {
            let leavers: Vec<_> = (0..16)
                .map(|i| {
                    let s = &s;
                    scope.spawn(move || {
                        let mut req = ask(&format!("What is {} + 999999999?", 100000 + i));
                        req["stream"] = true.into();
                        let mut c = s.send("POST", "/v1/chat/completions", req.to_string().as_bytes());
                        let _ = c.read(&mut [0u8; 64]);
                    })
                })
                .collect();
            let handles: Vec<_> = (0..64)
                .map(|i| {
                    let (s, q) = (&s, &questions[i % questions.len()]);
                    scope.spawn(move || {
                        if i % 2 == 0 {
                            s.post("/v1/chat/completions", &ask(q)).1["choices"][0]["message"].clone()
                        } else {
                            streamed_message(s, q)
                        }
                    })
                })
                .collect();
            for l in leavers {
                l.join().unwrap();
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let mut memory = Vec::new();
    for _ in 0..2 {
        let together = round();
        for (i, b) in together.iter().enumerate() {
            let (q, a) = (&questions[i % questions.len()], &alone[i % questions.len()]);
            assert_eq!(a["content"], b["content"], "{q}: {a} vs {b}");
            assert_eq!(a["reasoning_content"], b["reasoning_content"], "{q}");
        }
        let h = s.idle(Duration::from_secs(60));
        assert_eq!(h["slots_idle"], 4, "{h}");
        assert_eq!(h["requests_waiting"], 0, "{h}");
        memory.extend(resident(&s));
    }
    if let [first, second] = memory[..] {
        eprintln!("resident memory after the first round {first} bytes, after the second {second}");
        assert!(
            second <= first + first / 20 + (8 << 20),
            "memory grew from {first} to {second} bytes over 80 more requests"
        );
    }
}
