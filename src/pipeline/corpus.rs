//! Documents and where they come from: the built-in corpus or a folder of files.
//!
//! A [`Document`] is a whole file with its title and optional address; splitting it into
//! passages is the index's job ([`super::bm25`]), because how to cut text depends on how
//! it is searched.
//!
//! The built-in corpus is the server's own user guide (the files in `corpus/`), compiled
//! into the binary so a fresh server answers useful questions with zero setup. One of its
//! documents is deliberately full of non-ASCII text so multi-byte answers get exercised.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files larger than this are skipped by [`load_dir`]: a corpus is prose, and one stray
/// log dump or data file should not balloon the index held in memory.
pub(crate) const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One source document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Stable identifier: the file name (for a folder, the path relative to the folder,
    /// with `/` separators), e.g. `quota.md`. Passage ids are built from it.
    pub id: Arc<str>,
    /// Human title, shown in `done.sources`.
    pub title: Arc<str>,
    /// Where a reader can open the document, from front matter; reported with sources.
    pub url: Option<Arc<str>>,
    /// The body, without the front matter block.
    pub text: Arc<str>,
}

impl Document {
    /// Parses a file's contents.
    ///
    /// An optional front matter block at the very top (`---` line, `key: value` lines,
    /// `---` line) may set `title` and `url`; other keys are ignored, and values may be
    /// quoted. Without a front matter title, the title is the first `# ` heading outside
    /// code fences, else the file name without its extension.
    pub fn parse(id: &str, raw: &str) -> Document {
        let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
        let (meta, body) = split_front_matter(raw);
        let mut title = None;
        let mut url = None;
        for line in meta.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = unquote(value.trim());
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "title" => title = Some(value),
                "url" => url = Some(value),
                _ => {}
            }
        }
        let title = title
            .or_else(|| first_heading(body))
            .unwrap_or_else(|| file_stem(id));
        Document {
            id: id.into(),
            title: title.into(),
            url: url.map(Into::into),
            text: body.into(),
        }
    }
}

/// Splits `---\n…\n---\n` off the top. An unterminated block is not front matter: the
/// whole file is body, so a document that merely starts with a rule loses nothing.
fn split_front_matter(raw: &str) -> (&str, &str) {
    let Some(rest) = raw
        .strip_prefix("---\n")
        .or_else(|| raw.strip_prefix("---\r\n"))
    else {
        return ("", raw);
    };
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return (&rest[..offset], &rest[offset + line.len()..]);
        }
        offset += line.len();
    }
    ("", raw)
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner.trim();
        }
    }
    v
}

/// The first level-one ATX heading, skipping fenced code (a `# comment` in a shell
/// snippet is not a title).
fn first_heading(body: &str) -> Option<&str> {
    let mut in_fence = false;
    for line in body.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        if let Some(h) = t.strip_prefix("# ") {
            let h = h.trim().trim_end_matches('#').trim_end();
            if !h.is_empty() {
                return Some(h);
            }
        }
    }
    None
}

fn file_stem(id: &str) -> &str {
    let name = id.rsplit('/').next().unwrap_or(id);
    match name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => name,
    }
}

/// The built-in corpus: the server's user guide, compiled in. Always in the same order.
pub(crate) fn builtin() -> Vec<Document> {
    const FILES: [(&str, &str); 8] = [
        ("overview.md", include_str!("corpus/overview.md")),
        ("quick-start.md", include_str!("corpus/quick-start.md")),
        ("quota.md", include_str!("corpus/quota.md")),
        ("proxies.md", include_str!("corpus/proxies.md")),
        ("errors.md", include_str!("corpus/errors.md")),
        ("load-testing.md", include_str!("corpus/load-testing.md")),
        (
            "browser-client.md",
            include_str!("corpus/browser-client.md"),
        ),
        ("i18n.md", include_str!("corpus/i18n.md")),
    ];
    FILES
        .iter()
        .map(|(id, raw)| Document::parse(id, raw))
        .collect()
}

/// Loads every `.md` and `.txt` file (extension case-insensitive) under `dir`, recursively.
///
/// Recursive because documentation folders are usually nested; a document's id is its path
/// relative to `dir` with `/` separators, which keeps ids unique and the same on every OS.
/// Files are read in sorted path order so ids, passage order and therefore answers are
/// deterministic. Hidden entries (`.git`, editor swap files) and symlinked folders (which
/// could form cycles) are skipped; symlinked files are followed. Files over
/// [`MAX_FILE_BYTES`] are skipped with a warning; invalid UTF-8 is replaced (with a
/// warning) rather than failing the whole load.
///
/// # Errors
/// Any I/O error reading the folder or a file (the message names the path), and
/// [`io::ErrorKind::NotFound`] when no usable file exists, so a typo in `--docs` stops the
/// server instead of starting one that knows nothing.
pub(crate) fn load_dir(dir: &Path) -> io::Result<Vec<Document>> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();

    let mut docs = Vec::with_capacity(files.len());
    for path in files {
        let len = fs::metadata(&path).map_err(|e| with_path(&path, e))?.len();
        if len > MAX_FILE_BYTES {
            tracing::warn!(
                path = %path.display(),
                bytes = len,
                limit = MAX_FILE_BYTES,
                "skipping document: file too large"
            );
            continue;
        }
        let bytes = fs::read(&path).map_err(|e| with_path(&path, e))?;
        let raw = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), "document is not valid UTF-8; replacing invalid bytes");
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
        docs.push(Document::parse(&relative_id(dir, &path), &raw));
    }
    if docs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no .md or .txt documents (of at most {} MiB) in {}",
                MAX_FILE_BYTES >> 20,
                dir.display()
            ),
        ));
    }
    Ok(docs)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| with_path(dir, e))? {
        let entry = entry.map_err(|e| with_path(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| with_path(&path, e))?;
        if ty.is_dir() {
            collect(&path, out)?;
        } else if (ty.is_file() || (ty.is_symlink() && path.is_file())) && is_document(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_document(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("md") || e.eq_ignore_ascii_case("txt"))
}

fn relative_id(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    let parts: Vec<_> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    parts.join("/")
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A unique, self-deleting folder under the system temp dir (no tempfile dependency).
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = std::env::temp_dir().join(format!(
                "askstream-{tag}-{}-{n}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        pub(crate) fn write(&self, rel: &str, contents: impl AsRef<[u8]>) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, contents).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn front_matter_sets_title_and_url() {
        let d = Document::parse(
            "a.md",
            "---\ntitle: \"Proxies: a guide\"\nurl: https://example.com/p\nauthor: x\n---\n# Ignored\n\nBody.\n",
        );
        assert_eq!(&*d.title, "Proxies: a guide");
        assert_eq!(d.url.as_deref(), Some("https://example.com/p"));
        assert_eq!(&*d.text, "# Ignored\n\nBody.\n");
        assert_eq!(&*d.id, "a.md");
    }

    #[test]
    fn title_falls_back_to_heading_then_file_name() {
        let d = Document::parse("x.md", "```sh\n# not this\n```\n\n# Real title #\n\ntext");
        assert_eq!(&*d.title, "Real title");
        assert_eq!(d.url, None);
        let d = Document::parse("notes/plain.txt", "no heading here\n## only level two\n");
        assert_eq!(&*d.title, "plain");
        // Front matter without a title still lets the heading win over the file name.
        let d = Document::parse("y.md", "---\nurl: u\n---\n# Heading\n");
        assert_eq!((&*d.title, d.url.as_deref()), ("Heading", Some("u")));
    }

    #[test]
    fn unterminated_front_matter_is_body() {
        let raw = "---\ntitle: nope\n\nJust text after a rule.\n";
        let d = Document::parse("r.md", raw);
        assert_eq!(&*d.text, raw);
        assert_eq!(&*d.title, "r");
    }

    #[test]
    fn builtin_corpus_is_substantial() {
        let docs = builtin();
        assert!((6..=8).contains(&docs.len()));
        for d in &docs {
            let words = d.text.split_whitespace().count();
            assert!((300..=800).contains(&words), "{} has {words} words", d.id);
            assert!(!d.title.is_empty() && !d.title.contains('#'), "{}", d.title);
        }
        assert!(
            docs.iter()
                .any(|d| d.text.contains("日本語") && d.text.contains("naïve café"))
        );
    }

    #[test]
    fn load_dir_reads_sorted_recursive_documents() {
        let tmp = TempDir::new("load");
        tmp.write("b.md", "# Bee\n\nbuzz");
        tmp.write("a.txt", "plain text");
        tmp.write("sub/c.MD", "---\ntitle: Sea\n---\nwaves");
        tmp.write("ignored.json", "{}");
        tmp.write(".hidden/d.md", "secret");
        tmp.write("bad.md", b"caf\xe9 ok".as_slice());
        let docs = load_dir(&tmp.0).unwrap();
        let ids: Vec<_> = docs.iter().map(|d| &*d.id).collect();
        assert_eq!(ids, ["a.txt", "b.md", "bad.md", "sub/c.MD"]);
        assert_eq!(&*docs[1].title, "Bee");
        assert_eq!(&*docs[2].text, "caf\u{fffd} ok");
        assert_eq!(&*docs[3].title, "Sea");
    }

    #[test]
    fn load_dir_skips_huge_files() {
        let tmp = TempDir::new("huge");
        tmp.write("big.txt", vec![b'a'; MAX_FILE_BYTES as usize + 1]);
        tmp.write("small.md", "fine");
        let docs = load_dir(&tmp.0).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(&*docs[0].id, "small.md");
    }

    #[test]
    fn load_dir_without_documents_is_an_error() {
        let tmp = TempDir::new("empty");
        tmp.write("readme.rst", "not markdown");
        let err = load_dir(&tmp.0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no .md or .txt"), "{err}");

        let missing = tmp.0.join("does-not-exist");
        let err = load_dir(&missing).unwrap_err();
        assert!(err.to_string().contains("does-not-exist"), "{err}");
    }
}
