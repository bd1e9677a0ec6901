//! The cluster's shared secret: every call to the `Coordinator` service
//! carries `authorization: Bearer <token>`, checked by [`RequireToken`] on
//! the coordinator and attached by [`AttachToken`] on workers. The standard
//! health service is not behind it (Kubernetes probes send no credentials).
//!
//! The token comes from a file or the [`TOKEN_ENV`] environment variable,
//! never from `cluster.toml`, and is never printed: [`Token`]'s `Debug`
//! hides it and refused calls are logged without what they sent.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Environment variable holding the token (when no token file is given).
pub const TOKEN_ENV: &str = "DISTILL_CLUSTER_TOKEN";

/// Shortest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 16;

/// A shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from `text` (surrounding whitespace removed): at least
    /// [`MIN_TOKEN_CHARS`] visible ASCII characters, no spaces. `source`
    /// names where it came from in errors (which never quote it).
    pub fn new(text: &str, source: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_CHARS {
            return Err(format!(
                "the token from {source} has {} characters; at least {MIN_TOKEN_CHARS} are needed",
                text.len()
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the token from {source} must be visible ASCII characters without spaces"
            ));
        }
        Ok(Token(text.into()))
    }

    /// Reads a token file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        Token::new(&text, &path.display().to_string())
    }

    /// The token in [`TOKEN_ENV`], if that variable is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(TOKEN_ENV) {
            Ok(text) => Token::new(&text, TOKEN_ENV).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{TOKEN_ENV} is not valid text")),
        }
    }

    /// `--token-file` when given, else [`TOKEN_ENV`], else none.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>, String> {
        match file {
            Some(path) => Token::from_file(path).map(Some),
            None => Token::from_env(),
        }
    }

    /// A fresh random token (256 bits from the operating system's
    /// generator, hex), for a coordinator and the workers it starts itself.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's random generator works");
        Token(hex::encode(bytes).into())
    }

    /// Whether `sent` is this token (compared in constant time).
    pub fn matches(&self, sent: &str) -> bool {
        bool::from(sent.as_bytes().ct_eq(self.0.as_bytes()))
    }

    /// The secret itself, to hand to a child process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn bearer(&self) -> MetadataValue<Ascii> {
        format!("Bearer {}", self.0)
            .parse()
            .expect("a token is visible ASCII")
    }
}

/// The coordinator's check: calls without `authorization: Bearer <token>`
/// (compared in constant time) get UNAUTHENTICATED. With no token
/// (authentication switched off in the config) every call passes.
#[derive(Clone, Debug)]
pub struct RequireToken {
    expected: Option<Token>,
}

impl RequireToken {
    /// Checks for `expected`, or lets everything through when `None`.
    pub fn new(expected: Option<Token>) -> Self {
        RequireToken { expected }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let sent = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let reason = match sent {
            None => "no bearer token",
            Some(token) if expected.matches(token) => return Ok(request),
            Some(_) => "wrong token",
        };
        tracing::warn!(peer = ?request.remote_addr(), reason, "call refused: not authenticated");
        Err(Status::unauthenticated(format!(
            "{reason}: this coordinator requires the cluster token (--token-file or {TOKEN_ENV})"
        )))
    }
}

/// The worker's side: adds the token to every call (nothing when `None`).
#[derive(Clone, Debug)]
pub struct AttachToken {
    header: Option<MetadataValue<Ascii>>,
}

impl AttachToken {
    /// Attaches `token` to every call.
    pub fn new(token: Option<&Token>) -> Self {
        AttachToken {
            header: token.map(Token::bearer),
        }
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new("0123456789abcdef-secret", "test").unwrap()
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(Token::new("short", "x")
            .unwrap_err()
            .contains("at least 16"));
        let err = Token::new("has a space in the middle", "the file").unwrap_err();
        assert!(
            err.contains("without spaces") && !err.contains("middle"),
            "{err}"
        );
        assert_eq!(
            Token::new("  0123456789abcdef-secret\n", "x").unwrap(),
            token()
        );
        assert_eq!(format!("{:?}", token()), "Token(<redacted>)");
        let (a, b) = (Token::generate(), Token::generate());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn token_files_are_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdef-secret\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap(), token());
        let missing = Token::from_file(&dir.join("nope")).unwrap_err();
        assert!(missing.contains("cannot read the token file"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_right_token_passes() {
        let mut check = RequireToken::new(Some(token()));
        let mut attach = AttachToken::new(Some(&token()));
        let signed = attach.call(Request::new(())).unwrap();
        assert!(check.call(signed).is_ok());
        let bare = check.call(Request::new(())).unwrap_err();
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
        assert!(bare.message().contains("no bearer token"));
        let other = Token::new("fedcba9876543210-secret", "x").unwrap();
        let wrong = check
            .call(
                AttachToken::new(Some(&other))
                    .call(Request::new(()))
                    .unwrap(),
            )
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(
            !wrong.message().contains("secret"),
            "the token is not echoed"
        );
        let mut malformed = Request::new(());
        malformed.metadata_mut().insert(
            "authorization",
            "Basic 0123456789abcdef-secret".parse().unwrap(),
        );
        assert!(check.call(malformed).is_err());
        // Authentication off: everything passes.
        assert!(RequireToken::new(None).call(Request::new(())).is_ok());
    }
}
