//! A scripted generator for tests: each query picks a list of steps (tokens, a failure, a
//! panic, or silence), so a test can make the model fail exactly where it wants.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use askstream::pipeline::{Chunk, Generator, PipelineError, Prompt, Token, TokenStream};

/// One step of a scripted token stream.
#[derive(Clone)]
pub enum Step {
    Tok(&'static str),
    Fail(PipelineError),
    Panic,
    /// Never yields again (and never wakes): a model that went silent.
    Hang,
    /// Yields nothing for this long (a tokio timer), then goes on.
    Pause(Duration),
}

struct Script {
    steps: VecDeque<Step>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl futures_core::Stream for Script {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            return match self.steps.pop_front() {
                None => Poll::Ready(None),
                Some(Step::Tok(t)) => Poll::Ready(Some(Ok(Chunk::Token(Token::new(t))))),
                Some(Step::Fail(e)) => Poll::Ready(Some(Err(e))),
                Some(Step::Panic) => panic!("the test generator panics on purpose"),
                Some(Step::Hang) => {
                    self.steps.push_front(Step::Hang);
                    Poll::Pending
                }
                Some(Step::Pause(d)) => {
                    self.pause = Some(Box::pin(tokio::time::sleep(d)));
                    continue;
                }
            };
        }
    }
}

/// A generator whose stream is chosen by the query text.
pub struct ScriptGen(pub fn(&str) -> Vec<Step>);

impl Generator for ScriptGen {
    fn generate(&self, prompt: Prompt) -> TokenStream {
        Box::pin(Script {
            steps: (self.0)(&prompt.query).into(),
            pause: None,
        })
    }
}

/// A generator whose every answer is the token `one`, then, once the gate is open, `two`:
/// a test holds answers mid-stream for exactly as long as it needs, then lets them finish.
pub struct GateGen(pub tokio_util::sync::CancellationToken);

impl Generator for GateGen {
    fn generate(&self, _prompt: Prompt) -> TokenStream {
        Box::pin(Gated {
            sent: 0,
            gate: Box::pin(self.0.clone().cancelled_owned()),
        })
    }
}

struct Gated {
    sent: u8,
    gate: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl futures_core::Stream for Gated {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let token = match self.sent {
            0 => "one",
            1 => {
                ready!(self.gate.as_mut().poll(cx));
                "two"
            }
            _ => return Poll::Ready(None),
        };
        self.sent += 1;
        Poll::Ready(Some(Ok(Chunk::Token(Token::new(token)))))
    }
}
