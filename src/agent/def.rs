//! Agent definitions: [`AgentDef`] (name, model, system prompt, tools, limits), its
//! capability-denial policy, and their rows in `pgcrew.agents` / `pgcrew.tools`.

use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::kernel::{ReplayPolicy, ToolRegistry};

use super::subagent::{self, Subagent};

/// The task kind of agent runs.
pub const AGENT_RUN_KIND: &str = "pgcrew.agent_run";

/// Default most model/tool iterations per run.
pub const DEFAULT_MAX_ITERATIONS: u32 = 10;

/// The queue an agent's runs are enqueued on (`agent.<name>`): only instances that can run the
/// agent (they have its tools) listen on it.
pub fn agent_queue(agent: &str) -> String {
    format!("agent.{agent}")
}

/// What an agent run does when the model calls a tool whose capability the run's tenant lacks
/// (the tool never runs and the ledger records `capability_denied` either way). Stored per
/// agent in `pgcrew.agents.on_capability_denied`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CapabilityDenialPolicy {
    /// The default: the run fails with `error_type` `capability_denied` and the denial
    /// ([`Error::CapabilityDenied`]) as its error message; the model is not called again.
    #[default]
    FailRun,
    /// The denial is returned to the model as the tool's result (`{"error": "capability
    /// denied: ..."}`) and the run continues, so the model can answer without the tool.
    ReturnToModel,
}

impl CapabilityDenialPolicy {
    /// The stored name: `fail_run` or `return_to_model`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CapabilityDenialPolicy::FailRun => "fail_run",
            CapabilityDenialPolicy::ReturnToModel => "return_to_model",
        }
    }
}

crate::error::display_as_str!(CapabilityDenialPolicy);

impl std::str::FromStr for CapabilityDenialPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        [Self::FailRun, Self::ReturnToModel]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "on_capability_denied",
                    format!("`{s}` is not one of fail_run, return_to_model"),
                )
            })
    }
}

/// An agent definition.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDef {
    /// Unique name.
    pub name: String,
    /// What the agent does.
    pub description: String,
    /// The model it calls.
    pub model: String,
    /// Its system prompt.
    pub system_prompt: String,
    /// Names of the tools it may call.
    pub tools: Vec<String>,
    /// `max_tokens` of each model call.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Most iterations (model calls) per run.
    pub max_iterations: u32,
    /// What a run does when a tool call is denied for lack of a capability (default
    /// [`CapabilityDenialPolicy::FailRun`]).
    pub on_capability_denied: CapabilityDenialPolicy,
    /// The agents it may call as tools ([`super::subagent`]).
    pub subagents: Vec<Subagent>,
    /// How a resumed run replays a model step whose request changed (default
    /// [`ReplayPolicy::Strict`]; see [`AgentRuntime::execute`](super::AgentRuntime::execute)).
    pub replay_policy: ReplayPolicy,
    /// Names of the skills the agent may load with its built-in `load_skill` tool (see
    /// [`skills`](super::skills)).
    pub skills: Vec<String>,
}

/// Builder-style setters of [`AgentDef`] fields: `field(arg: Type) => value stored;`.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident($arg:ident: $ty:ty) => $value:expr;)+) => {$(
        $(#[$doc])*
        pub fn $field(mut self, $arg: $ty) -> Self {
            self.$field = $value;
            self
        }
    )+};
}

impl AgentDef {
    /// A definition with defaults (no tools, no system prompt, 10 iterations).
    pub fn new(name: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            model: model.into(),
            system_prompt: String::new(),
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
            max_iterations: DEFAULT_MAX_ITERATIONS,
            on_capability_denied: CapabilityDenialPolicy::default(),
            subagents: Vec::new(),
            replay_policy: ReplayPolicy::default(),
            skills: Vec::new(),
        }
    }

    setters! {
        /// Set the description.
        description(d: impl Into<String>) => d.into();
        /// Set the system prompt.
        system_prompt(p: impl Into<String>) => p.into();
        /// Set `max_tokens` per model call.
        max_tokens(n: u32) => Some(n);
        /// Set the temperature.
        temperature(t: f64) => Some(t);
        /// Set the most iterations per run.
        max_iterations(n: u32) => n;
        /// Set what a run does when a tool call is denied for lack of a capability.
        on_capability_denied(policy: CapabilityDenialPolicy) => policy;
        /// Set how a resumed run replays a model step whose request changed.
        replay_policy(policy: ReplayPolicy) => policy;
    }

    /// Allow a skill to be loaded (through the built-in `load_skill` tool).
    pub fn skill(mut self, name: impl Into<String>) -> Self {
        self.skills.push(name.into());
        self
    }

    /// Allow a tool.
    pub fn tool(mut self, name: impl Into<String>) -> Self {
        self.tools.push(name.into());
        self
    }

    /// Allow calling agent `name` as a tool (a sub-agent with the caller's remaining budget).
    pub fn subagent(self, name: impl Into<String>) -> Self {
        self.subagent_with(Subagent::new(name))
    }

    /// Allow calling a sub-agent with its settings (for example a budget per call).
    pub fn subagent_with(mut self, sub: Subagent) -> Self {
        self.subagents.push(sub);
        self
    }

    /// Check the definition (names, ranges).
    pub fn validate(&self) -> Result<()> {
        crate::ids::validate_text_id("agent name", &self.name)?;
        crate::ids::validate_text_id("agent model", &self.model)?;
        for t in &self.tools {
            crate::kernel::validate_tool_name(t)?;
        }
        for (i, s) in self.subagents.iter().enumerate() {
            s.validate()?;
            if self.tools.contains(&s.agent)
                || self.subagents[..i].iter().any(|o| o.agent == s.agent)
            {
                return Err(Error::invalid(
                    "subagent",
                    format!(
                        "`{}` is named twice among the agent's tools and sub-agents",
                        s.agent
                    ),
                ));
            }
        }
        for k in &self.skills {
            super::skills::validate_skill_name(k)?;
        }
        if self.max_iterations == 0 || self.max_iterations > 1000 {
            return Err(Error::invalid(
                "max_iterations",
                format!("{} is outside 1 to 1000", self.max_iterations),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(Error::invalid(
                "temperature",
                format!("{t} is outside 0 to 2"),
            ));
        }
        Ok(())
    }
}

fn to_i32(field: &'static str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(field, format!("{v} is too large")))
}

/// Upsert an agent definition into `pgcrew.agents` and its sub-agents into
/// `pgcrew.agent_subagents`, in one transaction; sub-agents that close a cycle of agents calling
/// each other are [`Error::SubagentRefused`] and nothing is written.
#[instrument(skip(db, def), fields(agent = %def.name), err)]
pub async fn register_agent(db: &crate::Db, def: &AgentDef) -> Result<()> {
    def.validate()?;
    let max_tokens = def
        .max_tokens
        .map(|n| to_i32("max_tokens", n))
        .transpose()?;
    let iterations = to_i32("max_iterations", def.max_iterations)?;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    tx.execute(
        sql!("agent/upsert_agent"),
        typed![
            &def.name,
            &def.description,
            &def.model,
            &def.system_prompt,
            &def.tools,
            &max_tokens,
            &def.temperature,
            &iterations,
            &def.on_capability_denied.as_str(),
            &def.replay_policy.as_str(),
            &def.skills,
        ],
    )
    .await?;
    subagent::store(&tx, def).await?;
    tx.commit().await?;
    Ok(())
}

/// Upsert every tool of a registry into `pgcrew.tools`, in one transaction.
#[instrument(skip(db, tools), err)]
pub async fn register_tools(db: &crate::Db, tools: &ToolRegistry) -> Result<()> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    for t in tools.iter() {
        tx.execute(
            sql!("agent/upsert_tool"),
            typed![
                &t.name(),
                &t.description(),
                t.input_schema(),
                &t.requires_capability(),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Load an agent definition ([`Error::NotFound`] with kind `agent` when unknown).
#[instrument(skip(db), err)]
pub async fn get_agent(db: &crate::Db, name: &str) -> Result<AgentDef> {
    let row = db
        .query_opt(sql!("agent/get_agent"), typed![&name])
        .await?
        .ok_or_else(|| Error::not_found("agent", name))?;
    agent_of_row(&row)
}

/// An agent definition from a row with agent/get_agent's columns.
pub(crate) fn agent_of_row(row: &tokio_postgres::Row) -> Result<AgentDef> {
    let max_tokens: Option<i32> = row.try_get("max_tokens")?;
    let iterations: i32 = row.try_get("max_iterations")?;
    let policy: String = row.try_get("on_capability_denied")?;
    let replay: String = row.try_get("replay_policy")?;
    Ok(AgentDef {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        model: row.try_get("model")?,
        system_prompt: row.try_get("system_prompt")?,
        tools: row.try_get("tools")?,
        max_tokens: max_tokens.and_then(|n| u32::try_from(n).ok()),
        temperature: row.try_get("temperature")?,
        max_iterations: u32::try_from(iterations).unwrap_or(DEFAULT_MAX_ITERATIONS),
        on_capability_denied: policy.parse()?,
        subagents: {
            let names: Vec<String> = row.try_get("subagent_names")?;
            let budgets: Vec<Option<f64>> = row.try_get("subagent_budgets")?;
            names
                .into_iter()
                .zip(budgets)
                .map(|(agent, budget_usd)| subagent::Subagent { agent, budget_usd })
                .collect()
        },
        replay_policy: replay.parse()?,
        skills: row.try_get("skills")?,
    })
}
