//! Agents and tools: tool definitions with JSON input schemas ([`Tool`], [`ToolRegistry`]), a
//! small JSON Schema validator for tool arguments ([`schema`]), and agent definitions with the
//! durable agent loop.

pub mod demo;
pub mod schema;
pub mod tool;

pub use tool::{Tool, ToolBuilder, ToolContext, ToolError, ToolRegistry, validate_tool_name};
pub mod runtime;

pub use runtime::{
    AGENT_RUN_KIND, AgentDef, AgentRunTask, AgentRuntime, CapabilityDenialPolicy, agent_queue,
    get_agent, register_agent, register_tools,
};
