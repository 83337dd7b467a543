//! Streaming text: token ids -> UTF-8-safe pieces -> reasoning / content events -> stop strings.
//!
//! - [`StreamDecoder`] turns token ids, fed one at a time, into text pieces that never split a character
//!   (a byte-level BPE token can hold part of a multi-byte character).
//! - [`ThinkSplitter`] turns `<think>...</think>` into [`TextEvent::Reasoning`] / [`TextEvent::Content`],
//!   even when a tag arrives split across pieces.
//! - [`StopMatcher`] cuts the stream at the first stop string, holding back what could be the start of one.

use crate::chat::Tokenizer;
use crate::error::Result;

/// DeepSeek-R1's reasoning open tag.
pub const THINK_OPEN: &str = "<think>";
/// DeepSeek-R1's reasoning close tag.
pub const THINK_CLOSE: &str = "</think>";

/// Tokens held back at most this many steps; after that their text is emitted (with U+FFFD for an incomplete
/// character), so invalid byte sequences or long runs of skipped special tokens cannot stall the stream or
/// grow the decode window.
const MAX_HELD_TOKENS: usize = 8;

/// Incremental detokenizer: feed token ids one at a time, get text pieces that never split a UTF-8 character.
///
/// It decodes a short window of ids: the ids since the previous emission (the *pending* ids) plus the ids of
/// the previous emission as context (so decoders that treat a leading space specially, like SentencePiece's
/// Metaspace, give the right text). A piece is emitted once the decoded window has grown and does not end
/// with U+FFFD (an incomplete character). The window is kept short, so each step costs O(piece), not
/// O(generated text).
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    skip_special: bool,
    /// Context ids (already emitted) followed by pending ids.
    window: Vec<u32>,
    /// How many of `window` are context.
    context: usize,
}

impl StreamDecoder {
    /// A decoder that drops special tokens (BOS, EOS, ...) when `skip_special` is true. DeepSeek-R1's
    /// `<think>` / `</think>` are not special tokens and are kept either way.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            window: Vec::new(),
            context: 0,
        }
    }

    /// Feeds one token id; returns the text it completes, or `None` while a character is incomplete (or the
    /// token decodes to nothing, like a skipped special token).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.window.push(id);
        let before = tokenizer.decode(&self.window[..self.context], self.skip_special)?;
        let after = tokenizer.decode(&self.window, self.skip_special)?;
        let held = self.window.len() - self.context;
        let complete = after.len() > before.len() && !after.ends_with('\u{FFFD}');
        if !complete && held < MAX_HELD_TOKENS {
            return Ok(None);
        }
        let piece = new_suffix(&before, &after);
        // The pending ids become the context of the next piece.
        self.window.drain(..self.context);
        self.context = self.window.len();
        Ok((!piece.is_empty()).then(|| piece.to_owned()))
    }

    /// Emits whatever is still held back (an incomplete character comes out as U+FFFD) and resets the
    /// decoder. Call at the end of generation.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let before = tokenizer.decode(&self.window[..self.context], self.skip_special)?;
        let after = tokenizer.decode(&self.window, self.skip_special)?;
        self.reset();
        let piece = new_suffix(&before, &after);
        Ok((!piece.is_empty()).then(|| piece.to_owned()))
    }

    /// Forgets all state (a new generation).
    pub fn reset(&mut self) {
        self.window.clear();
        self.context = 0;
    }
}

/// The part of `after` that is new relative to `before`. Decoders normally only append, so `before` is a
/// prefix; if a decoder rewrote earlier text, the text past `before`'s length is taken, at a char boundary.
fn new_suffix<'a>(before: &str, after: &'a str) -> &'a str {
    if let Some(rest) = after.strip_prefix(before) {
        return rest;
    }
    let mut cut = before.len().min(after.len());
    while !after.is_char_boundary(cut) {
        cut += 1;
    }
    &after[cut..]
}

/// A piece of generated text, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextEvent {
    /// Text inside `<think>...</think>` (the tags themselves are not included).
    Reasoning(String),
    /// The answer: text outside the reasoning block.
    Content(String),
}

/// Splits streamed text into reasoning and content at the think tags.
///
/// Rules:
/// - At most one reasoning block. Before it, the open tag starts reasoning; inside it, the first close tag
///   ends it (an open tag inside is plain reasoning text); after it, everything is content, tags included.
/// - When starting in reasoning, an open tag the model writes anyway (before any other text) is dropped.
/// - The tags are not emitted. The first newline right after the open tag (and at the start, when starting
///   in reasoning) is dropped, and so is all whitespace right after the close tag (R1 writes `</think>\n\n`).
/// - A possible tag prefix at the end of a push (`<thi`) is held back until the next push shows whether it
///   is a tag; [`finish`](Self::finish) releases it as text.
/// - Events are never empty; one push merges consecutive text of the same kind.
/// - An empty tag disables splitting on it.
#[derive(Debug, Clone)]
pub struct ThinkSplitter {
    open: String,
    close: String,
    state: ThinkState,
    /// Text held back: a possible prefix of the tag being looked for.
    held: String,
    /// Drop one leading `\n` of the next reasoning text.
    trim_newline: bool,
    /// Drop the leading whitespace of the next content text.
    trim_whitespace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThinkState {
    /// No reasoning block seen yet: looking for the open tag.
    BeforeReasoning,
    /// The prompt opened the reasoning block and no text came yet: a repeated open tag is dropped.
    OpenedByPrompt,
    /// Inside the reasoning block: looking for the close tag.
    Reasoning,
    /// The reasoning block is closed: everything is content.
    AfterReasoning,
}

impl ThinkSplitter {
    /// A splitter for `open_tag` / `close_tag`. `starts_in_reasoning` is for prompts that already opened the
    /// block (see [`crate::chat::prompt_opens_think`]).
    pub fn new(open_tag: &str, close_tag: &str, starts_in_reasoning: bool) -> Self {
        Self {
            open: open_tag.to_owned(),
            close: close_tag.to_owned(),
            state: if starts_in_reasoning {
                ThinkState::OpenedByPrompt
            } else {
                ThinkState::BeforeReasoning
            },
            held: String::new(),
            trim_newline: starts_in_reasoning,
            trim_whitespace: false,
        }
    }

    /// A splitter for DeepSeek-R1's [`THINK_OPEN`] / [`THINK_CLOSE`].
    pub fn deepseek(starts_in_reasoning: bool) -> Self {
        Self::new(THINK_OPEN, THINK_CLOSE, starts_in_reasoning)
    }

    /// True while inside the reasoning block.
    pub fn in_reasoning(&self) -> bool {
        matches!(self.state, ThinkState::OpenedByPrompt | ThinkState::Reasoning)
    }

    /// Feeds a piece of streamed text; returns the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<TextEvent> {
        let mut events = Vec::new();
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        let mut rest = buf.as_str();
        loop {
            if self.state == ThinkState::OpenedByPrompt {
                let trimmed = rest.trim_start();
                if let Some(after) = trimmed
                    .strip_prefix(self.open.as_str())
                    .filter(|_| !self.open.is_empty())
                {
                    rest = after;
                } else if !self.open.is_empty() && self.open.starts_with(trimmed) {
                    // Only whitespace and a possible start of the open tag so far: wait.
                    self.held = rest.to_owned();
                    break;
                }
                self.state = ThinkState::Reasoning;
            }
            let tag = match self.state {
                ThinkState::BeforeReasoning => self.open.as_str(),
                ThinkState::Reasoning | ThinkState::OpenedByPrompt => self.close.as_str(),
                ThinkState::AfterReasoning => "",
            };
            // An empty tag (after the block, or disabled) never matches and holds nothing back.
            let found = (!tag.is_empty())
                .then(|| rest.find(tag).map(|at| (at, at + tag.len())))
                .flatten();
            let Some((at, end)) = found else {
                let keep = partial_suffix_len(rest, tag);
                let (now, later) = rest.split_at(rest.len() - keep);
                self.emit(&mut events, now);
                self.held = later.to_owned();
                break;
            };
            self.emit(&mut events, &rest[..at]);
            rest = &rest[end..];
            if self.state == ThinkState::BeforeReasoning {
                self.state = ThinkState::Reasoning;
                self.trim_newline = true;
            } else {
                self.state = ThinkState::AfterReasoning;
                self.trim_newline = false;
                self.trim_whitespace = true;
            }
        }
        events
    }

    /// Ends the stream: releases held-back text (a tag prefix that never completed) as text.
    pub fn finish(&mut self) -> Vec<TextEvent> {
        let held = std::mem::take(&mut self.held);
        let mut events = Vec::new();
        self.emit(&mut events, &held);
        events
    }

    /// Appends `text` as an event of the current kind, after the whitespace rules; merges with the last event
    /// when it has the same kind.
    fn emit(&mut self, events: &mut Vec<TextEvent>, mut text: &str) {
        let reasoning = self.in_reasoning();
        if reasoning && self.trim_newline && !text.is_empty() {
            text = text.strip_prefix('\n').unwrap_or(text);
            self.trim_newline = false;
        }
        if !reasoning && self.trim_whitespace {
            text = text.trim_start();
            if !text.is_empty() {
                self.trim_whitespace = false;
            }
        }
        if text.is_empty() {
            return;
        }
        match (events.last_mut(), reasoning) {
            (Some(TextEvent::Reasoning(last)), true) | (Some(TextEvent::Content(last)), false) => last.push_str(text),
            (_, true) => events.push(TextEvent::Reasoning(text.to_owned())),
            (_, false) => events.push(TextEvent::Content(text.to_owned())),
        }
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `pattern` (0 if none).
fn partial_suffix_len(text: &str, pattern: &str) -> usize {
    let longest = text.len().min(pattern.len().saturating_sub(1));
    (1..=longest)
        .rev()
        .find(|&k| pattern.is_char_boundary(k) && text.ends_with(&pattern[..k]))
        .unwrap_or(0)
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text safe to emit now (possibly empty).
    pub text: String,
    /// The stop string that was hit, if any. Generation should end; `text` is everything before it, and the
    /// stop string itself is not emitted.
    pub stop: Option<String>,
}

/// Stops a text stream at the first of several stop strings, which may arrive split across pieces.
///
/// Text that could be the start of a stop string is held back until the next push decides. After a stop,
/// further pushes emit nothing. Empty stop strings are ignored.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        Self {
            stops: stops
                .iter()
                .map(|s| s.as_ref().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// True once a stop string has been hit.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds a piece of text; returns what is safe to emit and whether a stop string was hit. When several
    /// stop strings are complete, the one that starts first wins (the longest, at the same position).
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput::default();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| buf.find(s.as_str()).map(|at| (at, s)))
            .min_by(|(a, s), (b, t)| a.cmp(b).then(t.len().cmp(&s.len())));
        if let Some((at, stop)) = first {
            let stop = stop.clone();
            buf.truncate(at);
            self.stopped = true;
            return StopOutput {
                text: buf,
                stop: Some(stop),
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix_len(&buf, s))
            .max()
            .unwrap_or(0);
        self.held = buf.split_off(buf.len() - keep);
        StopOutput { text: buf, stop: None }
    }

    /// Ends the stream: returns the held-back text (it turned out not to be a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::tests::r1_tokenizer;

    fn reasoning(s: &str) -> TextEvent {
        TextEvent::Reasoning(s.into())
    }

    fn content(s: &str) -> TextEvent {
        TextEvent::Content(s.into())
    }

    /// Feeds `pieces` and `finish`, then merges adjacent events of the same kind.
    fn split(splitter: &mut ThinkSplitter, pieces: &[&str]) -> Vec<TextEvent> {
        let mut all = Vec::new();
        for p in pieces {
            let events = splitter.push(p);
            assert!(
                events
                    .iter()
                    .all(|e| !matches!(e, TextEvent::Reasoning(s) | TextEvent::Content(s) if s.is_empty()))
            );
            all.extend(events);
        }
        all.extend(splitter.finish());
        merge(all)
    }

    /// Merges adjacent events of the same kind.
    fn merge(events: Vec<TextEvent>) -> Vec<TextEvent> {
        let mut merged: Vec<TextEvent> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(TextEvent::Reasoning(a)), TextEvent::Reasoning(b)) => a.push_str(&b),
                (Some(TextEvent::Content(a)), TextEvent::Content(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    /// Every split of `text` into two pieces, and into three around each boundary pair, at char boundaries.
    fn splits(text: &str) -> Vec<Vec<&str>> {
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        let mut out = vec![vec![text]];
        for &i in &cuts {
            out.push(vec![&text[..i], &text[i..]]);
            for &j in cuts.iter().filter(|&&j| j >= i) {
                out.push(vec![&text[..i], &text[i..j], &text[j..]]);
            }
        }
        out
    }

    /// Feeds the text one char at a time.
    fn per_char(text: &str) -> Vec<String> {
        text.chars().map(String::from).collect()
    }

    #[test]
    fn splits_reasoning_and_content_at_every_boundary() {
        let text = "<think>\nI think é中🙂 <thin and </thi>.\n</think>\n\nAnswer: 中🙂é <think>x</think>";
        let expected = vec![
            reasoning("I think é中🙂 <thin and </thi>.\n"),
            content("Answer: 中🙂é <think>x</think>"),
        ];
        for pieces in splits(text) {
            let mut s = ThinkSplitter::deepseek(false);
            assert_eq!(split(&mut s, &pieces), expected, "pieces {pieces:?}");
            assert!(!s.in_reasoning());
        }
        let chars = per_char(text);
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(&mut ThinkSplitter::deepseek(false), &pieces), expected);
    }

    #[test]
    fn starts_in_reasoning_when_the_prompt_opened_think() {
        let text = "Let me see: 🙂 < 3 and <b>.</think>\n\nIt is 4.";
        let expected = vec![reasoning("Let me see: 🙂 < 3 and <b>."), content("It is 4.")];
        for pieces in splits(text) {
            let mut s = ThinkSplitter::deepseek(true);
            assert!(s.in_reasoning());
            assert_eq!(split(&mut s, &pieces), expected, "pieces {pieces:?}");
        }
        // The leading newline of reasoning is dropped when starting inside the block too.
        let mut s = ThinkSplitter::deepseek(true);
        assert_eq!(
            split(&mut s, &["\n", "\nx</think>y"]),
            vec![reasoning("\nx"), content("y")]
        );
    }

    #[test]
    fn a_repeated_open_tag_after_the_prompt_opened_one_is_dropped() {
        let text = " <think>\nRe é🙂 <think></think>\n\nC";
        for pieces in splits(text) {
            let mut s = ThinkSplitter::deepseek(true);
            assert_eq!(
                split(&mut s, &pieces),
                vec![reasoning("Re é🙂 <think>"), content("C")],
                "pieces {pieces:?}"
            );
        }
        let mut s = ThinkSplitter::deepseek(true);
        assert_eq!(split(&mut s, &["<thin", "king"]), vec![reasoning("<thinking")]);
        let mut s = ThinkSplitter::deepseek(true);
        assert_eq!(s.push("\n<th"), vec![]);
        assert!(s.in_reasoning());
        assert_eq!(s.finish(), vec![reasoning("<th")]);
        let mut s = ThinkSplitter::deepseek(true);
        assert_eq!(split(&mut s, &["</think>x"]), vec![content("x")]);
    }

    #[test]
    fn text_before_the_open_tag_is_content() {
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(
            split(&mut s, &["Hi <th", "ink>a", "</think>", "b"]),
            vec![content("Hi "), reasoning("a"), content("b")]
        );
    }

    #[test]
    fn absent_tags_are_all_content_and_unclosed_reasoning_stays_reasoning() {
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(
            split(&mut s, &["plain ", "<thin", "king> text <"]),
            vec![content("plain <thinking> text <")]
        );
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(
            split(&mut s, &["<think>", "still thinking <", "/thi"]),
            vec![reasoning("still thinking </thi")]
        );
        assert!(s.in_reasoning());
    }

    #[test]
    fn nested_open_tag_is_reasoning_text() {
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(
            split(&mut s, &["<think>a<think>b</think>c</think>d"]),
            vec![reasoning("a<think>b"), content("c</think>d")]
        );
    }

    #[test]
    fn a_held_prefix_is_released_when_it_is_not_a_tag() {
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(s.push("a <thin"), vec![content("a ")]);
        assert_eq!(s.push("g"), vec![content("<thing")]);
        let mut s = ThinkSplitter::deepseek(true);
        assert_eq!(s.push("x</"), vec![reasoning("x")]);
        assert_eq!(s.push("b>"), vec![reasoning("</b>")]);
        assert_eq!(s.push("</think>"), vec![]);
        assert!(!s.in_reasoning());
        // Whitespace after the close tag is dropped across pushes, until real content arrives.
        assert_eq!(s.push("\n"), vec![]);
        assert_eq!(s.push(" \n"), vec![]);
        assert_eq!(s.push(" ok "), vec![content("ok ")]);
        assert_eq!(s.push("\n"), vec![content("\n")]);
        assert_eq!(s.finish(), vec![]);
    }

    #[test]
    fn one_push_merges_and_orders_events() {
        let mut s = ThinkSplitter::deepseek(false);
        assert_eq!(
            s.push("pre<think>\nr1\nr2</think>\n\nc1 c2"),
            vec![content("pre"), reasoning("r1\nr2"), content("c1 c2")]
        );
    }

    #[test]
    fn empty_tags_disable_splitting() {
        let mut s = ThinkSplitter::new("", "", false);
        assert_eq!(split(&mut s, &["<think>a</think>"]), vec![content("<think>a</think>")]);
        let mut s = ThinkSplitter::new("", "", true);
        assert_eq!(split(&mut s, &["a", "b"]), vec![reasoning("ab")]);
    }

    #[test]
    fn custom_multibyte_tags() {
        let text = "«思»é🙂«/思»\n中";
        for pieces in splits(text) {
            let mut s = ThinkSplitter::new("«思»", "«/思»", false);
            assert_eq!(
                split(&mut s, &pieces),
                vec![reasoning("é🙂"), content("中")],
                "{pieces:?}"
            );
        }
    }

    fn stop_all(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.stop.is_some() {
                return (out, o.stop);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_strings_split_across_pieces() {
        let text = "Answer: 中🙂 done.\n\nUser: more";
        for pieces in splits(text) {
            let mut m = StopMatcher::new(&["\n\nUser:", "🙂 never"]);
            let (out, stop) = stop_all(&mut m, &pieces);
            assert_eq!(out, "Answer: 中🙂 done.", "{pieces:?}");
            assert_eq!(stop.as_deref(), Some("\n\nUser:"));
            assert!(m.stopped());
            assert_eq!(m.push("more"), StopOutput::default());
        }
    }

    #[test]
    fn stop_matcher_holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(&["STOP", ""]);
        assert_eq!(m.push("abc ST").text, "abc ");
        assert_eq!(m.push("O").text, "");
        assert_eq!(
            m.push("P!"),
            StopOutput {
                text: String::new(),
                stop: Some("STOP".into())
            }
        );
        let mut m = StopMatcher::new(&["STOP"]);
        assert_eq!(m.push("ST").text, "");
        assert_eq!(m.push("AR").text, "STAR");
        assert_eq!(m.push("xS").text, "x");
        assert_eq!(m.finish(), "S");
        // Owned stop strings, as in generation options.
        let owned: Vec<String> = vec!["\n\n".into()];
        assert_eq!(StopMatcher::new(&owned).push("a\n\nb").text, "a");
        // No stop strings: everything passes through.
        let mut m = StopMatcher::new::<&str>(&[]);
        assert_eq!(m.push("a").text, "a");
        // The earliest stop wins, then the longest at the same place.
        let mut m = StopMatcher::new(&["cd", "bcx", "b"]);
        assert_eq!(m.push("abcd").stop.as_deref(), Some("b"));
        let mut m = StopMatcher::new(&["ab", "abc"]);
        assert_eq!(
            m.push("xabc"),
            StopOutput {
                text: "x".into(),
                stop: Some("abc".into())
            }
        );
    }

    /// Decodes `ids` one at a time and returns the pieces, flushed at the end.
    fn stream(ids: &[u32], skip_special: bool) -> Vec<String> {
        let tok = r1_tokenizer();
        let mut dec = StreamDecoder::new(skip_special);
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(p) = dec.push(&tok, id).expect("decodes") {
                pieces.push(p);
            }
        }
        pieces.extend(dec.flush(&tok).expect("decodes"));
        pieces
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let tok = r1_tokenizer();
        let text = "<think>\né中🙂</think>\n\nhi 中é🙂!";
        let ids = tok.encode(text, false).expect("encodes");
        // The test vocabulary makes 中 two tokens and 🙂 three, so characters really are split across tokens.
        assert_eq!(tok.encode("中🙂", false).expect("encodes").len(), 5);
        let pieces = stream(&ids, true);
        assert!(
            pieces.iter().all(|p| !p.is_empty() && !p.contains('\u{FFFD}')),
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), text);
        assert!(
            pieces.contains(&"中".to_owned()) && pieces.contains(&"🙂".to_owned()),
            "{pieces:?}"
        );
    }

    #[test]
    fn stream_decoder_special_tokens_shown_or_skipped() {
        let tok = r1_tokenizer();
        let text = "<｜begin▁of▁sentence｜>a🙂<｜end▁of▁sentence｜>";
        let ids = tok.encode(text, false).expect("encodes");
        assert_eq!(stream(&ids, false).concat(), text);
        assert_eq!(stream(&ids, true).concat(), "a🙂");
    }

    #[test]
    fn stream_decoder_flushes_incomplete_characters() {
        let tok = r1_tokenizer();
        // The first two bytes of 🙂 (F0 9F) and nothing more.
        let pieces = stream(&[0xF0, 0x9F], true);
        assert_eq!(pieces, vec!["\u{FFFD}".to_owned()]);
        // Garbage bytes cannot stall the stream forever.
        let mut dec = StreamDecoder::new(true);
        let mut out = Vec::new();
        for _ in 0..MAX_HELD_TOKENS {
            out.extend(dec.push(&tok, 0x80).expect("decodes"));
        }
        assert_eq!(out.len(), 1);
        // Skipped special tokens do not grow the window without bound.
        let mut dec = StreamDecoder::new(true);
        for _ in 0..3 * MAX_HELD_TOKENS {
            assert_eq!(dec.push(&tok, 259).expect("decodes"), None);
        }
        assert!(dec.window.len() <= MAX_HELD_TOKENS);
        assert_eq!(dec.push(&tok, u32::from(b'z')).expect("decodes").as_deref(), Some("z"));
        // Unknown ids decode to nothing rather than failing.
        assert_eq!(stream(&[u32::MAX, u32::from(b'a')], true), vec!["a".to_owned()]);
    }

    #[test]
    fn decoder_splitter_and_stop_matcher_together() {
        let tok = r1_tokenizer();
        let generated = "é reasoning 中</think>\n\nThe answer is 🙂.<｜end▁of▁sentence｜>";
        let ids = tok.encode(generated, false).expect("encodes");
        let mut dec = StreamDecoder::new(true);
        let mut splitter = ThinkSplitter::deepseek(true);
        let mut stop = StopMatcher::new(&[" is"]);
        let mut events = Vec::new();
        for &id in &ids {
            let Some(piece) = dec.push(&tok, id).expect("decodes") else {
                continue;
            };
            for e in splitter.push(&piece) {
                match e {
                    TextEvent::Content(c) => {
                        let o = stop.push(&c);
                        if !o.text.is_empty() {
                            events.push(content(&o.text));
                        }
                    }
                    r => events.push(r),
                }
            }
        }
        events.extend(splitter.finish());
        let text: String = merge(events)
            .iter()
            .map(|e| match e {
                TextEvent::Reasoning(r) => format!("R[{r}]"),
                TextEvent::Content(c) => format!("C[{c}]"),
            })
            .collect();
        assert!(stop.stopped());
        assert!(text.starts_with("R[é"), "{text}");
        assert!(text.ends_with("C[The answer]"), "{text}");
    }
}
