//! Progressive skills: named bundles of tools and instructions ([`Skill`]) that an agent loads
//! on demand. An agent starts with its own tools plus a built-in [`LOAD_SKILL_TOOL`] listing
//! the skills it may load ([`AgentDef::skill`](super::AgentDef::skill)); when the model calls
//! it, the loop records a `skill_loaded` event (the skill's name, tools and instructions), the
//! instructions reach the model as the tool's result, and the skill's tools are offered from
//! the next model call on. A skill's tools run through the kernel's tool steps, so the
//! capability guard still applies to each of them; a tool the agent has not been given (by its
//! definition or a loaded skill) is refused and returned to the model.
//!
//! Replay is exact: the loaded set is rebuilt from the recorded `skill_loaded` events (a
//! recorded load is never re-read from `pgcrew.skills`), so a run resumed after a crash sends
//! the same tools and context as before.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::kernel::{Kernel, RunScope, ToolRegistry};
use crate::model::{ToolCall, ToolSpec};
use crate::vocab::EventType;

/// The name of the built-in tool an agent loads skills with (`{"name": "<skill>"}`).
pub const LOAD_SKILL_TOOL: &str = "load_skill";

/// Check a skill name: 1 to 64 letters, digits, `_` or `-` (like a tool name).
pub fn validate_skill_name(name: &str) -> Result<()> {
    crate::kernel::validate_tool_name(name).map_err(|_| {
        Error::invalid(
            "skill name",
            format!("`{name}` must be 1 to 64 characters of letters, digits, `_` or `-`"),
        )
    })
}

/// A skill: a name, a description (shown to the model before loading), instructions (given to
/// the model when loaded) and the tools it makes available.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skill {
    /// Unique name.
    pub name: String,
    /// What the skill is for (listed in the `load_skill` tool's description).
    pub description: String,
    /// What the model is told when it loads the skill.
    pub instructions: String,
    /// The tools it makes available once loaded (registered tools).
    pub tools: Vec<String>,
}

impl Skill {
    /// A skill named `name` with no description, instructions or tools.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            instructions: String::new(),
            tools: Vec::new(),
        }
    }

    /// Set the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    /// Set the instructions.
    pub fn instructions(mut self, i: impl Into<String>) -> Self {
        self.instructions = i.into();
        self
    }

    /// Add a tool.
    pub fn tool(mut self, name: impl Into<String>) -> Self {
        self.tools.push(name.into());
        self
    }

    /// Check the names (the skill's and its tools'); the built-in `load_skill` is no tool of a
    /// skill.
    pub fn validate(&self) -> Result<()> {
        validate_skill_name(&self.name)?;
        for t in &self.tools {
            crate::kernel::validate_tool_name(t)?;
            if t == LOAD_SKILL_TOOL {
                return Err(Error::invalid(
                    "skill",
                    format!(
                        "skill `{}` names the built-in `{LOAD_SKILL_TOOL}`",
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check that every tool of the skill is in `tools` (an instance's registry).
    pub fn check_tools(&self, tools: &ToolRegistry) -> Result<()> {
        match self.tools.iter().find(|t| tools.get(t).is_none()) {
            Some(t) => Err(unknown_tool(&self.name, t)),
            None => Ok(()),
        }
    }
}

fn unknown_tool(skill: &str, tool: &str) -> Error {
    Error::invalid(
        "skill",
        format!("skill `{skill}` names unknown tool `{tool}` (register the tool first)"),
    )
}

/// Upsert skill definitions into `pgcrew.skills`, in one transaction. Every tool a skill names
/// must be registered in `pgcrew.tools` ([`register_tools`](super::register_tools) first);
/// otherwise nothing is written and the error names the skill and the tool.
#[instrument(skip(db, skills), err)]
pub async fn register_skills(db: &crate::Db, skills: &[Skill]) -> Result<()> {
    for s in skills {
        s.validate()?;
    }
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    for s in skills {
        let unknown = tx
            .query_opt(sql!("agent/unknown_tools"), typed![&s.tools])
            .await?;
        if let Some(row) = unknown {
            let tool: String = row.try_get(0)?;
            return Err(unknown_tool(&s.name, &tool));
        }
        tx.execute(
            sql!("agent/upsert_skill"),
            typed![&s.name, &s.description, &s.instructions, &s.tools],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Load the skills named in `names` ([`Error::NotFound`] with kind `skill` for the first one
/// that is not registered).
#[instrument(skip(db), err)]
pub async fn get_skills(db: &crate::Db, names: &[String]) -> Result<Vec<Skill>> {
    let rows = db.query(sql!("agent/get_skills"), typed![&names]).await?;
    let mut found = BTreeMap::new();
    for r in &rows {
        let s = Skill {
            name: r.try_get("name")?,
            description: r.try_get("description")?,
            instructions: r.try_get("instructions")?,
            tools: r.try_get("tools")?,
        };
        found.insert(s.name.clone(), s);
    }
    names
        .iter()
        .map(|n| {
            found
                .get(n)
                .cloned()
                .ok_or_else(|| Error::not_found("skill", n))
        })
        .collect()
}

/// The skills of one agent run: those it may load and those it has loaded (in load order).
#[derive(Debug, Clone, Default)]
pub(super) struct SkillSet {
    available: BTreeMap<String, Skill>,
    loaded: Vec<Skill>,
}

impl SkillSet {
    /// The skills of an agent definition (none loaded yet).
    pub(super) async fn for_agent(db: &crate::Db, def: &super::AgentDef) -> Result<Self> {
        if def.skills.is_empty() {
            return Ok(Self::default());
        }
        let available = get_skills(db, &def.skills)
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        Ok(Self {
            available,
            loaded: Vec::new(),
        })
    }

    /// True when `tool` may be called: one of the agent's own `tools` or of a loaded skill.
    pub(super) fn allows(&self, own: &[String], tool: &str) -> bool {
        own.iter().any(|t| t == tool)
            || self
                .loaded
                .iter()
                .any(|s| s.tools.iter().any(|t| t == tool))
    }

    /// The extra tool specs: `load_skill` (when the agent has skills) and the tools of the
    /// loaded skills not already in `own`, looked up in `tools`.
    pub(super) fn specs(&self, own: &[String], tools: &ToolRegistry) -> Result<Vec<ToolSpec>> {
        let mut specs = Vec::new();
        if self.available.is_empty() {
            return Ok(specs);
        }
        specs.push(self.load_skill_spec());
        let mut seen: Vec<&str> = own.iter().map(String::as_str).collect();
        for s in &self.loaded {
            for t in &s.tools {
                if seen.contains(&t.as_str()) {
                    continue;
                }
                seen.push(t);
                let tool = tools.get(t).ok_or_else(|| {
                    Error::not_found(
                        "tool",
                        format!("{t} (skill {} needs it; this instance lacks it)", s.name),
                    )
                })?;
                specs.push(tool.spec());
            }
        }
        Ok(specs)
    }

    fn load_skill_spec(&self) -> ToolSpec {
        let list = self
            .available
            .values()
            .map(|s| format!("- {}: {}", s.name, s.description))
            .collect::<Vec<_>>()
            .join("\n");
        let names: Vec<&String> = self.available.keys().collect();
        ToolSpec::new(
            LOAD_SKILL_TOOL,
            format!("Load a skill: its instructions and tools become available. Skills:\n{list}"),
            json!({
                "type": "object",
                "properties": {"name": {"type": "string", "enum": names}},
                "required": ["name"],
                "additionalProperties": false
            }),
        )
    }

    /// The `load_skill` call `call` of step `step_key`: replayed from its `skill_loaded` event
    /// when recorded, else checked and recorded. The tool result for the model: the skill's
    /// instructions and tools, or the error.
    pub(super) async fn load(
        &mut self,
        kernel: &Kernel,
        scope: &RunScope,
        step_key: &str,
        call: &ToolCall,
    ) -> Result<String> {
        let events = kernel.step_events(scope.run, step_key).await?;
        let recorded = events
            .iter()
            .find(|e| e.event_type == EventType::SkillLoaded.as_str());
        let skill = match recorded {
            Some(ev) => serde_json::from_value::<Skill>(
                ev.payload.get("skill").cloned().unwrap_or(Value::Null),
            )?,
            None => {
                let name = call
                    .arguments
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let Some(skill) = self.available.get(name).cloned() else {
                    let message = format!(
                        "no skill named `{name}` can be loaded (skills: {:?})",
                        self.available.keys().collect::<Vec<_>>()
                    );
                    if events.is_empty() {
                        kernel
                            .record(
                                scope,
                                step_key,
                                EventType::ToolRejected,
                                json!({"tool": LOAD_SKILL_TOOL, "reason": "unknown_skill",
                                       "message": message}),
                            )
                            .await?;
                    }
                    return Ok(json!({"error": message}).to_string());
                };
                kernel
                    .record(
                        scope,
                        step_key,
                        EventType::SkillLoaded,
                        json!({"skill": skill, "already_loaded": self.is_loaded(&skill.name)}),
                    )
                    .await?;
                skill
            }
        };
        let content = json!({"skill": skill.name, "instructions": skill.instructions,
                             "tools": skill.tools})
        .to_string();
        if !self.is_loaded(&skill.name) {
            self.loaded.push(skill);
        }
        Ok(content)
    }

    fn is_loaded(&self, name: &str) -> bool {
        self.loaded.iter().any(|s| s.name == name)
    }

    /// Refuse a call of a tool the agent has not been given: recorded once as `tool_rejected`
    /// (reason `not_available`); the message for the model. `None` when the step already
    /// recorded a call of the tool (a replay: the recorded outcome stands).
    pub(super) async fn refuse(
        &self,
        kernel: &Kernel,
        scope: &RunScope,
        step_key: &str,
        call: &ToolCall,
    ) -> Result<Option<String>> {
        let events = kernel.step_events(scope.run, step_key).await?;
        if events
            .iter()
            .any(|e| e.event_type == EventType::ToolRequested.as_str())
        {
            return Ok(None);
        }
        let providers: Vec<&str> = self
            .available
            .values()
            .filter(|s| s.tools.contains(&call.name))
            .map(|s| s.name.as_str())
            .collect();
        let message = if providers.is_empty() {
            format!("tool `{}` is not available to this agent", call.name)
        } else {
            format!(
                "tool `{}` is not available yet: load one of the skills {providers:?} with `{LOAD_SKILL_TOOL}` first",
                call.name
            )
        };
        if events.is_empty() {
            kernel
                .record(
                    scope,
                    step_key,
                    EventType::ToolRejected,
                    json!({"tool": call.name, "reason": "not_available", "message": message}),
                )
                .await?;
        }
        Ok(Some(json!({"error": message}).to_string()))
    }
}
