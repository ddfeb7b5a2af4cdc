//! Tool definitions: a name, a description, a JSON input schema, an optional required
//! capability and an async handler. Tools are registered with a [`ToolRegistry`] and executed
//! durably by [`Kernel::step_tool`](crate::kernel::Kernel::step_tool).
//!
//! ```
//! use pgcrew::agent::{Tool, ToolError};
//! use serde_json::json;
//!
//! # fn demo() -> pgcrew::Result<()> {
//! let tool = Tool::builder("echo")
//!     .description("returns its input")
//!     .input_schema(json!({"type": "object", "properties": {"text": {"type": "string"}}}))
//!     .handler(|_ctx, args| async move { Ok::<_, ToolError>(args) })
//!     .build()?;
//! assert_eq!(tool.name(), "echo");
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::schema::CompiledSchema;
use crate::error::{Error, Result};
use crate::ids::{RunId, TenantId};
use crate::model::ToolSpec;

/// What a tool handler knows about the call.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The run the call belongs to.
    pub run: RunId,
    /// The tenant.
    pub tenant: TenantId,
    /// The step key of the call.
    pub step_key: String,
    /// A key that is the same for every attempt of this step (the first call and any
    /// reconciliation): pass it to external providers so a repeated call has no second effect.
    pub idempotency_key: String,
    /// True when the call is a reconciliation of an earlier attempt whose outcome is unknown:
    /// the handler should look up (or idempotently repeat) what the first attempt did.
    pub reconciliation: bool,
}

/// How a tool call can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolError {
    /// The call definitely failed (and had no effect worth reconciling).
    Failed(String),
    /// The call may or may not have taken effect (a timeout after sending, a lost connection):
    /// the step must be reconciled with [`Kernel::reconcile_tool`](crate::kernel::Kernel::reconcile_tool).
    UnknownOutcome(String),
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::Failed(m) => write!(f, "failed: {m}"),
            ToolError::UnknownOutcome(m) => write!(f, "unknown outcome: {m}"),
        }
    }
}

impl std::error::Error for ToolError {}

type BoxFut = Pin<Box<dyn Future<Output = std::result::Result<Value, ToolError>> + Send>>;
type Handler = dyn Fn(ToolContext, Value) -> BoxFut + Send + Sync;

/// A tool (see the [module docs](self)).
#[derive(Clone)]
pub struct Tool {
    name: String,
    description: String,
    input_schema: CompiledSchema,
    requires_capability: Option<String>,
    approval_timeout: Option<Duration>,
    handler: Arc<Handler>,
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.name)
            .field("requires_capability", &self.requires_capability)
            .field("approval_timeout", &self.approval_timeout)
            .finish()
    }
}

/// How long a tool call that requires approval waits for a decision by default (24 hours); an
/// undecided call is then returned to the model as not approved.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Tool {
    /// Start building a tool named `name` (`^[a-zA-Z0-9_-]{1,64}$`).
    pub fn builder(name: impl Into<String>) -> ToolBuilder {
        ToolBuilder {
            name: name.into(),
            description: String::new(),
            input_schema: serde_json::json!({"type": "object"}),
            requires_capability: None,
            approval_timeout: None,
            handler: None,
        }
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description shown to the model.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The JSON schema of the arguments.
    pub fn input_schema(&self) -> &Value {
        self.input_schema.schema()
    }

    /// The capability a tenant needs to call this tool, if any.
    pub fn requires_capability(&self) -> Option<&str> {
        self.requires_capability.as_deref()
    }

    /// Whether an agent's calls of this tool wait for a human approval first.
    pub fn requires_approval(&self) -> bool {
        self.approval_timeout.is_some()
    }

    /// How long a call waits for its approval (`None`: no approval needed).
    pub fn approval_timeout(&self) -> Option<Duration> {
        self.approval_timeout
    }

    /// The tool as offered to a model.
    pub fn spec(&self) -> ToolSpec {
        ToolSpec::new(
            &self.name,
            &self.description,
            self.input_schema.schema().clone(),
        )
    }

    /// Validate `arguments` against the input schema: [`Error::InvalidInput`] listing every
    /// violation.
    pub fn validate_arguments(&self, arguments: &Value) -> Result<()> {
        let errors = self.input_schema.validate(arguments);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(
                "tool arguments",
                format!(
                    "arguments for tool `{}` do not match its input schema: {}",
                    self.name,
                    errors.join("; ")
                ),
            ))
        }
    }

    /// Run the handler (no validation, no ledger: use the kernel for durable calls).
    pub async fn call(
        &self,
        ctx: ToolContext,
        arguments: Value,
    ) -> std::result::Result<Value, ToolError> {
        (self.handler)(ctx, arguments).await
    }
}

/// Builder of a [`Tool`].
pub struct ToolBuilder {
    name: String,
    description: String,
    input_schema: Value,
    requires_capability: Option<String>,
    approval_timeout: Option<Duration>,
    handler: Option<Arc<Handler>>,
}

impl fmt::Debug for ToolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolBuilder")
            .field("name", &self.name)
            .finish()
    }
}

impl ToolBuilder {
    /// The description shown to the model.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The JSON schema of the arguments (default: any object).
    pub fn input_schema(mut self, schema: Value) -> Self {
        self.input_schema = schema;
        self
    }

    /// Require this capability of the calling tenant.
    pub fn requires_capability(mut self, capability: impl Into<String>) -> Self {
        self.requires_capability = Some(capability.into());
        self
    }

    /// Make an agent's calls of this tool wait for a human approval (`pgcrew run approve|reject
    /// RUN STEP`, [`crate::runs::approve_step`]) before the tool runs, for at most
    /// [`DEFAULT_APPROVAL_TIMEOUT`]; a rejected or undecided call is returned to the model as
    /// a rejection and the tool is not called (see [`crate::agent::approval`]).
    pub fn requires_approval(self) -> Self {
        self.approval_timeout(DEFAULT_APPROVAL_TIMEOUT)
    }

    /// [`requires_approval`](Self::requires_approval) with this decision timeout.
    pub fn approval_timeout(mut self, timeout: Duration) -> Self {
        self.approval_timeout = Some(timeout);
        self
    }

    /// The async handler.
    pub fn handler<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(ToolContext, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Value, ToolError>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |ctx, args| Box::pin(f(ctx, args))));
        self
    }

    /// Check the definition and build the tool.
    pub fn build(self) -> Result<Tool> {
        validate_tool_name(&self.name)?;
        let input_schema = CompiledSchema::compile(self.input_schema)?;
        let schema = input_schema.schema();
        if !schema.is_object() || schema.get("type").is_some_and(|t| t != "object") {
            return Err(Error::invalid(
                "input schema",
                format!(
                    "tool `{}`: the input schema must be an object schema ({{\"type\": \"object\", ...}})",
                    self.name
                ),
            ));
        }
        if let Some(c) = &self.requires_capability {
            crate::ids::validate_text_id("requires_capability", c)?;
        }
        if self
            .approval_timeout
            .is_some_and(|t| t > crate::kernel::wait::MAX_WAIT)
        {
            return Err(Error::invalid(
                "approval timeout",
                format!("tool `{}`: at most 3650 days", self.name),
            ));
        }
        let handler = self.handler.ok_or_else(|| {
            Error::invalid(
                "handler",
                format!("tool `{}` has no handler: call .handler(..)", self.name),
            )
        })?;
        Ok(Tool {
            name: self.name,
            description: self.description,
            input_schema,
            requires_capability: self.requires_capability,
            approval_timeout: self.approval_timeout,
            handler,
        })
    }
}

/// Check a tool name: 1 to 64 characters of `[a-zA-Z0-9_-]` (what model providers accept).
pub fn validate_tool_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::invalid(
            "tool name",
            format!("`{name}` must be 1 to 64 characters of letters, digits, `_` or `-`"),
        ));
    }
    Ok(())
}

/// The tools an instance can execute, by name.
#[derive(Debug, Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Tool>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a tool ([`Error::InvalidInput`] if one with the same name is registered).
    pub fn register(&mut self, tool: Tool) -> Result<()> {
        if self.tools.contains_key(&tool.name) {
            return Err(Error::invalid(
                "tool name",
                format!("a tool named `{}` is already registered", tool.name),
            ));
        }
        self.tools.insert(tool.name.clone(), tool);
        Ok(())
    }

    /// Builder-style [`register`](Self::register).
    pub fn with(mut self, tool: Tool) -> Result<Self> {
        self.register(tool)?;
        Ok(self)
    }

    /// A tool by name.
    pub fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.get(name)
    }

    /// The registered tool names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// Every registered tool.
    pub fn iter(&self) -> impl Iterator<Item = &Tool> {
        self.tools.values()
    }
}
