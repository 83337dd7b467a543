//! The arithmetic task of moela's embedded default model: problems, worked solutions in R1's format, and the
//! rule-based grading used by training rewards and by `moela eval`.
//!
//! A solution is a `<think>` block that works column by column (ones, tens, hundreds, ...) with carries or
//! borrows, keeping the digits found "so far", then a short answer sentence ending in the number:
//!
//! ```text
//! <think>
//! 457 + 389
//! ones: 7 + 9 = 16, write 6 carry 1, so far 6
//! tens: 5 + 8 + 1 = 14, write 4 carry 1, so far 46
//! hundreds: 4 + 3 + 1 = 8, write 8, so far 846
//! 457 + 389 = 846
//! </think>
//!
//! The answer is 846.
//! ```
//!
//! Word problems chain two or three such operations. Everything is generated from a seed, so training data
//! and the held-out evaluation sets are reproducible, and evaluation problems are kept out of training.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// `+` or `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Op {
    /// Addition.
    Add,
    /// Subtraction.
    Sub,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Add => "+",
            Op::Sub => "-",
        }
    }

    fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
        }
    }
}

/// One problem: the user's question and the chain of operations that answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The question as the user asks it.
    pub question: String,
    /// The starting number.
    pub start: i64,
    /// The operations applied in order.
    pub steps: Vec<(Op, i64)>,
}

impl Problem {
    /// The exact answer.
    pub fn answer(&self) -> i64 {
        self.steps.iter().fold(self.start, |acc, &(op, b)| op.apply(acc, b))
    }

    /// The worked solution: the text of the `<think>` block (without the tags).
    pub fn reasoning(&self) -> String {
        let mut out = String::new();
        if self.steps.len() > 1 {
            out.push_str(&format!("start with {}", self.start));
            for &(op, b) in &self.steps {
                let verb = if op == Op::Add { "add" } else { "subtract" };
                out.push_str(&format!(", {verb} {b}"));
            }
            out.push('\n');
        }
        let mut acc = self.start;
        for &(op, b) in &self.steps {
            work(&mut out, acc, op, b);
            acc = op.apply(acc, b);
        }
        out
    }

    /// The answer sentence after `</think>`.
    pub fn answer_sentence(&self) -> String {
        format!("The answer is {}.", self.answer())
    }

    /// The whole assistant turn as generated after the chat template's `<think>\n`.
    pub fn completion(&self) -> String {
        format!("{}</think>\n\n{}", self.reasoning(), self.answer_sentence())
    }
}

/// Writes one operation's column work, ending with the line `a op b = r`.
fn work(out: &mut String, a: i64, op: Op, b: i64) {
    let s = op.symbol();
    out.push_str(&format!("{a} {s} {b}\n"));
    match op {
        Op::Add => columns_add(out, a, b),
        Op::Sub if a >= b => columns_sub(out, a, b),
        Op::Sub => {
            out.push_str(&format!("{a} < {b}, so {a} - {b} = -({b} - {a})\n{b} - {a}\n"));
            columns_sub(out, b, a);
        }
    }
    out.push_str(&format!("{a} {s} {b} = {}\n", op.apply(a, b)));
}

const COLUMNS: [&str; 7] = [
    "ones",
    "tens",
    "hundreds",
    "thousands",
    "ten thousands",
    "hundred thousands",
    "millions",
];

fn digits(n: i64) -> Vec<i64> {
    n.to_string().bytes().rev().map(|d| i64::from(d - b'0')).collect()
}

fn column(i: usize) -> &'static str {
    COLUMNS.get(i).copied().unwrap_or("next")
}

fn columns_add(out: &mut String, a: i64, b: i64) {
    let (da, db) = (digits(a), digits(b));
    let n = da.len().max(db.len());
    let mut carry = 0;
    let mut so_far = String::new();
    for i in 0..n {
        let (x, y) = (da.get(i).copied().unwrap_or(0), db.get(i).copied().unwrap_or(0));
        let sum = x + y + carry;
        let lhs = if carry > 0 {
            format!("{x} + {y} + {carry}")
        } else {
            format!("{x} + {y}")
        };
        carry = sum / 10;
        so_far.insert(0, char::from(b'0' + (sum % 10) as u8));
        let write = if carry > 0 {
            format!("write {} carry 1", sum % 10)
        } else {
            format!("write {}", sum % 10)
        };
        out.push_str(&format!("{}: {lhs} = {sum}, {write}, so far {so_far}\n", column(i)));
    }
    if carry > 0 {
        so_far.insert(0, '1');
        out.push_str(&format!("{}: carry 1, so far {so_far}\n", column(n)));
    }
}

fn columns_sub(out: &mut String, a: i64, b: i64) {
    let (da, db) = (digits(a), digits(b));
    let mut borrow = 0;
    let mut so_far = String::new();
    for (i, &x) in da.iter().enumerate() {
        let y = db.get(i).copied().unwrap_or(0);
        let diff = x - y - borrow;
        let lhs = if borrow > 0 {
            format!("{x} - {y} - {borrow}")
        } else {
            format!("{x} - {y}")
        };
        let (digit, text) = if diff < 0 {
            (
                diff + 10,
                format!("{diff} + 10 = {}, write {} borrow 1", diff + 10, diff + 10),
            )
        } else {
            (diff, format!("{diff}, write {diff}"))
        };
        borrow = i64::from(diff < 0);
        so_far.insert(0, char::from(b'0' + digit as u8));
        out.push_str(&format!("{}: {lhs} = {text}, so far {so_far}\n", column(i)));
    }
    // Leading zeros are dropped on a line of their own, so the result is copied, never edited in place.
    let trimmed = so_far.trim_start_matches('0');
    if trimmed.len() < so_far.len() {
        let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
        out.push_str(&format!("without leading zeros {so_far} is {trimmed}\n"));
    }
}

/// The kinds of problem the generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Kind {
    /// `a + b`, both with up to `digits` digits.
    Add {
        /// Digits of the largest operand.
        digits: u32,
    },
    /// `a - b`, both with up to `digits` digits (the result may be negative).
    Sub {
        /// Digits of the largest operand.
        digits: u32,
    },
    /// A two- or three-step word problem with numbers up to 3 digits.
    Word,
}

const ADD_FORMS: &[&str] = &[
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Calculate {a} + {b}.",
    "{a} + {b} = ?",
    "{a}+{b}",
    "What is the sum of {a} and {b}?",
];
const SUB_FORMS: &[&str] = &[
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "Calculate {a} - {b}.",
    "{a} - {b} = ?",
    "{a}-{b}",
    "What is {b} subtracted from {a}?",
];

/// Word problem templates: text with `{a}`, `{b}`, `{c}` and the operations after `a`.
const WORD: &[(&str, &[Op])] = &[
    (
        "Ana has {a} stickers. She gets {b} more and then gives {c} to a friend. How many stickers does Ana have now?",
        &[Op::Add, Op::Sub],
    ),
    (
        "A shop had {a} apples. It sold {b} in the morning and {c} in the afternoon. How many apples are left?",
        &[Op::Sub, Op::Sub],
    ),
    (
        "A train carries {a} people. At the first stop {b} get off and {c} get on. How many people are on the train now?",
        &[Op::Sub, Op::Add],
    ),
    (
        "Tom read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. How many pages did he read in total?",
        &[Op::Add, Op::Add],
    ),
    (
        "A farm has {a} sheep. {b} lambs are born and {c} sheep are sold. How many sheep does the farm have now?",
        &[Op::Add, Op::Sub],
    ),
    (
        "A library had {a} books. It bought {b} new books, lent out {c} and got {d} back. How many books are in the library now?",
        &[Op::Add, Op::Sub, Op::Add],
    ),
    (
        "Mia saved {a} coins. She spent {b} coins, found {c} more and spent {d} again. How many coins does Mia have?",
        &[Op::Sub, Op::Add, Op::Sub],
    ),
    (
        "A bus had {a} seats filled. {b} people left and {c} people got on. How many seats are filled now?",
        &[Op::Sub, Op::Add],
    ),
];

/// A number with exactly `d` digits (1..=`d` digits when `any_length`).
fn number(rng: &mut ChaCha8Rng, d: u32, any_length: bool) -> i64 {
    let d = if any_length { rng.random_range(1..=d) } else { d };
    let lo = if d == 1 { 0 } else { 10i64.pow(d - 1) };
    rng.random_range(lo..10i64.pow(d))
}

/// The problem `a op b`, asked in one of the question forms drawn from `rng`.
pub fn binary(a: i64, op: Op, b: i64, rng: &mut ChaCha8Rng) -> Problem {
    let forms = match op {
        Op::Add => ADD_FORMS,
        Op::Sub => SUB_FORMS,
    };
    // The plain "What is a op b?" form is the most common, as users ask it.
    let form = if rng.random_bool(0.5) {
        forms[0]
    } else {
        forms[rng.random_range(0..forms.len())]
    };
    Problem {
        question: form.replace("{a}", &a.to_string()).replace("{b}", &b.to_string()),
        start: a,
        steps: vec![(op, b)],
    }
}

/// Makes one problem of `kind`. With `any_length`, operands have 1..=digits digits (training mix); else
/// exactly `digits` digits (the evaluation splits).
pub fn make(kind: Kind, rng: &mut ChaCha8Rng, any_length: bool) -> Problem {
    match kind {
        Kind::Add { digits } | Kind::Sub { digits } => {
            let (a, b) = (number(rng, digits, any_length), number(rng, digits, any_length));
            let op = if matches!(kind, Kind::Add { .. }) {
                Op::Add
            } else {
                Op::Sub
            };
            binary(a, op, b, rng)
        }
        Kind::Word => loop {
            let (text, ops) = WORD[rng.random_range(0..WORD.len())];
            let start = number(rng, 3, true).max(1);
            let steps: Vec<(Op, i64)> = ops.iter().map(|&op| (op, number(rng, 3, true).max(1))).collect();
            let p = Problem {
                question: String::new(),
                start,
                steps,
            };
            // Every intermediate count stays a count: never below zero.
            let mut acc = p.start;
            let ok = p.steps.iter().all(|&(op, b)| {
                acc = op.apply(acc, b);
                acc >= 0
            });
            if !ok {
                continue;
            }
            let mut q = text.replace("{a}", &p.start.to_string());
            for (slot, (_, b)) in ["{b}", "{c}", "{d}"].iter().zip(&p.steps) {
                q = q.replace(slot, &b.to_string());
            }
            break Problem { question: q, ..p };
        },
    }
}

/// A held-out evaluation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Name in reports.
    pub name: &'static str,
    /// What it holds.
    pub kind: Kind,
}

/// The evaluation splits, in report order. 4-digit addition is never trained on.
pub const SPLITS: &[Split] = &[
    Split {
        name: "add_3digit",
        kind: Kind::Add { digits: 3 },
    },
    Split {
        name: "sub_3digit",
        kind: Kind::Sub { digits: 3 },
    },
    Split {
        name: "word_problems",
        kind: Kind::Word,
    },
    Split {
        name: "add_4digit",
        kind: Kind::Add { digits: 4 },
    },
];

/// The seed of the evaluation sets; training draws from other seeds and skips these problems.
pub const EVAL_SEED: u64 = 0x5EED_E7A1;

/// The first `n` held-out problems of a split, in the plain "What is a op b?" form for the arithmetic splits.
pub fn eval_set(split: &Split, n: usize) -> Vec<Problem> {
    // The first n of one fixed sequence per split, so a smaller set is a prefix of a larger one.
    let salt = split
        .name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = ChaCha8Rng::seed_from_u64(EVAL_SEED ^ salt);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut p = make(split.kind, &mut rng, false);
        if let (Kind::Add { .. } | Kind::Sub { .. }, [(op, b)]) = (split.kind, p.steps.as_slice()) {
            p.question = format!("What is {} {} {}?", p.start, op.symbol(), b);
        }
        if seen.insert(key(&p)) {
            out.push(p);
        }
    }
    out
}

/// Identifies a problem by its numbers and operations (not its wording).
pub fn key(p: &Problem) -> (i64, Vec<(Op, i64)>) {
    (p.start, p.steps.clone())
}

/// The keys of every evaluation problem (`per_split` of each), which training must not use.
pub fn held_out_keys(per_split: usize) -> HashSet<(i64, Vec<(Op, i64)>)> {
    SPLITS
        .iter()
        .flat_map(|s| eval_set(s, per_split))
        .map(|p| key(&p))
        .collect()
}

/// How a generated answer looks to the grader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Graded {
    /// One `<think>` block, closed, with text after it.
    pub well_formed: bool,
    /// The number the answer ends with, if any.
    pub answer: Option<i64>,
    /// `answer` equals the exact result.
    pub correct: bool,
}

/// Grades a completion: `reasoning` is what came inside `<think>` (the template opens it), `content` what
/// came after `</think>`. `closed` says whether `</think>` was produced.
pub fn grade(problem: &Problem, reasoning: &str, content: &str, closed: bool) -> Graded {
    let well_formed = closed
        && !reasoning.trim().is_empty()
        && !reasoning.contains("<think>")
        && !reasoning.contains("</think>")
        && !content.contains("<think>")
        && !content.contains("</think>")
        && final_number(content).is_some();
    let answer = final_number(content);
    Graded {
        well_formed,
        answer,
        correct: answer == Some(problem.answer()),
    }
}

/// The last integer in `text`, if the text ends with it (an optional final `.` allowed).
pub fn final_number(text: &str) -> Option<i64> {
    let t = text.trim_end();
    let t = t.strip_suffix('.').unwrap_or(t);
    let digits_start = t
        .char_indices()
        .rev()
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let digits = &t[digits_start..];
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    Some(if t[..digits_start].ends_with('-') { -n } else { n })
}

/// Splits a raw completion (decoded with special tokens, after the template's `<think>\n`) and grades it.
///
/// Well-formed means: exactly one `</think>`, no further `<think>`, the end-of-sentence token at the end
/// (`stopped`), and an answer ending in a number.
pub fn grade_raw(problem: &Problem, raw: &str, eos: &str, stopped: bool) -> Graded {
    let text = raw.strip_suffix(eos).unwrap_or(raw);
    match text.split_once("</think>") {
        Some((reasoning, content)) => {
            let mut g = grade(problem, reasoning, content, true);
            g.well_formed &= stopped && !content.contains(eos) && !reasoning.contains(eos);
            g
        }
        None => Graded {
            well_formed: false,
            answer: None,
            correct: false,
        },
    }
}

/// Results on one split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    /// Split name.
    pub split: String,
    /// Problems asked.
    pub problems: usize,
    /// Exact answers.
    pub correct: usize,
    /// `correct / problems`.
    pub accuracy: f64,
    /// Well-formed completions (one think block, answer after it, stopped).
    pub well_formed: usize,
    /// `well_formed / problems`.
    pub format_compliance: f64,
    /// Up to three wrong answers, for a look.
    pub wrong_examples: Vec<WrongExample>,
}

/// A problem the model got wrong.
#[derive(Debug, Clone, Serialize)]
pub struct WrongExample {
    /// The question.
    pub question: String,
    /// The exact answer.
    pub expected: i64,
    /// The number the model gave, if any.
    pub got: Option<i64>,
}

/// An evaluation: greedy decoding on every split.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per split, in [`SPLITS`] order.
    pub splits: Vec<SplitReport>,
    /// Tokens generated in all.
    pub generated_tokens: usize,
    /// Wall time.
    pub seconds: f64,
}

impl Report {
    /// A split's report by name.
    pub fn split(&self, name: &str) -> Option<&SplitReport> {
        self.splits.iter().find(|s| s.split == name)
    }
}

/// Asks `question` in a fresh conversation on `session`: the generated ids, and whether the model ended with
/// its end-of-sentence token.
#[cfg(not(target_arch = "wasm32"))]
pub fn ask(
    session: &mut moela::Session,
    question: &str,
    options: moela::GenerateOptions,
) -> moela::Result<(Vec<u32>, bool)> {
    session.reset();
    let mut generation = session.chat(&[moela::Message::user(question)], options)?;
    let mut stopped = false;
    while let Some(ev) = generation.next_blocking() {
        if let moela::Event::Done(stats) = ev? {
            stopped = stats.finish_reason == moela::FinishReason::Eos;
        }
    }
    Ok((generation.generated().to_vec(), stopped))
}

/// Evaluates `engine` with greedy decoding on the first `per_split` problems of each held-out split.
/// `progress(split, done, total)` is called after every problem.
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate(
    engine: &std::sync::Arc<moela::Engine>,
    per_split: usize,
    max_tokens: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> moela::Result<Report> {
    use moela::{GenerateOptions, SessionOptions};
    let start = web_time::Instant::now();
    let tok = engine.require_tokenizer()?;
    let eos = tok.eos_token().unwrap_or("").to_string();
    let mut session = engine.session(SessionOptions {
        max_context: engine.config().max_position_embeddings.min(1024),
    })?;
    let mut generated_tokens = 0;
    let mut splits = Vec::new();
    for split in SPLITS {
        let problems = eval_set(split, per_split);
        let mut report = SplitReport {
            split: split.name.to_string(),
            problems: problems.len(),
            correct: 0,
            accuracy: 0.0,
            well_formed: 0,
            format_compliance: 0.0,
            wrong_examples: Vec::new(),
        };
        for (i, p) in problems.iter().enumerate() {
            let options = GenerateOptions {
                max_tokens,
                ..GenerateOptions::default()
            };
            let (ids, stopped) = ask(&mut session, &p.question, options)?;
            generated_tokens += ids.len();
            let raw = tok.decode(&ids, false)?;
            let g = grade_raw(p, &raw, &eos, stopped);
            report.correct += usize::from(g.correct);
            report.well_formed += usize::from(g.well_formed);
            if !g.correct && report.wrong_examples.len() < 3 {
                report.wrong_examples.push(WrongExample {
                    question: p.question.clone(),
                    expected: p.answer(),
                    got: g.answer,
                });
            }
            progress(split.name, i + 1, problems.len());
        }
        let n = report.problems.max(1) as f64;
        report.accuracy = report.correct as f64 / n;
        report.format_compliance = report.well_formed as f64 / n;
        splits.push(report);
    }
    Ok(Report {
        splits,
        generated_tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(a: i64, op: Op, b: i64) -> Problem {
        Problem {
            question: String::new(),
            start: a,
            steps: vec![(op, b)],
        }
    }

    #[test]
    fn addition_works_column_by_column() {
        let p = single(457, Op::Add, 389);
        assert_eq!(
            p.reasoning(),
            "457 + 389\nones: 7 + 9 = 16, write 6 carry 1, so far 6\n\
             tens: 5 + 8 + 1 = 14, write 4 carry 1, so far 46\n\
             hundreds: 4 + 3 + 1 = 8, write 8, so far 846\n457 + 389 = 846\n"
        );
        let p = single(957, Op::Add, 48);
        assert!(
            p.reasoning()
                .contains("thousands: carry 1, so far 1005\n957 + 48 = 1005")
        );
    }

    #[test]
    fn subtraction_borrows_and_handles_negative_results() {
        let p = single(457, Op::Sub, 389);
        assert_eq!(
            p.reasoning(),
            "457 - 389\nones: 7 - 9 = -2 + 10 = 8, write 8 borrow 1, so far 8\n\
             tens: 5 - 8 - 1 = -4 + 10 = 6, write 6 borrow 1, so far 68\n\
             hundreds: 4 - 3 - 1 = 0, write 0, so far 068\nwithout leading zeros 068 is 68\n457 - 389 = 68\n"
        );
        let p = single(38, Op::Sub, 457);
        assert_eq!(p.answer(), -419);
        assert!(
            p.reasoning()
                .contains("38 < 457, so 38 - 457 = -(457 - 38)\n457 - 38\n")
        );
        assert!(p.reasoning().ends_with("38 - 457 = -419\n"));
    }

    #[test]
    fn every_generated_solution_reaches_its_answer() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for kind in [Kind::Add { digits: 4 }, Kind::Sub { digits: 3 }, Kind::Word] {
            for _ in 0..300 {
                let p = make(kind, &mut rng, true);
                let r = p.reasoning();
                let last = r.lines().last().unwrap();
                assert!(last.ends_with(&format!("= {}", p.answer())), "{r}");
                let g = grade(&p, &r, &p.answer_sentence(), true);
                assert!(g.correct && g.well_formed, "{g:?}");
            }
        }
    }

    #[test]
    fn word_problems_never_go_negative() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..200 {
            let p = make(Kind::Word, &mut rng, true);
            assert!(p.answer() >= 0 && !p.question.contains('{'), "{p:?}");
            assert!((2..=3).contains(&p.steps.len()));
        }
    }

    #[test]
    fn evaluation_sets_are_fixed_and_distinct() {
        let s = &SPLITS[0];
        let a = eval_set(s, 50);
        assert_eq!(a, eval_set(s, 50));
        assert_eq!(a[..20], eval_set(s, 20)[..]);
        assert!(
            a.iter()
                .all(|p| (100..1000).contains(&p.start) && p.question.starts_with("What is "))
        );
        assert_eq!(held_out_keys(50).len(), 200);
    }

    #[test]
    fn grading_reads_the_final_number() {
        let p = single(5, Op::Sub, 8);
        assert_eq!(final_number("The answer is -3."), Some(-3));
        assert_eq!(final_number("The answer is 12"), Some(12));
        assert_eq!(final_number("no number here."), None);
        assert_eq!(final_number("ï¿½ 12"), Some(12));
        assert_eq!(final_number("7 ï¿½"), None);
        assert!(grade(&p, "work", "The answer is -3.", true).correct);
        let g = grade(&p, "work", "The answer is -3.", false);
        assert!(g.correct && !g.well_formed);
        assert!(!grade(&p, "work", "The answer is 3.", true).correct);
        assert!(!grade(&p, "", "The answer is -3.", true).well_formed);
        let eos = "<eos>";
        assert!(grade_raw(&p, "5 - 8\n</think>\n\nThe answer is -3.<eos>", eos, true).well_formed);
        assert!(!grade_raw(&p, "5 - 8\n</think>\n\nThe answer is -3.", eos, false).well_formed);
        assert!(!grade_raw(&p, "5 - 8 <think></think>\n\nThe answer is -3.<eos>", eos, true).well_formed);
        assert!(!grade_raw(&p, "5 - 8 The answer is -3.<eos>", eos, true).correct);
    }
}
