//! The default retriever: an in-memory BM25 index over passages.
//!
//! Documents are cut into passages of about a paragraph, because a generator wants the few
//! sentences that answer a question, not a whole file; `done.sources` then points at the
//! passage (`quota.md#3`). Scoring is classic Okapi BM25 with `k1 = 1.2`, `b = 0.75` and
//! the always-positive `ln(1 + (N - n + 0.5) / (n + 0.5))` idf.
//!
//! The scorer and tokenizer are hand-written rather than taken from the `bm25` crate: its
//! value is its default tokenizer (stemmers, stop-word lists, Unicode folding), which adds
//! 26 crates, a proc-macro stack among them, and about 7 s (27%) to a clean debug build and
//! 12 s (29%) to a clean release build of this crate on the 2-vCPU build machine; without
//! that tokenizer it is just the formula below. Ours is deliberately small: Unicode
//! lowercase, split on anything that is not a letter or digit, one term per CJK character
//! (those scripts do not separate words with spaces), a short English stop-word list and
//! light English suffix folding (`refunded` finds `refunds`). A passage's terms include its
//! document's title, weighted, so a paragraph of the quota guide is found for "quota" even
//! when it only says "the limit".
//!
//! Results are deterministic: passages keep corpus order, query terms are scored in a
//! fixed order, and equal scores are ranked by passage order.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::corpus;
pub use super::corpus::Document;
use super::{BoxFuture, Passage, PipelineError, Retriever, StoredPassage};

/// BM25 term-frequency saturation.
const K1: f32 = 1.2;
/// BM25 length normalisation.
const B: f32 = 0.75;
/// How many times a document's title terms count in each of its passages.
const TITLE_WEIGHT: usize = 3;
/// Blocks with fewer words than this (unless they reach [`MIN_PASSAGE_BYTES`]) are merged
/// into the next one: a heading or a one-line lead-in scores badly alone and reads badly as
/// a source. See [`is_tiny`].
const MIN_PASSAGE_WORDS: usize = 12;
/// A block this long is never too short, whatever its word count (CJK text has no spaces).
const MIN_PASSAGE_BYTES: usize = 200;
/// Longer blocks are cut (at whitespace where possible) so one giant paragraph cannot
/// dominate every query or flood the generator's prompt.
const MAX_PASSAGE_BYTES: usize = 2000;

/// An immutable BM25 index over the passages of a set of documents.
pub struct Bm25Index {
    /// Every passage, in corpus order, with `score` 0; hits are cloned (refcount bumps)
    /// with their score filled in.
    passages: Vec<Arc<StoredPassage>>,
    /// Term → row of `postings`.
    terms: HashMap<Box<str>, u32>,
    /// Per term: `(passage, term frequency)`, ascending by passage.
    postings: Vec<Vec<(u32, u32)>>,
    /// Per term: its inverse document frequency. The index never changes, so this and
    /// `norms` are worked out once rather than in every search (a logarithm per query
    /// term, a division per posting).
    idf: Vec<f32>,
    /// Per passage: BM25's length normalisation, `K1 * (1 - B + B * len / avg_len)`, with
    /// `len` its terms (title included, stop words not).
    norms: Vec<f32>,
    /// Mean passage length (at least 1, so an index of empty passages cannot divide by 0).
    avg_len: f32,
}

impl Bm25Index {
    /// Indexes `docs`, in the order given (which becomes the tie-break order).
    pub fn new(docs: Vec<Document>) -> Self {
        let mut index = Bm25Index {
            passages: Vec::new(),
            terms: HashMap::new(),
            postings: Vec::new(),
            idf: Vec::new(),
            norms: Vec::new(),
            avg_len: 1.0,
        };
        let mut doc_terms = Vec::new();
        // Terms per passage, until the mean is known.
        let mut lengths: Vec<u32> = Vec::new();
        for doc in &docs {
            for (n, text) in split_passages(&doc.text).into_iter().enumerate() {
                doc_terms.clear();
                // The title is part of every passage's context: a paragraph of the quota
                // guide is about quotas even when it only says "the limit". It counts
                // TITLE_WEIGHT times, a field boost in the spirit of BM25F.
                for _ in 0..TITLE_WEIGHT {
                    for_each_term(&doc.title, |t| doc_terms.push(t.to_owned()));
                }
                for_each_term(text, |t| doc_terms.push(t.to_owned()));
                lengths.push(u32::try_from(doc_terms.len()).unwrap_or(u32::MAX));
                index.add(doc, n + 1, text, &mut doc_terms);
            }
        }
        let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
        if !lengths.is_empty() {
            index.avg_len = (total as f32 / lengths.len() as f32).max(1.0);
        }
        let avg_len = index.avg_len;
        index.norms = lengths
            .iter()
            .map(|&len| K1 * (1.0 - B + B * len as f32 / avg_len))
            .collect();
        let n = index.passages.len() as f32;
        index.idf = index
            .postings
            .iter()
            .map(|postings| {
                let df = postings.len() as f32;
                (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
            })
            .collect();
        index
    }

    fn add(&mut self, doc: &Document, number: usize, text: &str, terms: &mut [String]) {
        let pid = u32::try_from(self.passages.len()).expect("fewer than 2^32 passages");
        self.passages.push(Arc::new(StoredPassage {
            id: format!("{}#{number}", doc.id).into(),
            title: doc.title.clone(),
            url: doc.url.clone(),
            text: text.into(),
        }));
        // Sorting groups equal terms, so each run is one (term, frequency) posting.
        terms.sort_unstable();
        let mut i = 0;
        while i < terms.len() {
            let run = terms[i..].iter().take_while(|t| **t == terms[i]).count();
            let next_id = u32::try_from(self.postings.len()).expect("fewer than 2^32 terms");
            let id = *self
                .terms
                .entry(terms[i].as_str().into())
                .or_insert(next_id);
            if id == next_id {
                self.postings.push(Vec::new());
            }
            self.postings[id as usize].push((pid, run as u32));
            i += run;
        }
    }

    /// The index over the built-in corpus: eight short documents about askstream itself,
    /// embedded in the binary, so a fresh server answers with zero setup.
    pub fn builtin() -> Self {
        Self::new(corpus::builtin())
    }

    /// The index over the `.md`/`.txt` files under `dir`, subfolders included; a file's id
    /// is its path relative to `dir`. Files over 4 MiB are skipped and invalid UTF-8 is
    /// replaced, each with a warning, rather than failing the whole load.
    ///
    /// # Errors
    /// Any I/O error reading the folder or a file (the message names the path);
    /// [`io::ErrorKind::NotFound`] when no usable file exists, so a typo in the folder
    /// stops the server instead of starting one that knows nothing; and
    /// [`io::ErrorKind::InvalidData`] when the files hold no text at all.
    pub fn from_dir(dir: &Path) -> io::Result<Self> {
        let index = Self::new(corpus::load_dir(dir)?);
        if index.passages() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the documents in {} contain no text to index",
                    dir.display()
                ),
            ));
        }
        Ok(index)
    }

    /// The passages matching `query`, best first, at most `top_k`, each with its score.
    ///
    /// Only passages sharing at least one term with the query (score > 0) are returned, so
    /// a query of unknown words or only stop words yields an empty list.
    pub fn search(&self, query: &str, top_k: usize) -> Vec<Passage> {
        if top_k == 0 {
            return Vec::new();
        }
        let mut query_terms = Vec::new();
        for_each_term(query, |t| {
            if let Some(&id) = self.terms.get(t) {
                query_terms.push(id);
            }
        });
        // A repeated query word counts once; sorting also fixes the summation order.
        query_terms.sort_unstable();
        query_terms.dedup();
        if query_terms.is_empty() {
            return Vec::new();
        }

        let mut scores = vec![0.0f32; self.passages.len()];
        // Room for every passage the terms can hit, so the list never grows.
        let most = query_terms
            .iter()
            .map(|&t| self.postings[t as usize].len())
            .sum::<usize>()
            .min(self.passages.len());
        let mut hits: Vec<u32> = Vec::with_capacity(most);
        for &term in &query_terms {
            let idf = self.idf[term as usize];
            for &(pid, tf) in &self.postings[term as usize] {
                let tf = tf as f32;
                let norm = self.norms[pid as usize];
                let slot = &mut scores[pid as usize];
                if *slot == 0.0 {
                    hits.push(pid);
                }
                // Every contribution is > 0 (idf > 0, tf ≥ 1), so 0 means "not yet hit".
                *slot += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        // Best first, ties by passage order: a total order, so the result is the same
        // however the hits arrived. Only the top k are sorted: a common word hits most
        // of the corpus, and sorting every hit was most of a search's time.
        let best_first = |&a: &u32, &b: &u32| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        };
        if hits.len() > top_k {
            hits.select_nth_unstable_by(top_k - 1, best_first);
            hits.truncate(top_k);
        }
        hits.sort_unstable_by(best_first);
        hits.into_iter()
            .map(|pid| Passage::new(self.passages[pid as usize].clone(), scores[pid as usize]))
            .collect()
    }

    /// How many passages the index holds.
    fn passages(&self) -> usize {
        self.passages.len()
    }
}

impl fmt::Debug for Bm25Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The passages themselves would bury any log line; their counts are what matter.
        f.debug_struct("Bm25Index")
            .field("passages", &self.passages.len())
            .field("terms", &self.terms.len())
            .field("avg_len", &self.avg_len)
            .finish()
    }
}

impl Retriever for Bm25Index {
    fn retrieve<'a>(
        &'a self,
        query: &'a str,
        top_k: usize,
    ) -> BoxFuture<'a, Result<Vec<Passage>, PipelineError>> {
        // Searching memory is fast and never waits, so the future is ready at once.
        Box::pin(std::future::ready(Ok(self.search(query, top_k))))
    }
}

/// Cuts a document into passages: slices of `text`, in order.
///
/// Blocks are separated by blank lines (except inside fenced code, which stays whole).
/// Blocks over [`MAX_PASSAGE_BYTES`] are cut; headings, lead-ins ending in `:` and short
/// blocks (see [`is_tiny`]) are merged with what follows, and a short tail joins the
/// previous passage. Because pieces are contiguous, a merged passage is still one slice of
/// the original text, blank lines included.
fn split_passages(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    for block in blocks(text) {
        cap(text, block, &mut pieces);
    }

    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut pending: Option<(usize, usize)> = None;
    for (start, end) in pieces {
        // Merging may overshoot the cap by half; beyond that the pending run stands alone.
        if pending.is_some_and(|(p_start, _)| end - p_start > MAX_PASSAGE_BYTES * 3 / 2) {
            out.extend(pending.take());
        }
        let (p_start, _) = *pending.get_or_insert((start, end));
        pending = Some((p_start, end));
        if !is_tiny(&text[start..end]) {
            out.extend(pending.take());
        }
    }
    if let Some((start, end)) = pending {
        match out.last_mut() {
            Some(last) if end - last.0 <= MAX_PASSAGE_BYTES * 3 / 2 => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| &text[s..e]).collect()
}

/// Byte ranges of blank-line separated blocks, trimmed to their non-blank lines.
fn blocks(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut in_fence = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
        }
        if trimmed.is_empty() && !in_fence {
            out.extend(current.take());
            continue;
        }
        let end = start + line.trim_end().len();
        match &mut current {
            Some(block) => block.1 = end.max(block.1),
            None => current = Some((start, end)),
        }
    }
    out.extend(current);
    out
}

/// Appends `block` to `out`, cut into pieces of at most [`MAX_PASSAGE_BYTES`], preferring
/// to cut at whitespace in the second half of the window, else at a char boundary.
fn cap(text: &str, (mut start, end): (usize, usize), out: &mut Vec<(usize, usize)>) {
    while end - start > MAX_PASSAGE_BYTES {
        let window = &text[start..end];
        let mut cut = MAX_PASSAGE_BYTES;
        while !window.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(ws) = window[..cut].rfind(char::is_whitespace)
            && ws > MAX_PASSAGE_BYTES / 2
        {
            cut = ws;
        }
        out.push((start, start + window[..cut].trim_end().len()));
        let rest = &window[cut..];
        start += cut + (rest.len() - rest.trim_start().len());
    }
    if start < end {
        out.push((start, end));
    }
}

/// Not a passage on its own: a heading, a block introducing what follows (ends with `:`,
/// like the sentence before a code sample or a list), or a short line. The byte bound keeps
/// text without spaces (CJK), which is one "word" however long, from counting as short.
fn is_tiny(piece: &str) -> bool {
    piece.lines().all(|l| l.trim_start().starts_with('#'))
        || piece.ends_with(':')
        || (piece.len() < MIN_PASSAGE_BYTES && piece.split_whitespace().count() < MIN_PASSAGE_WORDS)
}

/// Calls `f` with every index term of `text`, in order (see the module docs).
fn for_each_term(text: &str, mut f: impl FnMut(&str)) {
    let mut word = String::new();
    for c in text.chars() {
        if is_cjk(c) {
            emit(&mut word, &mut f);
            let mut buf = [0u8; 4];
            f(c.encode_utf8(&mut buf));
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else {
            emit(&mut word, &mut f);
        }
    }
    emit(&mut word, &mut f);
}

/// Hands the finished `word` to `f` unless it is a stop word or a lone ASCII letter, after
/// folding English suffixes; leaves `word` empty.
fn emit(word: &mut String, f: &mut impl FnMut(&str)) {
    if word.is_empty()
        || is_stop_word(word)
        || (word.len() == 1 && word.as_bytes()[0].is_ascii_alphabetic())
    {
        word.clear();
        return;
    }
    fold_suffixes(word);
    f(word);
    word.clear();
}

/// Light English suffix folding, so `quotas`, `refunded`, `streaming` and `cached` meet
/// `quota`, `refund`, `stream` and `cache`: plurals (`proxies` → `proxy`, `classes` →
/// `class`, but not `status` or `analysis`), then `-ed`/`-ing` (undoubling `stopped` →
/// `stop`), then a final `e`. Only all-ASCII-letter words of five letters or more are
/// touched and a stem keeps at least four letters. It is a recall aid, not a stemmer:
/// queries and passages go through the same rules, so an odd stem still matches itself.
fn fold_suffixes(word: &mut String) {
    if word.len() < 5 || !word.bytes().all(|b| b.is_ascii_lowercase()) {
        return;
    }
    if word.ends_with("ies") {
        word.truncate(word.len() - 3);
        word.push('y');
    } else if word.ends_with("sses") {
        word.truncate(word.len() - 2);
    } else if word.ends_with('s')
        && !(word.ends_with("ss") || word.ends_with("us") || word.ends_with("is"))
    {
        word.truncate(word.len() - 1);
    }
    for suffix in ["ing", "ed"] {
        if word.ends_with(suffix) && word.len() - suffix.len() >= 4 {
            word.truncate(word.len() - suffix.len());
            let b = word.as_bytes();
            let (x, y) = (b[b.len() - 2], b[b.len() - 1]);
            if x == y && !matches!(y, b'a' | b'e' | b'i' | b'o' | b'u' | b'l' | b's' | b'z') {
                word.pop();
            }
            break;
        }
    }
    if word.len() >= 5 && word.ends_with('e') {
        word.pop();
    }
}

fn is_stop_word(w: &str) -> bool {
    matches!(
        w,
        "a" | "an"
            | "and"
            | "are"
            | "as"
            | "at"
            | "be"
            | "but"
            | "by"
            | "can"
            | "do"
            | "does"
            | "for"
            | "from"
            | "how"
            | "i"
            | "if"
            | "in"
            | "into"
            | "is"
            | "it"
            | "its"
            | "me"
            | "my"
            | "of"
            | "on"
            | "or"
            | "so"
            | "that"
            | "the"
            | "their"
            | "then"
            | "there"
            | "these"
            | "this"
            | "to"
            | "was"
            | "we"
            | "what"
            | "when"
            | "where"
            | "which"
            | "who"
            | "why"
            | "will"
            | "with"
            | "you"
            | "your"
    )
}

/// Han ideographs and kana: scripts written without spaces, indexed one character per term
/// so a query shares terms with a passage even when their word boundaries differ.
fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'     // Hiragana, Katakana
        | '\u{31F0}'..='\u{31FF}'   // Katakana phonetic extensions
        | '\u{3400}'..='\u{4DBF}'   // CJK Extension A
        | '\u{4E00}'..='\u{9FFF}'   // CJK Unified Ideographs
        | '\u{F900}'..='\u{FAFF}'   // CJK Compatibility Ideographs
        | '\u{20000}'..='\u{3134F}' // CJK Extensions B–G
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::corpus::tests::TempDir;

    fn terms(text: &str) -> Vec<String> {
        let mut v = Vec::new();
        for_each_term(text, |t| v.push(t.to_owned()));
        v
    }

    fn doc(id: &str, text: &str) -> Document {
        Document::parse(id, text)
    }

    #[test]
    fn tokenizer_folds_case_plurals_and_cjk() {
        assert_eq!(
            terms("The Quotas of PROXIES, classes & status: 429s x_y 日本語"),
            [
                "quota", "proxy", "class", "status", "429s", "日", "本", "語"
            ]
        );
        assert_eq!(
            terms("refunded refunds streaming stopped cached cache caching string need"),
            [
                "refund", "refund", "stream", "stop", "cach", "cach", "cach", "string", "need"
            ]
        );
        assert_eq!(terms("naïve Café Ωmega"), ["naïve", "café", "ωmega"]);
        assert!(terms("the of and to").is_empty());
    }

    #[test]
    fn quota_question_finds_the_quota_document_first() {
        let index = Bm25Index::builtin();
        for q in [
            "How do quota refunds work?",
            "quotas",
            "How many asks fit in a quota window?",
        ] {
            let hits = index.search(q, 4);
            assert!(!hits.is_empty(), "{q}");
            assert!(
                hits[0].stored.id.starts_with("quota.md#"),
                "{q}: {:?}",
                hits[0].stored.id
            );
            assert_eq!(&*hits[0].stored.title, "Quotas and exactly-once refunds");
        }
        let hits = index.search("nginx proxy_buffering", 2);
        assert!(
            hits[0].stored.id.starts_with("proxies.md#"),
            "{:?}",
            hits[0].stored.id
        );
        let hits = index.search("日本語", 2);
        assert!(
            hits[0].stored.id.starts_with("i18n.md#"),
            "{:?}",
            hits[0].stored.id
        );
    }

    #[test]
    fn top_k_and_ordering_are_respected() {
        let index = Bm25Index::builtin();
        assert!(index.passages() > 30, "{}", index.passages());
        assert_eq!(index.search("quota", 3).len(), 3);
        assert!(index.search("quota", 0).is_empty());
        let all = index.search("quota stream", 10_000);
        assert!(all.len() > 3 && all.len() <= index.passages());
        assert!(all.iter().all(|p| p.score > 0.0));
        assert!(all.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn the_top_k_are_the_first_k_of_the_whole_ranking() {
        // Only the best k are sorted: they must be exactly the head of the full ranking,
        // ties included, for every k.
        let index = Bm25Index::builtin();
        for q in [
            "How do quota refunds work?",
            "stream the answer",
            "proxy buffering",
        ] {
            let all = index.search(q, 10_000);
            let ids =
                |hits: &[Passage]| hits.iter().map(|p| p.stored.id.clone()).collect::<Vec<_>>();
            for k in 1..=all.len() + 1 {
                let top = index.search(q, k);
                assert_eq!(ids(&top), ids(&all[..k.min(all.len())]), "{q}, k = {k}");
            }
        }
    }

    #[test]
    fn unmatched_queries_return_nothing() {
        let index = Bm25Index::builtin();
        assert!(index.search("zebra xylophone marmalade", 5).is_empty());
        assert!(index.search("the of and", 5).is_empty());
        assert!(index.search("", 5).is_empty());
        assert!(index.search("  ?! ", 5).is_empty());
    }

    #[test]
    fn results_are_deterministic_and_ties_follow_corpus_order() {
        let a = Bm25Index::builtin().search("streaming tokens through a proxy", 8);
        let b = Bm25Index::builtin().search("streaming tokens through a proxy", 8);
        assert_eq!(a, b);

        let same = "Tokens stream to the client one event at a time, in order.";
        let index = Bm25Index::new(vec![
            doc("b.md", same),
            doc("a.md", same),
            doc("c.md", "other words"),
        ]);
        let hits = index.search("event", 5);
        let ids: Vec<_> = hits.iter().map(|p| &*p.stored.id).collect();
        assert_eq!(ids, ["b.md#1", "a.md#1"]);
        assert_eq!(hits[0].score, hits[1].score);
    }

    #[test]
    fn passages_merge_headings_and_keep_fences_whole() {
        let text = "# Title\n\nA first paragraph that is long enough to stand as a passage on its own here.\n\n\
                    ## Setup\n\n```\nline one has several words in it\n\nline two has several more words here\n```\n\n\
                    Short tail.\n";
        let p = split_passages(text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("# Title\n\nA first"));
        assert!(p[1].starts_with("## Setup") && p[1].contains("in it\n\nline two"));
        assert!(
            p[1].ends_with("Short tail."),
            "a short tail joins the previous passage"
        );
    }

    #[test]
    fn long_blocks_are_capped_at_char_boundaries() {
        let long = "ωmega ".repeat(1000); // 7000 bytes, multi-byte
        let p = split_passages(&long);
        assert!(p.len() >= 4);
        assert!(
            p.iter()
                .all(|s| s.len() <= MAX_PASSAGE_BYTES * 3 / 2 && !s.is_empty())
        );
        let words: usize = p.iter().map(|s| s.split_whitespace().count()).sum();
        assert_eq!(words, 1000, "cutting loses no words");
        let cjk = "日".repeat(1000); // no whitespace at all
        let p = split_passages(&cjk);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|s| s.len() <= MAX_PASSAGE_BYTES));
    }

    #[test]
    fn passage_ids_titles_and_urls_come_from_the_document() {
        let index = Bm25Index::new(vec![doc(
            "guide.md",
            "---\ntitle: Guide\nurl: https://example.com/guide\n---\n\
             # Heading\n\nThe first paragraph talks about apples and has enough words in it.\n\n\
             The second paragraph talks about oranges and also has enough words in it.\n",
        )]);
        assert_eq!(index.passages(), 2);
        let hit = &index.search("oranges", 5)[0];
        assert_eq!(&*hit.stored.id, "guide.md#2");
        assert_eq!(&*hit.stored.title, "Guide");
        assert_eq!(hit.stored.url.as_deref(), Some("https://example.com/guide"));
        assert!(hit.stored.text.starts_with("The second"));
    }

    #[test]
    fn from_dir_indexes_a_folder() {
        let tmp = TempDir::new("bm25");
        tmp.write(
            "notes/deploy.md",
            "# Deploying\n\nRun the binary behind nginx with buffering disabled.",
        );
        tmp.write("faq.txt", "Kittens are small cats.");
        let index = Bm25Index::from_dir(&tmp.0).unwrap();
        assert_eq!(index.passages(), 2);
        let hits = index.search("nginx", 3);
        assert_eq!(hits.len(), 1);
        assert_eq!(&*hits[0].stored.id, "notes/deploy.md#1");
        assert_eq!(&*hits[0].stored.title, "Deploying");
        assert_eq!(&*index.search("kitten", 3)[0].stored.id, "faq.txt#1");
    }

    #[test]
    fn from_dir_errors_without_documents_or_text() {
        let tmp = TempDir::new("bm25-empty");
        let err = Bm25Index::from_dir(&tmp.0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        tmp.write("blank.md", "\n\n   \n");
        let err = Bm25Index::from_dir(&tmp.0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn retriever_trait_matches_search() {
        let index = Bm25Index::builtin();
        let r: &dyn Retriever = &index;
        let got = r.retrieve("heartbeat keep-alive", 3).await.unwrap();
        assert_eq!(got, index.search("heartbeat keep-alive", 3));
        assert!(!got.is_empty());
    }
}
