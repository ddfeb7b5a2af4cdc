//! Agents and tools: tool definitions with JSON input schemas ([`Tool`], [`ToolRegistry`]), the
//! JSON Schema validation of tool arguments ([`schema`]), and agent definitions with the durable
//! agent loop.
//!
//! [`def`] holds the definitions and their rows; [`runtime`] drives a run through the
//! [`Kernel`](crate::kernel::Kernel) (model steps, then tool steps, per iteration);
//! [`subagent`] lets an agent call another agent as a tool (a child run of its own); [`skills`]
//! are the bundles of tools and instructions an agent loads on demand; a run replayed under
//! `fork_on_drift` is handed over to its fork (module `fork`). The tool types live in
//! [`crate::kernel::tool`] and are re-exported here.

pub mod approval;
pub mod def;
pub mod demo;
mod fork;

pub mod runtime;
pub mod skills;
pub mod subagent;

/// The tool types live in [`crate::kernel::tool`] (the kernel executes tools); kept at their
/// old path `pgcrew::agent::tool`.
pub use crate::kernel::tool;

/// Tool-argument validation lives in [`crate::kernel::schema`]; kept at its old path
/// `pgcrew::agent::schema`.
pub use crate::kernel::schema;
pub use crate::kernel::tool::{
    Tool, ToolBuilder, ToolContext, ToolError, ToolRegistry, validate_tool_name,
};

pub use def::{
    AGENT_RUN_KIND, AgentDef, CapabilityDenialPolicy, agent_queue, get_agent, register_agent,
    register_tools,
};
pub use runtime::{AgentRunTask, AgentRuntime};
pub use skills::{LOAD_SKILL_TOOL, Skill, get_skills, register_skills};
pub use subagent::{ChildRun, Subagent, child_runs};
