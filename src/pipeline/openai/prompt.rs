//! What the model is told: the chat messages built from the retrieved sources and the
//! question. [`PromptTemplate`] is the default; [`PromptBuilder`] is the way to replace it.

use std::borrow::Cow;
use std::fmt::Write;

use serde::Serialize;

use crate::pipeline::{Passage, Prompt};

/// Who says a [`ChatMessage`], as the chat-completions API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions and context the model should follow.
    System,
    /// The person asking.
    User,
    /// The model itself (for few-shot examples in a custom template).
    Assistant,
}

/// One message of a chat-completions request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who says it.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Turns a [`Prompt`] (question and retrieved passages) into the messages sent upstream.
///
/// Called once per ask, on the server's worker thread, before the upstream request is
/// made; it should be quick and must not block.
///
/// Any `Fn(&Prompt) -> Vec<ChatMessage>` is a `PromptBuilder`:
///
/// ```
/// use askstream::pipeline::openai::{ChatMessage, PromptBuilder, PromptTemplate};
///
/// let pirate = |p: &askstream::pipeline::Prompt| {
///     vec![
///         ChatMessage::system(format!(
///             "Answer like a pirate, from these sources only.\n\n{}",
///             PromptTemplate::sources(&p.passages)
///         )),
///         ChatMessage::user(p.query.to_string()),
///     ]
/// };
/// fn takes_builder(_: impl PromptBuilder) {}
/// takes_builder(pirate);
/// ```
pub trait PromptBuilder: Send + Sync + 'static {
    /// The messages for `prompt`, in order.
    fn messages(&self, prompt: &Prompt) -> Vec<ChatMessage>;
}

impl<F> PromptBuilder for F
where
    F: Fn(&Prompt) -> Vec<ChatMessage> + Send + Sync + 'static,
{
    fn messages(&self, prompt: &Prompt) -> Vec<ChatMessage> {
        self(prompt)
    }
}

/// The default prompt: two messages,
///
/// - a **system** message: the instructions, then the sources, numbered from 1 in rank
///   order, each as `[n] <title> (<id>)` followed by its text on the next lines;
/// - a **user** message: the question, as the user typed it (trimmed).
///
/// ```text
/// system: Answer the question using only the sources below. Cite sources as [n], …
///
///         Sources:
///
///         [1] Quotas and exactly-once refunds (quota.md#2)
///         An ask costs 1. …
///
///         [2] …
/// user:   How do quota refunds work?
/// ```
///
/// Numbering the sources lets the model cite them as `[n]`, and the numbers follow the
/// order of `done.sources`, so a client can turn `[2]` into a link to the second source.
///
/// To change only the instructions, use [`with_instructions`](Self::with_instructions). To
/// change everything, implement [`PromptBuilder`] (any `Fn(&Prompt) -> Vec<ChatMessage>`
/// already does) and pass it to
/// [`OpenAiGenerator::with_template`](super::OpenAiGenerator::with_template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate {
    instructions: Cow<'static, str>,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate {
            instructions: Cow::Borrowed(Self::DEFAULT_INSTRUCTIONS),
        }
    }
}

impl PromptTemplate {
    /// The instructions that open the default system message.
    pub const DEFAULT_INSTRUCTIONS: &'static str = "Answer the question using only the sources below. \
Cite sources as [n], where n is the number of the source you used. \
If the sources do not contain the answer, say that you do not know.";

    /// What the sources section says when the retriever found nothing.
    pub const NO_SOURCES: &'static str = "(no sources were found for this question)";

    /// The default template.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same layout with other instructions before the sources.
    pub fn with_instructions(mut self, instructions: impl Into<Cow<'static, str>>) -> Self {
        self.instructions = instructions.into();
        self
    }

    /// The instructions in use.
    pub fn instructions(&self) -> &str {
        &self.instructions
    }

    /// The numbered sources block: `[n] <title> (<id>)`, then the passage text, blank lines
    /// between sources; [`NO_SOURCES`](Self::NO_SOURCES) when there are none. Public so a
    /// custom [`PromptBuilder`] can keep the numbering that `done.sources` follows.
    pub fn sources(passages: &[Passage]) -> String {
        if passages.is_empty() {
            return Self::NO_SOURCES.to_owned();
        }
        let len = passages
            .iter()
            .map(|p| p.stored.title.len() + p.stored.id.len() + p.stored.text.len() + 16)
            .sum();
        let mut out = String::with_capacity(len);
        for (i, p) in passages.iter().map(|p| &p.stored).enumerate() {
            if i > 0 {
                out.push_str("\n\n");
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "[{}] {} ({})\n{}", i + 1, p.title, p.id, p.text.trim());
        }
        out
    }
}

impl PromptBuilder for PromptTemplate {
    fn messages(&self, prompt: &Prompt) -> Vec<ChatMessage> {
        let system = format!(
            "{}\n\nSources:\n\n{}",
            self.instructions,
            Self::sources(&prompt.passages)
        );
        vec![
            ChatMessage::system(system),
            ChatMessage::user(prompt.query.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::StoredPassage;

    fn passage(id: &str, title: &str, text: &str) -> Passage {
        Passage::new(StoredPassage::new(id, title, text), 1.0)
    }

    #[test]
    fn default_template_numbers_the_sources_in_rank_order() {
        let prompt = Prompt {
            query: "How are refunds made?".into(),
            passages: vec![
                passage("quota.md#2", "Quotas", "An ask costs 1.\n"),
                passage("errors.md#1", "Errors", "Codes are stable."),
            ]
            .into(),
        };
        let m = PromptTemplate::default().messages(&prompt);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, Role::System);
        assert_eq!(
            m[0].content,
            format!(
                "{}\n\nSources:\n\n[1] Quotas (quota.md#2)\nAn ask costs 1.\n\n\
                 [2] Errors (errors.md#1)\nCodes are stable.",
                PromptTemplate::DEFAULT_INSTRUCTIONS
            )
        );
        assert_eq!(m[1], ChatMessage::user("How are refunds made?"));
    }

    #[test]
    fn no_sources_say_so_and_instructions_can_change() {
        let prompt = Prompt {
            query: "q".into(),
            passages: Vec::new().into(),
        };
        let m = PromptTemplate::new()
            .with_instructions("Be brief.")
            .messages(&prompt);
        assert_eq!(
            m[0].content,
            format!("Be brief.\n\nSources:\n\n{}", PromptTemplate::NO_SOURCES)
        );
    }

    #[test]
    fn messages_serialize_as_the_api_expects() {
        let json = serde_json::to_string(&ChatMessage::assistant("hi")).unwrap();
        assert_eq!(json, r#"{"role":"assistant","content":"hi"}"#);
    }
}
