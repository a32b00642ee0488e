//! A scripted generator for tests: each query picks a list of steps (tokens, a failure, a
//! panic, or silence), so a test can make the model fail exactly where it wants.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use askstream::pipeline::{Chunk, Generator, PipelineError, Prompt, Token, TokenStream};

/// One step of a scripted token stream.
#[derive(Clone)]
pub enum Step {
    Tok(&'static str),
    Fail(PipelineError),
    Panic,
    /// Never yields again (and never wakes): a model that went silent.
    Hang,
}

struct Script(VecDeque<Step>);

impl futures_core::Stream for Script {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Tok(t)) => Poll::Ready(Some(Ok(Chunk::Token(Token::new(t))))),
            Some(Step::Fail(e)) => Poll::Ready(Some(Err(e))),
            Some(Step::Panic) => panic!("the test generator panics on purpose"),
            Some(Step::Hang) => {
                self.0.push_front(Step::Hang);
                Poll::Pending
            }
        }
    }
}

/// A generator whose stream is chosen by the query text.
pub struct ScriptGen(pub fn(&str) -> Vec<Step>);

impl Generator for ScriptGen {
    fn generate(&self, prompt: Prompt) -> TokenStream {
        Box::pin(Script((self.0)(&prompt.query).into()))
    }
}
