//! The composition root: the one place that knows every concrete piece and wires them
//! into an [`AskService`].
//!
//! Anything not handed to the [`Builder`] comes from the [`ServiceConfig`]: the keys file
//! or open mode, BM25 over a folder or over the built-in corpus, the generator the config
//! names, an in-memory quota map. Nothing else in the crate names a concrete retriever,
//! generator or store, so replacing one is a change here and nowhere else.

use std::path::PathBuf;
use std::sync::Arc;

use crate::answer::Pipeline;
use crate::auth::{Auth, KeysError};
use crate::config::{GeneratorConfig, InvalidConfig, QuotaStoreConfig, ServiceConfig};
use crate::pipeline::bm25::Bm25Index;
use crate::pipeline::openai::{self, OpenAiGenerator};
use crate::pipeline::sim::SimGenerator;
use crate::pipeline::{Generator, Retriever};
use crate::quota::{QuotaMap, QuotaStore};
use crate::service::AskService;
use crate::shutdown::Shutdown;

/// Builds an [`AskService`]; start one with [`AskService::builder`].
///
/// ```
/// use askstream::{AskService, ServiceConfig};
///
/// let config = ServiceConfig { quota_limit: 100, ..ServiceConfig::default() };
/// let service = AskService::builder(config).build()?;
/// # drop(service);
/// # Ok::<(), askstream::StartupError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    config: ServiceConfig,
    auth: Option<Auth>,
    quota: Option<Arc<dyn QuotaStore>>,
    retriever: Option<Arc<dyn Retriever>>,
    generator: Option<Arc<dyn Generator>>,
    shutdown: Shutdown,
}

impl Builder {
    pub(crate) fn new(config: ServiceConfig) -> Self {
        Builder {
            config,
            auth: None,
            quota: None,
            retriever: None,
            generator: None,
            shutdown: Shutdown::new(),
        }
    }

    /// The settings the service will be built with.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Identifies callers with `auth` instead of `config.keys`.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Keeps quota in `quota` (shared with other services, or not in memory) instead of a
    /// new in-memory map.
    pub fn quota(mut self, quota: Arc<dyn QuotaStore>) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Uses this retriever instead of BM25 over `config.docs` or the built-in corpus.
    pub fn retriever(mut self, retriever: Arc<dyn Retriever>) -> Self {
        self.retriever = Some(retriever);
        self
    }

    /// Uses this generator instead of the one `config.generator` names.
    pub fn generator(mut self, generator: Arc<dyn Generator>) -> Self {
        self.generator = Some(generator);
        self
    }

    /// Shares a shutdown handle (an embedder's own, to drain and stop its answers).
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Loads what was not given (keys file, documents), checks the settings and builds
    /// the service.
    ///
    /// No task is started here, so this works outside a runtime; the quota store's
    /// housekeeping starts with the service's first request and stops when its last
    /// clone is dropped.
    pub fn build(self) -> Result<AskService, StartupError> {
        let Builder {
            config,
            auth,
            quota,
            retriever,
            generator,
            shutdown,
        } = self;
        config.validate().map_err(StartupError::Config)?;
        // A reload reads the keys file again only if the keys came from it.
        let keys_file = if auth.is_some() {
            None
        } else {
            config.keys.clone()
        };
        let auth = match (auth, &config.keys) {
            (Some(a), _) => a,
            (None, Some(path)) => Auth::from_file(path).map_err(StartupError::Keys)?,
            (None, None) => {
                tracing::warn!(
                    "no keys file: open mode, the user is the bearer token or else the client IP"
                );
                Auth::open()
            }
        };
        let retriever: Arc<dyn Retriever> = match (retriever, &config.docs) {
            (Some(r), _) => r,
            (None, Some(dir)) => {
                Arc::new(
                    Bm25Index::from_dir(dir).map_err(|error| StartupError::Docs {
                        path: dir.clone(),
                        error,
                    })?,
                )
            }
            (None, None) => Arc::new(Bm25Index::builtin()),
        };
        let generator: Arc<dyn Generator> = match (generator, &config.generator) {
            (Some(g), _) => g,
            (None, GeneratorConfig::Sim(sim)) => Arc::new(SimGenerator::new(*sim)),
            (None, GeneratorConfig::OpenAi(upstream)) => {
                // The server ends an answer after `max_answer_tokens` token events; asking
                // the model for no more saves it generating what would be cut. A smaller
                // value of the embedder's own is kept.
                let mut upstream = upstream.clone();
                let cap = config.max_answer_tokens;
                upstream.max_tokens = Some(upstream.max_tokens.map_or(cap, |n| n.min(cap)));
                Arc::new(OpenAiGenerator::new(upstream).map_err(StartupError::Upstream)?)
            }
        };
        let quota = match quota {
            Some(q) => q,
            None => store(&config)?,
        };
        let pipeline = Pipeline::new(retriever, generator, shutdown, &config);
        let tls = tls(&config)?;
        Ok(AskService::assemble(
            config, auth, keys_file, quota, pipeline, tls,
        ))
    }
}

/// The TLS acceptor `config.tls` asks for, read now so a bad file stops the start.
#[cfg(feature = "tls")]
fn tls(config: &ServiceConfig) -> Result<Option<Arc<crate::tls::Tls>>, StartupError> {
    config
        .tls
        .as_ref()
        .map(|files| crate::tls::Tls::load(files).map(Arc::new))
        .transpose()
        .map_err(StartupError::Tls)
}

#[cfg(not(feature = "tls"))]
fn tls(config: &ServiceConfig) -> Result<Option<std::convert::Infallible>, StartupError> {
    match config.tls {
        Some(_) => Err(StartupError::Tls(
            "this build has no TLS support (cargo feature `tls`)".into(),
        )),
        None => Ok(None),
    }
}

/// The quota store `config.quota_store` names.
fn store(config: &ServiceConfig) -> Result<Arc<dyn QuotaStore>, StartupError> {
    match &config.quota_store {
        QuotaStoreConfig::Memory => Ok(Arc::new(QuotaMap::new(config.quota_window))),
        #[cfg(feature = "redis")]
        QuotaStoreConfig::Redis {
            url,
            lease,
            timeout,
        } => {
            let store = crate::quota::RedisStore::new(crate::quota::RedisConfig {
                url: url.clone(),
                window: config.quota_window,
                lease: *lease,
                timeout: *timeout,
            })
            .map_err(StartupError::QuotaStore)?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "redis"))]
        QuotaStoreConfig::Redis { .. } => Err(StartupError::QuotaStore(
            "this build has no Redis support (cargo feature `redis`)".to_owned(),
        )),
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("auth", &self.auth)
            .field("custom_quota", &self.quota.is_some())
            .field("custom_retriever", &self.retriever.is_some())
            .field("custom_generator", &self.generator.is_some())
            .finish()
    }
}

/// Why a service could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartupError {
    /// A setting that cannot work.
    Config(InvalidConfig),
    /// The keys file could not be read or parsed.
    Keys(KeysError),
    /// The documents folder could not be indexed.
    Docs {
        /// The folder given as `docs`.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The quota store cannot be used (a malformed URL, or no Redis support built in).
    QuotaStore(String),
    /// The `openai` generator's settings are unusable (a URL that is not `http://`, an
    /// empty model, a key that cannot be sent).
    Upstream(openai::ConfigError),
    /// The TLS certificate or key cannot be used (unreadable, not PEM, not a pair), or
    /// TLS support was not built in.
    Tls(String),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Config(e) => write!(f, "configuration: {e}"),
            // `Auth::from_file` names the file itself.
            StartupError::Keys(e) => write!(f, "{e}"),
            StartupError::Docs { path, error } => {
                write!(f, "documents folder {}: {error}", path.display())
            }
            StartupError::Upstream(e) => write!(f, "upstream: {e}"),
            StartupError::QuotaStore(e) => write!(f, "quota store: {e}"),
            StartupError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}
